"""``put``'s collection flags (arv-put's names) and what they turn into.

With an Arvados API host configured (``ARVADOS_API_HOST`` or settings.conf), ``put``
uploads into that cluster and saves a collection (see ingest.save); these flags say
which and how.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ingest.errors import UsageError

if TYPE_CHECKING:
    from ingest.config import Settings
    from ingest.save import CollectionSaver, SavedCollection


def _classes(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more storage class names, comma-separated")
    return sorted(set(names))


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days, not {text!r}") from None
    if days < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 day, not {days}")
    return days


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def add_collection_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "Arvados cluster (with ARVADOS_API_HOST and ARVADOS_API_TOKEN set, or settings.conf): "
        "a collection is saved and its uuid printed")
    g.add_argument("--stream", "--as-stream", action="store_true",
                   help="print the manifest and save no collection (without a cluster: always)")
    g.add_argument("--manifest", "--as-manifest", "--in-manifest", action="store_true",
                   help="save a collection and print its uuid (the default with a cluster)")
    g.add_argument("--normalize", action="store_true",
                   help="accepted for arv-put's sake: the manifest is always normalized")
    g.add_argument("--batch", action="store_true",
                   help="accepted for arv-put's sake: checkpoints are never fatal (blocks whose "
                        "signatures expire are simply stored again)")
    g.add_argument("--silent", dest="quiet", action="count",
                   help="as -q: only errors (the uuid or manifest is still printed)")
    g.add_argument("--name", metavar="NAME",
                   help="collection name (default: 'Saved at <UTC time> by user@host'; made unique)")
    g.add_argument("--project-uuid", metavar="UUID",
                   help="the project (or user) that owns the new collection (default: the token's user)")
    g.add_argument("--update-collection", metavar="UUID",
                   help="add files missing from this collection and replace those that differ, "
                        "instead of creating one")
    g.add_argument("--storage-classes", type=_classes, metavar="A,B",
                   help="storage classes for the blocks (X-Keep-Storage-Classes, checked in each "
                        "answer) and the collection (default: the cluster's default classes)")
    trash = g.add_mutually_exclusive_group()
    trash.add_argument("--trash-at", metavar="YYYY-MM-DD[THH:MM[:SS][+ZZ:ZZ]]",
                       help="when the collection goes to the trash (a date alone: 23:59:59; no zone: local time)")
    trash.add_argument("--trash-after", type=_days, metavar="DAYS",
                       help="the collection goes to the trash DAYS days after it is saved")
    g.add_argument("--retries", type=_count, metavar="N",
                   help="retries of a temporary failure, for the API and for Keep (default 3)")


def collection_overrides(args: argparse.Namespace) -> dict[str, tuple[Any, str]]:
    """The settings these flags give."""
    return {
        "store.storage_classes": (args.storage_classes, "--storage-classes"),
        "store.retries": (args.retries, "--retries"),
        "api.retries": (args.retries, "--retries"),
    }


def open_saver(args: argparse.Namespace, settings: Settings) -> CollectionSaver | None:
    """Check the flags; with a cluster, find it (before any worker starts) and, unless
    ``--stream`` or ``--dry-run``, prepare the save. None without a saver."""
    asked = [flag for flag, value in (("--name", args.name), ("--project-uuid", args.project_uuid),
                                      ("--update-collection", args.update_collection),
                                      ("--trash-at", args.trash_at), ("--trash-after", args.trash_after))
             if value is not None]
    if asked and not settings.uses_cluster:
        raise UsageError(f"{', '.join(asked)}: saving a collection needs an Arvados cluster: set "
                         "ARVADOS_API_HOST and ARVADOS_API_TOKEN (or ~/.config/arvados/settings.conf)")
    if asked and args.stream:
        raise UsageError(f"{', '.join(asked)}: --stream saves no collection")
    if args.name is not None and args.update_collection:
        raise UsageError("--name cannot be used with --update-collection (the collection keeps its name)")
    if args.project_uuid and args.update_collection:
        raise UsageError("--project-uuid cannot be used with --update-collection")
    if not settings.uses_cluster:
        return None
    from ingest.save import CollectionSaver, SaveOptions, connect, parse_trash_at

    trash_at = parse_trash_at(args.trash_at) if args.trash_at else None
    client, cluster = connect(settings)
    if args.stream or args.dry_run:
        client.close()
        return None
    options = SaveOptions(
        name=args.name, project_uuid=args.project_uuid, update_uuid=args.update_collection,
        trash_at=trash_at, trash_after_days=args.trash_after,
        replication_desired=args.replication,
        storage_classes_desired=list(args.storage_classes or []))
    saver = CollectionSaver(settings, client, cluster, options)
    try:
        saver.prepare()
    except BaseException:
        client.close()
        raise
    return saver


def describe_saved(saved: SavedCollection) -> str:
    """Short lines for the summary (under 80 columns, the collection's name aside)."""
    what = (f"collection {saved.uuid} updated\n  {saved.changed_paths} file(s) new or replaced" if saved.updated
            else f"collection {saved.uuid} saved as {saved.name!r}\n  in {saved.owner_uuid}")
    return f"keep-ingest: {what}\n  API server's portable data hash {saved.pdh}"


def saved_json(saved: SavedCollection | None) -> dict[str, Any] | None:
    if saved is None:
        return None
    return {"uuid": saved.uuid, "name": saved.name, "portable_data_hash": saved.pdh,
            "owner_uuid": saved.owner_uuid, "updated": saved.updated, "changed_paths": saved.changed_paths}
