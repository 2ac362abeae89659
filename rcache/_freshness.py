"""Freshness decisions for cached entries (pure: no IO, injected clock and randomness).

An entry has a logical expiry (``fresh_until`` in its envelope) and a longer Redis TTL
that keeps it around for the stale windows::

    created ......... fresh_until ....... + stale ....... + stale_if_error
    |---- fresh ------|---- stale --------|
    |---- fresh ------|---- usable only if recomputation fails ------------|

* **early** (XFetch, Vattani, Chierichetti and Lowenstein, "Optimal Probabilistic Cache
  Stampede Prevention", VLDB 2015): a fresh hit recomputes early with probability rising
  towards the expiry: ``now - delta * beta * ln(rand()) >= fresh_until``, where ``delta``
  is the compute time stored in the envelope. Hot keys are refreshed before they expire,
  by one caller (the one that also wins the lease); everyone else keeps the value.
* **stale** (stale-while-revalidate): after ``fresh_until``, for ``stale`` seconds,
  callers get the old value at once and one refresh runs in the background.
* **stale_if_error**: if recomputation raises, the old value is served for that long.

Every ``now`` here is Redis's clock, never a client's wall clock: the hit read returns
Redis ``TIME`` with the value (``cache_read.lua``) and envelopes are dated from the
``TIME`` of the claim that preceded the computation, carried forward by the monotonic
clock. Readers and writers whose clocks disagree by an hour still agree on freshness.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from rcache._config import ttl_ms
from rcache._serializers import Envelope

__all__ = ["EARLY", "EXPIRED", "FRESH", "MISS", "STALE", "Freshness", "stamp_blob"]

FRESH: Final = "fresh"
EARLY: Final = "early"
STALE: Final = "stale"
EXPIRED: Final = "expired"
MISS: Final = "miss"
State = Literal["fresh", "early", "stale", "expired", "miss"]
#: how far in the future an entry's creation time may lie before it is refused: the
#: server-clock estimate of a writer is off by a round trip at most
FUTURE_SLACK: Final = 1.0


@dataclass(frozen=True)
class Freshness:
    ttl: float
    beta: float = 0.0  # 0 disables early recomputation
    stale: float = 0.0
    stale_if_error: float = 0.0
    lease_ttl: float = 10.0
    wait: float = 10.0
    on_wait_timeout: Literal["compute", "raise"] = "compute"

    @property
    def redis_ttl(self) -> float:
        return self.ttl + max(self.stale, self.stale_if_error)

    @property
    def redis_ttl_ms(self) -> int:
        return ttl_ms(self.redis_ttl)

    def classify(
        self,
        env: Envelope | None,
        now: float,
        rand: Callable[[], float] = random.random,
    ) -> State:
        if env is None or env.created_at > now + FUTURE_SLACK:
            # an entry dated in the future was written by a clock that runs ahead (rcache
            # dates entries by Redis's clock; an old writer or a foreign one may not):
            # never trust it as fresh (issue 14 item 6)
            return MISS
        if now < env.fresh_until:
            if self.beta > 0.0 and env.compute_time > 0.0:
                # 1 - rand() is in (0, 1]: log() never sees 0
                gap = -env.compute_time * self.beta * math.log(1.0 - rand())
                if now + gap >= env.fresh_until:
                    return EARLY
            return FRESH
        if now < env.fresh_until + self.stale:
            return STALE
        return EXPIRED

    def usable_on_error(self, env: Envelope | None, now: float) -> bool:
        """May ``env`` be served because recomputation failed?"""
        return env is not None and now < env.fresh_until + self.stale_if_error


def stamp_blob(stamps: Sequence[bytes]) -> bytes:
    """What an envelope records of the stamps it was computed under (<= 255 bytes)."""
    blob = b"\x00".join(stamps)
    if len(blob) > 255:
        return hashlib.blake2b(blob, digest_size=32).digest()
    return blob
