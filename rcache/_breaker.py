"""Circuit breaker for cache operations (pure state machine, injected clock).

During an outage each cache call must cost microseconds, not a connect attempt or a
retry storm (cache.md §4: peers pay a connect attempt per call; redis-py 8.1 blocked
about 4 s per call). Closed -> open after ``failures`` consecutive unavailability errors;
open -> half-open after ``reset_after`` seconds, when exactly one caller probes; the probe's
success closes the breaker, its failure re-opens it with the delay doubled (capped).

Behind Sentinel (``steady()`` true) the delay is not doubled: the outage is a failover
that ends when the sentinels promote a replica, typically 2-3 s after the kill, and a
doubled schedule (probes at 1, 3, 7 s) served a failover done at 3.1 s only at 7 s. A
probe there costs a sentinel query and a connect, so one per ``reset_after`` is cheap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from rcache._config import BreakerPolicy

__all__ = ["CircuitBreaker"]

CLOSED, OPEN, HALF_OPEN = 0, 1, 2


class CircuitBreaker:
    def __init__(
        self,
        policy: BreakerPolicy,
        clock: Callable[[], float] = time.monotonic,
        steady: Callable[[], bool] = lambda: False,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._steady = steady  # asked on a failed probe only: off the hot path
        self._lock = threading.Lock()
        self._failures = 0
        self._state = CLOSED
        self._open_until = 0.0
        self._delay = policy.reset_after
        self._probing = False
        self.on_change: Callable[[int], None] | None = None

    @property
    def state(self) -> int:
        return self._state

    def blocked(self) -> bool:
        """True while open and not yet due for a probe (does not change state)."""
        return self._state == OPEN and self._clock() < self._open_until

    def allow(self) -> bool:
        """May a call go to Redis now? Cheap when closed (the hot path)."""
        if self._state == CLOSED:
            return True
        with self._lock:
            if self._state == OPEN and self._clock() >= self._open_until:
                self._set(HALF_OPEN)
            if self._state == HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def success(self) -> None:
        if self._state == CLOSED:
            self._failures = 0
            return
        with self._lock:
            self._failures = 0
            self._probing = False
            self._delay = self.policy.reset_after
            self._set(CLOSED)

    def abandon(self) -> None:
        """The call let through got no answer either way (cancelled, interrupted):
        free the probe slot so that the next caller probes (else, half-open, every
        call would be skipped until the process restarts)."""
        if self._state == CLOSED:
            return
        with self._lock:
            self._probing = False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state == HALF_OPEN:
                self._probing = False
                if not self._steady():
                    self._delay = min(self._delay * 2, self.policy.max_reset_after)
                self._open()
            elif self._state == CLOSED and self._failures >= self.policy.failures:
                self._open()

    def _open(self) -> None:
        self._open_until = self._clock() + self._delay
        self._set(OPEN)

    def _set(self, state: int) -> None:
        if state != self._state:
            self._state = state
            if self.on_change is not None:
                self.on_change(state)
