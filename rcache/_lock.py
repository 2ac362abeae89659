"""Distributed locks on one Redis primary: ``Lock``, ``@locked``, RW lock, semaphore.

What a Redis lock can promise (say it plainly, Kleppmann 2016, antirez 2016): on a
single primary, acquire and release are linearizable at the server, but the holder has
a *lease*. A pause longer than the lease (GC, SIGSTOP, a blocked event loop), a failover
to a replica that missed the write, or a server clock jump can give two actors the
resource at once. So this is an **efficiency lock**; for correctness the protected
resource must check the fencing token (``lock.fence``, strictly increasing per name).

Protocol (all keys of one name share a Redis Cluster slot through the hash tag)::

    {prefix}:l:{name}           token of the holder, PX lease
    {prefix}:l:{name}:fence     INCR counter, never expires (fences only grow)
    {prefix}:l:{name}:signal    list; release LPUSHes, waiters BLPOP (one wake-up each)
    {prefix}:l:{name}:w / :h    "someone waits" marker / hand-off grace after a release
    {prefix}:l:{name}:fq*/:fs:* fair=True: FIFO queue (ZSETs) and per-waiter signals
    {prefix}:l:{name}:rw:*      RW lock: readers ZSET, writer key, writer intents, signals
    {prefix}:l:{name}:sem*      semaphore: permits ZSET (id -> expiry), fence, signal

* Acquire is one script (``lock_acquire.lua``): SET NX PX with a random token, INCR of
  the fence in the same call, and the holder's PTTL on failure so a waiter never sleeps
  past the end of the current lease (Redisson ``tryLockInnerAsync``).
* Release is one compare-and-delete script that also LPUSHes a wake-up signal
  (python-redis-lock's signal list): one release wakes one waiter, idle waiters cost
  nothing, and a release that happens between a waiter's failed try and its BLPOP stays
  in the list, so no wake-up is lost.
* Hand-off grace: for 10 ms after a release that woke a waiter, a first try leaves the
  free lock to that waiter, so the releasing process cannot take it straight back
  (barging starves waiters: python-redis-lock #58). ``fair=True`` gives strict FIFO.
* Identity belongs to the acquisition (a :class:`Lease`), keyed by process, thread and
  asyncio task, never ``threading.local`` (redis-py #3540, aredis #119: one task
  releasing another's lock); a forked child cannot release its parent's hold.
* Retries are idempotent: a retried acquire that finds its own token is a success, extend
  replaces the TTL, and a release whose first reply was lost does not raise.
* Redis errors fail closed: acquire raises :class:`LockNotAcquiredError` (chained to the
  backend error), release/extend raise :class:`LockError`; nothing pretends to hold.

Metric labels: ``cache.lock(name)`` reports under ``name`` and ``@locked(template)``
under the template, so keep lock names low-cardinality or pass ``metrics_name=``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from rcache._config import Duration, parse_duration, ttl_ms
from rcache._exceptions import (
    ConfigurationError,
    LockError,
    LockLostError,
    LockNotAcquiredError,
    LockNotOwnedError,
    RCacheError,
)
from rcache._keys import KeyBuilder
from rcache._logging import lock_log
from rcache._mixin import CacheBase
from rcache._redis import LuaScript
from rcache._renewer import get_renewer
from rcache._types import P, R

if TYPE_CHECKING:
    import redis
    import redis.asyncio

    from rcache._admin import ForceReleaseResult
    from rcache._metrics import MetricsSink

__all__ = [
    "LOCK_CLASSES",
    "TWIN_CLASSES",
    "FairLock",
    "Lease",
    "Lock",
    "LockMixin",
    "RWLock",
    "ReadLock",
    "Semaphore",
    "WriteLock",
]

_ACQUIRE = LuaScript("lock_acquire")
_RELEASE = LuaScript("lock_release")
_EXTEND = LuaScript("lock_extend")
_FAIR_ACQUIRE = LuaScript("lock_fair_acquire")
_FAIR_RELEASE = LuaScript("lock_fair_release")
_WAKE = LuaScript("lock_wake")
_SEM_ACQUIRE = LuaScript("sem_acquire")
_SEM_RELEASE = LuaScript("sem_release")
_SEM_EXTEND = LuaScript("sem_extend")
_RW_READ = LuaScript("rwlock_read")
_RW_WRITE = LuaScript("rwlock_write")
_RW_RELEASE = LuaScript("rwlock_release")

DEFAULT_TTL = 30.0
#: Lifetime of an unconsumed wake-up signal (ms): long enough for a waiter between its
#: failed try and its BLPOP, short enough that a stale signal costs one spurious retry.
_SIGNAL_MS = 2000
#: Longest single BLPOP (and never above 80 % of the blocking client's socket timeout:
#: 0.8 s with the main client's 1 s default). An idle waiter re-checks this often at
#: most, or at the end of the holder's lease, whichever comes first.
_MAX_BLOCK = 20.0
#: A BLPOP timeout of 0 blocks forever, and Redis rounds to milliseconds: never below.
_MIN_BLOCK = 0.002
#: Past the holder's PTTL, re-check this much later: Redis expires the key lazily on
#: access, so the re-check itself frees it (a crashed holder costs PTTL + one RTT).
_EXPIRY_SLACK = 0.002
#: Fallback sleep bounds when the wake-up channel fails (jittered: no thundering herd).
_FALLBACK = (0.005, 0.05)
#: After a release that woke a waiter, first tries leave the free lock to it this long
#: (ms): long enough for a woken process to be scheduled and send its try on a loaded
#: 2-core box, short enough to cost little throughput if it never comes.
_GRACE_MS = 10
#: Acquire-script status: the lock is free but reserved for a woken waiter (lock only).
_RESERVED = 2

_DEFAULT: Any = object()
_Callback = Callable[["Lease"], object]
F = TypeVar("F")


def _owner_key() -> tuple[int, int, int]:
    """Who is acquiring: (process, thread, asyncio task or 0)."""
    loop = asyncio._get_running_loop()  # None outside a loop, without raising
    task = None if loop is None else asyncio.current_task(loop)
    return (os.getpid(), threading.get_ident(), 0 if task is None else id(task))


def _parse_timeout(
    value: float | Duration | None, what: str = "timeout"
) -> float | None:
    """``None`` (wait forever), ``0`` (one try) or a positive duration in seconds."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return 0.0
    return parse_duration(value, what=what)


def _check_callback(on_lost: object) -> None:
    if on_lost is not None and not callable(on_lost):
        raise ConfigurationError(
            f"on_lost must be a callable taking the Lease, got {type(on_lost).__name__}"
        )


def _check_name(name: object, what: str = "lock name") -> str:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{what} must be a non-empty string, got {name!r}")
    return name


class Lease:
    """One acquisition of a lock, read/write lease or semaphore permit.

    ``token`` identifies it in Redis; ``fence`` is the fencing token to pass to the
    resource (strictly increasing per lock name, 0 for read leases). ``held`` is a local
    check (no IO): not lost and the client-side deadline not passed.
    """

    def __init__(
        self,
        owner: _LeasedLock,
        token: str,
        fence: int,
        sent: float,
        started: float,
        renew: bool,
    ) -> None:
        self.owner = owner
        self.name = owner.name
        self.metrics_name = owner.metrics_name
        self.token = token
        self.fence = fence
        self.ttl = owner.ttl
        self.pid = os.getpid()
        self.acquired_at = time.monotonic()
        self.waited = self.acquired_at - started
        self.lost = False
        self.released = False
        self.lost_reason = ""
        self.on_lost = owner.on_lost
        self.deadline = 0.0
        self.next_renew = float("inf")
        self.renew = renew
        self.watched = renew or owner.on_lost is not None
        #: The event loop of an async acquisition: its renewals run there, through that
        #: loop's client (so a blocked loop loses its lease, as a paused process does).
        self.loop: asyncio.AbstractEventLoop | None = None
        self.renew_until = (
            None if owner.max_hold is None else self.acquired_at + owner.max_hold
        )
        self._renewed(sent)

    def __repr__(self) -> str:
        state = "lost" if self.lost else "released" if self.released else "held"
        return f"<Lease {self.name!r} fence={self.fence} {state}>"

    def _renewed(self, sent: float, ttl: float | None = None) -> None:
        """The lease was (re)confirmed by a call sent at monotonic time ``sent``."""
        if ttl is not None:
            self.ttl = ttl
        # Drift margin as in the Redlock algorithm: 1 % of the lease plus 2 ms.
        self.deadline = sent + self.ttl - (self.ttl * 0.01 + 0.002)
        self.next_renew = sent + self.ttl / 3 if self.renew else float("inf")

    @property
    def held(self) -> bool:
        """Not lost, not released, and within its deadline (local check, no IO)."""
        return not self.lost and not self.released and time.monotonic() < self.deadline

    def _mark_lost(self, reason: str) -> None:
        """Record the loss once: metric, WARNING, ``on_lost`` callback."""
        if self.lost or self.released:
            return
        self.lost = True
        self.lost_reason = reason
        self.owner._metrics.lock_renewal(self.metrics_name, "lost")
        lock_log.warning("rcache: lock %s lost: %s", self.metrics_name, reason)
        if self.on_lost is not None:
            try:
                self.on_lost(self)
            except Exception:
                lock_log.exception(
                    "rcache: on_lost callback of lock %s failed", self.name
                )

    def ensure_held(self) -> None:
        """Raise :class:`LockLostError` unless the lease is still held (local check)."""
        if not self.lost and not self.released and time.monotonic() >= self.deadline:
            self._mark_lost("its lease ran out without a successful renewal")
        if not self.held:
            raise LockLostError(
                f"lock {self.name!r} (fence {self.fence}) is no longer held: "
                f"{self.lost_reason or 'released'}"
            )

    async def aensure_held(self) -> None:
        """Async twin of :meth:`ensure_held` (also local: no IO)."""
        self.ensure_held()


class _Call:
    """A Lua script with its keys and arguments, run by the sync or the async driver."""

    __slots__ = ("args", "keys", "script")

    def __init__(self, script: LuaScript, keys: list[str], args: list[Any]) -> None:
        self.script = script
        self.keys = keys
        self.args = args

    def run(self, client: redis.Redis) -> Any:
        return self.script(client, self.keys, self.args)

    def arun(self, client: redis.asyncio.Redis) -> Awaitable[Any]:
        return self.script.acall(client, self.keys, self.args)


class _LeasedLock:
    """Shared machinery of every lease-based primitive; subclasses supply the scripts.

    Sync and async methods sit in adjacent pairs and differ only in awaiting.
    """

    _kind = "lock"
    _fenced = True

    def __init__(
        self,
        cache: CacheBase,
        name: str,
        *,
        ttl: Duration = DEFAULT_TTL,
        timeout: float | Duration | None = None,
        auto_renew: bool | None = None,
        max_hold: Duration | None = None,
        on_lost: _Callback | None = None,
        raise_on_not_owned: bool = True,
        metrics_name: str | None = None,
    ) -> None:
        self.name = _check_name(name)
        self.ttl = parse_duration(ttl, what="ttl")
        self.timeout = _parse_timeout(timeout)
        self.auto_renew = auto_renew
        self.max_hold = (
            None if max_hold is None else parse_duration(max_hold, what="max_hold")
        )
        _check_callback(on_lost)
        self.on_lost = on_lost
        self.raise_on_not_owned = raise_on_not_owned
        self.metrics_name = metrics_name or name
        self._cache = cache
        self._metrics: MetricsSink = cache.metrics
        self._base = f"{cache.prefix}:l:{{{name}}}"
        self._holds: dict[tuple[int, int, int], Lease] = {}
        self._signal = self._base + ":signal"
        self._background: set[asyncio.Task[Any]] = set()
        self._cap = _MAX_BLOCK  # longest single BLPOP; set from the client in use
        self._metrics.register_lock(self.metrics_name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ttl={self.ttl:g}s>"

    # -- hooks --------------------------------------------------------------------------

    def _acquire_call(self, token: str, waited: bool, once: bool) -> _Call:
        raise NotImplementedError

    def _release_call(self, token: str) -> _Call:
        raise NotImplementedError

    def _extend_call(self, token: str, ttl: float) -> _Call:
        raise NotImplementedError

    def _abandon_call(self, token: str) -> _Call | None:
        """Undo a waiter's footprint when it gives up (writer intents)."""
        return None

    # -- the caller's lease -------------------------------------------------------------

    @property
    def lease(self) -> Lease | None:
        """The calling thread's/task's current lease, or None."""
        lease = self._holds.get(_owner_key())
        return None if lease is None or lease.released else lease

    @property
    def fence(self) -> int:
        """Fencing token of the caller's lease; pass it to the resource you protect."""
        return self._own("read the fence of").fence

    @property
    def held(self) -> bool:
        """True while the caller holds a live lease (local check, no IO)."""
        lease = self.lease
        return lease is not None and lease.held

    def _own(self, doing: str) -> Lease:
        lease = self._holds.get(_owner_key())
        if lease is None:
            raise LockNotOwnedError(
                f"cannot {doing} {self._kind} {self.name!r}: this thread/task does not "
                "hold it (identity belongs to the acquisition, not to the lock object)"
            )
        return lease

    def ensure_held(self) -> None:
        """Raise :class:`LockLostError` if the caller's lease is gone.

        Local and cheap (no round trip): the lease is lost when the renewer found the
        token gone, or when the client-side monotonic deadline (last confirmed renewal
        + lease - drift) has passed. Call it before each step that must be protected.
        """
        self._own("check").ensure_held()

    async def aensure_held(self) -> None:
        """Async twin of :meth:`ensure_held` (also local: no IO)."""
        self._own("check").ensure_held()

    # -- acquire ------------------------------------------------------------------------

    def _begin(self, timeout: Any) -> tuple[tuple[int, int, int], float | None]:
        timeout = self.timeout if timeout is _DEFAULT else _parse_timeout(timeout)
        key = _owner_key()
        held = self._holds.get(key)
        if held is not None and not held.held:
            # A lease that ran out (lost, or a release that Redis never confirmed):
            # forget it, or this thread/task could never acquire again.
            self._forget(key, held)
        elif held is not None:
            raise LockError(
                f"{self._kind} {self.name!r} is already held by this thread/task: rcache "
                "locks are not reentrant (release it first)"
            )
        return key, timeout

    def _grant(
        self,
        key: tuple[int, int, int],
        token: str,
        fence: int,
        sent: float,
        started: float,
        renew: bool | None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Lease:
        auto = self.auto_renew if self.auto_renew is not None else bool(renew)
        lease = Lease(self, token, fence if self._fenced else 0, sent, started, auto)
        lease.loop = loop
        self._holds[key] = lease
        self._metrics.lock_acquire(self.metrics_name, "acquired")
        self._metrics.lock_wait(self.metrics_name, lease.waited)
        self._metrics.locks_held_change(self.metrics_name, 1)
        # The renewer renews auto-renewed leases and watches the deadline of those with
        # an on_lost callback; others need no thread (ensure_held checks the deadline).
        if lease.watched:
            get_renewer().add(lease)
        return lease

    def _wait_time(self, hint_ms: int, deadline: float | None, cap: float) -> float:
        wait = hint_ms / 1000 + _EXPIRY_SLACK if hint_ms > 0 else _FALLBACK[1]
        wait = min(wait, cap)
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
        return max(wait, _MIN_BLOCK)

    def _not_acquired(
        self, timeout: float | None, exc: RCacheError
    ) -> LockNotAcquiredError:
        self._metrics.lock_acquire(self.metrics_name, "error")
        return LockNotAcquiredError(
            f"could not acquire {self._kind} {self.name!r}: Redis failed ({exc}); "
            "locks fail closed"
        )

    def _gave_up(self, timeout: float | None) -> None:
        self._metrics.lock_acquire(
            self.metrics_name, "busy" if timeout == 0 else "timeout"
        )

    def acquire(self, timeout: float | Duration | None = _DEFAULT) -> bool:
        """Acquire, waiting up to ``timeout`` seconds (None: forever; 0: one try).

        :returns: True if acquired, False if the wait timed out.
        :raises LockNotAcquiredError: Redis failed (fail closed).
        """
        return self._acquire(timeout, None)

    async def aacquire(self, timeout: float | Duration | None = _DEFAULT) -> bool:
        """Async twin of :meth:`acquire`; cancellation-safe."""
        return await self._aacquire(timeout, None)

    def _acquire(self, timeout: Any, renew: bool | None) -> bool:
        key, timeout = self._begin(timeout)
        token = f"{os.getpid()}:{secrets.token_hex(12)}"
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        sync = self._cache._sync
        blocking = _blocking(sync)
        cap = self._cap = _block_cap(blocking.connection_pool.connection_kwargs)
        waited = False
        while True:
            call = self._acquire_call(token, waited, timeout == 0)
            sent = time.monotonic()
            try:
                ok, value = sync.run(call.run)
            except RCacheError as exc:
                self._compensate(token)
                raise self._not_acquired(timeout, exc) from exc
            except BaseException:  # KeyboardInterrupt mid-call: the script may have run
                self._compensate(token)
                raise
            if ok == 1:
                self._grant(key, token, int(value), sent, started, renew)
                return True
            if deadline is not None and time.monotonic() >= deadline:
                self._abandon(token)
                self._gave_up(timeout)
                return False
            wait = self._wait_time(int(value), deadline, cap)
            if ok == _RESERVED:  # a woken waiter's turn: let it take the lock first
                time.sleep(wait)
                continue
            try:
                sync.run(_blpop(blocking, self._signal_key(token), wait), retry=False)
            except RCacheError:
                time.sleep(min(wait, random.uniform(*_FALLBACK)))
            waited = True

    async def _aacquire(self, timeout: Any, renew: bool | None) -> bool:
        key, timeout = self._begin(timeout)
        token = f"{os.getpid()}:{secrets.token_hex(12)}"
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        arun = self._cache._async.run
        ablocking = _blocking(self._cache._async)
        cap = self._cap = _block_cap(ablocking.connection_pool.connection_kwargs)
        waited = False
        while True:
            call = self._acquire_call(token, waited, timeout == 0)
            sent = time.monotonic()
            try:
                ok, value = await arun(call.arun)
            except asyncio.CancelledError:
                # The script may have run: undo by token in the background (shielded),
                # so a cancelled acquire leaves no lock behind (redis-py #3847).
                self._spawn(self._acompensate(token))
                raise
            except RCacheError as exc:
                await self._acompensate(token)
                raise self._not_acquired(timeout, exc) from exc
            if ok == 1:
                self._grant(
                    key,
                    token,
                    int(value),
                    sent,
                    started,
                    renew,
                    asyncio.get_running_loop(),
                )
                return True
            if deadline is not None and time.monotonic() >= deadline:
                await self._aabandon(token)
                self._gave_up(timeout)
                return False
            wait = self._wait_time(int(value), deadline, cap)
            if ok == _RESERVED:
                await asyncio.sleep(wait)
                continue
            try:
                await arun(
                    _ablpop(ablocking, self._signal_key(token), wait), retry=False
                )
            except asyncio.CancelledError:
                # Give up the place (writer intent, fair queue) and pass on a wake-up
                # signal this waiter may have popped just before the cancellation.
                self._spawn(self._aabandon(token, wake=True))
                raise
            except RCacheError:
                await asyncio.sleep(min(wait, random.uniform(*_FALLBACK)))
            waited = True

    def _signal_key(self, token: str) -> str:
        return self._signal

    def _compensate(self, token: str) -> None:
        """Best effort: release ``token`` in case a failed acquire ran on the server."""
        try:
            self._cache._sync.run(self._release_call(token).run, retry=False)
        except RCacheError:
            pass  # Redis is down: the lease, if any, expires by its TTL
        self._abandon(token)

    async def _acompensate(self, token: str) -> None:
        try:
            await self._cache._async.run(self._release_call(token).arun, retry=False)
        except RCacheError:
            pass
        await self._aabandon(token)

    def _abandon(self, token: str) -> None:
        call = self._abandon_call(token)
        if call is not None:
            try:
                self._cache._sync.run(call.run, retry=False)
            except RCacheError:
                pass  # the intent expires by itself

    async def _aabandon(self, token: str, wake: bool = False) -> None:
        call = self._abandon_call(token)
        if call is None and wake:
            call = self._wake_call(token)
        if call is not None:
            try:
                await self._cache._async.run(call.arun, retry=False)
            except RCacheError:
                pass

    def _wake_call(self, token: str) -> _Call | None:
        """Pass a wake-up on (Lock: only if the lock is free)."""
        return _Call(_WAKE, [self._signal_key(token)], [_SIGNAL_MS, 1])

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(_reap(self._background))
        return task

    # -- release ------------------------------------------------------------------------

    def release(self) -> None:
        """Release the caller's lease (one round trip: compare-and-delete by token).

        :raises LockNotOwnedError: the caller holds nothing, or the lease was lost
            before the release (unless ``raise_on_not_owned=False``); someone else's
            lock is never deleted.
        :raises LockError: Redis failed; the lease is kept so that ``release()`` can be
            retried, and it expires by its TTL otherwise.
        """
        key = _owner_key()
        lease = self._holds.get(key)
        if lease is None:
            self._not_owned_caller()
            return
        if lease.watched:  # stop renewing first: if the release fails, it runs out
            get_renewer().remove(lease)
        attempts = 0

        def op(client: redis.Redis) -> Any:
            nonlocal attempts
            attempts += 1
            return self._release_call(lease.token).run(client)

        try:
            result = self._cache._sync.run(op)
        except RCacheError as exc:
            raise self._release_failed(exc) from exc
        self._released(key, lease, int(result), attempts)

    async def arelease(self) -> None:
        """Async twin of :meth:`release`. Cancelling it does not cancel the release:
        the token is kept until Redis confirmed (redis-py #3847 / PR #3900)."""
        key = _owner_key()
        lease = self._holds.get(key)
        if lease is None:
            self._not_owned_caller()
            return
        if lease.watched:
            get_renewer().remove(lease)
        await asyncio.shield(self._spawn(self._arelease_lease(key, lease)))

    async def _arelease_lease(self, key: tuple[int, int, int], lease: Lease) -> None:
        attempts = 0

        def op(client: redis.asyncio.Redis) -> Awaitable[Any]:
            nonlocal attempts
            attempts += 1
            return self._release_call(lease.token).arun(client)

        try:
            result = await self._cache._async.run(op)
        except RCacheError as exc:
            raise self._release_failed(exc) from exc
        self._released(key, lease, int(result), attempts)

    def _not_owned_caller(self) -> None:
        self._metrics.lock_release(self.metrics_name, "not_owned")
        if self.raise_on_not_owned:
            self._own("release")

    def _release_failed(self, exc: RCacheError) -> LockError:
        return LockError(
            f"could not release {self._kind} {self.name!r}: Redis failed ({exc}); the "
            "lease expires by its TTL unless release() is retried"
        )

    def _forget(self, key: tuple[int, int, int], lease: Lease) -> None:
        """Drop ``lease`` from the caller table (once) and count the hold as ended."""
        if self._holds.get(key) is not lease:
            return
        del self._holds[key]
        if lease.watched:
            get_renewer().remove(lease)
        self._metrics.locks_held_change(self.metrics_name, -1)
        self._metrics.lock_held(self.metrics_name, time.monotonic() - lease.acquired_at)

    def _released(
        self, key: tuple[int, int, int], lease: Lease, result: int, attempts: int
    ) -> None:
        self._forget(key, lease)
        was_lost = lease.lost
        lease.released = True
        # A retried release (first reply lost) that finds the key gone most likely
        # deleted it itself the first time: do not raise spuriously.
        if result == 1 or attempts > 1:
            self._metrics.lock_release(self.metrics_name, "released")
            return
        self._metrics.lock_release(self.metrics_name, "not_owned")
        if not was_lost:
            lease.lost = True
            lease.lost_reason = "expired or taken over before the release"
            self._metrics.lock_renewal(self.metrics_name, "lost")
        if self.raise_on_not_owned:
            raise LockNotOwnedError(
                f"{self._kind} {self.name!r} (fence {lease.fence}) was no longer held at "
                f"release: {lease.lost_reason}; nothing was deleted"
            )

    # -- extend -------------------------------------------------------------------------

    def extend(self, ttl: Duration | None = None) -> None:
        """Set the caller's lease to ``ttl`` seconds from now (default: the lock's ttl).

        Replaces the TTL, never adds, so a retried extend cannot double it.

        :raises LockNotOwnedError: the lease is gone (it is not recreated).
        :raises LockError: Redis failed.
        """
        lease = self._own("extend")
        seconds = self.ttl if ttl is None else parse_duration(ttl)
        sent = time.monotonic()
        try:
            result = self._cache._sync.run(self._extend_call(lease.token, seconds).run)
        except RCacheError as exc:
            raise LockError(
                f"could not extend {self._kind} {self.name!r}: {exc}"
            ) from exc
        self._extended(lease, int(result), sent, seconds)

    async def aextend(self, ttl: Duration | None = None) -> None:
        """Async twin of :meth:`extend`."""
        lease = self._own("extend")
        seconds = self.ttl if ttl is None else parse_duration(ttl)
        sent = time.monotonic()
        try:
            result = await self._cache._async.run(
                self._extend_call(lease.token, seconds).arun
            )
        except RCacheError as exc:
            raise LockError(
                f"could not extend {self._kind} {self.name!r}: {exc}"
            ) from exc
        self._extended(lease, int(result), sent, seconds)

    def _extended(self, lease: Lease, result: int, sent: float, seconds: float) -> None:
        if result == 1:
            lease._renewed(sent, seconds)
            return
        get_renewer().remove(lease)
        lease._mark_lost("expired or taken over before extend()")
        raise LockNotOwnedError(
            f"cannot extend {self._kind} {self.name!r}: the lease is gone "
            f"({lease.lost_reason})"
        )

    def _renew_io(self, lease: Lease) -> bool:
        """Renewer thread: replace the lease's TTL; False when the token is gone."""
        result = self._cache._sync.run(self._extend_call(lease.token, lease.ttl).run)
        return int(result) == 1

    def _renew_many(self, leases: list[Lease]) -> list[Any]:
        """Renewer thread: extend leases of this cache's client in one pipeline.

        Returns one result per lease: 1 (renewed), 0/-1 (gone) or an exception object
        (for example NOSCRIPT), which the renewer retries through the single path.
        """
        calls = [lease.owner._extend_call(lease.token, lease.ttl) for lease in leases]

        def op(client: redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for call in calls:
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            return pipe.execute(raise_on_error=False)

        return self._cache._sync.run(op)

    async def _arenew_io(self, lease: Lease) -> bool:
        """Same, run on the lease's event loop (scheduled by the renewer thread)."""
        call = self._extend_call(lease.token, lease.ttl)
        return int(await self._cache._async.run(call.arun)) == 1

    # -- operators ----------------------------------------------------------------------

    def force_release(self) -> ForceReleaseResult:
        """Take the lock away from whoever holds it (an operator's tool; see
        ``rcache locks release NAME --force``): deletes the lease(s) of this name and
        kind, bumps the fence counter and wakes a waiter, in one script. The old
        holder's release/extend then raise :class:`LockNotOwnedError` and a resource
        checking fences rejects its writes. For a semaphore or the read side of an RW
        lock every permit/read lease is removed.
        """
        from rcache._admin import force_release

        return force_release(self)

    async def aforce_release(self) -> ForceReleaseResult:
        """Async twin of :meth:`force_release`."""
        from rcache._admin import aforce_release

        return await aforce_release(self)

    # -- context managers ---------------------------------------------------------------

    def __enter__(self) -> Any:
        if not self._acquire(_DEFAULT, True):
            raise LockNotAcquiredError(
                f"could not acquire {self._kind} {self.name!r} within {self.timeout}s"
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.release()
            return
        try:  # the body's exception wins; a release problem is only logged
            self.release()
        except LockError as err:
            lock_log.warning("rcache: releasing %s failed: %s", self.metrics_name, err)

    async def __aenter__(self) -> Any:
        if not await self._aacquire(_DEFAULT, True):
            raise LockNotAcquiredError(
                f"could not acquire {self._kind} {self.name!r} within {self.timeout}s"
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.arelease()
            return
        try:
            await self.arelease()
        except LockError as err:
            lock_log.warning("rcache: releasing %s failed: %s", self.metrics_name, err)


def _reap(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            lock_log.debug("rcache: background lock task failed: %s", task.exception())

    return done


def _blocking(driver: Any) -> Any:
    """The driver's client for blocking commands when it has one (a socket timeout
    longer than any BLPOP, so an idle waiter sleeps until the end of the holder's lease
    instead of re-checking under the main client's 1 s socket timeout), else its
    main client."""
    client = getattr(driver, "blocking_client", None)
    return client if client is not None else driver.client


def _blpop(blocking: Any, key: str, wait: float) -> Callable[[redis.Redis], Any]:
    return lambda _client: blocking.blpop([key], timeout=wait)


def _ablpop(
    blocking: Any, key: str, wait: float
) -> Callable[[redis.asyncio.Redis], Awaitable[Any]]:
    return lambda _client: blocking.blpop([key], timeout=wait)


def _block_cap(kwargs: Any) -> float:
    """Longest BLPOP that stays under the client's socket timeout."""
    timeout = kwargs.get("socket_timeout") if hasattr(kwargs, "get") else None
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        return _MAX_BLOCK
    return max(_MIN_BLOCK, min(_MAX_BLOCK, timeout * 0.8))


class Lock(_LeasedLock):
    """An exclusive lease with a fencing token; use ``with``/``async with`` or the
    explicit ``acquire``/``release``/``extend`` (and their ``a`` twins).

    Made by :meth:`LockMixin.lock`; see its docstring for the options.
    """

    _kind = "lock"

    def __init__(self, cache: CacheBase, name: str, **options: Any) -> None:
        super().__init__(cache, name, **options)
        self._key = self._base
        self._fence_key = self._base + ":fence"
        self._waiters = self._base + ":w"
        self._grace = self._base + ":h"

    def _acquire_call(self, token: str, waited: bool, once: bool) -> _Call:
        return _Call(
            _ACQUIRE,
            [self._key, self._fence_key, self._waiters, self._grace],
            # A single try (timeout=0) may take a free lock even during a hand-off
            # grace: it does not wait, so it must not say "busy" for a free lock.
            [
                token,
                ttl_ms(self.ttl),
                "2" if once else "1" if waited else "0",
                ttl_ms(self._cap + 1),
            ],
        )

    def _release_call(self, token: str) -> _Call:
        keys = [self._key, self._signal, self._waiters, self._grace]
        return _Call(_RELEASE, keys, [token, _SIGNAL_MS, 1, _GRACE_MS])

    def _extend_call(self, token: str, ttl: float) -> _Call:
        return _Call(_EXTEND, [self._key], [token, ttl_ms(ttl)])

    def _wake_call(self, token: str) -> _Call | None:
        return _Call(_WAKE, [self._signal_key(token), self._key], [_SIGNAL_MS, 1])

    def __enter__(self) -> Lock:
        return super().__enter__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> Lock:
        return await super().__aenter__()  # type: ignore[no-any-return]


class FairLock(Lock):
    """A :class:`Lock` granted in FIFO order (``cache.lock(name, fair=True)``).

    Waiters queue in a ZSET with server-side expiry (``RedissonFairLock``); a release
    wakes only the first waiter, through its own signal list, and nobody can barge
    past the queue (python-redis-lock #58/#71). Costs a little throughput: a free lock
    waits for the first waiter to take it.
    """

    _kind = "fair lock"

    def __init__(self, cache: CacheBase, name: str, **options: Any) -> None:
        super().__init__(cache, name, **options)
        self._queue = self._base + ":fq"
        self._queue_ttl = self._base + ":fqt"
        self._tickets = self._base + ":fqn"
        self._signals = self._base + ":fs:"

    def _signal_key(self, token: str) -> str:
        return self._signals + token

    def _wait_time(self, hint_ms: int, deadline: float | None, cap: float) -> float:
        if hint_ms <= 0:  # behind a waiter taking its turn: we are woken when it's ours
            hint_ms = int(cap * 1000)
        return super()._wait_time(hint_ms, deadline, cap)

    def _acquire_call(self, token: str, waited: bool, once: bool) -> _Call:
        return _Call(
            _FAIR_ACQUIRE,
            [self._key, self._fence_key, self._queue, self._queue_ttl, self._tickets],
            [token, ttl_ms(self.ttl), max(2000, int(self._cap * 4000)), "1"],
        )

    def _release_call(self, token: str) -> _Call:
        keys = [self._key, self._queue, self._queue_ttl, self._signals]
        return _Call(_FAIR_RELEASE, keys, [token, _SIGNAL_MS, "r"])

    def _abandon_call(self, token: str) -> _Call | None:
        keys = [self._key, self._queue, self._queue_ttl, self._signals]
        return _Call(_FAIR_RELEASE, keys, [token, _SIGNAL_MS, "a"])


class Semaphore(_LeasedLock):
    """At most ``limit`` concurrent holders; each permit is a leased id in a ZSET
    (``RedissonPermitExpirableSemaphore``), so a crashed holder's permit comes back when
    its lease ends instead of leaking a counter."""

    _kind = "semaphore"

    def __init__(
        self, cache: CacheBase, name: str, *, limit: int, **options: Any
    ) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(
                f"semaphore limit must be an int >= 1, got {limit!r}"
            )
        super().__init__(cache, name, **options)
        self.limit = limit
        self._key = self._base + ":sem"
        self._fence_key = self._key + ":fence"
        self._signal = self._key + ":signal"

    def _acquire_call(self, token: str, waited: bool, once: bool) -> _Call:
        return _Call(
            _SEM_ACQUIRE,
            [self._key, self._fence_key],
            [token, ttl_ms(self.ttl), self.limit],
        )

    def _release_call(self, token: str) -> _Call:
        return _Call(
            _SEM_RELEASE, [self._key, self._signal], [token, _SIGNAL_MS, self.limit]
        )

    def _extend_call(self, token: str, ttl: float) -> _Call:
        return _Call(_SEM_EXTEND, [self._key], [token, ttl_ms(ttl)])

    def __enter__(self) -> Semaphore:
        return super().__enter__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> Semaphore:
        return await super().__aenter__()  # type: ignore[no-any-return]


class _RWPart(_LeasedLock):
    def __init__(self, cache: CacheBase, name: str, **options: Any) -> None:
        super().__init__(cache, name, **options)
        b = self._base + ":rw:"
        self._readers, self._writer, self._intents = b + "r", b + "w", b + "wq"
        self._rsignal, self._wsignal, self._fence_key = b + "rs", b + "ws", b + "fence"
        self._keys5 = [
            self._readers,
            self._writer,
            self._intents,
            self._rsignal,
            self._wsignal,
        ]


class ReadLock(_RWPart):
    """A shared (read) lease of an :class:`RWLock`; made by ``rwlock(name).read()``."""

    _kind = "read lock"
    _fenced = False

    def __init__(self, cache: CacheBase, name: str, **options: Any) -> None:
        super().__init__(cache, name, **options)
        self._signal = self._rsignal

    def _acquire_call(self, token: str, waited: bool, once: bool) -> _Call:
        return _Call(
            _RW_READ,
            [self._readers, self._writer, self._intents, self._rsignal],
            [token, ttl_ms(self.ttl), "1" if waited else "0", _SIGNAL_MS],
        )

    def _release_call(self, token: str) -> _Call:
        return _Call(_RW_RELEASE, self._keys5, [token, "r", _SIGNAL_MS])

    def _extend_call(self, token: str, ttl: float) -> _Call:
        return _Call(_SEM_EXTEND, [self._readers], [token, ttl_ms(ttl)])

    def __enter__(self) -> ReadLock:
        return super().__enter__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> ReadLock:
        return await super().__aenter__()  # type: ignore[no-any-return]


class WriteLock(_RWPart):
    """The exclusive (write) lease of an :class:`RWLock`, fenced; ``rwlock(n).write()``.

    A waiting writer records an expiring intent that keeps new readers out (writer
    preference: a stream of readers cannot starve it)."""

    _kind = "write lock"

    def __init__(self, cache: CacheBase, name: str, **options: Any) -> None:
        super().__init__(cache, name, **options)
        self._signal = self._wsignal

    def _intent_ms(self) -> int:
        # A waiting writer refreshes its intent at least every `cap` seconds.
        return max(2000, int(self._cap * 4000))

    def _acquire_call(self, token: str, waited: bool, once: bool) -> _Call:
        return _Call(
            _RW_WRITE,
            [self._readers, self._writer, self._intents, self._fence_key],
            [token, ttl_ms(self.ttl), self._intent_ms()],
        )

    def _release_call(self, token: str) -> _Call:
        return _Call(_RW_RELEASE, self._keys5, [token, "w", _SIGNAL_MS])

    def _abandon_call(self, token: str) -> _Call | None:
        return _Call(_RW_RELEASE, self._keys5, [token, "a", _SIGNAL_MS])

    def _extend_call(self, token: str, ttl: float) -> _Call:
        return _Call(_EXTEND, [self._writer], [token, ttl_ms(ttl)])

    def __enter__(self) -> WriteLock:
        return super().__enter__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> WriteLock:
        return await super().__aenter__()  # type: ignore[no-any-return]


class RWLock:
    """Many readers or one writer, writer-preferring, with per-holder leases.

    ``read()`` and ``write()`` return lock objects for ``with``/``async with`` (or
    explicit ``acquire``/``aacquire``...). A crashed reader frees its share when its own
    lease ends; a crashed writer when its lease ends.
    """

    def __init__(self, cache: CacheBase, name: str, **options: Any) -> None:
        self.name = _check_name(name)
        self._cache = cache
        self._options = options
        self._read = ReadLock(cache, name, **options)  # validates the options now
        self._write = WriteLock(cache, name, **options)

    def __repr__(self) -> str:
        return f"<RWLock {self.name!r}>"

    def read(self) -> ReadLock:
        """The shared (read) side, usable from any number of threads/tasks at once."""
        return self._read

    def write(self) -> WriteLock:
        """The exclusive (write) side."""
        return self._write


#: The lock-like classes whose sync methods have ``a`` twins (tests/integration/
#: test_lock_api.py); TWIN_CLASSES names them, and Lease, for tests/test_public_api.py.
LOCK_CLASSES: list[type[_LeasedLock]] = [Lock, FairLock, ReadLock, WriteLock, Semaphore]
TWIN_CLASSES = ("FairLock", "Lease", "Lock", "ReadLock", "Semaphore", "WriteLock")


class _LockedDecorator(Protocol):
    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]], /
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> Callable[P, R]: ...


class LockMixin(CacheBase):
    """Adds ``lock``, ``locked``, ``rwlock`` and ``semaphore`` to ``Cache``."""

    def lock(
        self,
        name: str,
        *,
        ttl: Duration = DEFAULT_TTL,
        timeout: float | Duration | None = None,
        auto_renew: bool | None = None,
        max_hold: Duration | None = None,
        on_lost: _Callback | None = None,
        raise_on_not_owned: bool = True,
        metrics_name: str | None = None,
        fair: bool = False,
    ) -> Lock:
        """A distributed lock (an efficiency lock: see the module docstring) named ``name``.

        :param ttl: the lease (default 30 s); always set, so a crashed holder frees it.
        :param timeout: longest wait in ``with``/``acquire()`` (None: forever, 0: one try).
        :param auto_renew: renew every ttl/3 from the per-process renewer thread; by
            default on inside ``with``/``async with``/``@locked``, off for explicit
            ``acquire()``.
        :param max_hold: stop renewing after this long (the lease then runs out).
        :param on_lost: called once with the :class:`Lease` when the lease is found
            gone or its client-side deadline passes; it runs in the renewer thread (or
            on the event loop of an async lease), so keep it short and thread-safe.
        :param raise_on_not_owned: raise :class:`LockNotOwnedError` on a release that
            found the lease gone (default True).
        :param metrics_name: metric label (default ``name``: keep names low-cardinality).
        :param fair: strict FIFO order (a :class:`FairLock`). By default a release
            gives the waiter it wakes a 10 ms head start, which keeps contenders
            within a small spread without a queue.

        Example::

            with cache.lock("report:2024-11", ttl=30, timeout=10) as lock:
                write_report(fence=lock.fence)
                lock.ensure_held()
        """
        return (FairLock if fair else Lock)(
            self,
            name,
            ttl=ttl,
            timeout=timeout,
            auto_renew=auto_renew,
            max_hold=max_hold,
            on_lost=on_lost,
            raise_on_not_owned=raise_on_not_owned,
            metrics_name=metrics_name,
        )

    def rwlock(
        self,
        name: str,
        *,
        ttl: Duration = DEFAULT_TTL,
        timeout: float | Duration | None = None,
        auto_renew: bool | None = None,
        max_hold: Duration | None = None,
        on_lost: _Callback | None = None,
        raise_on_not_owned: bool = True,
        metrics_name: str | None = None,
    ) -> RWLock:
        """A writer-preferring read/write lock: ``with cache.rwlock("doc:1").read(): ...``.

        Options as for :meth:`lock`; every reader and the writer hold their own lease.
        """
        return RWLock(
            self,
            name,
            ttl=ttl,
            timeout=timeout,
            auto_renew=auto_renew,
            max_hold=max_hold,
            on_lost=on_lost,
            raise_on_not_owned=raise_on_not_owned,
            metrics_name=metrics_name,
        )

    def semaphore(
        self,
        name: str,
        limit: int,
        *,
        ttl: Duration = DEFAULT_TTL,
        timeout: float | Duration | None = None,
        auto_renew: bool | None = None,
        max_hold: Duration | None = None,
        on_lost: _Callback | None = None,
        raise_on_not_owned: bool = True,
        metrics_name: str | None = None,
    ) -> Semaphore:
        """At most ``limit`` holders at once; permits are leases reclaimed after a crash.

        Options as for :meth:`lock`. Example::

            with cache.semaphore("api-quota", limit=5, timeout=10):
                call_api()
        """
        return Semaphore(
            self,
            name,
            limit=limit,
            ttl=ttl,
            timeout=timeout,
            auto_renew=auto_renew,
            max_hold=max_hold,
            on_lost=on_lost,
            raise_on_not_owned=raise_on_not_owned,
            metrics_name=metrics_name,
        )

    def locked(
        self,
        name: str,
        /,
        *,
        ttl: Duration = DEFAULT_TTL,
        timeout: float | Duration | None = None,
        max_hold: Duration | None = None,
        on_lost: _Callback | None = None,
        metrics_name: str | None = None,
        fair: bool = False,
    ) -> _LockedDecorator:
        """Run the decorated function (``def`` or ``async def``) under a lock.

        ``name`` is a template over the function's parameters, checked at decoration
        time: ``@cache.locked("invoice:{invoice_id}", ttl=30, timeout=5)``. The lease is
        auto-renewed while the function runs. A sync callable returning an awaitable
        counts as sync (the lock covers only the call). Metrics use the template as
        label unless ``metrics_name=`` is given; ``fair=True`` grants in FIFO order.

        :raises LockNotAcquiredError: not acquired within ``timeout``.
        """
        _check_name(name, "lock name template")
        parse_duration(ttl, what="ttl")
        _parse_timeout(timeout)
        if max_hold is not None:
            parse_duration(max_hold, what="max_hold")
        _check_callback(on_lost)
        label = metrics_name or name
        cls = FairLock if fair else Lock
        options: dict[str, Any] = {
            "ttl": ttl,
            "timeout": timeout,
            "max_hold": max_hold,
            "on_lost": on_lost,
            "metrics_name": label,
        }
        cache = self

        def decorate(fn: Any) -> Any:
            if not callable(fn):
                raise ConfigurationError(
                    f"@locked decorates a function, got {type(fn).__name__}"
                )
            keys = KeyBuilder(fn, prefix=cache.prefix, key=name)
            static = "{" not in name and "}" not in name
            cache.metrics.register_lock(label)

            def lock_for(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Lock:
                lock_name = name if static else name.format_map(keys.bind(args, kwargs))
                return cls(cache, lock_name, **options)

            if inspect.iscoroutinefunction(fn):

                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    async with lock_for(args, kwargs):
                        return await fn(*args, **kwargs)

                return _wraps(async_wrapper, fn)

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                with lock_for(args, kwargs):
                    return fn(*args, **kwargs)

            return _wraps(wrapper, fn)

        return decorate


def _wraps(wrapper: F, fn: Any) -> F:
    import functools

    return functools.update_wrapper(wrapper, fn)  # type: ignore[arg-type,return-value]
