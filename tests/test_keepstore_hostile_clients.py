"""Hostile HTTP clients cannot pin the keepstore server's buffers or connections.

Real clients over loopback against a real ``keep-ingest keepstore`` process, with
small rate and window settings so each attack plays out in seconds. Every client
is a raw socket (a hostile client does not follow the rules of an HTTP library)
and stops by itself within the test's bounds.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
import urllib3

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
BLOCK = 64 * MiB
RATE = 64 * 1024     # --min-rate for these tests
WINDOW = 2.0         # --rate-window
PACED = ["--min-rate", str(RATE), "--rate-window", str(WINDOW)]
NORMAL_WAIT = 12.0  # seconds the normal client waits for its answer


def address(url: str) -> tuple[str, int]:
    host, port = url[len("http://"):-1].rsplit(":", 1)
    return host, int(port)


@dataclass
class Dribbler:
    """A PUT that declares a 64 MiB body and sends it at ``rate`` bytes/s at most,
    for ``limit`` seconds, reading whatever the server answers meanwhile."""

    url: str
    rate: int = 8 * 1024
    limit: float = 30.0  # longer than the normal client waits
    port: int = 0
    answer: bytes = b""
    sent: int = 0
    connected: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        md5 = "0" * 32
        with socket.create_connection(address(self.url), timeout=5) as s:
            self.port = s.getsockname()[1]
            s.sendall(f"PUT /{md5} HTTP/1.1\r\nHost: x\r\nContent-Length: {BLOCK}\r\n\r\n".encode())
            self.connected.set()
            piece = b"x" * (self.rate // 10)
            deadline = time.monotonic() + self.limit
            while time.monotonic() < deadline:
                readable, _, _ = select.select([s], [], [], 0.1)
                if readable:
                    self._read_answer(s)
                    return
                try:
                    s.sendall(piece)
                    self.sent += len(piece)
                except OSError:
                    self._read_answer(s)
                    return

    def _read_answer(self, s: socket.socket) -> None:
        s.settimeout(2)
        try:
            while chunk := s.recv(65536):
                self.answer += chunk
        except OSError:
            pass


def start(target) -> threading.Thread:
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def test_slow_bodies_holding_every_buffer_are_cut_off_and_a_normal_put_gets_through(keepstore_factory):
    ks = keepstore_factory(max_buffers=4, extra_args=PACED)
    slow = [Dribbler(ks.url) for _ in range(4)]  # 4 x 64 MiB: the whole budget
    threads = [start(d.run) for d in slow]
    for d in slow:
        assert d.connected.wait(10)
    time.sleep(0.3)  # the four are reading their bodies: every buffer is taken

    data = os.urandom(MiB)
    md5 = hashlib.md5(data).hexdigest()
    normal: dict[str, object] = {}

    def normal_put():
        http = urllib3.PoolManager(retries=False)
        r = http.request("PUT", ks.url + md5, body=data, timeout=urllib3.Timeout(connect=5, read=NORMAL_WAIT))
        normal["status"], normal["body"], normal["at"] = r.status, r.data, time.monotonic()

    began = time.monotonic()
    put_thread = start(normal_put)
    time.sleep(WINDOW / 2)
    assert "status" not in normal, "the slow clients did not hold the buffers"  # it waits for one
    put_thread.join(NORMAL_WAIT + 5)
    assert normal.get("status") == 200, normal
    assert normal["body"] == f"{md5}+{len(data)}\n".encode()
    # it got through once the slow ones were cut off, long before they would have finished
    assert normal["at"] - began < NORMAL_WAIT
    for t in threads:
        t.join(35)
    log = ks.log()
    for d in slow:
        assert d.answer.startswith(b"HTTP/1.1 408 "), d.answer[:200]
        assert b"request body too slow" in d.answer
        assert d.sent < BLOCK
        assert f"from 127.0.0.1:{d.port}: request body arrived at" in log, log
    assert ks.block_path(md5).read_bytes() == data


def test_a_fast_put_at_the_edge_of_the_window_is_not_cut_off(keepstore_factory):
    """A body sent steadily a little above the minimum rate, across several windows, is stored."""
    ks = keepstore_factory(extra_args=PACED)
    data = os.urandom(3 * 2 * RATE)  # about 3 windows at twice the minimum rate
    md5 = hashlib.md5(data).hexdigest()
    with socket.create_connection(address(ks.url), timeout=10) as s:
        s.sendall(f"PUT /{md5} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        step = 2 * RATE // 10
        for off in range(0, len(data), step):
            s.sendall(data[off:off + step])
            time.sleep(0.1)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert ks.block_path(md5).read_bytes() == data


def put_block(ks, data: bytes) -> str:
    md5 = hashlib.md5(data).hexdigest()
    r = urllib3.PoolManager(retries=False).request("PUT", ks.url + md5, body=data,
                                                    timeout=urllib3.Timeout(connect=5, read=30))
    assert r.status == 200, r.data
    return f"{md5}+{len(data)}"


def test_a_slow_reader_of_a_response_is_cut_off_and_frees_its_buffer(keepstore_factory):
    ks = keepstore_factory(max_buffers=1, extra_args=PACED)
    locator = put_block(ks, os.urandom(BLOCK))  # a full block: its GET takes the only buffer
    outcome: dict[str, object] = {}

    def slow_get():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(5)
        with s:
            s.connect(address(ks.url))
            outcome["port"] = s.getsockname()[1]
            s.sendall(f"GET /{locator} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            got, deadline = 0, time.monotonic() + 30
            try:
                while time.monotonic() < deadline:
                    chunk = s.recv(RATE // 40)  # a quarter of the minimum rate
                    if not chunk:
                        break
                    got += len(chunk)
                    time.sleep(0.1)
            except OSError:
                pass
            outcome["got"] = got

    reader = start(slow_get)
    time.sleep(0.5)
    data = os.urandom(MiB)
    began = time.monotonic()
    put_block(ks, data)  # waits for the buffer until the slow reader is cut off
    assert time.monotonic() - began < NORMAL_WAIT
    reader.join(35)
    assert 0 < outcome["got"] < BLOCK
    assert f"from 127.0.0.1:{outcome['port']}: response read at" in ks.log(), ks.log()


def test_a_client_leaving_mid_response_is_logged_without_a_traceback(keepstore_factory):
    ks = keepstore_factory()
    locator = put_block(ks, os.urandom(8 * MiB))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(address(ks.url))
    port = s.getsockname()[1]
    s.sendall(f"GET /{locator} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, (1).to_bytes(4, "little") + (0).to_bytes(4, "little"))
    s.close()  # a reset, mid-body
    deadline = time.monotonic() + 10
    while f"from 127.0.0.1:{port}: the client went away" not in ks.log():
        assert time.monotonic() < deadline, ks.log()
        time.sleep(0.05)
    assert "Traceback" not in ks.log()
    assert put_block(ks, b"still serving")
