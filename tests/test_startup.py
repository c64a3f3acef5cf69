"""Start-up cost: a command imports only what it needs.

Every run of the CLI first builds the parser, which imports every command module;
those modules import their implementation only when the command runs. These tests
run the real CLI with ``PYTHONPROFILEIMPORTTIME=1`` (``python -X importtime``) and
read from its stderr which modules were imported. No timings are asserted.
"""

from __future__ import annotations

import re

import pytest

from ingest.commands import COMMANDS

pytestmark = pytest.mark.timeout(60)

# Expensive to import, and each needed by a few commands only.
HEAVY = ("rich", "zmq", "ingest.coordinator", "ingest.read.get", "aiohttp", "urllib3")

IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| *(\S+)$", re.MULTILINE)


def imported(cli, *args: str) -> list[str]:
    """The modules a successful ``keep-ingest ARGS...`` imported, in order; a module
    imported by several processes (forked workers) is listed once for each."""
    proc = cli(*args, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0, proc.stderr
    modules = IMPORT_LINE.findall(proc.stderr)
    assert "ingest.cli" in modules, "no import times on stderr"
    return modules


def loaded(modules: list[str], *packages: str) -> list[str]:
    """The modules of ``modules`` that are one of ``packages`` or inside one."""
    return sorted({m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)})


def help_args(command: str) -> list[str]:
    return [command, "show", "--help"] if command == "config" else [command, "--help"]


def test_version_imports_no_command_implementation(cli):
    assert loaded(imported(cli, "--version"), *HEAVY) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_help_imports_no_command_implementation(cli, command):
    assert loaded(imported(cli, *help_args(command)), *HEAVY) == []


@pytest.fixture
def tree(tmp_path):
    """A tiny source tree."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.txt").write_text("beta\n")
    return src


@pytest.mark.parametrize("progress", [["-q"], ["--progress", "json"]], ids=["quiet", "json"])
def test_put_loads_neither_the_terminal_display_nor_the_read_side(cli, tmp_path, tree, progress):
    modules = imported(cli, "put", *progress, "--store", str(tmp_path / "store"),
                       "--state-dir", str(tmp_path / "state"), str(tree))
    assert loaded(modules, "zmq", "ingest.coordinator")  # the run did happen
    assert loaded(modules, "rich", "ingest.read.get", "aiohttp", "urllib3") == []


def test_put_workers_inherit_their_code_from_the_coordinator(cli, tmp_path, tree):
    # Imported before the local workers are forked, not once in each of them.
    modules = imported(cli, "put", "-q", "--workers", "2", "--store", str(tmp_path / "store"),
                       "--state-dir", str(tmp_path / "state"), str(tree))
    assert modules.count("workers.worker") == 1


@pytest.mark.parametrize("read", [["ls", "-l"], ["cat", "src/sub/b.txt"]], ids=["ls", "cat"])
def test_reading_a_manifest_loads_no_upload_machinery(cli, tmp_path, tree, read):
    store = str(tmp_path / "store")
    manifest = tmp_path / "manifest"
    put = cli("put", "-q", "--store", store, "--state-dir", str(tmp_path / "state"),
              "--manifest-out", str(manifest), str(tree))
    assert put.returncode == 0, put.stderr
    command, *rest = read
    modules = imported(cli, command, str(manifest), *rest, "--store", store)
    assert loaded(modules, *HEAVY) == []
