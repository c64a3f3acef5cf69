"""The command line as people and scripts meet it: help, exit codes, progress, settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from trees import MiB, fill

from ingest.commands import COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(cli, command):
    args = [command, "show", "--help"] if command == "config" else [command, "--help"]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: keep-ingest ")


def test_top_level_help_lists_commands_and_exit_codes(cli):
    proc = cli("--help")
    assert proc.returncode == 0
    for command in COMMANDS:
        assert command in proc.stdout
    for code in ("0 ", "1 ", "2 ", "3 ", "75 ", "130 "):
        assert f"\n  {code}" in proc.stdout


def test_no_command_is_a_usage_error(cli):
    proc = cli()
    assert proc.returncode == 2 and "usage:" in proc.stderr


@pytest.fixture
def src(tmp_path):
    for i in range(12):
        fill(tmp_path / "src" / f"f{i}", MiB + 1000 * i, f"f{i}")
    fill(tmp_path / "src" / "empty", 0, "e")
    return tmp_path / "src"


def fast_progress_profile(tmp_path: Path) -> str:
    profile = tmp_path / "fast.toml"
    profile.write_text("[put]\nprogress_interval = 0.02\n")
    return str(profile)


def test_json_progress_lines_count_up_to_the_summary(cli, tmp_path, src):
    progress = tmp_path / "progress.jsonl"
    proc = cli("put", "--config", fast_progress_profile(tmp_path), "--store", str(tmp_path / "store"),
               "--block-size", str(MiB), "--chunk-size", "65536", "--workers", "1",
               "--progress", "json", "--progress-file", str(progress), "--json", str(src))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    assert len(lines) >= 3
    for key in ("bytes_done", "files_done", "blocks_done", "elapsed"):
        values = [line[key] for line in lines]
        assert values == sorted(values), key
    final = lines[-1]
    assert final["done"] is True and not any(line["done"] for line in lines[:-1])
    assert final["bytes_done"] == final["bytes_total"] == summary["bytes"]
    assert final["files_done"] == final["files_total"] == summary["files"]
    assert final["blocks_done"] == summary["blocks"] and final["bytes_uploaded"] == summary["bytes_uploaded"]
    assert any(line["workers"] for line in lines)
    # The phases, in order (the walk's lines count what it found so far), and the workers by name.
    phases = [line["phase"] for line in lines]
    assert phases[0] == "walk" and phases[-1] == "done" and phases == sorted(phases, key=["walk", "check", "upload",
                                                                                         "done"].index)
    assert all(line["files_total"] == line["files_found"] for line in lines if line["phase"] == "walk")
    assert {name for line in lines for name in line["workers"]} == {"w1"}
    for line in lines:
        assert line["bytes_done"] + line["bytes_in_flight"] <= line["bytes_total"]
        assert line["rate"] == sum(line["workers"].values()) or not line["workers"]


def test_batch_progress_uses_arv_puts_line_format(cli, tmp_path, src):
    proc = cli("put", "--config", fast_progress_profile(tmp_path), "--store", str(tmp_path / "store"),
               "--batch-progress", "--portable-data-hash", str(src))
    assert proc.returncode == 0, proc.stderr
    progress = [line for line in proc.stderr.splitlines() if " written " in line]
    total = sum(f.stat().st_size for f in src.iterdir())
    assert progress and progress[-1].endswith(f": {total} written {total} total")
    assert progress[-1].startswith("keep-ingest ")


def test_no_terminal_codes_when_stderr_is_not_a_terminal(cli, tmp_path, src):
    proc = cli("put", "--store", str(tmp_path / "store"), str(src))
    assert proc.returncode == 0
    assert "\x1b[" not in proc.stderr and proc.stderr.startswith("keep-ingest: 13 files")


def test_config_show_precedence_and_redaction(cli, tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text('[store]\ntype = "keep"\nservices = ["http://profile/"]\nreplication = 3\n'
                       '[put]\nchunk_size = 65536\n')
    env = {"ARVADOS_KEEP_SERVICES": "http://env/", "ARVADOS_API_TOKEN": "very-secret-token"}
    proc = cli("config", "show", "--config", str(profile), "--replication", "2", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert rows["store.replication"] == {"value": 2, "origin": "--replication"}            # flag
    assert rows["store.services"] == {"value": ["http://env/"], "origin": "$ARVADOS_KEEP_SERVICES"}  # env
    assert rows["put.chunk_size"] == {"value": 65536, "origin": str(profile)}               # profile
    assert rows["put.block_size"]["origin"] == "default"                                    # default
    assert rows["store.token"] == {"value": "<redacted>", "origin": "$ARVADOS_API_TOKEN"}
    human = cli("config", "show", "--config", str(profile), env=env).stdout
    assert "very-secret-token" not in human and "store.replication = 3" in human


def test_shipped_profiles_load(cli):
    for name in ("default", "cluster", "cron"):
        proc = cli("config", "show", "--config", str(REPO_ROOT / "configs" / f"{name}.toml"),
                   env={"ARVADOS_KEEP_SERVICES": "http://k/"})
        assert proc.returncode == 0, (name, proc.stderr)


def test_exit_codes_are_the_documented_ones(cli, tmp_path, src):
    store = ("--store", str(tmp_path / "store"), "--state-dir", str(tmp_path / "state"))
    assert cli("put", *store, "-q", str(src)).returncode == 0
    assert cli("put", *store, str(tmp_path / "missing")).returncode == 1
    assert cli("put", *store, "--workers", "x", str(src)).returncode == 2
    (src / "new").write_text("new")
    assert cli("put", *store, "--dry-run", str(src)).returncode == 2
    # 3 (partial), 75 (locked) and 130 (interrupted) are proven in test_faults_workers.py
    # and test_resume.py, where the situations are real.
