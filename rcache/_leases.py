"""The lease renewer: one per process keeps every lease alive (locks, cache computation
leases, Celery task guards) and tells its owner when one is lost.

Why one thread per process and not one per lock or per Cache: python-redis-lock starts a
thread per lock (and the thread dies silently on the first error, python-redis-lock
#85/#91); Redisson runs one timer for all locks (``renewal/LockTask``). A process that
holds a thousand locks, computes in ten Caches and runs Celery tasks still has one
renewer thread.

The renewer knows nothing about locks, caches or Celery. An owner registers a
:class:`Renewable`: the *command* that renews it (a ``_flow`` command, typically an
``Eval`` of a compare-and-PEXPIRE script, whose reply is 1 while the lease is still
ours), the driver that runs it (a ``SyncDriver``; or an ``AsyncDriver`` and the event
loop the lease was taken on), its TTL, its client-side deadline and what to do when it
is lost. A lease is renewed every ``ttl / 3`` (replace-TTL, never add) and lost, once,
when

* Redis answers that it is no longer ours (expired, deleted, taken over), or
* its client-side deadline passes without a successful renewal: the deadline is the
  monotonic time at which the last successful acquire/renewal was *sent* plus the TTL,
  minus a drift margin, so a holder that cannot reach Redis learns it lost the lease
  before (not after) the server can give it to someone else; or
* ``max_hold`` is reached: renewal stops and the lease runs out (python-redis-lock #114:
  endless renewal turns a hung holder into a permanent lock).

Async leases are renewed on their own event loop through that loop's client (so a
blocked loop loses its lease, as a paused process does), never through a sync client
that may point elsewhere (``Cache(async_client=...)`` without a URL).

Deadlines are watched by one thread and renewal IO runs in others (one per Redis client,
started on demand, gone when idle): a renewal call that hangs (Redis stopped: a 1 s
socket timeout, retried once) cannot delay ``on_lost`` past the deadline (issue 14: it
fired ~0.7 s late because deadlines were checked only between renewal calls), nor the
renewals of leases on other servers. Sync leases of one client are renewed together,
one pipeline per ``_BATCH`` leases. The IO threads also run other background jobs of
their client (``submit``: the clean-up of lock calls that gave up), so that a lock wait
never spends its caller's budget on them.

This module holds the only process-global state of the lease code, on purpose: the
renewer (``_RENEWER``), created lazily on first use (nothing at import time) and
re-created in a forked child, because a thread started before ``fork`` does not exist in
the child (Artemis PR #2632, celery #4607). The child never renews or releases its
parent's leases: they stay with the parent's renewer object, which the child never
touches. The thread keeps the name ``rcache-lock-renewer`` that it had when it renewed
only locks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from rcache._config import ttl_ms
from rcache._exceptions import RCacheError
from rcache._flow import AsyncDriver, Command, Eval, SyncDriver
from rcache._logging import lock_log

if TYPE_CHECKING:
    import redis

    from rcache._redis import LuaScript

__all__ = ["KeyLeases", "LeaseRenewer", "Renewable", "get_renewer", "keep"]

#: A thread (renewer or IO) exits after this long with nothing to do; a new one starts
#: on demand.
_IDLE_EXIT = 10.0
#: Leases renewed per pipeline.
_BATCH = 100
#: Most background jobs queued per IO thread; past it, a job is dropped (the leases a
#: clean-up would have released expire by their TTL) rather than piling up.
_MAX_QUEUED = 1000
_INF = float("inf")


class Renewable:
    """A lease as the renewer sees it: how to renew it, when, and whom to tell.

    ``command`` renews it (reply 1: still ours, anything else: lost) through ``driver``:
    a ``SyncDriver``, or an ``AsyncDriver`` with ``loop``, the loop the lease was taken
    on. ``sent`` is the monotonic time at which the call that took the lease was
    sent; ``renew=False`` only watches the deadline (for ``on_lost``) without renewing.
    ``on_renewed()`` runs after each renewal, ``on_lost(reason)`` once, both in a renewer
    thread (an async lease's on its loop): keep them short. Subclasses (a lock's
    ``Lease``) may override :meth:`_renew_command`, :meth:`_confirmed` and
    :meth:`_mark_lost` instead of passing callables.
    """

    # Defaults as class attributes: a lock creates a lease on every acquisition, and an
    # attribute not set per instance costs nothing there.
    loop: asyncio.AbstractEventLoop | None = None
    renew_until: float | None = None
    lost = False
    lost_reason = ""
    #: Registered with a renewer (set and cleared under the renewer's lock): a reply
    #: that comes after ``remove`` is ignored.
    active = False
    log: logging.Logger = lock_log
    _command: Command | None = None
    _on_renewed: Callable[[], object] | None = None
    _on_lost: Callable[[str], object] | None = None

    def __init__(
        self,
        driver: SyncDriver | AsyncDriver,
        *,
        ttl: float,
        sent: float,
        command: Command | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        renew: bool = True,
        max_hold: float | None = None,
        name: str = "",
        log: logging.Logger | None = None,
        on_renewed: Callable[[], object] | None = None,
        on_lost: Callable[[str], object] | None = None,
    ) -> None:
        self.driver = driver
        self.ttl = ttl
        self.renew = renew
        self.name = name
        if loop is not None:
            self.loop = loop
        if max_hold is not None:
            self.renew_until = sent + max_hold
        if log is not None:
            self.log = log
        if command is not None:
            self._command = command
        if on_renewed is not None:
            self._on_renewed = on_renewed
        if on_lost is not None:
            self._on_lost = on_lost
        self._renewed(sent)

    def _renewed(self, sent: float, ttl: float | None = None) -> None:
        """The lease was (re)confirmed by a call sent at monotonic time ``sent``."""
        if ttl is not None:
            self.ttl = ttl
        # Drift margin as in the Redlock algorithm: 1 % of the lease plus 2 ms.
        self.deadline = sent + self.ttl - (self.ttl * 0.01 + 0.002)
        self.next_renew = sent + self.ttl / 3 if self.renew else _INF

    def _renew_command(self) -> Command:
        """The command that renews the lease now (reply 1 while it is ours)."""
        if self._command is None:
            raise NotImplementedError("pass command= or override _renew_command")
        return self._command

    def _confirmed(self, sent: float) -> None:
        """The renewer renewed the lease by a call sent at ``sent``."""
        self._renewed(sent)
        if self._on_renewed is not None:
            self._on_renewed()

    def _mark_lost(self, reason: str) -> None:
        """Record the loss once and tell the owner."""
        if self.lost:
            return
        self.lost = True
        self.lost_reason = reason
        self.log.debug("rcache: lease %s lost: %s", self.name, reason)
        if self._on_lost is not None:
            try:
                self._on_lost(reason)
            except Exception:  # an owner's callback must not kill the renewer
                self.log.exception("rcache: on_lost of lease %s failed", self.name)


@dataclass(frozen=True, slots=True)
class _Pipeline(Command):
    """Several ``Eval`` renewals of one client in one round trip (Redisson
    renewal/LockTask): replies per command, an exception object for one that failed
    (e.g. NOSCRIPT after a restart: retried alone, which loads the script)."""

    evals: Sequence[Eval]

    def run(self, driver: SyncDriver) -> list[Any]:
        evals = self.evals

        def op(client: redis.Redis) -> list[Any]:
            pipe: Any = client.pipeline(transaction=False)
            for e in evals:
                # execute_command, not evalsha(): a Redis Cluster pipeline refuses its
                # evalsha() ("blocked in cluster mode"), and every batch of renewals
                # failed there, so that two leases held at once were both lost.
                pipe.execute_command(
                    "EVALSHA", e.script.sha, len(e.keys), *e.keys, *e.args
                )
            return list(pipe.execute(raise_on_error=False))

        return driver.redis.run(op, retry=all(e.retry for e in evals))

    async def arun(self, driver: AsyncDriver) -> Any:
        raise NotImplementedError("async leases are renewed one by one on their loop")


class LeaseRenewer:
    """Renews registered :class:`Renewable` leases; see the module docstring.

    ``clock`` and ``idle_exit`` are for tests (an injected clock drives the schedule).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        idle_exit: float = _IDLE_EXIT,
    ) -> None:
        self.pid = os.getpid()
        self._clock = clock
        self._idle_exit = idle_exit
        self._cond = threading.Condition()
        self._leases: set[Renewable] = set()
        self._thread: threading.Thread | None = None
        #: When the thread will next look at its leases on its own; ``add`` wakes it
        #: only for a lease due earlier (a notify per acquisition would cost a GIL
        #: hand-off on every lock call).
        self._wake_at = 0.0
        #: One IO thread and job queue per Redis client, so that a hung server delays
        #: only the leases and clean-up of its own clients.
        self._io: dict[int, tuple[queue.Queue[Callable[[], object]], threading.Thread]]
        self._io = {}
        self._io_lock = threading.Lock()

    # -- registration -------------------------------------------------------------------

    def add(self, lease: Renewable) -> None:
        """Renew ``lease`` (and watch its deadline) until :meth:`remove` or its loss."""
        with self._cond:
            lease.active = True
            self._leases.add(lease)
            if self._thread is None or not self._thread.is_alive():
                self._start()
            elif min(lease.next_renew, lease.deadline) < self._wake_at:
                self._cond.notify()

    def remove(self, lease: Renewable) -> None:
        """Stop renewing ``lease``; a renewal already sent is ignored when it answers."""
        with self._cond:
            lease.active = False
            self._leases.discard(lease)

    def __len__(self) -> int:
        return len(self._leases)

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="rcache-lock-renewer", daemon=True
        )
        self._thread.start()

    # -- background jobs ----------------------------------------------------------------

    def submit(self, job: Callable[[], object], client: object = None) -> None:
        """Run ``job()`` in the IO thread of ``client`` (a ``SyncRedis``); best
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
                lock_log.debug("rcache: lease IO queue full, dropping a background job")

    def _run_io(self, key: int, jobs: queue.Queue[Callable[[], object]]) -> None:
        while True:
            try:
                job = jobs.get(timeout=self._idle_exit)
            except queue.Empty:
                with self._io_lock:
                    if jobs.empty():
                        del self._io[key]
                        return
                continue
            try:
                job()
            except Exception:  # a job must never kill the thread
                lock_log.exception("rcache: background lease job failed")

    # -- the deadline thread ------------------------------------------------------------

    def _run(self) -> None:
        idle_since: float | None = None
        while True:
            with self._cond:
                now = self._clock()
                if not self._leases:
                    if idle_since is None:
                        idle_since = now
                    elif now - idle_since >= self._idle_exit:
                        self._thread = None
                        return
                    self._wake_at = now + self._idle_exit
                    self._cond.wait(self._idle_exit)
                    continue
                idle_since = None
                due, wake = self._due(now)
                if not due:
                    self._wake_at = wake
                    self._cond.wait(max(0.0, wake - now))
                    continue
                self._wake_at = 0.0  # busy: add() need not wake it
            self._dispatch(due, now)

    def _due(self, now: float) -> tuple[list[Renewable], float]:
        """The leases to look at now, and (if none) when the next one is due."""
        # A lease due within a twelfth of its TTL is renewed with the ones due now
        # (renewal replaces the TTL, so early is harmless): leases taken moments apart
        # share one pipeline instead of drifting into many.
        due = [
            lease
            for lease in self._leases
            if lease.next_renew <= now + lease.ttl / 12
            or lease.deadline <= now
            or lease.lost
        ]
        if due:
            return due, now
        return due, min(min(x.next_renew, x.deadline) for x in self._leases)

    def _dispatch(self, due: list[Renewable], now: float) -> None:
        """Handle the due leases: losses here, async renewals on their loops, sync ones
        in the IO thread of their client (this thread only watches deadlines, so a
        renewal hung on a stopped Redis cannot delay on_lost). Sync leases of one client
        are renewed together, one pipeline per ``_BATCH``: O(clients), not O(leases),
        round trips."""
        batches: dict[int, list[Renewable]] = {}
        for lease in due:
            if not self._service(lease, now):
                continue
            lease.next_renew = _INF  # in flight until it answers
            if isinstance(lease.driver, AsyncDriver):
                self._schedule_async(lease, lease.driver, now)
            else:
                batches.setdefault(id(lease.driver.redis), []).append(lease)
        for leases in batches.values():
            driver = leases[0].driver
            assert isinstance(driver, SyncDriver)
            for i in range(0, len(leases), _BATCH):
                self.submit(
                    self._renewal_job(driver, leases[i : i + _BATCH]), driver.redis
                )

    def _service(self, lease: Renewable, now: float) -> bool:
        """Handle what needs no IO; True if the lease needs a renewal now."""
        if lease.lost or not lease.active:
            self.remove(lease)
            return False
        if now >= lease.deadline:
            self._lost(lease, "its lease ran out without a successful renewal")
            return False
        if lease.renew_until is not None and now >= lease.renew_until:
            lease.next_renew = _INF  # max_hold reached: let the lease run out
            return False
        return lease.next_renew <= now + lease.ttl / 12

    # -- renewal IO ---------------------------------------------------------------------

    def _renewal_job(
        self, driver: SyncDriver, leases: list[Renewable]
    ) -> Callable[[], None]:
        def job() -> None:
            try:
                self._renew_sync(driver, leases)
            finally:
                for lease in leases:
                    if lease.next_renew == _INF and lease.active and not lease.lost:
                        self._failed(lease, RCacheError("renewal did not run"))
                with self._cond:
                    self._cond.notify()  # next renewal times changed

        return job

    def _renew_sync(self, driver: SyncDriver, leases: list[Renewable]) -> None:
        sent = self._clock()
        batch: list[tuple[Renewable, Eval]] = []
        others: list[tuple[Renewable, Command]] = []
        for lease in leases:
            command = lease._renew_command()
            if isinstance(command, Eval) and command.guard is None:
                batch.append((lease, command))
            else:
                others.append((lease, command))
        # Plain renewals first, in one pipeline: a renewal that waits for replicas
        # (min_replicas: up to replica_timeout each) must not delay the others.
        if len(batch) == 1:
            others.insert(0, batch.pop())
        elif batch:
            self._renew_batch(driver, batch, sent)
        for lease, command in others:
            self._renew_one(driver, lease, command, sent)

    def _renew_batch(
        self, driver: SyncDriver, batch: list[tuple[Renewable, Eval]], sent: float
    ) -> None:
        try:
            replies = driver.execute(_Pipeline([command for _, command in batch]))
        except RCacheError as exc:
            for lease, _ in batch:
                self._failed(lease, exc)
            return
        for (lease, command), reply in zip(batch, replies, strict=True):
            if isinstance(reply, BaseException):  # e.g. NOSCRIPT after a restart
                self._renew_one(driver, lease, command, sent)
            else:
                self._done(lease, reply, sent)

    def _renew_one(
        self, driver: SyncDriver, lease: Renewable, command: Command, sent: float
    ) -> None:
        try:
            reply = driver.execute(command)
        except RCacheError as exc:
            self._failed(lease, exc)
            return
        self._done(lease, reply, sent)

    def _schedule_async(
        self, lease: Renewable, driver: AsyncDriver, sent: float
    ) -> None:
        """Renew an async lease on its own loop; the reply comes back by callback."""
        loop = lease.loop
        assert loop is not None
        coro = driver.execute(lease._renew_command())
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop is closed: nobody can hold this lease any more
            coro.close()
            self._lost(lease, "its event loop is closed")
            return

        def done(fut: concurrent.futures.Future[Any]) -> None:
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

    # -- outcomes -----------------------------------------------------------------------

    def _failed(self, lease: Renewable, exc: RCacheError) -> None:
        # Transient trouble: try again soon (jittered), well before the deadline.
        lease.log.debug("rcache: renewing lease %s failed: %s", lease.name, exc)
        lease.next_renew = self._clock() + min(lease.ttl / 10, 1.0) * (
            0.5 + random.random()
        )

    def _done(self, lease: Renewable, reply: Any, sent: float) -> None:
        # A loss is final, even if a late reply to a renewal sent before says ok.
        if lease.lost or not lease.active:
            return
        if reply == 1:
            lease._confirmed(sent)
        else:
            self._lost(lease, "Redis no longer holds its token (expired or taken over)")

    def _lost(self, lease: Renewable, reason: str) -> None:
        with self._cond:  # a lease removed meanwhile (released, finished) is not lost
            if not lease.active:
                return
            lease.active = False
            self._leases.discard(lease)
        lease._mark_lost(reason)


class _Drivers(Protocol):
    _driver: SyncDriver
    _adriver: AsyncDriver


def keep(
    owner: _Drivers,
    command: Command,
    *,
    ttl: float,
    loop: asyncio.AbstractEventLoop | None = None,
    name: str = "",
    log: logging.Logger | None = None,
    on_renewed: Callable[[], object] | None = None,
    on_lost: Callable[[str], object] | None = None,
) -> Renewable:
    """Renew a lease just taken (now) by running ``command`` through ``owner``'s sync
    driver, or its async one on ``loop`` (the running loop of an async holder), until
    ``get_renewer().remove(lease)`` or its loss."""
    lease = Renewable(
        owner._driver if loop is None else owner._adriver,
        ttl=ttl,
        sent=time.monotonic(),
        command=command,
        loop=loop,
        name=name,
        log=log,
        on_renewed=on_renewed,
        on_lost=on_lost,
    )
    get_renewer().add(lease)
    return lease


class KeyLeases:
    """Leases held as ``key = token``, renewed by ``script`` (KEYS[1] the key, ARGV the
    token and the TTL in ms; reply 1 while the key holds the token) through ``owner``'s
    drivers: the sync one, or the async one on the loop the lease was taken on."""

    def __init__(self, script: LuaScript, owner: _Drivers, log: logging.Logger) -> None:
        self._script = script
        self._owner = owner
        self._log = log

    def add(
        self,
        key: str,
        token: str,
        ttl: float,
        held: bool = True,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Renewable | None:
        """Renew ``key`` while registered (None when ``held`` is False: nothing to
        renew). ``loop``: the running loop of an async holder."""
        if not held:
            return None
        command = Eval(self._script, [key], [token, ttl_ms(ttl)])
        # named by kind, not by key: a cache key holds the call's arguments, which
        # never reach the logs
        return keep(
            self._owner,
            command,
            ttl=ttl,
            loop=loop,
            name="of a cached computation",
            log=self._log,
        )

    def remove(self, lease: Renewable | None) -> None:
        """Stop renewing ``lease`` (a no-op for None)."""
        if lease is not None:
            get_renewer().remove(lease)


_RENEWER: LeaseRenewer | None = None
_RENEWER_LOCK = threading.Lock()


def get_renewer() -> LeaseRenewer:
    """The renewer of this process (a new one after ``fork``)."""
    global _RENEWER
    renewer = _RENEWER
    if renewer is not None and renewer.pid == os.getpid():
        return renewer
    with _RENEWER_LOCK:
        if _RENEWER is None or _RENEWER.pid != os.getpid():
            _RENEWER = LeaseRenewer()
        return _RENEWER
