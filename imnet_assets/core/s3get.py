"""Ranged GETs of S3 objects at the cost of one signed HTTP request each.

A shard run reads each of its ~12,800 sources with one ranged GET (`fs.RangeReader`). Through
s3fs every such GET goes through botocore's request machinery: about 2 ms of the reading
process's CPU per request (serializing, event hooks, response parsing), which caps a process at a
few hundred reads/s however many are in flight, and costs a 64-core machine ~4 cores at the 2,000
reads/s its encoders need. Here a GET is an HTTP/1.1 request signed with AWS Signature Version 4
(one HMAC per request; the day's signing key is derived once), sent over a connection the reading
process keeps alive (shared by its threads): ~0.3 ms of CPU.

Everything that decides *where* and *as whom* comes from botocore, once per bucket and process:
the credentials (the standard chain: AWS variables, shared files, the machine's or pod's role;
refreshed when they expire), the endpoint (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, the region),
the addressing style and the signing region (read off a URL botocore presigns for the bucket). So
this reads exactly what s3fs would read, as s3fs would.

A bucket in another region than the one configured (or with none configured) answers the first
read with its region (`x-amz-bucket-region`): it is worked out again for that region, once.
Whatever this module does not handle itself goes to s3fs, which does: no credentials, an HTTP(S)
proxy in the environment, or a bucket that answers 301/307/400/403 otherwise (a refused key, a
redirect without a region: s3fs follows it or names the refusal). Throttling (503, 429) and
server errors (500) are retried with backoff, as botocore does; a missing object is
FileNotFoundError.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlsplit

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
ATTEMPTS = 5  # per read, as botocore's legacy retry mode (1 try + 4 retries)
BACKOFF_SECONDS = 0.05  # first wait before a retry; doubles, with jitter
RETRY_STATUSES = (500, 502, 503, 504, 429)  # throttled or failing: tried again
HANDOFF_STATUSES = (301, 307, 400, 403)  # a refused key, a redirect: s3fs knows what to do
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0  # botocore's default read timeout
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class Handoff(Exception):
    """This read is for s3fs (the bucket needs what only botocore does); not an error."""


@dataclass(frozen=True)
class Target:
    """Where a bucket's objects are and how requests to them are signed."""

    secure: bool
    host: str  # the Host header: "bucket.s3.us-east-1.amazonaws.com" or "127.0.0.1:9000"
    connect: tuple[str, int]
    prefix: str  # path before the key: "" (virtual-hosted) or "/bucket" (path-style)
    region: str  # the signing region
    credentials: object  # botocore Credentials (get_frozen_credentials refreshes)


# (pid, endpoint, region, bucket) -> Target, or None when s3fs reads this bucket
_targets: dict[tuple, Target | None] = {}
_targets_lock = threading.Lock()
MAX_IDLE = 256  # idle kept-alive connections a process keeps per endpoint
# Idle connections per process (pid) and Target, shared by every thread: the index reads each large
# tar with a thread pool of its own, so connections kept per thread would be one TLS handshake per
# thread and tar; from a shared pool they are reused from tar to tar. Last in, first out (the most
# recently used is the least likely to have been closed by the server meanwhile).
_idle: tuple[int, dict[Target, list]] = (0, {})
_idle_lock = threading.Lock()
_signing_keys: dict[tuple[str, str, str], bytes] = {}


def endpoint_url() -> str | None:
    """The S3 endpoint the standard variables name (None: AWS's own for the region)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def region_name() -> str | None:
    """The region the standard variables name (None: botocore's configuration decides)."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def _key(bucket: str) -> tuple:
    return (os.getpid(), endpoint_url(), region_name(), bucket)


def target(bucket: str) -> Target | None:
    """The bucket's Target in this process, worked out with botocore on first use; None when its
    reads go to s3fs."""
    key = _key(bucket)
    try:
        return _targets[key]
    except KeyError:
        pass
    with _targets_lock:
        if key not in _targets:
            _targets[key] = _resolve(bucket)
        return _targets[key]


def _retarget(bucket: str, region: str) -> Target | None:
    """The bucket's Target in `region`, for this process from now on."""
    with _targets_lock:
        t = _targets[_key(bucket)] = _resolve(bucket, region)
        return t


def hand_off(bucket: str) -> None:
    """From now on this process reads `bucket` through s3fs."""
    with _targets_lock:
        _targets[_key(bucket)] = None


def _resolve(bucket: str, region: str | None = None) -> Target | None:
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None  # botocore's proxy handling (and NO_PROXY) is not repeated here
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    credentials = session.get_credentials()
    if credentials is None:
        return None
    client = session.create_client("s3", endpoint_url=endpoint_url(), region_name=region or region_name(),
                                   config=Config(signature_version="s3v4"))
    probe = "imnet-probe"
    u = urlsplit(client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": probe},
                                               ExpiresIn=60))
    if not u.path.endswith("/" + probe) or u.scheme not in ("http", "https"):
        return None
    scope = parse_qs(u.query).get("X-Amz-Credential", [""])[0].split("/")
    if len(scope) != 5:
        return None
    secure = u.scheme == "https"
    return Target(secure=secure, host=u.netloc, connect=(u.hostname or "", u.port or (443 if secure else 80)),
                  prefix=u.path[: -len(probe) - 1], region=scope[2], credentials=credentials)


def _signing_key(secret: str, day: str, region: str) -> bytes:
    cached = _signing_keys.get((secret, day, region))
    if cached is None:
        k = hmac.new(("AWS4" + secret).encode(), day.encode(), hashlib.sha256).digest()
        for part in (region, "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        cached = _signing_keys[(secret, day, region)] = k
    return cached


def signed_headers(t: Target, path: str, range_header: str, stamp: str, access_key: str, secret: str,
                   token: str | None) -> dict[str, str]:
    """The headers of a SigV4-signed GET of `path` (already URI-encoded) with a Range, at `stamp`
    ("20261205T101500Z")."""
    headers = {"host": t.host, "range": range_header, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": stamp}
    if token:
        headers["x-amz-security-token"] = token
    names = sorted(headers)
    canonical = "\n".join(["GET", path, "", *(f"{n}:{headers[n]}" for n in names), "", ";".join(names),
                           EMPTY_SHA256])
    day = stamp[:8]
    scope = f"{day}/{t.region}/s3/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    signature = hmac.new(_signing_key(secret, day, t.region), to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                f"SignedHeaders={';'.join(names)}, Signature={signature}")
    return headers


def _ssl_context() -> ssl.SSLContext:
    ctx = getattr(_ssl_context, "ctx", None)
    if ctx is None:
        cafile = os.environ.get("AWS_CA_BUNDLE")
        if not cafile:
            try:
                import certifi  # botocore's own default bundle

                cafile = certifi.where()
            except ImportError:
                cafile = None
        ctx = _ssl_context.ctx = ssl.create_default_context(cafile=cafile)
    return ctx


class _Connection:
    """One kept-alive HTTP/1.1 connection: a request is written whole, and its answer (status,
    headers, a Content-Length or chunked body) read off the socket with no per-response objects
    (http.client builds a file object and an email parser for each: ~0.15 ms of CPU a response)."""

    def __init__(self, t: Target):
        sock = socket.create_connection(t.connect, timeout=CONNECT_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if t.secure:
            sock = _ssl_context().wrap_socket(sock, server_hostname=t.connect[0])
        sock.settimeout(READ_TIMEOUT)
        self.sock, self.buf = sock, bytearray()

    def close(self) -> None:
        self.sock.close()

    def _more(self) -> None:
        chunk = self.sock.recv(1 << 18)
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        if len(self.buf) < n:  # a large body: received in place, not appended chunk by chunk
            out = bytearray(n)
            have = len(self.buf)
            out[:have] = self.buf
            self.buf.clear()
            view = memoryview(out)
            while have < n:
                got = self.sock.recv_into(view[have:])
                if not got:
                    raise ConnectionResetError("the server closed the connection mid-body")
                have += got
            return bytes(out)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._more()
        return self._take(end + 2)[:-2]

    def request(self, data: bytes) -> tuple[int, dict[str, str], bytes, bool]:
        """(status, headers (lower-case names), body, whether the server closes the connection
        after it)."""
        self.sock.sendall(data)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._more()
        lines = self._take(end + 4)[:-4].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        close = "close" in headers.get("connection", "").lower()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while size := int(self._line().split(b";")[0], 16):
                parts.append(self._take(size))
                self._line()
            while self._line():  # trailers, up to the empty line
                pass
            return status, headers, b"".join(parts), close
        if "content-length" in headers:
            return status, headers, self._take(int(headers["content-length"])), close
        try:  # delimited by the server closing the connection
            while True:
                self._more()
        except ConnectionResetError:
            pass
        return status, headers, self._take(len(self.buf)), True


def _checkout(t: Target) -> tuple[_Connection, bool]:
    """An idle connection to `t` (True) or a new one (False)."""
    global _idle
    with _idle_lock:
        if _idle[0] != os.getpid():  # a forked child opens its own
            _idle = (os.getpid(), {})
        idle = _idle[1].get(t)
        if idle:
            return idle.pop(), True
    return _Connection(t), False


def _checkin(t: Target, conn: _Connection) -> None:
    with _idle_lock:
        idle = _idle[1].setdefault(t, []) if _idle[0] == os.getpid() else None
        if idle is not None and len(idle) < MAX_IDLE:
            idle.append(conn)
            return
    conn.close()


def _once(t: Target, path: str, range_header: str) -> tuple[int, dict[str, str], bytes]:
    creds = t.credentials.get_frozen_credentials()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    headers = signed_headers(t, path, range_header, stamp, creds.access_key, creds.secret_key, creds.token)
    data = "".join([f"GET {path} HTTP/1.1\r\n", *(f"{n}: {v}\r\n" for n, v in headers.items()),
                    "\r\n"]).encode("latin-1")
    for fresh in (False, True):
        conn, reused = (_Connection(t), False) if fresh else _checkout(t)
        try:
            status, headers, body, close = conn.request(data)
        except OSError:
            conn.close()
            if reused and not fresh:  # the server closed a kept-alive connection: once more, anew
                continue
            raise
        except BaseException:
            conn.close()
            raise
        if close:
            conn.close()
        else:
            _checkin(t, conn)
        return status, headers, body
    raise AssertionError("unreachable")


def get_range(bucket: str, key: str, offset: int, length: int) -> bytes:
    """`length` bytes of s3://bucket/key from `offset` (fewer at its end, none past it).
    Raises Handoff when s3fs should read it instead, FileNotFoundError when there is no such
    object, and OSError naming the status when the storage keeps failing."""
    t = target(bucket)
    if t is None:
        raise Handoff(bucket)
    if length <= 0:
        return b""
    range_header = f"bytes={offset}-{offset + length - 1}"
    wait, moved = BACKOFF_SECONDS, False
    for attempt in range(ATTEMPTS):
        path = t.prefix + "/" + quote(key, safe="/~")
        try:
            status, headers, body = _once(t, path, range_header)
        except (OSError, ValueError) as e:  # ValueError: an answer that is not HTTP
            if attempt == ATTEMPTS - 1:
                raise ConnectionError(f"GET {t.host}{path}: {type(e).__name__}: {e}") from e
        else:
            if status == 206:
                return body
            if status == 200:  # a server that ignores Range sends the whole object
                return body[offset:offset + length]
            if status == 416:  # the range starts at or past the end
                return b""
            if status == 404:
                raise FileNotFoundError(f"s3://{bucket}/{key}")
            region = headers.get("x-amz-bucket-region")
            if status in HANDOFF_STATUSES and region and region != t.region and not moved:
                # the bucket is in another region (no region configured, or a wrong one): its
                # endpoint and signing region, as botocore would name them, and the read again
                t, moved = _retarget(bucket, region), True
                if t is None:
                    raise Handoff(bucket)
                continue
            if status in HANDOFF_STATUSES:
                hand_off(bucket)
                raise Handoff(bucket)
            if status not in RETRY_STATUSES or attempt == ATTEMPTS - 1:
                raise OSError(f"GET {t.host}{path} answered HTTP {status}: {body[:300]!r}")
        time.sleep(wait * (0.5 + random.random()))
        wait *= 2
    raise AssertionError("unreachable")
