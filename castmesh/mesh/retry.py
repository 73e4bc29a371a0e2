"""Clocks for retrying after a loss: a window that counts from the loss, and the peers to avoid meanwhile.

Every wait of this kind counts from the event it is about. A subscription that followed one upstream for
a day has the whole window when that upstream dies; a second failure while it retries does not move the
deadline; and once the thing works again (frames flow) the window is given back whole for the next loss.

Peers that failed are avoided for a few seconds only: a relay that restarts on the same address (a
replaced pod, a restarted process) must be usable again, and a directory that still names a dead peer
costs one quick failed attempt every few seconds, not the whole window.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]


class RetryWindow:
    """How long to keep trying after a loss: `span` seconds from the moment it was lost."""

    def __init__(self, span: float, clock: Clock = time.monotonic) -> None:
        self.span = span
        self.clock = clock
        self.lost_at: float | None = None

    def lose(self) -> None:
        """It was lost now, unless it already was: a failure during the retries keeps the first deadline."""
        if self.lost_at is None:
            self.lost_at = self.clock()

    def recover(self) -> None:
        """It works again: the next loss gets a whole window."""
        self.lost_at = None

    @property
    def losing(self) -> bool:
        return self.lost_at is not None

    def elapsed(self) -> float:
        return 0.0 if self.lost_at is None else self.clock() - self.lost_at

    def expired(self) -> bool:
        return self.lost_at is not None and self.elapsed() >= self.span


class RecentFailures:
    """Peers that failed in the last `span` seconds, to try elsewhere first."""

    def __init__(self, span: float, clock: Clock = time.monotonic) -> None:
        self.span = span
        self.clock = clock
        self.failed: dict[str, float] = {}

    def add(self, address: str) -> None:
        self.failed[address] = self.clock()

    def current(self) -> set[str]:
        horizon = self.clock() - self.span
        for address in [a for a, at in self.failed.items() if at <= horizon]:
            del self.failed[address]
        return set(self.failed)

    def clear(self) -> None:
        self.failed.clear()
