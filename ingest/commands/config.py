"""``keep-ingest config show``: the effective settings and where each came from."""

from __future__ import annotations

import argparse
import dataclasses
import json
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


def effective(settings: Settings) -> dict[str, tuple[object, str]]:
    """Every setting as ``{"section.key": (value, origin)}``, secrets redacted."""
    from ingest.config import sections

    out: dict[str, tuple[object, str]] = {}
    for section in sections():
        for f in dataclasses.fields(getattr(settings, section)):
            key = f"{section}.{f.name}"
            value = getattr(getattr(settings, section), f.name)
            if key in SECRETS and value:
                value = "<redacted>"
            out[key] = (value, settings.origin(key))
    return out


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    rows = effective(settings)
    if args.json:
        print(json.dumps({k: {"value": v, "origin": o} for k, (v, o) in rows.items()}))
        return EXIT_OK
    width = max(len(f"{k} = {json.dumps(v)}") for k, (v, _) in rows.items())
    for key, (value, origin) in rows.items():
        line = f"{key} = {json.dumps(value)}"
        print(f"{line.ljust(width)}  # {origin}")
    return EXIT_OK
