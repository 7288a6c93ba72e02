"""A small HTTP/1.1 proxy that adds a fixed latency to every request and counts what passes.

Put it in front of moto's S3 server (tests/s3server.py) to see an S3 client the way real object
storage sees it: each request waits `latency_ms` before it is forwarded (the round trip of S3 at
20 to 50 ms), and the proxy counts requests, client TCP connections, response body bytes and the
most requests in flight at once. Client connections are kept alive exactly as long as the client
keeps them (each one is carried over its own upstream connection), so `requests / connections`
is the client's connection reuse.

    with MotoS3() as s3, LatencyProxy(s3.endpoint, latency_ms=20) as proxy:
        env = {**s3.env(), "AWS_ENDPOINT_URL": proxy.endpoint}
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Counts:
    requests: int = 0
    connections: int = 0
    bytes_out: int = 0  # response bodies sent to the client
    max_in_flight: int = 0
    by_method: dict = field(default_factory=dict)

    def minus(self, before: Counts) -> Counts:
        return Counts(
            self.requests - before.requests, self.connections - before.connections,
            self.bytes_out - before.bytes_out, self.max_in_flight,
            {k: v - before.by_method.get(k, 0) for k, v in self.by_method.items() if v - before.by_method.get(k, 0)},
        )

    @property
    def per_connection(self) -> float:
        return self.requests / self.connections if self.connections else float(self.requests)


class LatencyProxy:
    def __init__(self, upstream: str, latency_ms: float = 20.0, host: str = "127.0.0.1"):
        u = urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.latency = latency_ms / 1000.0
        self.host = host
        self._counts = Counts()
        self._in_flight = 0
        # [method, target, response body bytes] of every request, in arrival order
        self.log: list[list] = []
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
        return f"http://{self.host}:{self.port}"

    def counts(self) -> Counts:
        with self._lock:
            c = self._counts
            return Counts(c.requests, c.connections, c.bytes_out, c.max_in_flight, dict(c.by_method))

    def reset_peak(self) -> None:
        """Start measuring the most requests in flight afresh."""
        with self._lock:
            self._counts.max_in_flight = self._in_flight

    # ------------------------------------------------------------------ serving

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._client, self.host, 0, limit=1 << 20, backlog=4096))
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
                    self._counts.max_in_flight = max(self._counts.max_in_flight, self._in_flight)
                rbody = b""
                try:
                    await asyncio.sleep(self.latency)
                    if up_writer is None:
                        up_reader, up_writer = await asyncio.open_connection(*self.upstream, limit=1 << 20)
                    up_writer.write(_render_head(line, headers, drop=("expect",)) + body)
                    await up_writer.drain()
                    resp = await _read_head(up_reader)
                    if resp is None:
                        return
                    rline, rheaders = resp
                    status = int(rline.split(b" ", 2)[1])
                    no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
                    rbody = b"" if no_body else await _read_body(up_reader, rheaders, request=False)
                    framed = no_body or "content-length" in rheaders or "chunked" in rheaders.get(
                        "transfer-encoding", "").lower()
                    if not framed:  # read to the upstream's close: give the client a length instead
                        rheaders["\0order"].append(("Content-Length", str(len(rbody))))
                    writer.write(_render_head(rline, rheaders, drop=("connection",)) + rbody)
                    await writer.drain()
                finally:
                    with self._lock:
                        self._in_flight -= 1
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
