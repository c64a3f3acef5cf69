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

from ingest.keepstore.server import ACCEPT_BURST

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
BLOCK = 64 * MiB
RATE = 64 * 1024     # --min-rate for these tests
WINDOW = 1.0         # --rate-window
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
    data = os.urandom(int(2.5 * WINDOW * 2 * RATE))  # 2.5 windows at twice the minimum rate
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


# -- connections: idle, dribbled headers, pipelined headers, too many ------------------


def closed_by_server(s: socket.socket, within: float) -> bool:
    """True if the server closes ``s`` within ``within`` seconds (without answering 200)."""
    s.settimeout(within)
    try:
        data = s.recv(65536)
    except TimeoutError:
        return False
    except OSError:
        return True
    return not data.startswith(b"HTTP/1.1 200")


def test_idle_connections_and_dribbled_headers_are_closed_after_the_idle_timeout(keepstore_factory):
    ks = keepstore_factory(extra_args=["--idle-timeout", "1"])
    silent = socket.create_connection(address(ks.url), timeout=5)
    dribbler = socket.create_connection(address(ks.url), timeout=5)
    with silent, dribbler:
        request = b"GET /index HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        began = time.monotonic()
        for i in range(len(request)):  # one byte every 0.05 s: never the end of the headers
            try:
                dribbler.sendall(request[i:i + 1])
            except OSError:
                break
            if time.monotonic() - began > 5:
                break
            time.sleep(0.05)
        assert closed_by_server(dribbler, 1)
        assert closed_by_server(silent, 1)
    # a connection that made one request is closed once idle for as long after its answer
    with socket.create_connection(address(ks.url), timeout=5) as after_one:
        after_one.sendall(b"GET /index HTTP/1.1\r\nHost: x\r\n\r\n")
        assert after_one.recv(65536).startswith(b"HTTP/1.1 200 ")
        assert closed_by_server(after_one, 5)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_pipelined_requests_with_fat_headers_cannot_pile_up_in_memory(keepstore_factory):
    """Connections that each hold a response they do not read (an 8 MiB block), first
    alone, then with 40 requests of 30 headers of 8000 bytes pipelined behind it:
    aiohttp would parse and keep 32 of them (about 17 MB a connection); the server
    parses 2 ahead. What the pipelined ones add is the difference of the two."""
    ks = keepstore_factory()
    locator = put_block(ks, os.urandom(8 * MiB))
    fat = b"".join(b"X-Pad-%d: " % k + b"a" * 8000 + b"\r\n" for k in range(30))
    conns = []

    def connect(pipelined: int) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(5)
        s.connect(address(ks.url))
        s.settimeout(0.1)  # a send the server no longer reads gives up soon
        conns.append(s)
        s.sendall(f"GET /{locator} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        try:
            for _ in range(pipelined):
                s.sendall(b"GET /index HTTP/1.1\r\nHost: x\r\n" + fat + b"\r\n")
        except OSError:
            pass  # the server stopped reading: that is the point

    try:
        time.sleep(0.3)
        base = rss_mib(ks.pid)
        for _ in range(10):
            connect(0)
        time.sleep(0.5)
        alone = rss_mib(ks.pid) - base
        for _ in range(10):
            connect(40)
        time.sleep(0.5)
        with_pipelined = rss_mib(ks.pid) - base - alone
    finally:
        for s in conns:
            s.close()
    print(f"pipelining: {alone:.1f} MiB alone, {with_pipelined:.1f} MiB with pipelined requests")
    assert with_pipelined - alone < 40, (
        f"10 connections: {alone:.0f} MiB alone, {with_pipelined:.0f} MiB with pipelined requests")


def spawn_limited(tmp_path, nofile: int, *args: str):
    """A keepstore process whose open-files limit (soft and hard) is ``nofile``."""
    import re
    import resource
    import subprocess
    import sys

    from conftest import REPO_ROOT

    log_path = tmp_path / "ks.log"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ingest", "keepstore", "-v", "--listen", "127.0.0.1:0", "--no-fsync",
             "--volume", str(tmp_path / "vol"), *args], stdout=log, stderr=log, env=env,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
    deadline = time.monotonic() + 20
    while not (m := re.search(r"listening on (http://\S+/)", log_path.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)
    return proc, m.group(1), log_path


def test_many_idle_connections_cannot_lock_everyone_out(tmp_path):
    proc, url, log_path = spawn_limited(tmp_path, 160)
    idle = []
    try:
        for _ in range(200):  # more than the process has descriptors
            idle.append(socket.create_connection(address(url), timeout=5))
        time.sleep(0.5)
        data = os.urandom(MiB)
        md5 = hashlib.md5(data).hexdigest()
        r = urllib3.PoolManager(retries=False).request(
            "PUT", url + md5, body=data, timeout=urllib3.Timeout(connect=5, read=NORMAL_WAIT))
        assert r.status == 200, r.data
        closed = sum(closed_by_server(s, 0.01) for s in idle)
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(15)
    log = log_path.read_text()
    assert "at most 80 connections (not 512): the open-files limit is 160" in log, log
    assert "connection limit 80 reached: closing the connection from 127.0.0.1:" in log
    # the oldest idle ones made room (give or take one burst of accepts)
    assert closed >= 200 - 80 - ACCEPT_BURST
    assert "Too many open files" not in log and "Traceback" not in log


def test_requests_beyond_the_waiting_limit_get_503_at_once(keepstore_factory):
    ks = keepstore_factory(max_buffers=1, extra_args=["--max-queued", "2", "--min-rate", "1024"])
    holder = Dribbler(ks.url, rate=16 * 1024, limit=2)  # above the minimum rate: it keeps the buffer
    start(holder.run)
    assert holder.connected.wait(10)
    time.sleep(0.3)
    waiting = []
    try:
        for _ in range(2):
            s = socket.create_connection(address(ks.url), timeout=5)
            s.sendall(f"PUT /{'1' * 32} HTTP/1.1\r\nHost: x\r\nContent-Length: {BLOCK}\r\n\r\n".encode())
            waiting.append(s)
        time.sleep(0.3)
        with socket.create_connection(address(ks.url), timeout=5) as third:
            third.sendall(f"PUT /{'2' * 32} HTTP/1.1\r\nHost: x\r\nContent-Length: {BLOCK}\r\n\r\n".encode())
            answer = third.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"server busy: 2 requests already wait for memory" in answer
        for s in waiting:  # the two in the queue are still waiting, unanswered
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
    finally:
        for s in waiting:
            s.close()
