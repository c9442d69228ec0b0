"""At most one call every few seconds: for UI updates (a progress artifact) that must not cost a request per step."""

from __future__ import annotations

import time
from typing import Callable


class Throttle:
    """`ready()` is True at the first call, then again only once `seconds` have passed since the last True;
    `ready(force=True)` is always True (the last step, so the bar ends at 100 %)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock, self.last = seconds, clock, None

    def ready(self, force: bool = False) -> bool:
        """Whether to make the call now; a True starts the next interval."""
        now = self.clock()
        if not force and self.last is not None and now - self.last < self.seconds:
            return False
        self.last = now
        return True
