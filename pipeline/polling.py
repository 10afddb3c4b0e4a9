"""When to poll a provider next: a first delay, then exponential backoff with jitter, capped,
until a deadline. Jitter keeps a batch submitted together from polling in lock-step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class PollPolicy:
    first_delay: float
    base_delay: float
    multiplier: float
    max_delay: float
    deadline: float  # seconds after submit

    def next_delay(self, polls_done: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before poll number ``polls_done + 1``."""
        if polls_done == 0:
            return self.first_delay
        raw = min(self.max_delay, self.base_delay * self.multiplier ** (polls_done - 1))
        return (rng or random).uniform(0.75, 1.0) * raw

    def expired(self, submitted_at: float, now: float) -> bool:
        return now - submitted_at > self.deadline
