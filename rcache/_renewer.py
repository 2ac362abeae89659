"""The lease watchdog: one daemon thread per process renews every held lease.

Why one thread per process and not one per lock: python-redis-lock starts a thread per
lock (and the thread dies silently on the first error, python-redis-lock #85/#91);
Redisson runs one timer for all locks (``renewal/LockTask``). A process that holds a
thousand locks here still has one renewer thread.

This module holds the only global mutable state of the lock code, on purpose: the
per-process renewer (``_RENEWER``), created lazily on the first acquisition (nothing
at import time) and re-created in a forked child, because a thread started before
``fork`` does not exist in the child (Artemis PR #2632). The child never renews or
releases its parent's leases: they stay with the parent's renewer object, which the
child never touches.

Each lease is renewed every ``ttl / 3`` (replace-TTL extend by token). A lease is
marked lost, and its ``on_lost`` callback runs (in the renewer thread), when

* Redis answers that the token is gone (expired, deleted, taken over), or
* its client-side deadline passes without a successful renewal: the deadline is the
  monotonic time at which the last successful acquire/extend was *sent* plus the lease,
  minus a drift margin, so a holder that cannot reach Redis learns it lost the lease
  before (not after) the server can give it to someone else; or
* ``max_hold`` is reached: renewal stops and the lease runs out (python-redis-lock #114:
  endless renewal turns a hung holder into a permanent lock).

Deadlines are watched by one thread and renewal IO runs in others (one per Redis client,
started on demand, gone when idle): a renewal call that hangs (Redis stopped: a 1 s
socket timeout, retried once) cannot delay ``on_lost`` past the deadline (issue 14: it
fired ~0.7 s late because deadlines were checked only between renewal calls), nor the
renewals of leases on other servers. The IO threads also run the background clean-up of
lock calls that gave up (``submit``), so that a lock wait never spends its caller's
budget on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from rcache._exceptions import RCacheError
from rcache._logging import lock_log

if TYPE_CHECKING:
    from rcache._lock import Lease

__all__ = ["Renewer", "get_renewer"]

#: The renewer thread exits after this long without leases (a new one starts on demand).
_IDLE_EXIT = 10.0
#: Leases renewed per pipeline.
_BATCH = 100
#: Most background jobs queued for the IO thread; past it, clean-up is dropped (the
#: leases it would have released expire by their TTL) rather than piling up.
_MAX_QUEUED = 1000


class Renewer:
    """Renews leases in one daemon thread; see the module docstring."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._cond = threading.Condition()
        self._leases: set[Lease] = set()
        self._thread: threading.Thread | None = None
        #: When the thread will next look at its leases on its own; ``add`` wakes it
        #: only for a lease due earlier (a notify per acquisition would cost a GIL
        #: hand-off on every lock call).
        self._wake_at = 0.0
        #: One IO thread and job queue per Redis client (driver), so that a hung
        #: server delays only the leases and clean-up of its own clients.
        self._io: dict[int, tuple[queue.Queue[Callable[[], object]], threading.Thread]]
        self._io = {}
        self._io_lock = threading.Lock()

    def submit(self, job: Callable[[], object], client: object = None) -> None:
        """Run ``job()`` in the IO thread of ``client`` (its driver object); best
        effort: dropped when that queue is full."""
        key = id(client)
        with self._io_lock:
            entry = self._io.get(key)
            if entry is None:
                jobs: queue.Queue[Callable[[], object]] = queue.Queue(_MAX_QUEUED)
                thread = threading.Thread(
                    target=self._run_io,
                    args=(key, jobs),
                    name="rcache-lock-io",
                    daemon=True,
                )
                entry = self._io[key] = (jobs, thread)
                thread.start()
            try:
                entry[0].put_nowait(job)
            except queue.Full:
                lock_log.debug("rcache: lock IO queue full, dropping a background job")

    def _run_io(self, key: int, jobs: queue.Queue[Callable[[], object]]) -> None:
        while True:
            try:
                job = jobs.get(timeout=_IDLE_EXIT)
            except queue.Empty:
                with self._io_lock:
                    if jobs.empty():
                        del self._io[key]
                        return
                continue
            try:
                job()
            except Exception:  # a job must never kill the thread
                lock_log.exception("rcache: background lock job failed")

    def add(self, lease: Lease) -> None:
        with self._cond:
            self._leases.add(lease)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="rcache-lock-renewer", daemon=True
                )
                self._thread.start()
            elif min(lease.next_renew, lease.deadline) < self._wake_at:
                self._cond.notify()

    def remove(self, lease: Lease) -> None:
        with self._cond:
            self._leases.discard(lease)

    def __len__(self) -> int:
        return len(self._leases)

    def _run(self) -> None:
        idle_since: float | None = None
        while True:
            with self._cond:
                now = time.monotonic()
                if not self._leases:
                    if idle_since is None:
                        idle_since = now
                    elif now - idle_since >= _IDLE_EXIT:
                        self._thread = None
                        return
                    self._wake_at = now + _IDLE_EXIT
                    self._cond.wait(_IDLE_EXIT)
                    continue
                idle_since = None
                # A lease due within a twelfth of its TTL is renewed with the ones due
                # now (renewal replaces the TTL, so early is harmless): leases taken
                # moments apart share one pipeline instead of drifting into many.
                due = [
                    lease
                    for lease in self._leases
                    if lease.next_renew <= now + lease.ttl / 12 or lease.deadline <= now
                ]
                if not due:
                    wake = min(
                        min(lease.next_renew, lease.deadline) for lease in self._leases
                    )
                    self._wake_at = wake
                    self._cond.wait(max(0.0, wake - now))
                    continue
                self._wake_at = 0.0  # busy: add() need not wake it
            # IO in the IO thread: this thread only watches deadlines, so a renewal
            # hung on a stopped Redis cannot delay on_lost. Sync leases of one client
            # are renewed together, one pipeline per _BATCH leases (Redisson
            # renewal/LockTask): O(clients), not O(locks), round trips.
            batches: dict[int, list[Lease]] = {}
            for lease in due:
                if self._service(lease):
                    lease.next_renew = float("inf")  # in flight until it answers
                    batches.setdefault(id(lease.owner._cache._sync), []).append(lease)
            for leases in batches.values():
                driver = leases[0].owner._cache._sync
                for i in range(0, len(leases), _BATCH):
                    self.submit(self._renewal_job(leases[i : i + _BATCH]), driver)

    def _renewal_job(self, leases: list[Lease]) -> Callable[[], None]:
        def job() -> None:
            try:
                self._renew_sync(leases)
            finally:
                for lease in leases:
                    if lease.next_renew == float("inf") and not lease.lost:
                        self._failed(lease, RCacheError("renewal did not run"))
                with self._cond:
                    self._cond.notify()  # next renewal times changed

        return job

    def _service(self, lease: Lease) -> bool:
        """Handle what needs no sync IO; True if the lease needs a sync renewal now."""
        now = time.monotonic()
        if lease.lost or lease.released:
            self.remove(lease)
            return False
        if now >= lease.deadline:
            self._lost(lease, "its lease ran out without a successful renewal")
            return False
        if lease.renew_until is not None and now >= lease.renew_until:
            lease.next_renew = float("inf")  # max_hold reached: let the lease run out
            return False
        if lease.loop is not None:
            self._schedule_async(lease, time.monotonic())
            return False
        return True

    def _renew_one(self, lease: Lease, sent: float) -> None:
        try:
            ok = lease.owner._renew_io(lease)
        except RCacheError as exc:
            self._failed(lease, exc)
            return
        self._done(lease, ok, sent)

    def _renew_sync(self, leases: list[Lease]) -> None:
        sent = time.monotonic()
        if len(leases) == 1:
            self._renew_one(leases[0], sent)
            return
        try:
            results = leases[0].owner._renew_many(leases)
        except RCacheError as exc:
            for lease in leases:
                self._failed(lease, exc)
            return
        for lease, result in zip(leases, results, strict=True):
            if isinstance(result, BaseException):  # e.g. NOSCRIPT after a restart
                self._renew_one(lease, sent)
            else:
                self._done(lease, int(result) == 1, sent)

    def _schedule_async(self, lease: Lease, sent: float) -> None:
        """Renew an async lease on its own loop; the result comes back by callback."""
        loop = lease.loop
        assert loop is not None
        lease.next_renew = float("inf")  # in flight: not due again until it answers
        try:
            future = asyncio.run_coroutine_threadsafe(
                lease.owner._arenew_io(lease), loop
            )
        except RuntimeError:  # the loop is closed: nobody can hold this lease any more
            self._lost(lease, "its event loop is closed")
            return

        def done(fut: concurrent.futures.Future[bool]) -> None:
            exc = fut.exception() if not fut.cancelled() else RCacheError("cancelled")
            if exc is None:
                self._done(lease, fut.result(), sent)
            elif isinstance(exc, RCacheError):
                self._failed(lease, exc)
            else:
                self._lost(lease, f"renewal failed: {exc!r}")
            with self._cond:
                self._cond.notify()  # the lease's next renewal time changed

        future.add_done_callback(done)

    def _failed(self, lease: Lease, exc: RCacheError) -> None:
        # Transient trouble: try again soon (jittered), well before the deadline.
        lock_log.debug("rcache: renewing lock %s failed: %s", lease.name, exc)
        lease.next_renew = time.monotonic() + min(lease.ttl / 10, 1.0) * (
            0.5 + random.random()
        )

    def _done(self, lease: Lease, ok: bool, sent: float) -> None:
        # A loss is final, even if a late reply to a renewal sent before says ok.
        if lease.released or lease.lost:
            return
        if ok:
            lease._renewed(sent)
            lease.owner._metrics.lock_renewal(lease.metrics_name, "renewed")
        else:
            self._lost(lease, "Redis no longer holds its token (expired or taken over)")

    def _lost(self, lease: Lease, reason: str) -> None:
        self.remove(lease)
        lease._mark_lost(reason)


_RENEWER: Renewer | None = None
_RENEWER_LOCK = threading.Lock()


def get_renewer() -> Renewer:
    """The renewer of this process (a new one after ``fork``)."""
    global _RENEWER
    renewer = _RENEWER
    if renewer is not None and renewer.pid == os.getpid():
        return renewer
    with _RENEWER_LOCK:
        if _RENEWER is None or _RENEWER.pid != os.getpid():
            _RENEWER = Renewer()
        return _RENEWER
