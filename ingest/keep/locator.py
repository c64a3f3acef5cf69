"""Keep block locators: ``<md5>+<size>[+<hint>...]``.

Hints follow the grammar of the manifest format docs (an uppercase letter, then
``[A-Za-z0-9@_-]``). The permission hint ``+A<sig>@<expiry>`` is kept right after the
size, as the official Python client formats it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BLOCK_SIZE_MAX = 1 << 26  # 67,108,864 bytes
EMPTY_BLOCK_MD5 = "d41d8cd98f00b204e9800998ecf8427e"
EMPTY_BLOCK_LOCATOR = EMPTY_BLOCK_MD5 + "+0"

_MD5_RE = re.compile(r"[0-9a-f]{32}")
_LOCATOR_RE = re.compile(r"([0-9a-f]{32})\+([0-9]+)((?:\+[A-Z][-A-Za-z0-9@_]*)*)")
_PERMISSION_RE = re.compile(r"A([0-9a-f]{40})@([0-9a-f]{1,8})")


class LocatorError(ValueError):
    """A string that is not a valid block locator."""


@dataclass(frozen=True, slots=True)
class Locator:
    """A parsed block locator."""

    md5: str
    size: int
    hints: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Locator:
        """Parse ``md5+size[+hints]``; raise LocatorError naming the text if invalid."""
        m = _LOCATOR_RE.fullmatch(text)
        if not m:
            raise LocatorError(f"invalid block locator {text!r}")
        hints = tuple(h for h in m.group(3).split("+") if h)
        return cls(m.group(1), int(m.group(2)), hints)

    def __str__(self) -> str:
        ordered = sorted(self.hints, key=lambda h: not h.startswith("A"))
        return "+".join([self.md5, str(self.size), *ordered])

    def stripped(self) -> str:
        """The portable form, ``md5+size``."""
        return f"{self.md5}+{self.size}"

    @property
    def permission_expiry(self) -> int | None:
        """Unix expiry time of the ``+A`` signature, or None when unsigned."""
        for hint in self.hints:
            m = _PERMISSION_RE.fullmatch(hint)
            if m:
                return int(m.group(2), 16)
        return None


def is_md5_hex(text: str) -> bool:
    """True for a 32-digit lowercase hex string."""
    return bool(_MD5_RE.fullmatch(text))
