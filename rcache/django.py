"""A Django cache backend on rcache (extra ``rcache-redis[django]``).

::

    CACHES = {
        "default": {
            "BACKEND": "rcache.django.RCacheBackend",
            "LOCATION": "redis://127.0.0.1:6379/0",
            "TIMEOUT": 300,           # Django's: None = forever, 0 = expire at once
            "KEY_PREFIX": "shop",     # Django's KEY_PREFIX / VERSION / KEY_FUNCTION
            "OPTIONS": {"on_backend_error": "raise"},
        }
    }

It implements Django's ``BaseCache`` API, sync and natively async (``aget`` runs on
rcache's asyncio client, not in a thread), with rcache's circuit breaker, retries,
metrics and failure policy underneath. ``caches["default"].lock("name")`` returns an
rcache :class:`~rcache.Lock`; ``caches["default"].rcache`` is the underlying
:class:`rcache.Cache` (decorators, tags, transactions on the same connection).

Storage: a value is stored under ``{prefix}:k:{django key}`` as an rcache envelope,
except a plain ``int`` (not ``bool``), stored as its decimal digits so that ``incr`` and
``decr`` are one atomic INCRBY (a Lua script also checks the key exists: Django raises
``ValueError`` on a missing key, which a bare INCRBY would create).

``OPTIONS`` are listed on :class:`RCacheBackend`.

Django makes a backend object per thread and, under ASGI, per request task (asgiref's
``Local``); all of them with the same LOCATION and OPTIONS share one ``rcache.Cache``,
so one connection pool and one circuit breaker per process, not one per request.

``close()`` keeps the connections: Django calls it at the end of every request, and
re-connecting per request is what its own Redis backend avoids too.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from django.conf import settings
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
from django.utils.module_loading import import_string

from rcache._cache import Cache
from rcache._config import BackendErrorPolicy, BreakerPolicy, RetryPolicy, ttl_ms
from rcache._exceptions import ConfigurationError, SerializationError
from rcache._flow import AsyncDriver, Command, Run, SyncDriver
from rcache._lock import Lock
from rcache._policy import BYPASS, Guard
from rcache._redis import CLUSTER_SCHEME, SENTINEL_SCHEME, LuaScript
from rcache._serializers import (
    PickleSerializer,
    Serializer,
    UndecodableError,
    encode_envelope,
    resolve_serializer,
)

__all__ = ["PicklingError", "RCacheBackend"]

_OPTIONS = (
    "breaker",
    "metrics",
    "name",
    "on_backend_error",
    "prefix",
    "redis_options",
    "retry",
    "serializer",
)
_MISSING: Any = object()
_BYPASS = BYPASS


@dataclass(frozen=True, slots=True)
class _Clear(Command):
    """``clear()`` as one guarded cache command (several round trips inside)."""

    cache: Cache
    guard: Guard | None = None

    def run(self, driver: SyncDriver) -> Any:
        return self.cache.clear()

    async def arun(self, driver: AsyncDriver) -> Any:
        return await self.cache.aclear()


# Django's RedisSerializer rule: only exact ints travel raw (bool is an int subclass).
_INT64 = (-(2**63), 2**63 - 1)


class PicklingError(SerializationError, pickle.PicklingError):
    """A value could not be pickled under ``OPTIONS={"serializer": "pickle"}``.

    Both an :class:`rcache.SerializationError` and a :class:`pickle.PicklingError`,
    which is what Django's own backends raise for an unpicklable value (its cache tests
    expect ``pickle.PickleError`` from ``set`` and ``add``).
    """


class _SignedPickle(PickleSerializer):
    """rcache's signed pickle, raising :class:`PicklingError` on unpicklable values."""

    def dumps(self, value: Any) -> bytes:
        try:
            payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # PicklingError, TypeError, or the object's own error
            raise PicklingError(
                f"cannot pickle a value of type {type(value).__qualname__} "
                f"({type(exc).__name__})"
            ) from exc
        return self._sign(payload)


def _pickle_keys() -> list[bytes]:
    """Signing keys derived from SECRET_KEY (then SECRET_KEY_FALLBACKS, verify only).

    Derived with a purpose string rather than used raw, so a cache signature can never
    double as a signature of any other Django component.
    """
    secrets = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
    if not secrets[0]:
        raise ConfigurationError(
            'OPTIONS={"serializer": "pickle"} signs values with settings.SECRET_KEY, '
            "which is empty: set SECRET_KEY"
        )
    return [
        hmac.new(
            s.encode() if isinstance(s, str) else bytes(s),
            b"rcache.django.RCacheBackend pickle signing",
            hashlib.sha256,
        ).digest()
        for s in secrets
    ]


def _serializer(spec: Any) -> Serializer:
    if spec == "pickle":
        return _SignedPickle(secret=cast("list[str | bytes]", _pickle_keys()))
    if isinstance(spec, str) and "." in spec:
        spec = import_string(spec)
        if isinstance(spec, type):
            spec = spec()
    return resolve_serializer(spec)


def _policy(value: Any, cls: type[Any], what: str) -> Any:
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        try:
            return cls(**value)
        except TypeError as exc:
            raise ConfigurationError(f"OPTIONS[{what!r}]: {exc}") from None
    raise ConfigurationError(
        f"OPTIONS[{what!r}] takes a {cls.__name__} or a dict of its fields, "
        f"got {type(value).__name__}"
    )


def _fingerprint(value: Any) -> Any:
    """A hashable stand-in for an OPTIONS value (objects by identity)."""
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _fingerprint(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_fingerprint(v) for v in value)
    return ("id", id(value))


class _Shared:
    """What every backend object of one configuration shares in a process."""

    def __init__(self, cache: Cache, options: Mapping[str, Any]) -> None:
        self.cache = cache
        self.options = options  # kept alive: the fingerprint holds their ids
        self.incr_script = LuaScript("django_incr")
        # Django keys are explicit keys: on Redis Cluster each lands in its slot group
        # (KeySpace.explicit), as cache.get/set's do.
        self.rkey = cache.keyspace.explicit
        self.cluster = cache.keyspace.groups is not None


# One rcache.Cache per configuration: Django builds a backend per thread and, under
# ASGI, per request task (asgiref Local), and a Cache per backend would mean a connection
# pool and a circuit breaker per request. Keyed by the full configuration, so it never
# needs resetting.
_shared: dict[Any, _Shared] = {}
_shared_lock = threading.Lock()


def _shared_for(location: str | None, options: Mapping[str, Any]) -> _Shared:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        hint = ""
        if {"MAX_ENTRIES", "CULL_FREQUENCY"} & set(unknown):
            hint = " (Redis evicts by its own maxmemory-policy: remove MAX_ENTRIES/CULL_FREQUENCY)"
        raise ConfigurationError(
            f"unknown OPTIONS {unknown} for rcache.django.RCacheBackend{hint}: it takes "
            f"{', '.join(_OPTIONS)}; redis-py settings go in "
            'OPTIONS={"redis_options": {"socket_timeout": 1.0}}'
        )
    key: Any = (location, _fingerprint(dict(options)))
    if options.get("serializer") == "pickle":
        key = (key, hashlib.sha256(b"".join(_pickle_keys())).hexdigest())
    with _shared_lock:
        shared = _shared.get(key)
        if shared is None:
            redis_options = options.get("redis_options")
            if redis_options is not None and not isinstance(redis_options, Mapping):
                raise ConfigurationError(
                    'OPTIONS["redis_options"] takes a dict of redis-py keyword arguments'
                )
            cache = Cache(
                location,
                prefix=options.get("prefix", "rcache"),
                serializer=_serializer(options.get("serializer", "json")),
                on_backend_error=options.get("on_backend_error", "bypass"),
                retry=_policy(options.get("retry"), RetryPolicy, "retry"),
                breaker=_policy(options.get("breaker"), BreakerPolicy, "breaker"),
                metrics=options.get("metrics"),
                redis_options=redis_options,
                name=options.get("name"),
            )
            shared = _shared[key] = _Shared(cache, options)
    return shared


def _location(server: Any) -> str | None:
    if isinstance(server, (list, tuple)):
        if len(server) > 1:
            raise ConfigurationError(
                "rcache.django.RCacheBackend takes one Redis URL as LOCATION, "
                f"got {len(server)}: write LOCATION='redis://host:6379/0'"
            )
        server = server[0] if server else ""
    if not isinstance(server, str):
        raise ConfigurationError(
            f"LOCATION must be a Redis URL string, got {type(server).__name__}"
        )
    # A Sentinel or Cluster URL lists its seed nodes with commas: one URL all the same.
    multi = server.split("://", 1)[0].lower() in (SENTINEL_SCHEME, CLUSTER_SCHEME)
    if not multi and ("," in server or ";" in server):
        raise ConfigurationError(
            "rcache.django.RCacheBackend takes one Redis URL as LOCATION (no replicas "
            f"list): write LOCATION='redis://host:6379/0' (Redis Cluster: "
            f"'redis+cluster://host:7000,host2:7001'), got {server!r}"
        )
    return server or None  # empty: $RCACHE_URL, $REDIS_URL, then the local default


def _eval(client: Any, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
    if hasattr(client, "__aenter__"):  # a redis.asyncio client
        return script.acall(client, keys, args)
    return script(client, keys, args)


def _set_op(key: str, data: bytes, ms: int | None, nx: bool = False) -> Any:
    def op(c: Any) -> Any:
        return c.set(key, data, px=ms, nx=nx)

    return op


def _touch_op(key: str, ms: int | None) -> Any:
    def op(c: Any) -> Any:
        if ms is None:  # PERSIST alone returns 0 for a key that exists without a TTL
            pipe = c.pipeline(transaction=True)
            pipe.exists(key)
            pipe.persist(key)
            return pipe.execute()
        if ms == 0:
            return c.delete(key)
        return c.pexpire(key, ms)

    return op


def _set_many_op(items: list[tuple[str, bytes]], ms: int | None) -> Any:
    def op(c: Any) -> Any:
        pipe = c.pipeline(transaction=False)
        for key, data in items:
            if ms == 0:
                pipe.delete(key)
            else:
                pipe.set(key, data, px=ms)
        return pipe.execute()

    return op


class RCacheBackend(BaseCache):  # type: ignore[misc]  # Django ships no type hints
    """Django cache backend: ``"BACKEND": "rcache.django.RCacheBackend"``.

    ``LOCATION`` is one Redis URL (``redis://``, ``rediss://``, ``unix://``,
    ``memory://``; empty: ``$RCACHE_URL``, ``$REDIS_URL``, then
    ``redis://127.0.0.1:6379/0``). ``TIMEOUT``, ``KEY_PREFIX``, ``VERSION`` and
    ``KEY_FUNCTION`` work as in every Django backend.

    ``OPTIONS`` (all optional; anything else is refused at construction):

    * ``serializer``: ``"json"`` (default: rcache's JSON, which keeps tuples, bytes,
      datetimes, Decimals, UUIDs, sets), ``"msgpack"``, ``"pickle"`` (pickle signed with
      HMAC-SHA256 under a key derived from ``settings.SECRET_KEY``, verifying
      ``SECRET_KEY_FALLBACKS`` too; needed to cache model instances, querysets or
      ``HttpResponse`` objects, as the cache middleware does), a Serializer instance, or the
      dotted path of one.
    * ``on_backend_error``: ``"bypass"`` (default: a failing Redis reads as a miss and
      writes are skipped, logged at most every 30 s and counted) or ``"raise"``.
    * ``prefix`` (default ``"rcache"``), ``name`` (metrics label, default the prefix),
      ``retry`` and ``breaker`` (a RetryPolicy/BreakerPolicy or a dict of their fields),
      ``metrics`` (a metrics sink such as ``rcache.metrics.PrometheusMetrics()``),
      ``redis_options`` (keyword arguments for the redis-py clients).

    :raises rcache.ConfigurationError: at construction (first ``caches[alias]`` access),
        for an unknown option, several LOCATIONs, a bad serializer or policy.
    """

    def __init__(self, server: Any, params: dict[str, Any]) -> None:
        super().__init__(params)
        options = params.get("OPTIONS") or {}
        if not isinstance(options, Mapping):
            raise ConfigurationError("OPTIONS must be a dict")
        shared = _shared_for(_location(server), options)
        self._shared = shared
        self._cache = shared.cache
        self._explicit = shared.rkey
        self._name = shared.cache.name
        self._policy: BackendErrorPolicy = shared.cache.on_backend_error

    @property
    def rcache(self) -> Cache:
        """The :class:`rcache.Cache` under this backend (shared by its threads)."""
        return self._cache

    def lock(self, name: str, **options: Any) -> Lock:
        """An rcache distributed lock: takes the arguments of :meth:`rcache.Cache.lock`.

        Example: ``with caches["default"].lock("report", ttl=30, timeout=5): ...``
        """
        return self._cache.lock(name, **options)

    # -- timeouts, keys, values (pure) ----------------------------------------------

    def get_backend_timeout(self, timeout: Any = DEFAULT_TIMEOUT) -> float | None:
        """Seconds to live: None = forever; 0 or less = expire at once (Django's rules)."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        return None if timeout is None else max(0.0, float(timeout))

    def _ms(self, timeout: Any) -> int | None:
        """PX milliseconds, None for no expiry, 0 for "expire at once"."""
        seconds = self.get_backend_timeout(timeout)
        if seconds is None:
            return None
        return ttl_ms(seconds) if seconds > 0 else 0

    def _rkey(self, key: Any, version: int | None) -> str:
        full: str = self.make_and_validate_key(key, version=version)
        return self._explicit(full)

    def _dump(self, value: Any, ms: int | None) -> bytes:
        if type(value) is int and _INT64[0] <= value <= _INT64[1]:
            return str(value).encode()
        fresh = float("inf") if ms is None else ms / 1000
        try:
            return encode_envelope(self._cache.serializer, value, fresh_for=fresh)
        except SerializationError as exc:
            if isinstance(self._cache.serializer, PickleSerializer):
                raise
            # model instances, querysets and the HttpResponses of cache_page land here
            raise SerializationError(
                f"{exc}; to cache any picklable value (model instances, querysets, "
                'cache_page responses) set OPTIONS={"serializer": "pickle"}: pickles '
                "signed with a key derived from SECRET_KEY"
            ) from None

    def _load(self, raw: bytes) -> Any:
        """The value in ``raw``, or _MISSING if it cannot be read (counted, logged)."""
        if raw[:2] == b"rc":
            envelope = self._cache._envelope(self._name, raw)
            return _MISSING if envelope is None else envelope.value
        try:
            return int(raw)
        except ValueError:
            exc = UndecodableError("neither an rcache envelope nor an integer")
        self._cache._undecodable(self._name, exc)
        return _MISSING

    def _value(self, raw: Any, default: Any) -> Any:
        value = _MISSING if raw is None or raw is _BYPASS else self._load(raw)
        self._cache.metrics.cache_get(
            self._name, "miss" if value is _MISSING else "hit"
        )
        return default if value is _MISSING else value

    def _many(self, keys: list[Any], rows: Any) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        if rows is _BYPASS:
            rows = [None] * len(keys)
        for key, raw in zip(keys, rows, strict=True):
            value = self._value(raw, _MISSING)
            if value is not _MISSING:
                out[key] = value
        return out

    def _mget_op(self, full: list[str]) -> Callable[[Any], Any]:
        # On a cluster the keys span slots: redis-py reads one MGET per slot, pipelined
        # per node (not atomic across slots; Django's get_many never was atomic).
        if self._shared.cluster:
            return lambda c: c.mget_nonatomic(full)
        return lambda c: c.mget(full)

    @staticmethod
    def _incr_result(key: Any, reply: Any) -> int:
        if reply is _BYPASS or reply[0] == 0:
            raise ValueError(f"Key '{key}' not found")
        if reply[0] == 2:
            raise TypeError(
                f"incr()/decr() need an integer value; key '{key}' holds another type"
            )
        return int(reply[1])

    # -- through the Cache's drivers: one guarded path (breaker, policy, mapping) --------

    def _run(self, operation: str, op: Callable[[Any], Any]) -> Any:
        """``op(client)`` as a cache command of this backend; _BYPASS if skipped."""
        guard = Guard(self._name, operation, self._policy)
        return self._cache._driver.execute(Run(op, guard))

    async def _arun(self, operation: str, op: Callable[[Any], Any]) -> Any:
        guard = Guard(self._name, operation, self._policy)
        return await self._cache._adriver.execute(Run(op, guard))

    def _written(self, result: Any, count: int = 1) -> bool:
        if result is _BYPASS:
            return False
        for _ in range(count):
            self._cache.metrics.cache_put(self._name)
        return True

    def _removed(self, result: Any) -> bool:
        if result is _BYPASS or not result:
            return False
        self._cache.metrics.cache_removal(self._name)
        return True

    # -- BaseCache API: sync and async twins ------------------------------------------

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        """The value of ``key``, or ``default`` on a miss (or a bypassed error)."""
        k = self._rkey(key, version)
        return self._value(self._run("get", lambda c: c.get(k)), default)

    async def aget(
        self, key: Any, default: Any = None, version: int | None = None
    ) -> Any:
        """Async twin of :meth:`get`, on rcache's asyncio client."""
        k = self._rkey(key, version)
        return self._value(await self._arun("get", lambda c: c.get(k)), default)

    def set(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> None:
        """Store ``value`` for ``timeout`` seconds (None: forever; 0: remove the key)."""
        k, ms = self._rkey(key, version), self._ms(timeout)
        data = self._dump(value, ms)  # an unserializable value raises, whatever timeout
        if ms == 0:  # Django: a timeout of 0 means "do not keep it"
            self._run("delete", lambda c: c.delete(k))
            return
        self._written(self._run("set", _set_op(k, data, ms)))

    async def aset(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> None:
        """Async twin of :meth:`set`."""
        k, ms = self._rkey(key, version), self._ms(timeout)
        data = self._dump(value, ms)
        if ms == 0:
            await self._arun("delete", lambda c: c.delete(k))
            return
        self._written(await self._arun("set", _set_op(k, data, ms)))

    def add(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> bool:
        """Store ``value`` only if ``key`` is absent (SET NX); True if it was stored."""
        k, ms = self._rkey(key, version), self._ms(timeout)
        data = self._dump(value, ms)
        if ms == 0:  # would have been added, and expired at once
            result = self._run("get", lambda c: c.exists(k))
            return result is not _BYPASS and not result
        result = self._run("set", _set_op(k, data, ms, nx=True))
        return self._written(result if result else _BYPASS)

    async def aadd(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> bool:
        """Async twin of :meth:`add`."""
        k, ms = self._rkey(key, version), self._ms(timeout)
        data = self._dump(value, ms)
        if ms == 0:
            result = await self._arun("get", lambda c: c.exists(k))
            return result is not _BYPASS and not result
        result = await self._arun("set", _set_op(k, data, ms, nx=True))
        return self._written(result if result else _BYPASS)

    def touch(
        self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        """Give ``key`` a new ``timeout``; False if the key does not exist."""
        ms = self._ms(timeout)
        result = self._run("set", _touch_op(self._rkey(key, version), ms))
        if result is _BYPASS:
            return False
        return bool(result[0] if ms is None else result)

    async def atouch(
        self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        """Async twin of :meth:`touch`."""
        ms = self._ms(timeout)
        result = await self._arun("set", _touch_op(self._rkey(key, version), ms))
        if result is _BYPASS:
            return False
        return bool(result[0] if ms is None else result)

    def delete(self, key: Any, version: int | None = None) -> bool:
        """Delete ``key``; True if it existed."""
        k = self._rkey(key, version)
        return self._removed(self._run("delete", lambda c: c.delete(k)))

    async def adelete(self, key: Any, version: int | None = None) -> bool:
        """Async twin of :meth:`delete`."""
        k = self._rkey(key, version)
        return self._removed(await self._arun("delete", lambda c: c.delete(k)))

    def has_key(self, key: Any, version: int | None = None) -> bool:
        """True if ``key`` exists (one EXISTS)."""
        k = self._rkey(key, version)
        result = self._run("get", lambda c: c.exists(k))
        return result is not _BYPASS and bool(result)

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        """Async twin of :meth:`has_key`."""
        k = self._rkey(key, version)
        result = await self._arun("get", lambda c: c.exists(k))
        return result is not _BYPASS and bool(result)

    def get_many(
        self, keys: Iterable[Any], version: int | None = None
    ) -> dict[Any, Any]:
        """The present entries among ``keys``, in one MGET (missing ones left out)."""
        keys = list(keys)
        if not keys:
            return {}
        full = [self._rkey(k, version) for k in keys]
        return self._many(keys, self._run("get", self._mget_op(full)))

    async def aget_many(
        self, keys: Iterable[Any], version: int | None = None
    ) -> dict[Any, Any]:
        """Async twin of :meth:`get_many`."""
        keys = list(keys)
        if not keys:
            return {}
        full = [self._rkey(k, version) for k in keys]
        return self._many(keys, await self._arun("get", self._mget_op(full)))

    def set_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> list[Any]:
        """Store every item in one pipelined round trip; returns the keys not stored."""
        if not data:
            return []
        ms = self._ms(timeout)
        items = [(self._rkey(k, version), self._dump(v, ms)) for k, v in data.items()]
        result = self._run("set", _set_many_op(items, ms))
        if ms != 0 and not self._written(result, len(items)):
            return list(data)
        return []

    async def aset_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> list[Any]:
        """Async twin of :meth:`set_many`."""
        if not data:
            return []
        ms = self._ms(timeout)
        items = [(self._rkey(k, version), self._dump(v, ms)) for k, v in data.items()]
        result = await self._arun("set", _set_many_op(items, ms))
        if ms != 0 and not self._written(result, len(items)):
            return list(data)
        return []

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        """Delete ``keys`` in one command."""
        full = [self._rkey(k, version) for k in keys]
        if full:
            self._run("delete", lambda c: c.delete(*full))

    async def adelete_many(
        self, keys: Iterable[Any], version: int | None = None
    ) -> None:
        """Async twin of :meth:`delete_many`."""
        full = [self._rkey(k, version) for k in keys]
        if full:
            await self._arun("delete", lambda c: c.delete(*full))

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """Add ``delta`` atomically (one Lua call); ValueError if the key is missing,
        TypeError if it holds something other than an int."""
        k, script = self._rkey(key, version), self._shared.incr_script
        reply = self._run("set", lambda c: _eval(c, script, [k], [delta]))
        return self._incr_result(key, reply)

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """Async twin of :meth:`incr`."""
        k, script = self._rkey(key, version), self._shared.incr_script
        reply = await self._arun("set", lambda c: _eval(c, script, [k], [delta]))
        return self._incr_result(key, reply)

    def decr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """Subtract ``delta`` atomically: :meth:`incr` with ``-delta``."""
        return self.incr(key, -delta, version=version)

    async def adecr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """Async twin of :meth:`decr`."""
        return await self.aincr(key, -delta, version=version)

    def clear(self) -> None:
        """Delete this cache's keys: :meth:`rcache.Cache.clear` on the rcache prefix.

        Everything under ``{prefix}:`` goes (SCAN + UNLINK in batches) except held
        locks' keys, which rcache keeps. Narrower than Django's own Redis backend, which
        runs FLUSHDB: other data in the same database is left alone.
        """
        guard = Guard(self._name, "delete", self._policy)
        self._cache._driver.execute(_Clear(self._cache, guard))

    async def aclear(self) -> None:
        """Async twin of :meth:`clear`."""
        guard = Guard(self._name, "delete", self._policy)
        await self._cache._adriver.execute(_Clear(self._cache, guard))

    def close(self, **kwargs: Any) -> None:
        """Called by Django after every request: keeps the pooled connections."""

    async def aclose(self, **kwargs: Any) -> None:
        """Async twin of :meth:`close` (keeps this event loop's client)."""
