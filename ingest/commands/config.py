"""``keep-ingest config show``: the effective settings and where each came from."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import TYPE_CHECKING

from ingest.commands.common import add_store_arguments, settings_from
from ingest.errors import EXIT_OK

if TYPE_CHECKING:
    from ingest.config import Settings

SECRETS = {"store.token"}


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "config", parents=[common], help="show the effective settings",
        description="Show every setting with its effective value and where it came from: "
                    "a flag, an environment variable, the profile file, or the default. "
                    "Precedence: flags, then environment, then profile, then defaults. "
                    "Secrets (the API token) are redacted.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", parents=[common], help="print the effective settings")
    add_store_arguments(show)
    show.add_argument("--json", action="store_true", help="one JSON object: key -> {value, origin}")
    show.set_defaults(func=run)


def _resolved(settings: Settings) -> dict[str, tuple[object, str]]:
    """The settings whose value stands for something else (an empty path is the
    per-user default, "auto" a count): ``{key: (value shown, what it stands for)}``."""
    out: dict[str, tuple[object, str]] = {
        "store.path": (settings.store_path, "" if settings.store.path else "$XDG_DATA_HOME/keep-ingest/store"),
        "state.dir": (settings.state_dir, "" if settings.state.dir else "$XDG_STATE_HOME/keep-ingest"),
        "put.workers": (settings.put.workers, f"{settings.local_worker_count} local workers, one per CPU"
                        if settings.put.workers == "auto" else ""),
        "put.listen": (settings.put.listen, "" if settings.put.listen else "a private socket: local workers only"),
        "put.progress_file": (os.path.abspath(os.path.expanduser(settings.put.progress_file)), "")
        if settings.put.progress_file else ("", "stderr"),
    }
    if settings.store.type != "directory":
        out["store.path"] = (settings.store.path, 'unused: store.type is "keep"')
    return out


def effective(settings: Settings) -> dict[str, tuple[object, str, str]]:
    """Every setting as ``{"section.key": (value, origin, note)}``, secrets redacted;
    paths shown resolved, the note saying what an empty or "auto" value stands for;
    last, ``md5``: the MD5 engine of this host (see ingest.md5lanes)."""
    from ingest import md5lanes
    from ingest.config import sections

    out: dict[str, tuple[object, str, str]] = {}
    resolved = _resolved(settings)
    for section in sections():
        for f in dataclasses.fields(getattr(settings, section)):
            key = f"{section}.{f.name}"
            value, note = resolved.get(key, (getattr(getattr(settings, section), f.name), ""))
            if key in SECRETS and value:
                value = "<redacted>"
            out[key] = (value, settings.origin(key), note)
    engine = md5lanes.engine()
    out["md5"] = (engine.name, engine.origin, engine.lanes_text)
    return out


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    rows = effective(settings)
    if args.json:
        print(json.dumps({k: {"value": v, "origin": o, **({"note": n} if n else {})}
                          for k, (v, o, n) in rows.items()}))
        return EXIT_OK
    width = max(len(f"{k} = {json.dumps(v)}") for k, (v, _, _) in rows.items())
    for key, (value, origin, note) in rows.items():
        line = f"{key} = {json.dumps(value)}"
        print(f"{line.ljust(width)}  # {origin}{f' ({note})' if note else ''}")
    return EXIT_OK
