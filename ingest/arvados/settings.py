"""The Arvados client settings, read as the official SDK reads them.

``settings.conf`` (``KEY=VALUE`` lines, ``#`` comments) is the first one found in
``$CONFIGURATION_DIRECTORY`` (each of its ``:``-separated directories), then
``$XDG_CONFIG_HOME/arvados`` (default ``~/.config/arvados``), then each
``$XDG_CONFIG_DIRS/arvados`` (default ``/etc/xdg/arvados``). Every ``ARVADOS_*``
environment variable overrides the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

from ingest.errors import ConfigError

TRUE_WORDS = frozenset({"1", "t", "true", "y", "yes"})


def flag_is_true(value: str) -> bool:
    """The SDK's reading of a boolean setting such as ``ARVADOS_API_HOST_INSECURE``."""
    return value.strip().lower() in TRUE_WORDS


def _absolute_dirs(value: str) -> Iterator[str]:
    for part in value.split(":"):
        if os.path.isabs(part):
            yield part


def settings_file_candidates(environ: Mapping[str, str]) -> Iterator[str]:
    """Where ``settings.conf`` is looked for, in order."""
    for d in _absolute_dirs(environ.get("CONFIGURATION_DIRECTORY", "")):
        yield os.path.join(d, "settings.conf")
    home = environ.get("HOME") or os.path.expanduser("~")
    xdg_home = environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(xdg_home):
        xdg_home = os.path.join(home, ".config")
    yield os.path.join(xdg_home, "arvados", "settings.conf")
    for d in _absolute_dirs(environ.get("XDG_CONFIG_DIRS") or "/etc/xdg"):
        yield os.path.join(d, "arvados", "settings.conf")


def find_settings_file(environ: Mapping[str, str]) -> str | None:
    """The first ``settings.conf`` that exists, or None."""
    return next((p for p in settings_file_candidates(environ) if os.path.exists(p)), None)


def read_settings_file(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines; blank lines and ``#`` comments are skipped.

    A line without ``=`` is refused naming the file and the line number (the SDK
    crashes on one).
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"Arvados settings file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"Arvados settings file {path}: not UTF-8 text") from None
    values: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.rstrip().partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Arvados settings file {path}, line {number}: expected KEY=VALUE")
        values[key.strip()] = value
    return values


def arvados_settings(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Every ``ARVADOS_*`` setting as ``{name: (value, origin)}``: the settings file
    first, the environment over it. The origin is ``$NAME`` or ``FILE (NAME)``."""
    out: dict[str, tuple[str, str]] = {}
    path = find_settings_file(environ)
    if path:
        for key, value in read_settings_file(path).items():
            if key.startswith("ARVADOS_"):
                out[key] = (value, f"{path} ({key})")
    for key, value in environ.items():
        if key.startswith("ARVADOS_"):
            out[key] = (value, f"${key}")
    return out
