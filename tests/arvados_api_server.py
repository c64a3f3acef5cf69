"""A contract-faithful Arvados API server for tests: aiohttp over TLS on 127.0.0.1.

No Arvados API server can be installed here, so this one is built from the
upstream sources (services/api/app/models/collection.rb, blob.rb,
arvados_model.rb, application_controller.rb; lib/controller/router/request.go and
localdb/collection.go; sdk/python/arvados-v1-discovery.json for the discovery
document's shape) and written independently of keep-ingest's own code, so that it
catches a client that gets the contract wrong:

* ``GET /discovery/v1/apis/arvados/v1/rest``: the discovery document, shaped like
  the SDK's (resources, methods, parameters, schemas) plus ``rootUrl``,
  ``baseUrl``, ``servicePath``, ``defaultCollectionReplication``,
  ``blobSignatureTtl``, ``maxRequestSize``, ``uuidPrefix``;
* ``GET config``, ``users/current``, ``users/UUID``, ``groups/UUID``,
  ``keep_services/accessible`` (pointing at real ``keep-ingest keepstore``
  processes that share this server's blob signing key and TTL);
* ``collections`` create, get, update and list. Create and update check every
  locator's ``+A`` signature against the key **and the caller's token** (403 for a
  missing, bad or expired one; the empty block needs none), strip signatures,
  compute the portable data hash the Rails way (locators reduced to ``md5+size``,
  no reordering), enforce (owner, name) uniqueness (422, or with
  ``ensure_unique_name`` the name gets `` (<uuid tail>)``), and refuse a body over
  ``maxRequestSize`` (413). Answers sign the manifest for the caller's token with
  expiry min(now + TTL, trash_at). Errors are ``{"errors": [...], "error_token"}``
  with the request id appended to each message, as the API server writes them.

Parameters are read as the controller reads them: the query string, then a JSON
body, whose attributes may be wrapped in ``{"collection": {...}}`` or not.

The server runs in a thread of the test process (:class:`ApiServer`), so tests can
look at and steer its state: ``collections``, ``requests`` (method, path, status),
``max_request_size``, and ``hold_create`` (pause a create before or after the
record is made, to kill a client in the middle of a save).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import json
import re
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PREFIX = "zzzzz"
SIGNING_KEY = "api-test-blob-signing-key-0123456789abcdefghijklmnopqrstuv"
SIGNING_TTL = 1209600
USER_TOKEN = "v2/zzzzz-gj3su-000000000000001/api-test-user-secret-0123456789"
OTHER_TOKEN = "v2/zzzzz-gj3su-000000000000002/api-test-other-secret-0123456789"
USER_UUID = f"{PREFIX}-tpzed-000000000000001"
OTHER_UUID = f"{PREFIX}-tpzed-000000000000002"
PROJECT_UUID = f"{PREFIX}-j7d0g-000000000000001"
EMPTY_MD5 = "d41d8cd98f00b204e9800998ecf8427e"

# Keep::Locator::LOCATOR_REGEXP (sdk/ruby): hash, optional size, hints.
LOCATOR_RE = re.compile(r"^([0-9a-f]{32})(\+[0-9]+)?(\+[^+]*)*$")
SIGNED_RE = re.compile(
    r"^([0-9a-fA-F]{32})(\+[0-9]+)?((\+[B-Z][A-Za-z0-9@_-]*)*)(\+A([0-9a-fA-F]{40})@([0-9a-fA-F]{8}))"
    r"((\+[B-Z][A-Za-z0-9@_-]*)*)$")
FILE_TOKEN_RE = re.compile(r"^[0-9]+:[0-9]+:")


class ApiFailure(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def sign(md5: str, token: str, expiry: int) -> str:
    """Blob.sign_locator: +A<hmac-sha1>@<expiry hex>."""
    expiry_hex = f"{expiry:08x}"
    msg = f"{md5}@{token}@{expiry_hex}@{SIGNING_TTL:x}".encode()
    return f"+A{hmac.new(SIGNING_KEY.encode(), msg, hashlib.sha1).hexdigest()}@{expiry_hex}"


def check_signature(tok: str, token: str, now: float) -> str | None:
    """None if ``tok`` is a locator this token may save, else why not (Collection#check_signatures)."""
    m = SIGNED_RE.match(tok)
    if m:
        expiry = int(m.group(7), 16)
        if expiry < now:
            return "Signature expiry time has passed."
        if not hmac.compare_digest(sign(m.group(1), token, expiry)[2:42], m.group(6).lower()):
            return "Signature is invalid."
        return None
    if re.search(r"\+A", tok):
        return "Signature is invalid."
    if tok.startswith(EMPTY_MD5):
        return None
    return "No signature provided."


def munge_locators(manifest: str, fn) -> str:
    """Collection.munge_manifest_locators: every locator word replaced by fn(match)."""
    if manifest == "":
        return ""
    lines = []
    for line in manifest.splitlines():
        words = []
        for word in line.rstrip().split(" "):
            m = LOCATOR_RE.match(word) if words else None
            words.append(fn(m) if m else word)
        lines.append(" ".join(words))
    return "\n".join(lines) + "\n"


def portable_data_hash(manifest: str) -> str:
    """Collection#compute_pdh: md5 of the text with each locator reduced to md5+size."""
    portable = munge_locators(manifest, lambda m: m.group(1) + (m.group(2) or ""))
    data = portable.encode()
    return f"{hashlib.md5(data).hexdigest()}+{len(data)}"


def validate_manifest(manifest: str) -> None:
    """The parts of Keep::Manifest.validate! a client can get wrong."""
    if manifest and not manifest.endswith("\n"):
        raise ApiFailure(422, "Manifest text Invalid manifest: does not end with newline")
    for n, line in enumerate(manifest.splitlines(), 1):
        words = line.split(" ")
        if not (words[0] == "." or words[0].startswith("./")) or len(words) < 3:
            raise ApiFailure(422, f"Manifest text Invalid manifest: invalid stream name or too few tokens on line {n}")
        i = 1
        while i < len(words) and LOCATOR_RE.match(words[i]):
            i += 1
        if i == 1 or i == len(words) or not all(FILE_TOKEN_RE.match(w) for w in words[i:]):
            raise ApiFailure(422, f"Manifest text Invalid manifest: invalid locator or file token on line {n}")


def _ts(t: float | None = None) -> str:
    return datetime.datetime.fromtimestamp(time.time() if t is None else t, datetime.UTC) \
        .strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_ts(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _random_uuid(kind: str) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return f"{PREFIX}-{kind}-" + "".join(secrets.choice(alphabet) for _ in range(15))


# ---- the discovery document

def _method(resource: str, name: str, path: str, http: str, params: dict[str, Any] | None = None,
            request: str | None = None, response: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": f"arvados.{resource}.{name}", "path": path, "httpMethod": http,
                           "description": f"{name} {resource}", "parameters": params or {},
                           "scopes": ["https://api.arvados.org/auth/arvados"]}
    order = [k for k, v in doc["parameters"].items() if v.get("location") == "path"]
    if order:
        doc["parameterOrder"] = order
    if request:
        doc["request"] = {"required": True, "properties": {request.lower(): {"$ref": request}}}
    doc["response"] = {"$ref": response} if response else {}
    return doc


_UUID_PARAM = {"uuid": {"type": "string", "required": True, "location": "path", "description": "The UUID."}}
_SELECT = {"select": {"type": "array", "required": False, "location": "query", "description": "attributes"}}
_LIST_PARAMS = {
    "filters": {"type": "array", "required": False, "location": "query", "description": "filters"},
    "where": {"type": "object", "required": False, "location": "query", "description": "where"},
    "order": {"type": "array", "required": False, "location": "query", "description": "order"},
    "limit": {"type": "integer", "required": False, "default": "100", "location": "query", "description": "limit"},
    "offset": {"type": "integer", "required": False, "default": "0", "location": "query", "description": "offset"},
    "count": {"type": "string", "required": False, "default": "exact", "location": "query", "description": "count"},
    "include_trash": {"type": "boolean", "required": False, "location": "query", "description": "trash"},
    "include_old_versions": {"type": "boolean", "required": False, "location": "query", "description": "versions"},
    **_SELECT,
}
_REPLACE = {"replace_files": {"type": "object", "required": False, "location": "query", "properties": {},
                              "additionalProperties": {"type": "string"}, "description": "replace_files"}}


def _schema(name: str, props: list[str]) -> dict[str, Any]:
    return {"id": name, "description": name, "type": "object", "uuidPrefix": "",
            "properties": {p: {"type": "string"} for p in props}}


def _list_schema(name: str) -> dict[str, Any]:
    return {"id": f"{name}List", "description": f"A list of {name} objects.", "type": "object",
            "properties": {"kind": {"type": "string"}, "etag": {"type": "string"},
                           "items": {"type": "array", "items": {"$ref": name}}}}


def discovery_document(root: str, state: ClusterState) -> dict[str, Any]:
    resources = {
        "collections": {"methods": {
            "get": _method("collections", "get", "collections/{uuid}", "GET", {**_UUID_PARAM, **_SELECT},
                           response="Collection"),
            "list": _method("collections", "list", "collections", "GET", _LIST_PARAMS, response="CollectionList"),
            "create": _method("collections", "create", "collections", "POST", {
                **_SELECT, **_REPLACE,
                "ensure_unique_name": {"type": "boolean", "required": False, "default": "false",
                                       "location": "query", "description": "unique name"}},
                request="Collection", response="Collection"),
            "update": _method("collections", "update", "collections/{uuid}", "PUT",
                              {**_UUID_PARAM, **_SELECT, **_REPLACE}, request="Collection", response="Collection"),
        }},
        "users": {"methods": {
            "current": _method("users", "current", "users/current", "GET", response="User"),
            "get": _method("users", "get", "users/{uuid}", "GET", {**_UUID_PARAM, **_SELECT}, response="User"),
        }},
        "groups": {"methods": {
            "get": _method("groups", "get", "groups/{uuid}", "GET", {**_UUID_PARAM, **_SELECT}, response="Group"),
        }},
        "keep_services": {"methods": {
            "accessible": _method("keep_services", "accessible", "keep_services/accessible", "GET",
                                  response="KeepServiceList"),
        }},
        "configs": {"methods": {"get": _method("configs", "get", "config", "GET")}},
    }
    schemas = {}
    for name, props in (("Collection", ["uuid", "name", "manifest_text", "portable_data_hash", "owner_uuid",
                                        "properties", "replication_desired", "storage_classes_desired",
                                        "trash_at"]),
                        ("User", ["uuid", "username", "full_name"]), ("Group", ["uuid", "name", "group_class"]),
                        ("KeepService", ["uuid", "service_host", "service_port", "service_ssl_flag",
                                         "service_type", "read_only"])):
        schemas[name] = _schema(name, props)
        schemas[f"{name}List"] = _list_schema(name)
    return {
        "kind": "discovery#restDescription", "discoveryVersion": "v1", "id": "arvados:v1",
        "name": "arvados", "version": "v1", "revision": "20250402", "title": "Arvados API",
        "description": "The API to interact with Arvados.",
        "documentationLink": "http://doc.arvados.org/api/index.html",
        "protocol": "rest", "rootUrl": root, "servicePath": "arvados/v1/", "batchPath": "batch",
        "baseUrl": root + "arvados/v1/", "basePath": "/arvados/v1/",
        "defaultCollectionReplication": state.default_replication,
        "blobSignatureTtl": SIGNING_TTL, "maxRequestSize": state.max_request_size,
        "uuidPrefix": PREFIX, "defaultTrashLifetime": 1209600, "source_version": "test",
        "parameters": {"alt": {"type": "string", "default": "json", "enum": ["json"], "location": "query",
                               "description": "Data format for the response."}},
        "auth": {"oauth2": {"scopes": {"https://api.arvados.org/auth/arvados": {"description": "all"}}}},
        "schemas": schemas, "resources": resources,
    }


# ---- state

@dataclass
class ClusterState:
    """Everything the server knows; tests read and steer it."""

    keep_services: list[dict[str, Any]] = field(default_factory=list)
    max_request_size: int = 128 * 1024 * 1024
    default_replication: int = 2
    storage_classes: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"default": {"Default": True, "Priority": 0}})
    tokens: dict[str, str] = field(default_factory=lambda: {USER_TOKEN: USER_UUID, OTHER_TOKEN: OTHER_UUID})
    users: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        USER_UUID: {"uuid": USER_UUID, "username": "tester", "full_name": "Test User", "is_admin": False},
        OTHER_UUID: {"uuid": OTHER_UUID, "username": "other", "full_name": "Other User", "is_admin": False}})
    groups: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        PROJECT_UUID: {"uuid": PROJECT_UUID, "name": "Test project", "group_class": "project",
                       "owner_uuid": USER_UUID}})
    collections: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    # ("before" | "after", seconds): hold the next creates, before or after the record is made.
    hold_create: tuple[str, float] | None = None
    fail_create_answers: int = 0   # make the record, then answer 503 (an answer lost on the way)
    created: threading.Event = field(default_factory=threading.Event)
    create_received: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def writable_owner(self, user: str, owner: str) -> bool:
        return owner == user or self.groups.get(owner, {}).get("owner_uuid") == user

    def reset(self) -> None:
        with self.lock:
            self.collections.clear()
            self.requests.clear()
            self.hold_create = None
            self.fail_create_answers = 0
            self.created.clear()
            self.create_received.clear()


# ---- the application

class _App:
    def __init__(self, state: ClusterState):
        self.state = state
        self.root = ""

    def build(self) -> web.Application:
        app = web.Application(client_max_size=1 << 31, middlewares=[self._errors])
        r = app.router
        r.add_get("/discovery/v1/apis/arvados/v1/rest", self.discovery)
        r.add_get("/arvados/v1/config", self.config)
        r.add_get("/arvados/v1/users/current", self.user_current)
        r.add_get("/arvados/v1/users/{uuid}", self.user_get)
        r.add_get("/arvados/v1/groups/{uuid}", self.group_get)
        r.add_get("/arvados/v1/keep_services/accessible", self.keep_services)
        r.add_get("/arvados/v1/collections", self.collection_list)
        r.add_post("/arvados/v1/collections", self.collection_create)
        r.add_get("/arvados/v1/collections/{uuid}", self.collection_get)
        r.add_put("/arvados/v1/collections/{uuid}", self.collection_update)
        r.add_patch("/arvados/v1/collections/{uuid}", self.collection_update)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        request_id = request.headers.get("X-Request-Id") or "req-" + secrets.token_hex(10)[:20]
        try:
            resp = await handler(request)
        except ApiFailure as exc:
            resp = web.json_response({"errors": [f"{exc} ({request_id})"],
                                      "error_token": f"{int(time.time())}+{secrets.token_hex(4)}"},
                                     status=exc.status)
        except web.HTTPNotFound:
            resp = web.json_response({"errors": [f"Path not found ({request_id})"]}, status=404)
        resp.headers["X-Request-Id"] = request_id
        with self.state.lock:
            self.state.requests.append((request.method, request.path, resp.status))
        return resp

    # -- helpers

    def _token(self, request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        for scheme in ("Bearer ", "OAuth2 "):
            if auth.startswith(scheme):
                return auth[len(scheme):].strip()
        return request.query.get("api_token", "")

    def _user(self, request: web.Request) -> tuple[str, str]:
        token = self._token(request)
        user = self.state.tokens.get(token)
        if user is None:
            raise ApiFailure(401, "Not logged in")
        return user, token

    async def _params(self, request: web.Request) -> tuple[dict[str, Any], dict[str, Any]]:
        """(params, attrs) as lib/controller/router/request.go loads them."""
        if request.content_length is not None and request.content_length > self.state.max_request_size:
            raise ApiFailure(413, "http: request body too large")
        params: dict[str, Any] = {}
        for k, v in request.query.items():
            params[k] = _guess(k, v)
        if request.can_read_body:
            raw = await request.content.read(self.state.max_request_size + 1)
            if len(raw) > self.state.max_request_size:
                raise ApiFailure(413, "http: request body too large")
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise ApiFailure(400, f"invalid JSON body: {exc}") from None
                if not isinstance(body, dict):
                    raise ApiFailure(400, "request body must be a JSON object")
                params.update({k: _guess(k, v) if isinstance(v, str) else v for k, v in body.items()})
                if "collection" not in params:
                    params["collection"] = body
        attrs = params.pop("collection", None) or {}
        if not isinstance(attrs, dict):
            raise ApiFailure(422, "collection attributes must be an object")
        return params, attrs

    def _render(self, record: dict[str, Any], token: str, select: list[str] | None = None) -> dict[str, Any]:
        """A collection as the controller answers: manifest signed for this caller."""
        out = dict(record)
        if out["manifest_text"] and not out["is_trashed"]:
            exp = int(time.time()) + SIGNING_TTL
            if out.get("trash_at"):
                exp = min(exp, int(_parse_ts(out["trash_at"])))
            out["manifest_text"] = munge_locators(
                record["manifest_text"], lambda m: m.group(0) + sign(m.group(1), token, exp))
        out["unsigned_manifest_text"] = record["manifest_text"]
        if select:
            out = {k: v for k, v in out.items() if k in select or k in ("kind", "etag")}
        return out

    def _visible(self, user: str, record: dict[str, Any]) -> bool:
        return self.state.writable_owner(user, record["owner_uuid"])

    def _apply(self, record: dict[str, Any], attrs: dict[str, Any], user: str, token: str,
               unique: bool) -> None:
        """Validate and apply attributes (the Collection model's callbacks and validations)."""
        if "manifest_text" in attrs:
            text = attrs["manifest_text"] or ""
            if not isinstance(text, str):
                raise ApiFailure(422, "Manifest text must be a string")
            validate_manifest(text)
            now = time.time()
            for line in text.splitlines():
                for tok in line.split(" ")[1:]:
                    if FILE_TOKEN_RE.match(tok):
                        continue
                    why = check_signature(tok, token, now)
                    if why is not None:
                        raise ApiFailure(403, "#<ArvadosModel::PermissionDeniedError: "
                                              f"ArvadosModel::PermissionDeniedError> ({why} {tok[:80]})")
            stripped = munge_locators(text, lambda m: re.sub(r"\+A[^+]*", "", m.group(0)))
            record["manifest_text"] = stripped
            record["portable_data_hash"] = portable_data_hash(stripped)
            record["file_count"] = sum(len(line.split(" ")) - 1 - sum(
                1 for w in line.split(" ")[1:] if LOCATOR_RE.match(w)) for line in stripped.splitlines())
        for key in ("name", "description", "replication_desired", "trash_at"):
            if key in attrs:
                record[key] = attrs[key]
        if "properties" in attrs:
            if not isinstance(attrs["properties"], dict):
                raise ApiFailure(422, "Properties must be a hash")
            record["properties"] = attrs["properties"]
        if "storage_classes_desired" in attrs:
            classes = attrs["storage_classes_desired"]
            if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
                raise ApiFailure(422, "Storage classes desired must be an array of strings")
            if not classes:
                raise ApiFailure(422, "Storage classes desired must not be empty")
            record["storage_classes_desired"] = classes
        if "owner_uuid" in attrs and attrs["owner_uuid"]:
            owner = attrs["owner_uuid"]
            if owner not in self.state.users and owner not in self.state.groups:
                raise ApiFailure(422, f"Owner uuid {owner} not found")
            if not self.state.writable_owner(user, owner):
                raise ApiFailure(403, f"Owner uuid {owner} cannot be written by {user}")
            record["owner_uuid"] = owner
        if record.get("trash_at"):
            try:
                _parse_ts(record["trash_at"])
            except ValueError:
                raise ApiFailure(422, f"Trash at {record['trash_at']!r} is not a time") from None
        name = record.get("name") or None
        record["name"] = name
        if name is not None:
            clash = any(c["uuid"] != record["uuid"] and c["owner_uuid"] == record["owner_uuid"]
                        and c["name"] == name for c in self.state.collections.values())
            if clash and not unique:
                raise ApiFailure(422, "#<ActiveRecord::RecordNotUnique: PG::UniqueViolation: ERROR:  duplicate "
                                      "key value violates unique constraint \"index_collections_on_owner_uuid_and_name\""
                                      f"\nDETAIL:  Key (owner_uuid, name)=({record['owner_uuid']}, {name}) already "
                                      "exists.\n>")
            if clash:
                record["name"] = f"{name[:237]} ({record['uuid'][-15:]})"

    # -- handlers

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response(discovery_document(self.root, self.state))

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response({"ClusterID": PREFIX, "StorageClasses": self.state.storage_classes,
                                  "Collections": {"BlobSigning": True, "BlobSigningTTL": f"{SIGNING_TTL // 3600}h",
                                                  "CollectionVersioning": False},
                                  "API": {"MaxRequestSize": self.state.max_request_size}})

    async def user_current(self, request: web.Request) -> web.Response:
        user, _ = self._user(request)
        return web.json_response({"kind": "arvados#user", **self.state.users[user]})

    async def user_get(self, request: web.Request) -> web.Response:
        self._user(request)
        record = self.state.users.get(request.match_info["uuid"])
        if record is None:
            raise ApiFailure(404, "Path not found")
        return web.json_response({"kind": "arvados#user", **record})

    async def group_get(self, request: web.Request) -> web.Response:
        user, _ = self._user(request)
        record = self.state.groups.get(request.match_info["uuid"])
        if record is None or record["owner_uuid"] != user:
            raise ApiFailure(404, "Path not found")
        return web.json_response({"kind": "arvados#group", **record})

    async def keep_services(self, request: web.Request) -> web.Response:
        self._user(request)
        items = [{"kind": "arvados#keepService", **s} for s in self.state.keep_services]
        return web.json_response({"kind": "arvados#keepServiceList", "items": items,
                                  "items_available": len(items), "offset": 0, "limit": len(items)})

    async def collection_get(self, request: web.Request) -> web.Response:
        user, token = self._user(request)
        params, _ = await self._params(request)
        record = self.state.collections.get(request.match_info["uuid"])
        if record is None or not self._visible(user, record):
            raise ApiFailure(404, "Path not found")
        return web.json_response(self._render(record, token, params.get("select")))

    async def collection_list(self, request: web.Request) -> web.Response:
        user, token = self._user(request)
        params, _ = await self._params(request)
        filters = params.get("filters") or []
        if not isinstance(filters, list) or not all(isinstance(f, list) and len(f) == 3 for f in filters):
            raise ApiFailure(422, "Invalid filters")
        items = [r for r in self.state.collections.values()
                 if self._visible(user, r) and all(_matches(r, f) for f in filters)]
        offset, limit = int(params.get("offset") or 0), int(params.get("limit") or 100)
        page = [self._render(r, token, params.get("select")) for r in items[offset:offset + limit]]
        return web.json_response({"kind": "arvados#collectionList", "items": page, "offset": offset,
                                  "limit": limit, "items_available": len(items)})

    async def collection_create(self, request: web.Request) -> web.Response:
        user, token = self._user(request)
        params, attrs = await self._params(request)
        self.state.create_received.set()
        hold = self.state.hold_create
        if hold and hold[0] == "before":
            await asyncio.sleep(hold[1])
        now = _ts()
        record: dict[str, Any] = {
            "kind": "arvados#collection", "etag": secrets.token_hex(8), "uuid": _random_uuid("4zz18"),
            "owner_uuid": user, "created_at": now, "modified_at": now, "modified_by_user_uuid": user,
            "name": None, "description": None, "properties": {}, "manifest_text": "",
            "portable_data_hash": portable_data_hash(""), "replication_desired": None,
            "replication_confirmed": None, "storage_classes_desired": sorted(
                k for k, v in self.state.storage_classes.items() if v.get("Default")),
            "storage_classes_confirmed": [], "trash_at": None, "delete_at": None, "is_trashed": False,
            "version": 1, "preserve_version": False, "file_count": 0, "file_size_total": 0}
        record["current_version_uuid"] = record["uuid"]
        with self.state.lock:
            self._apply(record, {"manifest_text": "", **attrs}, user, token, bool(params.get("ensure_unique_name")))
            self.state.collections[record["uuid"]] = record
        self.state.created.set()
        if hold and hold[0] == "after":
            await asyncio.sleep(hold[1])
        if self.state.fail_create_answers > 0:
            self.state.fail_create_answers -= 1
            raise ApiFailure(503, "Service Unavailable")
        return web.json_response(self._render(record, token, params.get("select")))

    async def collection_update(self, request: web.Request) -> web.Response:
        user, token = self._user(request)
        params, attrs = await self._params(request)
        with self.state.lock:
            record = self.state.collections.get(request.match_info["uuid"])
            if record is None or not self._visible(user, record):
                raise ApiFailure(404, "Path not found")
            updated = dict(record)
            self._apply(updated, attrs, user, token, False)
            updated["modified_at"] = _ts()
            updated["version"] = record["version"] + (updated["manifest_text"] != record["manifest_text"])
            self.state.collections[record["uuid"]] = updated
        return web.json_response(self._render(updated, token, params.get("select")))


_BOOL_PARAMS = {"ensure_unique_name", "include_trash", "include_old_versions", "distinct", "bypass_federation"}


def _guess(key: str, value: str) -> Any:
    """guessAndParse from lib/controller/router/request.go."""
    if key in ("limit", "offset"):
        return int(value)
    if key in _BOOL_PARAMS:
        return value not in ("", "false", "0")
    if value in ("null", ""):
        return None
    if value[:1] in ("[", "{", '"'):
        return json.loads(value)
    return value


def _matches(record: dict[str, Any], flt: list[Any]) -> bool:
    attr, op, operand = flt
    if attr.startswith("properties."):
        value = record["properties"].get(attr[len("properties."):])
    else:
        value = record.get(attr)
    if op == "=":
        return value == operand
    if op == "in":
        return value in operand
    if op == "exists":
        return attr[len("properties."):] in record["properties"]
    raise ApiFailure(422, f"Invalid operator '{op}'")


class ApiServer:
    """The server on 127.0.0.1 over TLS, in a thread of its own."""

    def __init__(self, state: ClusterState, ssl_context: ssl.SSLContext):
        self.state = state
        self._ssl = ssl_context
        self._app = _App(state)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="arvados-api-server", daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ApiServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        self._app.root = f"https://{self.host}/"
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._app.build(), access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
