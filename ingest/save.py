"""Saving a run into an Arvados cluster: found before the run, checked once planned,
saved (and journaled) once every block is stored.

Before the run (:func:`connect`), in the coordinator process before any worker
starts: discovery, the Keep services, the cluster's default replication and storage
classes, all folded into the settings, so the store spec the workers get names the
services; then (:meth:`CollectionSaver.prepare`) the owner (``users/current`` or
the project given) or the collection to update.

Before a byte is uploaded (:meth:`CollectionSaver.planned`), ``put`` walks the tree
once and assembles its manifest with stand-in locators of the real length (every
signature has the same length): the request that will save it is measured, and
refused when it would exceed the cluster's ``maxRequestSize``.

Once every block is stored (:meth:`CollectionSaver.finished`), under the run's lock:
a ``save`` record goes into the journal, then the collection is created
(``ensure_unique_name``) with a ``keep_ingest_run`` property, or updated; then a
``saved`` record with its uuid and portable data hash. A run that finds a ``save``
without its ``saved`` (killed, or the answer lost) looks the collection up by that
property before creating one, so a save is never done twice; a create that fails
in a way that may have happened is looked up the same way before it is retried.
"""

from __future__ import annotations

import datetime
import getpass
import logging
import random
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from ingest.arvados.client import TEMPORARY_STATUSES, ApiClient, check_host
from ingest.arvados.cluster import Cluster, discover
from ingest.arvados.collections import (
    check_collection_uuid,
    create_collection,
    find_collections,
    get_collection,
    owner_uuid,
    update_collection,
)
from ingest.assemble import ManifestText
from ingest.config import Settings
from ingest.errors import ApiError, ConfigError, IngestError
from ingest.journal import JournalWriter
from ingest.manifest import Manifest, ManifestError, parse_manifest
from ingest.plan import BlockPlan
from ingest.put import PutResult
from ingest.state import ResumeIndex

log = logging.getLogger(__name__)

RUN_PROPERTY = "keep_ingest_run"
_STAND_IN_SIGNATURE = "+A" + "0" * 40 + "@" + "0" * 8


def connect(settings: Settings) -> tuple[ApiClient, Cluster]:
    """Find the cluster's services, replication and storage classes and put them
    into ``settings`` (flags and profiles still win)."""
    if not settings.store.token:
        raise ConfigError(f"{settings.origin('api.host')}: an Arvados API host needs a token: set "
                          "ARVADOS_API_TOKEN (or put it in ~/.config/arvados/settings.conf)")
    host = check_host(settings.api.host, settings.origin("api.host"))
    client = ApiClient(host, settings.store.token, insecure=settings.api.insecure, retries=settings.api.retries,
                       backoff_start=settings.api.backoff_start, connect_timeout=settings.api.connect_timeout)
    try:
        cluster = discover(client, settings.store.services, settings.store.service_type)
    except BaseException:
        client.close()
        raise
    settings.store.services = [s.root for s in cluster.services]
    settings.keep_services = [(s.root, s.uuid, s.service_type) for s in cluster.services]
    if settings.origin("store.replication") == "default":
        settings.store.replication = cluster.default_replication
        settings.origins["store.replication"] = f"cluster {host} (defaultCollectionReplication)"
    if settings.origin("store.storage_classes") == "default":
        settings.store.storage_classes = list(cluster.default_storage_classes)
        settings.origins["store.storage_classes"] = f"cluster {host} (StorageClasses marked Default)"
    log.info("%s", cluster.describe())
    return client, cluster


def default_name() -> str:
    """arv-put's default collection name."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"Saved at {now} by {getpass.getuser()}@{socket.gethostname()}"


def parse_trash_at(text: str, now: datetime.datetime | None = None) -> datetime.datetime:
    """arv-put's ``--trash-at``: ISO 8601, a date alone meaning 23:59:59, no zone
    meaning local time; it must be in the future. Returned in UTC."""
    value = text.strip()
    if len(value) in (8, 10) and value.replace("-", "").isdigit():
        value += "T23:59:59"
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"--trash-at {text!r}: expected a date and time such as 2027-01-31, "
                          "2027-01-31T18:00 or 2027-01-31T18:00:00+01:00") from None
    if when.tzinfo is None:
        when = when.astimezone()   # local time, as arv-put reads it
    when = when.astimezone(datetime.UTC)
    if when <= (now or datetime.datetime.now(datetime.UTC)):
        raise ConfigError(f"--trash-at {text!r}: must be in the future")
    return when


def api_time(when: datetime.datetime) -> str:
    """A UTC time as the SDK sends it (``%Y-%m-%dT%H:%M:%S.%fZ``)."""
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class SaveOptions:
    """What the user asked of the collection (arv-put's flags)."""

    name: str | None = None
    project_uuid: str | None = None
    update_uuid: str | None = None
    trash_at: datetime.datetime | None = None
    trash_after_days: int | None = None
    replication_desired: int | None = None
    storage_classes_desired: list[str] = field(default_factory=list)

    def trash_time(self) -> datetime.datetime | None:
        if self.trash_after_days is not None:
            return datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=self.trash_after_days)
        return self.trash_at


@dataclass(frozen=True)
class SavedCollection:
    uuid: str
    name: str
    pdh: str
    owner_uuid: str
    updated: bool                 # --update-collection
    changed_paths: int            # files new or replaced in the collection


def overlay(base: Manifest, top: Manifest) -> tuple[Manifest, int]:
    """``top``'s files and directories over ``base`` (arv-put's --update-collection:
    files missing there are added, files that differ replaced, the rest kept);
    returns the merged tree and how many of ``top``'s files are new or changed.
    Where the two disagree on what a path is (a file here, a directory there), ``top`` wins."""
    merged = Manifest()
    for path in top.directories():
        merged.add_dir(path)
    changed = 0
    for path, segments in top.files():
        merged.add_file(path, segments)
        before = base.find(path) if not base.is_dir(path) else None
        if before is None or _portable(before) != _portable(segments):
            changed += 1
    for path, segments in base.files():
        if merged.find(path) is None:
            try:
                merged.add_file(path, segments)
            except ManifestError:
                pass   # a directory (or under a file) in top
    for path in base.directories():
        try:
            merged.add_dir(path)
        except ManifestError:
            pass
    return merged, changed


def _portable(segments: list[Any]) -> list[tuple[str, int, int]]:
    return [(s.locator.split("+A")[0], s.offset, s.length) for s in segments]


class CollectionSaver:
    """The cluster side of a ``put``: passed to ``run_put`` as its hooks."""

    def __init__(self, settings: Settings, client: ApiClient, cluster: Cluster, options: SaveOptions):
        self.settings = settings
        self.client = client
        self.cluster = cluster
        self.options = options
        self.owner = ""
        self.base: Manifest | None = None    # the collection to update, as read before the run
        self.saved: SavedCollection | None = None

    def prepare(self) -> None:
        """Check the owner or the collection to update, before anything is uploaded."""
        if self.options.update_uuid:
            record = get_collection(self.client, check_collection_uuid(self.options.update_uuid,
                                                                       "--update-collection"))
            self.base = self._parse(record)
        else:
            self.owner = owner_uuid(self.client, self.options.project_uuid)

    def _parse(self, record: dict[str, Any]) -> Manifest:
        try:
            return parse_manifest(record["manifest_text"])
        except ManifestError as exc:
            raise ApiError(f"collection {record['uuid']}: the manifest the server returned cannot be "
                           f"read: {exc}") from None

    # ---- RunHooks

    def stand_in(self, block: BlockPlan) -> str:
        """A distinct stand-in for a block's signed locator, of the same length: the
        manifest's real text is as long, or shorter when blocks repeat."""
        return f"{block.index:032x}+{block.size}{_STAND_IN_SIGNATURE}"

    def planned(self, manifest: ManifestText, files: int, blocks: int) -> None:
        text = manifest.text() if self.base is None else overlay(self.base, manifest.parse())[0].text()
        size = self.client.body_size(self._body(text, "0" * 32))
        limit = self.cluster.max_request_size
        if size > limit:
            raise IngestError(
                f"the collection's manifest would take {size:,} bytes to save ({files:,} files in "
                f"{blocks:,} blocks), over the cluster's limit of {limit:,} bytes (maxRequestSize "
                f"of {self.cluster.host}); nothing was uploaded. Split the tree into several runs, e.g. one "
                f"per subdirectory, each saved as its own collection")

    def finished(self, result: PutResult, journal: JournalWriter, index: ResumeIndex) -> None:
        if self.options.update_uuid:
            self.saved = self._update(result, journal)
        else:
            self.saved = self._create(result, journal, index)

    # ---- saving

    def _body(self, text: str, run_id: str) -> dict[str, Any]:
        """The create request, as sent."""
        attrs: dict[str, Any] = {"manifest_text": text, "name": self.options.name or default_name(),
                                 "owner_uuid": self.owner or "x" * 27,
                                 "replication_desired": self.options.replication_desired,
                                 "properties": {RUN_PROPERTY: run_id}}
        if self.options.storage_classes_desired:
            attrs["storage_classes_desired"] = self.options.storage_classes_desired
        trash = self.options.trash_time()
        if trash is not None:
            attrs["trash_at"] = api_time(trash)
        return {"collection": attrs}

    def _check_size(self, body: dict[str, Any]) -> None:
        size = self.client.body_size(body)
        if size > self.cluster.max_request_size:
            raise IngestError(f"the collection's manifest takes {size:,} bytes to save, over the cluster's "
                              f"limit of {self.cluster.max_request_size:,} bytes (maxRequestSize of "
                              f"{self.cluster.host}); every block is stored and checkpointed: split the tree "
                              f"into several runs, each saved as its own collection")

    def _create(self, result: PutResult, journal: JournalWriter, index: ResumeIndex) -> SavedCollection:
        pending = _pending_create(index.saves)
        run_id = pending["rid"] if pending else secrets.token_hex(16)
        text = result.manifest.text()
        body = self._body(text, run_id)
        self._check_size(body)
        journal.append({"t": "save", "rid": run_id, "target": None, "pdh": result.pdh, "at": time.time()})
        journal.sync()
        record = None
        if pending:
            record = self._find(run_id)
            if record is not None:
                log.info("collection %s was created by the interrupted run; not creating another", record["uuid"])
                if record.get("portable_data_hash") != result.pdh:
                    record = update_collection(self.client, record["uuid"], {"manifest_text": text})
        tries = 0
        while record is None:
            try:
                record = create_collection(self.client, body["collection"])
            except ApiError as exc:
                if exc.status is not None and exc.status not in TEMPORARY_STATUSES:
                    raise
                tries += 1
                if tries > self.client.retries:
                    raise
                log.warning("%s; looking the collection up before trying again", exc)
                time.sleep(random.uniform(0.5, 1.0) * self.client.backoff_start * 2 ** (tries - 1))
                record = self._find(run_id)
        return self._finish(record, result.pdh, run_id, journal, updated=False, changed=result.files)

    def _update(self, result: PutResult, journal: JournalWriter) -> SavedCollection:
        uuid = self.options.update_uuid
        assert uuid is not None
        base = self._parse(get_collection(self.client, uuid))   # as it is now, not as before the run
        merged, changed = overlay(base, result.manifest.parse())
        text, pdh = merged.text_and_pdh()
        attrs: dict[str, Any] = {"manifest_text": text}
        trash = self.options.trash_time()
        if trash is not None:
            attrs["trash_at"] = api_time(trash)
        if self.options.replication_desired is not None:
            attrs["replication_desired"] = self.options.replication_desired
        if self.options.storage_classes_desired:
            attrs["storage_classes_desired"] = self.options.storage_classes_desired
        self._check_size({"collection": attrs})
        run_id = secrets.token_hex(16)
        journal.append({"t": "save", "rid": run_id, "target": uuid, "pdh": pdh, "at": time.time()})
        journal.sync()
        record = update_collection(self.client, uuid, attrs)
        return self._finish(record, pdh, run_id, journal, updated=True, changed=changed)

    def _find(self, run_id: str) -> dict[str, Any] | None:
        found = find_collections(self.client, [[f"properties.{RUN_PROPERTY}", "=", run_id]])
        return found[0] if found else None

    def _finish(self, record: dict[str, Any], pdh: str, run_id: str, journal: JournalWriter, *,
                updated: bool, changed: int) -> SavedCollection:
        theirs = record.get("portable_data_hash")
        if theirs != pdh:
            raise ApiError(f"collection {record['uuid']}: the API server computed the portable data hash "
                           f"{theirs}, not {pdh} as this run did; the collection is not what was uploaded")
        journal.append({"t": "saved", "rid": run_id, "uuid": record["uuid"], "pdh": pdh, "at": time.time()})
        journal.sync()
        return SavedCollection(record["uuid"], str(record.get("name") or ""), pdh,
                               str(record.get("owner_uuid") or self.owner), updated, changed)


def _pending_create(saves: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last create the journal started and did not see finish, if any."""
    done = {r["rid"] for r in saves if r.get("t") == "saved"}
    for record in reversed(saves):
        if record.get("t") == "save" and record.get("target") is None:
            return None if record["rid"] in done else record
    return None
