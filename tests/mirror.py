"""A local HTTP server on 127.0.0.1 that plays an image mirror for the tests (no test reaches
the internet): it serves ranges, 404s, cuts a body short, stalls (until the test releases
it) or ignores Range, and records every request it sees. Modules that use it import the
``server`` fixture (and the autouse ``_no_proxy_from_the_host``) from here."""

from __future__ import annotations

import random
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

DATA = random.Random(1).randbytes(200_000)
CUT = 70_000  # where a truncated answer stops
STALL_AFTER = 1_000  # bytes a stalling answer sends before it goes quiet


# --- the test server -----------------------------------------------------------------------


@dataclass
class Seen:
    path: str  # as on the request line: absolute ("http://host/x") when sent to a proxy
    headers: dict[str, str]


@dataclass
class State:
    files: dict[str, bytes] = field(default_factory=dict)
    # per path, the behaviours of the next answers; the last one sticks
    modes: dict[str, list[str]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    stalling: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_mode(self, name: str) -> str:
        with self.lock:
            modes = self.modes.get(name, ["range"])
            return modes.pop(0) if len(modes) > 1 else modes[0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        state = self.server.state
        with state.lock:
            state.seen.append(Seen(self.path, dict(self.headers.items())))
        name = urllib.parse.urlsplit(self.path).path
        data = state.files.get(name)
        mode = state.next_mode(name)
        if data is None or mode == "404":
            self.send_error(404)
            return
        start = 0
        ranged = self.headers.get("Range", "")
        if mode == "range" and ranged.startswith("bytes=") and ranged.endswith("-"):
            start = int(ranged[len("bytes=") : -1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:  # "ignore-range", "truncate", "stall": the whole file
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if mode == "truncate":
            self.wfile.write(body[:CUT])  # and close: fewer bytes than Content-Length
        elif mode == "stall":
            self.wfile.write(body[:STALL_AFTER])
            self.wfile.flush()
            state.stalling.set()
            state.release.wait(timeout=30)  # the test's teardown releases it
        else:
            self.wfile.write(body)


class Server(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = State()
        self.thread = threading.Thread(target=self.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, name: str, data: bytes = DATA, *modes: str) -> str:
        self.state.files[name] = data
        self.state.modes[name] = list(modes or ["range"])
        return self.base + name

    def ranges(self) -> list[str | None]:
        return [s.headers.get("Range") for s in self.state.seen]

    def stop(self) -> None:
        self.state.release.set()
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _no_proxy_from_the_host(monkeypatch):
    """A proxy set on the machine running the tests must not carry our 127.0.0.1 traffic."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
