"""The minimum transfer rate a keepstore request body, or response, must keep up.

A client that sends its body (or reads its response) slowly holds a block buffer
of the server's memory budget for as long as it likes: four such clients, at a
few bytes a second, would lock every other client out. So each transfer is cut
into windows of ``window`` seconds from its first byte: at the end of each
window that it is still running, at least ``rate x window`` bytes must have
moved in it, or the transfer is aborted. A transfer that ends within a window is
never judged on it, so small bodies are never penalized for being small. The
defaults, 32 KiB/s over 30 s, are the Arvados SDK's own low-speed limit (its
clients give up below 32 KiB/s) over a shorter window.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class TooSlow(Exception):
    """A window ended with fewer bytes moved than the minimum rate requires."""

    def __init__(self, moved: int, window: float, rate: int):
        super().__init__(f"{moved / window:.0f} bytes/s over the last {window:g} s, "
                         f"below the minimum of {rate} bytes/s")
        self.moved = moved


@dataclass(slots=True)
class Pace:
    """Judges one transfer. ``rate`` 0 turns the check off."""

    rate: int
    window: float
    start: float                # when the current window began (a monotonic clock)
    moved: int = field(default=0)
    peer: str = ""              # who is at the other end, for messages

    @property
    def deadline(self) -> float:
        """When the current window ends (infinite when off)."""
        return self.start + self.window if self.rate > 0 else float("inf")

    def add(self, n: int, now: float) -> None:
        """``n`` bytes moved at ``now``."""
        self.moved += n
        self.check(now)

    def check(self, now: float) -> None:
        """At or past the window's end: TooSlow, or start the next window."""
        if now < self.deadline:
            return
        if self.moved < self.rate * self.window:
            raise TooSlow(self.moved, self.window, self.rate)
        self.start, self.moved = now, 0
