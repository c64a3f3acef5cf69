"""Command-line options shared by subcommands: the profile and the block store."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingest.config import Settings


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, and ``--store DIR`` or ``--keep URL...`` with ``--replication``."""
    parser.add_argument("--config", metavar="FILE", help="TOML profile (see configs/)")
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--store", metavar="DIR",
                       help="directory block store (default: $XDG_DATA_HOME/keep-ingest/store)")
    store.add_argument("--keep", action="append", metavar="URL",
                       help="Keep service URL (repeatable; see also $ARVADOS_KEEP_SERVICES)")
    parser.add_argument("--replication", type=int, metavar="N",
                        help="copies of each block, on distinct Keep services (default 2)")


def add_walk_arguments(parser: argparse.ArgumentParser) -> None:
    """``--exclude PATTERN`` and ``--follow-links``/``--no-follow-links``, as arv-put has them."""
    parser.add_argument("--exclude", action="append", metavar="PATTERN",
                        help="leave out files and directories matching PATTERN (repeatable; arv-put's "
                             "rules: '*.tmp' matches a name anywhere, 'sub/*.log' a path)")
    links = parser.add_mutually_exclusive_group()
    links.add_argument("--follow-links", dest="follow_links", action="store_true", default=None,
                       help="follow symlinks (default), skipping loops")
    links.add_argument("--no-follow-links", dest="follow_links", action="store_false",
                       help="leave out every symlink")


def store_overrides(args: argparse.Namespace) -> dict[str, tuple[Any, str]]:
    """The settings the store flags give, as ``{key: (value or None, flag)}``.

    Commands without store flags (e.g. ``status``) simply give none.
    """
    store, keep = getattr(args, "store", None), getattr(args, "keep", None)
    return {
        "store.type": ("directory" if store else "keep" if keep else None,
                       "--store" if store else "--keep"),
        "store.path": (store, "--store"),
        "store.services": (keep, "--keep"),
        "store.replication": (getattr(args, "replication", None), "--replication"),
    }


def settings_from(args: argparse.Namespace, overrides: dict[str, tuple[Any, str]] | None = None) -> Settings:
    """Validated settings for a command: profile, environment, store flags, then ``overrides``."""
    # Imported when a command runs, not when the parser is built: keeps start-up cheap for every command.
    from ingest.config import load_settings

    return load_settings(args.config, {**store_overrides(args), **(overrides or {})})
