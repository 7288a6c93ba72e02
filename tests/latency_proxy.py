"""A small HTTP/1.1 proxy that adds a fixed latency to every request and counts what passes.

Put it in front of moto's S3 server (tests/s3server.py) to see an S3 client the way real object
storage sees it: each request waits `latency_ms` before it is forwarded (the round trip of S3 at
20 to 50 ms), and the proxy counts requests, client TCP connections, response body bytes and the
most requests in flight at once. Client connections are kept alive exactly as long as the client
keeps them (each one is carried over its own upstream connection), so `requests / connections`
is the client's connection reuse.

    with MotoS3() as s3, LatencyProxy(s3.endpoint, latency_ms=20) as proxy:
        env = {**s3.env(), "AWS_ENDPOINT_URL": proxy.endpoint}

moto answers a couple of hundred requests a second on a small machine, while S3 answers
thousands a second to one client: a client's own request rate cannot be seen through moto. With
`hold_objects=True` the proxy answers a ranged GET of an object it has already seen from its own
copy of it (the first ranged GET of each object fetches the whole object from upstream, once);
every other request, and every GET without a Range, goes upstream as before, and a PUT, POST or
DELETE of a path drops its copy. Latency and counts are the same either way. With `ssl_context`
(tests/s3server.private_ca) it serves HTTPS to its clients; the upstream stays plain HTTP. With
`page_size` a listing (ListObjectsV2) is passed on asking for pages of that many entries, so that
a few objects list over several pages, as thousands do on S3.

Faults, as object storage and the middleboxes before it cause them (`Fault`; each counted in
`injected`): `cut` sends part of an answer's body and closes the connection, either still
promising the whole body or with its Content-Length rewritten to the part (a well-formed answer
that is short); `reset` sends part of the body and resets the connection (RST); `slowdown`
answers every request for some seconds with S3's 503 SlowDown; `lose` forwards a request, reads
the whole answer and resets the connection (RST) before a byte of it reaches the client: the
request took effect, its reply was lost (a PUT, POST or DELETE as well as a GET: the client sees a
reset connection and retries a request that was carried out); `answer` answers a status with an
error code of the caller's choosing. `SilentEndpoint` accepts connections and never answers.

Regions (`place`): a bucket placed in a region is answered as S3 answers a bucket in that region: a
request signed for another region (the SigV4 credential scope, `Credential=<key>/<date>/<region>/s3/
aws4_request`, in the Authorization header or a presigned URL's query) gets 301 PermanentRedirect
with the bucket's region in `x-amz-bucket-region` (`tell_region=False`: without it, as an endpoint
with no regions answers) and is not passed on; one signed for the bucket's region is passed on, and a
passed-on answer names the region in `x-amz-bucket-region` (as S3's HeadBucket does). `redirected`
counts the 301s, by method.

Completed uploads (`forget_completed`): AWS S3 (and moto) answer a CompleteMultipartUpload retried
after it succeeded with the object it made; other stores (MinIO, Ceph) have forgotten the upload and
answer 404 NoSuchUpload, which the proxy then answers in their place.

Upload times (`date_uploads`): moto lists every unfinished multipart upload as initiated on
2010-11-10; S3 lists the time it began it. With `date_uploads` a listing of uploads
(ListMultipartUploads) names, for each upload whose create passed through the proxy, the time its
answer came from upstream (answered or lost), as S3 would.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit


@dataclass
class Counts:
    requests: int = 0
    connections: int = 0
    bytes_out: int = 0  # response bodies sent to the client
    max_in_flight: int = 0
    by_method: dict = field(default_factory=dict)
    # the seconds every request spent in the proxy, summed (latency included): over an interval,
    # its growth / the interval's seconds is the mean number of requests in flight (Little's law)
    request_seconds: float = 0.0

    def minus(self, before: Counts) -> Counts:
        return Counts(
            self.requests - before.requests, self.connections - before.connections,
            self.bytes_out - before.bytes_out, self.max_in_flight,
            {k: v - before.by_method.get(k, 0) for k, v in self.by_method.items() if v - before.by_method.get(k, 0)},
            self.request_seconds - before.request_seconds,
        )

    @property
    def per_connection(self) -> float:
        return self.requests / self.connections if self.connections else float(self.requests)


def ranged_get(method: str, target: str, headers: dict) -> bool:
    """A ranged GET of an object (what a shard run's source reads and the index's reads are)."""
    return method == "GET" and "range" in headers and "?" not in target


def object_get(method: str, target: str, headers: dict) -> bool:
    """A GET of an object, ranged or whole (not a listing)."""
    return method == "GET" and "?" not in target and target.count("/") >= 2


def any_request(method: str, target: str, headers: dict) -> bool:
    return True


_SCOPE = re.compile(r"Credential=[^/,&\s]+/\d{8}/([^/,&\s]+)/s3/aws4_request")


def signed_region(target: str, headers: dict) -> str | None:
    """The region a SigV4 request was signed for (its credential scope), or None (unsigned)."""
    found = _SCOPE.search(headers.get("authorization", "")) or _SCOPE.search(unquote(target.partition("?")[2]))
    return found.group(1) if found else None


def bucket_of(target: str) -> str:
    """The bucket of a path-style request target ("/bucket/key?query")."""
    return unquote(target.partition("?")[0]).lstrip("/").partition("/")[0]


def permanent_redirect(bucket: str, region: str) -> bytes:
    """S3's error document for a request sent to another region than the bucket's."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>PermanentRedirect</Code><Message>The bucket '
            f"you are attempting to access must be addressed using the specified endpoint. Please send all future "
            f"requests to this endpoint.</Message><Endpoint>{bucket}.s3.{region}.amazonaws.com</Endpoint>"
            f"<Bucket>{bucket}</Bucket><RequestId>0000000000000000</RequestId><HostId>test</HostId></Error>").encode()


@dataclass
class Fault:
    """What the proxy does to the answers of requests `match` selects: `kind` is "cut" (part of
    the body, then the connection closed; `rewrite_length`: the Content-Length says the part),
    "reset" (part of the body, then RST), "lost" (the request passed on and answered upstream,
    then RST before any of the answer: bodiless answers too), "slowdown" (503 SlowDown, nothing
    passed on) or "status" (`status` with an error document naming `code`, nothing passed on). Applied
    to every `every`-th matching request, `times` times (None: no limit), until `until`
    (time.monotonic(); None: no limit)."""

    kind: str
    match: object = ranged_get
    every: int = 1
    times: int | None = None
    until: float | None = None
    keep: float = 0.5  # the share of the body sent before a cut or reset
    rewrite_length: bool = False
    seen: int = 0
    after: int = 0  # a slowdown's seconds start counting at the after-th matching request
    seconds: float = 0.0
    trigger: object = None  # which requests `after` counts (default: `match`)
    checksum: bool = True  # False: the answer's x-amz-checksum-* headers dropped (a store that keeps none)
    status: int = 503  # "status": the answer's status, with an S3 error document naming `code`
    code: str = "SlowDown"

    def applies(self, method: str, target: str, headers: dict) -> bool:
        if self.after and self.until is None:
            if not (self.trigger or self.match)(method, target, headers):
                return False
            self.seen += 1
            if self.seen < self.after:
                return False
            self.until, self.seen = time.monotonic() + self.seconds, 0
        if self.until is not None and time.monotonic() >= self.until:
            return False
        if self.times is not None and self.times <= 0 or not self.match(method, target, headers):
            return False
        self.seen += 1
        if self.seen % self.every:
            return False
        if self.times is not None:
            self.times -= 1
        return True


class LatencyProxy:
    def __init__(self, upstream: str, latency_ms: float = 20.0, host: str = "127.0.0.1",
                 hold_objects: bool = False, ssl_context=None):
        u = urlsplit(upstream)
        self.ssl_context = ssl_context  # serve HTTPS to clients (the upstream stays plain HTTP)
        self.hold_objects = hold_objects
        self.held: dict[str, tuple[dict, bytes]] = {}  # path -> (upstream response headers, whole body)
        self.held_answers = 0  # ranged GETs answered from a held copy
        self._failures: list[tuple[int, dict]] = []  # answers to the next requests (`fail`)
        self.faults: list[Fault] = []  # see `cut`, `reset`, `slowdown`
        self.injected: Counter = Counter()  # fault kind -> answers it changed
        self.fault_log: list[tuple[str, str, str, str | None]] = []  # (kind, method, target, Range)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.latency = latency_ms / 1000.0
        self.host = host
        self._counts = Counts()
        self._in_flight = 0
        # [method, target, response body bytes] of every request, in arrival order
        self.log: list[list] = []
        self.regions: dict[str, tuple[str, bool]] = {}  # bucket -> (its region, whether a 301 tells it): `place`
        self.redirected: Counter = Counter()  # method -> 301s answered for a bucket's region
        self.forget_completed = False  # answer a retried CompleteMultipartUpload 404 NoSuchUpload
        # listings (ListObjectsV2) passed on asking for pages of at most this many entries (None: the
        # client's own, 1,000 for s3fs): a listing of a few objects spans several pages, as one of
        # thousands does on S3, without making thousands
        self.page_size: int | None = None
        self.completed: set[str] = set()  # upload ids completed upstream
        self.date_uploads = False  # list unfinished uploads with the time they began (moto: 2010-11-10)
        self.initiated: dict[str, str] = {}  # upload id -> when its create was answered upstream (ISO, UTC)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="latency-proxy", daemon=True)
        self.port = 0

    # ------------------------------------------------------------------ life cycle

    def start(self) -> LatencyProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("latency proxy did not start")
        return self

    def stop(self) -> None:
        self._loop.set_exception_handler(lambda _loop, _context: None)  # connections cut at exit
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    def counts(self) -> Counts:
        with self._lock:
            c = self._counts
            return Counts(c.requests, c.connections, c.bytes_out, c.max_in_flight, dict(c.by_method),
                          c.request_seconds)

    def fail(self, status: int, times: int = 1, headers: dict[str, str] | None = None) -> None:
        """Answer the next `times` requests with `status`, `headers` and an S3 error document,
        without passing them on (503 is S3's SlowDown, 500 its InternalError, 403 AccessDenied, 301
        with `x-amz-bucket-region` a bucket in another region)."""
        with self._lock:
            self._failures += [(status, headers or {})] * times

    def place(self, bucket: str, region: str, tell_region: bool = True) -> None:
        """Answer requests for `bucket` as S3 answers those of a bucket in `region` (see the module's
        text): 301 PermanentRedirect, naming the region unless not `tell_region`, to a request
        signed for another region; the ones signed for `region` passed on."""
        with self._lock:
            self.regions[bucket] = (region, tell_region)

    def _forgotten(self, method: str, target: str) -> tuple[int, dict, bytes] | None:
        """The 404 NoSuchUpload a store that forgets completed uploads answers to completing one again."""
        upload = _completion(method, target)
        with self._lock:
            if not (self.forget_completed and upload in self.completed):
                return None
        return 404, {}, (f"<Error><Code>NoSuchUpload</Code><Message>The specified upload does not exist."
                         f"</Message><UploadId>{upload}</UploadId></Error>").encode()

    def _dated(self, method: str, target: str, body: bytes) -> bytes:
        """Notes when an upload's create was answered upstream; a listing of uploads with those times
        in place of moto's (`date_uploads`; the same length: the Content-Length stands)."""
        query = target.partition("?")[2].split("&")
        if method == "POST" and "uploads" in query:
            found = re.search(rb"<UploadId>([^<]+)</UploadId>", body)
            t = time.time()
            now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
            if found:
                with self._lock:
                    self.initiated[found.group(1).decode()] = now
            return body
        if not (method == "GET" and "uploads" in query and self.date_uploads):
            return body

        def dated(m: re.Match) -> bytes:
            when = self.initiated.get(m.group(2).decode())
            return m.group(0) if when is None else m.group(1) + re.sub(
                rb"<Initiated>[^<]+</Initiated>", f"<Initiated>{when}</Initiated>".encode(), m.group(3))

        with self._lock:
            return re.sub(rb"(<Upload>.*?<UploadId>([^<]+)</UploadId>)(.*?</Upload>)", dated, body, flags=re.S)

    def _paged(self, line: bytes) -> bytes:
        """The request line of a ListObjectsV2 as passed on: asking for pages of `page_size` entries
        (moto checks no signature; S3 may answer fewer than asked for in any case)."""
        method, target, version = line.split(b" ", 2)
        if self.page_size is None or method != b"GET" or b"list-type=2" not in target:
            return line
        path, _, query = target.partition(b"?")
        query = b"&".join(q for q in query.split(b"&") if not q.startswith(b"max-keys="))
        return b" ".join([method, b"%s?%s&max-keys=%d" % (path, query, self.page_size), version])

    def _elsewhere(self, target: str, headers: dict) -> tuple[int, dict, bytes] | None:
        """The 301 a placed bucket's request signed for another region gets, or None (passed on)."""
        bucket = bucket_of(target)
        with self._lock:
            placed = self.regions.get(bucket)
        if placed is None or signed_region(target, headers) in (None, placed[0]):
            return None
        region, tell = placed
        return 301, ({"x-amz-bucket-region": region} if tell else {}), permanent_redirect(bucket, region)

    def cut(self, times: int | None = None, every: int = 1, rewrite_length: bool = True, match=ranged_get,
            keep: float = 0.5, checksum: bool = True) -> Fault:
        """Cut the answers of matching requests: `keep` of the body is sent, then the connection is
        closed. With `rewrite_length` the Content-Length says only that part (a well-formed, short
        answer, as a middlebox that rewrote the length gives); otherwise it still promises all.
        Without `checksum` the answer names no checksum of the object (x-amz-checksum-*: MinIO,
        Ceph, an object written without one), so the client cannot tell the part by it."""
        return self._add(Fault("cut", match, every, times, keep=keep, rewrite_length=rewrite_length,
                               checksum=checksum))

    def reset(self, times: int | None = None, every: int = 1, match=ranged_get, keep: float = 0.5) -> Fault:
        """Reset the connection (RST) midway through the body of matching answers."""
        return self._add(Fault("reset", match, every, times, keep=keep))

    def lose(self, match=any_request, times: int | None = 1, every: int = 1) -> Fault:
        """Lose the answers of matching requests: each is passed on and carried out upstream, its
        whole answer read, then the client's connection is reset (RST) without a byte of it."""
        return self._add(Fault("lost", match, every, times))

    def answer(self, status: int, code: str, match=any_request, times: int | None = 1) -> Fault:
        """Answer matching requests with `status` and an S3 error document naming `code`, without
        passing them on (a store's own codes: MinIO's 503 XMinioServerNotInitialized while it starts)."""
        return self._add(Fault("status", match, times=times, status=status, code=code))

    def slowdown(self, seconds: float, match=any_request, after: int = 0, when=None) -> Fault:
        """Answer every matching request with 503 SlowDown for the next `seconds`, or, with
        `after`, for `seconds` from the after-th request `when` selects (default: `match`) on."""
        if after:
            return self._add(Fault("slowdown", match, after=after, seconds=seconds, trigger=when))
        return self._add(Fault("slowdown", match, until=time.monotonic() + seconds))

    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """No more faults: the injected ones end and the answers `fail` queued are dropped."""
        with self._lock:
            self.faults.clear()
            self._failures.clear()

    def _fault_for(self, method: str, target: str, headers: dict) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.applies(method, target, headers):
                    self.injected[fault.kind] += 1
                    self.fault_log.append((fault.kind, method, target, headers.get("range")))
                    return fault
        return None

    def reset_peak(self) -> None:
        """Start measuring the most requests in flight afresh."""
        with self._lock:
            self._counts.max_in_flight = self._in_flight

    # ------------------------------------------------------------------ serving

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._client, self.host, 0, limit=1 << 20, backlog=4096, ssl=self.ssl_context))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._counts.connections += 1
        up_reader = up_writer = None
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                line, headers = head
                method = line.split(b" ", 1)[0].decode()
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                body = await _read_body(reader, headers, request=True)
                with self._lock:
                    self._counts.requests += 1
                    self._counts.by_method[method] = self._counts.by_method.get(method, 0) + 1
                    entry = [method, line.split(b" ")[1].decode("latin-1"), 0]
                    self.log.append(entry)
                    self._in_flight += 1
                    arrived = time.monotonic()
                    self._counts.max_in_flight = max(self._counts.max_in_flight, self._in_flight)
                rbody = b""
                try:
                    await asyncio.sleep(self.latency)
                    path = entry[1].partition("?")[0]
                    if self.hold_objects and method not in ("GET", "HEAD"):
                        self.held.pop(path, None)
                    elsewhere = self._elsewhere(entry[1], headers)
                    forgotten = self._forgotten(method, entry[1])
                    with self._lock:
                        failure = self._failures.pop(0) if self._failures else None
                        if elsewhere is not None and failure is None:
                            failure = elsewhere
                            self.redirected[method] += 1
                        failure = failure or forgotten
                    fault = None if failure is not None else self._fault_for(method, entry[1], headers)
                    if fault is not None and fault.kind == "slowdown":
                        failure, fault = (503, {}), None
                    elif fault is not None and fault.kind == "status":
                        failure = (fault.status, {}, (f"<Error><Code>{fault.code}</Code><Message>Injected"
                                                      "</Message></Error>").encode())
                        fault = None
                    held = None
                    if (failure is None and self.hold_objects and method == "GET" and "range" in headers
                            and "?" not in entry[1]):
                        held = self.held.get(path)
                        if held is None:
                            if up_writer is None:
                                up_reader, up_writer = await asyncio.open_connection(*self.upstream, limit=1 << 20)
                            held = await self._fetch_whole(line, headers, up_reader, up_writer)
                            up_writer.close()  # werkzeug closes after each answer
                            up_reader = up_writer = None
                    if failure is not None:
                        status, extra, *document = failure
                        rbody = (document[0] if document else
                                 b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                                 if status == 503 else f"<Error><Code>Injected{status}</Code></Error>".encode())
                        head = "".join(f"{n}: {v}\r\n" for n, v in extra.items())
                        length = len(rbody)
                        if method == "HEAD":  # an answer to a HEAD has no body, whatever its length says
                            rbody = b""
                        writer.write(f"HTTP/1.1 {status} Injected\r\n{head}Content-Length: {length}\r\n\r\n"
                                     .encode() + rbody)
                        await writer.drain()
                        rheaders, framed = {}, True
                    elif held is not None:
                        rhead, rbody = _ranged_answer(held, headers["range"])
                        self.held_answers += 1
                        if fault is not None:
                            await _faulty(writer, rhead, rbody, fault)
                            return
                        writer.write(rhead + rbody)
                        await writer.drain()
                        rheaders, framed = {}, True
                    else:
                        if up_writer is None:
                            up_reader, up_writer = await asyncio.open_connection(*self.upstream, limit=1 << 20)
                        up_writer.write(_render_head(self._paged(line), headers, drop=("expect",)) + body)
                        await up_writer.drain()
                        resp = await _read_head(up_reader)
                        if resp is None:
                            return
                        rline, rheaders = resp
                        status = int(rline.split(b" ", 2)[1])
                        if status == 200 and _completion(method, entry[1]):
                            with self._lock:
                                self.completed.add(_completion(method, entry[1]))
                        no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
                        rbody = b"" if no_body else await _read_body(up_reader, rheaders, request=False)
                        if status == 200:
                            rbody = self._dated(method, entry[1], rbody)
                        framed = no_body or "content-length" in rheaders or "chunked" in rheaders.get(
                            "transfer-encoding", "").lower()
                        if not framed:  # read to the upstream's close: give the client a length instead
                            rheaders["\0order"].append(("Content-Length", str(len(rbody))))
                        with self._lock:
                            placed = self.regions.get(bucket_of(entry[1]))
                        if placed is not None:  # S3 names the bucket's region (moto: the one it was made in)
                            rheaders["\0order"] = [(n, v) for n, v in rheaders["\0order"]
                                                   if n.lower() != "x-amz-bucket-region"]
                            rheaders["\0order"].append(("x-amz-bucket-region", placed[0]))
                        if fault is not None and fault.kind == "lost":
                            _abort(writer)
                            return
                        if fault is not None and rbody and not no_body:
                            await _faulty(writer, _render_head(rline, rheaders, drop=("connection",)), rbody, fault)
                            return
                        writer.write(_render_head(rline, rheaders, drop=("connection",)) + rbody)
                        await writer.drain()
                finally:
                    with self._lock:
                        self._in_flight -= 1
                        self._counts.request_seconds += time.monotonic() - arrived
                        self._counts.bytes_out += len(rbody)
                        entry[2] = len(rbody)
                # The upstream (werkzeug, under moto) closes every connection; the client's side
                # stays open as long as the client keeps it, as real S3 does.
                if "close" in headers.get("connection", "").lower():
                    return
                if "close" in rheaders.get("connection", "").lower() or not framed:
                    up_writer.close()
                    up_reader = up_writer = None
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            return
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()


    async def _fetch_whole(self, line: bytes, headers: dict, up_reader, up_writer) -> tuple[dict, bytes] | None:
        """The whole object the ranged GET `line` asks part of, from upstream (held from now on);
        None when upstream does not answer 200 (the request is then forwarded as it is)."""
        order = [(n, v) for n, v in headers["\0order"] if n.lower() not in ("range", "expect")]
        up_writer.write(_render_head(line, {"\0order": order}))
        await up_writer.drain()
        resp = await _read_head(up_reader)
        if resp is None:
            return None
        rline, rheaders = resp
        body = await _read_body(up_reader, rheaders, request=False)
        if int(rline.split(b" ", 2)[1]) != 200 or "chunked" in rheaders.get("transfer-encoding", "").lower():
            return None
        held = self.held[line.split(b" ")[1].decode("latin-1")] = (rheaders, body)
        return held


async def _faulty(writer: asyncio.StreamWriter, head: bytes, body: bytes, fault: Fault) -> None:
    """Send `head` and part of `body` as `fault` says, then close (cut) or reset the connection."""
    if fault.kind == "lost":
        _abort(writer)
        return
    part = body[: int(len(body) * fault.keep)]
    if fault.kind == "cut" and (fault.rewrite_length or not fault.checksum):
        dropped = (b"content-length:",) if fault.rewrite_length else ()
        dropped += () if fault.checksum else (b"x-amz-checksum-",)
        lines = [ln for ln in head[:-4].split(b"\r\n") if not ln.lower().startswith(dropped)]
        length = [b"Content-Length: %d" % len(part)] if fault.rewrite_length else []
        head = b"\r\n".join([*lines, *length]) + b"\r\n\r\n"
    writer.write(head + part)
    await writer.drain()
    if fault.kind == "reset":
        _abort(writer)
    else:
        writer.close()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Reset the client's connection (RST: SO_LINGER 0, then abort), sending nothing more."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _completion(method: str, target: str) -> str | None:
    """The upload id a CompleteMultipartUpload request (POST /bucket/key?uploadId=...) completes."""
    if method != "POST":
        return None
    found = re.search(r"(?:^|&)uploadId=([^&]+)", target.partition("?")[2])
    return unquote(found.group(1)) if found else None


def _ranged_answer(held: tuple[dict, bytes], range_header: str) -> tuple[bytes, bytes]:
    """(head, body) of S3's answer to `Range: bytes=a-b` (or `a-`) from a held whole object."""
    rheaders, whole = held
    first, _, last = range_header.partition("=")[2].partition("-")
    start = int(first)
    end = min(int(last) if last else len(whole) - 1, len(whole) - 1)
    if start >= len(whole):
        body = b"<Error><Code>InvalidRange</Code></Error>"
        return (f"HTTP/1.1 416 Requested Range Not Satisfiable\r\nContent-Range: bytes */{len(whole)}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode(), body
    lines = ["HTTP/1.1 206 Partial Content", f"Content-Range: bytes {start}-{end}/{len(whole)}",
             f"Content-Length: {end - start + 1}", "Accept-Ranges: bytes"]
    for name in ("ETag", "Last-Modified", "Content-Type"):
        if name.lower() in rheaders:
            lines.append(f"{name}: {rheaders[name.lower()]}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), whole[start:end + 1]


async def _read_head(reader: asyncio.StreamReader):
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = raw[:-4].split(b"\r\n")
    headers: dict[str, str] = {}
    order = []
    for h in lines[1:]:
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
        order.append((name.strip(), value.strip()))
    headers["\0order"] = order  # type: ignore[assignment]
    return lines[0], headers


def _render_head(line: bytes, headers: dict, drop: tuple[str, ...] = ()) -> bytes:
    out = [line]
    for name, value in headers["\0order"]:
        if name.lower() not in drop:
            out.append(f"{name}: {value}".encode("latin-1"))
    return b"\r\n".join(out) + b"\r\n\r\n"


async def _read_body(reader: asyncio.StreamReader, headers: dict, request: bool) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            parts.append(size_line)
            n = int(size_line.split(b";")[0].strip(), 16)
            if n == 0:
                while True:  # trailers, then the empty line
                    trailer = await reader.readuntil(b"\r\n")
                    parts.append(trailer)
                    if trailer == b"\r\n":
                        return b"".join(parts)
            parts.append(await reader.readexactly(n + 2))
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if request:
        return b""
    return await reader.read()  # until the server closes


def timed(fn, *args, **kwargs):
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


class SilentEndpoint:
    """An endpoint that accepts connections and never answers (a hung server, a black-holing
    middlebox): requests to it wait until the client gives up. `accepted` counts connections."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.create_server((host, 0), backlog=256)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-endpoint", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)  # kept open, never read from or written to

    def __enter__(self) -> SilentEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._held:
            conn.close()
        self.sock.close()
