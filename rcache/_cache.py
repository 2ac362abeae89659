"""``Cache``: one object for sync and async code.

Sync operations and their ``a``-prefixed async twins sit next to each other and share
every decision with the pure core (keys, envelope, failure policy); they differ only in
``self._sync.run(...)`` versus ``await self._async.run(...)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Literal, Protocol, TypeVar, overload

import redis
import redis.asyncio

from rcache._breaker import CircuitBreaker
from rcache._config import (
    BackendErrorPolicy,
    BreakerPolicy,
    Duration,
    RetryPolicy,
    parse_duration,
    ttl_ms,
)
from rcache._exceptions import (
    BackendUnavailableError,
    ConfigurationError,
    RCacheError,
)
from rcache._keys import KeyBuilder
from rcache._lock import LockMixin
from rcache._logging import RateLimitedLog, cache_log
from rcache._metrics import InMemoryMetrics, MetricsSink
from rcache._redis import AsyncRedis, ClientSpec, SyncRedis
from rcache._serializers import (
    Serializer,
    UndecodableError,
    decode_envelope,
    encode_envelope,
    resolve_serializer,
)
from rcache._transaction import TransactionMixin
from rcache._types import AsyncCachedFunction, CachedFunction, P, R

__all__ = ["Cache"]

_POLICIES = ("bypass", "raise")
_UNSERIALIZABLE = ("raise", "skip")


class _Bypass:
    """The backend was skipped or failed and the policy says to carry on without it."""

    __slots__ = ()


BYPASS: Any = _Bypass()
_MISSING: Any = object()


class _CachedDecorator(Protocol):
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncCachedFunction[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> CachedFunction[P, R]: ...


F = TypeVar("F")


class Cache(LockMixin, TransactionMixin):
    """A Redis-backed cache for sync and async code.

    :param url: ``redis://``, ``rediss://``, ``unix://`` or ``memory://`` (embedded,
        in-process, same semantics including Lua). Default: ``$RCACHE_URL``, else
        ``$REDIS_URL``, else ``redis://127.0.0.1:6379/0``.
    :param prefix: first part of every Redis key this cache writes.
    :param ttl: default time to live for ``set`` and ``@cached`` (seconds, ``"10m"``, or
        a timedelta); without it each call site must give one.
    :param client: a ``redis.Redis`` to use instead of a URL; ``async_client`` a factory
        of ``redis.asyncio.Redis`` (called once per event loop).
    :param serializer: ``"json"`` (default), ``"msgpack"`` or a Serializer, e.g.
        ``PickleSerializer(secret=...)``.
    :param on_backend_error: ``"bypass"`` (default): a failing Redis is skipped (the
        function runs, a WARNING at most every 30 s, the error counted); ``"raise"``.
    :param retry: RetryPolicy for transient errors; :param breaker: BreakerPolicy.
    :param metrics: a metrics sink such as ``rcache.metrics.PrometheusMetrics``;
        default ``InMemoryMetrics``.
    :param redis_options: extra keyword arguments for the redis-py clients.

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
        client: redis.Redis | None = None,
        async_client: Callable[[], redis.asyncio.Redis] | None = None,
        serializer: str | Serializer = "json",
        on_backend_error: BackendErrorPolicy = "bypass",
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
        metrics: MetricsSink | None = None,
        redis_options: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        if (
            not isinstance(prefix, str)
            or not prefix
            or any(c.isspace() for c in prefix)
        ):
            raise ConfigurationError(
                f"prefix must be a non-empty string without spaces, got {prefix!r}: "
                'write prefix="myapp"'
            )
        _check_policy(on_backend_error)
        self.prefix = prefix
        self.name = name or prefix
        self.default_ttl = None if ttl is None else parse_duration(ttl)
        self.serializer = resolve_serializer(serializer)
        self.on_backend_error: BackendErrorPolicy = on_backend_error
        self.retry = retry or RetryPolicy()
        self._spec = ClientSpec(
            url, client=client, async_client=async_client, options=redis_options
        )
        self._sync = SyncRedis(self._spec, self.retry)
        self._async = AsyncRedis(self._spec, self.retry)
        self.metrics: MetricsSink = (
            metrics if metrics is not None else InMemoryMetrics()
        )
        self.breaker = CircuitBreaker(breaker or BreakerPolicy())
        self.breaker.on_change = self._breaker_changed
        self._log = RateLimitedLog(cache_log)
        self._explicit_prefix = f"{prefix}:k:"
        self.metrics.register_cache(self.name)

    def __repr__(self) -> str:
        return f"Cache({self._spec.describe()!r}, prefix={self.prefix!r})"

    @property
    def is_memory(self) -> bool:
        """True for the embedded ``memory://`` backend."""
        return self._spec.memory

    # -- failure policy (shared by both drivers) --------------------------------------

    def _breaker_changed(self, state: int) -> None:
        self.metrics.breaker_state(state)
        if state == 1:
            cache_log.warning(
                "rcache: Redis at %s is unavailable; cache bypassed until it answers again",
                self._spec.describe(),
            )
        elif state == 0:
            cache_log.warning(
                "rcache: Redis at %s answers again; caching resumed",
                self._spec.describe(),
            )

    def _skipped(self, name: str, operation: str, policy: BackendErrorPolicy) -> Any:
        self.metrics.cache_error(name, operation, "CircuitOpen")
        if policy == "raise":
            raise BackendUnavailableError(
                f"Redis at {self._spec.describe()} is unavailable (circuit breaker open)"
            )
        return BYPASS

    def _failed(
        self, name: str, operation: str, exc: RCacheError, policy: BackendErrorPolicy
    ) -> Any:
        if isinstance(exc, BackendUnavailableError):
            self.breaker.failure()
        original = getattr(exc, "original", None) or exc
        self.metrics.cache_error(name, operation, type(original).__name__)
        if policy == "raise":
            raise exc
        self._log.warning(
            operation,
            "rcache: cache %s for %s failed (%s); carrying on without the cache",
            operation,
            name,
            type(original).__name__,
        )
        return BYPASS

    def _undecodable(self, name: str, exc: UndecodableError) -> None:
        self.metrics.cache_error(name, "decode", "UndecodableError")
        self._log.warning(
            "decode:" + name,
            "rcache: an entry of %s could not be decoded and is treated as a miss: %s",
            name,
            exc,
        )

    def _decode(self, name: str, raw: bytes) -> Any:
        """The cached value, or _MISSING when ``raw`` cannot be decoded."""
        try:
            return decode_envelope(self.serializer, raw).value
        except UndecodableError as exc:
            self._undecodable(name, exc)
            return _MISSING

    # -- raw operations: one sync/async pair each -------------------------------------

    def _get_raw(self, key: str, name: str, policy: BackendErrorPolicy) -> Any:
        if not self.breaker.allow():
            return self._skipped(name, "get", policy)
        try:
            raw = self._sync.run(lambda c: c.get(key))
        except RCacheError as exc:
            return self._failed(name, "get", exc, policy)
        self.breaker.success()
        return raw

    async def _aget_raw(self, key: str, name: str, policy: BackendErrorPolicy) -> Any:
        if not self.breaker.allow():
            return self._skipped(name, "get", policy)
        try:
            raw = await self._async.run(lambda c: c.get(key))
        except RCacheError as exc:
            return self._failed(name, "get", exc, policy)
        self.breaker.success()
        return raw

    def _set_raw(
        self, key: str, data: bytes, ttl: float, name: str, policy: BackendErrorPolicy
    ) -> bool:
        if not self.breaker.allow():
            self._skipped(name, "set", policy)
            return False
        try:
            self._sync.run(lambda c: c.set(key, data, px=ttl_ms(ttl)))
        except RCacheError as exc:
            self._failed(name, "set", exc, policy)
            return False
        self.breaker.success()
        self.metrics.cache_put(name)
        return True

    async def _aset_raw(
        self, key: str, data: bytes, ttl: float, name: str, policy: BackendErrorPolicy
    ) -> bool:
        if not self.breaker.allow():
            self._skipped(name, "set", policy)
            return False
        try:
            await self._async.run(lambda c: c.set(key, data, px=ttl_ms(ttl)))
        except RCacheError as exc:
            self._failed(name, "set", exc, policy)
            return False
        self.breaker.success()
        self.metrics.cache_put(name)
        return True

    def _delete_raw(self, key: str, name: str, policy: BackendErrorPolicy) -> bool:
        if not self.breaker.allow():
            self._skipped(name, "delete", policy)
            return False
        try:
            n = self._sync.run(lambda c: c.delete(key))
        except RCacheError as exc:
            self._failed(name, "delete", exc, policy)
            return False
        self.breaker.success()
        if n:
            self.metrics.cache_removal(name)
        return bool(n)

    async def _adelete_raw(
        self, key: str, name: str, policy: BackendErrorPolicy
    ) -> bool:
        if not self.breaker.allow():
            self._skipped(name, "delete", policy)
            return False
        try:
            n = await self._async.run(lambda c: c.delete(key))
        except RCacheError as exc:
            self._failed(name, "delete", exc, policy)
            return False
        self.breaker.success()
        if n:
            self.metrics.cache_removal(name)
        return bool(n)

    # -- explicit operations ----------------------------------------------------------

    def _key(self, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"cache keys are non-empty strings, got {key!r}")
        return self._explicit_prefix + key

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

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` on a miss (or a bypassed error)."""
        raw = self._get_raw(self._key(key), self.name, self.on_backend_error)
        if raw is None or raw is BYPASS:
            self.metrics.cache_get(self.name, "miss")
            return default
        value = self._decode(self.name, raw)
        if value is _MISSING:
            self.metrics.cache_get(self.name, "miss")
            return default
        self.metrics.cache_get(self.name, "hit")
        return value

    async def aget(self, key: str, default: Any = None) -> Any:
        """Async twin of :meth:`get`."""
        raw = await self._aget_raw(self._key(key), self.name, self.on_backend_error)
        if raw is None or raw is BYPASS:
            self.metrics.cache_get(self.name, "miss")
            return default
        value = self._decode(self.name, raw)
        if value is _MISSING:
            self.metrics.cache_get(self.name, "miss")
            return default
        self.metrics.cache_get(self.name, "hit")
        return value

    def set(self, key: str, value: Any, ttl: Duration | None = None) -> bool:
        """Store ``value`` (``None`` included) for ``ttl``; False if the write was bypassed.

        :raises SerializationError: the serializer cannot encode ``value``.
        """
        seconds = self._ttl(ttl)
        data = self._encode(value, seconds)
        return self._set_raw(
            self._key(key), data, seconds, self.name, self.on_backend_error
        )

    async def aset(self, key: str, value: Any, ttl: Duration | None = None) -> bool:
        """Async twin of :meth:`set`."""
        seconds = self._ttl(ttl)
        data = self._encode(value, seconds)
        return await self._aset_raw(
            self._key(key), data, seconds, self.name, self.on_backend_error
        )

    def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""
        return self._delete_raw(self._key(key), self.name, self.on_backend_error)

    async def adelete(self, key: str) -> bool:
        """Async twin of :meth:`delete`."""
        return await self._adelete_raw(self._key(key), self.name, self.on_backend_error)

    def ping(self) -> bool:
        """True if Redis answers (never raises; does not touch the breaker)."""
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

    def close(self) -> None:
        """Close the sync client (it is made again on next use)."""
        self._sync.close()

    async def aclose(self) -> None:
        """Close the current event loop's async client."""
        await self._async.aclose()

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
    ) -> Any:
        """Cache a function's results in Redis, keyed by its bound arguments.

        Works on ``def`` and ``async def`` functions (a sync function that returns an
        awaitable counts as sync). The returned object keeps the signature and carries
        ``invalidate(*args)``, ``refresh(*args)`` and ``key_for(*args)``; for async
        functions the first two are coroutines.

        :param ttl: how long entries live (seconds, ``"10m"``, timedelta).
        :param key: a template over parameter names (``"user:{user_id}"``, stored as
            ``{prefix}:k:user:42``) or a callable taking the function's arguments.
        :param ignore: parameter names left out of the key (``("self", "session")``).
        :param name: the name used in metrics and logs (default: module.qualname).
        :param cache_none: store ``None`` results (default True; a cached None is a hit).
        :param unless: ``unless(result)`` true means do not store this result.
        :param on_unserializable: ``"raise"`` (default) a SerializationError naming the
            function and type, or ``"skip"`` storing (the result is still returned).
        :param on_backend_error: override the cache's ``"bypass"``/``"raise"`` policy.
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
        seconds = self._ttl(ttl)
        if on_unserializable not in _UNSERIALIZABLE:
            raise ConfigurationError(
                f"on_unserializable must be 'raise' or 'skip', got {on_unserializable!r}"
            )
        policy = self.on_backend_error if on_backend_error is None else on_backend_error
        _check_policy(policy)
        if unless is not None and not callable(unless):
            raise ConfigurationError(
                "unless= takes a callable: unless=lambda result: ..."
            )
        ignore = tuple(ignore) if not isinstance(ignore, str) else ignore

        def decorate(func: Any) -> Any:
            from rcache._decorated import AsyncCached, CachedSpec, SyncCached

            if isinstance(func, (classmethod, staticmethod)):
                raise ConfigurationError(
                    f"put @cache.cached below @{type(func).__name__}, not above it"
                )
            if not callable(func):
                raise ConfigurationError(
                    f"cache.cached() decorates functions, got {type(func).__name__}"
                )
            keys = KeyBuilder(func, prefix=self.prefix, key=key, ignore=ignore)
            spec = CachedSpec(
                cache=self,
                fn=func,
                keys=keys,
                name=name or keys.name,
                ttl=seconds,
                policy=policy,
                cache_none=cache_none,
                unless=unless,
                on_unserializable=on_unserializable,
            )
            self.metrics.register_cache(spec.name)
            if inspect.iscoroutinefunction(func):
                return AsyncCached(spec)
            return SyncCached(spec)

        return decorate if fn is None else decorate(fn)


def _check_policy(policy: object) -> None:
    if policy not in _POLICIES:
        raise ConfigurationError(
            f"on_backend_error must be 'bypass' or 'raise', got {policy!r}"
        )
