"""``keep-ingest status``: the runs in the state directory and what they have stored."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ingest.commands.common import settings_from
from ingest.errors import EXIT_OK
from ingest.words import plural


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "status", parents=[common], help="show the runs in the state directory",
        description="List the runs checkpointed in the state directory: their sources, "
                    "destination, blocks stored, last checkpoint, whether a run holds the lock.")
    p.add_argument("--config", metavar="FILE", help="TOML profile (see configs/)")
    p.add_argument("--state-dir", metavar="DIR", help="default: $XDG_STATE_HOME/keep-ingest")
    p.add_argument("--json", action="store_true", help="one JSON object per run, one per line")
    p.set_defaults(func=run)


def describe_run(run_dir: str) -> dict[str, object]:
    """What one run's state says, read without taking its lock or changing it."""
    # Imported when the command runs: keeps start-up cheap for every command.
    from ingest.journal import read_journal
    from ingest.state import describe_holder, is_locked

    journal = os.path.join(run_dir, "journal")
    lock = os.path.join(run_dir, "lock")
    records, _, torn = read_journal(journal)
    runs = [r for r in records if r["t"] == "run"]
    blocks = [r for r in records if r["t"] == "block"]
    done = [r for r in records if r["t"] == "done"]
    saved = [r for r in records if r["t"] == "saved"]
    work = [r for r in records if r["t"] not in ("save", "saved")]   # a save follows its run's "done"
    info: dict[str, object] = {
        "state": run_dir,
        "sources": runs[-1]["sources"] if runs else [],
        "store": runs[-1]["store"] if runs else "",
        "blocks_stored": len(blocks),
        "bytes_stored": sum(sum(p[6] for p in b["pieces"]) for b in blocks),
        "last_checkpoint": os.stat(journal).st_mtime if os.path.exists(journal) else None,
        "finished": done[-1] if done and work[-1]["t"] == "done" else None,
        "failed": work[-1] if work and work[-1]["t"] == "failed" else None,
        "collection": {"uuid": saved[-1]["uuid"], "pdh": saved[-1]["pdh"]} if saved else None,
        "save_pending": bool(records) and records[-1]["t"] == "save",
        "torn_tail": torn,
        "locked": is_locked(lock),
    }
    if info["locked"]:
        info["holder"] = describe_holder(lock)
    return info


def _when(ts: object) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if isinstance(ts, float) else "never"


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args, {"state.dir": (args.state_dir, "--state-dir")})
    runs_dir = os.path.join(settings.state_dir, "runs")
    names = sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []
    infos = [describe_run(os.path.join(runs_dir, n)) for n in names]
    infos.sort(key=lambda i: i["last_checkpoint"] or 0, reverse=True)
    for info in infos:
        if args.json:
            print(json.dumps(info))
            continue
        finished, failed = info["finished"], info["failed"]
        status = (f"running: {info['holder']}" if info["locked"]
                  else "uploaded; the collection's save was interrupted: run the same command again"
                  if info["save_pending"]
                  else f"finished, portable data hash {finished['pdh']}" if finished
                  else f"failed (exit {failed['exit']}): {failed['error'].splitlines()[0]}" if failed
                  else "stopped before the end (interrupted or killed): run the same command again to resume")
        collection = f"  collection:      {info['collection']['uuid']}\n" if info["collection"] else ""
        print(f"{' '.join(info['sources'])}\n"
              f"  store:           {info['store']}\n"
              f"  journaled:       {plural(info['blocks_stored'], 'block')}, "
              f"{plural(info['bytes_stored'], 'byte')}\n"
              f"  last checkpoint: {_when(info['last_checkpoint'])}\n"
              f"  status:          {status}\n"
              f"{collection}"
              f"  state:           {info['state']}")
    if not infos and not args.json:
        print(f"no runs in {settings.state_dir}", file=sys.stderr)
    return EXIT_OK
