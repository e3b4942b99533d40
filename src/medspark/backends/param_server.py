"""The parameter server of `elephas_async`/`elephas_hogwild` and its client, in place of Elephas 7.3's (whose lock
around `/update` stays taken when an update fails, whose client waits forever, and which serves and accepts
weights from anyone who reaches the driver).

HTTP/1.0 on the driver (a thread of the driver process), one request per connection:
  GET  /parameters   the weights: raw little-endian arrays back to back, in the model's order (no header)
  POST /update       a delta in the same layout, exactly `Layout.nbytes` bytes; the server subtracts it
Every request must carry `Authorization: Bearer <secret>`, a per-run secret made here on the driver (`secrets`)
that reaches the workers only inside the client object Spark ships in the task closure; it is compared in
constant time, and nothing else is read before it matches (401 without, 403 wrong). The layout is fixed by the
model's weights, known to both sides, so a body is parsed with `np.frombuffer` (never unpickled) and refused
unless its size is exact; non-finite deltas are refused too (they would destroy the model). Every refused
request is counted by reason (`stats`); the lock (`asynchronous` only; `hogwild` applies without one) is taken
only to apply an update already validated, or to copy the weights, so nothing a client sends can keep it.
Idle or slow connections are closed after `timeout_s`, and at most `max_connections` are open at once (a thread
each): one more is closed unread and counted as 503, so a flood of connections costs neither threads nor memory
beyond that bound (workers retry, `ParamClient`). Traffic is not encrypted: docs/SECURITY.md.
"""
from __future__ import annotations

import contextlib
import errno
import hmac
import http.client
import logging
import secrets
import socketserver
import threading
import time
import uuid
from collections import Counter, OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

log = logging.getLogger(__name__)
LOGGED_REFUSALS = 10  # the first refusals are logged one by one, the rest only counted (a flood stays one line)


class ParameterServerError(RuntimeError):
    """A worker (or the driver) could not get weights from, or push an update to, the parameter server."""


class Layout:
    """Shapes and dtypes of a model's weights, in order: the wire format (raw arrays back to back)."""

    def __init__(self, weights):
        self.specs = [(tuple(np.shape(w)), np.dtype(np.asarray(w).dtype).newbyteorder("<").str) for w in weights]
        self.nbytes = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in self.specs)

    def pack(self, arrays) -> bytes:
        if len(arrays) != len(self.specs):
            raise ValueError(f"{len(arrays)} arrays for a model of {len(self.specs)} weights")
        for i, (a, (shape, _)) in enumerate(zip(arrays, self.specs)):
            if np.shape(a) != shape:
                raise ValueError(f"weight {i} has shape {np.shape(a)}, the model's is {shape}")
        return b"".join(np.ascontiguousarray(a, dtype=d).tobytes() for a, (_, d) in zip(arrays, self.specs))

    def unpack(self, body: bytes) -> list[np.ndarray]:
        if len(body) != self.nbytes:
            raise ValueError(f"{len(body)} bytes, the model's weights are {self.nbytes}")
        out, offset = [], 0
        for shape, d in self.specs:
            n = int(np.prod(shape))
            out.append(np.frombuffer(body, dtype=d, count=n, offset=offset).reshape(shape))
            offset += n * np.dtype(d).itemsize
        return out


class ParamServer:
    """Serves `weights` on host:port (0 = a free port, chosen by the OS at bind: no race) with the semantics
    of `mode` (asynchronous: updates one at a time; hogwild: lock-free). Binds in the constructor, so a port in
    use fails before any training starts; serves from `start()` until `stop()` (both idempotent)."""

    def __init__(self, weights, mode: str, host: str, port: int = 0, timeout_s: float = 60.0,
                 max_connections: int = 64):
        self.layout = Layout(weights)
        self.weights = [np.array(w, dtype=d) for w, (_, d) in zip(weights, self.layout.specs)]  # own, writable
        self.timeout_s = float(timeout_s)
        self._secret = secrets.token_urlsafe(32)
        self._lock = threading.Lock() if mode == "asynchronous" else contextlib.nullcontext()
        self._book = threading.Lock()  # counters and the recent update ids
        self._counts: Counter = Counter()
        self._seen: OrderedDict = OrderedDict()  # ids of applied updates: a retried POST is not applied twice
        try:
            self.httpd = _HTTPServer((host, int(port)), _Handler)
        except OSError as e:
            from .api import BackendError  # here: executors import this module without the driver's stack

            if port and e.errno == errno.EADDRINUSE:
                raise BackendError(f"backend.port={port}: {host}:{port} is already in use by another program; "
                                   "choose another port or backend.port=null (a free one)") from None
            raise BackendError(f"the parameter server cannot listen on {host}:{port} ({e.strerror}); check "
                               "backend.bind_host and backend.port") from None
        self.httpd.ps = self
        self.httpd.slots = threading.BoundedSemaphore(max(1, int(max_connections)))
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def client(self, host: str, counter=None, retries: int = 3) -> "ParamClient":
        """The client workers use, reaching this server at `host` (the advertised address), secret included."""
        return ParamClient(host, self.port, self._secret, self.layout, counter, self.timeout_s, retries)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                            name=f"medspark-ps-{self.port}", daemon=True)
            self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.httpd.shutdown()  # waits for serve_forever to return (only safe once it runs)
            self._thread.join()
        self.httpd.server_close()

    def stats(self) -> dict:
        """updates (applied), duplicates, rejected (every refused request), unauthorized (401/403), by_status."""
        with self._book:
            c = dict(self._counts)
        codes = {k: v for k, v in c.items() if isinstance(k, int)}
        return {"updates": c.get("updates", 0), "duplicates": c.get("duplicates", 0), "rejected": sum(codes.values()),
                "unauthorized": codes.get(401, 0) + codes.get(403, 0), "by_status": codes}

    # called by the request handler
    def authorized(self, header: str | None) -> int:
        """200, or the status refusing the request: 401 without a bearer token, 403 with a wrong one."""
        scheme, _, token = (header or "").partition(" ")
        if scheme != "Bearer" or not token:
            return 401
        ok = hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), self._secret.encode())
        return 200 if ok else 403

    def snapshot(self) -> bytes:
        with self._lock:
            return b"".join(w.tobytes() for w in self.weights)

    def apply(self, delta: list[np.ndarray], update_id: str) -> bool:
        """Subtract a validated delta (Elephas' convention: before - after); False for an id already applied."""
        with self._book:
            if update_id and update_id in self._seen:
                self._counts["duplicates"] += 1
                return False
            if update_id:
                self._seen[update_id] = None
                if len(self._seen) > 4096:
                    self._seen.popitem(last=False)
        with self._lock:  # asynchronous: one update at a time; hogwild: nullcontext, racy on purpose
            for w, d in zip(self.weights, delta):
                np.subtract(w, d, out=w)
        with self._book:
            self._counts["updates"] += 1
        return True

    def refused(self, status: int, who: str, what: str) -> None:
        with self._book:
            self._counts[status] += 1
            n = sum(v for k, v in self._counts.items() if isinstance(k, int))
        if n <= LOGGED_REFUSALS:
            log.warning("parameter server %s:%d refused %s from %s: HTTP %d%s", self.host, self.port, what, who,
                        status, " (further refusals are only counted)" if n == LOGGED_REFUSALS else "")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    ps: ParamServer
    slots: threading.BoundedSemaphore  # open connections (one handler thread each), at most max_connections

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):  # full: no thread, nothing read, the socket closed
            self.ps.refused(503, client_address[0], "a connection (max_connections open)")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # a handler thread: process_request_thread
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def server_bind(self):  # HTTPServer's would look the host up in DNS (getfqdn): slow, and nothing uses it
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):  # a client gone mid-answer: no traceback on stderr
        log.debug("parameter server: connection from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server_version, sys_version = "medspark-ps", ""  # no version banner
    server: _HTTPServer

    def setup(self):
        self.timeout = self.server.ps.timeout_s  # every read, request line and body included
        super().setup()

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's name) - not on stderr
        log.debug("parameter server: %s - " + format, self.client_address[0], *args)

    def send_error(self, code, message=None, explain=None):
        """Every refusal passes here (ours, and http.server's own: bad request lines, unknown methods)."""
        what = f"{getattr(self, 'command', None) or '?'} {getattr(self, 'path', '')[:80]!r}"
        self.server.ps.refused(code, self.client_address[0], what)
        super().send_error(code, message, explain="")

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _allowed(self, path: str) -> int:
        """200, or the status refusing the request; the token is checked before anything else is read."""
        return 404 if self.path != path else self.server.ps.authorized(self.headers.get("Authorization"))

    def do_GET(self):
        status = self._allowed("/parameters")
        if status != 200:
            return self.send_error(status)
        self._answer(self.server.ps.snapshot())

    def do_POST(self):
        ps, length = self.server.ps, self.headers.get("Content-Length", "")
        n = int(length) if length.isdigit() else -1
        status = self._allowed("/update")
        if status == 200:  # never read more than an update's size
            status = 411 if not length else 413 if n > ps.layout.nbytes else 400 if n != ps.layout.nbytes else 200
        if status != 200:
            if 0 < n <= ps.layout.nbytes:
                self._discard(n)  # read what was sent, so the client gets the refusal, not a connection reset
            size = f"an update is exactly {ps.layout.nbytes} bytes"  # said to authenticated clients only
            return self.send_error(status, size if status in (400, 411, 413) else None)
        try:
            body = self.rfile.read(n)
        except TimeoutError:
            return self.send_error(408)
        try:
            delta = ps.layout.unpack(body)
        except ValueError:  # the client closed before sending the bytes it declared
            return self.send_error(400, f"an update is exactly {ps.layout.nbytes} bytes")
        if not all(np.isfinite(d).all() for d in delta if d.dtype.kind == "f"):
            return self.send_error(422, "non-finite values in the update")
        applied = ps.apply(delta, self.headers.get("X-Update-Id", "")[:64])
        # a progress line per update (Elephas reports no history in this mode; its Flask server logged each request)
        log.info("parameter server %s:%d: POST /update from %s %s", ps.host, ps.port, self.client_address[0],
                 "applied" if applied else "already applied (a retry)")
        self._answer(b"applied" if applied else b"duplicate")

    def _discard(self, n: int) -> None:
        try:
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 16))
                if not chunk:
                    return
                n -= len(chunk)
        except OSError:
            pass


class ParamClient:
    """What Elephas' AsynchronousSparkWorker calls on each executor (`get_parameters`, `update_parameters`),
    shipped inside the task closure. Timeouts on every call, a bounded retry on network errors and 5xx (an
    update carries an id, so a retried one is applied once), a one-line error naming the server otherwise.
    Counts the updates the server accepted in `counter` (a Spark accumulator). Plain http.client: no proxy
    from the environment ever sees the secret."""

    def __init__(self, host: str, port: int, secret: str, layout: Layout, counter=None, timeout_s: float = 60.0,
                 retries: int = 3):
        self.host, self.port, self.layout, self.counter = host, int(port), layout, counter
        self.timeout_s, self.retries, self._secret = float(timeout_s), int(retries), secret

    def __repr__(self):  # never the secret
        return f"ParamClient(http://{self.host}:{self.port})"

    def get_parameters(self) -> list[np.ndarray]:
        body = self._call("GET", "/parameters")
        try:
            return self.layout.unpack(body)
        except ValueError as e:
            raise ParameterServerError(f"{self!r} answered weights of another shape ({e}); is it this run's "
                                       "parameter server? (backend.advertise_host, backend.port)") from None

    def update_parameters(self, delta) -> None:
        self._call("POST", "/update", self.layout.pack(delta), uuid.uuid4().hex)
        if self.counter is not None:
            self.counter.add(1)

    def _call(self, method: str, path: str, body: bytes | None = None, update_id: str | None = None) -> bytes:
        headers = {"Authorization": f"Bearer {self._secret}", "Content-Type": "application/octet-stream"}
        if update_id:
            headers["X-Update-Id"] = update_id
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2 ** (attempt - 1), 10))
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            try:
                conn.request(method, path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, not HTTP
                last = f"{type(e).__name__}: {e}"
                continue
            finally:
                conn.close()
            if reply.status == 200:
                return data
            if reply.status < 500:  # a refusal is final: retrying cannot change it
                raise ParameterServerError(f"{self!r} refused {method} {path}: HTTP {reply.status} {reply.reason}; "
                                           "is it this run's parameter server? (backend.advertise_host, backend.port)")
            last = f"HTTP {reply.status} {reply.reason}"
        raise ParameterServerError(f"{self!r} did not answer {method} {path} after {self.retries + 1} tries ({last});"
                                   " check that executors can reach it (backend.bind_host, backend.advertise_host) "
                                   "or raise backend.timeout_s")
