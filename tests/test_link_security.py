"""The worker link under attack: strangers, other users, lying and broken workers.

Real parts only: the coordinator is the real CLI (``put --listen``), workers are
real ``keep-ingest worker`` processes, attackers are real ZeroMQ sockets (see
rogue.py) on 127.0.0.1, and another user is ``nobody``.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import psutil
import pytest
import xxhash
import zmq
from conftest import finish, free_port, kill_all, make_link_keys, spawn_cli
from rogue import Rogue, credentials, stranger
from trees import MiB, fill

from ingest import protocol
from ingest.config import Settings
from ingest.coordinator import Coordinator
from ingest.journal import iter_records
from ingest.link import make_key_pair

pytestmark = pytest.mark.timeout(90)

# A peer without CURVE fails the handshake: libzmq reports it as a protocol error, or
# (depending on how far its greeting got) with no detail.
PLAIN_REFUSED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


@pytest.fixture
def src(tmp_path) -> Path:
    """Eight blocks of 1 MiB (with --block-size 1 MiB): one for each rogue."""
    root = tmp_path / "src"
    for i in range(8):
        fill(root / f"f{i}", MiB, f"f{i}")
    fill(root / "small", 1000, "small")
    return root


def put_args(base: Path, *extra: str) -> list[str]:
    return ["put", "--store", str(base / "store"), "--state-dir", str(base / "state"),
            "--block-size", str(MiB), "--chunk-size", "65536", *extra]


def reference(cli, tmp_path: Path, src: Path) -> str:
    proc = cli(*put_args(tmp_path / "ref"), str(src))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def journal_locators(base: Path) -> list[str]:
    return [r["loc"] for j in (base / "state" / "runs").glob("*/journal") for r in iter_records(str(j))
            if r["t"] == "block"]


def assert_every_journaled_block_is_stored(base: Path) -> None:
    for locator in journal_locators(base):
        md5, size = locator.split("+")[:2]
        block = base / "store" / md5[:3] / md5
        assert block.is_file() and block.stat().st_size == int(size), locator
        assert hashlib.md5(block.read_bytes()).hexdigest() == md5, locator


def test_peers_without_an_accepted_key_get_not_a_byte_and_the_run_completes(cli, tmp_path, src, link_keys):
    expected = reference(cli, tmp_path, src)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    base = tmp_path / "run"
    make_link_keys(base)
    keys = base / "xdg-config" / "keep-ingest" / "link"
    coordinator = spawn_cli(base, *put_args(base, "--workers", "0", "--listen", endpoint), str(src))
    ctx = zmq.Context()
    worker = None
    try:
        with Rogue(ctx, endpoint, None) as plain, Rogue(ctx, endpoint, stranger(keys / "coordinator.key")) as keyed:
            for rogue in (plain, keyed):
                rogue.send_msg(protocol.HELLO, pid=1, host="rogue", version=protocol.PROTOCOL_VERSION)
            assert plain.wait_for_event(PLAIN_REFUSED)
            assert keyed.wait_for_event(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            worker = spawn_cli(base, "worker", "--connect", endpoint)
            code, out, err = finish(coordinator)
            assert finish(worker)[0] == 0
            time.sleep(0.2)
            assert not plain.heard_anything() and not keyed.heard_anything()
    finally:
        ctx.term()
        kill_all(coordinator, worker)
    assert code == 0, err
    assert out == expected
    assert "refused a worker from 127.0.0.1 on the remote link" in err


def test_a_worker_with_a_refused_key_or_the_wrong_coordinator_key_says_so_at_once(cli, tmp_path, src, link_keys):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    coordinator = spawn_cli(tmp_path, *put_args(tmp_path, "--workers", "0", "--listen", endpoint), str(src))
    other = tmp_path / "other-keys"
    stranger_public, stranger_secret = make_key_pair(str(other), "stranger")
    try:
        refused = cli("worker", "--connect", endpoint, "--key", stranger_secret, "--wait", "20", timeout=30)
        wrong = cli("worker", "--connect", endpoint, "--coordinator-key", stranger_public, "--wait", "20",
                    timeout=30)
    finally:
        coordinator.kill()
        coordinator.wait()
    assert refused.returncode == 1 and "refused this worker's key" in refused.stderr, refused.stderr
    assert wrong.returncode == 1 and "secure handshake with" in wrong.stderr, wrong.stderr
    for proc in (refused, wrong):
        assert "Traceback" not in proc.stderr


def test_listening_needs_keys_unless_plaintext_is_asked_for_loudly(cli, tmp_path, src):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = cli(*put_args(tmp_path, "--workers", "1", "--listen", endpoint), str(src))
    assert proc.returncode == 2 and "coordinator.key_secret does not exist" in proc.stderr
    assert "keep-ingest keys" in proc.stderr
    plain = cli(*put_args(tmp_path, "--workers", "1", "--listen", endpoint, "--insecure-plaintext-workers"),
                str(src))
    assert plain.returncode == 0, plain.stderr
    assert "INSECURE: the worker link on" in plain.stderr


def test_a_secret_key_file_others_can_read_is_refused(cli, tmp_path, link_keys):
    link_keys["worker.key_secret"].chmod(0o644)
    proc = cli("worker", "--connect", "tcp://127.0.0.1:1", "--wait", "1")
    assert proc.returncode == 2
    assert "can be read by other users (mode 0644)" in proc.stderr and "chmod 600" in proc.stderr


def test_keys_makes_a_private_secret_and_never_overwrites_by_surprise(cli, tmp_path):
    old = os.umask(0o022)
    try:
        first = cli("keys", "coordinator")
    finally:
        os.umask(old)
    assert first.returncode == 0, first.stderr
    key_dir = tmp_path / "xdg-config" / "keep-ingest" / "link"
    assert stat.S_IMODE((key_dir / "coordinator.key_secret").stat().st_mode) == 0o600
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    public = (key_dir / "coordinator.key").read_text()
    assert "secret-key" not in public and "public-key" in public
    again = cli("keys", "coordinator")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert (key_dir / "coordinator.key").read_text() == public


# -- the local link ------------------------------------------------------------------------


def test_the_local_socket_answers_only_workers_holding_the_runs_key():
    settings = Settings()
    settings.put.workers = 0
    ctx = zmq.Context()
    try:
        with Coordinator(settings) as coordinator:
            address = coordinator._local.address
            with Rogue(ctx, address, None) as plain, Rogue(ctx, address, stranger_for(coordinator)) as keyed, \
                    Rogue(ctx, address, coordinator._security.local_credentials()) as ours:
                for rogue in (plain, keyed, ours):
                    rogue.send_msg(protocol.HELLO, pid=1, host="h", version=protocol.PROTOCOL_VERSION)
                assert plain.wait_for_event(PLAIN_REFUSED)
                assert keyed.wait_for_event(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
                # only the worker holding the run's key gets a message through
                assert coordinator._local.sock.poll(5000)
                frames = coordinator._local.sock.recv_multipart(copy=False)
                assert frames[1].get("User-Id") == "local"
                assert not coordinator._local.sock.poll(500)
                # and it is welcomed without the store's description: it inherited it
                coordinator._handle(coordinator._local, frames)
                kind, fields, _ = ours.next_message(5)
                assert kind == protocol.WELCOME and "store" not in fields
                assert not plain.heard_anything() and not keyed.heard_anything()
    finally:
        ctx.term()


def stranger_for(coordinator: Coordinator):
    from ingest.link import KeyPair, WorkerCredentials

    return WorkerCredentials(KeyPair.new(), coordinator._security.local_credentials().server_public)


def python_for(user: str) -> str | None:
    """A Python interpreter that ``user`` may run: this one, or the system's."""
    for candidate in (sys.executable, shutil.which("python3", path=os.defpath)):
        try:
            if candidate and subprocess.run([candidate, "-c", "pass"], user=user, cwd="/",
                                            capture_output=True, timeout=30).returncode == 0:
                return candidate
        except OSError:
            continue
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_another_user_cannot_reach_a_local_runs_socket(tmp_path):
    python = python_for("nobody")
    if python is None:
        pytest.skip("no Python that 'nobody' may run")
    src = tmp_path / "src"
    fill(src / "big", 64 * MiB, "big")
    public = Path(tempfile.mkdtemp(prefix="keep-ingest-test-"))  # /tmp-like: anyone may enter it
    public.chmod(0o1777)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = public / f"keep-ingest-link-{dead.pid}-stale"
    stale.mkdir(mode=0o700)
    (stale / "link").write_text("")
    proc = spawn_cli(tmp_path, *put_args(tmp_path, "--workers", "1"), str(src),
                     env={"TMPDIR": str(public), "XDG_RUNTIME_DIR": ""})
    stopped: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 30
        while not (found := list(public.glob(f"keep-ingest-link-{proc.pid}-*/link"))):
            assert time.monotonic() < deadline and proc.poll() is None, "no socket appeared"
            time.sleep(0.005)
        sock_path = found[0]
        stopped = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children()]
        for p in stopped:
            p.suspend()
        assert not stale.exists(), "the directory of a dead run was not swept"
        assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o700
        probe = subprocess.run([python, "-c", _CONNECT, str(sock_path)], user="nobody", cwd="/",
                               capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.split() == [str(pwd.getpwnam("nobody").pw_uid), "PermissionError"]
    finally:
        for p in stopped:
            p.resume()
        code, _, err = finish(proc)
    assert code == 0, err
    assert not list(public.glob(f"keep-ingest-link-{proc.pid}-*")), "the run left its socket directory"
    public.rmdir()


_CONNECT = """
import os, socket, sys
try:
    socket.socket(socket.AF_UNIX).connect(sys.argv[1])
    result = "connected"
except OSError as exc:
    result = type(exc).__name__
print(os.getuid(), result)
"""


# -- authenticated workers that lie or break the protocol --------------------------------


def _rogue_run(cli, tmp_path: Path, src: Path, scenarios: dict, profile: str = "") -> tuple[str, str, str, Path]:
    """Run put --listen with one rogue per scenario (each with a key of its own the
    coordinator accepts), then a real worker; return the reference manifest, the
    run's manifest and stderr, and the run's base directory."""
    expected = reference(cli, tmp_path, src)
    base = tmp_path / "run"
    keys = make_link_keys(base)
    for name in scenarios:
        make_key_pair(str(keys["workers"]), name)
    config = base / "profile.toml"
    config.write_text("[put]\nheartbeat_timeout = 2\nblock_timeout = 3\n" + profile)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    coordinator = spawn_cli(base, *put_args(base, "--config", str(config), "--workers", "0", "--listen", endpoint,
                                            "-v"), str(src))
    ctx = zmq.Context()
    worker = None
    try:
        for name, scenario in scenarios.items():
            creds = credentials(keys["workers"] / f"{name}.key_secret", keys["coordinator.key"])
            with Rogue(ctx, endpoint, creds) as rogue:
                welcome = rogue.hello()
                scenario(rogue, welcome)
        worker = spawn_cli(base, "worker", "--connect", endpoint)
        code, out, err = finish(coordinator)
        assert code == 0, err
        assert finish(worker)[0] == 0
    finally:
        ctx.term()
        kill_all(coordinator, worker)
    assert "Traceback" not in err
    return expected, out, err, base


def _stored(rogue: Rogue, block: int, locator: str, size: int, **extra) -> None:
    rogue.send_msg(protocol.STORED, block=block, locator=locator, replicas=1, size=size, **extra)


def test_forged_receipts_are_refused_and_never_journaled(cli, tmp_path, src):
    forged: list[str] = []

    def made_up_locator(rogue, welcome):
        block, data = rogue.take_whole_block()
        locator = f"{hashlib.md5(b'not these bytes').hexdigest()}+{len(data)}"
        forged.append(locator)
        _stored(rogue, block, locator, len(data), xxh3=xxhash.xxh3_64_intdigest(data))
        assert "not in the store" in rogue.expect_stop()

    def its_own_bytes_in_the_store(rogue, welcome):
        block, data = rogue.take_whole_block()
        evil = os.urandom(len(data))
        md5 = hashlib.md5(evil).hexdigest()
        target = Path(welcome["store"]["path"]) / md5[:3] / md5
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(evil)
        forged.append(f"{md5}+{len(data)}")
        _stored(rogue, block, forged[-1], len(data), xxh3=xxhash.xxh3_64_intdigest(evil))
        assert "not the ones sent" in rogue.expect_stop()

    def wrong_size(rogue, welcome):
        block, data = rogue.take_whole_block()
        md5 = hashlib.md5(data).hexdigest()
        _stored(rogue, block, f"{md5}+{len(data) + 1}", len(data) + 1, xxh3=xxhash.xxh3_64_intdigest(data))
        assert "which has" in rogue.expect_stop()

    def unparsable(rogue, welcome):
        block, data = rogue.take_whole_block()
        _stored(rogue, block, "not a locator", len(data), xxh3=xxhash.xxh3_64_intdigest(data))
        assert "invalid block locator" in rogue.expect_stop()

    def before_the_block_was_sent(rogue, welcome):
        block, _ = rogue.take_block()
        _stored(rogue, block, f"{'0' * 32}+{MiB}", MiB, xxh3=1)
        assert "before it was sent the whole block" in rogue.expect_stop()

    def a_block_it_does_not_hold(rogue, welcome):
        block, data = rogue.take_whole_block()
        _stored(rogue, block + 1000, f"{hashlib.md5(data).hexdigest()}+{len(data)}", len(data))
        assert "which it does not hold" in rogue.expect_stop()

    scenarios = {f.__name__: f for f in (made_up_locator, its_own_bytes_in_the_store, wrong_size, unparsable,
                                         before_the_block_was_sent, a_block_it_does_not_hold)}
    expected, out, err, base = _rogue_run(cli, tmp_path, src, scenarios)
    assert out == expected
    journaled = journal_locators(base)
    assert journaled and not set(journaled) & set(forged)
    assert not any(f.split("+")[0] in out for f in forged)
    assert_every_journaled_block_is_stored(base)
    assert err.count("lost (it sent a STORED") == len(scenarios), err


def test_malformed_messages_stalls_and_oversized_frames_cost_only_their_sender(cli, tmp_path, src):
    def send_raw(frame: bytes, expect: str):
        def scenario(rogue, welcome):
            rogue.take_block()
            rogue.send(frame)
            assert expect in rogue.expect_stop()
        return scenario

    def hello_again(rogue, welcome):
        first, _ = rogue.take_block()
        rogue.send_msg(protocol.HELLO, pid=2, host="rogue", version=protocol.PROTOCOL_VERSION)
        kind, _, _ = rogue.next_message(5)
        while kind != protocol.WELCOME:
            kind, _, _ = rogue.next_message(5)
        # its block went back to the queue: it is given a block again (the same one)
        again, _ = rogue.take_block()
        assert again == first
        rogue.send(b"\xc1")
        rogue.expect_stop()

    def stalls_with_heartbeats(rogue, welcome):
        rogue.take_block()
        assert "no progress" in rogue.expect_stop(timeout=15, heartbeat=True)

    def oversized_frame(rogue, welcome):
        rogue.take_block()
        rogue.send(protocol.encode(protocol.HEARTBEAT), b"x" * (4 * MiB))
        # the coordinator's socket cuts the connection before the frame is read whole
        assert rogue.wait_for_event(zmq.EVENT_DISCONNECTED)

    scenarios = {
        "undecodable": send_raw(b"\xc1\xff", "undecodable header"),
        "empty_frame": send_raw(b"", "undecodable header"),
        "not_a_map": send_raw(msgpack.packb([1, 2, 3]), "not a map"),
        "unknown_type": send_raw(msgpack.packb({"t": "evil"}), "unknown or unexpected type"),
        "credit_not_a_number": send_raw(protocol.encode(protocol.CREDIT, bytes="lots"), "'bytes' is not"),
        "credit_for_bytes_never_sent": send_raw(protocol.encode(protocol.CREDIT, bytes=10**12), "a CREDIT for"),
        "progress_from_a_streamed_worker": send_raw(protocol.encode(protocol.PROGRESS, block=0, bytes=1, last=True),
                                                   "a PROGRESS while it reads no block"),
        "unreadable_from_a_remote_worker": send_raw(
            protocol.encode(protocol.UNREADABLE, block=0, path="/etc/shadow", reason="x"), "that is streamed its blocks"),
        "hello_again": hello_again,
        "stalls_with_heartbeats": stalls_with_heartbeats,
        "oversized_frame": oversized_frame,
    }
    expected, out, err, base = _rogue_run(cli, tmp_path, src, scenarios)
    assert out == expected
    assert_every_journaled_block_is_stored(base)
    assert "it said hello again" in err
    assert "no progress on its blocks for 3 s" in err
    assert "key oversized_frame) lost" in err  # cut off by its socket: its block went to the others


def test_a_remote_workers_failure_costs_a_retry_not_the_run(cli, tmp_path, src):
    def fails_its_block(rogue, welcome):
        block, _ = rogue.take_block()
        rogue.send_msg(protocol.FAILED, block=block, error="disk on fire")
        rogue.take_block()   # given a block again: the FAILED was heard (the rogue's socket drops what is unsent)

    expected, out, err, _ = _rogue_run(cli, tmp_path, src, {"fails_its_block": fails_its_block})
    assert out == expected
    assert "could not store block" in err and "disk on fire" in err and "another worker will try" in err


def test_a_worker_gives_up_on_handshakes_only_when_the_failure_is_settled():
    import struct

    from workers.worker import _Handshakes

    ctx = zmq.Context()
    events_in, events_out = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    events_in.bind("inproc://monitor-test")
    events_out.connect("inproc://monitor-test")

    def event(kind: int) -> None:  # the monitor's own format: u16 event, u32 value; then the endpoint
        events_out.send_multipart([struct.pack("=HI", kind, 0), b"tcp://127.0.0.1:1"])
        time.sleep(0.01)

    try:
        handshakes = _Handshakes(events_in)
        event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)       # a coordinator closing mid-handshake
        event(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        assert handshakes.failure() is None
        event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)       # three in a row: the key is wrong
        assert handshakes.failure() == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        refused = _Handshakes(events_in)
        event(zmq.EVENT_HANDSHAKE_FAILED_AUTH)            # refused by the coordinator: at once
        assert refused.failure() == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    finally:
        events_in.close(0)
        events_out.close(0)
        ctx.term()
