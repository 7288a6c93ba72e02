"""Files that appear at their final path only once complete, and the sweeping of what killed writers left.

Local: a hidden temporary name beside the target (`.<name>.tmp-<pid>-<random>`), fsynced, renamed
into place. S3: a multipart upload committed on close (aborted on error; one a killed process left
is never visible as an object), with a lease naming its writer so another process aborts it only
once that writer is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator

from imnet_assets.runtime.host import pid_alive, pid_namespace
from imnet_assets.storage.fs import (
    filesystem,
    is_remote,
    read_json,
    remove,
    stat,
    storage_error,
)

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_open(url: str) -> Iterator:
    """Write a file that appears at `url` only once complete.

    Local: written to a hidden temporary name beside the target, fsynced, renamed into place.
    S3: written as an upload that commits on close; an error aborts it, a killed process leaves
    only an incomplete multipart upload, which is never visible as an object.
    """
    fs, path = filesystem(url)
    if is_remote(url):
        f = fs.open(path, "wb", block_size=16 << 20)
        upload = _LeasedUpload(f, url)
        try:
            yield upload
        except BaseException:
            _discard(f)
            upload.release()
            raise
        try:
            f.close()  # the commit: its single PUT, or the multipart upload's completion
        except Exception as e:
            _discard(f)  # an upload that did not complete is aborted, its lease removed
            upload.release()
            raise storage_error(url, "commit", e) from e
        upload.release()
        return
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    tmp = os.path.join(folder, f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    f = open(tmp, "wb")
    with removed_on_error(f, tmp, url):
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        _fsync_dir(folder)


# A full disk or quota: Python's write(), flush() and close() raise it naming no file
FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def removed_on_error(f, tmp: str, url: str) -> Iterator[None]:
    """Writing the temporary file `tmp` (open as `f`) of `url`: on any error it is closed and
    removed (close() flushes what is buffered: on a full disk it raises again, and must not keep
    the file from going), and a full disk's error names `url` (SPEC "Failure behaviour": a full
    disk fails its run naming what it could not write; Python's own names no file)."""
    try:
        yield
    except BaseException as e:
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in FULL and e.filename is None:
            e.filename = url  # "[Errno 28] No space left on device: '<url>'" (the same error: a cause
            # would be what the build prints, orchestrate/build.py's innermost)
        raise


UPLOADS_DIR = "_uploads"  # beside a file being uploaded: leases naming the writer of each upload (s3fs_retry's)
STALE_UPLOAD_SECONDS = 24 * 3600  # an upload this old is abandoned, whoever began it


def _lease_url(url: str, upload_id: str) -> str:
    """Where the lease of upload `upload_id` of `url` is (s3fs_retry.upload_lease_key: a retried
    create looks there before it aborts an upload it takes for its lost first try's)."""
    from imnet_assets.storage.s3fs_retry import upload_lease_key  # remote only: s3fs is loaded already

    scheme, _, path = url.partition("://")
    bucket, _, key = path.partition("/")
    return f"{scheme}://{bucket}/{upload_lease_key(key, upload_id)}"


class _LeasedUpload:
    """A remote file being written. Once its multipart upload exists (s3fs begins one when the
    first 16 MiB block is sent), a small lease object names the writer (host, pid, when), so that
    `remove_partials` of another process aborts the upload only once its writer is gone. Removed
    when the upload is committed or discarded."""

    def __init__(self, f, url: str):
        self._f, self._url = f, url
        self._lease: str | None = None

    def write(self, data) -> int:
        n = self._f.write(data)
        self._note_upload()
        return n

    def flush(self, *args, **kwargs):
        out = self._f.flush(*args, **kwargs)
        self._note_upload()
        return out

    def _note_upload(self) -> None:
        mpu = getattr(self._f, "mpu", None)
        if self._lease is None and mpu and mpu.get("UploadId"):
            self._lease = _lease_url(self._url, mpu["UploadId"])
            writer = {"host": socket.gethostname(), "pid_namespace": pid_namespace(), "pid": os.getpid(),
                      "written": time.time(), "key": self._url}
            write_atomic(self._lease, json.dumps(writer).encode())

    def release(self) -> None:
        if self._lease is not None:
            with contextlib.suppress(Exception):
                remove(self._lease)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _upload_writer_alive(lease: dict | None, initiated) -> bool:
    """Whether the writer of a multipart upload may still be writing it: its lease names a live
    process of this host and pid namespace, or another host's or namespace's (which cannot be
    asked), or there is no lease yet (the moment between beginning the upload and writing the
    lease); never once the upload is older than STALE_UPLOAD_SECONDS (by its lease's time, on this side's clock, else by the storage's
    `Initiated`). This process's own leftovers are not live (as for local temporaries)."""
    try:
        since = float(lease["written"]) if isinstance(lease, dict) else initiated.timestamp()
    except (AttributeError, KeyError, TypeError, ValueError):
        since = time.time()
    if time.time() - since > STALE_UPLOAD_SECONDS:
        return False
    if not isinstance(lease, dict):
        return True
    if lease.get("host") != socket.gethostname():
        return True
    if lease.get("pid_namespace", pid_namespace()) != pid_namespace():  # absent: leases written before
        return True  # a container on this host's network: its process numbers are not ours to ask
    pid = int(lease.get("pid", 0))
    return pid != os.getpid() and pid_alive(pid, started_by=since)


def _discard(f) -> None:
    """Abandon a remote upload: abort its multipart upload if one began, and never commit it.

    fsspec files commit on close(), and their __del__ closes files left open, so a discarded file
    must be marked closed or garbage collection would try to commit it. A failed abort leaves
    an incomplete upload (never visible; `remove_partials` clears it) and is not raised over the
    error that caused the discard.
    """
    try:
        discard = getattr(f, "discard", None)
        if discard is not None:
            with contextlib.suppress(Exception):
                discard()
    finally:
        f.closed = True


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(url: str, data: bytes) -> None:
    with atomic_open(url) as f:
        f.write(data)


def write_stamped(url: str, data: bytes) -> tuple[int, str]:
    """write_atomic, and the (size, stamp) the written file has (fs.stat's, what a listing shows)
    without another look at it on S3: one PUT (as write_atomic makes for data under its 16 MB
    block), whose reply carries the object's ETag, the stamp a HEAD or a listing would give.
    Local: the file's stat once it is in place (a syscall)."""
    if not is_remote(url):
        write_atomic(url, data)
        return stat(url)
    fs, path = filesystem(url)
    bucket, _, key = path.partition("/")
    try:
        reply = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data)
    except Exception as e:
        raise storage_error(url, "commit", e) from e
    etag = reply.get("ETag") if isinstance(reply, dict) else None
    return (len(data), str(etag)) if etag else stat(url)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def remove_partials(url: str, warn: Callable[[str], None] = _to_stderr) -> list[str]:
    """Delete leftovers of killed writers of `url` (local temporary files; S3 uploads never
    committed). A writer still at work keeps its file or upload: on S3 an upload is aborted only
    when its lease (`_LeasedUpload`) names a process of this host that is gone, or it is older than
    STALE_UPLOAD_SECONDS.

    On S3 a sweep the storage does not let happen (a policy without s3:ListBucketMultipartUploads
    or s3:AbortMultipartUpload; faults past the retry budget) is a `warn` line naming `url`, and
    the caller goes on: an unfinished upload is never visible at its final path, it only costs
    storage until a later run (or a bucket lifecycle rule) aborts it, so it must never fail runs,
    nor be passed over in silence."""
    removed: list[str] = []
    if is_remote(url):
        fs, path = filesystem(url)
        bucket, _, key = path.partition("/")
        try:
            resp = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
        except Exception as e:  # noqa: BLE001 - botocore's errors are not OSErrors
            warn(_unswept(url, "list the unfinished uploads of", e))
            return removed
        for up in resp.get("Uploads", []):
            if up["Key"] != key:
                continue
            lease = _lease_url(url, up["UploadId"])
            try:
                if _upload_writer_alive(read_json(lease), up.get("Initiated")):
                    continue
                # gone already (FileNotFoundError, NoSuchUpload): an abort carried out whose reply was lost
                with contextlib.suppress(FileNotFoundError):
                    fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=up["UploadId"])
                remove(lease)
            except Exception as e:  # noqa: BLE001 - as above
                warn(_unswept(url, f"abort the unfinished upload {up['UploadId'][:8]} of", e))
                continue
            removed.append(f"s3://{bucket}/{key} (upload {up['UploadId'][:8]})")
        return removed
    folder, name = os.path.split(os.path.abspath(url))
    if not os.path.isdir(folder):
        return removed
    pattern = re.compile(re.escape(f".{name}{TMP_MARK}") + r"(\d+)-[0-9a-f]{8}$")
    for entry in os.listdir(folder):
        m = pattern.match(entry)
        path = os.path.join(folder, entry)
        if not m:
            continue
        # another run of the same shard still writing (two runs of a partition at once) keeps its file
        if int(m.group(1)) != os.getpid() and _writer_alive(path, int(m.group(1))):
            continue
        if _unlink(path):
            removed.append(path)
    return removed


_TMP_NAME = re.compile(r"^\..+" + re.escape(TMP_MARK) + r"(\d+)-[0-9a-f]{8}$")


def sweep_partials(folder_url: str) -> list[str]:
    """Delete temporary files in a local folder whose writing process is gone (killed runs).

    On S3 there is nothing to sweep: an upload that never completed is never visible.
    """
    if is_remote(folder_url) or not os.path.isdir(folder_url):
        return []
    removed = []
    for entry in os.listdir(folder_url):
        m = _TMP_NAME.match(entry)
        path = os.path.join(folder_url, entry)
        if m and not _writer_alive(path, int(m.group(1))) and _unlink(path):
            removed.append(path)
    return removed


def _unswept(url: str, what: str, e: BaseException) -> str:
    return (f"warning: {storage_error(url, what, e)}: what killed writers left of it is not swept (never "
            "visible at its path; it costs storage until a later run, or a bucket lifecycle rule that aborts "
            "incomplete multipart uploads, clears it)")


def _writer_alive(path: str, pid: int) -> bool:
    """Whether process `pid`, named in temporary file `path`, is still there to write it. Its writer
    started before the file was last changed: a younger process has only reused the number."""
    try:
        return pid_alive(pid, started_by=os.stat(path).st_ctime)
    except FileNotFoundError:  # committed or removed meanwhile
        return False


def _unlink(path: str) -> bool:
    """Remove `path`; False when it was gone already."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
