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
  Lock commands carry no failure-policy guard (``rcache._policy``): they never bypass.
* Waits keep their budget: each call of a wait (script or BLPOP) waits for its reply at
  most the rest of the budget plus ``IO_MARGIN``, so a hung Redis cannot hold a
  waiter on a socket timeout; clean-up after giving up runs in the background.
* The lock server's eviction policy is read once per Cache when locks are first used:
  an evicting policy can take a held lock, so it is logged at ERROR and counted.
* ``min_replicas=N`` (issue 15): each grant, extend and renewal is followed by ``WAIT``
  in the same write, on the same connection (``_Eval`` with a :class:`Confirm`). A
  grant fewer replicas acknowledged is released again and raises
  :class:`LockNotReplicatedError`; an unconfirmed extend or renewal leaves the lease's
  deadline where it was. This narrows the failover window above, it does not close it.

Code layout: the acquire, release and extend loops are written once, as flows
(``rcache._flow``): generators that yield commands (a lock script, a blocking wait on
the wake-up list, a sleep, a clean-up run without the caller waiting) and receive the
replies. ``acquire()`` drives a flow with the Cache's sync driver, ``aacquire()`` with
its async one; the flows are unit-tested with scripted replies, without Redis. The
protocol of each Lua script (KEYS/ARGV builders, reply codes) sits in one section.

Metric labels: ``cache.lock(name)`` reports under ``name`` and ``@locked(template)``
under the template, so keep lock names low-cardinality or pass ``metrics_name=``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from enum import IntEnum
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    NamedTuple,
    Protocol,
    TypedDict,
    overload,
)

from rcache._admin import ForceReleaseResult, force_release_flow
from rcache._config import Duration, LockOptions, lock_ttl, ttl_ms, wait_timeout
from rcache._exceptions import (
    BackendUnavailableError,
    ConfigurationError,
    LockError,
    LockLostError,
    LockNotAcquiredError,
    LockNotOwnedError,
    LockNotReplicatedError,
    LockReleaseUnconfirmedError,
    RCacheError,
)
from rcache._flow import IO_MARGIN, Block, Command, Critical, Eval, Flow, Sleep
from rcache._keys import KeyBuilder, KeySpace
from rcache._leases import Renewable, get_renewer
from rcache._logging import lock_log
from rcache._redis import (
    LuaScript,
    aeval_confirmed_within,
    aeval_within,
    aeviction_policy,
    eval_confirmed_within,
    eval_within,
    eviction_policy,
    process_id,
    socket_timeout,
)
from rcache._types import P, R

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    from typing_extensions import Self, Unpack

    from rcache._flow import AsyncDriver, SyncDriver
    from rcache._metrics import MetricsSink
    from rcache._redis import AsyncRedis, ClientSpec, SyncRedis

__all__ = [
    "FairLock",
    "Lease",
    "Lock",
    "LockKwargs",
    "LockedDecorator",
    "LockedKwargs",
    "RWLock",
    "ReadLock",
    "Semaphore",
    "WriteLock",
    "make_lock",
    "make_locked",
    "make_rwlock",
    "make_semaphore",
]

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
#: Eviction policies that never evict a key: every other one can take a held lock
#: (allkeys-*) or, since lock keys carry a TTL, volatile-* too.
_SAFE_POLICIES = frozenset({"noeviction"})

_DEFAULT: Any = object()
#: The clock of leases and waits (a module global, so that flows are unit-tested with a
#: fake clock, as CircuitBreaker(clock=) is).
_monotonic = time.monotonic
_Callback = Callable[["Lease"], object]
#: Who holds a lease: (process, thread, asyncio task or 0).
_Owner = tuple[int, int, int]


# -- protocol: one section per Lua script ----------------------------------------------
#
# Each script's header (rcache/_scripts/*.lua) documents its KEYS, ARGV and replies; the
# builders below are the only places that put them in order, and the enums name every
# reply code and mode flag the code compares.


class Acquired(IntEnum):
    """First element of an acquire script's reply."""

    BUSY = 0  #: held by someone else: the value is the wait hint in ms
    GRANTED = 1  #: the value is the fence (0 for read leases)
    RESERVED = 2  #: free, but a woken waiter's turn for the value ms (lock_acquire)


class Released(IntEnum):
    """Reply of a release script."""

    OTHER = 0  #: the key holds another token: left untouched
    RELEASED = 1
    GONE = -1  #: the lease expired (or was never granted)


class Extended(IntEnum):
    """Reply of an extend script (lock_extend, sem_extend)."""

    OTHER = 0
    EXTENDED = 1
    GONE = -1


class Try:
    """lock_acquire ARGV[3]: which try of an acquisition this is."""

    FIRST: Final = "0"  #: first try of a waiting acquire (leaves a grace to a waiter)
    RETRY: Final = "1"  #: retry after a wake-up
    ONCE: Final = "2"  #: single try (timeout=0): never waits, ignores the grace


class Side:
    """rwlock_release ARGV[2] / lock_fair_release ARGV[3]: what is given up."""

    READ: Final = "r"  #: a read lease (rwlock) or the lock (fair: "r" releases it)
    WRITE: Final = "w"  #: the write lease
    ABANDON: Final = "a"  #: a waiter's place: writer intent or fair-queue entry


#: Release and extend replies that mean "the lease is gone" (Released and Extended
#: share the codes): why, for the lease's ``lost_reason``. The caller then gets
#: LockNotOwnedError (see _not_owned): nothing was deleted or extended.
_GONE: Final[Mapping[int, str]] = {
    Released.OTHER: "taken over by another holder",
    Released.GONE: "expired",
}

_ACQUIRED = {code.value: code for code in Acquired}  # an Enum call costs ~1 µs


class Attempt(NamedTuple):
    """The parsed reply of an acquire script."""

    code: Acquired
    value: int  #: the fence when granted, else ms until a re-check is worth it

    @classmethod
    def parse(cls, reply: Any) -> Attempt:
        return cls(_ACQUIRED[int(reply[0])], int(reply[1]))


_LOCK_ACQUIRE = LuaScript("lock_acquire")
_LOCK_RELEASE = LuaScript("lock_release")
_LOCK_EXTEND = LuaScript("lock_extend")
_LOCK_WAKE = LuaScript("lock_wake")
_FAIR_ACQUIRE = LuaScript("lock_fair_acquire")
_FAIR_RELEASE = LuaScript("lock_fair_release")
_RW_READ = LuaScript("rwlock_read")
_RW_WRITE = LuaScript("rwlock_write")
_RW_RELEASE = LuaScript("rwlock_release")
_SEM_ACQUIRE = LuaScript("sem_acquire")
_SEM_RELEASE = LuaScript("sem_release")
_SEM_EXTEND = LuaScript("sem_extend")

#: How a call waits for its reply: (seconds, or None for the client's socket timeout;
#: a callback run once the command is written, or None).
_Within = tuple[float | None, Callable[[], object] | None]


class Confirm(NamedTuple):
    """``min_replicas=``: a write counts once this many replicas acknowledged it
    (``WAIT replicas wait_ms`` on the connection that wrote it)."""

    replicas: int
    wait_ms: int

    @classmethod
    def of(cls, options: LockOptions) -> Confirm | None:
        """None for ``min_replicas=0``: no WAIT, no extra wait (today's protocol)."""
        if not options.min_replicas:
            return None
        return cls(options.min_replicas, max(1, round(options.replica_timeout * 1000)))

    def shortfall(self, acked: Any) -> int | None:
        """WAIT's reply ``acked`` when fewer replicas acknowledged than asked (the
        write is not confirmed), else None."""
        count = int(acked)
        return count if count < self.replicas else None


class ScriptCall:
    """A lock script with its keys and arguments, run with a sync or an async client."""

    __slots__ = ("args", "keys", "spec")

    def __init__(self, spec: LuaScript, keys: list[str], args: list[Any]) -> None:
        self.spec = spec
        self.keys = keys
        self.args = args

    @property
    def script(self) -> LuaScript:
        return self.spec

    def run(self, client: redis.Redis, within: _Within | None = None) -> Any:
        """Run the script; ``within`` bounds the wait for its reply (see _Within)."""
        if within is None:
            return self.spec(client, self.keys, self.args)
        return eval_within(client, self.spec, self.keys, self.args, *within)

    def arun(
        self, client: redis.asyncio.Redis, within: _Within | None = None
    ) -> Awaitable[Any]:
        if within is None:
            return self.spec.acall(client, self.keys, self.args)
        return aeval_within(client, self.spec, self.keys, self.args, *within)

    def run_confirmed(
        self, client: redis.Redis, within: _Within, confirm: Confirm
    ) -> tuple[Any, int]:
        """Run the script and WAIT for ``confirm``'s replicas on the same connection:
        (the script's reply, replicas that acknowledged)."""
        return eval_confirmed_within(
            client, self.spec, self.keys, self.args, *confirm, *within
        )

    def arun_confirmed(
        self, client: redis.asyncio.Redis, within: _Within, confirm: Confirm
    ) -> Awaitable[tuple[Any, int]]:
        return aeval_confirmed_within(
            client, self.spec, self.keys, self.args, *confirm, *within
        )


def lock_acquire(
    key: str,
    fence: str,
    waiting: str,
    grace: str,
    *,
    token: str,
    ttl: float,
    mode: str,
    marker: float,
) -> ScriptCall:
    """``lock_acquire.lua``: take the lease ``ttl`` s and a fence; ``mode`` is a
    :class:`Try`; a failed try marks "someone waits" for ``marker`` s. Replies an
    :class:`Attempt`."""
    return ScriptCall(
        _LOCK_ACQUIRE,
        [key, fence, waiting, grace],
        [token, ttl_ms(ttl), mode, ttl_ms(marker)],
    )


def lock_release(
    key: str, signal: str, waiting: str, grace: str, *, token: str
) -> ScriptCall:
    """``lock_release.lua``: compare-and-delete, one wake-up (and a hand-off grace)
    when someone waits. Replies :class:`Released`."""
    return ScriptCall(
        _LOCK_RELEASE, [key, signal, waiting, grace], [token, _SIGNAL_MS, 1, _GRACE_MS]
    )


def lock_extend(key: str, *, token: str, ttl: float) -> ScriptCall:
    """``lock_extend.lua``: replace the lease of a string key. Replies
    :class:`Extended`."""
    return ScriptCall(_LOCK_EXTEND, [key], [token, ttl_ms(ttl)])


def lock_wake(signal: str, key: str | None = None) -> ScriptCall:
    """``lock_wake.lua``: pass a wake-up on (only while ``key`` is free, if given).
    Replies 1 if one was pushed."""
    keys = [signal] if key is None else [signal, key]
    return ScriptCall(_LOCK_WAKE, keys, [_SIGNAL_MS, 1])


def fair_acquire(
    key: str,
    fence: str,
    queue: str,
    queue_expiry: str,
    tickets: str,
    *,
    token: str,
    ttl: float,
    place: float,
) -> ScriptCall:
    """``lock_fair_acquire.lua``: take the lease in FIFO order, else (re)join the
    queue, keeping the place ``place`` s. Replies an :class:`Attempt`."""
    return ScriptCall(
        _FAIR_ACQUIRE,
        [key, fence, queue, queue_expiry, tickets],
        [token, ttl_ms(ttl), ttl_ms(place), "1"],
    )


def fair_release(
    key: str, queue: str, queue_expiry: str, signals: str, *, token: str, side: str
) -> ScriptCall:
    """``lock_fair_release.lua``: release (``side`` "r") or leave the queue ("a"), and
    wake the first waiter. Replies :class:`Released`."""
    return ScriptCall(
        _FAIR_RELEASE, [key, queue, queue_expiry, signals], [token, _SIGNAL_MS, side]
    )


def rw_read(
    readers: str,
    writer: str,
    intents: str,
    signal: str,
    *,
    token: str,
    ttl: float,
    waited: bool,
) -> ScriptCall:
    """``rwlock_read.lua``: take a read lease unless a writer holds or waits. Replies an
    :class:`Attempt` (the value is 0 when granted: reads are not fenced)."""
    return ScriptCall(
        _RW_READ,
        [readers, writer, intents, signal],
        [token, ttl_ms(ttl), "1" if waited else "0", _SIGNAL_MS],
    )


def rw_write(
    readers: str,
    writer: str,
    intents: str,
    fence: str,
    *,
    token: str,
    ttl: float,
    intent: float,
) -> ScriptCall:
    """``rwlock_write.lua``: take the write lease, else record an intent kept
    ``intent`` s. Replies an :class:`Attempt`."""
    return ScriptCall(
        _RW_WRITE,
        [readers, writer, intents, fence],
        [token, ttl_ms(ttl), ttl_ms(intent)],
    )


def rw_release(keys: list[str], *, token: str, side: str) -> ScriptCall:
    """``rwlock_release.lua`` (keys: readers, writer, intents, reader and writer
    signals): give up a :class:`Side`. Replies :class:`Released`."""
    return ScriptCall(_RW_RELEASE, keys, [token, side, _SIGNAL_MS])


def sem_acquire(
    permits: str, fence: str, *, token: str, ttl: float, limit: int
) -> ScriptCall:
    """``sem_acquire.lua``: take one of ``limit`` leased permits. Replies an
    :class:`Attempt`."""
    return ScriptCall(_SEM_ACQUIRE, [permits, fence], [token, ttl_ms(ttl), limit])


def sem_release(permits: str, signal: str, *, token: str, limit: int) -> ScriptCall:
    """``sem_release.lua``: return a permit and wake one waiter. Replies
    :class:`Released` (1 or -1)."""
    return ScriptCall(_SEM_RELEASE, [permits, signal], [token, _SIGNAL_MS, limit])


def sem_extend(permits: str, *, token: str, ttl: float) -> ScriptCall:
    """``sem_extend.lua``: replace the lease of a permit or read lease (a ZSET member).
    Replies :class:`Extended` (1 or -1)."""
    return ScriptCall(_SEM_EXTEND, [permits], [token, ttl_ms(ttl)])


# -- commands the lock flows yield (besides rcache._flow.Sleep) -----------------------
#
# Lock commands carry no guard: a failure raises (locks fail closed). Each knows how to
# run in both modes, as rcache._flow's commands do.


class _Caps(NamedTuple):
    """How long a client may wait: its socket timeout (None: none), and the longest
    BLPOP that stays under the blocking client's socket timeout; memory:// or not."""

    io: float | None
    block: float
    memory: bool


#: Per SyncRedis/AsyncRedis: their clients' settings do not change (read once).
_CAPS: weakref.WeakKeyDictionary[object, _Caps] = weakref.WeakKeyDictionary()


#: The last (SyncRedis/AsyncRedis, caps) looked up: the common case, one Cache, costs
#: an identity test instead of a WeakKeyDictionary lookup per command.
_LAST_CAPS: tuple[weakref.ref[Any], _Caps] | None = None


def _caps(redis: SyncRedis | AsyncRedis) -> _Caps:
    global _LAST_CAPS
    last = _LAST_CAPS
    if last is not None and last[0]() is redis:
        return last[1]
    caps = _CAPS.get(redis)
    if caps is None:
        io = socket_timeout(redis.client)
        block = _block_cap(redis.blocking_client)
        caps = _CAPS[redis] = _Caps(io, block, redis.memory)
    _LAST_CAPS = (weakref.ref(redis), caps)
    return caps


class _Env(NamedTuple):
    """What an acquire flow needs to know of the driver running it."""

    caps: _Caps
    #: The event loop of an async acquisition (its lease is renewed there), else None.
    loop: asyncio.AbstractEventLoop | None


class _ReadEnv(Command):
    """Replies the driver's :class:`_Env` (no IO)."""

    __slots__ = ()

    def run(self, driver: SyncDriver) -> _Env:
        return _Env(_caps(driver.redis), None)

    async def arun(self, driver: AsyncDriver) -> _Env:
        return _Env(_caps(driver.redis), asyncio.get_running_loop())


_ENV: Final = _ReadEnv()


class _Eval(Command):
    """A lock script, run by the driver's client with its transient-error retries.

    With a ``deadline`` (a wait's budget), each attempt waits for its reply at most the
    rest of the budget plus ``IO_MARGIN`` (never past the client's socket timeout),
    and no attempt starts once that is spent: a retry needs a new connection, whose
    handshake waits the full socket timeout on a hung Redis (a reply lost fast, a
    reset, is still retried, even by a single try). ``on_sent`` runs once the command
    is written (a release must know whether it may have run). ``attempts`` counts the
    attempts made (a retried release that finds its key gone deleted it itself).

    With ``confirm`` (``min_replicas=``), ``WAIT`` follows the script on the same
    connection and the reply is (the script's reply, replicas that acknowledged); WAIT
    may take its own timeout on top of the attempt's bound.
    """

    __slots__ = (
        "_started",
        "attempts",
        "call",
        "confirm",
        "deadline",
        "on_sent",
        "retry",
    )

    def __init__(
        self,
        call: ScriptCall,
        deadline: float | None = None,
        on_sent: Callable[[], object] | None = None,
        retry: bool = True,
        confirm: Confirm | None = None,
    ) -> None:
        self.call = call
        self.deadline = deadline
        self.on_sent = on_sent
        self.retry = retry
        self.confirm = confirm
        self.attempts = 0
        self._started = 0.0

    def _within(self, cap: float | None) -> _Within:
        """How the next attempt waits for its reply (counted as an attempt)."""
        self.attempts += 1
        deadline = self.deadline
        if deadline is None:
            return cap, self.on_sent
        now = _monotonic()
        if self.attempts > 1:
            left = deadline + IO_MARGIN - now
            # A retry after a reply that did not come (the last attempt waited) needs a
            # new connection, and its handshake waits the full socket timeout on a hung
            # Redis: start it only if the budget covers that (CI: 2.4 s for a 1.5 s
            # budget). A reply lost fast (a reset) is still retried.
            waited = now - self._started >= IO_MARGIN
            if left <= 0 or (waited and cap is not None and left < cap):
                raise BackendUnavailableError(
                    "Redis did not answer within the wait's budget"
                )
        self._started = now
        limit = max(0.0, deadline - now) + IO_MARGIN
        return (limit if cap is None else min(limit, cap)), self.on_sent

    # Always through command_within (ScriptCall with a `within`), even with nothing to
    # bound beyond the socket timeout: it is also the cheapest way to run a command (no
    # poll then, none of redis-py's command layer: retry wrapper, observability).
    # memory:// (fakeredis, in-process: nothing can hang) runs the script as it is.

    def run(self, driver: SyncDriver) -> Any:
        redis, call, confirm = driver.redis, self.call, self.confirm
        caps = _caps(redis)
        if confirm is not None:
            _check_replicated(caps)
            return redis.run(
                lambda c: call.run_confirmed(c, self._within(caps.io), confirm),
                retry=self.retry,
            )
        if caps.memory:
            return redis.run(call.run, retry=self.retry)
        cap = caps.io
        return redis.run(lambda c: call.run(c, self._within(cap)), retry=self.retry)

    async def arun(self, driver: AsyncDriver) -> Any:
        redis, call, confirm = driver.redis, self.call, self.confirm
        caps = _caps(redis)
        if confirm is not None:
            _check_replicated(caps)
            return await redis.run(
                lambda c: call.arun_confirmed(c, self._within(caps.io), confirm),
                retry=self.retry,
            )
        if caps.memory:
            return await redis.run(call.arun, retry=self.retry)
        cap = caps.io
        op = lambda c: call.arun(c, self._within(cap))  # noqa: E731
        return await redis.run(op, retry=self.retry)


def _check_replicated(caps: _Caps) -> None:
    if caps.memory:
        raise ConfigurationError(
            "min_replicas= needs a Redis server with replicas; memory:// has none"
        )


class _Renewal(_Eval):
    """An extend confirmed by replicas (``min_replicas=``), as the renewer runs it:
    reply 1 only once enough replicas acknowledged; an extend they did not acknowledge
    raises (a transient failure to the renewer: it tries again soon, and the lease's
    deadline stays where the last confirmed renewal put it)."""

    __slots__ = ()

    def run(self, driver: SyncDriver) -> Any:
        return self._checked(_Eval.run(self, driver))

    async def arun(self, driver: AsyncDriver) -> Any:
        return self._checked(await _Eval.arun(self, driver))

    def _checked(self, reply: tuple[Any, int]) -> Any:
        code, acked = reply
        confirm = self.confirm
        short = None if confirm is None else confirm.shortfall(acked)
        if short is not None and confirm is not None and code == Extended.EXTENDED:
            raise LockError(_unreplicated("the renewal", short, confirm))
        return code


def _unreplicated(what: str, acked: int, confirm: Confirm) -> str:
    return (
        f"only {acked} replica(s) acknowledged {what} within {confirm.wait_ms}ms "
        f"(WAIT), min_replicas={confirm.replicas}"
    )


@dataclass(frozen=True, slots=True)
class _Pop(Block):
    """A lock waiter's wait: BLPOP, so that one release wakes one waiter
    (rcache._flow.Block, which bounds the wait, with ``pop``)."""

    pop: bool = True


class _Detach(Command):
    """Run ``flow`` (a clean-up, a check) without the caller waiting for it; replies
    None at once. Sync: in the lock IO thread of this client, so a hung Redis spends
    none of the caller's budget; with ``inline`` (the caller was interrupted, and a
    KeyboardInterrupt may end the process) right here instead. Async: a task kept in
    ``tasks``, so a cancelled caller finishes at once and the clean-up still runs.
    Failures are logged at DEBUG: what a clean-up would undo expires by its TTL."""

    __slots__ = ("flow", "inline", "tasks")

    def __init__(
        self, flow: Flow[None], tasks: set[asyncio.Task[Any]], inline: bool = False
    ) -> None:
        self.flow = flow
        self.tasks = tasks
        self.inline = inline

    def run(self, driver: SyncDriver) -> None:
        flow = self.flow

        def job() -> None:
            try:
                driver.drive(flow)
            except Exception as exc:  # Redis, or the Cache closed meanwhile
                lock_log.debug("rcache: background lock clean-up failed: %r", exc)

        if self.inline:
            job()
        else:
            get_renewer().submit(job, driver.redis)

    async def arun(self, driver: AsyncDriver) -> None:
        _spawn(self.tasks, driver.drive(self.flow), driver.background)


class _ReadPolicy(Command):
    """Replies the server's ``maxmemory-policy`` ("" if it does not say)."""

    __slots__ = ()

    def run(self, driver: SyncDriver) -> str:
        return driver.redis.run(eviction_policy, retry=False)

    async def arun(self, driver: AsyncDriver) -> str:
        return await driver.redis.run(aeviction_policy, retry=False)


_READ_POLICY: Final = _ReadPolicy()


def _spawn(
    tasks: set[asyncio.Task[Any]],
    coro: Coroutine[Any, Any, Any],
    driver_tasks: set[asyncio.Task[Any]],
) -> asyncio.Task[Any]:
    """A background task, referenced in ``tasks`` (the lock's) and ``driver_tasks``
    (its driver's, which ``Cache.aclose`` waits for) until it is done."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)
    driver_tasks.add(task)
    task.add_done_callback(_reap(tasks, driver_tasks))
    return task


def _reap(
    tasks: set[asyncio.Task[Any]], driver_tasks: set[asyncio.Task[Any]]
) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        driver_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            lock_log.debug("rcache: background lock task failed: %s", task.exception())

    return done


def _block_cap(blocking: Any) -> float:
    """Longest BLPOP that stays under the blocking client's socket timeout."""
    timeout = socket_timeout(blocking)
    if timeout is None:
        return _MAX_BLOCK
    return max(_MIN_BLOCK, min(_MAX_BLOCK, timeout * 0.8))


def _owner_key() -> _Owner:
    """Who is acquiring: (process, thread, asyncio task or 0)."""
    loop = asyncio._get_running_loop()  # None outside a loop, without raising
    task = None if loop is None else asyncio.current_task(loop)
    return (process_id(), threading.get_ident(), 0 if task is None else id(task))


def _check_name(name: object, what: str = "lock name") -> str:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{what} must be a non-empty string, got {name!r}")
    if name.startswith("}"):
        # The keys are "{prefix}:l:{<name>}...": with a leading "}" the hash tag is
        # empty, so Redis Cluster hashes each whole key and a lock's keys (lease,
        # fence, wake-ups) land in different slots: every script would fail there with
        # CROSSSLOT. Refused everywhere, so that a name that works on one server does
        # not fail only in production on a cluster.
        raise ConfigurationError(
            f"{what} {name!r} starts with '}}': its Redis keys would not share one "
            "Redis Cluster hash slot; any other name works, braces included"
        )
    return name


#: Leases of exclusive locks by (server, key, owner), across lock objects: re-entering a
#: lock this thread/task holds (through another ``cache.lock(name)`` or ``@locked``
#: call) fails at once with a clear message instead of waiting for itself (issue 12).
_EXCLUSIVE: weakref.WeakValueDictionary[tuple[str, str, _Owner], Lease] = (
    weakref.WeakValueDictionary()
)

#: The eviction policy found per client spec (checked once, when locks are first used).
_POLICIES: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


class Lease(Renewable):
    """One acquisition of a lock, read/write lease or semaphore permit.

    ``token`` identifies it in Redis; ``fence`` is the fencing token to pass to the
    resource (strictly increasing per lock name, 0 for read leases). ``held`` is a local
    check (no IO): not lost and the client-side deadline not passed.
    """

    # Defaults as class attributes (as Renewable's): set per instance only when they
    # change, not on every acquisition.
    released = False
    #: A release was sent but its reply never came: maybe released, so not held.
    unconfirmed = False
    release_sent = False

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
        self.pid = process_id()  # os.getpid() without a system call per acquire
        self.acquired_at = _monotonic()
        self.waited = self.acquired_at - started
        self.on_lost = owner.on_lost
        self.watched = renew or owner.on_lost is not None

    def __repr__(self) -> str:
        state = "lost" if self.lost else "released" if self.released else "held"
        return f"<Lease {self.name!r} fence={self.fence} {state}>"

    def _renew_command(self) -> Command:
        """Renewer: replace the lease's TTL (reply 1; 0/-1 when the token is gone),
        confirmed by replicas with ``min_replicas=``."""
        call = self.owner._extend_call(self.token, self.ttl)
        confirm = self.owner._confirm
        if confirm is not None:
            return _Renewal(call, confirm=confirm)
        return Eval(call.script, call.keys, call.args)

    def _confirmed(self, sent: float) -> None:
        self._renewed(sent)
        self.owner._metrics.lock_renewal(self.metrics_name, "renewed")

    def _sent(self) -> None:
        """The release is written: from now on it may have run."""
        self.release_sent = True

    @property
    def held(self) -> bool:
        """Not lost, not released (nor released unconfirmed), and within its deadline
        (local check, no IO)."""
        return (
            not self.lost
            and not self.released
            and not self.unconfirmed
            and _monotonic() < self.deadline
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
        if not self.lost and not self.released and _monotonic() >= self.deadline:
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


class _Home(Protocol):
    """What a lock uses of the Cache that keeps it (the Cache, or its lock_url twin)."""

    prefix: str
    keyspace: KeySpace
    metrics: MetricsSink
    _spec: ClientSpec
    _sync: SyncRedis  # read by the renewer
    _driver: SyncDriver
    _adriver: AsyncDriver


class _LeasedLock:
    """Shared machinery of every lease-based primitive; subclasses supply the scripts.

    The acquire, release and extend loops are flows (``_acquire_flow``,
    ``_release_flow``, ``_extend_flow``), written once; each public method and its
    ``a`` twin drive one with the Cache's sync or async driver.
    """

    _kind = "lock"
    _fenced = True
    #: Redis key of an exclusive hold (re-entry is detected across lock objects).
    _exclusive_key: str | None = None

    def __init__(
        self,
        cache: _Home,
        name: str,
        options: LockOptions | None = None,
        **given: Unpack[LockKwargs],
    ) -> None:
        """Made by :meth:`rcache.Cache.lock` and its siblings, with the options
        already checked (``options``); given as keywords, they are checked here."""
        if options is None:
            options = LockOptions.parse(given)
        elif given:
            raise TypeError("pass options= or keyword options, not both")
        self.name = _check_name(name)
        self.options = options
        self.ttl = options.ttl
        self.timeout = options.timeout
        self.auto_renew = options.auto_renew
        self.max_hold = options.max_hold
        self.on_lost = options.on_lost
        self.raise_on_not_owned = options.raise_on_not_owned
        self.metrics_name = options.metrics_name or name
        #: min_replicas=: WAIT after each grant and extend (None: not asked)
        self._confirm = Confirm.of(options)
        self._cache = cache
        self._metrics: MetricsSink = cache.metrics
        self._lock_keys = cache.keyspace.lock(name)
        self._holds: dict[_Owner, Lease] = {}
        self._signal = self._lock_keys.signal
        self._background: set[asyncio.Task[Any]] = set()
        #: (spec, its describe()) once seen: the re-entry table's server name
        self._server: tuple[object, str] = (None, "")
        #: the spec whose eviction policy is known or being read
        self._policy_spec: object = None
        self._metrics.register_lock(self.metrics_name)
        self._name_keys()

    def _name_keys(self) -> None:
        """Set the Redis keys this kind uses (see the protocol section)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ttl={self.ttl:g}s>"

    # -- the scripts of each kind (see the protocol section) -----------------------------

    def _acquire_call(self, token: str, mode: str, cap: float) -> ScriptCall:
        """One try; ``mode`` is a :class:`Try`, ``cap`` the longest block of a waiter
        (what a waiter's marker, queue place or intent must outlive)."""
        raise NotImplementedError

    def _release_call(self, token: str) -> ScriptCall:
        raise NotImplementedError

    def _extend_call(self, token: str, ttl: float) -> ScriptCall:
        raise NotImplementedError

    def _abandon_call(self, token: str) -> ScriptCall | None:
        """Undo a waiter's footprint when it gives up (writer intents)."""
        return None

    def _wake_call(self, token: str) -> ScriptCall | None:
        """Pass a wake-up on (Lock: only if the lock is free)."""
        return lock_wake(self._signal_key(token))

    def _signal_key(self, token: str) -> str:
        """The list this waiter blocks on."""
        return self._signal

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

    def acquire(self, timeout: float | Duration | None = _DEFAULT) -> bool:
        """Acquire, waiting up to ``timeout`` seconds (None: forever; 0: one try).

        Returns within ``timeout`` plus a fraction of a second even while Redis hangs:
        every call of the wait is bounded by the rest of its budget.

        :returns: True if acquired, False if the wait timed out.
        :raises LockNotAcquiredError: Redis failed or did not answer (fail closed).
        """
        return self._cache._driver.drive(self._acquire_flow(timeout))

    async def aacquire(self, timeout: float | Duration | None = _DEFAULT) -> bool:
        """Async twin of :meth:`acquire`; cancellation-safe."""
        return await self._cache._adriver.drive(self._acquire_flow(timeout))

    def _acquire_flow(
        self, timeout: Any, renew: bool | None = None, required: bool = False
    ) -> Flow[bool]:
        """Try; while busy, block on the wake-up list for at most the holder's
        remaining lease, and try again; give up at the deadline.

        ``renew``: auto-renew by default (``with``, ``@locked``); ``required``: raise
        LockNotAcquiredError instead of returning False. Whatever interrupts it, no
        lease or queue place is left behind beyond its TTL.
        """
        owner, timeout = self._begin(timeout)
        env: _Env = yield _ENV
        if self._policy_unknown():
            yield _Detach(self._policy_flow(), self._background)
        # An identifier, not a secret (whoever reaches Redis can read it): 96 random
        # bits from `random`, reseeded in a forked child, cost no system call.
        token = f"{owner[0]}:{random.getrandbits(96):024x}"
        started = _monotonic()
        deadline = None if timeout is None else started + timeout
        cap = env.caps.block
        waited = False
        while True:
            mode = Try.ONCE if timeout == 0 else Try.RETRY if waited else Try.FIRST
            call = self._acquire_call(token, mode, cap)
            sent = _monotonic()
            try:
                reply = yield _Eval(call, deadline, confirm=self._confirm)
            except RCacheError as exc:
                # The script may have run (a lost reply): undo by token, without the
                # caller waiting, so that a hung Redis takes no more of the budget.
                yield _Detach(self._compensate_flow(token), self._background)
                raise self._not_acquired(exc) from exc
            except GeneratorExit:
                raise
            except BaseException:  # interrupted or cancelled: the script may have run
                yield _Detach(self._compensate_flow(token), self._background, True)
                raise
            attempt, acked = self._parse(reply)
            if attempt.code == Acquired.GRANTED:
                if acked is not None:
                    yield from self._unconfirmed_flow(token, acked)
                self._grant(owner, token, attempt.value, sent, started, renew, env.loop)
                return True
            if deadline is not None and _monotonic() >= deadline:
                yield from self._abandon_flow(token, deadline)
                self._metrics.lock_acquire(
                    self.metrics_name, "busy" if timeout == 0 else "timeout"
                )
                if required:
                    raise LockNotAcquiredError(self._timed_out_message())
                return False
            wait = self._wait_time(attempt.value, deadline, cap)
            if attempt.code == Acquired.RESERVED:  # a woken waiter's turn: let it in
                yield Sleep(wait)
                continue
            try:
                yield _Pop(self._signal_key(token), wait)
            except RCacheError as exc:
                if deadline is not None and _monotonic() >= deadline:
                    # Redis did not answer and the budget is spent: no further call
                    # (the clean-up of a fair/writer place runs in the background).
                    yield _Detach(self._abandon_flow(token), self._background)
                    raise self._not_acquired(exc) from exc
                remaining = wait if deadline is None else deadline - _monotonic()
                yield Sleep(max(0.0, min(remaining, random.uniform(*_FALLBACK))))
            except GeneratorExit:
                raise
            except BaseException:
                # Give up the place (writer intent, fair queue) and pass on a wake-up
                # this waiter may have popped just before it was interrupted.
                flow = self._abandon_flow(token, wake=True)
                yield _Detach(flow, self._background, True)
                raise
            waited = True

    def _parse(self, reply: Any) -> tuple[Attempt, int | None]:
        """The attempt, and with ``min_replicas=`` the replicas that acknowledged it
        (None: confirmed, or not asked)."""
        confirm = self._confirm
        if confirm is None:
            return Attempt.parse(reply), None
        return Attempt.parse(reply[0]), confirm.shortfall(reply[1])

    def _unconfirmed_flow(self, token: str, acked: int) -> Flow[None]:
        """A grant too few replicas acknowledged: a failover could lose it, so it is
        released again (before the caller hears of it: no hold is left behind, and
        the release wakes a waiter) and the acquire fails at once: retrying within the
        budget would only wait on the same replicas (Redisson's syncSlaves throws)."""
        confirm = self._confirm
        assert confirm is not None
        try:
            # Critical: a cancelled caller must not keep the lock to its TTL
            yield Critical(_Eval(self._release_call(token)))
        except RCacheError as exc:
            lock_log.debug("rcache: releasing an unreplicated grant failed: %s", exc)
        self._metrics.lock_acquire(self.metrics_name, "unreplicated")
        what = f"the grant of {self._kind} {self.name!r}"
        raise LockNotReplicatedError(
            f"{_unreplicated(what, acked, confirm)}; it was released again, since a "
            "failover could lose it. Check the replicas (INFO replication), or raise "
            "replica_timeout=",
            confirm.replicas,
            acked,
        )

    def _begin(self, timeout: Any) -> tuple[_Owner, float | None]:
        timeout = self.timeout if timeout is _DEFAULT else wait_timeout(timeout)
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

    def _wait_time(self, hint_ms: int, deadline: float | None, cap: float) -> float:
        wait = hint_ms / 1000 + _EXPIRY_SLACK if hint_ms > 0 else _FALLBACK[1]
        wait = min(wait, cap)
        if deadline is not None:
            wait = min(wait, deadline - _monotonic())
        return max(wait, _MIN_BLOCK)

    def _grant(
        self,
        key: _Owner,
        token: str,
        fence: int,
        sent: float,
        started: float,
        renew: bool | None,
        loop: asyncio.AbstractEventLoop | None,
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

    def _not_acquired(self, exc: RCacheError) -> LockNotAcquiredError:
        self._metrics.lock_acquire(self.metrics_name, "error")
        return LockNotAcquiredError(
            f"could not acquire {self._kind} {self.name!r}: Redis failed ({exc}); "
            "locks fail closed"
        )

    def _compensate_flow(self, token: str) -> Flow[None]:
        """Undo an acquire that may have run on the server (its reply was lost, or the
        caller was interrupted): release by token, then leave any queue."""
        try:
            yield _Eval(self._release_call(token), retry=False)
        except RCacheError:
            pass  # Redis is down: the lease, if any, expires by its TTL
        yield from self._abandon_flow(token)

    def _abandon_flow(
        self, token: str, deadline: float | None = None, wake: bool = False
    ) -> Flow[None]:
        """Undo a waiter's footprint (writer intent, fair-queue place), bounded by the
        wait's budget; ``wake``: else pass on a wake-up it may have popped. A failure
        leaves only an entry that expires by itself."""
        call = self._abandon_call(token)
        if call is None and wake:
            call = self._wake_call(token)
        if call is None:
            return
        try:
            yield _Eval(call, deadline, retry=False)
        except RCacheError:
            pass

    # -- re-entry (issue 12) ------------------------------------------------------------

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

    def _exclusive_id(self, owner: _Owner) -> tuple[str, str, _Owner] | None:
        if self._exclusive_key is None:
            return None
        spec = self._cache._spec
        if self._server[0] is not spec:  # describe() formats the URL: once per spec
            self._server = (spec, spec.describe())
        return (self._server[1], self._exclusive_key, owner)

    def _exclusive_hold(self, owner: _Owner) -> Lease | None:
        ident = self._exclusive_id(owner)
        lease = None if ident is None else _EXCLUSIVE.get(ident)
        return lease if lease is not None and lease.held else None

    # -- eviction policy (issue 14: an evicted lock key was granted to a second client) --

    def _policy_unknown(self) -> bool:
        """True the first time locks of this client spec are used in this process: the
        caller then reads the policy, once (claimed here)."""
        spec = self._cache._spec
        if self._policy_spec is spec:
            return False
        self._policy_spec = spec
        if spec.memory or spec in _POLICIES:
            return False
        _POLICIES.setdefault(spec, "")  # claimed: checked once
        return True

    def _policy_flow(self) -> Flow[None]:
        """Read the server's eviction policy; say so loudly if it can evict locks."""
        try:
            policy: str = yield _READ_POLICY
        except RCacheError as exc:
            lock_log.debug("rcache: cannot read the eviction policy: %s", exc)
            return
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
        held = self._releasing()
        if held is not None:
            self._cache._driver.drive(self._release_flow(*held))

    async def arelease(self) -> None:
        """Async twin of :meth:`release`. Cancelling it does not cancel the release:
        the token is kept until Redis confirmed (redis-py #3847 / PR #3900)."""
        held = self._releasing()
        if held is not None:
            flow, driver = self._release_flow(*held), self._cache._adriver
            await asyncio.shield(
                _spawn(self._background, driver.drive(flow), driver.background)
            )

    def _releasing(self) -> tuple[_Owner, Lease] | None:
        """The caller's lease, no longer renewed (if the release fails, it runs
        out); None when the caller holds nothing (counted, raised unless told not)."""
        key = _owner_key()
        lease = self._holds.get(key)
        if lease is None:
            self._metrics.lock_release(self.metrics_name, "not_owned")
            if self.raise_on_not_owned:
                self._own("release")
            return None
        if lease.watched:
            get_renewer().remove(lease)
        return key, lease

    def _release_flow(self, key: _Owner, lease: Lease) -> Flow[None]:
        """Compare-and-delete by token; tell "gone" from "not confirmed" (see
        :meth:`release`)."""
        command = _Eval(self._release_call(lease.token), on_sent=lease._sent)
        try:
            code = int((yield command))
        except RCacheError as exc:
            raise self._release_failed(lease, exc) from exc
        self._forget(key, lease)
        was_lost = lease.lost
        lease.released = True
        # A retried release (first reply lost, or an earlier release() left
        # unconfirmed) that finds the key gone most likely deleted it itself the first
        # time: do not raise spuriously. A lease known lost before the release was not
        # deleted by it, whatever the retries found.
        retried = command.attempts > 1 or lease.unconfirmed
        if code == Released.RELEASED or (not was_lost and retried):
            self._metrics.lock_release(self.metrics_name, "released")
            return
        self._metrics.lock_release(self.metrics_name, "not_owned")
        if not was_lost:
            lease.lost = True
            lease.lost_reason = f"{_GONE[code]} before the release"
            self._metrics.lock_renewal(self.metrics_name, "lost")
        if self.raise_on_not_owned:
            raise LockNotOwnedError(
                f"{self._kind} {self.name!r} (fence {lease.fence}) was no longer held at "
                f"release: {lease.lost_reason}; nothing was deleted"
            )

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

    def _forget(self, key: _Owner, lease: Lease) -> None:
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
        self._metrics.lock_held(self.metrics_name, _monotonic() - lease.acquired_at)

    # -- extend -------------------------------------------------------------------------

    def extend(self, ttl: Duration | None = None) -> None:
        """Set the caller's lease to ``ttl`` seconds from now (default: the lock's ttl).

        Replaces the TTL, never adds, so a retried extend cannot double it.

        :raises LockNotOwnedError: the lease is gone (it is not recreated).
        :raises LockError: Redis failed.
        """
        self._cache._driver.drive(self._extend_flow(ttl))

    async def aextend(self, ttl: Duration | None = None) -> None:
        """Async twin of :meth:`extend`."""
        await self._cache._adriver.drive(self._extend_flow(ttl))

    def _extend_flow(self, ttl: Duration | None) -> Flow[None]:
        lease = self._own("extend")
        seconds = self.ttl if ttl is None else lock_ttl(ttl)
        sent = _monotonic()
        try:
            reply = yield _Eval(
                self._extend_call(lease.token, seconds), confirm=self._confirm
            )
        except RCacheError as exc:
            raise LockError(
                f"could not extend {self._kind} {self.name!r}: {exc}"
            ) from exc
        confirm = self._confirm
        code = int(reply if confirm is None else reply[0])
        if code == Extended.EXTENDED:
            short = None if confirm is None else confirm.shortfall(reply[1])
            if short is not None and confirm is not None:
                # Extended on the primary only: a failover may bring back the old
                # expiry, so the lease's deadline does not move.
                what = f"the extend of {self._kind} {self.name!r}"
                raise LockError(
                    f"{_unreplicated(what, short, confirm)}; the lease's deadline is "
                    "unchanged (its renewal may still succeed)"
                )
            lease._renewed(sent, seconds)
            return
        get_renewer().remove(lease)
        lease._mark_lost(f"{_GONE[code]} before extend()")
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
        return self._cache._driver.drive(
            force_release_flow(self.name, *self._force_call())
        )

    async def aforce_release(self) -> ForceReleaseResult:
        """Async twin of :meth:`force_release`."""
        flow = force_release_flow(self.name, *self._force_call())
        return await self._cache._adriver.drive(flow)

    def _force_call(self) -> tuple[str, list[str], list[Any]]:
        """Kind, KEYS and ARGV of ``admin_force_release.lua`` for this lock."""
        raise ConfigurationError(f"cannot force-release a {type(self).__name__}")

    # -- context managers ---------------------------------------------------------------

    def __enter__(self) -> Self:
        self._cache._driver.drive(self._acquire_flow(_DEFAULT, True, required=True))
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

    async def __aenter__(self) -> Self:
        await self._cache._adriver.drive(
            self._acquire_flow(_DEFAULT, True, required=True)
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


class Lock(_LeasedLock):
    """An exclusive lease with a fencing token; use ``with``/``async with`` or the
    explicit ``acquire``/``release``/``extend`` (and their ``a`` twins).

    Made by :meth:`rcache.Cache.lock`; see its docstring for the options.
    """

    _kind = "lock"

    def _name_keys(self) -> None:
        self._key = self._exclusive_key = self._lock_keys.base
        self._fence_key = self._lock_keys.fence
        self._waiters = self._lock_keys.waiting
        self._grace = self._lock_keys.grace

    def _acquire_call(self, token: str, mode: str, cap: float) -> ScriptCall:
        # A waiter's marker outlives its longest block (the release must see it).
        return lock_acquire(
            self._key,
            self._fence_key,
            self._waiters,
            self._grace,
            token=token,
            ttl=self.ttl,
            mode=mode,
            marker=cap + 1,
        )

    def _release_call(self, token: str) -> ScriptCall:
        keys = (self._key, self._signal, self._waiters, self._grace)
        return lock_release(*keys, token=token)

    def _extend_call(self, token: str, ttl: float) -> ScriptCall:
        return lock_extend(self._key, token=token, ttl=ttl)

    def _wake_call(self, token: str) -> ScriptCall | None:
        return lock_wake(self._signal_key(token), self._key)

    def _force_call(self) -> tuple[str, list[str], list[Any]]:
        # both queues are woken: the object may be plain while the holders are fair
        lk = self._lock_keys
        keys = [self._key, self._fence_key, self._signal, lk.queue, lk.fair_signals]
        return "lock", keys, ["string", _SIGNAL_MS, "1", 1, "1"]


def _place_ttl(cap: float) -> float:
    """How long a waiter's place (a fair lock's queue entry, a waiting writer's intent)
    lasts: the waiter refreshes it on every try, at least every ``cap`` seconds, so it
    outlives a few late tries, and ends soon after a waiter that died."""
    return max(2.0, cap * 4)


class FairLock(Lock):
    """A :class:`Lock` granted in FIFO order (``cache.lock(name, fair=True)``).

    Waiters queue in a ZSET with server-side expiry (``RedissonFairLock``); a release
    wakes only the first waiter, through its own signal list, and nobody can barge
    past the queue (python-redis-lock #58/#71). Costs a little throughput: a free lock
    waits for the first waiter to take it.
    """

    _kind = "fair lock"

    def _name_keys(self) -> None:
        super()._name_keys()
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

    def _acquire_call(self, token: str, mode: str, cap: float) -> ScriptCall:
        return fair_acquire(
            self._key,
            self._fence_key,
            self._queue,
            self._queue_ttl,
            self._tickets,
            token=token,
            ttl=self.ttl,
            place=_place_ttl(cap),
        )

    def _release_call(self, token: str) -> ScriptCall:
        keys = (self._key, self._queue, self._queue_ttl, self._signals)
        return fair_release(*keys, token=token, side=Side.READ)

    def _abandon_call(self, token: str) -> ScriptCall | None:
        keys = (self._key, self._queue, self._queue_ttl, self._signals)
        return fair_release(*keys, token=token, side=Side.ABANDON)


class Semaphore(_LeasedLock):
    """At most ``limit`` concurrent holders; each permit is a leased id in a ZSET
    (``RedissonPermitExpirableSemaphore``), so a crashed holder's permit comes back when
    its lease ends instead of leaking a counter."""

    _kind = "semaphore"

    def __init__(
        self,
        cache: _Home,
        name: str,
        limit: int,
        options: LockOptions | None = None,
        **given: Unpack[LockKwargs],
    ) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(
                f"semaphore limit must be an int >= 1, got {limit!r}"
            )
        self.limit = limit
        super().__init__(cache, name, options, **given)

    def _name_keys(self) -> None:
        self._key = self._lock_keys.permits
        self._fence_key = self._lock_keys.permits_fence
        self._signal = self._lock_keys.permits_signal

    def _acquire_call(self, token: str, mode: str, cap: float) -> ScriptCall:
        return sem_acquire(
            self._key, self._fence_key, token=token, ttl=self.ttl, limit=self.limit
        )

    def _release_call(self, token: str) -> ScriptCall:
        return sem_release(self._key, self._signal, token=token, limit=self.limit)

    def _extend_call(self, token: str, ttl: float) -> ScriptCall:
        return sem_extend(self._key, token=token, ttl=ttl)

    def _force_call(self) -> tuple[str, list[str], list[Any]]:
        keys = [self._key, self._fence_key, self._signal]
        return "semaphore", keys, ["zset", _SIGNAL_MS, "1", 1, "0"]


class _RWPart(_LeasedLock):
    def _name_keys(self) -> None:
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

    def _name_keys(self) -> None:
        super()._name_keys()
        self._signal = self._rsignal

    def _acquire_call(self, token: str, mode: str, cap: float) -> ScriptCall:
        return rw_read(
            self._readers,
            self._writer,
            self._intents,
            self._rsignal,
            token=token,
            ttl=self.ttl,
            waited=mode == Try.RETRY,
        )

    def _release_call(self, token: str) -> ScriptCall:
        return rw_release(self._keys5, token=token, side=Side.READ)

    def _extend_call(self, token: str, ttl: float) -> ScriptCall:
        return sem_extend(self._readers, token=token, ttl=ttl)

    def _force_call(self) -> tuple[str, list[str], list[Any]]:
        keys = [self._readers, self._fence_key, self._wsignal, self._rsignal]
        return "rwlock read", keys, ["zset", _SIGNAL_MS, "0", 2, "0"]


class WriteLock(_RWPart):
    """The exclusive (write) lease of an :class:`RWLock`, fenced; ``rwlock(n).write()``.

    A waiting writer records an expiring intent that keeps new readers out (writer
    preference: a stream of readers cannot starve it)."""

    _kind = "write lock"

    def _name_keys(self) -> None:
        super()._name_keys()
        self._signal = self._wsignal
        self._exclusive_key = self._writer

    def _acquire_call(self, token: str, mode: str, cap: float) -> ScriptCall:
        return rw_write(
            self._readers,
            self._writer,
            self._intents,
            self._fence_key,
            token=token,
            ttl=self.ttl,
            intent=_place_ttl(cap),
        )

    def _release_call(self, token: str) -> ScriptCall:
        return rw_release(self._keys5, token=token, side=Side.WRITE)

    def _abandon_call(self, token: str) -> ScriptCall | None:
        return rw_release(self._keys5, token=token, side=Side.ABANDON)

    def _extend_call(self, token: str, ttl: float) -> ScriptCall:
        return lock_extend(self._writer, token=token, ttl=ttl)

    def _force_call(self) -> tuple[str, list[str], list[Any]]:
        keys = [self._writer, self._fence_key, self._wsignal, self._rsignal]
        return "rwlock write", keys, ["string", _SIGNAL_MS, "1", 2, "0"]


class RWLock:
    """Many readers or one writer, writer-preferring, with per-holder leases.

    ``read()`` and ``write()`` return lock objects for ``with``/``async with`` (or
    explicit ``acquire``/``aacquire``...). A crashed reader frees its share when its own
    lease ends; a crashed writer when its lease ends.
    """

    def __init__(
        self,
        cache: _Home,
        name: str,
        options: LockOptions | None = None,
        **given: Unpack[LockKwargs],
    ) -> None:
        if options is None:
            options = LockOptions.parse(given)  # checked once for both sides
        elif given:
            raise TypeError("pass options= or keyword options, not both")
        self.name = _check_name(name)
        self._cache = cache
        self._options = options
        self._read = ReadLock(cache, name, options)
        self._write = WriteLock(cache, name, options)

    def __repr__(self) -> str:
        return f"<RWLock {self.name!r}>"

    def read(self) -> ReadLock:
        """The shared (read) side, usable from any number of threads/tasks at once."""
        return self._read

    def write(self) -> WriteLock:
        """The exclusive (write) side."""
        return self._write


# -- what Cache.lock/rwlock/semaphore/locked make ---------------------------------------


class LockedKwargs(TypedDict, total=False):
    """The options of ``Cache.locked`` (see :meth:`rcache.Cache.lock`)."""

    ttl: Duration
    timeout: float | Duration | None
    max_hold: Duration | None
    on_lost: _Callback | None
    metrics_name: str | None
    min_replicas: int
    replica_timeout: Duration


class LockKwargs(LockedKwargs, total=False):
    """The options of ``Cache.lock``, ``rwlock`` and ``semaphore``."""

    auto_renew: bool | None
    raise_on_not_owned: bool


_LOCKED_OPTIONS = frozenset(LockedKwargs.__annotations__)


def make_lock(home: _Home, name: str, options: Mapping[str, Any], fair: bool) -> Lock:
    """:meth:`rcache.Cache.lock`."""
    return (FairLock if fair else Lock)(home, name, LockOptions.parse(options))


def make_rwlock(home: _Home, name: str, options: Mapping[str, Any]) -> RWLock:
    """:meth:`rcache.Cache.rwlock`."""
    return RWLock(home, name, LockOptions.parse(options))


def make_semaphore(
    home: _Home, name: str, limit: int, options: Mapping[str, Any]
) -> Semaphore:
    """:meth:`rcache.Cache.semaphore`."""
    return Semaphore(home, name, limit, LockOptions.parse(options))


class LockedDecorator(Protocol):
    """What ``Cache.locked(...)`` returns: a decorator keeping the signature."""

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]], /
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> Callable[P, R]: ...


def make_locked(
    home: _Home, name: str, options: Mapping[str, Any], fair: bool
) -> LockedDecorator:
    """:meth:`rcache.Cache.locked`: the options are checked now (at decoration), and
    every call makes a lock from them without checking again."""
    _check_name(name, "lock name template")
    unknown = sorted(set(options) - _LOCKED_OPTIONS)
    if unknown:
        raise TypeError(f"locked() got unexpected keyword arguments: {unknown}")
    label = options.get("metrics_name") or name
    checked = replace(LockOptions.parse(options), metrics_name=label)
    cls = FairLock if fair else Lock

    def decorate(fn: Any) -> Any:
        if not callable(fn):
            raise ConfigurationError(
                f"@locked decorates a function, got {type(fn).__name__}"
            )
        keys = KeyBuilder(fn, prefix=home.prefix, key=name)
        static = "{" not in name and "}" not in name
        home.metrics.register_lock(label)

        def lock_for(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Lock:
            lock_name = name if static else name.format_map(keys.bind(args, kwargs))
            return cls(home, lock_name, checked)

        if inspect.iscoroutinefunction(fn):

            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                async with lock_for(args, kwargs):
                    return await fn(*args, **kwargs)

            return functools.update_wrapper(async_wrapper, fn)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with lock_for(args, kwargs):
                return fn(*args, **kwargs)

        return functools.update_wrapper(wrapper, fn)

    return decorate
