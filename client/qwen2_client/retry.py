"""Retries: exponential backoff with full jitter, on UNAVAILABLE / RESOURCE_EXHAUSTED only."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .errors import RETRYABLE_CODES, Qwen2Error


@dataclass(frozen=True)
class RetryPolicy:
    """`max_attempts` calls in all (1 = no retry). Before attempt n+1 the client sleeps a uniformly random
    time in [0, min(max_delay, base_delay * 2**(n-1))] ("full jitter"), or the server's RetryInfo delay
    when that is longer (still capped at max_delay). A stream is retried only until its first message."""

    max_attempts: int = 4
    base_delay: float = 0.1
    max_delay: float = 5.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("base_delay and max_delay must be >= 0")

    def ceiling(self, attempt: int) -> float:
        """The largest sleep after failed attempt `attempt` (1-based)."""
        return min(self.max_delay, self.base_delay * 2 ** (attempt - 1))

    def backoff(self, attempt: int) -> float:
        return self.rng.uniform(0.0, self.ceiling(attempt))

    def delay_after(self, attempt: int, error: Qwen2Error, remaining: float | None) -> float | None:
        """Seconds to sleep before retrying after failed attempt `attempt`, or None to give up and raise.

        `remaining` is the time left before the call's deadline (None: no deadline); a retry that could
        not start before the deadline is not made.
        """
        if error.code not in RETRYABLE_CODES or attempt >= self.max_attempts:
            return None
        delay = self.backoff(attempt)
        hint = error.retry_delay
        if hint is not None:
            delay = min(self.max_delay, max(delay, hint))
        if remaining is not None and delay >= remaining:
            return None
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)
