"""Permission signatures: the known vector from the Arvados test suites, and refusals."""

import time

import pytest

from ingest.keep.signing import (
    DEFAULT_TTL,
    SignatureExpired,
    SignatureInvalid,
    SignatureMissing,
    permission_signature,
    sign_locator,
    verify_signature,
)

pytestmark = pytest.mark.timeout(10)

# The vector used by Arvados' Go and Rails signature tests (KEEP_PROTOCOL.md section 3).
KNOWN_LOCATOR = "acbd18db4cc2f85cedef654fccc4a4d8+3"
KNOWN_TOKEN = "hocfupkn2pjhrpgp2vxv8rsku7tvtx49arbc9s4bvu7p7wxqvk"
KNOWN_KEY = (
    b"13u9fkuccnboeewr0ne3mvapk28epf68a3bhj9q8sb4l6e4e5mkk"
    b"p6nhj2mmpscgu1zze5h5enydxfe3j215024u16ij4hjaiqs5u4pzsl3nczmaoxnc"
    b"ljkm4875xqn4xv058koz3vkptmzhyheiy6wzevzjmdvxhvcqsvr5abhl15c2d4o4"
    b"jhl0s91lojy1mtrzqqvprqcverls0xvy9vai9t1l1lvvazpuadafm71jl4mrwq2y"
    b"gokee3eamvjy8qq1fvy238838enjmy5wzy2md7yvsitp5vztft6j4q866efym7e6"
    b"vu5wm9fpnwjyxfldw3vbo01mgjs75rgo7qioh8z8ij7jpyp8508okhgbbex3ceei"
    b"786u5rw2a9gx743dj3fgq2irk")
KNOWN_SIGNED = KNOWN_LOCATOR + "+A89118b78732c33104a4d6231e8b5a5fa1e4301e3@7fffffff"


def test_known_vector_sign():
    assert DEFAULT_TTL == 1209600
    assert sign_locator(KNOWN_LOCATOR, KNOWN_TOKEN, KNOWN_KEY, DEFAULT_TTL, expiry=0x7fffffff) == KNOWN_SIGNED


def test_known_vector_verify():
    verify_signature(KNOWN_SIGNED, KNOWN_TOKEN, KNOWN_KEY, DEFAULT_TTL)


def test_ttl_is_part_of_the_hmac():
    # Without the TTL field (or with another TTL) the vector does not come out.
    assert permission_signature(KNOWN_LOCATOR[:32], KNOWN_TOKEN, "7fffffff", 3600, KNOWN_KEY) \
        != "89118b78732c33104a4d6231e8b5a5fa1e4301e3"
    with pytest.raises(SignatureInvalid):
        verify_signature(KNOWN_SIGNED, KNOWN_TOKEN, KNOWN_KEY, 3600)


def test_refusals():
    with pytest.raises(SignatureInvalid):
        verify_signature(KNOWN_SIGNED, "another-token", KNOWN_KEY)
    with pytest.raises(SignatureInvalid):
        verify_signature(KNOWN_SIGNED, KNOWN_TOKEN, b"another key")
    with pytest.raises(SignatureMissing):
        verify_signature(KNOWN_LOCATOR, KNOWN_TOKEN, KNOWN_KEY)
    with pytest.raises(SignatureMissing):  # expiry must be exactly 8 hex digits
        verify_signature(KNOWN_LOCATOR + "+A89118b78732c33104a4d6231e8b5a5fa1e4301e3@7ffff",
                         KNOWN_TOKEN, KNOWN_KEY)
    tampered = KNOWN_SIGNED.replace("+3+", "+4+")
    verify_signature(tampered, KNOWN_TOKEN, KNOWN_KEY)  # size is not signed, as in keepstore
    other_hash = "37b51d194a7513e45b56f6524f2d51f2+3" + KNOWN_SIGNED[34:]
    with pytest.raises(SignatureInvalid):
        verify_signature(other_hash, KNOWN_TOKEN, KNOWN_KEY)
    with pytest.raises(SignatureMissing):  # the whole locator must match, a trailing newline too
        verify_signature(KNOWN_SIGNED + "\n", KNOWN_TOKEN, KNOWN_KEY)


def test_locators_and_hashes_match_whole_never_with_a_trailing_newline():
    from ingest.keep.locator import Locator, LocatorError, is_md5_hex

    md5 = "acbd18db4cc2f85cedef654fccc4a4d8"
    assert is_md5_hex(md5) and not is_md5_hex(md5 + "\n")
    assert Locator.parse(KNOWN_SIGNED).permission_expiry is not None
    for text in (md5 + "+3\n", KNOWN_SIGNED + "\n", md5 + "+3+K@zzzzz\n"):
        with pytest.raises(LocatorError):
            Locator.parse(text)
    hint = KNOWN_SIGNED.split("+")[2]
    assert Locator(md5, 3, (hint + "\n",)).permission_expiry is None


def test_expired_is_reported_before_checking_the_hmac():
    past = int(time.time()) - 10
    signed = sign_locator(KNOWN_LOCATOR, KNOWN_TOKEN, KNOWN_KEY, expiry=past)
    with pytest.raises(SignatureExpired):
        verify_signature(signed, KNOWN_TOKEN, KNOWN_KEY)
    with pytest.raises(SignatureExpired):
        verify_signature(signed, "wrong token", KNOWN_KEY)


def test_sign_defaults_to_now_plus_ttl_and_orders_hints():
    before = int(time.time())
    signed = sign_locator(KNOWN_LOCATOR + "+Kzzzzz", KNOWN_TOKEN, KNOWN_KEY, ttl=600)
    md5, size, a_hint, k_hint = signed.split("+")
    assert (md5, size, k_hint) == (KNOWN_LOCATOR[:32], "3", "Kzzzzz")
    expiry = int(a_hint.split("@")[1], 16)
    assert before + 600 <= expiry <= int(time.time()) + 600
    verify_signature(signed, KNOWN_TOKEN, KNOWN_KEY, ttl=600)
    # Re-signing replaces the old +A hint.
    resigned = sign_locator(signed, "other", KNOWN_KEY, ttl=600)
    assert resigned.count("+A") == 1
    verify_signature(resigned, "other", KNOWN_KEY, ttl=600)


def test_no_key_or_no_token_leaves_the_locator_unsigned():
    assert sign_locator(KNOWN_LOCATOR, KNOWN_TOKEN, None) == KNOWN_LOCATOR
    assert sign_locator(KNOWN_LOCATOR, "", KNOWN_KEY) == KNOWN_LOCATOR
    assert sign_locator(KNOWN_LOCATOR, None, KNOWN_KEY) == KNOWN_LOCATOR
