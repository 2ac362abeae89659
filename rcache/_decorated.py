"""The objects returned by ``@cache.cached``: one sync and one async wrapper.

Both share ``CachedSpec`` (everything decided at decoration time, plus the pure
decisions) and differ only in awaiting. They implement ``__get__`` so decorated methods
bind like functions.

A call, in round trips:

* **hit**: one ``MGET`` of the value and its version stamps (function + tags); stampede
  protection costs nothing here (cashews ``lock=True`` pays three round trips per hit).
  Freshness is judged by Redis's clock (read with the value every few seconds by
  ``cache_read.lua``, extrapolated monotonically in between), never the host's.
* **miss**: concurrent callers in this process share one computation (single flight);
  across processes the first caller takes a lease (``cache_claim.lua``), computes and
  stores (``cache_store.lua``: rejected if a stamp changed meanwhile, then the lease is
  given up and waiters are woken). The others block on ``BLMOVE`` of a signal list,
  each wait capped at the lease's remaining PTTL, and re-read: no polling (dogpile's
  distributed lock polls every 100 ms; cashews spins on SET NX). A wait that gets no
  reply from Redis within its budget (Redis hung) computes without the cache.

Read-your-invalidations in this process: ``invalidate_tags()``, ``fn.invalidate()`` and
``fn.invalidate_all()`` detach the in-flight computations of what they invalidated, so a
caller that starts after they return never joins a computation that began before; a
detached computation still answers the callers that joined it, but does not store.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rcache._cache import BYPASS, Cache
from rcache._config import BackendErrorPolicy
from rcache._exceptions import LockNotAcquiredError, SerializationError
from rcache._freshness import EARLY, EXPIRED, FRESH, STALE, Freshness, stamp_blob
from rcache._keys import KeyBuilder, Template
from rcache._serializers import Envelope, encode_envelope
from rcache._typed import LazyTyped, TypedValues

__all__ = ["AsyncCached", "CachedSpec", "SyncCached"]

_UNBOUND: Any = object()
#: what a cancelled leader hands its followers: "not an answer, fetch yourself"
_LEADER_CANCELLED: Any = object()
RefreshRunner = Callable[[Callable[[], Any]], Any]


class _Flight:
    """One in-process computation that concurrent callers of the same key share."""

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
        self.event: threading.Event | None = None
        self.future: asyncio.Future[Any] | None = None
        self.followers = 0  # callers waiting on this flight (observability, tests)
        self.value: Any = None
        self.error: BaseException | None = None
        #: how the leader's call was counted ("hit", "miss", ...), None until it is
        self.result: str | None = None


@dataclass(eq=False)
class CachedSpec:
    cache: Cache
    fn: Callable[..., Any]
    keys: KeyBuilder
    name: str
    ttl: float
    policy: BackendErrorPolicy
    cache_none: bool
    unless: Callable[[Any], bool] | None
    on_unserializable: Literal["raise", "skip"]
    freshness: Freshness = field(default_factory=lambda: Freshness(ttl=60.0))
    tags: tuple[str, ...] = ()
    stampede: bool = True
    refresh_runner: RefreshRunner | None = None
    #: decodes values as the return annotation says (rcache._typed), None if untyped
    typed: TypedValues | LazyTyped | None = None
    # state shared by all bindings of this function in this process
    flights: dict[str, _Flight] = field(default_factory=dict)
    flights_lock: threading.Lock = field(default_factory=threading.Lock)
    refreshing: set[str] = field(default_factory=set)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    aflights: weakref.WeakKeyDictionary[
        asyncio.AbstractEventLoop, dict[str, _Flight]
    ] = field(default_factory=weakref.WeakKeyDictionary)

    def __post_init__(self) -> None:
        self._fn_stamp = self.cache.keyspace.function_stamp(self.name)
        self._tag_has_fields = any("{" in t for t in self.tags)
        # fields encoded as in key templates: type-preserving, delimiter-safe (item 10)
        self._tag_templates = [Template(t) for t in self.tags]
        self._static_stamps = [self._fn_stamp] + [
            self.cache.tag_key(t) for t in self.tags
        ]

    def detach(self, key: str | None = None, stamp_keys: Sequence[str] = ()) -> None:
        """Detach the in-flight computations of ``key``, or of any of ``stamp_keys``, or
        (neither given) all of this function's: callers that start from now on begin a
        new computation instead of joining one that began before an invalidation
        (issue 14 item 7). Called after the invalidation reached Redis."""
        wanted = set(stamp_keys)

        def hit(k: str, keys: list[str]) -> bool:
            if key is not None:
                return k == key
            return not wanted or not wanted.isdisjoint(keys)

        with self.flights_lock:
            for k, flight in list(self.flights.items()):
                if hit(k, flight.stamp_keys):
                    flight.detached = True
                    del self.flights[k]
            # asyncio flights live on their loops (other threads, maybe); loops are
            # registered under flights_lock, and an item is deleted only if it is still
            # the flight we detach
            for aflights in list(self.aflights.values()):
                for k, aflight in list(aflights.items()):
                    if hit(k, aflight.stamp_keys):
                        aflight.detached = True
                        if aflights.get(k) is aflight:
                            del aflights[k]

    # -- pure helpers -----------------------------------------------------------------

    def stamp_keys(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
        if not self._tag_has_fields:
            return self._static_stamps
        bound = self.keys.bind(args, kwargs)
        return [self._fn_stamp] + [
            self.cache.tag_key(t.render(bound)) for t in self._tag_templates
        ]

    def entry(self, rows: Sequence[bytes | None]) -> Envelope | None:
        """The envelope in ``rows`` (value, stamps...) if it is valid under the stamps."""
        raw = rows[0]
        if raw is None:
            return None
        typed = self.typed
        env = self.cache._envelope(
            self.name,
            raw,
            None if typed is None else typed.serializer(self.cache.serializer),
        )
        if env is None:
            return None
        stamps = rows[1:]
        if any(s is None for s in stamps) or env.stamp != stamp_blob(stamps):  # type: ignore[arg-type]
            return (
                None  # invalidated (a stamp was deleted) or computed under old stamps
            )
        return env

    def encode(
        self, value: Any, compute_time: float, stamps: Sequence[bytes]
    ) -> bytes | None:
        """Envelope bytes to store, or None when this result is not to be cached."""
        if value is None and not self.cache_none:
            return None
        if self.unless is not None and self.unless(value):
            return None
        serializer = self.cache.serializer
        if self.typed is not None:
            serializer = self.typed.serializer(serializer)
        try:
            return encode_envelope(
                serializer,
                value,
                compute_time=compute_time,
                fresh_for=self.ttl,
                stamp=stamp_blob(stamps),
                now=self.cache._server_now(),  # Redis's clock, not ours (item 6)
            )
        except SerializationError as exc:
            if self.on_unserializable == "skip":
                self.cache.metrics.cache_error(
                    self.name, "serialize", "SerializationError"
                )
                return None
            raise SerializationError(
                f"{self.name} returned a {type(value).__qualname__} that the "
                f"{serializer.name} serializer cannot store ({exc}); return "
                "plain data, choose another serializer, or pass on_unserializable='skip'"
            ) from None

    def detached(self, flight: _Flight | None) -> bool:
        """Was this computation detached by an invalidation (then it must not store)?
        Counted as cache_store.lua counts a write that an invalidation raced."""
        if flight is None or not flight.detached:
            return False
        self.cache.metrics.cache_error(self.name, "set", "InvalidatedDuringLoad")
        return True

    def skipped(self) -> None:
        """Count a call made while the breaker is open (raises under "raise")."""
        self.cache._skipped(self.name, "get", self.policy)
        self.cache.metrics.cache_get(self.name, "miss")

    def count(self, result: str, flight: _Flight | None = None) -> None:
        """Count this call in ``cache_gets`` (exactly once per call: every path of a
        decorated call ends in one ``count`` or one ``shared``); a single-flight leader
        also records its result for the callers that share it."""
        self.cache.metrics.cache_get(self.name, result)
        if flight is not None:
            flight.result = result

    def shared(self, leader: str | None) -> None:
        """Count a caller that got the value of a concurrent caller in this process.

        Sharing a hit (or a stale value) is still a hit (or stale): the value came from
        Redis. Sharing a computation is "coalesced": the call neither found the value
        nor ran the function (before, such callers were counted nowhere: 8 threads on a
        cold key showed 1 miss).
        """
        result = leader if leader in ("hit", "stale") else "coalesced"
        self.cache.metrics.cache_get(self.name, result)

    def wait_timed_out(self, flight: _Flight | None = None) -> None:
        """After a wait for another caller's computation timed out: raise under
        ``on_wait_timeout="raise"`` (the call is counted as a miss), else return and
        let the caller compute (and count itself)."""
        if self.freshness.on_wait_timeout == "raise":
            self.count("miss", flight)
            raise LockNotAcquiredError(
                f"{self.name}: another process is computing this entry and it did not "
                f"arrive within wait={self.freshness.wait:g}s"
            )


class _Base:
    __slots__ = ("__dict__", "_bound", "_spec")

    def __init__(self, spec: CachedSpec, bound: Any = _UNBOUND) -> None:
        self._spec = spec
        self._bound = bound
        functools.update_wrapper(self, spec.fn)  # type: ignore[arg-type]

    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        if instance is None or self._bound is not _UNBOUND:
            return self
        return type(self)(self._spec, instance)

    def __repr__(self) -> str:
        return f"<cached {self._spec.name} ttl={self._spec.ttl:g}s>"

    def _args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return args if self._bound is _UNBOUND else (self._bound, *args)

    def key_for(self, *args: Any, **kwargs: Any) -> str:
        """The full Redis key for these arguments."""
        return self._spec.keys.build(self._args(args), kwargs)


class SyncCached(_Base):
    """A sync function decorated with ``@cache.cached``."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = self._args(args)
        spec = self._spec
        if spec.cache.breaker.blocked():  # outage: skip key building and Redis entirely
            spec.skipped()
            return self._compute(args, kwargs)[0]
        key = spec.keys.build(args, kwargs)
        stamp_keys = spec.stamp_keys(args, kwargs)
        if spec.stampede:
            return self._single_flight(key, stamp_keys, args, kwargs)
        return self._fetch(key, stamp_keys, args, kwargs)

    def _fetch(
        self,
        key: str,
        stamp_keys: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        flight: _Flight | None = None,
    ) -> Any:
        """Read; on a miss compute (under the cross-process lease if stampede=True)."""
        spec = self._spec
        cache = spec.cache
        got = cache._read_raw([key, *stamp_keys], spec.name, spec.policy)
        if got is BYPASS:
            spec.count("miss", flight)
            return self._compute(args, kwargs)[0]
        now, rows = got
        env = spec.entry(rows)
        state = spec.freshness.classify(env, now)
        if state == FRESH:
            spec.count("hit", flight)
            return env.value  # type: ignore[union-attr]
        if state == EARLY:
            spec.count("hit", flight)
            return self._early(key, stamp_keys, args, kwargs, env, flight)  # type: ignore[arg-type]
        if state == STALE:
            spec.count("stale", flight)
            self._refresh_in_background(key, stamp_keys, args, kwargs)
            return env.value  # type: ignore[union-attr]
        # counted by _load or _distributed, once the outcome is known (computed, shared
        # with another process, or served stale because the computation failed)
        fallback = env if state == EXPIRED else None
        if not spec.stampede:
            return self._load(
                key, stamp_keys, args, kwargs, None, fallback, count=True, flight=flight
            )
        return self._distributed(key, stamp_keys, args, kwargs, fallback, flight)

    # -- computing --------------------------------------------------------------------

    def _compute(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, float]:
        spec = self._spec
        start = time.perf_counter()
        try:
            value = spec.fn(*args, **kwargs)
        except BaseException:
            spec.cache.metrics.cache_load(
                spec.name, "failure", time.perf_counter() - start
            )
            raise
        elapsed = time.perf_counter() - start
        spec.cache.metrics.cache_load(spec.name, "success", elapsed)
        return value, elapsed

    def _load(
        self,
        key: str,
        stamp_keys: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        claim: tuple[str, list[bytes]] | None,
        fallback: Envelope | None,
        *,
        count: bool = False,
        flight: _Flight | None = None,
    ) -> Any:
        """Compute and store. ``claim`` is (token, stamps) from cache_claim, if taken.

        ``count``: this call is not counted yet (a miss, or stale if the computation
        fails and ``fallback`` is served); early and background refreshes are counted
        by their caller already.
        """
        spec = self._spec
        cache = spec.cache
        leased = claim is not None
        if claim is None:
            got = cache._claim(
                key, stamp_keys, secrets.token_hex(8), spec, take_lease=False
            )
            if got is BYPASS:
                if count:
                    spec.count("miss", flight)
                return self._compute(args, kwargs)[0]
            claim = (got[0], got[2])
        token, stamps = claim
        lease = cache._leases.add(
            spec.cache.keyspace.lease(key), token, spec.freshness.lease_ttl, leased
        )
        try:
            value, elapsed = self._compute(args, kwargs)
        except BaseException as exc:
            cache._leases.remove(lease)
            cache._store(key, stamp_keys, token, b"", stamps, spec)  # give up the lease
            if isinstance(exc, Exception) and spec.freshness.usable_on_error(
                fallback, cache._server_now()
            ):
                if count:
                    spec.count("stale", flight)
                return fallback.value  # type: ignore[union-attr]
            if count:
                spec.count("miss", flight)
            raise
        cache._leases.remove(lease)
        if count:
            spec.count("miss", flight)
        data = None
        try:
            if not spec.detached(flight):  # invalidated meanwhile: answer, don't store
                data = spec.encode(value, elapsed, stamps)
        finally:
            # every path gives up the lease, an unserializable result too: otherwise
            # the next caller waits the whole lease (issue 14 item 8)
            cache._store(key, stamp_keys, token, data or b"", stamps, spec)
        return value

    def _single_flight(
        self,
        key: str,
        stamp_keys: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Concurrent callers of one key in this process share one read and compute.

        The flight is registered before the read, so a cold stampede sends one MGET per
        process, not one per caller; the Event is made only when a follower arrives.
        """
        spec = self._spec
        with spec.flights_lock:
            found = spec.flights.get(key)
            leader = found is None
            if found is None:
                flight = spec.flights[key] = _Flight(stamp_keys)
            else:
                flight = found
                flight.followers += 1
                if flight.event is None:
                    flight.event = threading.Event()
        if flight.event is not None and not leader:
            if not flight.event.wait(spec.freshness.wait):
                spec.wait_timed_out()
                spec.count("miss")
                return self._compute(args, kwargs)[0]
            spec.shared(flight.result)
            if flight.error is not None:
                raise flight.error
            return flight.value
        try:
            flight.value = self._fetch(key, stamp_keys, args, kwargs, flight)
            return flight.value
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with spec.flights_lock:
                if spec.flights.get(key) is flight:  # not a newer one (after a detach)
                    del spec.flights[key]
                event = flight.event
            if event is not None:
                event.set()

    def _distributed(
        self,
        key: str,
        stamp_keys: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        fallback: Envelope | None,
        flight: _Flight | None = None,
    ) -> Any:
        spec = self._spec
        cache = spec.cache
        token = secrets.token_hex(8)
        deadline = time.monotonic() + spec.freshness.wait
        while True:
            got = cache._claim(key, stamp_keys, token, spec)
            if got is BYPASS:
                spec.count("miss", flight)
                return self._compute(args, kwargs)[0]
            claimed, pttl, stamps = got[1], got[3], got[2]
            if claimed:
                return self._load(
                    key, stamp_keys, args, kwargs, (token, stamps), fallback,
                    count=True, flight=flight,
                )  # fmt: skip
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                spec.wait_timed_out(flight)
                return self._load(
                    key, stamp_keys, args, kwargs, (token, stamps), fallback,
                    count=True, flight=flight,
                )  # fmt: skip
            if not cache._wait_ready(key, min(remaining, pttl / 1000.0 + 0.005)):
                cache._hung(spec)  # raises under on_backend_error="raise"
                spec.count("miss", flight)
                return self._compute(args, kwargs)[0]
            got = cache._read_raw([key, *stamp_keys], spec.name, spec.policy)
            if got is BYPASS:
                spec.count("miss", flight)
                return self._compute(args, kwargs)[0]
            env = spec.entry(got[1])
            if spec.freshness.classify(env, got[0]) in (FRESH, EARLY, STALE):
                # another process computed it while this call waited
                spec.count("coalesced", flight)
                return env.value  # type: ignore[union-attr]

    def _early(
        self,
        key: str,
        stamp_keys: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        env: Envelope,
        flight: _Flight | None = None,
    ) -> Any:
        """XFetch chose this caller: recompute now if it wins the lease, else serve."""
        spec = self._spec
        token = secrets.token_hex(8)
        got = spec.cache._claim(key, stamp_keys, token, spec)
        if got is BYPASS or not got[1]:
            return env.value
        return self._load(
            key, stamp_keys, args, kwargs, (token, got[2]), env, flight=flight
        )

    def _refresh_in_background(
        self,
        key: str,
        stamp_keys: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        spec = self._spec
        with spec.flights_lock:
            if key in spec.refreshing:
                return
            spec.refreshing.add(key)

        def job() -> None:
            try:
                token = secrets.token_hex(8)
                got = spec.cache._claim(key, stamp_keys, token, spec)
                if got is not BYPASS and got[1]:
                    self._load(key, stamp_keys, args, kwargs, (token, got[2]), None)
            except Exception as exc:  # a background refresh has no caller to raise to
                spec.cache._log.warning(
                    "refresh:" + spec.name,
                    "rcache: background refresh of %s failed (%s); serving stale",
                    spec.name,
                    type(exc).__name__,
                )
            finally:
                with spec.flights_lock:
                    spec.refreshing.discard(key)

        if spec.refresh_runner is not None:
            spec.refresh_runner(job)
        else:
            threading.Thread(target=job, name="rcache-refresh", daemon=True).start()

    # -- helpers ----------------------------------------------------------------------

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Recompute and store the entry for these arguments; return the new value."""
        args = self._args(args)
        spec = self._spec
        key = spec.keys.build(args, kwargs)
        return self._load(key, spec.stamp_keys(args, kwargs), args, kwargs, None, None)

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Delete the entry for these arguments; True if one was there.

        A call of these arguments that starts after this returns computes afresh; it
        never joins a computation in this process that began before (see module doc).
        """
        spec = self._spec
        key = spec.keys.build(self._args(args), kwargs)
        try:
            return spec.cache._delete_raw(key, spec.name, spec.policy)
        finally:
            spec.detach(key=key)

    def invalidate_all(self) -> bool:
        """Drop every entry of this function in O(1) (its version stamp changes)."""
        spec = self._spec
        try:
            return spec.cache._delete_raw(spec._fn_stamp, spec.name, spec.policy)
        finally:
            spec.detach()


class AsyncCached(_Base):
    """An ``async def`` function decorated with ``@cache.cached``."""

    __slots__ = ()

    def __init__(self, spec: CachedSpec, bound: Any = _UNBOUND) -> None:
        super().__init__(spec, bound)
        # Let inspect.iscoroutinefunction() see a coroutine function, as frameworks
        # (FastAPI, Celery, pytest) dispatch on it: 3.12+ has a marker; before that,
        # inspect treats an object with __code__/__defaults__ as function-like.
        if hasattr(inspect, "markcoroutinefunction"):
            inspect.markcoroutinefunction(self)
        elif bound is _UNBOUND and hasattr(spec.fn, "__code__"):
            self.__code__ = spec.fn.__code__
            self.__defaults__ = getattr(spec.fn, "__defaults__", None)
            self.__kwdefaults__ = getattr(spec.fn, "__kwdefaults__", None)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = self._args(args)
        spec = self._spec
        if spec.cache.breaker.blocked():  # outage: skip key building and Redis entirely
            spec.skipped()
            return (await self._compute(args, kwargs))[0]
        key = spec.keys.build(args, kwargs)
        stamp_keys = spec.stamp_keys(args, kwargs)
        if spec.stampede:
            return await self._single_flight(key, stamp_keys, args, kwargs)
        return await self._fetch(key, stamp_keys, args, kwargs)

    async def _fetch(
        self,
        key: str,
        stamp_keys: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        flight: _Flight | None = None,
    ) -> Any:
        spec = self._spec
        cache = spec.cache
        got = await cache._aread_raw([key, *stamp_keys], spec.name, spec.policy)
        if got is BYPASS:
            spec.count("miss", flight)
            return (await self._compute(args, kwargs))[0]
        now, rows = got
        env = spec.entry(rows)
        state = spec.freshness.classify(env, now)
        if state == FRESH:
            spec.count("hit", flight)
            return env.value  # type: ignore[union-attr]
        if state == EARLY:
            spec.count("hit", flight)
            return await self._early(key, stamp_keys, args, kwargs, env, flight)  # type: ignore[arg-type]
        if state == STALE:
            spec.count("stale", flight)
            self._refresh_in_background(key, stamp_keys, args, kwargs)
            return env.value  # type: ignore[union-attr]
        # counted by _load or _distributed, once the outcome is known (computed, shared
        # with another process, or served stale because the computation failed)
        fallback = env if state == EXPIRED else None
        if not spec.stampede:
            return await self._load(
                key, stamp_keys, args, kwargs, None, fallback, count=True, flight=flight
            )
        return await self._distributed(key, stamp_keys, args, kwargs, fallback, flight)

    async def _compute(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, float]:
        spec = self._spec
        start = time.perf_counter()
        try:
            value = await spec.fn(*args, **kwargs)
        except BaseException:
            spec.cache.metrics.cache_load(
                spec.name, "failure", time.perf_counter() - start
            )
            raise
        elapsed = time.perf_counter() - start
        spec.cache.metrics.cache_load(spec.name, "success", elapsed)
        return value, elapsed

    async def _load(
        self,
        key: str,
        stamp_keys: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        claim: tuple[str, list[bytes]] | None,
        fallback: Envelope | None,
        *,
        count: bool = False,
        flight: _Flight | None = None,
    ) -> Any:
        spec = self._spec
        cache = spec.cache
        leased = claim is not None
        if claim is None:
            got = await cache._aclaim(
                key, stamp_keys, secrets.token_hex(8), spec, take_lease=False
            )
            if got is BYPASS:
                if count:
                    spec.count("miss", flight)
                return (await self._compute(args, kwargs))[0]
            claim = (got[0], got[2])
        token, stamps = claim
        lease = cache._leases.add(  # renewed on this loop, by its async client
            spec.cache.keyspace.lease(key),
            token,
            spec.freshness.lease_ttl,
            leased,
            loop=asyncio.get_running_loop(),
        )
        try:
            value, elapsed = await self._compute(args, kwargs)
        except BaseException as exc:
            cache._leases.remove(lease)
            # give up the lease; shielded so that a cancellation cannot stop the release
            # half-way (the lease TTL bounds it if Redis cannot be reached)
            await asyncio.shield(
                cache._astore(key, stamp_keys, token, b"", stamps, spec)
            )
            if isinstance(exc, Exception) and spec.freshness.usable_on_error(
                fallback, cache._server_now()
            ):
                if count:
                    spec.count("stale", flight)
                return fallback.value  # type: ignore[union-attr]
            if count:
                spec.count("miss", flight)
            raise
        cache._leases.remove(lease)
        if count:
            spec.count("miss", flight)
        data = None
        try:
            if not spec.detached(flight):  # invalidated meanwhile: answer, don't store
                data = spec.encode(value, elapsed, stamps)
        finally:
            # every path gives up the lease (item 8), shielded as above
            await asyncio.shield(
                cache._astore(key, stamp_keys, token, data or b"", stamps, spec)
            )
        return value

    async def _single_flight(
        self,
        key: str,
        stamp_keys: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        spec = self._spec
        loop = asyncio.get_running_loop()
        flights = spec.aflights.get(loop)
        if flights is None:
            with spec.flights_lock:  # once per loop; detach() iterates the loops
                flights = spec.aflights.setdefault(loop, {})
        found: _Flight | None = flights.get(key)
        if found is not None:
            future = found.future
            assert future is not None
            found.followers += 1
            try:
                value = await asyncio.wait_for(
                    asyncio.shield(future), timeout=spec.freshness.wait
                )
            except asyncio.TimeoutError:
                spec.wait_timed_out()
                spec.count("miss")
                return (await self._compute(args, kwargs))[0]
            except BaseException:
                if future.done() and not future.cancelled():
                    spec.shared(found.result)  # the leader's error, shared
                raise
            if value is _LEADER_CANCELLED:
                # the leader's task was cancelled, not ours: fetch for ourselves
                return await self._single_flight(key, stamp_keys, args, kwargs)
            spec.shared(found.result)
            return value
        flight = _Flight(stamp_keys)
        future = flight.future = loop.create_future()
        flights[key] = flight
        try:
            value = await self._fetch(key, stamp_keys, args, kwargs, flight)
        except asyncio.CancelledError:
            if not future.done():
                future.set_result(_LEADER_CANCELLED)
            raise
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # mark retrieved: no "never retrieved" warning
            raise
        else:
            future.set_result(value)
            return value
        finally:
            if flights.get(key) is flight:  # not a newer one (after a detach)
                del flights[key]

    async def _distributed(
        self,
        key: str,
        stamp_keys: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        fallback: Envelope | None,
        flight: _Flight | None = None,
    ) -> Any:
        spec = self._spec
        cache = spec.cache
        token = secrets.token_hex(8)
        deadline = time.monotonic() + spec.freshness.wait
        while True:
            got = await cache._aclaim(key, stamp_keys, token, spec)
            if got is BYPASS:
                spec.count("miss", flight)
                return (await self._compute(args, kwargs))[0]
            claimed, pttl, stamps = got[1], got[3], got[2]
            if claimed:
                return await self._load(
                    key, stamp_keys, args, kwargs, (token, stamps), fallback,
                    count=True, flight=flight,
                )  # fmt: skip
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                spec.wait_timed_out(flight)
                return await self._load(
                    key, stamp_keys, args, kwargs, (token, stamps), fallback,
                    count=True, flight=flight,
                )  # fmt: skip
            if not await cache._await_ready(key, min(remaining, pttl / 1000.0 + 0.005)):
                cache._hung(spec)  # raises under on_backend_error="raise"
                spec.count("miss", flight)
                return (await self._compute(args, kwargs))[0]
            got = await cache._aread_raw([key, *stamp_keys], spec.name, spec.policy)
            if got is BYPASS:
                spec.count("miss", flight)
                return (await self._compute(args, kwargs))[0]
            env = spec.entry(got[1])
            if spec.freshness.classify(env, got[0]) in (FRESH, EARLY, STALE):
                # another process computed it while this call waited
                spec.count("coalesced", flight)
                return env.value  # type: ignore[union-attr]

    async def _early(
        self,
        key: str,
        stamp_keys: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        env: Envelope,
        flight: _Flight | None = None,
    ) -> Any:
        spec = self._spec
        token = secrets.token_hex(8)
        got = await spec.cache._aclaim(key, stamp_keys, token, spec)
        if got is BYPASS or not got[1]:
            return env.value
        return await self._load(
            key, stamp_keys, args, kwargs, (token, got[2]), env, flight=flight
        )

    def _refresh_in_background(
        self,
        key: str,
        stamp_keys: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        spec = self._spec
        if key in spec.refreshing:
            return
        spec.refreshing.add(key)

        async def job() -> None:
            try:
                token = secrets.token_hex(8)
                got = await spec.cache._aclaim(key, stamp_keys, token, spec)
                if got is not BYPASS and got[1]:
                    await self._load(
                        key, stamp_keys, args, kwargs, (token, got[2]), None
                    )
            except Exception as exc:
                spec.cache._log.warning(
                    "refresh:" + spec.name,
                    "rcache: background refresh of %s failed (%s); serving stale",
                    spec.name,
                    type(exc).__name__,
                )
            finally:
                spec.refreshing.discard(key)

        if spec.refresh_runner is not None:
            spec.refresh_runner(job)
        else:
            task = asyncio.get_running_loop().create_task(job())
            spec.tasks.add(task)  # keep a reference until done (asyncio docs)
            task.add_done_callback(spec.tasks.discard)

    async def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Recompute and store the entry for these arguments; return the new value."""
        args = self._args(args)
        spec = self._spec
        key = spec.keys.build(args, kwargs)
        return await self._load(
            key, spec.stamp_keys(args, kwargs), args, kwargs, None, None
        )

    async def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Delete the entry for these arguments; True if one was there (see the sync
        twin: later callers never join an earlier computation)."""
        spec = self._spec
        key = spec.keys.build(self._args(args), kwargs)
        try:
            return await spec.cache._adelete_raw(key, spec.name, spec.policy)
        finally:
            spec.detach(key=key)

    async def invalidate_all(self) -> bool:
        """Drop every entry of this function in O(1) (its version stamp changes)."""
        spec = self._spec
        try:
            return await spec.cache._adelete_raw(spec._fn_stamp, spec.name, spec.policy)
        finally:
            spec.detach()
