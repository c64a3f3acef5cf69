"""What a new user meets in the first hour: the walk's edges, output destinations,
messages, options, the read side, the Makefile and the README's cron line.

Every test runs the real CLI (or make, or the cron line through /bin/sh) on real
files, as a user would.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, cli_env, finish, spawn_cli
from trees import MiB, fill

from ingest.journal import frame, read_journal, rewrite_journal
from ingest.keep.locator import EMPTY_BLOCK_MD5
from ingest.manifest import parse_manifest
from tests.journal_rows import record_rows


def ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def src(tmp_path):
    fill(tmp_path / "src" / "a.txt", 100, "a")
    fill(tmp_path / "src" / "sub" / "b.txt", 200, "b")
    return tmp_path / "src"


def store_files(store: Path) -> list[Path]:
    return [p for p in store.rglob("*") if p.is_file()] if store.exists() else []


# -- 1: the walk ---------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--skip-unreadable"]])
def test_a_symlink_loop_between_files_is_skipped_with_a_warning(cli, tmp_path, src, extra):
    os.symlink("loop2", src / "loop1")
    os.symlink("loop1", src / "loop2")
    os.symlink(".", src / "sub" / "selfloop")
    proc = ok(cli("put", "--store", str(tmp_path / "store"), *extra, str(src)))
    for name in ("loop1", "loop2", "sub/selfloop"):
        assert f"skipping symlink loop: {src / name}" in proc.stderr
    files = dict(parse_manifest(proc.stdout).files())
    assert sorted(files) == ["src/a.txt", "src/sub/b.txt"]


def test_a_failed_run_with_json_prints_the_error_as_json_on_stdout(cli, tmp_path):
    proc = cli("put", "--json", "--store", str(tmp_path / "store"), str(tmp_path / "nope"))
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == {"error": f"source '{tmp_path / 'nope'}': no such file or directory",
                                       "exit_code": 1}
    assert "ERROR: source" in proc.stderr


# -- 2: output destinations ------------------------------------------------------------


def test_manifest_out_is_checked_before_any_work_and_its_directory_created(cli, tmp_path, src):
    store = tmp_path / "store"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = cli("put", "--store", str(store), "--manifest-out", str(blocker / "m.manifest"), str(src))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"keep-ingest: ERROR: --manifest-out {blocker / 'm.manifest'}: cannot "
                                   f"write the manifest in {blocker}: Not a directory")
    assert not store_files(store)            # refused before a block was stored
    out = tmp_path / "not" / "yet" / "m.manifest"
    ok(cli("put", "-q", "--store", str(store), "--manifest-out", str(out), str(src)))
    parse_manifest(out.read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.manifest"]  # no temporary file left


def test_the_manifest_file_gets_the_usual_mode_and_a_replaced_one_keeps_its_own(tmp_path, src):
    out = tmp_path / "m.manifest"

    def put() -> None:
        proc = subprocess.run([sys.executable, "-m", "ingest", "put", "-q", "--store", str(tmp_path / "store"),
                               "--manifest-out", str(out), str(src)], capture_output=True, text=True,
                              env=cli_env(tmp_path), preexec_fn=lambda: os.umask(0o022), timeout=60)
        assert proc.returncode == 0, proc.stderr

    put()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644   # as `> m.manifest` would give
    out.chmod(0o600)
    put()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


# -- 3: too few Keep services --------------------------------------------------------------


def test_fewer_writable_services_than_copies_is_refused_at_start(cli, tmp_path, src, keepstore):
    proc = cli("put", "--keep", keepstore.url, str(src))
    assert proc.returncode == 2
    assert ("replication 2 (default) needs 2 copies, but the writable Keep services given (--keep) can hold 1: lower it "
            "with --replication 1") in proc.stderr
    assert "no service answered" not in proc.stderr
    # nothing but the empty block it was asked to hold 2 copies of (a proxy would say how many it can)
    assert [p.name for p in store_files(keepstore.volumes[0])] in ([], [EMPTY_BLOCK_MD5])


def test_too_few_answering_services_for_the_copies_is_refused_at_start(cli, tmp_path, src, keepstore):
    with socket.socket() as closed:   # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}/"
    proc = cli("put", "--keep", keepstore.url, "--keep", down, str(src))
    assert proc.returncode == 1
    assert "only 1 of 2 writable Keep services answer, and they can hold 1 of the 2 copies asked for" in proc.stderr
    assert down in proc.stderr
    assert [p.name for p in store_files(keepstore.volumes[0])] in ([], [EMPTY_BLOCK_MD5])  # no data stored


# -- 4: verify takes put's source forms ------------------------------------------------------


def test_verify_takes_the_source_forms_of_put_and_says_what_to_type(cli, tmp_path, src):
    store = ("--store", str(tmp_path / "store"))
    whole, contents = tmp_path / "whole.manifest", tmp_path / "contents.manifest"
    ok(cli("put", "-q", *store, "--manifest-out", str(whole), str(src)))
    ok(cli("put", "-q", *store, "--manifest-out", str(contents), f"{src}/"))
    assert "identical: 2 files" in ok(cli("verify", *store, str(whole), str(src))).stderr
    assert "identical: 2 files" in ok(cli("verify", *store, str(contents), f"{src}/")).stderr
    proc = cli("verify", *store, str(whole), f"{src}/")
    assert proc.returncode == 1
    assert (f"hint: the manifest looks made by 'put {src}' (the directory itself); to compare with "
            f"that, type: keep-ingest verify {whole} {src}\n") in proc.stderr
    proc = cli("verify", *store, "--json", str(contents), str(src))
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["hint"].endswith(f"type: keep-ingest verify {contents} {src}/")


# -- 5: make ingest ------------------------------------------------------------------------------


FAKE_PYTHON = """#!/bin/sh
# Stands in for python3 on a first `make ingest`: "-m venv DIR" makes a venv whose
# python talks on stdout as pip does, and whose keep-ingest is the real one.
[ "$1" = "-m" ] && [ "$2" = "venv" ] || exit 1
mkdir -p "$3/bin"
printf '#!/bin/sh\\necho "Collecting pyzmq (pip noise on stdout)"\\n' > "$3/bin/python"
printf '#!/bin/sh\\nPYTHONPATH=%s exec %s -m ingest "$@"\\n' "$REPO" "$REAL_PYTHON" > "$3/bin/keep-ingest"
chmod +x "$3/bin/python" "$3/bin/keep-ingest"
echo "created a virtual environment"
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_ingest_leaves_only_the_manifest_on_stdout(tmp_path, src):
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = cli_env(tmp_path, {"REPO": str(REPO_ROOT), "REAL_PYTHON": sys.executable})
    args = ["make", "--no-print-directory", "-C", str(REPO_ROOT), "ingest", f"SRC={src}",
            f"VENV={tmp_path / 'venv'}", f"PYTHON={fake}"]
    first = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    for proc in (first, second):
        assert proc.returncode == 0, proc.stderr
        assert sorted(dict(parse_manifest(proc.stdout).files())) == ["src/a.txt", "src/sub/b.txt"]
    assert "Collecting pyzmq" in first.stderr and "pip install" in first.stderr
    assert "Collecting" not in second.stderr


# -- 6: config show ------------------------------------------------------------------------------


def test_config_show_says_where_the_blocks_and_the_state_are(cli, tmp_path):
    proc = ok(cli("config", "show"))
    lines = {line.split(" = ")[0]: line for line in proc.stdout.splitlines()}
    store = tmp_path / "xdg-data" / "keep-ingest" / "store"
    assert re.fullmatch(rf'store\.path = "{store}" +# default \(\$XDG_DATA_HOME/keep-ingest/store\)',
                        lines["store.path"])
    state = tmp_path / "xdg-state" / "keep-ingest"
    assert re.fullmatch(rf'state\.dir = "{state}" +# default \(\$XDG_STATE_HOME/keep-ingest\)', lines["state.dir"])
    shown = json.loads(ok(cli("config", "show", "--json", "--store", "rel/store", cwd=str(tmp_path))).stdout)
    assert shown["store.path"] == {"value": str(tmp_path / "rel" / "store"), "origin": "--store"}
    assert shown["state.dir"]["note"] == "$XDG_STATE_HOME/keep-ingest"


# -- 7: cron ----------------------------------------------------------------------------------


def readme_cron_line() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"```cron\n(.*?)```", text, re.S).group(1)
    return next(line for line in block.splitlines() if line and not line.startswith("#"))


def test_the_readmes_cron_line_works_literally_and_is_silent_while_the_last_run_goes_on(tmp_path):
    home = tmp_path / "home"
    entry = readme_cron_line()
    command = entry.split(None, 5)[5]                    # the five schedule fields off
    command = command.replace("/data/", f"{tmp_path}/data/")
    tool = re.match(r"(\S+) put ", command).group(1)
    installed = Path(tool.replace("$HOME", str(home)))   # where the README says it is
    installed.parent.mkdir(parents=True)
    installed.write_text(f'#!/bin/sh\nPYTHONPATH={REPO_ROOT} exec {sys.executable} -m ingest "$@"\n')
    installed.chmod(0o755)
    fill(tmp_path / "data" / "raw" / "f", 1000, "f")
    cron_env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "SHELL": "/bin/sh", "LOGNAME": "root"}

    def cron() -> subprocess.CompletedProcess:
        return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, env=cron_env,
                              timeout=60)

    first = cron()
    assert (first.returncode, first.stdout, first.stderr) == (0, "", "")
    manifest = re.search(r"--manifest-out (\S+)", command).group(1)
    parse_manifest(Path(manifest).read_text())
    (lock,) = (home / ".local" / "state" / "keep-ingest" / "runs").glob("*/lock")
    with open(lock, "r+") as held:                       # the previous run is still going
        fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = cron()
    assert (busy.returncode, busy.stdout, busy.stderr) == (0, "", "")
    shutil.rmtree(tmp_path / "data" / "raw")
    failed = cron()                                      # a real failure still mails
    assert failed.returncode == 1 and "ERROR: source" in failed.stderr


def test_the_cron_profile_works_on_a_fresh_account(tmp_path, src):
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ingest", "put", "-q", "--config", str(REPO_ROOT / "configs/cron.toml"),
                           "--store", str(tmp_path / "store"), str(src)], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = (home / ".local/state/keep-ingest/cron-progress.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["done"] is True


def test_a_held_lock_is_a_warning_not_an_error(cli, tmp_path, src):
    ok(cli("put", "-q", "--store", str(tmp_path / "store"), str(src)))
    (lock,) = (tmp_path / "xdg-state" / "keep-ingest" / "runs").glob("*/lock")
    with open(lock, "r+") as held:
        fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        loud = cli("put", "--store", str(tmp_path / "store"), str(src))
        quiet = cli("put", "-q", "--store", str(tmp_path / "store"), str(src))
    assert loud.returncode == quiet.returncode == 75
    assert loud.stderr.startswith("keep-ingest: WARNING: another run holds the lock on this state: ")
    assert quiet.stderr == quiet.stdout == ""


# -- 8: words --------------------------------------------------------------------------------


def test_status_tells_a_failed_run_from_an_interrupted_one(cli, tmp_path, src):
    store = ("--store", str(tmp_path / "store"))
    assert cli("put", *store, str(tmp_path / "nope")).returncode == 1
    assert "no runs in" in ok(cli("status")).stderr      # a missing source never starts a run


def test_status_says_failed_for_a_run_that_failed(tmp_path, src):
    (src / "a.txt").chmod(0)
    proc = spawn_cli(tmp_path, "put", "--store", str(tmp_path / "store"), str(src), unprivileged=True)
    code, _, err = finish(proc)
    assert code == 1, err
    status = subprocess.run([sys.executable, "-m", "ingest", "status"], capture_output=True, text=True,
                            env=cli_env(tmp_path), timeout=30)
    assert "status:          failed (exit 1): 1 path could not be read" in status.stdout, status.stdout
    assert "interrupted" not in status.stdout


def test_a_large_file_resumed_is_not_stored_yet_not_repacked(cli, tmp_path):
    fill(tmp_path / "src" / "big.bin", 6 * MiB, "big")
    fill(tmp_path / "src" / "small", 10, "small")
    store = ("--store", str(tmp_path / "store"), "--block-size", str(MiB))
    ok(cli("put", "-q", *store, str(tmp_path / "src")))
    (journal,) = (tmp_path / "xdg-state" / "keep-ingest" / "runs").glob("*/journal")
    records, _, _ = read_journal(str(journal))
    blocks = [r for r in records if r["t"] == "block"]
    # As if Ctrl-C came after three of the big file's six blocks (and the small file's).
    keep = [r for r in blocks if record_rows(r)[0][0] != "src/big.bin" or record_rows(r)[0][5] < 3 * MiB]
    rewrite_journal(str(journal), map(frame, [records[0], *keep]))
    proc = ok(cli("put", *store, str(tmp_path / "src")))
    assert "  uploaded src/big.bin (not stored yet)\n" in proc.stderr
    assert "repacked" not in proc.stderr
    assert re.search(r"in 7 blocks\n  uploaded 3\.0 MiB \(3 blocks\) in [0-9.]+ s .*\n  reused 3\.0 MiB \(4 blocks\)\n",
                     proc.stderr), proc.stderr


def test_counts_agree_with_their_nouns_and_paths_are_quoted_as_typed(cli, tmp_path):
    fill(tmp_path / "one" / "back\\slash.txt", 10, "x")
    fill(tmp_path / "two" / "back\\slash.txt", 10, "y")
    proc = ok(cli("put", "--store", str(tmp_path / "store"), str(tmp_path / "one")))
    assert "keep-ingest: 1 file, 10 B in 1 block\n  uploaded 10 B (1 block) in " in proc.stderr
    assert "\n  reused 0 B (0 blocks)\n" in proc.stderr
    proc = cli("put", "--store", str(tmp_path / "store"), f"{tmp_path / 'one'}/", f"{tmp_path / 'two'}/")
    assert proc.returncode == 1
    assert "two sources give the same manifest path 'back\\slash.txt': " in proc.stderr


# -- 9: the read side ----------------------------------------------------------------------------


def test_cat_and_get_accept_the_names_ls_prints(cli, tmp_path):
    fill(tmp_path / "src" / "new\nline.txt", 5, "n")
    fill(tmp_path / "src" / "back\\134slash", 6, "b")   # a name that looks like an escape
    fill(tmp_path / "src" / "back\\slash", 7, "s")
    store = ("--store", str(tmp_path / "store"))
    manifest = tmp_path / "m"
    ok(cli("put", "-q", *store, "--manifest-out", str(manifest), f"{tmp_path / 'src'}/"))
    listed = ok(cli("ls", str(manifest))).stdout.splitlines()
    assert listed == ["back\\134134slash", "back\\134slash", "new\\012line.txt"]
    for shown, name in zip(listed, ["back\\134slash", "back\\slash", "new\nline.txt"], strict=True):
        proc = subprocess.run([sys.executable, "-m", "ingest", "cat", *store, str(manifest), shown],
                              capture_output=True, env=cli_env(tmp_path), timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == (tmp_path / "src" / name).read_bytes()
    # a name typed as it is, when it holds no escape
    proc = subprocess.run([sys.executable, "-m", "ingest", "cat", *store, str(manifest), "back\\slash"],
                          capture_output=True, env=cli_env(tmp_path), timeout=30)
    assert proc.stdout == (tmp_path / "src" / "back\\slash").read_bytes()
    ok(cli("get", *store, str(manifest), str(tmp_path / "dest"), "new\\012line.txt"))
    assert (tmp_path / "dest" / "new\nline.txt").read_bytes() == (tmp_path / "src" / "new\nline.txt").read_bytes()


def test_a_read_never_creates_the_store(cli, tmp_path, src):
    manifest = tmp_path / "m"
    ok(cli("put", "-q", "--store", str(tmp_path / "store"), "--manifest-out", str(manifest), str(src)))
    nowhere = tmp_path / "nonexistent"
    for args in (("cat", str(manifest), "src/a.txt"), ("verify", str(manifest), str(src)),
                 ("get", str(manifest), str(tmp_path / "dest"))):
        proc = cli(args[0], "--store", str(nowhere), *args[1:])
        assert proc.returncode == 1, args
        assert f"block store {nowhere} does not exist" in proc.stderr, proc.stderr
        assert not nowhere.exists(), args


def test_a_read_only_store_can_be_read(tmp_path, src):
    (src / "a.txt").write_text("plain text\n")
    store = tmp_path / "store"
    manifest = tmp_path / "m"
    code, _, err = finish(spawn_cli(tmp_path, "put", "-q", "--store", str(store), "--manifest-out",
                                    str(manifest), str(src)))
    assert code == 0, err
    for d in [store, *[p for p in store.rglob("*") if p.is_dir()]]:
        d.chmod(0o555)
    try:
        code, out, err = finish(spawn_cli(tmp_path, "cat", "--store", str(store), str(manifest), "src/a.txt",
                                          unprivileged=True))
    finally:
        for d in [store, *[p for p in store.rglob("*") if p.is_dir()]]:
            d.chmod(0o755)
    assert (code, out) == (0, "plain text\n"), err


def test_a_closed_pipe_ends_a_read_as_it_ends_coreutils(tmp_path):
    manifest = tmp_path / "m"
    names = " ".join(f"0:0:file{i:06d}" for i in range(50_000))
    manifest.write_text(f". d41d8cd98f00b204e9800998ecf8427e+0 {names}\n")
    for args in (("ls", "-l", str(manifest)), ("ls", str(manifest))):
        proc = subprocess.Popen([sys.executable, "-m", "ingest", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=cli_env(tmp_path))
        assert proc.stdout.readline()                    # `| head -1`
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=30) == -signal.SIGPIPE  # the shell shows 141, and prints nothing
        assert err == b""


def test_a_lone_fifo_source_is_an_error_naming_it(cli, tmp_path):
    os.mkfifo(tmp_path / "pipe")
    proc = cli("put", "--store", str(tmp_path / "store"), str(tmp_path / "pipe"))
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"source '{tmp_path / 'pipe'}': a FIFO" in proc.stderr


# -- 10: options ------------------------------------------------------------------------------


def test_options_are_never_abbreviated_and_typos_get_the_subcommands_usage(cli, tmp_path, src):
    for typed, near in (("--worker", "--workers"), ("--wrokers", "--workers")):
        proc = cli("put", "--store", str(tmp_path / "store"), typed, "2", str(src))
        assert proc.returncode == 2
        assert proc.stderr.startswith("usage: keep-ingest put ")
        assert f"keep-ingest put: error: unrecognized arguments: {typed} (did you mean {near}?)" in proc.stderr
    proc = cli("config", "show", "--jsn")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: keep-ingest config show ")
    proc = ok(cli("ls", "-vv", "--json", "/dev/null"))  # short flags still combine
    assert proc.stdout == "[]\n"


def test_an_unexpected_failure_is_one_line_never_a_traceback(monkeypatch, capsys):
    import ingest.commands.status
    from ingest.cli import main

    def broken(args):
        raise FileNotFoundError(2, "No such file or directory", "/some/where")

    monkeypatch.setattr(ingest.commands.status, "run", broken)
    assert main(["status", "--json"]) == 1
    out, err = capsys.readouterr()
    assert err == ("keep-ingest: ERROR: internal error: FileNotFoundError: [Errno 2] No such file or directory: "
                   "'/some/where' (please report it; -vv shows where it happened)\n")
    assert json.loads(out)["exit_code"] == 1
