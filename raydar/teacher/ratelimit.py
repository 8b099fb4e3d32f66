"""One request rate for a whole labelling job, shared by every actor on every node."""

from __future__ import annotations

import asyncio
import time

import ray


@ray.remote(num_cpus=0)
class _RateLimiterActor:
    """Hands out send times spaced 1/rate apart; callers sleep until theirs."""

    def __init__(self, rate_per_s: float) -> None:
        self.interval = 1.0 / rate_per_s
        self.next_slot = time.monotonic()

    def reserve(self) -> float:
        now = time.monotonic()
        slot = max(now, self.next_slot)
        self.next_slot = slot + self.interval
        return slot - now


class RateLimiter:
    """A picklable handle: create once in the driver, hand to every labelling actor."""

    def __init__(self, rate_per_s: float) -> None:
        self.rate_per_s = rate_per_s
        self._actor = _RateLimiterActor.remote(rate_per_s)

    async def wait(self) -> None:
        delay = await self._actor.reserve.remote()
        if delay > 0:
            await asyncio.sleep(delay)

    def shutdown(self) -> None:
        ray.kill(self._actor)
