"""``@cache.cached_batch``: cache a function that maps a list of ids to their values.

``get_users([1, 2, 3])`` reads every present entry in one ``MGET``, calls the function
only for the missing ids (``get_users([2])``) and stores their results in one round
trip (``cache_store_many.lua``, rejected if ``invalidate_all`` raced the computation).
Each id has its own entry, keyed as if the function had been called with that one id,
so entries are shared between batches that overlap.
"""

from __future__ import annotations

import functools
import inspect
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rcache._cache import BYPASS, Cache
from rcache._config import BackendErrorPolicy, ttl_ms
from rcache._exceptions import ConfigurationError, RCacheError
from rcache._freshness import FUTURE_SLACK, stamp_blob
from rcache._keys import KeyBuilder
from rcache._redis import LuaScript
from rcache._serializers import encode_envelope

__all__ = ["AsyncCachedBatch", "BatchSpec", "SyncCachedBatch"]

_STORE_MANY = "cache_store_many"


@dataclass(eq=False)
class BatchSpec:
    cache: Cache
    fn: Callable[..., Any]
    keys: KeyBuilder
    ids_param: str
    name: str
    ttl: float
    policy: BackendErrorPolicy

    def __post_init__(self) -> None:
        self.fn_stamp = self.cache.keyspace.function_stamp(self.name)
        self.script = LuaScript(_STORE_MANY)
        params = list(self.keys.signature.parameters)
        if self.ids_param not in params:
            raise ConfigurationError(
                f"cached_batch: {self.name} has no parameter {self.ids_param!r}; "
                f"write ids={params[0]!r} or another of {params}"
            )

    def plan(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any], list[str]]:
        """(ids, bound arguments, one key per id)."""
        bound = self.keys.bind(args, kwargs)
        ids = list(bound[self.ids_param])
        keys = [self.keys.value_key({**bound, self.ids_param: i}) for i in ids]
        return ids, bound, keys

    def split(
        self, ids: list[Any], got: Any
    ) -> tuple[dict[Any, Any], list[Any], bytes | None]:
        """(found values by id, missing ids, current function stamp)."""
        if got is BYPASS:
            return {}, ids, None
        now, rows = got  # Redis's clock: freshness never follows ours (issue 14 item 6)
        stamp, values = rows[0], rows[1:]
        found: dict[Any, Any] = {}
        missing: list[Any] = []
        for i, raw in zip(ids, values, strict=True):
            env = (
                None
                if raw is None or stamp is None
                else self.cache._envelope(self.name, raw)
            )
            if (
                env is None
                or env.stamp != stamp_blob([stamp])
                or now >= env.fresh_until
                or env.created_at > now + FUTURE_SLACK
            ):
                missing.append(i)
                self.cache.metrics.cache_get(self.name, "miss")
            else:
                found[i] = env.value
                self.cache.metrics.cache_get(self.name, "hit")
        return found, missing, stamp

    def store_args(
        self,
        ids: list[Any],
        keys: list[str],
        computed: Mapping[Any, Any],
        stamp: bytes,
        elapsed: float,
    ) -> tuple[list[str], list[Any]]:
        by_id = dict(zip(ids, keys, strict=True))
        out_keys, data = [self.fn_stamp], [stamp, ttl_ms(self.ttl)]
        each = elapsed / max(1, len(computed))
        for i, value in computed.items():
            if i in by_id:
                out_keys.append(by_id[i])
                data.append(
                    encode_envelope(
                        self.cache.serializer,
                        value,
                        compute_time=each,
                        fresh_for=self.ttl,
                        stamp=stamp_blob([stamp]),
                        now=self.cache._server_now(),
                    )
                )
        return out_keys, data

    def check_result(self, result: Any) -> Mapping[Any, Any]:
        if not isinstance(result, Mapping):
            raise ConfigurationError(
                f"cached_batch: {self.name} must return a mapping of id -> value, "
                f"got {type(result).__name__}"
            )
        return result


class _BatchBase:
    def __init__(self, spec: BatchSpec) -> None:
        self._spec = spec
        functools.update_wrapper(self, spec.fn)  # type: ignore[arg-type]

    def keys_for(self, *args: Any, **kwargs: Any) -> list[str]:
        """The Redis key of each id's entry."""
        return self._spec.plan(args, kwargs)[2]


class SyncCachedBatch(_BatchBase):
    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        spec = self._spec
        cache = spec.cache
        ids, bound, keys = spec.plan(args, kwargs)
        if not ids:
            return {}
        rows = cache._read_raw([spec.fn_stamp, *keys], spec.name, spec.policy)
        found, missing, stamp = spec.split(ids, rows)
        if not missing:
            return found
        if rows is not BYPASS and stamp is None:
            got = cache._claim(
                spec.fn_stamp,
                [spec.fn_stamp],
                secrets.token_hex(8),
                _StampOnly(spec),
                take_lease=False,
            )
            stamp = None if got is BYPASS else got[2][0]
        start = time.perf_counter()
        computed = spec.check_result(spec.fn(**{**bound, spec.ids_param: missing}))
        elapsed = time.perf_counter() - start
        cache.metrics.cache_load(spec.name, "success", elapsed)
        if stamp is not None and computed:
            skeys, sargs = spec.store_args(ids, keys, computed, stamp, elapsed)
            try:
                n = cache._sync.run(lambda c: spec.script(c, skeys, sargs))
            except RCacheError as exc:
                cache._failed(spec.name, "set", exc, spec.policy)
            else:
                for _ in range(int(n)):
                    cache.metrics.cache_put(spec.name)
        return {**found, **{i: computed[i] for i in missing if i in computed}}

    def invalidate(self, *args: Any, **kwargs: Any) -> int:
        """Delete the entries of these ids; returns how many existed."""
        spec = self._spec
        keys = spec.plan(args, kwargs)[2]
        return sum(spec.cache._delete_raw(k, spec.name, spec.policy) for k in keys)

    def invalidate_all(self) -> bool:
        """Drop every entry of this function in O(1)."""
        spec = self._spec
        return spec.cache._delete_raw(spec.fn_stamp, spec.name, spec.policy)


class AsyncCachedBatch(_BatchBase):
    def __init__(self, spec: BatchSpec) -> None:
        super().__init__(spec)
        if hasattr(inspect, "markcoroutinefunction"):
            inspect.markcoroutinefunction(self)

    async def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        spec = self._spec
        cache = spec.cache
        ids, bound, keys = spec.plan(args, kwargs)
        if not ids:
            return {}
        rows = await cache._aread_raw([spec.fn_stamp, *keys], spec.name, spec.policy)
        found, missing, stamp = spec.split(ids, rows)
        if not missing:
            return found
        if rows is not BYPASS and stamp is None:
            got = await cache._aclaim(
                spec.fn_stamp,
                [spec.fn_stamp],
                secrets.token_hex(8),
                _StampOnly(spec),
                take_lease=False,
            )
            stamp = None if got is BYPASS else got[2][0]
        start = time.perf_counter()
        computed = spec.check_result(
            await spec.fn(**{**bound, spec.ids_param: missing})
        )
        elapsed = time.perf_counter() - start
        cache.metrics.cache_load(spec.name, "success", elapsed)
        if stamp is not None and computed:
            skeys, sargs = spec.store_args(ids, keys, computed, stamp, elapsed)
            try:
                n = await cache._async.run(lambda c: spec.script.acall(c, skeys, sargs))
            except RCacheError as exc:
                cache._failed(spec.name, "set", exc, spec.policy)
            else:
                for _ in range(int(n)):
                    cache.metrics.cache_put(spec.name)
        return {**found, **{i: computed[i] for i in missing if i in computed}}

    async def invalidate(self, *args: Any, **kwargs: Any) -> int:
        """Delete the entries of these ids; returns how many existed."""
        spec = self._spec
        keys = spec.plan(args, kwargs)[2]
        n = 0
        for k in keys:
            n += await spec.cache._adelete_raw(k, spec.name, spec.policy)
        return n

    async def invalidate_all(self) -> bool:
        """Drop every entry of this function in O(1)."""
        spec = self._spec
        return await spec.cache._adelete_raw(spec.fn_stamp, spec.name, spec.policy)


class _StampOnly:
    """What Cache._claim needs to only create/read a stamp (no lease)."""

    def __init__(self, spec: BatchSpec) -> None:
        from rcache._freshness import Freshness

        self.name = spec.name
        self.policy = spec.policy
        self.freshness = Freshness(ttl=spec.ttl)


def make_batch(
    cache: Cache,
    fn: Callable[..., Any],
    *,
    ttl: float,
    ids: str | None,
    name: str | None,
    ignore: Iterable[str],
    policy: BackendErrorPolicy,
) -> Any:
    if not callable(fn):
        raise ConfigurationError(
            f"cache.cached_batch() decorates functions, got {type(fn).__name__}"
        )
    keys = KeyBuilder(fn, prefix=cache.prefix, ignore=ignore, name=name)
    params = list(keys.signature.parameters)
    if not params:
        raise ConfigurationError(
            "cached_batch: the function must take the ids as a parameter"
        )
    spec = BatchSpec(cache, fn, keys, ids or params[0], name or keys.name, ttl, policy)
    cache.metrics.register_cache(spec.name)
    if inspect.iscoroutinefunction(fn):
        return AsyncCachedBatch(spec)
    return SyncCachedBatch(spec)
