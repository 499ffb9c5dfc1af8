"""Exponential backoff with jitter, per key. Pure: the caller sleeps."""

from __future__ import annotations

import random

# One generator for the jitter of every key: seeding one per key (two per supervisor) cost a
# start with 10,000 keys a tenth of a second.
_JITTER = random.Random()


class Backoff:
    def __init__(
        self, initial: float, maximum: float, jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.failures = 0
        self._rng = rng or _JITTER

    def next_delay(self) -> float:
        """Count a failure and return how long to wait before the next attempt."""
        base = min(self.maximum, self.initial * 2 ** min(self.failures, 62))
        self.failures += 1
        spread = base * self.jitter
        return float(max(0.0, min(self.maximum, base + self._rng.uniform(-spread, spread))))

    def reset(self) -> None:
        self.failures = 0
