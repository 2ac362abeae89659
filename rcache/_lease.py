"""Computation leases of the cache's stampede protection, and their renewal.

When a cold key is computed, the first caller across all processes takes a short lease
(``cache_claim.lua``); the others wait for the value. The lease has its own TTL, not the
cache TTL (cashews sets the lock TTL to the cache TTL; dogpile's lock never expires,
dogpile #261), and is renewed every ``lease_ttl / 3`` while the function runs, by one
daemon thread per Cache and process, for sync and async callers alike. If the holder
dies, renewal stops and a waiter takes over within the lease TTL.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rcache._config import ttl_ms
from rcache._exceptions import RCacheError
from rcache._logging import cache_log

__all__ = ["LeaseKeeper"]

_IDLE_EXIT = 10.0


@dataclass(eq=False)
class Lease:
    key: str
    token: str
    ttl: float
    due: float = field(default=0.0)
    lost: bool = False


class LeaseKeeper:
    """Renews registered leases from one lazily started daemon thread."""

    def __init__(self, renew: Callable[[str, str, int], bool]) -> None:
        self._renew = renew
        self._cond = threading.Condition()
        self._leases: set[Lease] = set()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, key: str, token: str, ttl: float, held: bool = True) -> Lease:
        """Renew ``key`` while registered; ``held=False`` returns an inert handle."""
        lease = Lease(key, token, ttl, due=time.monotonic() + ttl / 3)
        if not held:
            return lease
        with self._cond:
            self._leases.add(lease)
            # a thread started before fork() does not exist in the child
            if (
                self._thread is None
                or self._pid != os.getpid()
                or not self._thread.is_alive()
            ):
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="rcache-lease-keeper", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return lease

    def remove(self, lease: Lease) -> None:
        with self._cond:
            self._leases.discard(lease)

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._cond:
                now = time.monotonic()
                if not self._leases:
                    if now - idle_since > _IDLE_EXIT:
                        self._thread = None
                        return
                    self._cond.wait(_IDLE_EXIT)
                    continue
                idle_since = now
                due = [lease for lease in self._leases if lease.due <= now]
                if not due:
                    self._cond.wait(min(lease.due for lease in self._leases) - now)
                    continue
            for lease in due:
                try:
                    ok = self._renew(lease.key, lease.token, ttl_ms(lease.ttl))
                except RCacheError as exc:
                    cache_log.warning(
                        "rcache: lease renewal failed: %s", type(exc).__name__
                    )
                    ok = True  # try again at the next period; the lease may still be ours
                with self._cond:
                    if not ok:
                        lease.lost = True
                        self._leases.discard(lease)
                    else:
                        lease.due = time.monotonic() + lease.ttl / 3
