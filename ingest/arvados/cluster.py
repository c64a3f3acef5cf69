"""What a run needs to know about the cluster, found through the API before it starts.

The discovery document gives ``defaultCollectionReplication``, ``blobSignatureTtl``,
``maxRequestSize`` and ``uuidPrefix``; ``GET config`` the storage classes (those
marked ``Default``); ``GET keep_services/accessible`` the Keep services. As in the
SDK, gateway services and read-only ones take no blocks, and a static
``ARVADOS_KEEP_SERVICES`` list counts as proxy services (uuids ``00000-bi6l4-N``)
and asks the API for no services at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ingest.arvados.client import ApiClient
from ingest.errors import ApiError
from ingest.keep.client import static_services

DEFAULT_MAX_REQUEST_SIZE = 128 * 1024 * 1024   # the API server's default (API.MaxRequestSize)
DEFAULT_REPLICATION = 2
DEFAULT_SIGNATURE_TTL = 1209600
_UUID_RE = re.compile(r"[a-z0-9]{5}-[a-z0-9]{5}-[a-z0-9]{15}")
_SERVICE_HOST_RE = re.compile(r"(?:[A-Za-z0-9.-]+|\[?[0-9A-Fa-f:.]+\]?)")


@dataclass(frozen=True, slots=True)
class KeepService:
    """One writable Keep service: where it is, its uuid (for rendezvous order) and type."""

    root: str
    uuid: str
    service_type: str


@dataclass(frozen=True)
class Cluster:
    """The facts a run uses, all found before any worker starts."""

    host: str
    uuid_prefix: str
    default_replication: int
    blob_signature_ttl: int
    max_request_size: int
    default_storage_classes: tuple[str, ...]
    services: tuple[KeepService, ...]
    static_services: bool    # from ARVADOS_KEEP_SERVICES / --keep, not from the API

    def describe(self) -> str:
        kinds = sorted({s.service_type for s in self.services})
        return (f"cluster {self.uuid_prefix or self.host} ({self.host}): {len(self.services)} Keep "
                f"service(s) ({', '.join(kinds)}), default replication {self.default_replication}, "
                f"storage classes {', '.join(self.default_storage_classes) or '(none)'}")


def _positive_int(doc: dict[str, Any], key: str, default: int) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return default
    return value


def _service_root(host: str, item: dict[str, Any]) -> str:
    name, port, ssl = item.get("service_host"), item.get("service_port"), item.get("service_ssl_flag")
    if not isinstance(name, str) or not _SERVICE_HOST_RE.fullmatch(name) \
            or isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536 \
            or not isinstance(ssl, bool):
        raise ApiError(f"Arvados API server {host}: Keep service {str(item.get('uuid'))[:40]!r} has a "
                       f"malformed address (service_host {str(name)[:80]!r}, service_port {port!r}, "
                       f"service_ssl_flag {ssl!r})")
    if ":" in name and not name.startswith("["):
        name = f"[{name}]"   # IPv6, as the SDK writes it
    return f"{'https' if ssl else 'http'}://{name}:{port}/"


def services_from_api(host: str, listing: Any) -> list[KeepService]:
    """The writable, non-gateway services of a ``keep_services/accessible`` answer."""
    items = listing.get("items") if isinstance(listing, dict) else None
    if not isinstance(items, list):
        raise ApiError(f"Arvados API server {host}: keep_services/accessible gave no list of items")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise ApiError(f"Arvados API server {host}: keep_services/accessible gave a malformed item")
        uuid, kind = item.get("uuid"), item.get("service_type", "disk")
        if not isinstance(uuid, str) or not _UUID_RE.fullmatch(uuid) or not isinstance(kind, str):
            raise ApiError(f"Arvados API server {host}: Keep service with a malformed uuid or type "
                           f"({str(uuid)[:40]!r}, {str(kind)[:40]!r})")
        root = _service_root(host, item)
        if kind.startswith("gateway:") or item.get("read_only"):
            continue
        out.append(KeepService(root, uuid, kind))
    if not out:
        raise ApiError(f"Arvados API server {host}: no writable Keep service is accessible "
                       f"({len(items)} listed)")
    return out


def discover(client: ApiClient, static_urls: list[str], static_type: str = "proxy") -> Cluster:
    """Ask the API server for everything a run needs (see the module docstring);
    ``static_urls`` (from ``ARVADOS_KEEP_SERVICES`` or ``--keep``) replace the
    cluster's services, as services of ``static_type``."""
    doc = client.discovery()
    config = client.get("config")
    classes_config = config.get("StorageClasses") if isinstance(config, dict) else None
    classes = tuple(sorted(name for name, c in (classes_config or {}).items()
                           if isinstance(c, dict) and c.get("Default") is True))
    if static_urls:
        services = [KeepService(s.root, s.uuid, s.service_type) for s in static_services(static_urls, static_type)]
    else:
        services = services_from_api(client.host, client.get("keep_services/accessible"))
    prefix = doc.get("uuidPrefix")
    return Cluster(
        host=client.host,
        uuid_prefix=prefix if isinstance(prefix, str) and re.fullmatch(r"[a-z0-9]{5}", prefix) else "",
        default_replication=_positive_int(doc, "defaultCollectionReplication", DEFAULT_REPLICATION),
        blob_signature_ttl=_positive_int(doc, "blobSignatureTtl", DEFAULT_SIGNATURE_TTL),
        max_request_size=_positive_int(doc, "maxRequestSize", DEFAULT_MAX_REQUEST_SIZE),
        default_storage_classes=classes,
        services=tuple(services),
        static_services=bool(static_urls))
