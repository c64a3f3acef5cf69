"""Users, projects and collections through the API (the calls arv-put makes, and a lookup)."""

from __future__ import annotations

import re
from typing import Any

from ingest.arvados.client import ApiClient
from ingest.errors import EXIT_USAGE, ApiError, UsageError

USER_UUID_RE = re.compile(r"[a-z0-9]{5}-tpzed-[a-z0-9]{15}")
GROUP_UUID_RE = re.compile(r"[a-z0-9]{5}-j7d0g-[a-z0-9]{15}")
COLLECTION_UUID_RE = re.compile(r"[a-z0-9]{5}-4zz18-[a-z0-9]{15}")


def _record(answer: Any, what: str, host: str) -> dict[str, Any]:
    if not isinstance(answer, dict) or not isinstance(answer.get("uuid"), str):
        raise ApiError(f"Arvados API server {host}: {what}: the answer is not a record with a uuid")
    return answer


def current_user(client: ApiClient) -> dict[str, Any]:
    """The user the token belongs to (``users/current``)."""
    return _record(client.get("users/current"), "users/current", client.host)


def owner_uuid(client: ApiClient, project_uuid: str | None) -> str:
    """Where a new collection goes: the project (or user) given, checked to exist,
    else the token's user (arv-put's ``desired_project_uuid``)."""
    if not project_uuid:
        return current_user(client)["uuid"]
    if USER_UUID_RE.fullmatch(project_uuid):
        path = f"users/{project_uuid}"
    elif GROUP_UUID_RE.fullmatch(project_uuid):
        path = f"groups/{project_uuid}"
    else:
        raise UsageError(f"--project-uuid {project_uuid!r}: not a project (xxxxx-j7d0g-...) or "
                         "user (xxxxx-tpzed-...) uuid")
    try:
        return _record(client.get(path), path, client.host)["uuid"]
    except ApiError as exc:
        if exc.status == 404:
            raise ApiError(f"--project-uuid {project_uuid}: no such project on {client.host}, or not "
                           f"readable with this token (HTTP 404)", 404, exc.errors) from None
        raise


def check_collection_uuid(uuid: str, flag: str) -> str:
    if not COLLECTION_UUID_RE.fullmatch(uuid):
        raise ApiError(f"{flag} {uuid!r}: not a collection uuid (xxxxx-4zz18-...)", exit_code=EXIT_USAGE)
    return uuid


def get_collection(client: ApiClient, uuid: str) -> dict[str, Any]:
    """A collection record, its manifest signed for this token."""
    try:
        record = _record(client.get(f"collections/{uuid}"), f"collections/{uuid}", client.host)
    except ApiError as exc:
        if exc.status == 404:
            raise ApiError(f"collection {uuid}: not found on {client.host}, or not readable with this "
                           f"token (HTTP 404)", 404, exc.errors) from None
        raise
    if not isinstance(record.get("manifest_text"), str):
        raise ApiError(f"Arvados API server {client.host}: collection {uuid} has no manifest_text")
    return record


def find_collections(client: ApiClient, filters: list[list[Any]]) -> list[dict[str, Any]]:
    """Collections matching ``filters`` (uuid and portable data hash only)."""
    answer = client.get("collections", {"filters": filters, "select": ["uuid", "portable_data_hash", "name"],
                                        "limit": 10, "count": "none"})
    items = answer.get("items") if isinstance(answer, dict) else None
    if not isinstance(items, list):
        raise ApiError(f"Arvados API server {client.host}: collections list gave no items")
    return [_record(i, "collections list", client.host) for i in items]


def create_collection(client: ApiClient, attrs: dict[str, Any]) -> dict[str, Any]:
    """``POST collections?ensure_unique_name=true`` (sent once; see ingest.save)."""
    return _record(client.send("POST", "collections", {"collection": attrs}, {"ensure_unique_name": "true"}),
                   "collections create", client.host)


def update_collection(client: ApiClient, uuid: str, attrs: dict[str, Any]) -> dict[str, Any]:
    """``PUT collections/UUID`` with new attributes."""
    return _record(client.send("PUT", f"collections/{uuid}", {"collection": attrs}, retry=True),
                   f"collections update {uuid}", client.host)
