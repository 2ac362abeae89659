"""``Cache``: one object for sync and async code.

Sync operations and their ``a``-prefixed async twins sit next to each other and share
every decision with the pure core (keys, envelope, failure policy); they differ only in
``self._sync.run(...)`` versus ``await self._async.run(...)``.
"""

from __future__ import annotations

import inspect
import secrets
import threading
import time
import weakref
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Hashable,
    Iterable,
    Mapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, cast, overload

import redis
import redis.asyncio
import redis.cluster

from rcache._admin import (
    DEFAULT_BATCH,
    DEFAULT_SAMPLE,
    CacheStats,
    ClearResult,
    LockInfo,
    OnBatch,
    clear_flow,
    locks_flow,
    stats_flow,
)
from rcache._batch import BatchSpec, make_batch
from rcache._breaker import CircuitBreaker
from rcache._cache_protocol import CACHE_RENEW
from rcache._cluster import GroupsRecord, describe, invalidate
from rcache._config import (
    TX_MAX_TIME,
    TX_RETRIES,
    BackendErrorPolicy,
    BreakerPolicy,
    CachedOptions,
    Duration,
    RetryPolicy,
    TxOptions,
    check_policy,
    parse_duration,
    ttl_ms,
)
from rcache._decorated import AsyncCached, CachedSpec, RefreshPool, SyncCached
from rcache._exceptions import (
    BackendError,
    ConfigurationError,
    RCacheError,
)
from rcache._flow import AsyncDriver, Flow, Run, SyncDriver
from rcache._keys import KeyBuilder, KeySpace
from rcache._leases import KeyLeases
from rcache._local import LocalTier, resolve_local
from rcache._lock import (
    Lock,
    LockedDecorator,
    LockedKwargs,
    LockKwargs,
    RWLock,
    Semaphore,
    make_lock,
    make_locked,
    make_rwlock,
    make_semaphore,
)
from rcache._logging import RateLimitedLog, cache_log
from rcache._metrics import InMemoryMetrics, MetricsSink
from rcache._policy import BYPASS, MISSING, Failures, Guard
from rcache._readthrough import ServerClock, decode, undecodable
from rcache._readthrough import delete as delete_flow
from rcache._redis import (
    AsyncRedis,
    ClientSpec,
    SyncRedis,
    adiagnose,
    diagnose,
)
from rcache._serializers import (
    Envelope,
    Serializer,
    UndecodableError,
    encode_envelope,
    resolve_serializer,
)
from rcache._slots import DEFAULT_GROUPS, check_groups
from rcache._tracking import (
    ClusterReader,
    Tier,
    TrackedReader,
    server_key,
    tracking_supported,
)
from rcache._tracking import attach as tracking_attach
from rcache._tracking import guard_for as tracking_guard
from rcache._tracking import is_active as tracking_active
from rcache._tracking import reader_for as tracking_reader
from rcache._transaction import (
    Script,
    TransactionStats,
    transaction_flow,
    update_flow,
)
from rcache._typed import caller_namespace, typed_values
from rcache._types import AsyncCachedFunction, CachedFunction, P, R

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline as AsyncPipeline
    from redis.client import Pipeline
    from typing_extensions import Unpack

__all__ = ["BYPASS", "Cache"]

#: the options of ``local=True`` on a Cache created without ``local=``
_DEFAULT_LOCAL = LocalTier()
#: How long ``aclose`` waits for this loop's lock clean-ups (each is one or two
#: commands, bounded by the socket timeout) before cancelling them.
_SETTLE_S = 3.0


class _CachedDecorator(Protocol):
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncCachedFunction[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> CachedFunction[P, R]: ...


F = TypeVar("F")
V = TypeVar("V")


class Cache:
    """A Redis-backed cache for sync and async code.

    :param url: ``redis://``, ``rediss://``, ``unix://`` or ``memory://`` (embedded,
        in-process, same semantics including Lua);
        ``redis+sentinel://host:26379,host2:26379/service_name/0`` (the primary that
        the sentinels name, followed across failovers); ``redis+cluster://host:7000,
        host2:7001`` (Redis Cluster: every cache key carries a slot group's hash tag,
        see ``slot_groups``).
        Default: ``$RCACHE_URL``, else ``$REDIS_URL``, read at first use (not here),
        else ``redis://127.0.0.1:6379/0`` with one WARNING saying so. Settings can also
        come later, before first use, from :meth:`configure` (or a framework's
        ``init_app``).
    :param prefix: first part of every Redis key this cache writes; ``cache.keyspace``
        (a :class:`rcache.spi.KeySpace`) names each of them.
    :param ttl: default time to live for ``set`` and ``@cached`` (seconds, ``"10m"``, or
        a timedelta); without it each call site must give one.
    :param client: a ``redis.Redis`` to use instead of a URL (also
        ``Sentinel.master_for(...)`` or a ``redis.cluster.RedisCluster``; rcache builds
        their asyncio twins itself); ``async_client`` a factory of
        ``redis.asyncio.Redis`` (called once per event loop).
    :param serializer: ``"json"`` (default), ``"msgpack"`` or a Serializer, e.g.
        ``PickleSerializer(secret=...)``.
    :param on_backend_error: ``"bypass"`` (default): a failing Redis is skipped (the
        function runs, a WARNING at most every 30 s, the error counted); ``"raise"``.
    :param retry: RetryPolicy for transient errors.
    :param breaker: BreakerPolicy, the circuit breaker for connection errors.
    :param metrics: a metrics sink such as ``rcache.metrics.PrometheusMetrics``;
        default ``InMemoryMetrics``.
    :param redis_options: extra keyword arguments for the redis-py clients.
    :param lock_url: keep locks, RW locks and semaphores on this Redis instead (same
        prefix and options): a cache server with an evicting ``maxmemory-policy`` can
        evict a held lock, a lock server should run ``noeviction``.
    :param slot_groups: on Redis Cluster, how many hash-tag groups (B) the cache
        entries are spread over (default 256, from 1 to 16384; ignored elsewhere). An
        entry's keys share its group's slot, so a hit stays one MGET; invalidating a
        tag or a function deletes its stamp's copy in every group (O(B): 2 to 3.5 ms
        for 256 on three primaries). Every process must use the same B: it is recorded
        in Redis at first use (``{prefix}:cluster:groups``) and another B is refused.
    :param local: the local (in-process) tier by default for :meth:`get` and
        ``@cache.cached``: ``True`` or a :class:`LocalTier` with its bounds. Hits are
        served from process memory, dropped by Redis's invalidation messages when any
        client writes (README "The local tier"; on Redis Cluster a listener per
        primary). Default off; ``get(key, local=...)`` and ``cached(local=...)``
        choose per call site.

    Nothing connects until the first operation; sync clients are made lazily in the
    process that uses them, async clients once per event loop.

    Example::

        cache = rcache.Cache("redis://127.0.0.1:6379/0", prefix="shop")

        @cache.cached(ttl="10m")
        def get_user(user_id: int) -> dict: ...
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = "rcache",
        ttl: Duration | None = None,
        client: redis.Redis | redis.cluster.RedisCluster | None = None,
        async_client: Callable[[], redis.asyncio.Redis] | None = None,
        serializer: str | Serializer = "json",
        on_backend_error: BackendErrorPolicy = "bypass",
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
        metrics: MetricsSink | None = None,
        redis_options: Mapping[str, Any] | None = None,
        name: str | None = None,
        lock_url: str | None = None,
        slot_groups: int | None = None,
        local: LocalTier | bool | None = None,
    ) -> None:
        self._log = RateLimitedLog(cache_log)
        # computation leases, renewed by the process's lease renewer through this
        # cache's sync driver, or its async one on the computing loop
        self._leases = KeyLeases(CACHE_RENEW, self, cache_log)
        # background refreshes of stale entries (sync functions): a few threads at most,
        # started on first use
        self._refresher = RefreshPool()
        # the decorated functions of this cache, whose in-flight computations an
        # invalidation detaches (read-your-invalidations, item 7)
        self._specs: weakref.WeakSet[CachedSpec] = weakref.WeakSet()
        # every decorated function's spec, so that configure() before first use reaches
        # functions decorated at import (spec.rebase() follows the new settings)
        self._decorated: weakref.WeakSet[CachedSpec | BatchSpec] = weakref.WeakSet()
        self.default_ttl: float | None = None
        self.metrics: MetricsSink = InMemoryMetrics()
        self._settings: dict[str, Any] = {}
        self._apply(
            url=url,
            prefix=prefix,
            ttl=ttl,
            client=client,
            async_client=async_client,
            serializer=serializer,
            on_backend_error=on_backend_error,
            retry=retry,
            breaker=breaker,
            metrics=metrics,
            redis_options=redis_options,
            name=name,
            lock_url=lock_url,
            slot_groups=slot_groups,
            local=local,
        )

    def configure(
        self,
        *,
        url: str | None = None,
        prefix: str | None = None,
        ttl: Duration | None = None,
        client: redis.Redis | redis.cluster.RedisCluster | None = None,
        async_client: Callable[[], redis.asyncio.Redis] | None = None,
        serializer: str | Serializer | None = None,
        on_backend_error: BackendErrorPolicy | None = None,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
        metrics: MetricsSink | None = None,
        redis_options: Mapping[str, Any] | None = None,
        name: str | None = None,
        lock_url: str | None = None,
        slot_groups: int | None = None,
        local: LocalTier | bool | None = None,
        force: bool = False,
    ) -> Cache:
        """Set options after construction, before first use (e.g. in an app factory).

        ``cache = rcache.Cache()`` at import time, then ``cache.configure(url=...,
        prefix=...)`` once the settings are known; the parameters are those of
        :class:`Cache` and ``None`` leaves a setting as it is. Functions already
        decorated with ``@cache.cached`` follow the new prefix, and the new default
        ``ttl``/``on_backend_error`` unless they set their own. Lock objects made
        before ``configure()`` keep the prefix they were made with: create them after
        configuring, or use ``@cache.locked`` (which makes them per call).

        :param force: allow reconfiguring a cache that has already connected (for
            tests): its clients are dropped and made again from the new settings.
        :raises ConfigurationError: the cache was already used and ``force`` is
            false and a setting changes, or a setting is invalid (nothing is
            changed then). Configuring the same settings again is a no-op.
        :returns: the cache, so that ``cache = Cache().configure(...)`` reads well.
        """
        settings = self._merged_settings(
            url=url,
            prefix=prefix,
            ttl=ttl,
            client=client,
            async_client=async_client,
            serializer=serializer,
            on_backend_error=on_backend_error,
            retry=retry,
            breaker=breaker,
            metrics=metrics,
            redis_options=redis_options,
            name=name,
            lock_url=lock_url,
            slot_groups=slot_groups,
            local=local,
        )
        if settings == self._settings:
            return self  # nothing changes: a second init_app with the same config
        if self._spec.used and not force:
            raise ConfigurationError(
                f"cache {self.name!r} is already in use (connected to "
                f"{self._spec.describe()}); configure it before its first operation "
                "(in the app factory or at start-up), or pass force=True in tests"
            )
        if self._spec.used:
            self._sync.close()
            if isinstance(self._lock_cache, Cache):
                self._lock_cache.close()
        self._close_local()
        self._apply(**settings)
        return self

    def _merged_settings(self, **given: Any) -> dict[str, Any]:
        """The current settings with the non-None ones of ``given`` put over them."""
        settings = {
            **self._settings,
            **{k: v for k, v in given.items() if v is not None},
        }
        if given["url"] is not None:  # a URL replaces a client given before, and back
            settings["client"] = None
        elif given["client"] is not None:
            settings["url"] = None
        return settings

    def _apply(
        self,
        *,
        url: str | None,
        prefix: str,
        ttl: Duration | None,
        client: redis.Redis | redis.cluster.RedisCluster | None,
        async_client: Callable[[], redis.asyncio.Redis] | None,
        serializer: str | Serializer,
        on_backend_error: BackendErrorPolicy,
        retry: RetryPolicy | None,
        breaker: BreakerPolicy | None,
        metrics: MetricsSink | None,
        redis_options: Mapping[str, Any] | None,
        name: str | None,
        lock_url: str | None,
        slot_groups: int | None = None,
        local: LocalTier | bool | None = None,
    ) -> None:
        """Validate every setting first, then switch to them (all or nothing)."""
        if (
            not isinstance(prefix, str)
            or not prefix
            or any(c.isspace() for c in prefix)
        ):
            raise ConfigurationError(
                f"prefix must be a non-empty string without spaces, got {prefix!r}: "
                'write prefix="myapp"'
            )
        check_policy(on_backend_error)
        default_ttl = None if ttl is None else parse_duration(ttl)
        resolved_serializer = resolve_serializer(serializer)
        retry_policy = retry or RetryPolicy()
        spec = ClientSpec(
            url, client=client, async_client=async_client, options=redis_options
        )
        groups = check_groups(DEFAULT_GROUPS if slot_groups is None else slot_groups)
        # Redis Cluster: cache keys carry slot groups (the mode is explicit in the URL
        # or client, read now); this also refuses a prefix with braces there
        keyspace = KeySpace(prefix, groups if spec.cluster else None)
        record = (
            None
            if keyspace.groups is None
            else GroupsRecord(keyspace.groups_record(), groups, prefix)
        )
        local = resolve_local(local)
        if local and not spec.memory:
            why = tracking_supported(spec)
            if why is not None:
                raise ConfigurationError(why)
        sink: MetricsSink = metrics if metrics is not None else self.metrics
        # behind Sentinel, probe every reset_after: a failover ends at once (_breaker)
        circuit = CircuitBreaker(
            breaker or BreakerPolicy(), steady=lambda: spec.sentinel
        )
        # Locks on their own server (issue 14: eviction on a cache server took a held
        # lock): a lock-only Cache with the same prefix, options and metrics.
        lock_cache = (
            None
            if lock_url is None
            else Cache(
                lock_url,
                prefix=prefix,
                retry=retry_policy,
                metrics=sink,
                redis_options=redis_options,
                name=name or prefix,
                slot_groups=slot_groups,
            )
        )
        self._settings = {
            "url": url,
            "prefix": prefix,
            "ttl": ttl,
            "client": client,
            "async_client": async_client,
            "serializer": serializer,
            "on_backend_error": on_backend_error,
            "retry": retry,
            "breaker": breaker,
            "metrics": metrics,
            "redis_options": redis_options,
            "name": name,
            "lock_url": lock_url,
            "slot_groups": slot_groups,
            "local": local,
        }
        self._lock_cache = lock_cache
        self.prefix = prefix
        self.name = name or prefix
        self.default_ttl = default_ttl
        self.serializer = resolved_serializer
        self.on_backend_error: BackendErrorPolicy = on_backend_error
        self.retry = retry_policy
        self._spec = spec
        # Redis's clock, from the last TIME seen: freshness follows Redis's clock, not
        # this host's (issue 14 item 6)
        self._clock = ServerClock()
        self._sync = SyncRedis(spec, retry_policy, record)
        self._async = AsyncRedis(spec, retry_policy, record)
        self.metrics = sink
        self.breaker = circuit
        self._failures = Failures(circuit, sink, spec.describe, self._log)
        self.breaker.on_change = lambda state: self._failures.breaker_changed(
            state, self.name
        )
        self._driver = SyncDriver(self._sync, self._failures)
        self._adriver = AsyncDriver(self._async, self._failures)
        self.keyspace = keyspace
        self._explicit_prefix = keyspace.explicit_prefix
        # per-call key functions chosen here: the single-primary ones pay nothing for
        # slot groups
        if keyspace.groups is None:
            self._tag_prefix = keyspace.tag_prefix
            self._key = self._plain_key
        else:
            self._key = self._grouped_key
        # the local tier: the default options (None: off unless asked per call site),
        # the Cache's shared tier and per-function ones, made on first use
        self._local_default: LocalTier | None = (
            local if isinstance(local, LocalTier) else LocalTier() if local else None
        )
        self._local_shared: Tier | None = None
        self._local_reader: TrackedReader | ClusterReader | None = None
        self._local_tiers: list[Tier] = []
        self._local_key: Hashable | None = None
        self._local_lock = threading.Lock()
        self.metrics.register_cache(self.name)
        for decorated in list(self._decorated):
            decorated.rebase()

    def __repr__(self) -> str:
        return f"Cache({self._spec.describe()!r}, prefix={self.prefix!r})"

    @property
    def is_memory(self) -> bool:
        """True for the embedded ``memory://`` backend."""
        return self._spec.memory

    @property
    def is_cluster(self) -> bool:
        """True on Redis Cluster (``redis+cluster://`` or a RedisCluster client)."""
        return self._spec.cluster

    def _undecodable(self, name: str, exc: UndecodableError) -> None:
        undecodable(self.metrics, self._log, name, exc)

    def _decode(self, name: str, raw: bytes) -> Any:
        """The cached value, or MISSING when ``raw`` cannot be decoded."""
        env = self._envelope(name, raw)
        return MISSING if env is None else env.value

    def _envelope(
        self, name: str, raw: bytes, serializer: Serializer | None = None
    ) -> Envelope | None:
        return decode(self, name, raw, serializer or self.serializer)

    def tag_key(self, tag: str, group: int | None = None) -> str:
        """The Redis key of a tag's version stamp (on Redis Cluster, ``group``'s copy)."""
        if group is None:
            return self._tag_prefix + tag
        return self.keyspace.tag_stamp(tag, group)

    # -- the local tier (rcache._local, rcache._tracking) -------------------------------

    def _local_option(self, local: LocalTier | bool | None) -> LocalTier | None:
        """The options a call site's ``local=`` means: None (the default) follows
        ``Cache(local=...)``; True the Cache's options (or the defaults); False off."""
        if local is None:
            return self._local_default
        if local is True:
            return self._local_default or _DEFAULT_LOCAL
        if local is False:
            return None
        return local

    def _local_tier(
        self, options: LocalTier | None, name: str | None = None
    ) -> Tier | None:
        """The tier for ``options``: the Cache's shared one for its default options
        (or ``local=True``), else a store of its own for ``name`` (a function with its
        own LocalTier); made on first use, when the listener starts. None: off (no
        options, or ``memory://``, whose store is in-process already)."""
        if options is None:
            return None
        shared = options is self._local_default or options is _DEFAULT_LOCAL
        if shared and self._local_shared is not None:
            return self._local_shared
        if self._spec.memory:
            return None
        with self._local_lock:
            if shared and self._local_shared is not None:  # another thread made it
                return self._local_shared
            store, listener = tracking_attach(
                self._spec, options, self.name if shared else name or self.name,
                self.metrics,
            )  # fmt: skip
            if self._local_reader is None:
                self._local_reader = tracking_reader(self._spec, listener)
            tier = Tier(store, self._local_reader, listener)
            if shared:
                self._local_shared = tier
            self._local_tiers.append(tier)
            return tier

    def _local_written(self, keys: Sequence[str]) -> None:
        """This process wrote (or deleted) ``keys``: drop its local copies now, in every
        tier reading this server, and refuse the reads of them in flight. Redis's own
        invalidation follows; this makes a write read its own result at once."""
        key = self._local_key
        if key is None:
            if not self._local_tiers and not tracking_active():
                return  # no local tier anywhere in this process
            key = self._local_key = server_key(self._spec)
        guard = tracking_guard(key)
        if guard is not None:
            guard.invalidate(keys, received=False)

    def _close_local(self) -> None:
        for tier in getattr(self, "_local_tiers", ()):
            tier.store.close()
        self._local_tiers = []
        self._local_shared = None
        reader = getattr(self, "_local_reader", None)
        if reader is not None:
            reader.close()
        self._local_reader = None

    def _local_get_flow(self, tier: Tier, key: str, default: Any) -> Flow[Any]:
        full = self._key(key)
        store = tier.store
        token = store.begin((full,))
        raw = yield tier.read(token, ("GET", full), self._guard("get"))
        env = None if raw is None or raw is BYPASS else self._envelope(self.name, raw)
        if env is None:
            self.metrics.cache_get(self.name, "miss")
            return default
        self.metrics.cache_get(self.name, "hit")
        # the entry's own expiry, on this process's monotonic clock
        left = env.fresh_until - self._clock.now()
        store.store(
            token, key, env.value, expires_at=time.monotonic() + left, nbytes=len(raw)
        )
        return env.value

    # -- explicit operations ----------------------------------------------------------

    #: the full Redis key of an explicit key: one of the two below (set in _apply)
    _key: Callable[[str], str]

    def _plain_key(self, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"cache keys are non-empty strings, got {key!r}")
        return self._explicit_prefix + key

    def _grouped_key(self, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"cache keys are non-empty strings, got {key!r}")
        return self.keyspace.explicit(key)

    def _ttl(self, ttl: Duration | None) -> float:
        if ttl is None:
            if self.default_ttl is None:
                raise ConfigurationError(
                    "no ttl: pass ttl=60 (seconds) or ttl='10m', or create the cache "
                    "with Cache(..., ttl=...)"
                )
            return self.default_ttl
        return parse_duration(ttl)

    def _encode(self, value: Any, ttl: float) -> bytes:
        return encode_envelope(self.serializer, value, fresh_for=ttl)

    def _guard(self, operation: str) -> Guard:
        return Guard(self.name, operation, self.on_backend_error)

    def _found(self, raw: Any) -> Any:
        """Count a read of an explicit key; the value, or MISSING."""
        value = (
            MISSING if raw is None or raw is BYPASS else self._decode(self.name, raw)
        )
        self.metrics.cache_get(self.name, "miss" if value is MISSING else "hit")
        return value

    def _get_flow(self, key: str, default: Any) -> Flow[Any]:
        full = self._key(key)
        value = self._found((yield Run(lambda c: c.get(full), self._guard("get"))))
        return default if value is MISSING else value

    def get(self, key: str, default: Any = None, *, local: bool | None = None) -> Any:
        """The value stored under ``key``, or ``default`` on a miss (or a bypassed error).

        :param local: serve it from the local tier (``True``, or a default set by
            ``Cache(local=...)``; ``False``: always ask Redis). A local hit returns the
            object stored in this process (unless ``LocalTier(copy=True)``): do not
            mutate it.
        """
        if local is False or (local is None and self._local_default is None):
            return self._driver.drive(self._get_flow(key, default))
        tier = self._local_shared or self._local_tier(self._local_option(local))
        if tier is None:  # memory://
            return self._driver.drive(self._get_flow(key, default))
        value = tier.store.get(key)
        if value is not MISSING:
            self.metrics.cache_get(self.name, "local_hit")
            return value
        return self._driver.drive(self._local_get_flow(tier, key, default))

    async def aget(
        self, key: str, default: Any = None, *, local: bool | None = None
    ) -> Any:
        """Async twin of :meth:`get`."""
        if local is False or (local is None and self._local_default is None):
            return await self._adriver.drive(self._get_flow(key, default))
        tier = self._local_shared or self._local_tier(self._local_option(local))
        if tier is None:  # memory://
            return await self._adriver.drive(self._get_flow(key, default))
        value = tier.store.get(key)
        if value is not MISSING:
            self.metrics.cache_get(self.name, "local_hit")
            return value
        return await self._adriver.drive(self._local_get_flow(tier, key, default))

    def _set_flow(self, key: str, value: Any, ttl: Duration | None) -> Flow[bool]:
        seconds = self._ttl(ttl)
        data = self._encode(value, seconds)
        full, px = self._key(key), ttl_ms(seconds)
        try:
            done = yield Run(lambda c: c.set(full, data, px=px), self._guard("set"))
        finally:
            self._local_written((full,))
        if done is BYPASS:
            return False
        self.metrics.cache_put(self.name)
        return True

    def set(self, key: str, value: Any, ttl: Duration | None = None) -> bool:
        """Store ``value`` (``None`` included) for ``ttl``; False if the write was bypassed.

        :raises SerializationError: the serializer cannot encode ``value``.
        """
        return self._driver.drive(self._set_flow(key, value, ttl))

    async def aset(self, key: str, value: Any, ttl: Duration | None = None) -> bool:
        """Async twin of :meth:`set`."""
        return await self._adriver.drive(self._set_flow(key, value, ttl))

    def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""
        flow = delete_flow(
            [self._key(key)], self._guard("delete"), self.metrics, self._local_written
        )
        return bool(self._driver.drive(flow))

    async def adelete(self, key: str) -> bool:
        """Async twin of :meth:`delete`."""
        flow = delete_flow(
            [self._key(key)], self._guard("delete"), self.metrics, self._local_written
        )
        return bool(await self._adriver.drive(flow))

    def invalidate_tags(self, *tags: str) -> int:
        """Invalidate every entry computed under any of ``tags``: O(1) per tag.

        Deletes the tags' version stamps; entries that recorded the old stamps read as
        misses from then on and expire by their TTL. No tag sets, no KEYS, no SCAN.
        Returns how many tags had a stamp. A call that starts after this returns never
        joins a computation of this process that began before it (read your own
        invalidations); computations elsewhere store nothing under the old stamps.
        """
        keys, flow = self._tag_invalidation(tags)
        try:
            return self._driver.drive(flow)
        finally:
            self._detach_tags(keys)

    async def ainvalidate_tags(self, *tags: str) -> int:
        """Async twin of :meth:`invalidate_tags`."""
        keys, flow = self._tag_invalidation(tags)
        try:
            return await self._adriver.drive(flow)
        finally:
            self._detach_tags(keys)

    def _tag_invalidation(self, tags: Sequence[str]) -> tuple[list[str], Flow[int]]:
        """(every stamp key, the flow that deletes them): one DEL on one primary; on a
        cluster every slot group's copy, and a failure raises (``_cluster.invalidate``).
        """
        guard, groups = self._guard("delete"), self.keyspace.groups
        if groups is None:
            keys = [self._tag_prefix + t for t in tags]
            return keys, delete_flow(keys, guard, None, self._local_written)
        stamps = [self.keyspace.tag_stamps(t) for t in tags]
        keys = [k for copies in stamps for k in copies]
        what = describe("tag", list(tags))
        flow = invalidate(stamps, guard, what, groups, None, self._local_written)
        return keys, flow

    def _detach_tags(self, stamp_keys: list[str]) -> None:
        """Detach this process's in-flight computations under these tag stamps."""
        if not stamp_keys:
            return
        for spec in list(self._specs):
            if spec.options.tags:
                spec.detach(stamp_keys=stamp_keys)

    # -- batches: one round trip each ---------------------------------------------------

    def _mget(self, client: Any, keys: list[str]) -> Any:
        # On a cluster, get_many's keys span slots: redis-py splits the read into one
        # MGET per slot (explicit keys of one slot group share one), pipelined per
        # node; not atomic across slots, as explicit keys need not be.
        return client.mget_nonatomic(keys) if self._spec.cluster else client.mget(keys)

    def _get_many_flow(self, keys: Iterable[str]) -> Flow[dict[str, Any]]:
        keys = list(keys)
        if not keys:
            return {}
        full = [self._key(k) for k in keys]
        rows = yield Run(lambda c: self._mget(c, full), self._guard("get"))
        if rows is BYPASS:
            return {}
        out: dict[str, Any] = {}
        for key, raw in zip(keys, rows, strict=True):
            value = self._found(raw)
            if value is not MISSING:
                out[key] = value
        return out

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The present entries among ``keys`` (missing ones are left out), one MGET."""
        return self._driver.drive(self._get_many_flow(keys))

    async def aget_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Async twin of :meth:`get_many`."""
        return await self._adriver.drive(self._get_many_flow(keys))

    @staticmethod
    def _pipe_set(client: Any, items: list[tuple[str, bytes]], px: int) -> Any:
        pipe = client.pipeline(transaction=False)
        for key, data in items:
            pipe.set(key, data, px=px)
        return pipe.execute()

    def _set_many_flow(
        self, mapping: Mapping[str, Any], ttl: Duration | None
    ) -> Flow[bool]:
        seconds = self._ttl(ttl)
        items = [(self._key(k), self._encode(v, seconds)) for k, v in mapping.items()]
        if not items:
            return True
        px = ttl_ms(seconds)
        try:
            done = yield Run(lambda c: self._pipe_set(c, items, px), self._guard("set"))
        finally:
            self._local_written([k for k, _ in items])
        if done is BYPASS:
            return False
        for _ in items:
            self.metrics.cache_put(self.name)
        return True

    def set_many(self, mapping: Mapping[str, Any], ttl: Duration | None = None) -> bool:
        """Store every item of ``mapping`` for ``ttl``, in one pipelined round trip."""
        return self._driver.drive(self._set_many_flow(mapping, ttl))

    async def aset_many(
        self, mapping: Mapping[str, Any], ttl: Duration | None = None
    ) -> bool:
        """Async twin of :meth:`set_many`."""
        return await self._adriver.drive(self._set_many_flow(mapping, ttl))

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete ``keys`` in one command; returns how many existed."""
        full = [self._key(k) for k in keys]
        return self._driver.drive(
            delete_flow(full, self._guard("delete"), None, self._local_written)
        )

    async def adelete_many(self, keys: Iterable[str]) -> int:
        """Async twin of :meth:`delete_many`."""
        full = [self._key(k) for k in keys]
        return await self._adriver.drive(
            delete_flow(full, self._guard("delete"), None, self._local_written)
        )

    def ping(self) -> bool:
        """True if Redis answers (never raises; does not touch the breaker).

        ``False`` does not say why: :meth:`check` does.
        """
        try:
            return bool(self._sync.run(lambda c: c.ping(), retry=False))
        except RCacheError:
            return False

    async def aping(self) -> bool:
        """Async twin of :meth:`ping`."""
        try:
            return bool(await self._async.run(lambda c: c.ping(), retry=False))
        except RCacheError:
            return False

    def _checked(self, exc: RCacheError) -> RCacheError:
        if isinstance(exc, BackendError):
            return type(exc)(f"{self._spec.describe()}: {exc.message}", exc.original)
        return exc

    def check(self) -> str:
        """Say whether rcache can work with this Redis, and if not, why.

        Connects (authentication, database selection), then reads, writes and deletes
        a probe key under this cache's prefix, runs a Lua script and blocks for 10 ms
        in BLMOVE: everything cached calls, locks and stampede waits need. No retry,
        and the circuit breaker is not touched. Use it at start-up or in a health
        endpoint; :meth:`ping` only says yes or no.

        :returns: a one-line summary, e.g. ``"Redis 7.2.4, db 0: connect, read,
            write, Lua scripts and blocking commands work"``.
        :raises BackendMisconfiguredError: a problem no retry fixes (wrong password or
            database, missing ACL permission, unknown command...), with what to change.
        :raises BackendUnavailableError: Redis cannot be reached (refused, timed out).
        :raises BackendError: any other error reply.
        """
        probe = self.keyspace.probe(secrets.token_hex(4))
        try:
            return self._sync.run(lambda c: diagnose(c, probe), retry=False)
        except RCacheError as exc:
            raise self._checked(exc) from exc.__cause__

    async def acheck(self) -> str:
        """Async twin of :meth:`check`."""
        probe = self.keyspace.probe(secrets.token_hex(4))
        try:
            return await self._async.run(lambda c: adiagnose(c, probe), retry=False)
        except RCacheError as exc:
            raise self._checked(exc) from exc.__cause__

    def close(self) -> None:
        """Close the sync client (it is made again on next use), and the local tier:
        its entries are dropped and its listener closes once no tier uses it."""
        self._sync.close()
        if isinstance(self._lock_cache, Cache):
            self._lock_cache.close()
        self._close_local()

    async def aclose(self) -> None:
        """Close the current event loop's async client, once this loop's lock
        clean-ups (a cancelled waiter withdrawing, a shielded release) have finished:
        up to a few seconds, then they are cancelled (their keys expire by TTL)."""
        await self._adriver.settle(_SETTLE_S)
        await self._async.aclose()
        if isinstance(self._lock_cache, Cache):
            await self._lock_cache.aclose()
        if self._local_reader is not None:
            await self._local_reader.aclose()

    # -- transactions and scripts (rcache._transaction) -------------------------------

    def transaction(
        self,
        fn: Callable[[Pipeline], object],
        *,
        watch: Sequence[str | bytes] = (),
        retries: int = TX_RETRIES,
        max_time: Duration = TX_MAX_TIME,
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
        options = TxOptions.of(retries, max_time)
        flow = transaction_flow(self, fn, watch, prefixed, options, stats)
        return self._driver.drive(flow)

    async def atransaction(
        self,
        fn: Callable[[AsyncPipeline], Awaitable[object]],
        *,
        watch: Sequence[str | bytes] = (),
        retries: int = TX_RETRIES,
        max_time: Duration = TX_MAX_TIME,
        prefixed: bool = False,
        stats: TransactionStats | None = None,
    ) -> list[Any]:
        """Async twin of :meth:`transaction`: ``fn`` is ``async def fn(pipe)`` over a
        ``redis.asyncio`` pipeline (``await pipe.get(...)``; ``pipe.multi()`` and the
        queued writes are not awaited)."""
        options = TxOptions.of(retries, max_time)
        flow = transaction_flow(self, fn, watch, prefixed, options, stats)
        return await self._adriver.drive(flow)

    def update(
        self,
        key: str,
        fn: Callable[[Any], V],
        ttl: Duration | None = None,
        *,
        retries: int = TX_RETRIES,
        max_time: Duration = TX_MAX_TIME,
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
        options = TxOptions.of(retries, max_time)
        return self._driver.drive(update_flow(self, key, fn, ttl, options, stats))

    async def aupdate(
        self,
        key: str,
        fn: Callable[[Any], V],
        ttl: Duration | None = None,
        *,
        retries: int = TX_RETRIES,
        max_time: Duration = TX_MAX_TIME,
        stats: TransactionStats | None = None,
    ) -> V:
        """Async twin of :meth:`update`. ``fn`` is a plain function (it only computes
        the new value; it may run several times)."""
        options = TxOptions.of(retries, max_time)
        return await self._adriver.drive(
            update_flow(self, key, fn, ttl, options, stats)
        )

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
        s = Script(self._driver, self._adriver, source, idempotent=idempotent)
        if load:
            s.load()
        return s

    async def ascript(
        self, source: str, *, idempotent: bool = False, load: bool = False
    ) -> Script:
        """Async twin of :meth:`script` (``load=True`` loads with the async client)."""
        s = Script(self._driver, self._adriver, source, idempotent=idempotent)
        if load:
            await s.aload()
        return s

    # -- operating: clear, stats, locks (flows in _admin.py) ----------------------------

    def clear(
        self,
        *,
        dry_run: bool = False,
        include_locks: bool = False,
        batch_size: int = DEFAULT_BATCH,
        on_batch: OnBatch | None = None,
    ) -> ClearResult:
        """Delete every key under ``{prefix}:`` (SCAN + UNLINK in batches, never KEYS).

        Lock keys and fence counters (``{prefix}:l:*``) and Celery guard keys
        (``{prefix}:celery:*``) are kept unless ``include_locks=True``: deleting them
        frees held locks and restarts fences. Safe while the application runs: each
        batch blocks the server for well under a millisecond.

        :param dry_run: only count what would be deleted.
        :param batch_size: keys per SCAN page and per UNLINK.
        :param on_batch: called with the running :class:`ClearResult` after each SCAN
            page; returning ``False`` stops at that point (``interrupted=True``).
        :raises BackendError: Redis failed; keys deleted so far stay deleted.

        Example::

            result = cache.clear(dry_run=True)
            print(result.matched, "keys would be deleted")
        """
        return self._driver.drive(
            clear_flow(
                self.prefix,
                dry_run=dry_run,
                include_locks=include_locks,
                batch_size=batch_size,
                on_batch=on_batch,
            )
        )

    async def aclear(
        self,
        *,
        dry_run: bool = False,
        include_locks: bool = False,
        batch_size: int = DEFAULT_BATCH,
        on_batch: OnBatch | None = None,
    ) -> ClearResult:
        """Async twin of :meth:`clear`."""
        return await self._adriver.drive(
            clear_flow(
                self.prefix,
                dry_run=dry_run,
                include_locks=include_locks,
                batch_size=batch_size,
                on_batch=on_batch,
            )
        )

    def stats(
        self, *, sample: int = DEFAULT_SAMPLE, batch_size: int = DEFAULT_BATCH
    ) -> CacheStats:
        """Count what lives under the prefix: entries per function, tags, locks, memory.

        One SCAN pass (O(keys), in batches) plus ``MEMORY USAGE`` of ``sample`` random
        keys, from which the namespace's memory is estimated.
        """
        return self._driver.drive(stats_flow(self.prefix, sample, batch_size))

    async def astats(
        self, *, sample: int = DEFAULT_SAMPLE, batch_size: int = DEFAULT_BATCH
    ) -> CacheStats:
        """Async twin of :meth:`stats`."""
        return await self._adriver.drive(stats_flow(self.prefix, sample, batch_size))

    def locks(self, *, batch_size: int = DEFAULT_BATCH) -> list[LockInfo]:
        """Locks, RW locks and semaphores under the prefix that are held or waited for.

        For each: holders (token, mode, lease left by the server's clock), the fence
        counter and the waiters Redis records. A snapshot: leases may end meanwhile.
        """
        return self._driver.drive(locks_flow(self.prefix, batch_size))

    async def alocks(self, *, batch_size: int = DEFAULT_BATCH) -> list[LockInfo]:
        """Async twin of :meth:`locks`."""
        return await self._adriver.drive(locks_flow(self.prefix, batch_size))

    # -- locks (_lock.py) ---------------------------------------------------------------

    def _lock_home(self) -> Cache:
        """The Cache that keeps locks: the lock-only one of ``lock_url=``, else this."""
        return self if self._lock_cache is None else self._lock_cache

    def lock(
        self, name: str, *, fair: bool = False, **options: Unpack[LockKwargs]
    ) -> Lock:
        """A distributed lock (an efficiency lock: see :mod:`rcache._lock`) named ``name``.

        Options (keyword-only, validated here; the same for :meth:`rwlock`,
        :meth:`semaphore` and, but for the two marked, :meth:`locked`):

        - ``ttl``: the lease, 10 ms to a year (default 30 s); always set, so a crashed
          holder frees the lock.
        - ``timeout``: longest wait in ``with``/``acquire()`` (None: forever, the
          default; 0: one try).
        - ``auto_renew`` (not for ``locked``): renew every ttl/3 from the per-process
          renewer thread; by default on inside ``with``/``async with``/``@locked``,
          off for explicit ``acquire()``.
        - ``max_hold``: stop renewing after this long (the lease then runs out).
        - ``on_lost``: called once with the :class:`~rcache.Lease` when the lease is
          found gone or its client-side deadline passes; it runs in the renewer thread
          (or on the event loop of an async lease), so keep it short and thread-safe.
        - ``raise_on_not_owned`` (not for ``locked``): raise
          :class:`~rcache.LockNotOwnedError` on a release that found the lease gone
          (default True).
        - ``metrics_name``: metric label (default ``name``: keep names
          low-cardinality).
        - ``min_replicas``: confirm every grant, extend and renewal with ``WAIT``
          until this many replicas acknowledged it, at most ``replica_timeout``
          (default 1 s) each; a grant they do not acknowledge is released again and
          raises :class:`~rcache.LockNotReplicatedError`. Default 0: no confirmation,
          no extra wait. It narrows, does not close, the window in which a failover
          loses a lock (README, "Locks and replication").

        ``fair=True`` grants in strict FIFO order (a :class:`~rcache.FairLock`). By
        default a release gives the waiter it wakes a 10 ms head start, which keeps
        contenders within a small spread without a queue.

        Example::

            with cache.lock("report:2024-11", ttl=30, timeout=10) as lock:
                write_report(fence=lock.fence)
                lock.ensure_held()
        """
        return make_lock(self._lock_home(), name, options, fair)

    def rwlock(self, name: str, **options: Unpack[LockKwargs]) -> RWLock:
        """A writer-preferring read/write lock: ``with cache.rwlock("doc:1").read(): ...``.

        Options as for :meth:`lock`; every reader and the writer hold their own lease.
        """
        return make_rwlock(self._lock_home(), name, options)

    def semaphore(
        self, name: str, limit: int, **options: Unpack[LockKwargs]
    ) -> Semaphore:
        """At most ``limit`` holders at once; permits are leases reclaimed after a crash.

        Options as for :meth:`lock`. Example::

            with cache.semaphore("api-quota", limit=5, timeout=10):
                call_api()
        """
        return make_semaphore(self._lock_home(), name, limit, options)

    def locked(
        self, name: str, /, *, fair: bool = False, **options: Unpack[LockedKwargs]
    ) -> LockedDecorator:
        """Run the decorated function (``def`` or ``async def``) under a lock.

        ``name`` is a template over the function's parameters, checked at decoration
        time: ``@cache.locked("invoice:{invoice_id}", ttl=30, timeout=5)``. The lease is
        auto-renewed while the function runs. A sync callable returning an awaitable
        counts as sync (the lock covers only the call). Metrics use the template as
        label unless ``metrics_name=`` is given; ``fair=True`` grants in FIFO order.
        Options as for :meth:`lock` (but ``auto_renew`` and ``raise_on_not_owned``).

        :raises LockNotAcquiredError: not acquired within ``timeout``.
        """
        return make_locked(self._lock_home(), name, options, fair)

    # -- decorator --------------------------------------------------------------------

    @overload
    def cached(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncCachedFunction[P, R]: ...

    @overload
    def cached(self, fn: Callable[P, R], /) -> CachedFunction[P, R]: ...

    @overload
    def cached(
        self,
        fn: None = None,
        /,
        *,
        ttl: Duration | None = None,
        key: str | Callable[..., str] | None = None,
        ignore: Iterable[str] = (),
        name: str | None = None,
        cache_none: bool = True,
        unless: Callable[[Any], bool] | None = None,
        on_unserializable: Literal["raise", "skip"] = "raise",
        on_backend_error: BackendErrorPolicy | None = None,
        tags: Iterable[str] = (),
        early: bool | float = False,
        stale: Duration | None = None,
        stale_if_error: Duration | None = None,
        stampede: bool = True,
        lease_ttl: Duration = 10.0,
        wait: Duration | None = None,
        on_wait_timeout: Literal["compute", "raise"] = "compute",
        refresh_runner: Callable[[Callable[[], Any]], Any] | None = None,
        local: LocalTier | bool | None = None,
    ) -> _CachedDecorator: ...

    def cached(
        self,
        fn: Any = None,
        /,
        *,
        ttl: Duration | None = None,
        key: str | Callable[..., str] | None = None,
        ignore: Iterable[str] = (),
        name: str | None = None,
        cache_none: bool = True,
        unless: Callable[[Any], bool] | None = None,
        on_unserializable: Literal["raise", "skip"] = "raise",
        on_backend_error: BackendErrorPolicy | None = None,
        tags: Iterable[str] = (),
        early: bool | float = False,
        stale: Duration | None = None,
        stale_if_error: Duration | None = None,
        stampede: bool = True,
        lease_ttl: Duration = 10.0,
        wait: Duration | None = None,
        on_wait_timeout: Literal["compute", "raise"] = "compute",
        refresh_runner: Callable[[Callable[[], Any]], Any] | None = None,
        local: LocalTier | bool | None = None,
    ) -> Any:
        """Cache a function's results in Redis, keyed by its bound arguments.

        Works on ``def`` and ``async def`` functions (a sync function that returns an
        awaitable counts as sync). The returned object keeps the signature and carries
        ``invalidate(*args)``, ``refresh(*args)`` and ``key_for(*args)``; for async
        functions the first two are coroutines.

        :param ttl: how long entries live (seconds, ``"10m"``, timedelta).
        :param key: a template over parameter names (``"user:{user_id}"``, stored as
            ``{prefix}:k:user:42``) or a callable taking the function's arguments.
            Fields keep their type and never run into each other: ints and
            identifier-like strings as written, other strings JSON-quoted
            (``user:"1"``), other values as a JSON array; a separator must follow every
            field but the last.
        :param ignore: parameter names left out of the key (``("self", "session")``).
        :param name: the function's cache name: its key namespace and its label in
            metrics and logs (default: module.qualname). Functions given the same name
            share entries.
        :param cache_none: store ``None`` results (default True; a cached None is a hit).
        :param unless: ``unless(result)`` true means do not store this result.
        :param on_unserializable: ``"raise"`` (default) a SerializationError naming the
            function and type, or ``"skip"`` storing (the result is still returned).
        :param on_backend_error: override the cache's ``"bypass"``/``"raise"`` policy.
        :param tags: tag templates over parameter names (``["users", "user:{user_id}"]``);
            ``cache.invalidate_tags("user:42")`` drops their entries in O(1).
        :param early: ``True`` (beta 1.0) or a beta > 0: XFetch probabilistic early
            recomputation of hot keys before they expire, by one caller.
        :param stale: stale-while-revalidate window: after ``ttl``, serve the old value
            at once and refresh once in the background (thread, task or refresh_runner).
        :param stale_if_error: serve the old value that long if recomputation raises.
        :param stampede: share one computation per cold key across threads, tasks and
            processes (default True); waiters are woken by notification.
        :param lease_ttl: the computation lease (renewed while computing; a crashed
            holder is replaced within it).
        :param wait: the longest a caller waits for another's computation (default
            ``lease_ttl``); then ``on_wait_timeout``: ``"compute"`` itself (default) or
            ``"raise"`` LockNotAcquiredError.
        :param refresh_runner: ``runner(job)`` runs background refreshes (e.g. a Celery
            task); default a pool of at most 4 daemon threads per Cache (sync; named
            ``rcache-refresh``) or an asyncio task (async).
        :param local: serve hits from the local tier (README "The local tier"):
            ``True``, or a :class:`LocalTier` with this function's own bounds; None
            (default) follows ``Cache(local=...)``; ``False`` never. A local hit
            returns the object kept in this process: do not mutate it.
        :raises ConfigurationError: at decoration time, for a bad ttl, key template,
            ignore list or a non-callable.
        """
        if fn is not None and not callable(fn):
            hint = (
                f"write @cache.cached(ttl={fn!r})"
                if isinstance(fn, (int, float, str))
                else "decorate a function"
            )
            raise ConfigurationError(
                f"cache.cached() takes a function, got {type(fn).__name__}: {hint}"
            )
        if ttl is None:
            self._ttl(None)  # no default either: say how to give one
        options = CachedOptions.build(
            ttl=ttl,
            key=key,
            ignore=ignore,
            name=name,
            cache_none=cache_none,
            unless=unless,
            on_unserializable=on_unserializable,
            on_backend_error=on_backend_error,
            tags=tags,
            early=early,
            stale=stale,
            stale_if_error=stale_if_error,
            stampede=stampede,
            lease_ttl=lease_ttl,
            wait=wait,
            on_wait_timeout=on_wait_timeout,
            refresh_runner=refresh_runner,
            local=resolve_local(local),
        )
        localns = caller_namespace()  # where classes named in annotations may live

        def decorate(func: Any) -> Any:
            return self._decorate(func, options, localns)

        return decorate if fn is None else decorate(fn)

    def _decorate(
        self, func: Any, options: CachedOptions, localns: dict[str, Any] | None
    ) -> SyncCached | AsyncCached:
        if isinstance(func, (classmethod, staticmethod)):
            raise ConfigurationError(
                f"put @cache.cached below @{type(func).__name__}, not above it"
            )
        if not callable(func):
            raise ConfigurationError(
                f"cache.cached() decorates functions, got {type(func).__name__}"
            )
        keys = KeyBuilder(
            func,
            prefix=self.keyspace,
            key=options.key,
            ignore=options.ignore,
            name=options.name,
        )
        for tag in options.tags:
            keys.check_template(tag, what="tag")
        name = options.name or keys.name
        typed = typed_values(func, name, self.serializer, localns)
        is_async = inspect.iscoroutinefunction(func)
        spec = CachedSpec(self, func, options, keys, is_async=is_async, typed=typed)
        self._decorated.add(spec)
        self._specs.add(spec)
        return AsyncCached(spec) if is_async else SyncCached(spec)

    def cached_batch(
        self,
        *,
        ttl: Duration | None = None,
        ids: str | None = None,
        ignore: Iterable[str] = (),
        name: str | None = None,
        on_backend_error: BackendErrorPolicy | None = None,
    ) -> Callable[[F], F]:
        """Cache a function that takes a collection of ids and returns ``{id: value}``.

        Present entries come from one MGET; the function is called once, only with the
        missing ids; their results are stored in one round trip. ``ids`` names the
        parameter holding the ids (default: the first). Other arguments are part of each
        id's key. Ids the function leaves out of its result are not cached. The wrapper
        has ``invalidate(ids)``, ``invalidate_all()`` and ``keys_for(ids)``.
        """
        seconds = self._ttl(ttl)
        if on_backend_error is not None:
            check_policy(on_backend_error)
        ignore = tuple(ignore)

        def decorate(fn: F) -> F:
            wrapper = make_batch(
                self,
                cast("Callable[..., Any]", fn),
                ttl=None if ttl is None else seconds,  # None: follow the default
                ids=ids,
                name=name,
                ignore=ignore,
                policy=on_backend_error,
            )
            self._decorated.add(wrapper._spec)
            return wrapper  # type: ignore[no-any-return]

        return decorate
