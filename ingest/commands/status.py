"""``keep-ingest status``: the runs in the state directory and what they have stored."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

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
    import msgpack

    from ingest.journal import Frames
    from ingest.keep.locator import Locator
    from ingest.state import describe_holder, is_locked

    journal = os.path.join(run_dir, "journal")
    lock = os.path.join(run_dir, "lock")
    frames = Frames(journal)
    blocks = stored = 0
    last: dict[str, dict[str, Any]] = {}   # kind -> its last record
    last_work: dict[str, Any] | None = None  # the last but for saves (a save follows its run's "done")
    final: dict[str, Any] | None = None
    for _, payload in frames:   # one record at a time: a journal may hold millions of rows
        final = msgpack.unpackb(payload)
        if final["t"] == "block":
            blocks += 1
            stored += Locator.parse(final["loc"]).size
        last[final["t"]] = final
        if final["t"] not in ("save", "saved"):
            last_work = final
    runs, done, saved = last.get("run"), last.get("done"), last.get("saved")
    info: dict[str, object] = {
        "state": run_dir,
        "sources": runs["sources"] if runs else [],
        "store": runs["store"] if runs else "",
        "blocks_stored": blocks,
        "bytes_stored": stored,
        "last_checkpoint": os.stat(journal).st_mtime if os.path.exists(journal) else None,
        "finished": done if done and last_work["t"] == "done" else None,
        "failed": last_work if last_work and last_work["t"] == "failed" else None,
        "collection": {"uuid": saved["uuid"], "pdh": saved["pdh"]} if saved else None,
        "save_pending": final is not None and final["t"] == "save",
        "torn_tail": frames.torn,
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
