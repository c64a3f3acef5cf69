"""Settings: built-in defaults, then a TOML profile, then command-line flags.

One validated :class:`Settings` object comes out, and for each setting we remember
where its value came from, so errors (and ``config show``) can name the key and the
file or flag. Unknown keys and wrong types are refused before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ingest.arvados.settings import arvados_settings, flag_is_true
from ingest.errors import ConfigError
from ingest.keep.locator import BLOCK_SIZE_MAX

MiB = 1 << 20


def default_store_path() -> str:
    """The embedded default store: ``$XDG_DATA_HOME/keep-ingest/store`` (~/.local/share)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "keep-ingest", "store")


def default_key_dir() -> str:
    """Where ``keep-ingest keys`` writes the worker link's key pairs, and ``put`` and
    ``worker`` look for them: ``$XDG_CONFIG_HOME/keep-ingest/link`` (~/.config)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "keep-ingest", "link")


@dataclass
class StoreSettings:
    """Where blocks go: a local directory store, or Keep services over HTTP."""

    type: str = "directory"         # "directory" or "keep"
    path: str = ""                  # directory: empty means default_store_path()
    fsync: bool = True              # directory: fsync blocks and directories before acknowledging
    services: list[str] = field(default_factory=list)  # keep: service URLs
    token: str = ""                 # keep: API token; never logged, never written to state
    replication: int = 2            # keep: copies, on distinct services
    service_type: str = "proxy"     # keep, static list: "proxy" (one PUT at a time, as the SDK) or "disk" (parallel)
    storage_classes: list[str] = field(default_factory=list)  # keep: X-Keep-Storage-Classes; empty: the cluster's
    retries: int = 3                # keep: further attempts after a temporary failure
    backoff_start: float = 1.0      # keep: seconds before the first retry, doubling each time
    backoff_max: float = 30.0       # keep: longest wait between retries
    connect_timeout: float = 2.0    # keep: seconds to connect to a service
    read_timeout: float = 300.0     # keep: seconds a service may stay silent during a request


@dataclass
class ApiSettings:
    """The Arvados API server: where collections are saved and Keep services found."""

    host: str = ""                  # HOST[:PORT] ($ARVADOS_API_HOST); empty: no cluster
    insecure: bool = False          # no TLS checks for the API and Keep ($ARVADOS_API_HOST_INSECURE)
    retries: int = 3                # further attempts after a temporary failure of a read
    backoff_start: float = 1.0      # seconds before the first retry, doubling each time
    connect_timeout: float = 10.0   # seconds to connect to the API server


@dataclass
class PutSettings:
    """How ``put`` walks, packs and dispatches."""

    workers: int | str = "auto"      # local worker processes; "auto": one per CPU
    chunk_size: int = 4 * MiB        # bytes per ZeroMQ data frame
    block_size: int = BLOCK_SIZE_MAX
    blocks_per_worker: int = 2       # unfinished blocks a worker may hold
    window_chunks: int = 3           # chunks in flight to one worker
    follow_links: bool = True
    exclude: list[str] = field(default_factory=list)
    listen: str = ""                 # ZeroMQ endpoint for workers; empty: a private ipc socket
    local_reads: bool = True         # local workers read the files themselves (false: stream every byte)
    worker_timeout: int = 120        # seconds without any connected worker before giving up
    heartbeat_timeout: int = 10      # seconds of silence after which a worker (or coordinator) is lost
    block_timeout: int = 600         # seconds a worker may hold blocks without progress before losing them
    link_key: str = ""               # the coordinator's secret key file for --listen; empty: the default
    worker_keys: list[str] = field(default_factory=list)  # remote workers' public keys (files or dirs)
    insecure_plaintext: bool = False  # --listen without authentication or encryption (never on a network)
    skip_unreadable: bool = False    # finish without files that cannot be read (exit 3) instead of failing
    progress: str = "auto"           # auto (a live display on a terminal), tty, json, batch, none
    progress_file: str = ""          # json/batch progress lines go here (appended); empty: stderr
    progress_interval: float = 1.0   # seconds between progress lines
    resume: bool = True              # reuse blocks earlier runs stored (false: start afresh)
    change_retries: int = 3          # re-walks when files change while being read
    signature_margin: int = 172800   # store again blocks whose signatures expire sooner (s)


@dataclass
class StateSettings:
    """Where checkpoint journals and run locks live."""

    dir: str = ""                    # empty: $XDG_STATE_HOME/keep-ingest


@dataclass
class Settings:
    """Every setting, validated, with the origin of each value."""

    store: StoreSettings = field(default_factory=StoreSettings)
    put: PutSettings = field(default_factory=PutSettings)
    state: StateSettings = field(default_factory=StateSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    origins: dict[str, str] = field(default_factory=dict)  # "put.workers" -> "--workers"
    # Found through the API before a run (ingest.arvados.cluster), not a setting:
    # the writable Keep services as (root URL, uuid, service type).
    keep_services: list[tuple[str, str, str]] = field(default_factory=list)

    def origin(self, key: str) -> str:
        return self.origins.get(key, "default")

    @property
    def state_dir(self) -> str:
        base = self.state.dir or os.path.join(
            os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state"),
            "keep-ingest")
        return os.path.abspath(os.path.expanduser(base))

    @property
    def store_path(self) -> str:
        return os.path.abspath(os.path.expanduser(self.store.path or default_store_path()))

    @property
    def uses_cluster(self) -> bool:
        """Blocks go to Keep and collections are saved through the API server."""
        return self.store.type == "keep" and bool(self.api.host)

    def describe_store(self) -> str:
        """The store in words, for messages and summaries (never the token)."""
        if self.uses_cluster:
            return (f"Arvados cluster {self.api.host}: {len(self.store.services)} Keep service(s) "
                    f"(replication {self.store.replication})")
        if self.store.type == "keep":
            return f"Keep services {' '.join(self.store.services)} (replication {self.store.replication})"
        return self.store_path

    @property
    def link_key_path(self) -> str:
        """The coordinator's secret key file for remote workers."""
        return os.path.expanduser(self.put.link_key or os.path.join(default_key_dir(), "coordinator.key_secret"))

    @property
    def worker_key_paths(self) -> list[str]:
        """Where the public keys of the remote workers a run accepts are."""
        return [os.path.expanduser(p) for p in self.put.worker_keys] or [os.path.join(default_key_dir(), "workers")]

    @property
    def local_worker_count(self) -> int:
        if self.put.workers == "auto":
            return os.cpu_count() or 1
        return int(self.put.workers)

    def store_spec(self) -> dict[str, Any]:
        """The store description sent to workers (see ingest.keep.factory.open_store)."""
        if self.store.type == "keep":
            return {"type": "keep", "services": list(self.store.services),
                    "token": self.store.token or None, "replication": self.store.replication,
                    "service_type": self.store.service_type, "retries": self.store.retries,
                    "backoff_start": self.store.backoff_start, "backoff_max": self.store.backoff_max,
                    "connect_timeout": self.store.connect_timeout, "read_timeout": self.store.read_timeout,
                    **self._resolved_keep()}
        return {"type": "directory", "path": self.store_path, "fsync": self.store.fsync}

    def _resolved_keep(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.keep_services:
            extra["service_uuids"] = [uuid for _, uuid, _ in self.keep_services]
            extra["service_types"] = [kind for _, _, kind in self.keep_services]
        if self.store.storage_classes:
            extra["storage_classes"] = list(self.store.storage_classes)
        if self.api.insecure:
            extra["insecure"] = True
        return extra


_Check = tuple[Callable[[Any], bool], str]
_CHECKS: dict[str, _Check] = {
    "store.type": (lambda v: v in ("directory", "keep"), 'must be "directory" or "keep"'),
    "store.replication": (lambda v: v >= 1, "must be 1 or more"),
    "store.service_type": (lambda v: v in ("disk", "proxy"), 'must be "disk" or "proxy"'),
    "store.retries": (lambda v: v >= 0, "must be 0 or more"),
    "store.backoff_start": (lambda v: v >= 0, "must be 0 or more"),
    "store.backoff_max": (lambda v: v >= 0, "must be 0 or more"),
    "store.connect_timeout": (lambda v: v > 0, "must be more than 0"),
    "store.read_timeout": (lambda v: v > 0, "must be more than 0"),
    "store.storage_classes": (lambda v: all(c and "," not in c and c.strip() == c for c in v),
                              "must be names without commas or surrounding spaces"),
    "api.retries": (lambda v: v >= 0, "must be 0 or more"),
    "api.backoff_start": (lambda v: v >= 0, "must be 0 or more"),
    "api.connect_timeout": (lambda v: v > 0, "must be more than 0"),
    "put.workers": (lambda v: v == "auto" or (isinstance(v, int) and v >= 0),
                    'must be "auto" (one per CPU) or a number of processes (0: remote workers only)'),
    "put.worker_timeout": (lambda v: v >= 1, "must be 1 or more"),
    "put.change_retries": (lambda v: v >= 0, "must be 0 or more"),
    "put.heartbeat_timeout": (lambda v: v >= 1, "must be 1 or more"),
    "put.block_timeout": (lambda v: v >= 1, "must be 1 or more"),
    "put.progress": (lambda v: v in ("auto", "tty", "json", "batch", "none"),
                     "must be auto, tty, json, batch or none"),
    "put.progress_interval": (lambda v: v > 0, "must be more than 0"),
    "put.signature_margin": (lambda v: v >= 0, "must be 0 or more"),
    "put.chunk_size": (lambda v: 4096 <= v <= BLOCK_SIZE_MAX, f"must be 4096 to {BLOCK_SIZE_MAX}"),
    "put.block_size": (lambda v: 1 <= v <= BLOCK_SIZE_MAX, f"must be 1 to {BLOCK_SIZE_MAX}"),
    "put.blocks_per_worker": (lambda v: v >= 1, "must be 1 or more"),
    "put.window_chunks": (lambda v: v >= 1, "must be 1 or more"),
}


def _type_ok(value: Any, expected: Any) -> bool:
    if isinstance(expected, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(expected))
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(expected) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
    if isinstance(expected, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(expected))
    if typing.get_origin(expected) is list:
        return "a list of strings"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[expected]


def _set(settings: Settings, key: str, value: Any, origin: str) -> None:
    section_name, _, name = key.partition(".")
    section = getattr(settings, section_name)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise ConfigError(f"{origin}: unknown setting {key!r}")
    if not _type_ok(value, hints[name]):
        raise ConfigError(f"{origin}: {key} must be {_type_name(hints[name])}, not {value!r}")
    check = _CHECKS.get(key)
    if check and not check[0](value):
        raise ConfigError(f"{origin}: {key} {check[1]}, not {value!r}")
    setattr(section, name, value)
    settings.origins[key] = origin


def sections() -> list[str]:
    """The names of the settings sections (``store``, ``put``, ...)."""
    return [f.name for f in dataclasses.fields(Settings) if f.name not in ("origins", "keep_services")]


def load_profile(settings: Settings, path: str) -> None:
    """Apply a TOML profile; errors name the file and the key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    for section, table in data.items():
        if section not in sections() or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{section}] (known: {', '.join(sections())})")
        for name, value in table.items():
            _set(settings, f"{section}.{name}", value, path)


# Settings read as the Arvados tools read them (ingest.arvados.settings): the
# environment, over ~/.config/arvados/settings.conf.
ENVIRONMENT = {
    "ARVADOS_KEEP_SERVICES": ("store.services", str.split),
    "ARVADOS_API_TOKEN": ("store.token", str.strip),
    "ARVADOS_API_HOST": ("api.host", str.strip),
    "ARVADOS_API_HOST_INSECURE": ("api.insecure", flag_is_true),
}


def load_environment(settings: Settings, environ: Mapping[str, str]) -> None:
    """Apply the ARVADOS_* settings that are set and not empty."""
    found = arvados_settings(environ)
    for variable, (key, convert) in ENVIRONMENT.items():
        value, origin = found.get(variable, ("", ""))
        if value.strip():
            _set(settings, key, convert(value), origin)


def _check_consistent(settings: Settings) -> None:
    if settings.put.workers == 0 and not settings.put.listen:
        raise ConfigError(f"{settings.origin('put.workers')}: workers = 0 (remote workers only) "
                          "needs a listen address (put.listen or --listen)")
    if settings.put.insecure_plaintext and not settings.put.listen:
        raise ConfigError(f"{settings.origin('put.insecure_plaintext')}: insecure_plaintext applies to the "
                          "remote worker link only; it needs a listen address (put.listen or --listen)")
    store = settings.store
    if settings.api.host and settings.origin("store.type") == "default":
        # An API host configured (as for arv-put): upload into that cluster.
        store.type = "keep"
        settings.origins["store.type"] = settings.origin("api.host")
    if store.type == "keep" and not store.services and not settings.api.host:
        raise ConfigError(f"{settings.origin('store.type')}: a Keep store needs services: "
                          "$ARVADOS_API_HOST (the cluster's services), --keep URL, "
                          "$ARVADOS_KEEP_SERVICES or store.services")
    if store.type == "directory" and settings.origin("store.replication").startswith("--") \
            and store.replication != 1:
        raise ConfigError(f"{settings.origin('store.replication')}: the directory store keeps one "
                          "copy; replication applies to Keep services (--keep)")


def load_settings(config_path: str | None, overrides: dict[str, tuple[Any, str]],
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, then the profile (if any), then the environment, then flag overrides.

    ``overrides`` maps a key to ``(value, flag)``; a value of None means "not given".
    """
    settings = Settings()
    if config_path:
        load_profile(settings, config_path)
    load_environment(settings, os.environ if environ is None else environ)
    for key, (value, flag) in overrides.items():
        if value is not None:
            _set(settings, key, value, flag)
    _check_consistent(settings)
    return settings
