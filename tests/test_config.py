"""Settings: the default profile, precedence, validation."""

from pathlib import Path

import pytest

from conftest import REPO_ROOT
from ingest.config import Settings, default_store_path, load_settings
from ingest.errors import ConfigError


def test_default_profile_states_exactly_the_built_in_defaults():
    from_file = load_settings(str(REPO_ROOT / "configs" / "default.toml"), {})
    built_in = Settings()
    assert (from_file.store, from_file.put) == (built_in.store, built_in.put)


def test_flags_override_the_profile_and_origins_are_kept(tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text('[put]\nworkers = 3\nexclude = ["*.tmp"]\n')
    s = load_settings(str(profile), {"put.workers": (5, "--workers"), "put.exclude": (None, "--exclude")})
    assert s.put.workers == 5 and s.origin("put.workers") == "--workers"
    assert s.put.exclude == ["*.tmp"] and s.origin("put.exclude") == str(profile)
    assert s.origin("put.chunk_size") == "default"


def test_default_store_follows_xdg_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_store_path() == str(tmp_path / "keep-ingest" / "store")
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_store_path() == str(Path.home() / ".local" / "share" / "keep-ingest" / "store")


def test_booleans_are_not_integers(tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text("[put]\nworkers = true\n")
    with pytest.raises(ConfigError, match="put.workers"):
        load_settings(str(profile), {})


def test_missing_profile_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: not found"):
        load_settings(str(tmp_path / "nope.toml"), {})
