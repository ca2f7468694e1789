"""The engine's clocks: the process's monotonic clock, and a fake one for tests and the simulator.

Every interval the engine reports is measured on one of these, never on wall time.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep_until(self, t: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, t: float) -> None:
        delay = t - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class FakeClock:
    """Time moves only when told to: the engine runs unchanged, the executor 'takes' the time
    its cost model predicts, and a run is reproducible to the bit."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def sleep_until(self, t: float) -> None:
        self.advance_to(t)

    def advance_to(self, t: float) -> None:
        if t > self._now:
            self._now = t
