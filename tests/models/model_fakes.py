"""A scripted HTTP server speaking whatever JSON the test enqueues (vendor wire formats)."""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeServer:
    """An HTTP server that plays a queue of (status, headers, body) and records requests."""

    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    _queue: deque[tuple[int, dict[str, str], bytes]] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def enqueue(
        self, status: int, body: Any, headers: dict[str, str] | None = None, *, times: int = 1
    ) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs = {"content-type": "application/json", **(headers or {})}
        with self._lock:
            for _ in range(times):
                self._queue.append((status, hdrs, raw))

    @property
    def remaining(self) -> int:
        return len(self._queue)

    def handle(
        self, method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            body: Any = json.loads(raw) if raw else None
            self.requests.append(Recorded(method, path, headers, body))
            if not self._queue:
                return 599, {"content-type": "application/json"}, b'{"error": "script exhausted"}'
            return self._queue.popleft()


@contextmanager
def serve_fake() -> Iterator[FakeServer]:
    """Run a `FakeServer` on 127.0.0.1 (free port) in a thread for the block's duration."""
    fake = FakeServer()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            raw = self.rfile.read(length)
            status, headers, body = fake.handle(
                "POST", self.path, {k.lower(): v for k, v in self.headers.items()}, raw
            )
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
