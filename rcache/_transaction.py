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
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import tenacity

from rcache._config import Duration, parse_duration, ttl_ms
from rcache._exceptions import (
    BackendUnavailableError,
    ConfigurationError,
    RCacheError,
    TransactionConflictError,
)
from rcache._mixin import CacheBase
from rcache._redis import (
    REDIS_CONNECTION_ERRORS,
    REDIS_ERRORS,
    TRANSIENT,
    LuaScript,
    RedisError,
    WatchError,
    _text,
    map_error,
)
from rcache._serializers import UndecodableError, decode_envelope, encode_envelope

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    from redis.asyncio.client import Pipeline as AsyncPipeline
    from redis.client import Pipeline

    from rcache._redis import AsyncRedis, SyncRedis

__all__ = [
    "DEFAULT_MAX_TIME",
    "DEFAULT_RETRIES",
    "Script",
    "TransactionMixin",
    "TransactionStats",
    "check_one_slot",
    "hash_slot",
]

V = TypeVar("V")
T = TypeVar("T")
KeyT = str | bytes
ArgT = str | bytes | int | float

#: Retries after the first attempt (so at most ``DEFAULT_RETRIES + 1`` runs of ``fn``).
DEFAULT_RETRIES = 16
#: Upper bound, in seconds, on the time spent retrying one transaction.
DEFAULT_MAX_TIME = 5.0
# Backoff between conflicting attempts: uniform in [0, min(max, base * 2**(n-1))]. Full
# jitter spreads contenders apart (a fixed delay makes them collide again in lockstep);
# the first wait averages 0.25 ms, about two uncontended transactions on loopback, so
# light contention costs little while heavy contention stops wasting attempts
# (benchmarks/bench_transactions.py: 1.5-2x redis-py's immediate-retry loop).
_BACKOFF = 0.0005
_MAX_BACKOFF = 0.05

# Connection-level failures: whether an EXEC already sent was applied is unknown.
_LOST: tuple[type[BaseException], ...] = (*TRANSIENT, OSError)
# The same failures as redis-py reports them. Before EXEC only these count as "nothing
# was sent, retry": an OSError or TimeoutError raised by the caller's own function is
# the caller's exception and must propagate unchanged, not be retried.
_REDIS_LOST = REDIS_CONNECTION_ERRORS


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


def _is_cluster(client: object) -> bool:
    # redis.cluster.RedisCluster and redis.asyncio.cluster.RedisCluster both route with
    # a nodes_manager; duck-typed so that no cluster module is imported for plain Redis.
    return hasattr(client, "nodes_manager")


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


class _Conflict(Exception):
    """EXEC was refused: a watched key changed. Nothing was written."""


class _Unsent(Exception):
    """A connection error before EXEC was sent. Nothing was written."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(original)
        self.original = original


def _connection_lost(exc: WatchError) -> bool:
    """True if redis-py raised this WatchError for a dead connection, not a conflict.

    redis-py raises ``WatchError("A ConnectionError occurred while watching ...")``
    from inside its retry handler, so the connection error is the ``__context__``.
    """
    return isinstance(exc.__context__, _LOST)


class _Plan:
    """IO-free state of one transaction: budget, counting and the final error.

    The drivers run attempt 1 without tenacity (a tenacity loop costs ~14 us, several
    percent of an uncontended transaction); after a retryable failure they run
    :meth:`retrying`, whose first attempt re-raises that failure so that tenacity
    counts it and sleeps before attempt 2.
    """

    __slots__ = (
        "attempts",
        "done",
        "keys",
        "max_time",
        "retries",
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
    ) -> None:
        self.keys = keys
        self.retries = retries
        self.max_time = max_time
        self.transient_limit = transient_limit
        self.stats = stats
        self.attempts = 0
        self.transient = 0
        self.done = False
        if stats is not None:
            stats._add(calls=1)

    def started(self) -> None:
        self.attempts += 1

    def conflict(self) -> _Conflict:
        if self.stats is not None:
            self.stats._add(conflicts=1)
        return _Conflict()

    def unsent(self, exc: BaseException) -> _Unsent:
        self.transient += 1
        if self.stats is not None:
            self.stats._add(transient=1)
        return _Unsent(exc)

    def should_retry(self, exc: BaseException) -> bool:
        if isinstance(exc, _Conflict):
            return True
        if isinstance(exc, _Unsent):
            return self.transient < self.transient_limit
        return False

    def _strategies(self) -> dict[str, Any]:
        return {
            "stop": tenacity.stop_after_attempt(self.retries + 1)
            | tenacity.stop_after_delay(self.max_time),
            "wait": tenacity.wait_random_exponential(
                multiplier=_BACKOFF, max=_MAX_BACKOFF
            ),
            "retry": tenacity.retry_if_exception(self.should_retry),
            "reraise": True,
        }

    def retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(**self._strategies())

    def aretrying(self) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(**self._strategies())

    def can_retry_first(self, exc: BaseException) -> bool:
        return self.retries > 0 and self.should_retry(exc)

    def final_error(self, exc: _Conflict | _Unsent) -> RCacheError:
        """The error the caller sees once the budget is spent."""
        if isinstance(exc, _Conflict):
            keys = [
                k if isinstance(k, str) else k.decode(errors="replace")
                for k in self.keys
            ]
            return TransactionConflictError(keys, self.attempts)
        return map_error(exc.original)

    def finished(self, *, committed: bool) -> None:
        """Record the outcome once (the drivers call it on every exit path)."""
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


def _check_retries(retries: int) -> int:
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigurationError(
            f"retries= counts retries after the first attempt (an int >= 0), "
            f"got {retries!r}"
        )
    return retries


def _pipe_in_use(pipe: Any) -> bool:
    # A cluster pipeline (redis-py >= 6) keeps WATCH state in its execution strategy,
    # not in .watching/.connection: always reset it.
    if not hasattr(pipe, "watching"):
        return True
    return bool(pipe.watching or pipe.connection is not None)


def _reset_quietly(pipe: Pipeline) -> None:
    """UNWATCH and give the connection back; a dead connection is just dropped."""
    try:
        pipe.reset()
    except (RedisError, OSError):
        if not hasattr(pipe, "watching"):
            return  # a cluster pipeline's reset() drops its connection itself

        # redis-py's reset() only catches ConnectionError around UNWATCH; after a
        # timeout the connection is in an unknown state: drop it, keep the pool whole.
        conn, pipe.connection = pipe.connection, None
        pipe.watching = False
        pipe.explicit_transaction = False
        if conn is not None:
            conn.disconnect()  # type: ignore[no-untyped-call]
            pipe.connection_pool.release(conn)


async def _areset_quietly(pipe: AsyncPipeline) -> None:
    try:
        await pipe.reset()  # type: ignore[no-untyped-call]
    except (RedisError, OSError):
        if not hasattr(pipe, "watching"):
            return

        conn, pipe.connection = pipe.connection, None
        pipe.watching = False
        pipe.explicit_transaction = False
        if conn is not None:
            await conn.disconnect()
            await pipe.connection_pool.release(conn)


_AFTER_EXEC = (
    "the connection to Redis was lost after EXEC was sent, so the transaction may "
    "or may not have been applied; it is not retried because running it again could "
    "apply it twice: check the data before trying again"
)


# -- sync and async drivers ----------------------------------------------------------


def _attempt(
    plan: _Plan, pipe: Pipeline, keys: list[KeyT], body: Callable[[Pipeline], T]
) -> tuple[list[Any], T]:
    """One attempt: WATCH, the body, EXEC. Raises _Conflict/_Unsent to ask for a retry."""
    plan.started()
    # Before EXEC: a failure here wrote nothing, so a retry is safe.
    try:
        if keys:
            pipe.watch(*keys)  # type: ignore[no-untyped-call]
        value = body(pipe)
    except WatchError as exc:
        _reset_quietly(pipe)
        if _connection_lost(exc):
            raise plan.unsent(exc.__context__ or exc) from exc
        raise plan.conflict() from None  # the body ran EXEC itself
    except _REDIS_LOST as exc:
        _reset_quietly(pipe)
        raise plan.unsent(exc) from exc
    except REDIS_ERRORS as exc:
        _reset_quietly(pipe)
        raise map_error(exc) from exc
    except BaseException:
        _reset_quietly(pipe)  # the caller's own exception: abandon, propagate as is
        raise
    # EXEC sent: after a connection error the outcome is unknown, never retry.
    try:
        return pipe.execute(), value
    except WatchError as exc:
        if _connection_lost(exc):
            raise BackendUnavailableError(_AFTER_EXEC, exc.__context__) from exc
        raise plan.conflict() from None
    except _LOST as exc:
        raise BackendUnavailableError(_AFTER_EXEC, exc) from exc
    except REDIS_ERRORS as exc:
        raise map_error(exc) from exc


async def _aattempt(
    plan: _Plan,
    pipe: AsyncPipeline,
    keys: list[KeyT],
    body: Callable[[AsyncPipeline], Awaitable[T]],
) -> tuple[list[Any], T]:
    """Async twin of :func:`_attempt`."""
    plan.started()
    try:
        if keys:
            await pipe.watch(*keys)
        value = await body(pipe)
    except WatchError as exc:
        await _areset_quietly(pipe)
        if _connection_lost(exc):
            raise plan.unsent(exc.__context__ or exc) from exc
        raise plan.conflict() from None
    except _REDIS_LOST as exc:
        await _areset_quietly(pipe)
        raise plan.unsent(exc) from exc
    except REDIS_ERRORS as exc:
        await _areset_quietly(pipe)
        raise map_error(exc) from exc
    except BaseException:
        await _areset_quietly(pipe)
        raise
    try:
        return await pipe.execute(), value
    except WatchError as exc:
        if _connection_lost(exc):
            raise BackendUnavailableError(_AFTER_EXEC, exc.__context__) from exc
        raise plan.conflict() from None
    except _LOST as exc:
        raise BackendUnavailableError(_AFTER_EXEC, exc) from exc
    except REDIS_ERRORS as exc:
        raise map_error(exc) from exc


def _run(
    plan: _Plan, client: redis.Redis, keys: list[KeyT], body: Callable[[Pipeline], T]
) -> tuple[list[Any], T]:
    if len(keys) > 1 and _is_cluster(client):
        check_one_slot(keys)
    pipe = client.pipeline(transaction=True)
    try:
        try:
            out = _attempt(plan, pipe, keys, body)
        except (_Conflict, _Unsent) as exc:
            if not plan.can_retry_first(exc):
                raise plan.final_error(exc) from _cause(exc)
            first: BaseException | None = exc
            try:
                for attempt in plan.retrying():
                    with attempt:
                        if first is not None:
                            failed, first = first, None
                            raise failed  # let tenacity count attempt 1 and back off
                        out = _attempt(plan, pipe, keys, body)
            except (_Conflict, _Unsent) as last:
                raise plan.final_error(last) from _cause(last)
    except BaseException:
        plan.finished(committed=False)
        raise
    finally:
        if _pipe_in_use(pipe):
            _reset_quietly(pipe)
    plan.finished(committed=True)
    return out


async def _arun(
    plan: _Plan,
    client: redis.asyncio.Redis,
    keys: list[KeyT],
    body: Callable[[AsyncPipeline], Awaitable[T]],
) -> tuple[list[Any], T]:
    if _is_cluster(client):
        if len(keys) > 1:
            check_one_slot(keys)
        # redis-py 8.1's asyncio cluster transaction does not initialize the client
        # (slots, node connections) itself: WATCH as the client's first command fails
        # with "got Future attached to a different loop". initialize() is idempotent.
        try:
            await client.initialize()
        except REDIS_ERRORS as exc:
            raise map_error(exc) from exc
    pipe = client.pipeline(transaction=True)
    try:
        try:
            out = await _aattempt(plan, pipe, keys, body)
        except (_Conflict, _Unsent) as exc:
            if not plan.can_retry_first(exc):
                raise plan.final_error(exc) from _cause(exc)
            first: BaseException | None = exc
            try:
                async for attempt in plan.aretrying():
                    with attempt:
                        if first is not None:
                            failed, first = first, None
                            raise failed
                        out = await _aattempt(plan, pipe, keys, body)
            except (_Conflict, _Unsent) as last:
                raise plan.final_error(last) from _cause(last)
    except BaseException:
        plan.finished(committed=False)
        raise
    finally:
        if _pipe_in_use(pipe):
            await _areset_quietly(pipe)
    plan.finished(committed=True)
    return out


def _cause(exc: _Conflict | _Unsent) -> BaseException | None:
    return exc.original if isinstance(exc, _Unsent) else None


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

    __slots__ = ("_async", "_lua", "_sync", "idempotent")

    def __init__(
        self, sync: SyncRedis, async_: AsyncRedis, source: str, *, idempotent: bool
    ) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ConfigurationError("cache.script() takes the Lua source as a string")
        self._lua = LuaScript("user", source=source)
        self._sync = sync
        self._async = async_
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
        k, a = list(keys), list(args)
        return self._sync.run(lambda c: self._lua(c, k, a), retry=self.idempotent)

    async def arun(self, keys: Sequence[KeyT] = (), args: Sequence[ArgT] = ()) -> Any:
        """Async twin of :meth:`run`."""
        k, a = list(keys), list(args)
        return await self._async.run(
            lambda c: self._lua.acall(c, k, a), retry=self.idempotent
        )

    def load(self) -> str:
        """SCRIPT LOAD now (optional: the first run loads it anyway); the SHA1."""
        return _text(self._sync.run(lambda c: c.script_load(self.source)))

    async def aload(self) -> str:
        """Async twin of :meth:`load`."""
        return _text(await self._async.run(lambda c: c.script_load(self.source)))


# -- the mixin -----------------------------------------------------------------------


class TransactionMixin(CacheBase):
    """Adds ``transaction``, ``update`` and ``script`` (and a-twins) to ``Cache``."""

    if TYPE_CHECKING:
        _explicit_prefix: str
        _key: Callable[[str], str]

        def _ttl(self, ttl: Duration | None) -> float: ...

    # -- helpers shared by both drivers -------------------------------------------------

    def _tx_plan(
        self,
        watch: Sequence[KeyT],
        retries: int,
        max_time: Duration,
        stats: TransactionStats | None,
    ) -> tuple[_Plan, list[KeyT]]:
        user_keys = _check_watch(watch)
        plan = _Plan(
            user_keys,
            _check_retries(retries),
            max_time
            if type(max_time) is float and 0 < max_time < float("inf")
            else parse_duration(max_time, what="max_time"),
            self.retry.attempts,
            stats,
        )
        return plan, user_keys

    def _tx_keys(self, keys: list[KeyT], prefixed: bool) -> list[KeyT]:
        if not prefixed:
            return keys
        return [self._key(k if isinstance(k, str) else k.decode()) for k in keys]

    def _tx_decode(self, raw: bytes | None) -> Any:
        """The cached value in ``raw``, None for a missing or undecodable entry."""
        if raw is None:
            return None
        try:
            return decode_envelope(self.serializer, raw).value
        except UndecodableError:
            # Same rule as cache.get: a foreign or corrupt entry is a miss; counted so
            # that it is not silent.
            self.metrics.cache_error(self.name, "decode", "UndecodableError")
            return None

    # -- transaction --------------------------------------------------------------------

    def transaction(
        self,
        fn: Callable[[Pipeline], object],
        *,
        watch: Sequence[KeyT] = (),
        retries: int = DEFAULT_RETRIES,
        max_time: Duration = DEFAULT_MAX_TIME,
        prefixed: bool = False,
        stats: TransactionStats | None = None,
    ) -> list[Any]:
        """Run ``fn(pipe)`` as an optimistic transaction; return EXEC's replies.

        ``pipe`` is a redis-py pipeline already WATCHing ``watch``. ``fn`` reads, calls
        ``pipe.multi()``, then queues writes; rcache sends EXEC. If a watched key changed
        meanwhile, nothing is written and ``fn`` runs again after a jittered backoff.
        **``fn`` may run several times: no side effects outside the pipeline.**

        :param watch: keys to WATCH (your own Redis keys; see ``prefixed``).
        :param retries: runs after the first one before giving up.
        :param max_time: total time budget for the retries (seconds, ``"2s"``, ...).
        :param prefixed: watch ``f"{cache.prefix}:k:{key}"`` (the keys ``cache.get``
            uses) instead of the keys as given; ``fn`` must use those full names.
        :param stats: a :class:`TransactionStats` that counts attempts and conflicts.
        :raises TransactionConflictError: still conflicting after the budget.
        :raises BackendUnavailableError: Redis unreachable, or the connection was lost
            after EXEC was sent (then the transaction may have been applied; it is not
            retried because that could apply it twice).
        :raises BackendError: Redis answered an error (e.g. WRONGTYPE).
        :raises ConfigurationError: bad arguments; keys in several Cluster slots.

        Any exception raised by ``fn`` abandons the transaction (nothing written, no
        retry) and propagates unchanged.

        Example::

            def take_one(pipe):
                stock = int(pipe.get("stock:42") or 0)
                if stock <= 0:
                    raise OutOfStock()
                pipe.multi()
                pipe.set("stock:42", stock - 1)

            cache.transaction(take_one, watch=["stock:42"], retries=20)

        Use it for read-decide-write on a few keys under contention; for a cached value
        use :meth:`update`; for a write that needs no read, a single command or a
        :meth:`script` is cheaper.
        """
        plan, keys = self._tx_plan(watch, retries, max_time, stats)
        redis_keys = self._tx_keys(keys, prefixed)

        result, _ = _run(plan, self._sync.client, redis_keys, fn)
        return result

    async def atransaction(
        self,
        fn: Callable[[AsyncPipeline], Awaitable[object]],
        *,
        watch: Sequence[KeyT] = (),
        retries: int = DEFAULT_RETRIES,
        max_time: Duration = DEFAULT_MAX_TIME,
        prefixed: bool = False,
        stats: TransactionStats | None = None,
    ) -> list[Any]:
        """Async twin of :meth:`transaction`: ``fn`` is ``async def fn(pipe)`` over a
        ``redis.asyncio`` pipeline (``await pipe.get(...)``; ``pipe.multi()`` and the
        queued writes are not awaited)."""
        plan, keys = self._tx_plan(watch, retries, max_time, stats)
        redis_keys = self._tx_keys(keys, prefixed)

        async def body(pipe: AsyncPipeline) -> None:
            result = fn(pipe)
            if inspect.isawaitable(result):
                await result

        result, _ = await _arun(plan, self._async.client, redis_keys, body)
        return result

    # -- update -------------------------------------------------------------------------

    def update(
        self,
        key: str,
        fn: Callable[[Any], V],
        ttl: Duration | None = None,
        *,
        retries: int = DEFAULT_RETRIES,
        max_time: Duration = DEFAULT_MAX_TIME,
        stats: TransactionStats | None = None,
    ) -> V:
        """Atomically replace the cached value of ``key`` by ``fn(current)``; return it.

        ``key`` is the key of :meth:`get`/:meth:`set`; ``current`` is the decoded value,
        or ``None`` when there is none (or it cannot be decoded). The new value is
        stored for ``ttl`` (default: the cache's ttl) with the cache's serializer, under
        WATCH, so concurrent updates never lose each other's changes. ``fn`` may run
        several times: keep it a pure function of its argument.

        :raises TransactionConflictError: still conflicting after ``retries``.
        :raises SerializationError: the new value cannot be serialized (nothing
            written). Exceptions from ``fn`` propagate unchanged (nothing written).

        Example::

            cache.update("cart:7", lambda cart: {**(cart or {}), "qty": 3}, ttl=600)

        Transactions fail closed: unlike ``get``/``set``, a Redis outage raises
        BackendUnavailableError instead of being bypassed.
        """
        seconds = self._ttl(ttl)
        rkey = self._key(key)
        plan, _ = self._tx_plan([key], retries, max_time, stats)

        def body(pipe: Pipeline) -> V:
            current = self._tx_decode(cast("bytes | None", pipe.get(rkey)))
            new = fn(current)
            data = encode_envelope(self.serializer, new, fresh_for=seconds)
            pipe.multi()
            pipe.set(rkey, data, px=ttl_ms(seconds))
            return new

        _, value = _run(plan, self._sync.client, [rkey], body)
        self.metrics.cache_put(self.name)
        return value

    async def aupdate(
        self,
        key: str,
        fn: Callable[[Any], V],
        ttl: Duration | None = None,
        *,
        retries: int = DEFAULT_RETRIES,
        max_time: Duration = DEFAULT_MAX_TIME,
        stats: TransactionStats | None = None,
    ) -> V:
        """Async twin of :meth:`update`. ``fn`` is a plain function (it only computes
        the new value; it may run several times)."""
        seconds = self._ttl(ttl)
        rkey = self._key(key)
        plan, _ = self._tx_plan([key], retries, max_time, stats)

        async def body(pipe: AsyncPipeline) -> V:
            current = self._tx_decode(cast("bytes | None", await pipe.get(rkey)))
            new = fn(current)
            data = encode_envelope(self.serializer, new, fresh_for=seconds)
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.set(rkey, data, px=ttl_ms(seconds))
            return new

        _, value = await _arun(plan, self._async.client, [rkey], body)
        self.metrics.cache_put(self.name)
        return value

    # -- scripts ------------------------------------------------------------------------

    def script(
        self, source: str, *, idempotent: bool = False, load: bool = False
    ) -> Script:
        """Register a Lua script; returns a :class:`Script` (``s.run(keys, args)``).

        Nothing is sent until the first run (or now with ``load=True``): define scripts
        once, at module level or at startup. Each run uses EVALSHA and reloads the source
        transparently after NOSCRIPT, e.g. after a Redis restart.

        :param idempotent: the script may safely run twice, so a connection error while
            it was being sent is retried; default False (raise BackendUnavailableError).
        :param load: SCRIPT LOAD now, to fail early if Redis is unreachable.

        Example::

            INCR_CAP = cache.script(
                "local v = redis.call('INCR', KEYS[1]) "
                "if v > tonumber(ARGV[1]) then redis.call('DECR', KEYS[1]) return -1 end "
                "return v"
            )
            INCR_CAP.run(keys=["quota:7"], args=[100])
        """
        s = Script(self._sync, self._async, source, idempotent=idempotent)
        if load:
            s.load()
        return s

    async def ascript(
        self, source: str, *, idempotent: bool = False, load: bool = False
    ) -> Script:
        """Async twin of :meth:`script` (``load=True`` loads with the async client)."""
        s = Script(self._sync, self._async, source, idempotent=idempotent)
        if load:
            await s.aload()
        return s
