"""Transaction helpers: optimistic WATCH/MULTI/EXEC with retries, read-modify-write of
cached values, and user Lua scripts (issue 5).

``cache.transaction(fn, watch=[...])`` runs ``fn(pipe)`` on a redis-py pipeline that is
already WATCHing the keys; ``fn`` reads, calls ``pipe.multi()`` and queues its writes,
and rcache sends EXEC. When a watched key changed in between, Redis refuses the EXEC
(nothing is written) and the whole function runs again after a jittered exponential
backoff, bounded by a count and a total time; then
:class:`~rcache.TransactionConflictError`. **The function may therefore run several
times**: it must have no side effects outside the pipeline (no emails, no appends to a
list you keep), and it should only read before ``pipe.multi()`` (in WATCH mode redis-py
runs commands at once, so a write issued before ``multi()`` is not part of the
transaction).

Which failures are retried, and why:

* WATCH conflict (EXEC answered nil): nothing was written, retried.
* A connection error *before EXEC was sent* (WATCH, the function's reads): nothing
  was written, retried within the cache's :class:`~rcache.RetryPolicy` budget.
* A connection error *after EXEC was sent*: Redis may have committed the transaction
  and only the reply was lost, so running it again could apply it twice (a stock
  decremented twice). rcache raises :class:`~rcache.BackendUnavailableError` and never
  retries. redis-py itself turns a lost connection while WATCHing into a ``WatchError``
  (``Pipeline._disconnect_raise_on_watching``), which ``Redis.transaction`` then
  retries as if it were a conflict; rcache tells the two apart by the connection error
  that the ``WatchError`` was raised from.
* An exception raised by the function: the transaction is abandoned (UNWATCH, nothing
  written, no retry) and the exception propagates unchanged. Redis errors are mapped to
  :class:`~rcache.BackendError`; no redis-py exception escapes.

Keys are the caller's own Redis keys (no hidden prefix). ``prefixed=True`` maps each
watched key ``k`` to ``f"{cache.prefix}:k:{k}"``, the key ``cache.get(k)`` reads; the
function must then use those full names. On Redis Cluster every key of one transaction
must hash to one slot (use a hash tag: ``{cart:7}:items``, ``{cart:7}:total``); when
the client is a cluster client, :func:`check_one_slot` says so before anything is sent.

How it is built: the attempt loop (WATCH, the function, EXEC, backoff and retry) is one
generator flow, :func:`attempts`, that yields commands and receives their replies; the
sync and async drivers of ``_flow.py`` run it (``cache._driver.drive(...)``,
``await cache._adriver.drive(...)``). What a redis-py failure means at each step is
decided in ``_redis.py`` (:class:`~rcache._redis.TxPipeline`), the only module that
knows redis-py's pipelines; the budget, counting and backoff are :class:`_Plan`'s.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from rcache._config import Duration, TxOptions, ttl_ms
from rcache._exceptions import (
    ConfigurationError,
    RCacheError,
    TransactionConflictError,
)
from rcache._flow import Command, Eval, Flow, Run, Sleep
from rcache._redis import (
    LuaScript,
    TxConflict,
    TxPipeline,
    TxUnsent,
    _text,
    map_error,
)
from rcache._serializers import UndecodableError, decode_envelope, encode_envelope

if TYPE_CHECKING:
    from rcache._config import RetryPolicy
    from rcache._flow import AsyncDriver, SyncDriver
    from rcache._metrics import MetricsSink
    from rcache._serializers import Serializer

__all__ = [
    "Script",
    "TransactionStats",
    "attempts",
    "check_one_slot",
    "hash_slot",
    "transaction_flow",
    "update_flow",
]

V = TypeVar("V")
T = TypeVar("T")
KeyT = str | bytes
ArgT = str | bytes | int | float
#: What an attempt queues after its reads (``pipe.multi()`` and the writes), or None
#: when the caller's function queued them itself.
Queue = Callable[[Any], object] | None

# Backoff between conflicting attempts: uniform in [0, min(max, base * 2**(n-1))]. Full
# jitter spreads contenders apart (a fixed delay makes them collide again in lockstep);
# the first wait averages 0.25 ms, about two uncontended transactions on loopback, so
# light contention costs little while heavy contention stops wasting attempts
# (benchmarks/bench_transactions.py compares it with redis-py's immediate retry).
_BACKOFF = 0.0005
_MAX_BACKOFF = 0.05
# 0.0005 * 2**7 already exceeds _MAX_BACKOFF; a bigger power only risks an overflow
_MAX_DOUBLINGS = 16


# -- pure core ----------------------------------------------------------------------


def _crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum Redis Cluster uses for key slots."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def hash_slot(key: KeyT) -> int:
    """The Redis Cluster hash slot (0..16383) of ``key``, honouring ``{hash tags}``."""
    data = key.encode() if isinstance(key, str) else bytes(key)
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:  # "{}" is not a tag: the whole key is hashed
            data = data[start + 1 : end]
    return _crc16(data) % 16384


def check_one_slot(keys: Sequence[KeyT]) -> None:
    """Raise ConfigurationError unless all ``keys`` hash to one Redis Cluster slot.

    A cluster runs a transaction on one node, so its keys must share a slot; Redis would
    answer CROSSSLOT only after the function had run.
    """
    slots = {hash_slot(k): k for k in keys}
    if len(slots) > 1:
        shown = ", ".join(f"{k!r} (slot {s})" for s, k in sorted(slots.items()))
        raise ConfigurationError(
            f"a transaction on Redis Cluster needs all keys in one hash slot, got {shown}: "
            "put the shared part of the names in a hash tag, e.g. "
            "'{cart:7}:items' and '{cart:7}:total'"
        )


@dataclass
class TransactionStats:
    """Counters for the transactions it is passed to (``stats=``); thread-safe.

    Pass one object to many calls to watch contention::

        stats = rcache.TransactionStats()
        cache.transaction(take_one, watch=["stock:42"], stats=stats)
        stats.conflicts / max(stats.calls, 1)   # conflicts per transaction

    :ivar calls: transactions started. :ivar commits: transactions committed.
    :ivar attempts: runs of the function. :ivar conflicts: EXECs refused because a
        watched key changed. :ivar transient_retries: attempts repeated after a
        connection error before EXEC. :ivar last_attempts: runs of the latest call.
    """

    calls: int = 0
    commits: int = 0
    attempts: int = 0
    conflicts: int = 0
    transient_retries: int = 0
    last_attempts: int = 0
    _lock: threading.Lock = field(
        default_factory=threading.Lock, repr=False, compare=False
    )

    def _add(
        self,
        *,
        calls: int = 0,
        commits: int = 0,
        conflicts: int = 0,
        transient: int = 0,
        attempts: int | None = None,
    ) -> None:
        with self._lock:
            self.calls += calls
            self.commits += commits
            self.conflicts += conflicts
            self.transient_retries += transient
            if attempts is not None:
                self.attempts += attempts
                self.last_attempts = attempts

    def __getstate__(self) -> dict[str, Any]:  # picklable: results of worker processes
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _Plan:
    """IO-free state of one transaction: budget, counting, backoff and the final error.

    ``clock`` and ``rand`` are injected so that the retry decisions are tested without
    waiting (``time.monotonic`` and ``random.uniform`` by default).
    """

    __slots__ = (
        "attempts",
        "clock",
        "done",
        "keys",
        "max_time",
        "rand",
        "retries",
        "since",
        "stats",
        "transient",
        "transient_limit",
    )

    def __init__(
        self,
        keys: list[KeyT],
        retries: int,
        max_time: float,
        transient_limit: int,
        stats: TransactionStats | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.keys = keys
        self.retries = retries
        self.max_time = max_time
        self.transient_limit = transient_limit
        self.stats = stats
        self.clock = clock
        self.rand = rand
        self.attempts = 0
        self.transient = 0
        self.since: float | None = None
        self.done = False
        if stats is not None:
            stats._add(calls=1)

    def started(self) -> None:
        self.attempts += 1

    def conflict(self) -> TxConflict:
        if self.stats is not None:
            self.stats._add(conflicts=1)
        return TxConflict()

    def unsent(self, exc: BaseException) -> TxUnsent:
        self.transient += 1
        if self.stats is not None:
            self.stats._add(transient=1)
        return TxUnsent(exc)

    def should_retry(self, exc: BaseException) -> bool:
        """Whether this kind of failure may be retried (budgets aside)."""
        if isinstance(exc, TxConflict):
            return True
        if isinstance(exc, TxUnsent):
            return self.transient < self.transient_limit
        return False

    def delay(self, failure: TxConflict | TxUnsent) -> float | None:
        """Seconds to back off before the next attempt; None when the attempt that
        just failed was the last one (count or time budget spent, or not retryable)."""
        if self.attempts > self.retries or not self.should_retry(failure):
            return None
        now = self.clock()
        # The time budget counts from the first failure: a slow first run still gets
        # its retries.
        if self.since is None:
            self.since = now
        elif now - self.since >= self.max_time:
            return None
        doublings = min(self.attempts - 1, _MAX_DOUBLINGS)
        return self.rand(0.0, min(_MAX_BACKOFF, _BACKOFF * 2**doublings))

    def final_error(self, exc: TxConflict | TxUnsent) -> RCacheError:
        """The error the caller sees once the budget is spent."""
        if isinstance(exc, TxConflict):
            keys = [
                k if isinstance(k, str) else k.decode(errors="replace")
                for k in self.keys
            ]
            return TransactionConflictError(keys, self.attempts)
        return map_error(exc.original)

    def finished(self, *, committed: bool) -> None:
        """Record the outcome once (the flow calls it on every exit path)."""
        if self.done:
            return
        self.done = True
        if self.stats is not None:
            self.stats._add(commits=int(committed), attempts=self.attempts)


def _check_watch(watch: Sequence[KeyT]) -> list[KeyT]:
    if isinstance(watch, (str, bytes)):
        raise ConfigurationError(
            f"watch= takes a list of keys, got the string {watch!r}: "
            f"write watch=[{watch!r}]"
        )
    keys = list(watch)
    for k in keys:
        if not isinstance(k, (str, bytes)) or not k:
            raise ConfigurationError(f"watched keys are non-empty strings, got {k!r}")
    return keys


def _cause(exc: TxConflict | TxUnsent) -> BaseException | None:
    return exc.original if isinstance(exc, TxUnsent) else None


# -- commands: the steps of an attempt, run by TxPipeline in _redis.py ---------------
# None carries a guard: transactions fail closed (their errors always raise).


@dataclass(frozen=True, slots=True)
class _Open(Command):
    """The transaction's pipeline on the main client (sends nothing)."""

    def run(self, driver: SyncDriver) -> TxPipeline:
        return TxPipeline(driver.redis.client)

    async def arun(self, driver: AsyncDriver) -> TxPipeline:
        return TxPipeline(driver.redis.client)


@dataclass(frozen=True, slots=True)
class _Step(Command):
    """``op(pipe)`` before EXEC: WATCH, the caller's function, a read."""

    pipe: TxPipeline
    op: Callable[[Any], Any]

    def run(self, driver: SyncDriver) -> Any:
        return self.pipe.call(self.op)

    async def arun(self, driver: AsyncDriver) -> Any:
        return await self.pipe.acall(self.op)


@dataclass(frozen=True, slots=True)
class _Exec(Command):
    """Queue the writes (if the attempt left them to rcache), then EXEC."""

    pipe: TxPipeline
    queue: Queue = None

    def run(self, driver: SyncDriver) -> list[Any]:
        return self.pipe.execute(self.queue)

    async def arun(self, driver: AsyncDriver) -> list[Any]:
        return await self.pipe.aexecute(self.queue)


@dataclass(frozen=True, slots=True)
class _Release(Command):
    """UNWATCH and return the connection if the pipeline still holds them."""

    pipe: TxPipeline

    def run(self, driver: SyncDriver) -> None:
        self.pipe.release()

    async def arun(self, driver: AsyncDriver) -> None:
        await self.pipe.arelease()


# -- flows ---------------------------------------------------------------------------


def _watching(keys: list[KeyT]) -> Callable[[Any], Any]:
    return lambda pipe: pipe.watch(*keys)


def attempts(
    plan: _Plan,
    keys: list[KeyT],
    attempt: Callable[[TxPipeline], Flow[tuple[Queue, T]]],
) -> Flow[tuple[list[Any], T]]:
    """An optimistic transaction on ``keys``: EXEC's replies and the attempt's value.

    Each attempt WATCHes ``keys``, runs the sub-flow ``attempt(pipe)`` (the caller's
    reads; it returns what to queue, if anything, and its value), then EXEC. A conflict
    or a connection lost before EXEC backs off and tries again within ``plan``'s
    budget; any other error, the caller's own included, abandons the transaction
    (the pipeline is reset: UNWATCH, nothing written) and propagates.
    """
    pipe: TxPipeline = yield _Open()
    if pipe.cluster and len(keys) > 1:
        check_one_slot(keys)  # before anything is sent: Redis would refuse at EXEC
    watch = _watching(keys) if keys else None
    try:
        while True:
            plan.started()
            try:
                if watch is not None:
                    yield _Step(pipe, watch)
                queue, value = yield from attempt(pipe)
                replies: list[Any] = yield _Exec(pipe, queue)
            except TxConflict:
                failure: TxConflict | TxUnsent = plan.conflict()
            except TxUnsent as exc:
                failure = plan.unsent(exc.original)
            else:
                plan.finished(committed=True)
                break
            delay = plan.delay(failure)
            if delay is None:
                raise plan.final_error(failure) from _cause(failure)
            yield Sleep(delay)
    except GeneratorExit:  # closed without being driven on: no command can run now
        plan.finished(committed=False)
        raise
    except BaseException:
        plan.finished(committed=False)
        yield _Release(pipe)
        raise
    yield _Release(pipe)  # a cluster pipeline keeps state after EXEC
    return replies, value


class _Host(Protocol):
    """What the flows read of ``Cache`` (a Protocol: this module never imports it)."""

    @property
    def name(self) -> str: ...
    @property
    def serializer(self) -> Serializer: ...
    @property
    def metrics(self) -> MetricsSink: ...
    @property
    def retry(self) -> RetryPolicy: ...
    def _key(self, key: str) -> str: ...
    def _ttl(self, ttl: Duration | None) -> float: ...


def transaction_flow(
    cache: _Host,
    fn: Callable[[Any], object],
    watch: Sequence[KeyT],
    prefixed: bool,
    options: TxOptions,
    stats: TransactionStats | None,
) -> Flow[list[Any]]:
    """``cache.transaction(fn, ...)`` and ``atransaction``: ``fn(pipe)`` in a
    transaction WATCHing ``watch``; EXEC's replies. (``fn`` queues its own writes; an
    async ``fn`` is awaited by the async driver.)"""
    keys = _check_watch(watch)
    plan = _Plan(keys, options.retries, options.max_time, cache.retry.attempts, stats)
    if prefixed:
        keys = [cache._key(k if isinstance(k, str) else k.decode()) for k in keys]

    def attempt(pipe: TxPipeline) -> Flow[tuple[Queue, None]]:
        yield _Step(pipe, fn)
        return None, None

    replies, _ = yield from attempts(plan, keys, attempt)
    return replies


def update_flow(
    cache: _Host,
    key: str,
    fn: Callable[[Any], V],
    ttl: Duration | None,
    options: TxOptions,
    stats: TransactionStats | None,
) -> Flow[V]:
    """``cache.update`` and ``aupdate``: read the cached value of ``key``, store
    ``fn(value)`` for ``ttl`` under WATCH; the new value."""
    seconds = cache._ttl(ttl)
    rkey = cache._key(key)
    px = ttl_ms(seconds)
    plan = _Plan([key], options.retries, options.max_time, cache.retry.attempts, stats)

    def attempt(pipe: TxPipeline) -> Flow[tuple[Queue, V]]:
        current = _decoded(cache, (yield _Step(pipe, lambda p: p.get(rkey))))
        new = fn(current)  # the caller's: its exception abandons the transaction
        data = encode_envelope(cache.serializer, new, fresh_for=seconds)

        def queue(p: Any) -> None:
            p.multi()
            p.set(rkey, data, px=px)

        return queue, new

    _, value = yield from attempts(plan, [rkey], attempt)
    cache.metrics.cache_put(cache.name)
    return value


def _decoded(cache: _Host, raw: bytes | None) -> Any:
    """The cached value in ``raw``, None for a missing or undecodable entry."""
    if raw is None:
        return None
    try:
        return decode_envelope(cache.serializer, raw).value
    except UndecodableError:
        # Same rule as cache.get: a foreign or corrupt entry is a miss; counted so that
        # it is not silent.
        cache.metrics.cache_error(cache.name, "decode", "UndecodableError")
        return None


# -- scripts ---------------------------------------------------------------------------


class Script:
    """A Lua script registered with ``cache.script(source)``.

    Called with EVALSHA; when Redis answers NOSCRIPT (restarted, failed over, or
    ``SCRIPT FLUSH``) the source is loaded and the call made again, so the first call
    after a Redis restart still works. Keys are your own Redis keys (no prefix); replies
    are raw (``bytes`` for strings). Redis errors are mapped to rcache's exceptions.

    A connection error while the script was being sent leaves unknown whether it ran.
    A script registered with ``idempotent=True`` is then sent again (within the cache's
    RetryPolicy); otherwise BackendUnavailableError is raised, as for a transaction.
    """

    __slots__ = ("_adriver", "_driver", "_lua", "idempotent")

    def __init__(
        self, driver: SyncDriver, adriver: AsyncDriver, source: str, *, idempotent: bool
    ) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ConfigurationError("cache.script() takes the Lua source as a string")
        self._lua = LuaScript("user", source=source)
        self._driver = driver
        self._adriver = adriver
        self.idempotent = idempotent

    def __repr__(self) -> str:
        return f"<rcache.Script sha={self.sha[:12]}>"

    @property
    def sha(self) -> str:
        """SHA1 of the source, the name Redis knows the script by."""
        return self._lua.sha

    @property
    def source(self) -> str:
        """The Lua source the script was created with."""
        return self._lua.source

    def run(self, keys: Sequence[KeyT] = (), args: Sequence[ArgT] = ()) -> Any:
        """Run the script with ``KEYS`` = ``keys`` and ``ARGV`` = ``args``; its reply.

        :raises BackendError: a Lua error; BackendUnavailableError: Redis unreachable.
        """
        return self._driver.execute(self._eval(keys, args))

    async def arun(self, keys: Sequence[KeyT] = (), args: Sequence[ArgT] = ()) -> Any:
        """Async twin of :meth:`run`."""
        return await self._adriver.execute(self._eval(keys, args))

    def load(self) -> str:
        """SCRIPT LOAD now (optional: the first run loads it anyway); the SHA1."""
        return _text(self._driver.execute(self._load()))

    async def aload(self) -> str:
        """Async twin of :meth:`load`."""
        return _text(await self._adriver.execute(self._load()))

    def _eval(self, keys: Sequence[KeyT], args: Sequence[ArgT]) -> Eval:
        # no guard: a user's script fails closed, as a transaction does
        return Eval(self._lua, list(keys), list(args), retry=self.idempotent)

    def _load(self) -> Run:
        source = self.source
        return Run(lambda c: c.script_load(source))
