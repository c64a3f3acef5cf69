"""Keep permission signatures: the ``+A<signature>@<expiry>`` locator hint.

The signature is a hex HMAC-SHA1 keyed with the cluster's blob signing key over

    <md5 hex> "@" <api token> "@" <expiry as 8 hex digits> "@" <TTL seconds in hex>

(KEEP_PROTOCOL.md section 3). The TTL takes part in the HMAC, so the signer and the
verifier must agree on both the key and the TTL. Only servers hold the key; clients
treat signatures as opaque.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

DEFAULT_TTL = 1209600  # 336 hours, Collections.BlobSigningTTL's default

# A signed locator: the hash, an optional size, any other hints, exactly one
# +A<40 hex>@<8 hex> hint, then any other hints.
_SIGNED_RE = re.compile(
    r"(?P<md5>[0-9a-fA-F]{32})(?:\+[0-9]+)?(?:\+[B-Z][A-Za-z0-9@_-]*)*"
    r"\+A(?P<sig>[0-9a-fA-F]{40})@(?P<expiry>[0-9a-fA-F]{8})"
    r"(?:\+[B-Z][A-Za-z0-9@_-]*)*")


class SignatureError(ValueError):
    """A locator's permission signature was refused."""


class SignatureMissing(SignatureError):
    """The locator carries no well-formed ``+A`` hint."""


class SignatureInvalid(SignatureError):
    """The ``+A`` hint does not match the block, token, key and TTL."""


class SignatureExpired(SignatureError):
    """The ``+A`` hint's expiry time has passed."""


def permission_signature(md5_hex: str, token: str, expiry_hex: str, ttl: int,
                         key: bytes) -> str:
    """The 40-hex-digit HMAC-SHA1 of one block for one token and expiry.

    A token is signed as the bytes it came in (an HTTP header that is not UTF-8
    arrives with surrogate escapes), as keepstore, which treats it as bytes, does.
    """
    msg = "@".join((md5_hex, token, expiry_hex, format(int(ttl), "x")))
    return hmac.new(key, msg.encode("utf-8", "surrogateescape"), hashlib.sha1).hexdigest()


def sign_locator(locator: str, token: str | None, key: bytes | None,
                 ttl: int = DEFAULT_TTL, expiry: int | None = None) -> str:
    """Add a ``+A`` signature valid until ``expiry`` (default: now + ttl).

    Any existing ``+A`` hint is replaced; the new one goes right after the size,
    where the Python SDK puts it. Without a key or a token the locator is returned
    unchanged, as keepstore does for an anonymous PUT.
    """
    if not key or not token:
        return locator
    if expiry is None:
        expiry = int(time.time()) + int(ttl)
    parts = locator.split("+")
    md5_hex = parts[0]
    expiry_hex = format(expiry, "08x")
    sig = permission_signature(md5_hex, token, expiry_hex, ttl, key)
    head = parts[:2] if len(parts) > 1 and parts[1].isdigit() else parts[:1]
    rest = [h for h in parts[len(head):] if not h.startswith("A")]
    return "+".join([*head, f"A{sig}@{expiry_hex}", *rest])


def verify_signature(locator: str, token: str, key: bytes, ttl: int = DEFAULT_TTL,
                     now: float | None = None) -> None:
    """Check a locator's ``+A`` hint; raise a SignatureError subclass if refused.

    The expiry is checked before the HMAC, as keepstore does, so an expired but
    otherwise wrong signature reports as expired.
    """
    m = _SIGNED_RE.fullmatch(locator)
    if not m:
        raise SignatureMissing(f"no permission signature in {locator!r}")
    expiry = int(m.group("expiry"), 16)
    if expiry < (time.time() if now is None else now):
        raise SignatureExpired("permission signature expired")
    expected = permission_signature(m.group("md5"), token, m.group("expiry"), ttl, key)
    if not hmac.compare_digest(m.group("sig"), expected):
        raise SignatureInvalid("invalid permission signature")
