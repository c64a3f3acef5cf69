"""Storage classes in the Keep client: sent in X-Keep-Storage-Classes, and a block is
stored only when X-Keep-Storage-Classes-Confirmed counts enough copies in each class
(no header: the check is off, as in the SDK with an old keepstore)."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ingest.errors import StoreError
from ingest.keep.client import KeepClient


class _Service(ThreadingHTTPServer):
    """A Keep service on 127.0.0.1 answering every PUT with a chosen confirmation."""

    def __init__(self, confirmed: str | None):
        self.confirmed = confirmed
        self.seen: list[str | None] = []
        super().__init__(("127.0.0.1", 0), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    def do_PUT(self) -> None:  # noqa: N802 (the stdlib's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append(self.headers.get("X-Keep-Storage-Classes"))
        answer = f"{hashlib.md5(body).hexdigest()}+{len(body)}\n".encode()
        self.send_response(200)
        self.send_header("X-Keep-Replicas-Stored", "1")
        if self.server.confirmed is not None:
            self.send_header("X-Keep-Storage-Classes-Confirmed", self.server.confirmed)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def services():
    started: list[_Service] = []

    def start(*confirmed: str | None) -> list[_Service]:
        started.extend(_Service(c) for c in confirmed)
        return started[-len(confirmed):]

    yield start
    for s in started:
        s.close()


def client(servers, classes, replication=1) -> KeepClient:
    return KeepClient([s.url for s in servers], "tok", replication=replication, service_type="disk",
                      storage_classes=classes, retries=0, backoff_start=0)


def test_classes_are_sent_and_confirmed(services):
    a, b = services("hot=1, default=1", "default=1")
    with client([a, b], ["hot", "default"]) as c:
        c.put(b"x" * 10)
    assert "hot, default" not in a.seen + b.seen       # sorted, as the SDK sends them
    assert "default, hot" in a.seen + b.seen


def test_a_class_no_service_confirms_fails_naming_it(services):
    a, b = services("default=1", "default=1")
    with client([a, b], ["archive"]) as c, pytest.raises(StoreError, match=r"in storage class\(es\) archive"):
        c.put(b"y" * 10)
    assert len(a.seen) + len(b.seen) == 2               # every service was asked before giving up


def test_a_second_service_makes_up_a_missing_class(services):
    a, b = services("default=1", "archive=1")
    with client([a, b], ["archive", "default"]) as c:
        stored = c.put(b"z" * 10)
    assert stored.replicas == 2 and len(a.seen) == len(b.seen) == 1


def test_no_confirmation_header_turns_the_check_off(services):
    (a,) = services(None)
    with client([a], ["archive"]) as c:
        assert c.put(b"w" * 10).replicas == 1
