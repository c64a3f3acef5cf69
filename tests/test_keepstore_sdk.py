"""The official Arvados SDK's KeepClient against our keepstore, signing off and on."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

pytest.importorskip("arvados")
import arvados.config  # noqa: E402
import arvados.errors  # noqa: E402
import arvados.keep  # noqa: E402
from keepstore_fixture import SIGNING_KEY, TOKEN  # noqa: E402

from ingest.keep.client import KeepClient  # noqa: E402
from ingest.keep.signing import sign_locator, verify_signature  # noqa: E402

pytestmark = [pytest.mark.sdk, pytest.mark.timeout(60)]


@pytest.fixture(autouse=True)
def sdk_env(tmp_path, monkeypatch):
    """No user settings, no cached SDK config, no local-store mode."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in list(os.environ):
        if var.startswith("ARVADOS_") or var == "KEEP_LOCAL_STORE":
            monkeypatch.delenv(var)
    monkeypatch.setattr(arvados.config, "_settings", None)


def sdk_client(urls, token=TOKEN):
    return arvados.keep.KeepClient(proxy=" ".join(urls), api_token=token, num_retries=0)


def test_sdk_put_get_without_signing(keepstore):
    data = os.urandom(100_000)
    md5 = hashlib.md5(data).hexdigest()
    loc = sdk_client([keepstore.url]).put(data, copies=1)
    assert loc == f"{md5}+{len(data)}"
    assert keepstore.block_path(md5).read_bytes() == data
    assert sdk_client([keepstore.url]).get(loc) == data
    assert sdk_client([keepstore.url]).head(loc) is True
    # Without a token too.
    assert sdk_client([keepstore.url], token="").get(loc) == data


def test_sdk_large_blocks(keepstore):
    data = os.urandom(5 * 1024 * 1024 + 3)   # over 1 MiB libcurl sends Expect: 100-continue
    loc = sdk_client([keepstore.url]).put(data, copies=1)
    assert sdk_client([keepstore.url]).get(loc) == data
    # A full-size block as well.
    big = os.urandom(64 * 1024 * 1024)
    loc = sdk_client([keepstore.url]).put(big, copies=1)
    assert loc == f"{hashlib.md5(big).hexdigest()}+{len(big)}"
    assert sdk_client([keepstore.url]).get(loc) == big


def test_sdk_with_signing(keepstore_signed):
    ks = keepstore_signed
    data = b"signed through the SDK"
    md5 = hashlib.md5(data).hexdigest()
    loc = sdk_client([ks.url]).put(data, copies=1)
    assert loc.startswith(f"{md5}+{len(data)}+A")
    verify_signature(loc, TOKEN, SIGNING_KEY.encode())
    parsed = arvados.keep.KeepLocator(loc)
    assert not parsed.permission_expired()
    assert abs(parsed.perm_expiry.timestamp() - (time.time() + 1209600)) < 60
    assert sdk_client([ks.url]).get(loc) == data
    assert sdk_client([ks.url]).head(loc) is True

    def refused(locator, token=TOKEN):
        with pytest.raises(arvados.errors.KeepReadError) as err:
            sdk_client([ks.url], token).get(locator)
        return str(err.value)

    assert "400" in refused(f"{md5}+{len(data)}")                      # missing signature
    assert "400" in refused(loc, token="another-token")                # signed for someone else
    bad = loc[:-14] + ("1" if loc[-14] == "0" else "0") + loc[-13:]
    assert "400" in refused(bad)                                       # tampered signature
    expired = sign_locator(f"{md5}+{len(data)}", TOKEN, SIGNING_KEY.encode(), expiry=int(time.time()) - 60)
    assert "401" in refused(expired)                                   # expired
    assert "401" in refused(loc, token="")                             # no token


def test_sdk_keep_services_env_two_copies(keepstore_factory, monkeypatch):
    servers = keepstore_factory.many(2, signing_key=SIGNING_KEY)
    monkeypatch.setenv("ARVADOS_KEEP_SERVICES", " ".join(k.url for k in servers))
    monkeypatch.setenv("ARVADOS_API_TOKEN", TOKEN)
    kc = arvados.keep.KeepClient(num_retries=0)
    data = os.urandom(50_000)
    md5 = hashlib.md5(data).hexdigest()
    loc = kc.put(data, copies=2)
    verify_signature(loc, TOKEN, SIGNING_KEY.encode())
    assert all(k.block_path(md5).read_bytes() == data for k in servers)
    assert arvados.keep.KeepClient(num_retries=0).get(loc) == data


def test_sdk_and_our_client_read_each_others_blocks(keepstore_factory):
    servers = keepstore_factory.many(2, signing_key=SIGNING_KEY)
    urls = [k.url for k in servers]
    ours = KeepClient(urls, TOKEN, replication=2, backoff_start=0)
    try:
        data = os.urandom(30_000)
        stored = ours.put(data)
        assert stored.replicas == 2
        assert sdk_client(urls).get(stored.locator) == data
        other = os.urandom(30_000)
        loc = sdk_client(urls).put(other, copies=2)
        assert ours.get(loc) == other
    finally:
        ours.close()


def test_sdk_not_found(keepstore):
    with pytest.raises(arvados.errors.NotFoundError):
        sdk_client([keepstore.url]).get(hashlib.md5(b"nope").hexdigest() + "+4")
