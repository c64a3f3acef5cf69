"""Settings: the default profile, precedence, validation."""

from pathlib import Path

import pytest
from conftest import REPO_ROOT

from ingest.config import Settings, default_store_path, load_settings
from ingest.errors import ConfigError


def test_default_profile_states_exactly_the_built_in_defaults():
    from_file = load_settings(str(REPO_ROOT / "configs" / "default.toml"), {}, environ={})
    built_in = Settings()
    assert (from_file.store, from_file.put, from_file.api) == (built_in.store, built_in.put, built_in.api)


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


def test_environment_sits_between_profile_and_flags(tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text('[store]\ntype = "keep"\nservices = ["http://from-profile/"]\n')
    env = {"ARVADOS_KEEP_SERVICES": "http://a/  http://b/", "ARVADOS_API_TOKEN": "secret"}
    s = load_settings(str(profile), {}, environ=env)
    assert s.store.services == ["http://a/", "http://b/"]
    assert s.origin("store.services") == "$ARVADOS_KEEP_SERVICES"
    assert s.store.token == "secret" and "secret" not in s.describe_store()
    s = load_settings(str(profile), {"store.services": (["http://flag/"], "--keep")}, environ=env)
    assert s.store.services == ["http://flag/"]


def test_keep_store_needs_services():
    with pytest.raises(ConfigError, match="needs services"):
        load_settings(None, {"store.type": ("keep", "--keep")}, environ={})


def test_directory_store_refuses_replication():
    with pytest.raises(ConfigError, match="--replication: the directory store keeps one copy"):
        load_settings(None, {"store.replication": (2, "--replication")}, environ={})


def test_cluster_profile_reads_services_from_the_environment():
    s = load_settings(str(REPO_ROOT / "configs" / "cluster.toml"), {},
                      environ={"ARVADOS_KEEP_SERVICES": "http://k/"})
    assert s.store_spec()["type"] == "keep" and s.store_spec()["services"] == ["http://k/"]
