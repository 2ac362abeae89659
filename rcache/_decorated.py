"""The objects returned by ``@cache.cached``: one sync and one async wrapper.

Every decision of a call is in ``_readthrough.py``, written once as flows; a wrapper
binds the arguments, hands the flow to its Cache's driver and keeps only what really
differs between the modes:

* **single flight**: concurrent callers of one key in this process share one read and
  one computation (a ``threading.Event`` for threads, an ``asyncio.Future`` per event
  loop for tasks);
* **background refresh** of a stale entry: a bounded pool of daemon threads per Cache
  (:class:`RefreshPool`, at most ``REFRESH_WORKERS``) or an asyncio task, unless the
  function has a ``refresh_runner``;
* **the warm hit**, answered without starting a flow: the wrapper sends the flow's
  first command (the read) itself and starts the flow only if the entry is not fresh.

They implement ``__get__`` so that decorated methods bind like functions.

Read-your-invalidations in this process: ``invalidate_tags()``, ``fn.invalidate()`` and
``fn.invalidate_all()`` detach the in-flight computations of what they invalidated, so a
caller that starts after they return never joins a computation that began before; a
detached computation still answers the callers that joined it, but does not store.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any, Protocol

from rcache._breaker import CircuitBreaker
from rcache._cache_protocol import CACHE_READ
from rcache._cluster import describe, invalidate
from rcache._config import BackendErrorPolicy, CachedOptions
from rcache._flow import AsyncDriver, Command, Flow, SyncDriver
from rcache._freshness import FRESH, Freshness
from rcache._keys import KeyBuilder, Template
from rcache._leases import KeyLeases
from rcache._local import MISSING, Token, args_key
from rcache._metrics import bypass_counter, untimed_bypass
from rcache._policy import BYPASS, Guard
from rcache._readthrough import (
    Call,
    Flight,
    Host,
    Mget,
    ReadThrough,
    delete,
    load,
    read_through,
    refresh,
)
from rcache._tracking import Tier
from rcache._typed import LazyTyped, TypedValues

__all__ = [
    "REFRESH_WORKERS",
    "AsyncCached",
    "CachedSpec",
    "Owner",
    "RefreshPool",
    "SyncCached",
]

_UNBOUND: Any = object()
#: what a cancelled leader hands its followers: "not an answer, fetch yourself"
_LEADER_CANCELLED: Any = object()
#: the most threads a Cache runs background refreshes on (sync functions)
REFRESH_WORKERS = 4


class RefreshPool:
    """Runs background refreshes on at most ``workers`` daemon threads named
    ``rcache-refresh``, started as jobs arrive and ended after ``idle`` seconds without
    one. Jobs beyond the threads wait in a queue (each stale key has one job at most).

    Daemon threads, unlike a ``ThreadPoolExecutor``'s, never hold up the interpreter's
    exit for a refresh nobody waits for. Safe across ``fork()``: a child starts its own.
    """

    def __init__(self, workers: int = REFRESH_WORKERS, idle: float = 10.0) -> None:
        self.workers = workers
        self.idle = idle
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._jobs: deque[Callable[[], object]] = deque()
        self._threads = 0  # started and not yet ended
        self._waiting = 0  # of which waiting for a job

    @property
    def threads(self) -> int:
        """How many refresh threads run now."""
        return self._threads

    def submit(self, job: Callable[[], object]) -> None:
        """Run ``job()`` on a refresh thread, as soon as one is free."""
        if self._pid != os.getpid():
            # forked: the parent's threads do not exist here, and its lock may have
            # been held by one of them at the fork
            self._reset()
        with self._cond:
            self._jobs.append(job)
            if self._waiting:
                self._cond.notify()
            if len(self._jobs) > self._waiting and self._threads < self.workers:
                self._threads += 1
                threading.Thread(
                    target=self._work, name="rcache-refresh", daemon=True
                ).start()

    def _work(self) -> None:
        cond = self._cond
        while True:
            with cond:
                if not self._jobs:
                    self._waiting += 1
                    cond.wait(self.idle)
                    self._waiting -= 1
                    if not self._jobs:  # idle for a while: end this thread
                        self._threads -= 1
                        return
                job = self._jobs.popleft()
            job()  # a refresh flow catches and logs its own errors


class Owner(Host, Protocol):
    """What a decorated function reads of its Cache (a :class:`~rcache.Cache` is one)."""

    prefix: str
    default_ttl: float | None
    on_backend_error: BackendErrorPolicy
    breaker: CircuitBreaker
    _driver: SyncDriver
    _adriver: AsyncDriver
    _leases: KeyLeases
    _refresher: RefreshPool

    def tag_key(self, tag: str, group: int | None = None) -> str: ...

    def _local_option(self, local: Any) -> Any: ...

    def _local_tier(self, options: Any, name: str | None = None) -> Tier | None: ...


class CachedSpec:
    """One decorated function: its options, keys and flows' settings (:attr:`rt`, made
    again when the Cache is configured), and this process's state, shared by every
    binding of the function (in-flight computations, refreshes under way)."""

    def __init__(
        self,
        cache: Owner,
        fn: Callable[..., Any],
        options: CachedOptions,
        keys: KeyBuilder,
        *,
        is_async: bool = False,
        typed: TypedValues | LazyTyped | None = None,
    ) -> None:
        self.cache = cache
        self.fn = fn
        self.options = options
        self.keys = keys
        self.name = options.name or keys.name
        self.typed = typed
        self.hooks: _SyncHooks = _AsyncHooks(self) if is_async else _SyncHooks(self)
        # in-process state: flights (single flight), refreshes under way, their tasks
        self.flights: dict[str, Flight] = {}
        self.flights_lock = threading.Lock()
        #: the last event loop's flights: (weak reference to the loop, its flights)
        self.last_aflights: tuple[Callable[[], Any], dict[str, Flight]] | None = None
        self.refreshing: set[str] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.aflights: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, Flight]
        ] = weakref.WeakKeyDictionary()
        # the local tier (rcache._local): made on the first call, never at decoration
        self.local: Tier | None = None
        self.local_ready = False
        # a local key from the arguments alone, only where the Redis key is a pure
        # function of them (a key= callable may read a context, a tenant...)
        self.local_fast = not callable(options.key)
        self._tag_has_fields = any("{" in t for t in options.tags)
        # fields encoded as in key templates: type-preserving, delimiter-safe (item 10)
        self._tag_templates = [Template(t) for t in options.tags]
        self.rt: ReadThrough
        self.rebase()

    def rebase(self) -> None:
        """Follow the Cache's current prefix, default ttl, policy and metrics sink."""
        cache, o = self.cache, self.options
        ks = cache.keyspace
        self.keys.rebase(ks)
        ttl = o.ttl if o.ttl is not None else cache.default_ttl
        if ttl is None:  # the default was taken away: keep the one decorated with
            ttl = self.rt.freshness.ttl
        policy = o.on_backend_error or cache.on_backend_error
        name = self.name
        self.keyspace = ks
        if ks.groups is None:
            self._fn_stamp = ks.function_stamp(name)
            self._static_stamps = [self._fn_stamp] + [cache.tag_key(t) for t in o.tags]
            # per tag: (its stamp key, None) if it has no fields, else ("", the
            # template)
            self._tag_prefix = ks.tag_prefix
            self._tags: list[tuple[str, Template | None]] = [
                ("", t) if t.fields else (cache.tag_key(t.template), None)
                for t in self._tag_templates
            ]
            self.__dict__.pop("stamp_keys", None)  # the class's own
        else:
            # Redis Cluster: an entry's stamps are its slot group's copies; bound
            # here so that the single-primary hit pays nothing for groups
            self._group_stamps: dict[int, list[str]] = {}
            self.stamp_keys = self._grouped_stamp_keys  # type: ignore[method-assign]
        self.delete_guard = Guard(name, "delete", policy)
        self.rt = ReadThrough(
            host=cache,
            name=name,
            fn=self.fn,
            get=Guard(name, "get", policy),
            put=Guard(name, "set", policy),
            freshness=Freshness(
                ttl=ttl,
                beta=o.beta,
                stale=o.stale,
                stale_if_error=o.stale_if_error,
                lease_ttl=o.lease_ttl,
                wait=o.wait,
                on_wait_timeout=o.on_wait_timeout,
            ),
            stampede=o.stampede,
            cache_none=o.cache_none,
            unless=o.unless,
            on_unserializable=o.on_unserializable,
            typed=self.typed,
        )
        cache.metrics.register_cache(name)
        #: the breaker-open call: raise (counted) before the function, or count after it
        self.fails_closed = policy == "raise"
        self.bypassed = bypass_counter(cache.metrics)
        self.bypassed_ok = untimed_bypass(cache.metrics, name)
        # Cache.configure() closed the Cache's tiers: make this function's again
        self.local, self.local_ready = None, False

    def local_tier(self) -> Tier | None:
        """This function's local tier, or None (off): made on the first call."""
        if not self.local_ready:
            cache = self.cache
            self.local = cache._local_tier(
                cache._local_option(self.options.local), self.name
            )
            self.local_ready = True
        return self.local

    def local_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The local key of a call from its arguments, or None: use the Redis key."""
        return args_key(self, args) if self.local_fast and not kwargs else None

    def tracked(
        self, call: Call, tier: Tier, lk: Any
    ) -> tuple[Command, float | None, Token]:
        """The first read of a call, tracked for the local tier (local-recipe.md step
        4): the command, the clock offset for ``rt.rows`` and the read's token."""
        keys = [call.key, *call.stamp_keys]
        token = tier.store.begin(keys)  # before the read is sent
        offset = self.cache._clock.offset()
        if offset is not None:
            return tier.read(token, ("MGET", *keys), self.rt.get), offset, token
        script = CACHE_READ
        argv = ("EVALSHA", script.sha, len(keys), *keys)
        return tier.read(token, argv, self.rt.get, script), None, token

    @staticmethod
    def _stamps_of(token: Token) -> tuple[bytes, ...]:
        return token.keys[1:]  # [value key, *stamp keys], as tracked() read them

    def seen_tracked(
        self, reply: Any, offset: float | None, tier: Tier, token: Token, lk: Any
    ) -> Any:
        """``rt.seen`` of a tracked read; a fresh value is kept in the tier, until
        its own expiry (on the monotonic clock)."""
        if reply is BYPASS:
            return BYPASS
        rt = self.rt
        now, rows = rt.rows(reply, offset)
        env = rt.entry(rows)
        state = rt.freshness.classify(env, now)
        if state == FRESH:
            tier.store.store(
                token,
                lk,
                env.value,  # type: ignore[union-attr]
                expires_at=time.monotonic() + (env.fresh_until - now),  # type: ignore[union-attr]
                nbytes=len(rows[0] or b""),
                # checked by value on each hit (a stamp whose TTL a store extended is
                # re-read once, not a reason to drop every entry of the function)
                stamps=zip(self._stamps_of(token), rows[1:], strict=True),  # type: ignore[arg-type]
            )
        return env, state

    @property
    def ttl(self) -> float:
        return self.rt.freshness.ttl

    @property
    def freshness(self) -> Freshness:
        return self.rt.freshness

    @property
    def policy(self) -> BackendErrorPolicy:
        return self.rt.get.policy

    def stamp_keys(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], key: str
    ) -> list[str]:
        """The stamp keys (function, then tags) of the entry ``key`` of a call."""
        if not self._tag_has_fields:
            return self._static_stamps
        bound = self.keys.bind(args, kwargs)
        prefix = self._tag_prefix
        return [self._fn_stamp] + [
            stamp if t is None else prefix + t.render(bound) for stamp, t in self._tags
        ]

    def _grouped_stamp_keys(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], key: str
    ) -> list[str]:
        # stamp_keys on Redis Cluster: the copies in the entry's slot group
        ks = self.keyspace
        group = ks.group_of_key(key)
        assert group is not None  # built by a grouped KeyBuilder
        if not self._tag_has_fields:
            stamps = self._group_stamps.get(group)
            if stamps is None:
                stamps = self._group_stamps[group] = [
                    ks.function_stamp(self.name, group),
                    *(ks.tag_stamp(t, group) for t in self.options.tags),
                ]
            return stamps
        bound = self.keys.bind(args, kwargs)
        return [ks.function_stamp(self.name, group)] + [
            ks.tag_stamp(t.render(bound) if t.fields else t.template, group)
            for t in self._tag_templates
        ]

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        key = self.keys.build(args, kwargs)
        return Call(key, self.stamp_keys(args, kwargs, key), args, kwargs)

    def invalidate_all_flow(self) -> Flow[int]:
        """Delete the function's stamp (on a cluster: every group's copy)."""
        ks, cache = self.keyspace, self.cache
        metrics, written = cache.metrics, cache._local_written
        if ks.groups is None:
            return delete([self._fn_stamp], self.delete_guard, metrics, written)
        what = describe("function", [self.name])
        stamps = [ks.function_stamps(self.name)]
        return invalidate(stamps, self.delete_guard, what, ks.groups, metrics, written)

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


class _SyncHooks:
    """What the flows of a sync function ask of their mode (``_readthrough.Hooks``)."""

    __slots__ = ("spec",)

    def __init__(self, spec: CachedSpec) -> None:
        self.spec = spec

    def hold(self, lease_key: str, token: str, ttl: float, held: bool) -> Any:
        return self.spec.cache._leases.add(lease_key, token, ttl, held)

    def drop(self, lease: Any) -> None:
        self.spec.cache._leases.remove(lease)

    def refresh_later(self, call: Call) -> None:
        spec = self.spec
        with spec.flights_lock:
            if call.key in spec.refreshing:
                return
            spec.refreshing.add(call.key)
        rt, driver = spec.rt, spec.cache._driver

        def job() -> None:
            try:
                driver.drive(refresh(rt, call, self))
            finally:
                with spec.flights_lock:
                    spec.refreshing.discard(call.key)

        runner = spec.options.refresh_runner
        if runner is not None:
            runner(job)
        else:
            spec.cache._refresher.submit(job)


class _AsyncHooks(_SyncHooks):
    __slots__ = ()

    def hold(self, lease_key: str, token: str, ttl: float, held: bool) -> Any:
        # renewed on this loop, by its async client (a blocked loop loses its lease)
        loop = asyncio.get_running_loop()
        return self.spec.cache._leases.add(lease_key, token, ttl, held, loop=loop)

    def refresh_later(self, call: Call) -> None:
        spec = self.spec
        if call.key in spec.refreshing:
            return
        spec.refreshing.add(call.key)
        rt, adriver = spec.rt, spec.cache._adriver

        async def job() -> None:
            try:
                await adriver.drive(refresh(rt, call, self))
            finally:
                spec.refreshing.discard(call.key)

        runner = spec.options.refresh_runner
        if runner is not None:
            runner(job)
        else:
            task = asyncio.get_running_loop().create_task(job())
            spec.tasks.add(task)  # keep a reference until done (asyncio docs)
            task.add_done_callback(spec.tasks.discard)


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
        if self._bound is not _UNBOUND:
            args = (self._bound, *args)
        spec = self._spec
        tier = spec.local if spec.local_ready else spec.local_tier()
        if tier is not None and spec.local_fast and not kwargs:
            # the local hit: no key building, no Redis, no decoding (local-recipe.md)
            lk = args_key(spec, args)
            if lk is not None:
                value = tier.store.get(lk)
                if value is not MISSING:
                    spec.cache.metrics.cache_get(spec.name, "local_hit")
                    return value
        if spec.cache.breaker.blocked():  # outage: skip key building and Redis entirely
            # written out, calls counted: this path has a budget of 2.5 us
            if spec.fails_closed:
                spec.rt.skipped()  # counted, raises BackendUnavailableError
            start = perf_counter()
            try:
                value = spec.fn(*args, **kwargs)
            except BaseException:
                spec.bypassed(spec.name, "failure", perf_counter() - start)
                raise
            counted = spec.bypassed_ok  # one C call where the sink keeps no durations
            if counted is not None:
                counted()
            else:
                spec.bypassed(spec.name, "success", perf_counter() - start)
            return value
        key = spec.keys.build(args, kwargs)
        stamp_keys = spec.stamp_keys(args, kwargs, key)
        if spec.rt.stampede:
            return self._single_flight(Call(key, stamp_keys, args, kwargs))
        return self._fetch(key, stamp_keys, args, kwargs)

    def _fetch(
        self,
        key: str,
        stamp_keys: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        flight: Flight | None = None,
    ) -> Any:
        spec = self._spec
        rt, cache = spec.rt, spec.cache
        driver, clock = cache._driver, cache._clock
        tier = spec.local
        if tier is not None:
            call = Call(key, stamp_keys, args, kwargs)
            lk = spec.local_key(args, kwargs) or ("r", key)
            value = tier.store.get(lk)
            if value is not MISSING:  # other arguments: keyed by the Redis key
                rt.count("local_hit", flight)
                return value
            command, offset, token = spec.tracked(call, tier, lk)
            got = spec.seen_tracked(driver.execute(command), offset, tier, token, lk)
            if got is not BYPASS and got[1] is FRESH:
                rt.count("hit", flight)
                return got[0].value
            return driver.drive(read_through(rt, call, spec.hooks, flight, got))
        # The warm hit, written out: one MGET while Redis's clock is known, judged
        # without starting a flow (a generator and its driver cost ~2 us here). Any
        # other outcome continues in the flow with what was read: never read twice.
        seen: Any = None
        offset = clock.offset()
        if offset is not None:
            rows = driver.execute(Mget([key, *stamp_keys], rt.get))
            fresh, seen = rt.hit(rows, clock.monotonic() + offset, flight)
            if fresh:
                return seen
        call = Call(key, stamp_keys, args, kwargs)
        return driver.drive(read_through(rt, call, spec.hooks, flight, seen))

    def _single_flight(self, call: Call) -> Any:
        """Concurrent callers of one key in this process share one read and compute.

        The flight is registered before the read, so a cold stampede sends one MGET per
        process, not one per caller; the Event is made only when a follower arrives.
        """
        spec = self._spec
        key = call.key
        with spec.flights_lock:
            found = spec.flights.get(key)
            if found is None:
                flight = spec.flights[key] = Flight(call.stamp_keys)
            else:
                flight = found
                flight.followers += 1
                if flight.event is None:
                    flight.event = threading.Event()
        if found is not None:
            rt = spec.rt
            if not flight.event.wait(rt.freshness.wait):
                rt.wait_timed_out()
                rt.count("miss")
                with rt.loading():
                    return spec.fn(*call.args, **call.kwargs)
            rt.shared(flight.result)
            if flight.error is not None:
                raise flight.error
            return flight.value
        try:
            flight.value = self._fetch(
                key, call.stamp_keys, call.args, call.kwargs, flight
            )
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

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Recompute and store the entry for these arguments; return the new value."""
        spec = self._spec
        call = spec.call(self._args(args), kwargs)
        return spec.cache._driver.drive(load(spec.rt, call, spec.hooks))

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Delete the entry for these arguments; True if one was there.

        A call of these arguments that starts after this returns computes afresh; it
        never joins a computation in this process that began before (see module doc).
        """
        spec = self._spec
        key = spec.keys.build(self._args(args), kwargs)
        try:
            flow = delete(
                [key], spec.delete_guard, spec.cache.metrics, spec.cache._local_written
            )
            return bool(spec.cache._driver.drive(flow))
        finally:
            spec.detach(key=key)

    def invalidate_all(self) -> bool:
        """Drop every entry of this function in O(1) (its version stamp changes)."""
        spec = self._spec
        try:
            return bool(spec.cache._driver.drive(spec.invalidate_all_flow()))
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
        if self._bound is not _UNBOUND:
            args = (self._bound, *args)
        spec = self._spec
        tier = spec.local if spec.local_ready else spec.local_tier()
        if tier is not None and spec.local_fast and not kwargs:
            # the local hit: no key building, no Redis, no decoding (local-recipe.md)
            lk = args_key(spec, args)
            if lk is not None:
                value = tier.store.get(lk)
                if value is not MISSING:
                    spec.cache.metrics.cache_get(spec.name, "local_hit")
                    return value
        if spec.cache.breaker.blocked():  # outage: skip key building and Redis entirely
            # written out, calls counted: this path has a budget of 2.5 us
            if spec.fails_closed:
                spec.rt.skipped()  # counted, raises BackendUnavailableError
            start = perf_counter()
            try:
                value = await spec.fn(*args, **kwargs)
            except BaseException:
                spec.bypassed(spec.name, "failure", perf_counter() - start)
                raise
            counted = spec.bypassed_ok  # one C call where the sink keeps no durations
            if counted is not None:
                counted()
            else:
                spec.bypassed(spec.name, "success", perf_counter() - start)
            return value
        key = spec.keys.build(args, kwargs)
        stamp_keys = spec.stamp_keys(args, kwargs, key)
        if spec.rt.stampede:
            return await self._single_flight(Call(key, stamp_keys, args, kwargs))
        return await self._fetch(key, stamp_keys, args, kwargs)

    async def _fetch(
        self,
        key: str,
        stamp_keys: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        flight: Flight | None = None,
    ) -> Any:
        spec = self._spec
        rt, cache = spec.rt, spec.cache
        adriver, clock = cache._adriver, cache._clock
        tier = spec.local
        if tier is not None:  # see SyncCached._fetch
            call = Call(key, stamp_keys, args, kwargs)
            lk = spec.local_key(args, kwargs) or ("r", key)
            value = tier.store.get(lk)
            if value is not MISSING:
                rt.count("local_hit", flight)
                return value
            command, offset, token = spec.tracked(call, tier, lk)
            reply = await adriver.execute(command)
            got = spec.seen_tracked(reply, offset, tier, token, lk)
            if got is not BYPASS and got[1] is FRESH:
                rt.count("hit", flight)
                return got[0].value
            return await adriver.drive(read_through(rt, call, spec.hooks, flight, got))
        seen: Any = None  # the warm hit without a flow: see SyncCached._fetch
        offset = clock.offset()
        if offset is not None:
            rows = await adriver.execute(Mget([key, *stamp_keys], rt.get))
            fresh, seen = rt.hit(rows, clock.monotonic() + offset, flight)
            if fresh:
                return seen
        call = Call(key, stamp_keys, args, kwargs)
        return await adriver.drive(read_through(rt, call, spec.hooks, flight, seen))

    async def _single_flight(self, call: Call) -> Any:
        spec = self._spec
        key = call.key
        loop = asyncio.get_running_loop()
        # The last loop's flights first: a WeakKeyDictionary lookup is Python code. The
        # loop is held weakly (a dead loop must not stay alive) and compared by
        # identity (a recycled id() would hand a new loop a dead one's futures).
        last = spec.last_aflights
        if last is not None and last[0]() is loop:
            flights = last[1]
        else:
            known = spec.aflights.get(loop)
            if known is None:
                with spec.flights_lock:  # once per loop; detach() iterates the loops
                    known = spec.aflights.setdefault(loop, {})
            flights = known
            spec.last_aflights = (weakref.ref(loop), flights)
        found = flights.get(key)
        if found is not None:
            # the leader makes no future: the first follower does (one loop is one
            # thread: the leader cannot finish between this check and its use)
            future = found.future
            if future is None:
                future = found.future = loop.create_future()
            found.followers += 1
            rt = spec.rt
            try:
                value = await asyncio.wait_for(
                    asyncio.shield(future), timeout=rt.freshness.wait
                )
            except asyncio.TimeoutError:
                rt.wait_timed_out()
                rt.count("miss")
                with rt.loading():
                    return await spec.fn(*call.args, **call.kwargs)
            except BaseException:
                if future.done() and not future.cancelled():
                    rt.shared(found.result)  # the leader's error, shared
                raise
            if value is _LEADER_CANCELLED:
                # the leader's task was cancelled, not ours: fetch for ourselves
                return await self._single_flight(call)
            rt.shared(found.result)
            return value
        flight = Flight(call.stamp_keys)
        flights[key] = flight
        try:
            value = await self._fetch(
                key, call.stamp_keys, call.args, call.kwargs, flight
            )
        except asyncio.CancelledError:
            future = flight.future
            if future is not None and not future.done():
                future.set_result(_LEADER_CANCELLED)
            raise
        except BaseException as exc:
            future = flight.future
            if future is not None and not future.done():
                future.set_exception(exc)
                future.exception()  # mark retrieved: no "never retrieved" warning
            raise
        else:
            future = flight.future
            if future is not None:
                future.set_result(value)
            return value
        finally:
            if flights.get(key) is flight:  # not a newer one (after a detach)
                del flights[key]

    async def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Recompute and store the entry for these arguments; return the new value."""
        spec = self._spec
        call = spec.call(self._args(args), kwargs)
        return await spec.cache._adriver.drive(load(spec.rt, call, spec.hooks))

    async def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Delete the entry for these arguments; True if one was there (see the sync
        twin: later callers never join an earlier computation)."""
        spec = self._spec
        key = spec.keys.build(self._args(args), kwargs)
        try:
            flow = delete(
                [key], spec.delete_guard, spec.cache.metrics, spec.cache._local_written
            )
            return bool(await spec.cache._adriver.drive(flow))
        finally:
            spec.detach(key=key)

    async def invalidate_all(self) -> bool:
        """Drop every entry of this function in O(1) (its version stamp changes)."""
        spec = self._spec
        try:
            return bool(await spec.cache._adriver.drive(spec.invalidate_all_flow()))
        finally:
            spec.detach()
