"""The read-through of ``@cache.cached`` and ``@cache.cached_batch``, written once.

Every decision of a cached call lives here, as flows (generators of commands, see
``_flow.py``) that the sync and async wrappers in ``_decorated.py`` and ``_batch.py``
run with their Cache's driver. A call, in round trips:

* **hit**: one ``MGET`` of the value and its version stamps (function + tags); stampede
  protection costs nothing here. Freshness is judged by Redis's clock (read with the
  value every few seconds by ``cache_read.lua``, extrapolated monotonically in between:
  :class:`ServerClock`), never the host's.
* **miss**: the first caller across processes takes a lease (``cache_claim.lua``),
  computes and stores (``cache_store.lua``: rejected if a stamp changed meanwhile; the
  lease is given up and waiters are woken on every path). The others block on
  ``BLMOVE`` of a signal list, each wait capped at the lease's remaining PTTL, and
  re-read: no polling. A wait that gets no reply from Redis within its budget (Redis
  hung) computes without the cache.
* **early** (XFetch): a fresh hit close to its expiry recomputes now if it wins the
  lease; **stale**: the old value at once and one refresh in the background;
  **stale_if_error**: the old value if recomputation raises.

What differs between the modes is not here: sharing one computation between the
threads or tasks of a process (single flight), how a background refresh is run (a
bounded thread pool or an asyncio task) and how a lease is kept alive while computing
are the wrappers' (:class:`Hooks`). A wrapper answers a warm fresh hit without starting
a flow: it sends the flow's first command itself (:meth:`ReadThrough.reading`) and
hands what it read (:meth:`ReadThrough.seen`) to :func:`read_through` otherwise.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple, Protocol

from rcache._cache_protocol import (
    CACHE_CLAIM,
    CACHE_READ,
    CACHE_STORE,
    CACHE_STORE_MANY,
    Claim,
    Store,
    Stored,
)
from rcache._config import ttl_ms
from rcache._exceptions import (
    ConfigurationError,
    LockNotAcquiredError,
    SerializationError,
)
from rcache._flow import (
    AsyncDriver,
    Block,
    Command,
    Compute,
    Critical,
    Flow,
    Run,
    SyncDriver,
)
from rcache._freshness import (
    EARLY,
    EXPIRED,
    FRESH,
    FUTURE_SLACK,
    STALE,
    Freshness,
    stamp_blob,
)
from rcache._keys import KeySpace
from rcache._logging import RateLimitedLog
from rcache._metrics import MetricsSink
from rcache._policy import BYPASS, Failures, Guard
from rcache._serializers import (
    Envelope,
    Serializer,
    UndecodableError,
    decode_envelope,
    encode_envelope,
)
from rcache._typed import LazyTyped, TypedValues

__all__ = [
    "Batch",
    "Call",
    "Flight",
    "Hooks",
    "Host",
    "ReadThrough",
    "ServerClock",
    "batch",
    "compute",
    "decode",
    "delete",
    "load",
    "read_through",
    "refresh",
    "undecodable",
]

#: how long Redis's clock is extrapolated with time.monotonic() before it is read again
#: (monotonic clocks drift by ppm and stop while a VM is suspended)
CLOCK_RESYNC = 10.0


class ServerClock:
    """Redis's clock, as last read (TIME, in a script's reply) and extrapolated by the
    monotonic clock, which no NTP step or skewed host changes. Freshness is decided by
    this clock alone, so readers and writers whose wall clocks disagree agree on what
    is fresh (issue 14 item 6)."""

    __slots__ = ("_mono", "_seen")

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._mono = monotonic
        #: (Redis's clock minus monotonic, monotonic when read), None until read
        self._seen: tuple[float, float] | None = None

    def monotonic(self) -> float:
        return self._mono()

    def saw(self, now_us: Any) -> float:
        """Record Redis's clock (TIME in microseconds); return it in seconds."""
        now = int(now_us) / 1e6
        mono = self._mono()
        self._seen = (now - mono, mono)
        return now

    def now(self) -> float:
        """Redis's clock in seconds; the wall clock until Redis has answered once."""
        seen = self._seen
        return time.time() if seen is None else self._mono() + seen[0]

    def offset(self) -> float | None:
        """Redis's clock minus monotonic while it was read recently enough to be
        extrapolated; None: read TIME again (one call on the hit path)."""
        seen = self._seen
        if seen is not None and self._mono() - seen[1] < CLOCK_RESYNC:
            return seen[0]
        return None


class Mget(Command):
    """``MGET keys`` on the main client: the read of every hit. A plain slots class,
    not a frozen dataclass: it is made once per call (0.2 against 0.7 us here)."""

    __slots__ = ("guard", "keys")

    def __init__(self, keys: list[str], guard: Guard) -> None:
        self.keys = keys
        self.guard = guard

    def __repr__(self) -> str:
        return f"Mget({self.keys!r})"

    def run(self, driver: SyncDriver) -> Any:
        return driver.redis.mget(self.keys)

    async def arun(self, driver: AsyncDriver) -> Any:
        return await driver.redis.mget(self.keys)


class Host(Protocol):
    """What a read-through reads of its Cache (a :class:`~rcache.Cache` is one). Read at
    use, so that ``Cache.configure()`` and a replaced ``cache.metrics`` are followed."""

    metrics: MetricsSink
    serializer: Serializer
    keyspace: KeySpace
    _clock: ServerClock
    _failures: Failures
    _log: RateLimitedLog

    def _local_written(self, keys: Sequence[str]) -> None:
        """This process wrote ``keys``: drop its local copies now (the local tier)."""


class Call(NamedTuple):
    """One call of a cached function: its entry's key, the stamp keys it depends on
    (function, tags) and the arguments to compute it with."""

    key: str
    stamp_keys: list[str]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class Flight:
    """One computation that the concurrent callers of a key in this process share
    (single flight; the wrappers make and join them, the flows read two fields)."""

    __slots__ = (
        "detached",
        "error",
        "event",
        "followers",
        "future",
        "result",
        "stamp_keys",
        "value",
    )

    def __init__(self, stamp_keys: list[str]) -> None:
        self.stamp_keys = stamp_keys
        # set by an invalidation: new callers no longer join, the result is not stored
        self.detached = False
        self.event: Any = None  # threading.Event, made when a follower arrives
        self.future: Any = None  # asyncio.Future
        self.followers = 0  # callers waiting on this flight (observability, tests)
        self.value: Any = None
        self.error: BaseException | None = None
        #: how the leader's call was counted ("hit", "miss", ...), None until it is
        self.result: str | None = None


class Hooks(Protocol):
    """What a flow asks of its mode (given by the wrappers in ``_decorated.py``)."""

    def hold(self, lease_key: str, token: str, ttl: float, held: bool) -> Any:
        """Keep the computation lease alive while computing (``held`` False: a handle
        that renews nothing); returns what :meth:`drop` takes."""

    def drop(self, lease: Any) -> None:
        """Stop renewing the lease (the computation ended)."""

    def refresh_later(self, call: Call) -> None:
        """Run :func:`refresh` for ``call`` in the background, once per key at a time."""


def undecodable(
    metrics: MetricsSink, limited: RateLimitedLog, name: str, exc: UndecodableError
) -> None:
    """Count and log an entry that could not be decoded (it is treated as a miss)."""
    metrics.cache_error(name, "decode", "UndecodableError")
    # The error type and the function's name only: an exception's text can quote the
    # stored value (a corrupt entry logged "Invalid isoformat string: '<the value>'",
    # issue 14 item 13), and values never reach the logs.
    limited.warning(
        "decode:" + name,
        "rcache: an entry of %s could not be decoded (%s) and is treated as a miss",
        name,
        exc.reason,
    )


def decode(
    host: Host, name: str, raw: bytes, serializer: Serializer
) -> Envelope | None:
    """The envelope in ``raw``, or None (counted and logged) if it cannot be decoded."""
    try:
        return decode_envelope(serializer, raw)
    except UndecodableError as exc:
        undecodable(host.metrics, host._log, name, exc)
        return None


class _Loading:
    """Times a computation and counts it in ``cache_load`` (success or failure)."""

    __slots__ = ("elapsed", "name", "rt", "start")

    def __init__(self, rt: ReadThrough) -> None:
        self.rt = rt
        self.elapsed = 0.0

    def __enter__(self) -> _Loading:
        self.start = time.perf_counter()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.elapsed = self.rt.loaded(
            self.start, "success" if kind is None else "failure"
        )


@dataclass(frozen=True, slots=True, eq=False)
class _Reader:
    """What reading entries and claiming stamps take: the Cache, the function's name
    (its metric label) and its guards."""

    host: Host
    name: str
    fn: Callable[..., Any]
    get: Guard  #: reads, claims and waits (metric operation "get")
    put: Guard  #: stores ("set")

    def reading_keys(self, keys: list[str]) -> tuple[Command, float | None]:
        """The command that reads ``keys``, and the clock offset to give :meth:`rows`
        with its reply: a plain MGET while Redis's clock is known, else
        ``cache_read``, which adds Redis TIME to the same round trip."""
        offset = self.host._clock.offset()
        if offset is not None:
            return Mget(keys, self.get), offset
        return CACHE_READ.command(keys, (), self.get), None

    def rows(
        self, reply: Any, offset: float | None
    ) -> tuple[float, list[bytes | None]]:
        """(Redis's time in s, the rows) of a reply to :meth:`reading_keys`."""
        clock = self.host._clock
        if offset is None:
            read = CACHE_READ.parse(reply)
            return clock.saw(read.now_us), read.rows
        return clock.monotonic() + offset, reply

    def claimed(self, reply: Any) -> Claim:
        """Parse a claim's reply: note Redis's clock, and say so if a key of ours held
        another type (it was replaced: issue 14 item 11)."""
        got = CACHE_CLAIM.parse(reply)
        self.host._clock.saw(got.now_us)
        if got.repaired:
            self.host.metrics.cache_error(self.name, "claim", "WrongType")
            self.host._log.warning(
                "wrongtype:" + self.name,
                "rcache: a lease, signal or stamp key of %s held a value of another "
                "type; it was replaced",
                self.name,
            )
        return got


@dataclass(frozen=True, slots=True, eq=False)
class ReadThrough(_Reader):
    """One cached function's settings and decisions, as the flows use them (pure but
    for counting and logging). Made again when its Cache is configured."""

    freshness: Freshness
    stampede: bool = True
    cache_none: bool = True
    unless: Callable[[Any], bool] | None = None
    on_unserializable: Literal["raise", "skip"] = "raise"
    #: decodes values as the return annotation says (rcache._typed), None if untyped
    typed: TypedValues | LazyTyped | None = None

    # -- reading ---------------------------------------------------------------------

    def serializer(self) -> Serializer:
        base = self.host.serializer
        return base if self.typed is None else self.typed.serializer(base)

    def reading(self, call: Call) -> tuple[Command, float | None]:
        """The command that reads the entry and its stamps (the first of every call),
        and what to give :meth:`seen` with its reply."""
        return self.reading_keys([call.key, *call.stamp_keys])

    def seen(self, reply: Any, offset: float | None) -> Any:
        """What :meth:`reading`'s reply says: (entry or None, freshness state), or
        BYPASS."""
        if reply is BYPASS:
            return BYPASS
        now, rows = self.rows(reply, offset)
        return self.judge(rows, now)

    def hit(self, rows: Any, now: float, flight: Flight | None) -> tuple[bool, Any]:
        """Judge an MGET's reply (or BYPASS) read at ``now``: (True, the value) for a
        fresh entry, the call counted as a hit; else (False, what :func:`read_through`
        goes on with). The warm hit of the wrappers, without a flow."""
        if rows is BYPASS:
            return False, BYPASS
        env = self.entry(rows)
        state = self.freshness.classify(env, now)
        if state is FRESH:
            self.host.metrics.cache_get(self.name, "hit")
            if flight is not None:
                flight.result = "hit"
            return True, env.value  # type: ignore[union-attr]
        return False, (env, state)

    def judge(self, rows: Sequence[bytes | None], now: float) -> tuple[Any, str]:
        """(the entry in ``rows`` or None, its freshness state at ``now``)."""
        env = self.entry(rows)
        return env, self.freshness.classify(env, now)

    def entry(self, rows: Sequence[bytes | None]) -> Envelope | None:
        """The envelope in ``rows`` (value, stamps...) if it is valid under the stamps."""
        raw = rows[0]
        if raw is None:
            return None
        typed = self.typed
        serializer = self.host.serializer
        try:
            env = decode_envelope(
                serializer if typed is None else typed.serializer(serializer), raw
            )
        except UndecodableError as exc:
            undecodable(self.host.metrics, self.host._log, self.name, exc)
            return None
        if len(rows) == 2:  # the function's stamp alone: stamp_blob([s]) is s
            stamp = rows[1]
            if stamp is None:  # invalidated: the stamp was deleted
                return None
            if len(stamp) <= 255:
                return env if env.stamp == stamp else None
        stamps = rows[1:]
        if None in stamps:  # invalidated: a stamp was deleted
            return None
        if env.stamp != stamp_blob(stamps):  # type: ignore[arg-type]
            return None  # computed under old stamps
        return env

    # -- claiming and storing ----------------------------------------------------------

    def claim(self, call: Call, token: str, take_lease: bool = True) -> Command:
        """``cache_claim``: take the lease (or, ``take_lease`` False, only read the
        stamps, creating missing ones)."""
        fr = self.freshness
        ks = self.host.keyspace
        keys = CACHE_CLAIM.keys(ks.lease(call.key), ks.ready(call.key), call.stamp_keys)
        args = CACHE_CLAIM.args(
            token,
            fr.lease_ttl if take_lease else None,
            fr.redis_ttl_ms,
            [secrets.token_hex(8) for _ in call.stamp_keys],
        )
        return CACHE_CLAIM.command(keys, args, self.get)

    def store(
        self, call: Call, token: str, data: bytes, stamps: Sequence[bytes]
    ) -> Command:
        """``cache_store`` of ``data`` (b"": only give up the lease), a must-finish
        step: a cancellation must not leave the lease for the next caller to wait out."""
        fr = self.freshness
        key, ks = call.key, self.host.keyspace
        keys = CACHE_STORE.keys(key, ks.lease(key), ks.ready(key), call.stamp_keys)

        def args(data: bytes) -> list[Any]:
            return CACHE_STORE.args(token, data, fr.redis_ttl_ms, fr.lease_ttl, stamps)

        write = CACHE_STORE.command(keys, args(data), None)
        release = CACHE_STORE.command(keys, args(b""), None) if data else None
        return Critical(Store(write, release, self.put))

    def stored(self, reply: Any) -> None:
        if reply is BYPASS:
            return
        result = CACHE_STORE.parse(reply)
        if result is Stored.STORED:
            self.host.metrics.cache_put(self.name)
        elif result is Stored.REJECTED:
            self.host.metrics.cache_error(self.name, "set", "InvalidatedDuringLoad")

    def encode(
        self, value: Any, compute_time: float, stamps: Sequence[bytes]
    ) -> bytes | None:
        """Envelope bytes to store, or None when this result is not to be cached."""
        if value is None and not self.cache_none:
            return None
        if self.unless is not None and self.unless(value):
            return None
        serializer = self.serializer()
        try:
            return encode_envelope(
                serializer,
                value,
                compute_time=compute_time,
                fresh_for=self.freshness.ttl,
                stamp=stamp_blob(stamps),
                now=self.host._clock.now(),  # Redis's clock, not ours (item 6)
            )
        except SerializationError as exc:
            if self.on_unserializable == "skip":
                self.host.metrics.cache_error(
                    self.name, "serialize", "SerializationError"
                )
                return None
            raise SerializationError(
                f"{self.name} returned a {type(value).__qualname__} that the "
                f"{serializer.name} serializer cannot store ({exc}); return "
                "plain data, choose another serializer, or pass on_unserializable='skip'"
            ) from None

    # -- counting (every call ends in exactly one count or one shared) ------------------

    def count(self, result: str, flight: Flight | None = None) -> None:
        """Count this call in ``cache_gets``; a single-flight leader also records its
        result for the callers that share it."""
        self.host.metrics.cache_get(self.name, result)
        if flight is not None:
            flight.result = result

    def shared(self, leader: str | None) -> None:
        """Count a caller that got the value of a concurrent caller in this process.

        Sharing a hit (or a stale value) is still a hit (or stale): the value came from
        Redis. Sharing a computation is "coalesced": the call neither found the value
        nor ran the function.
        """
        result = leader if leader in ("hit", "stale") else "coalesced"
        self.host.metrics.cache_get(self.name, result)

    def skipped(self) -> None:
        """A call made while the breaker is open, under ``on_backend_error="raise"``:
        counted, then BackendUnavailableError. (Under "bypass" the wrappers count the
        call with ``cache_bypassed`` when the function returns.)"""
        self.host._failures.skipped(self.get)

    def detached(self, flight: Flight | None) -> bool:
        """Was this computation detached by an invalidation (then it must not store)?
        Counted as cache_store.lua counts a write that an invalidation raced."""
        if flight is None or not flight.detached:
            return False
        self.host.metrics.cache_error(self.name, "set", "InvalidatedDuringLoad")
        return True

    def wait_timed_out(self, flight: Flight | None = None) -> None:
        """After a wait for another caller's computation timed out: raise under
        ``on_wait_timeout="raise"`` (the call is counted as a miss), else return and
        let the caller compute (and count itself)."""
        if self.freshness.on_wait_timeout == "raise":
            self.count("miss", flight)
            raise LockNotAcquiredError(
                f"{self.name}: another process is computing this entry and it did not "
                f"arrive within wait={self.freshness.wait:g}s"
            )

    def loading(self) -> _Loading:
        """``with rt.loading(): value = fn(...)`` times and counts a computation."""
        return _Loading(self)

    def loaded(self, start: float, result: str) -> float:
        """Count a computation that began at ``start`` (perf_counter) and ended now
        (``result`` "success" or "failure"); returns how long it took."""
        elapsed = time.perf_counter() - start
        self.host.metrics.cache_load(self.name, result, elapsed)
        return elapsed


# -- flows -------------------------------------------------------------------------------


def look(rt: ReadThrough, call: Call) -> Flow[Any]:
    """Read the entry: (entry or None, freshness state), or BYPASS."""
    command, offset = rt.reading(call)
    return rt.seen((yield command), offset)


def compute(rt: ReadThrough, call: Call) -> Flow[tuple[Any, float]]:
    """Run the function (counted in ``cache_load``): (value, seconds it took)."""
    with rt.loading() as timing:
        value = yield Compute(rt.fn, call.args, call.kwargs)
    return value, timing.elapsed


def _without_cache(
    rt: ReadThrough, call: Call, flight: Flight | None, count: bool = True
) -> Flow[Any]:
    if count:
        rt.count("miss", flight)
    return (yield from compute(rt, call))[0]


def read_through(
    rt: ReadThrough,
    call: Call,
    hooks: Hooks,
    flight: Flight | None = None,
    seen: Any = None,
) -> Flow[Any]:
    """A call of a cached function: read, then serve, refresh or compute.

    ``seen``: what the caller already read (:meth:`ReadThrough.seen`), if it did.
    """
    if seen is None:
        seen = yield from look(rt, call)
    if seen is BYPASS:
        return (yield from _without_cache(rt, call, flight))
    env, state = seen
    if state == FRESH:
        rt.count("hit", flight)
        return env.value
    if state == EARLY:
        rt.count("hit", flight)
        return (yield from _early(rt, call, hooks, env, flight))
    if state == STALE:
        rt.count("stale", flight)
        hooks.refresh_later(call)
        return env.value
    # counted by load or _distributed, once the outcome is known (computed, shared
    # with another process, or served stale because the computation failed)
    fallback = env if state == EXPIRED else None
    if not rt.stampede:
        return (yield from load(rt, call, hooks, None, fallback, True, flight))
    return (yield from _distributed(rt, call, hooks, fallback, flight))


def load(
    rt: ReadThrough,
    call: Call,
    hooks: Hooks,
    claim: tuple[str, Sequence[bytes]] | None = None,
    fallback: Envelope | None = None,
    count: bool = False,
    flight: Flight | None = None,
) -> Flow[Any]:
    """Compute and store; return the value. ``claim`` is (token, stamps) of a lease
    this call took (None: read the stamps without taking one, as ``refresh()`` does).

    ``count``: this call is not counted yet (a miss, or stale if the computation fails
    and ``fallback`` is served); early and background refreshes are counted already.
    """
    leased = claim is not None
    if claim is None:
        token = secrets.token_hex(8)
        got = yield rt.claim(call, token, take_lease=False)
        if got is BYPASS:
            return (yield from _without_cache(rt, call, flight, count))
        claim = (token, rt.claimed(got).stamps)
    token, stamps = claim
    lease_key = rt.host.keyspace.lease(call.key)
    lease = hooks.hold(lease_key, token, rt.freshness.lease_ttl, leased)
    try:
        value, elapsed = yield from compute(rt, call)
    except BaseException as exc:
        hooks.drop(lease)
        rt.stored((yield rt.store(call, token, b"", stamps)))  # give up the lease
        if isinstance(exc, Exception) and rt.freshness.usable_on_error(
            fallback, rt.host._clock.now()
        ):
            if count:
                rt.count("stale", flight)
            return fallback.value  # type: ignore[union-attr]
        if count:
            rt.count("miss", flight)
        raise
    hooks.drop(lease)
    if count:
        rt.count("miss", flight)
    data = None
    try:
        if not rt.detached(flight):  # invalidated meanwhile: answer, don't store
            data = rt.encode(value, elapsed, stamps)
    finally:
        # every path gives up the lease, an unserializable result too: otherwise the
        # next caller waits the whole lease (issue 14 item 8)
        try:
            rt.stored((yield rt.store(call, token, data or b"", stamps)))
        finally:
            if data:  # this process's own write: no local copy of the old value stays
                rt.host._local_written((call.key,))
    return value


def _distributed(
    rt: ReadThrough,
    call: Call,
    hooks: Hooks,
    fallback: Envelope | None,
    flight: Flight | None,
) -> Flow[Any]:
    """A miss with stampede protection: take the lease and compute, or wait for the
    holder's value (woken by its store), up to ``wait``."""
    clock = rt.host._clock
    token = secrets.token_hex(8)
    deadline = clock.monotonic() + rt.freshness.wait
    while True:
        got = yield rt.claim(call, token)
        if got is BYPASS:
            return (yield from _without_cache(rt, call, flight))
        claim = rt.claimed(got)
        if claim.claimed:
            return (
                yield from load(
                    rt, call, hooks, (token, claim.stamps), fallback, True, flight
                )
            )
        remaining = deadline - clock.monotonic()
        if remaining <= 0:
            rt.wait_timed_out(flight)  # raises under on_wait_timeout="raise"
            return (
                yield from load(
                    rt, call, hooks, (token, claim.stamps), fallback, True, flight
                )
            )
        budget = min(remaining, claim.lease_pttl / 1000.0 + 0.005)
        if not (yield Block(rt.host.keyspace.ready(call.key), budget)):
            rt.host._failures.hung(rt.get)  # raises under on_backend_error="raise"
            return (yield from _without_cache(rt, call, flight))
        seen = yield from look(rt, call)
        if seen is BYPASS:
            return (yield from _without_cache(rt, call, flight))
        env, state = seen
        if state in (FRESH, EARLY, STALE):
            # another process computed it while this call waited
            rt.count("coalesced", flight)
            return env.value


def _early(
    rt: ReadThrough, call: Call, hooks: Hooks, env: Envelope, flight: Flight | None
) -> Flow[Any]:
    """XFetch chose this caller: recompute now if it wins the lease, else serve."""
    token = secrets.token_hex(8)
    got = yield rt.claim(call, token)
    if got is BYPASS:
        return env.value
    claim = rt.claimed(got)
    if not claim.claimed:
        return env.value
    return (yield from load(rt, call, hooks, (token, claim.stamps), env, False, flight))


def refresh(rt: ReadThrough, call: Call, hooks: Hooks) -> Flow[None]:
    """A background refresh of a stale entry: recompute if this call wins the lease.
    It has no caller to raise to: a failure is logged and the stale value stays."""
    try:
        token = secrets.token_hex(8)
        got = yield rt.claim(call, token)
        if got is not BYPASS:
            claim = rt.claimed(got)
            if claim.claimed:
                yield from load(rt, call, hooks, (token, claim.stamps))
    except Exception as exc:
        rt.host._log.warning(
            "refresh:" + rt.name,
            "rcache: background refresh of %s failed (%s); serving stale",
            rt.name,
            type(exc).__name__,
        )


def delete(
    keys: Sequence[str],
    guard: Guard,
    metrics: MetricsSink | None = None,
    written: Callable[[Sequence[str]], None] | None = None,
) -> Flow[int]:
    """DEL ``keys`` (full Redis keys): how many existed (0 if bypassed), each counted
    as a removal of ``guard.name`` if ``metrics`` is given; ``written(keys)`` after it
    in every case (the local tier drops this process's copies)."""
    if not keys:
        return 0
    try:
        n = yield Run(lambda c: c.delete(*keys), guard)
    finally:
        if written is not None:
            written(keys)
    if n is BYPASS:
        return 0
    if metrics is not None:
        for _ in range(int(n)):
            metrics.cache_removal(guard.name)
    return int(n)


# -- batches -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Batch(_Reader):
    """One ``@cache.cached_batch`` function's settings, as :func:`batch` uses them."""

    ids_param: str
    ttl: float
    fn_stamp: str  #: the function's version stamp key (``invalidate_all``)

    def check_result(self, result: Any) -> Mapping[Any, Any]:
        if not isinstance(result, Mapping):
            raise ConfigurationError(
                f"cached_batch: {self.name} must return a mapping of id -> value, "
                f"got {type(result).__name__}"
            )
        return result

    def split(
        self, ids: Sequence[Any], now: float, rows: Sequence[bytes | None]
    ) -> tuple[dict[Any, Any], list[Any]]:
        """(found values by id, missing ids); each id counted as a hit or a miss."""
        stamp, values = rows[0], rows[1:]
        metrics = self.host.metrics
        serializer = self.host.serializer
        blob = None if stamp is None else stamp_blob([stamp])
        found: dict[Any, Any] = {}
        missing: list[Any] = []
        for i, raw in zip(ids, values, strict=True):
            env = (
                None
                if raw is None or stamp is None
                else decode(self.host, self.name, raw, serializer)
            )
            if (
                env is None
                or env.stamp != blob
                or now >= env.fresh_until
                or env.created_at > now + FUTURE_SLACK
            ):
                missing.append(i)
                metrics.cache_get(self.name, "miss")
            else:
                found[i] = env.value
                metrics.cache_get(self.name, "hit")
        return found, missing

    def stamp_claim(self) -> Command:
        """``cache_claim`` without a lease: read the function's stamp, creating it."""
        key, ks = self.fn_stamp, self.host.keyspace
        return CACHE_CLAIM.command(
            CACHE_CLAIM.keys(ks.lease(key), ks.ready(key), [key]),
            CACHE_CLAIM.args(
                secrets.token_hex(8), None, ttl_ms(self.ttl), [secrets.token_hex(8)]
            ),
            self.get,
        )

    def store(
        self,
        ids: Sequence[Any],
        keys: Sequence[str],
        computed: Mapping[Any, Any],
        stamp: bytes,
        elapsed: float,
    ) -> Command:
        """``cache_store_many`` of the computed values that belong to ``ids``."""
        by_id = dict(zip(ids, keys, strict=True))
        out_keys: list[str] = []
        data: list[bytes] = []
        each = elapsed / max(1, len(computed))
        now = self.host._clock.now()  # Redis's clock (issue 14 item 6)
        blob = stamp_blob([stamp])
        for i, value in computed.items():
            if i in by_id:
                out_keys.append(by_id[i])
                data.append(
                    encode_envelope(
                        self.host.serializer,
                        value,
                        compute_time=each,
                        fresh_for=self.ttl,
                        stamp=blob,
                        now=now,
                    )
                )
        return CACHE_STORE_MANY.command(
            CACHE_STORE_MANY.keys(self.fn_stamp, out_keys),
            CACHE_STORE_MANY.args(stamp, ttl_ms(self.ttl), data),
            self.put,
        )


def batch(
    bt: Batch, ids: list[Any], bound: dict[str, Any], keys: list[str]
) -> Flow[dict[Any, Any]]:
    """A call of a batch function: present entries from one MGET, the function called
    once with the missing ids only, their results stored in one round trip (rejected
    if ``invalidate_all`` raced the computation). Returns ``{id: value}``."""
    if not ids:
        return {}
    command, offset = bt.reading_keys([bt.fn_stamp, *keys])
    reply = yield command
    stamp: bytes | None = None
    if reply is BYPASS:  # without Redis: compute all, store nothing
        found: dict[Any, Any] = {}
        missing = list(ids)
    else:
        now, rows = bt.rows(reply, offset)
        found, missing = bt.split(ids, now, rows)
        if not missing:
            return found
        stamp = rows[0]
        if stamp is None:  # no stamp yet: create one to store the entries under
            got = yield bt.stamp_claim()
            stamp = None if got is BYPASS else bt.claimed(got).stamps[0]
    start = time.perf_counter()
    computed = bt.check_result(
        (yield Compute(bt.fn, (), {**bound, bt.ids_param: missing}))
    )
    elapsed = time.perf_counter() - start
    bt.host.metrics.cache_load(bt.name, "success", elapsed)
    if stamp is not None and computed:
        try:
            n = yield bt.store(ids, keys, computed, stamp, elapsed)
        finally:
            bt.host._local_written(keys)  # this process's own write
        if n is not BYPASS:
            for _ in range(CACHE_STORE_MANY.parse(n)):
                bt.host.metrics.cache_put(bt.name)
    return {**found, **{i: computed[i] for i in missing if i in computed}}
