"""Distributed locks on one Redis primary: ``Lock``, ``@locked``, RW lock, semaphore.

What a Redis lock can promise (say it plainly, Kleppmann 2016, antirez 2016): on a
single primary, acquire and release are linearizable at the server, but the holder has
a *lease*. A pause longer than the lease (GC, SIGSTOP, a blocked event loop), a failover
to a replica that missed the write, or a server clock jump can give two actors the
resource at once. So this is an **efficiency lock**; for correctness the protected
resource must check the fencing token (``lock.fence``, strictly increasing per name).

Protocol (all keys of one name share a Redis Cluster slot through the hash tag)::

    {prefix}:l:{name}           token of the holder, PX lease
    {prefix}:l:{name}:fence     INCR counter, never expires (fences only grow); when
                                missing it is seeded from server TIME in µs, so a
                                counter lost to a restart or eviction still grows
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
  replaces the TTL, and a release whose first reply was lost does not raise; one whose
  every reply was lost raises :class:`LockReleaseUnconfirmedError`.
* Redis errors fail closed: acquire raises :class:`LockNotAcquiredError` (chained to the
  backend error), release/extend raise :class:`LockError`; nothing pretends to hold.
* Waits keep their budget: each call of a wait (script or BLPOP) waits for its reply at
  most the rest of the budget plus ``_IO_MARGIN``, so a hung Redis cannot hold a
  waiter on a socket timeout; clean-up after giving up runs in the background.
* The lock server's eviction policy is read once per Cache when locks are first used:
  an evicting policy can take a held lock, so it is logged at ERROR and counted.

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
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from rcache._config import Duration, parse_duration, ttl_ms
from rcache._exceptions import (
    BackendUnavailableError,
    ConfigurationError,
    LockError,
    LockLostError,
    LockNotAcquiredError,
    LockNotOwnedError,
    LockReleaseUnconfirmedError,
    RCacheError,
)
from rcache._flow import Eval
from rcache._keys import KeyBuilder
from rcache._leases import Renewable, get_renewer
from rcache._logging import lock_log
from rcache._mixin import CacheBase
from rcache._redis import (
    LuaScript,
    acommand_within,
    aeval_within,
    aeviction_policy,
    command_within,
    connection_kwargs,
    eval_within,
    eviction_policy,
)
from rcache._types import P, R

if TYPE_CHECKING:
    import redis
    import redis.asyncio

    from rcache._admin import ForceReleaseResult
    from rcache._metrics import MetricsSink

__all__ = [
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
#: A call made for a wait may take the rest of the wait's budget plus this for its reply
#: (issue 14: with Redis stopped, acquire(timeout=2) returned after 9.4 s).
_IO_MARGIN = 0.2
#: Lease bounds: below 10 ms a lease ends before a round trip under load confirms it;
#: above a year is a mistake (ttl=1e17 overflows Redis' PX and the ZSET scores).
_MIN_TTL = 0.01
_MAX_TTL = 365 * 86400.0
#: Eviction policies that never evict a key: every other one can take a held lock
#: (allkeys-*) or, since lock keys carry a TTL, volatile-* too.
_SAFE_POLICIES = frozenset({"noeviction"})

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


def _lock_ttl(value: Duration, what: str = "ttl") -> float:
    """A lease length in seconds, between 10 ms and a year."""
    seconds = parse_duration(value, what=what)
    if not _MIN_TTL <= seconds <= _MAX_TTL:
        raise ConfigurationError(
            f"lock {what} must be between 10ms and 365 days, got {value!r}: write "
            f'{what}=30 (seconds) or {what}="5m"; for long jobs keep a short lease '
            "and let auto-renewal (with max_hold=) extend it"
        )
    return seconds


#: Leases of exclusive locks by (server, key, owner), across lock objects: re-entering a
#: lock this thread/task holds (through another ``cache.lock(name)`` or ``@locked``
#: call) fails at once with a clear message instead of waiting for itself (issue 12).
_EXCLUSIVE: weakref.WeakValueDictionary[
    tuple[str, str, tuple[int, int, int]], Lease
] = weakref.WeakValueDictionary()

#: The eviction policy found per client spec (checked once, when locks are first used).
_POLICIES: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def _check_callback(on_lost: object) -> None:
    if on_lost is not None and not callable(on_lost):
        raise ConfigurationError(
            f"on_lost must be a callable taking the Lease, got {type(on_lost).__name__}"
        )


def _check_name(name: object, what: str = "lock name") -> str:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{what} must be a non-empty string, got {name!r}")
    return name


class Lease(Renewable):
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
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # The event loop of an async acquisition: its renewals run there, through that
        # loop's client (so a blocked loop loses its lease, as a paused process does).
        super().__init__(
            owner._cache._driver if loop is None else owner._cache._adriver,
            ttl=owner.ttl,
            sent=sent,
            loop=loop,
            renew=renew,
            max_hold=owner.max_hold,
            name=owner.name,
        )
        self.owner = owner
        self.metrics_name = owner.metrics_name
        self.token = token
        self.fence = fence
        self.pid = os.getpid()
        self.acquired_at = time.monotonic()
        self.waited = self.acquired_at - started
        self.released = False
        #: A release was sent but its reply never came: maybe released, so not held.
        self.unconfirmed = False
        self.release_sent = False
        self.on_lost = owner.on_lost
        self.watched = renew or owner.on_lost is not None

    def __repr__(self) -> str:
        state = "lost" if self.lost else "released" if self.released else "held"
        return f"<Lease {self.name!r} fence={self.fence} {state}>"

    def _renew_command(self) -> Eval:
        """Renewer: replace the lease's TTL (reply 1; 0/-1 when the token is gone)."""
        call = self.owner._extend_call(self.token, self.ttl)
        return Eval(call.script, call.keys, call.args)

    def _confirmed(self, sent: float) -> None:
        self._renewed(sent)
        self.owner._metrics.lock_renewal(self.metrics_name, "renewed")

    @property
    def held(self) -> bool:
        """Not lost, not released (nor released unconfirmed), and within its deadline
        (local check, no IO)."""
        return (
            not self.lost
            and not self.released
            and not self.unconfirmed
            and time.monotonic() < self.deadline
        )

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
            state = "release sent, unconfirmed" if self.unconfirmed else "released"
            raise LockLostError(
                f"lock {self.name!r} (fence {self.fence}) is no longer held: "
                f"{self.lost_reason or state}"
            )

    async def aensure_held(self) -> None:
        """Async twin of :meth:`ensure_held` (also local: no IO)."""
        self.ensure_held()


#: How a call waits for its reply: (seconds, or None for the client's socket timeout;
#: a callback run once the command is written, or None).
_Within = tuple[float | None, Callable[[], object] | None]


class _Call:
    """A Lua script with its keys and arguments, run by the sync or the async driver."""

    __slots__ = ("args", "keys", "script")

    def __init__(self, script: LuaScript, keys: list[str], args: list[Any]) -> None:
        self.script = script
        self.keys = keys
        self.args = args

    def run(self, client: redis.Redis, within: _Within | None = None) -> Any:
        """Run the script; ``within`` bounds the wait for its reply (see _Within)."""
        if within is None:
            return self.script(client, self.keys, self.args)
        return eval_within(client, self.script, self.keys, self.args, *within)

    def arun(
        self, client: redis.asyncio.Redis, within: _Within | None = None
    ) -> Awaitable[Any]:
        if within is None:
            return self.script.acall(client, self.keys, self.args)
        return aeval_within(client, self.script, self.keys, self.args, *within)


class _LeasedLock:
    """Shared machinery of every lease-based primitive; subclasses supply the scripts.

    Sync and async methods sit in adjacent pairs and differ only in awaiting.
    """

    _kind = "lock"
    _fenced = True
    #: Redis key of an exclusive hold (re-entry is detected across lock objects).
    _exclusive_key: str | None = None

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
        self.ttl = _lock_ttl(ttl)
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
        self._lock_keys = cache.keyspace.lock(name)
        self._holds: dict[tuple[int, int, int], Lease] = {}
        self._signal = self._lock_keys.signal
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
        if timeout is None and self._exclusive_hold(key) is not None:
            # Waiting forever for itself is never what the caller meant (issue 12);
            # a bounded wait (or a single try) still just reports "busy".
            raise LockError(self._held_here_message("cannot wait for"))
        return key, timeout

    def _held_here_message(self, doing: str) -> str:
        other = self._exclusive_hold(_owner_key())
        fence = "" if other is None else f" (fence {other.fence})"
        return (
            f"{doing} {self._kind} {self.name!r}: this thread/task already holds it"
            f"{fence} through another lock object, and rcache locks are not reentrant "
            "(release it first, or pass the held lock down)"
        )

    def _timed_out_message(self) -> str:
        if self._exclusive_hold(_owner_key()) is not None:
            return self._held_here_message("could not acquire")
        return f"could not acquire {self._kind} {self.name!r} within {self.timeout}s"

    def _exclusive_id(
        self, owner: tuple[int, int, int]
    ) -> tuple[str, str, tuple[int, int, int]] | None:
        if self._exclusive_key is None:
            return None
        return (self._cache._spec.describe(), self._exclusive_key, owner)

    def _exclusive_hold(self, owner: tuple[int, int, int]) -> Lease | None:
        ident = self._exclusive_id(owner)
        lease = None if ident is None else _EXCLUSIVE.get(ident)
        return lease if lease is not None and lease.held else None

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
        lease = Lease(
            self, token, fence if self._fenced else 0, sent, started, auto, loop
        )
        self._holds[key] = lease
        ident = self._exclusive_id(key)
        if ident is not None:
            _EXCLUSIVE[ident] = lease
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

    # -- eviction policy (issue 14: an evicted lock key was granted to a second client) --

    def _policy_known(self) -> bool:
        return self._cache._spec in _POLICIES or self._cache._spec.memory

    def _check_policy(self) -> None:
        """Once per client spec and process, in the background IO thread (no wait
        spends its budget on it): warn when the server can evict lock keys."""
        spec = self._cache._spec
        _POLICIES.setdefault(spec, "")  # claimed: checked once
        sync = self._cache._sync

        def job() -> None:
            try:
                policy = sync.run(eviction_policy, retry=False)
            except RCacheError as exc:
                lock_log.debug("rcache: cannot read the eviction policy: %s", exc)
                return
            self._note_policy(policy)

        get_renewer().submit(job, sync)

    async def _acheck_policy(self) -> None:
        spec = self._cache._spec
        _POLICIES.setdefault(spec, "")
        try:
            policy = await self._cache._async.run(aeviction_policy, retry=False)
        except RCacheError as exc:
            lock_log.debug("rcache: cannot read the eviction policy: %s", exc)
            return
        self._note_policy(policy)

    def _note_policy(self, policy: str) -> None:
        _POLICIES[self._cache._spec] = policy
        if not policy or policy in _SAFE_POLICIES:
            return
        report = getattr(self._metrics, "lock_eviction_risk", None)
        if report is not None:
            report(policy)
        lock_log.error(
            "rcache: Redis at %s has maxmemory-policy %s, which can evict held lock "
            "keys and fence counters: two clients may then hold the same lock. Set "
            "maxmemory-policy noeviction on that server, or keep locks on their own "
            "Redis: Cache(url, lock_url='redis://locks-host:6379/0')",
            self._cache._spec.describe(),
            policy,
        )

    # -- acquire ------------------------------------------------------------------------

    def acquire(self, timeout: float | Duration | None = _DEFAULT) -> bool:
        """Acquire, waiting up to ``timeout`` seconds (None: forever; 0: one try).

        Returns within ``timeout`` plus a fraction of a second even while Redis hangs:
        every call of the wait is bounded by the rest of its budget.

        :returns: True if acquired, False if the wait timed out.
        :raises LockNotAcquiredError: Redis failed or did not answer (fail closed).
        """
        return self._acquire(timeout, None)

    async def aacquire(self, timeout: float | Duration | None = _DEFAULT) -> bool:
        """Async twin of :meth:`acquire`; cancellation-safe."""
        return await self._aacquire(timeout, None)

    def _io_limit(self, deadline: float | None, cap: float | None) -> float | None:
        """How long the next call of a wait may take for its reply: the rest of the
        budget plus a margin, never above the client's own socket timeout."""
        if deadline is None:
            return cap
        limit = max(0.0, deadline - time.monotonic()) + _IO_MARGIN
        return limit if cap is None else min(limit, cap)

    def _sync_op(
        self, call: _Call, deadline: float | None, cap: float | None
    ) -> Callable[[redis.Redis], Any]:
        if self._cache._spec.memory:  # fakeredis: in-process, nothing can hang
            return call.run
        attempts = 0

        def op(client: redis.Redis) -> Any:
            nonlocal attempts
            attempts += 1
            _check_budget(attempts, deadline)
            return call.run(client, (self._io_limit(deadline, cap), None))

        return op

    def _async_op(
        self, call: _Call, deadline: float | None, cap: float | None
    ) -> Callable[[redis.asyncio.Redis], Awaitable[Any]]:
        if self._cache._spec.memory:
            return call.arun
        attempts = 0

        def op(client: redis.asyncio.Redis) -> Awaitable[Any]:
            nonlocal attempts
            attempts += 1
            _check_budget(attempts, deadline)
            return call.arun(client, (self._io_limit(deadline, cap), None))

        return op

    def _acquire(self, timeout: Any, renew: bool | None) -> bool:
        key, timeout = self._begin(timeout)
        if not self._policy_known():
            self._check_policy()
        token = f"{os.getpid()}:{secrets.token_hex(12)}"
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        sync = self._cache._sync
        io_cap = _socket_timeout(sync.client)
        blocking = _blocking(sync)
        cap = self._cap = _block_cap(connection_kwargs(blocking))
        memory = self._cache._spec.memory
        waited = False
        while True:
            call = self._acquire_call(token, waited, timeout == 0)
            sent = time.monotonic()
            try:
                ok, value = sync.run(self._sync_op(call, deadline, io_cap))
            except RCacheError as exc:
                # The script may have run (a lost reply): undo by token, in the
                # background so that a hung Redis does not take more of the budget.
                get_renewer().submit(_quietly(self._compensate, token), sync)
                raise self._not_acquired(timeout, exc) from exc
            except BaseException:  # KeyboardInterrupt mid-call: the script may have run
                self._compensate(token)
                raise
            if ok == 1:
                self._grant(key, token, int(value), sent, started, renew)
                return True
            if deadline is not None and time.monotonic() >= deadline:
                self._abandon(token, deadline)
                self._gave_up(timeout)
                return False
            wait = self._wait_time(int(value), deadline, cap)
            if ok == _RESERVED:  # a woken waiter's turn: let it take the lock first
                time.sleep(wait)
                continue
            try:
                sync.run(
                    _blpop(blocking, self._signal_key(token), wait, memory), retry=False
                )
            except RCacheError as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    # Redis did not answer and the budget is spent: no further call
                    # (the clean-up of a fair/writer place runs in the background).
                    get_renewer().submit(_quietly(self._abandon, token), sync)
                    raise self._not_acquired(timeout, exc) from exc
                remaining = wait if deadline is None else deadline - time.monotonic()
                time.sleep(max(0.0, min(remaining, random.uniform(*_FALLBACK))))
            waited = True

    async def _aacquire(self, timeout: Any, renew: bool | None) -> bool:
        key, timeout = self._begin(timeout)
        if not self._policy_known():
            self._spawn(self._acheck_policy())
        token = f"{os.getpid()}:{secrets.token_hex(12)}"
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        arun = self._cache._async.run
        io_cap = _socket_timeout(self._cache._async.client)
        ablocking = _blocking(self._cache._async)
        cap = self._cap = _block_cap(connection_kwargs(ablocking))
        memory = self._cache._spec.memory
        waited = False
        while True:
            call = self._acquire_call(token, waited, timeout == 0)
            sent = time.monotonic()
            try:
                ok, value = await arun(self._async_op(call, deadline, io_cap))
            except asyncio.CancelledError:
                # The script may have run: undo by token in the background (shielded),
                # so a cancelled acquire leaves no lock behind (redis-py #3847).
                self._spawn(self._acompensate(token))
                raise
            except RCacheError as exc:
                self._spawn(self._acompensate(token))  # not on the caller's budget
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
                await self._aabandon(token, deadline=deadline)
                self._gave_up(timeout)
                return False
            wait = self._wait_time(int(value), deadline, cap)
            if ok == _RESERVED:
                await asyncio.sleep(wait)
                continue
            try:
                await arun(
                    _ablpop(ablocking, self._signal_key(token), wait, memory),
                    retry=False,
                )
            except asyncio.CancelledError:
                # Give up the place (writer intent, fair queue) and pass on a wake-up
                # signal this waiter may have popped just before the cancellation.
                self._spawn(self._aabandon(token, wake=True))
                raise
            except RCacheError as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    self._spawn(self._aabandon(token))
                    raise self._not_acquired(timeout, exc) from exc
                remaining = wait if deadline is None else deadline - time.monotonic()
                await asyncio.sleep(
                    max(0.0, min(remaining, random.uniform(*_FALLBACK)))
                )
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

    def _abandon(self, token: str, deadline: float | None = None) -> None:
        """Undo a waiter's footprint (bounded by the wait's budget: a failure leaves
        only an intent/queue entry that expires by itself)."""
        call = self._abandon_call(token)
        if call is not None:
            sync = self._cache._sync
            op = self._sync_op(call, deadline, _socket_timeout(sync.client))
            try:
                sync.run(op, retry=False)
            except RCacheError:
                pass  # the intent expires by itself

    async def _aabandon(
        self, token: str, wake: bool = False, deadline: float | None = None
    ) -> None:
        call = self._abandon_call(token)
        if call is None and wake:
            call = self._wake_call(token)
        if call is not None:
            arun = self._cache._async.run
            op = self._async_op(
                call, deadline, _socket_timeout(self._cache._async.client)
            )
            try:
                await arun(op, retry=False)
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
        :raises LockReleaseUnconfirmedError: the release was sent (and retried) but no
            reply came: Redis most likely released it, else the lease ends by its TTL.
            The lease no longer counts as held; ``release()`` again confirms it.
        :raises LockError: Redis failed before the release could be sent; the lease is
            kept so that ``release()`` can be retried, and it expires by its TTL
            otherwise.
        """
        key = _owner_key()
        lease = self._holds.get(key)
        if lease is None:
            self._not_owned_caller()
            return
        if lease.watched:  # stop renewing first: if the release fails, it runs out
            get_renewer().remove(lease)
        attempts = 0
        call = self._release_call(lease.token)
        memory = self._cache._spec.memory
        cap = _socket_timeout(self._cache._sync.client)

        def sent() -> None:
            lease.release_sent = True

        def op(client: redis.Redis) -> Any:
            nonlocal attempts
            attempts += 1
            return call.run(client, None if memory else (cap, sent))

        try:
            result = self._cache._sync.run(op)
        except RCacheError as exc:
            raise self._release_failed(lease, exc) from exc
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
        call = self._release_call(lease.token)
        memory = self._cache._spec.memory
        cap = _socket_timeout(self._cache._async.client)

        def sent() -> None:
            lease.release_sent = True

        def op(client: redis.asyncio.Redis) -> Awaitable[Any]:
            nonlocal attempts
            attempts += 1
            return call.arun(client, None if memory else (cap, sent))

        try:
            result = await self._cache._async.run(op)
        except RCacheError as exc:
            raise self._release_failed(lease, exc) from exc
        self._released(key, lease, int(result), attempts)

    def _not_owned_caller(self) -> None:
        self._metrics.lock_release(self.metrics_name, "not_owned")
        if self.raise_on_not_owned:
            self._own("release")

    def _release_failed(self, lease: Lease, exc: RCacheError) -> LockError:
        if not lease.release_sent:
            return LockError(
                f"could not release {self._kind} {self.name!r}: Redis failed ({exc}) "
                "before the release was sent; the lease expires by its TTL unless "
                "release() is retried"
            )
        # The script may have run and only its replies were lost (issue 14: a plain
        # LockError here read as "not released" although Redis had deleted the key).
        lease.unconfirmed = True
        self._metrics.lock_release(self.metrics_name, "unconfirmed")
        return LockReleaseUnconfirmedError(
            f"release of {self._kind} {self.name!r} (fence {lease.fence}) was sent but "
            f"not confirmed ({exc}): Redis most likely released it; if not, the lease "
            f"ends by its TTL ({lease.ttl:g}s) at the latest. Call release() again to "
            "confirm"
        )

    def _forget(self, key: tuple[int, int, int], lease: Lease) -> None:
        """Drop ``lease`` from the caller table (once) and count the hold as ended."""
        if self._holds.get(key) is not lease:
            return
        del self._holds[key]
        ident = self._exclusive_id(key)
        if ident is not None and _EXCLUSIVE.get(ident) is lease:
            del _EXCLUSIVE[ident]
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
        # A retried release (first reply lost, or an earlier release() left
        # unconfirmed) that finds the key gone most likely deleted it itself the first
        # time: do not raise spuriously. A lease known lost before the release was not
        # deleted by it, whatever the retries found.
        if result == 1 or (not was_lost and (attempts > 1 or lease.unconfirmed)):
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
        seconds = self.ttl if ttl is None else _lock_ttl(ttl)
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
        seconds = self.ttl if ttl is None else _lock_ttl(ttl)
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
            raise LockNotAcquiredError(self._timed_out_message())
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
            raise LockNotAcquiredError(self._timed_out_message())
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


def _blpop(
    blocking: Any, key: str, wait: float, memory: bool
) -> Callable[[redis.Redis], Any]:
    if memory:
        return lambda _client: blocking.blpop([key], timeout=wait)
    # Bounded by the block itself, not by the blocking client's long socket timeout:
    # a stopped Redis must not keep a waiter past its budget (issue 14).
    return lambda _client: command_within(
        blocking, wait + _IO_MARGIN, "BLPOP", key, wait
    )


def _ablpop(
    blocking: Any, key: str, wait: float, memory: bool
) -> Callable[[redis.asyncio.Redis], Awaitable[Any]]:
    if memory:
        return lambda _client: blocking.blpop([key], timeout=wait)
    return lambda _client: acommand_within(
        blocking, wait + _IO_MARGIN, "BLPOP", key, wait
    )


def _quietly(fn: Callable[[str], None], token: str) -> Callable[[], None]:
    """A best-effort background clean-up: whatever fails (Redis, or the Cache closed
    meanwhile), the lease or intent it would undo expires by its TTL."""

    def job() -> None:
        try:
            fn(token)
        except Exception as exc:
            lock_log.debug("rcache: background lock clean-up failed: %r", exc)

    return job


def _check_budget(attempts: int, deadline: float | None) -> None:
    """No retry once a wait's budget (and its reply margin) is spent: a retry needs a
    new connection, whose handshake waits the client's full socket timeout on a hung
    Redis. A reply lost fast (a reset) is still retried, even by a single try."""
    if (
        attempts > 1
        and deadline is not None
        and time.monotonic() >= deadline + _IO_MARGIN
    ):
        raise BackendUnavailableError("Redis did not answer within the wait's budget")


def _socket_timeout(client: Any) -> float | None:
    """The client's socket timeout (None: none, or not a redis-py client). Read through
    connection_kwargs(), which also knows cluster clients (they have no pool): without
    it a lock wait on Redis Cluster had no I/O cap while the server hung."""
    try:
        kwargs = connection_kwargs(client)
    except AttributeError:  # a pool without connection settings (a test double)
        return None
    timeout = kwargs.get("socket_timeout") if hasattr(kwargs, "get") else None
    return float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else None


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
        self._key = self._exclusive_key = self._lock_keys.base
        self._fence_key = self._lock_keys.fence
        self._waiters = self._lock_keys.waiting
        self._grace = self._lock_keys.grace

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
        self._queue = self._lock_keys.queue
        self._queue_ttl = self._lock_keys.queue_expiry
        self._tickets = self._lock_keys.tickets
        self._signals = self._lock_keys.fair_signals

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
        self._key = self._lock_keys.permits
        self._fence_key = self._lock_keys.permits_fence
        self._signal = self._lock_keys.permits_signal

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
        k = self._lock_keys
        self._readers, self._writer, self._intents = k.readers, k.writer, k.intents
        self._rsignal, self._wsignal, self._fence_key = (
            k.read_signal,
            k.write_signal,
            k.rw_fence,
        )
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
        self._exclusive_key = self._writer

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


class _LockedDecorator(Protocol):
    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]], /
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> Callable[P, R]: ...


class LockMixin(CacheBase):
    """Adds ``lock``, ``locked``, ``rwlock`` and ``semaphore`` to ``Cache``."""

    #: The lock-only Cache of ``Cache(..., lock_url=...)``; None: locks use this one.
    _lock_cache: CacheBase | None = None

    def _lock_home(self) -> CacheBase:
        return self if self._lock_cache is None else self._lock_cache

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
            self._lock_home(),
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
            self._lock_home(),
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
            self._lock_home(),
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
        _lock_ttl(ttl)
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
        cache = self._lock_home()

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
