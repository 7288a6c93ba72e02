"""One code path for local folders and `s3://` prefixes (through fsspec/s3fs).

Everything that touches the raw root or the out root goes through here: listing, reads, range
reads, removal; files that appear only once complete are storage/atomic.py.

On S3, ranged reads go through obstore (s3read.get_range: exact or an error); listings, whole-object
reads and writes through s3fs, whose every request follows the same retry policy and timeouts
(s3read.Retry, see `s3fs_retry.S3FileSystem`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import threading
import time
from collections.abc import Callable
from functools import lru_cache

import fsspec

from imnet_assets.storage import s3read
from imnet_assets.storage.hashing import HashingReader  # noqa: F401 - fs.HashingReader, as before

POOL_CONNECTIONS = 128  # kept-alive connections per process to one S3 endpoint
READ_BATCH = 128  # requests read_many keeps in flight (a 20 ms round trip: ~6,000 small objects/s)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def join(root: str, *parts: str) -> str:
    if is_remote(root):
        return posixpath.join(root.rstrip("/"), *parts)
    return os.path.join(root, *parts)


def basename(url: str) -> str:
    return posixpath.basename(url.rstrip("/")) if is_remote(url) else os.path.basename(url)


def dirname(url: str) -> str:
    return posixpath.dirname(url.rstrip("/")) if is_remote(url) else os.path.dirname(url)


def _storage_options(protocol: str) -> dict:
    if protocol in ("s3", "s3a"):
        # Endpoint and region only: credentials come from the standard AWS variables (or the
        # instance/pod role) through botocore, so they are never held in options that could be
        # logged or recorded. No listings cache: other machines write the out root meanwhile.
        opts: dict = {"use_listings_cache": False,
                      # aiobotocore's connection pool: its default of 10 caps a batch of concurrent
                      # reads (read_many) at 10 requests in flight and, when more wait, opens and
                      # drops connections; a pool as large as a batch keeps each one reused.
                      "config_kwargs": {"max_pool_connections": POOL_CONNECTIONS,
                                        # every request times out (a silent endpoint fails, naming
                                        # it) and is tried once by botocore: S3FileSystem retries
                                        "connect_timeout": s3read.CONNECT_TIMEOUT,
                                        "read_timeout": s3read.REQUEST_TIMEOUT,
                                        "retries": {"total_max_attempts": 1}}}
        endpoint = s3read.endpoint_url()
        if endpoint:
            opts["endpoint_url"] = endpoint
        region = s3read.region_name()
        if region:
            opts.setdefault("client_kwargs", {})["region_name"] = region
        return opts
    return {}


@lru_cache(maxsize=8)
def _fs_for(protocol: str, pid: int, endpoint: str | None) -> fsspec.AbstractFileSystem:
    # Cached per process (fsspec clients are not fork safe) and per endpoint.
    if protocol in ("s3", "s3a"):
        from imnet_assets.storage.s3fs_retry import S3FileSystem  # s3fs's imports: 0.4 s, for S3 roots only

        return S3FileSystem(**_storage_options(protocol))
    return fsspec.filesystem(protocol, **_storage_options(protocol))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem that holds `url`, and the path to give it."""
    if is_remote(url):
        protocol, _, rest = url.partition("://")
        return _fs_for(protocol, os.getpid(), s3read.endpoint_url()), rest
    path = url[len("file://"):] if url.startswith("file://") else url
    return _fs_for("file", os.getpid(), None), os.path.abspath(path)


StorageError = s3read.StorageError


class TooLarge(Exception):
    """A read with a limit found more bytes than the file it expects can hold (a commit record, a
    lease): it is not one. Only the limit and a byte more were read, never the whole object. Not a
    StorageError: the storage answered; what it holds is wrong, and a retry would read the same."""

    def __init__(self, url: str, limit: int, kind: str):
        self.url, self.limit = url, limit
        super().__init__(redact(f"{url} holds more than {limit:,} bytes, more than {kind} can: it is not one "
                                "(replaced or written by something else); move it aside"))


def _within(url: str, data: bytes, limit: int | None, kind: str) -> bytes:
    if limit is not None and len(data) > limit:
        raise TooLarge(url, limit, kind)
    return data


def storage_error(url: str, what: str, e: BaseException) -> StorageError:
    if isinstance(e, StorageError):  # named already, with what to check
        return StorageError(redact(f"cannot {what} {url}: {e}"))
    text = f"{type(e).__name__}: {s3read.said(e)}"
    endpoint = s3read.endpoint_url()
    if isinstance(e, PermissionError) or any(
        s in text for s in ("AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch")
    ):
        hint = ("the storage refused the credentials: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or the machine's role) and the bucket's policy")
    elif isinstance(e, (ConnectionError, TimeoutError)) or "connect" in text.lower():
        hint = (f"the storage endpoint {endpoint or '(the AWS default for the region)'} cannot be reached: "
                "check AWS_ENDPOINT_URL and the network")
    else:
        hint = ""
    return StorageError(redact(f"cannot {what} {url}: {text}" + (f" ({hint})" if hint else "")))


def _names_remote_errors(what: str):
    """Errors of a remote URL's storage come out as StorageError naming the URL (a missing file
    stays FileNotFoundError); local paths raise what the OS raises."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(url: str, *args, **kwargs):
            if not is_remote(url):
                return fn(url, *args, **kwargs)
            try:
                return fn(url, *args, **kwargs)
            except (FileNotFoundError, TooLarge):
                raise
            except StorageError as e:
                if str(e).startswith("cannot "):  # said already, by an inner call
                    raise
                raise storage_error(url, what, e) from e
            except Exception as e:  # noqa: BLE001 - botocore's errors are not OSErrors
                raise storage_error(url, what, e) from e

        return call

    return wrap


@_names_remote_errors("look for")
def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def missing_bucket(url: str) -> str | None:
    """What to check where an `s3://` URL's bucket does not exist (HeadBucket: 404), naming it and
    the endpoint; else None (local, the bucket is there, or no answer: the caller's error stands)."""
    if not is_remote(url):
        return None
    fsys, path = filesystem(url)
    bucket = path.partition("/")[0]
    try:
        fsys.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        where = s3read.endpoint_url() or "AWS S3"
        return f"the bucket {bucket} does not exist at {where}: check its name (`aws s3 ls` lists the buckets)"
    except Exception:  # noqa: BLE001 - refused, unreachable: the error being explained says what
        return None
    return None


@_names_remote_errors("get the size of")
def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(fs.size(path))


def _stamp(info: dict) -> str:
    """What changes whenever a file's bytes are rewritten in place: S3's ETag, else the
    modification time (a copy that does not keep times changes it too, see
    outroot.unchanged_on_storage)."""
    return str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")


@_names_remote_errors("look at")
def stat(url: str) -> tuple[int, str]:
    """A file's size and its stamp (`_stamp`)."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    info = fs.info(path)
    return int(info.get("size") or 0), _stamp(info)


@_names_remote_errors("list")
def listdir(url: str) -> list[dict]:
    """Entries directly under `url`: dicts with `name` (basename), `url`, `size`, `mtime` (str),
    `stamp` (see `_stamp`)."""
    return listdir_and_folders(url)[0]


@_names_remote_errors("list")
def listdir_and_folders(url: str) -> tuple[list[dict], list[str]]:
    """`listdir`'s file entries, and the names of the folders directly under `url` (sorted), from
    the same one listing."""
    fs, path = filesystem(url)
    try:
        # One listing (paginated: one request per 1,000 entries on S3), no look before it: an
        # absent folder lists as FileNotFoundError. The listings cache is off (see _storage_options).
        infos = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    out = []
    folders = []
    for info in infos:
        if info.get("type") == "directory":
            folders.append(posixpath.basename(info["name"].rstrip("/")))
        if info.get("type") != "file":
            continue
        name = posixpath.basename(info["name"].rstrip("/"))
        # `mtime` prefers LastModified to the ETag: the raw listing's fingerprints were built on it
        # (changing it would make every S3 raw release stale); `stamp` is the shard commit's
        stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
        out.append({"name": name, "url": join(url, name), "size": int(info.get("size") or 0), "mtime": str(stamp),
                    "stamp": _stamp(info)})
    return sorted(out, key=lambda e: e["name"]), sorted(folders)


@_names_remote_errors("list")
def find_files(url: str) -> list[dict]:
    """Every file under the folder (prefix) at `url`, subfolders included: dicts with `path`
    (relative to `url`, "/"-separated), `size`, `stamp` (see `_stamp`), `mtime` (as listdir's). On S3 one listing without
    a delimiter (one request per 1,000 keys); folder markers (keys ending in "/") are left out."""
    fs, path = filesystem(url)
    path = path.rstrip("/")
    try:
        infos = fs.find(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name, info in infos.items():
        rel = name[len(path) + 1 :] if name.startswith(path + "/") else ""
        if info.get("type") == "directory" or not rel or rel.endswith("/"):
            continue
        out.append({"path": rel, "size": int(info.get("size") or 0), "stamp": _stamp(info),
                    "mtime": str(info.get("mtime") or info.get("LastModified") or "")})
    return out


@_names_remote_errors("read")
def read_bytes(url: str, limit: int | None = None, kind: str = "such a file") -> bytes:
    """The whole file at `url` (with `limit`: a file of more bytes is TooLarge, naming it as not
    `kind`; never read whole). On S3 one ranged GET from byte 0 to past any end
    (s3read.get_range): the answer's Content-Range names the object's size, so a body that came
    back short (cut with its Content-Length rewritten to the part, on a store that sends no checksum
    of the object) is told and read again within the retry budget, then a StorageError naming it:
    never a short document taken for the file (a checker would call it damaged, stale or absent).
    Other remote stores: a body whose checksum is not the object's is read again likewise."""
    fs, path = filesystem(url)
    if not is_remote(url):
        if limit is None:
            return fs.cat_file(path)
        with open(path, "rb") as f:
            return _within(url, f.read(limit + 1), limit, kind)
    protocol, _, rest = url.partition("://")
    if protocol in ("s3", "s3a"):
        bucket, _, key = rest.partition("/")
        return _within(url, s3read.get_range(bucket, key, 0, s3read.WHOLE if limit is None else limit + 1),
                       limit, kind)
    retry = s3read.Retry(f"GET {url}")
    while True:
        try:  # one GET (s3fs otherwise asks for the size first, to split large objects)
            end = None if limit is None else limit + 1
            return _within(url, fs.cat_file(path, end=end, max_concurrency=1), limit, kind)
        except (FileNotFoundError, StorageError, TooLarge):
            raise
        except Exception as e:  # noqa: BLE001 - botocore's errors are classified by Retry
            time.sleep(retry.wait(e))


def read_many(urls: list[str], batch: int = READ_BATCH, limit: int | dict[str, int] | None = None,
              kind: str = "such a file", too_large_as_none: bool = False) -> dict[str, bytes | None]:
    """url -> the whole object's bytes, or None where there is none, for many small files at once.

    On S3, `batch` GETs are kept in flight (threads, each a `read_bytes`: one ranged GET whose
    answer names the object's size, so a body cut short is read again, never taken for the file)
    over the bucket's one store's pooled connections: 1,024 commit records at 20 ms a request take
    ~0.2 s, not 20 s. Other remote stores: through the filesystem's event loop (fsspec's
    `cat_ranges`, which reads the paths as given: no look at each one first).
    Local files are read in turn. A storage error other than a missing file is raised
    (StorageError naming the first such URL), never reported as an absent file. `limit`: as
    `read_bytes`'s, for each file (an object replaced by a huge one since it was listed is
    TooLarge, read no further than the limit), or per URL (a dict). `too_large_as_none`: a file
    over its limit is None, as an absent one (the caller takes it for damaged), not TooLarge."""
    def lim(url: str) -> int | None:
        return limit.get(url) if isinstance(limit, dict) else limit

    def within(url: str, read: Callable[[], bytes | None]) -> bytes | None:
        try:
            data = read()
            return data if data is None else _within(url, data, lim(url), kind)
        except TooLarge:
            if too_large_as_none:
                return None
            raise

    def one(url: str) -> bytes | None:
        return within(url, lambda: _bytes_or_none(url, lim(url), kind))

    out: dict[str, bytes | None] = {}
    remote: dict[str, list[str]] = {}
    for url in urls:
        if is_remote(url):
            remote.setdefault(url.partition("://")[0], []).append(url)
            continue
        try:
            with open(filesystem(url)[1], "rb") as f:
                out[url] = within(url, lambda: f.read(-1 if lim(url) is None else lim(url) + 1))  # noqa: B023
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            out[url] = None
    s3 = [url for proto in ("s3", "s3a") for url in remote.pop(proto, [])]
    if s3:  # each one ranged GET of its whole object (read_bytes: a short body is told, read again)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(batch, len(s3))) as pool:
            out.update(zip(s3, pool.map(one, s3)))
    for group in remote.values():
        fs, _ = filesystem(group[0])
        paths = [filesystem(u)[1] for u in group]
        try:
            # max_concurrency=1: one GET per object (s3fs otherwise asks each object's size first)
            ends = None if limit is None else [None if lim(u) is None else lim(u) + 1 for u in group]
            results = fs.cat_ranges(paths, [0] * len(paths) if ends else None, ends, batch_size=batch,
                                    on_error="return", max_concurrency=1)
        except Exception as e:  # noqa: BLE001 - botocore's errors are not OSErrors
            raise storage_error(group[0], "read", e) from e
        for url, result in zip(group, results):
            if isinstance(result, FileNotFoundError):
                out[url] = None
            elif isinstance(result, BaseException):  # read again on its own, within the retry budget
                out[url] = one(url)  # (removed meanwhile: absent)
            else:
                out[url] = within(url, lambda: bytes(result))  # noqa: B023
    return out


def _bytes_or_none(url: str, limit: int | None = None, kind: str = "such a file") -> bytes | None:
    """read_bytes, or None where there is no such object."""
    try:
        return read_bytes(url, limit, kind)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def read_json_many(urls: list[str], batch: int = READ_BATCH, limit: int | dict[str, int] | None = None,
                   kind: str = "such a file", too_large_as_none: bool = False) -> dict[str, object]:
    """url -> its JSON document, or None (absent, or not parsing), as `read_json` for each; read
    concurrently (`read_many`, with its `limit`: TooLarge is raised, never taken for a torn file,
    unless `too_large_as_none`)."""
    out: dict[str, object] = {}
    for url, data in read_many(urls, batch, limit, kind, too_large_as_none).items():
        try:
            out[url] = None if data is None else json.loads(data)
        except ValueError:
            out[url] = None
    return out


def read_json(url: str, limit: int | None = None, kind: str = "such a file"):
    """The JSON document at `url`, or None when there is none there or it does not parse (a file
    being replaced, a torn local write). Storage that does not answer is an error (StorageError),
    not an absent file; nor is a file over `limit` (TooLarge, see `read_bytes`)."""
    try:
        return json.loads(read_bytes(url, limit, kind))
    except (StorageError, TooLarge):
        raise
    except (OSError, ValueError):
        return None


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


@_names_remote_errors("read")
def _read_range(url: str, offset: int, length: int) -> bytes:
    protocol, _, rest = url.partition("://")
    if protocol in ("s3", "s3a"):
        bucket, _, key = rest.partition("/")
        return s3read.get_range(bucket, key, offset, length)  # exact; a third of botocore's CPU
    fs, path = filesystem(url)
    data = fs.cat_file(path, start=offset, end=offset + length)
    if len(data) != length and offset + length <= fs.size(path):
        raise StorageError(f"cannot read {url}: {len(data)} of {length} bytes at {offset} came back")
    return data


def read_range(url: str, offset: int, length: int) -> bytes:
    """`length` bytes of the file at `url` from `offset`: exactly those, or fewer only where the
    file itself ends (never because a transfer was cut short: that is retried, then a
    StorageError). One ranged request."""
    return _read_range(url, offset, length)


class RangeReader:
    """Reads byte ranges of raw tars by offset, keeping local files open (reopened when the name
    now holds another file: encode workers live across shard runs); no whole-file download.

    Shared by reader threads, each of which keeps its own open files: a descriptor one thread
    closed to make room could otherwise be reused for another tar while a second thread reads it.
    The files of threads that have ended are closed when a new thread starts reading: a process
    that runs shard after shard, each with reader threads of its own, holds the files of its live
    threads only (it used to keep every ended thread's, until the process ran out of descriptors).
    """

    def __init__(self, max_open: int = 16):
        self._max_open = max_open  # per thread
        self._local = threading.local()
        self._lock = threading.Lock()
        # (reading thread, url -> (fd, (dev, inode))) per thread that has read
        self._tables: list[tuple[threading.Thread, dict[str, tuple[int, tuple[int, int]]]]] = []

    def _files(self) -> dict[str, tuple[int, tuple[int, int]]]:
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = {}
            with self._lock:
                for thread, ended in [t for t in self._tables if not t[0].is_alive()]:
                    for fd, _ in ended.values():
                        os.close(fd)
                    self._tables.remove((thread, ended))
                self._tables.append((threading.current_thread(), files))
        return files

    def read(self, url: str, offset: int, length: int) -> bytes:
        if is_remote(url):
            return _read_range(url, offset, length)
        files = self._files()
        now = os.stat(url)  # a file replaced under the same name since it was opened is opened again
        fd, ino = files.get(url, (None, None))
        if fd is not None and ino != (now.st_dev, now.st_ino):
            os.close(files.pop(url)[0])
            fd = None
        if fd is None:
            if len(files) >= self._max_open:
                os.close(files.pop(next(iter(files)))[0])
            fd = os.open(url, os.O_RDONLY)
            st = os.fstat(fd)
            files[url] = (fd, (st.st_dev, st.st_ino))
        data = os.pread(fd, length, offset)
        while len(data) < length:
            more = os.pread(fd, length - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data

    def close(self) -> None:
        """Close every thread's files (once the threads are done reading)."""
        with self._lock:
            for _thread, files in self._tables:
                for fd, _ in files.values():
                    os.close(fd)
                files.clear()

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def remove(url: str) -> None:
    fs, path = filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)


def makedirs(url: str) -> None:
    if not is_remote(url):
        os.makedirs(url, exist_ok=True)


SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def redact(text: str) -> str:
    """Remove credential values from a message before it is logged or stored."""
    for var in SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text
