"""``@cache.cached_batch``: cache a function that maps a list of ids to their values.

``get_users([1, 2, 3])`` reads every present entry in one ``MGET``, calls the function
only for the missing ids (``get_users([2])``) and stores their results in one round
trip (``cache_store_many.lua``, rejected if ``invalidate_all`` raced the computation).
Each id has its own entry, keyed as if the function had been called with that one id,
so entries are shared between batches that overlap. The flow is
``_readthrough.batch``; the wrappers here bind the arguments and run it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from rcache._cluster import batch as grouped_batch
from rcache._cluster import describe, invalidate
from rcache._config import BackendErrorPolicy
from rcache._decorated import Owner
from rcache._exceptions import ConfigurationError
from rcache._flow import Flow
from rcache._keys import KeyBuilder
from rcache._policy import Guard
from rcache._readthrough import Batch, batch, delete

__all__ = ["AsyncCachedBatch", "BatchSpec", "SyncCachedBatch"]


class BatchSpec:
    """One batch function: its keys and its flow's settings (:attr:`bt`, made again
    when the Cache is configured). ``ttl``/``policy`` None: the Cache's."""

    def __init__(
        self,
        cache: Owner,
        fn: Callable[..., Any],
        keys: KeyBuilder,
        ids_param: str,
        name: str,
        ttl: float | None,
        policy: BackendErrorPolicy | None,
    ) -> None:
        self.cache = cache
        self.fn = fn
        self.keys = keys
        self.ids_param = ids_param
        self.name = name
        self._ttl = ttl
        self._policy = policy
        params = list(keys.signature.parameters)
        if ids_param not in params:
            raise ConfigurationError(
                f"cached_batch: {name} has no parameter {ids_param!r}; "
                f"write ids={params[0]!r} or another of {params}"
            )
        self.bt: Batch
        self.rebase()

    def rebase(self) -> None:
        """Follow the Cache's current prefix, default ttl, policy and metrics sink."""
        cache, name = self.cache, self.name
        ks = self.keyspace = cache.keyspace
        self.keys.rebase(ks)
        ttl = self._ttl if self._ttl is not None else cache.default_ttl
        if ttl is None:
            ttl = self.bt.ttl
        policy = self._policy or cache.on_backend_error
        self.delete_guard = Guard(name, "delete", policy)
        self.bt = Batch(
            host=cache,
            name=name,
            fn=self.fn,
            get=Guard(name, "get", policy),
            put=Guard(name, "set", policy),
            ids_param=self.ids_param,
            ttl=ttl,
            fn_stamp=ks.function_stamp(name) if ks.groups is None else "",
        )
        # Redis Cluster: the settings with each slot group's copy of the stamp
        self._parts: dict[int, Batch] = {}
        cache.metrics.register_cache(name)

    def part(self, group: int) -> Batch:
        """The settings with ``group``'s copy of the function's stamp (a cluster)."""
        bt = self._parts.get(group)
        if bt is None:
            stamp = self.keyspace.function_stamp(self.name, group)
            bt = self._parts[group] = dataclasses.replace(self.bt, fn_stamp=stamp)
        return bt

    def flow(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Flow[dict[Any, Any]]:
        """The flow of one call: one MGET on one primary, split by slot group on a
        cluster."""
        ids, bound, keys = self.plan(args, kwargs)
        if self.keyspace.groups is None:
            return batch(self.bt, ids, bound, keys)
        return grouped_batch(self.part, ids, bound, keys, self.keyspace.group_of_key)

    def invalidate_all_flow(self) -> Flow[int]:
        """Delete the function's stamp (on a cluster: every group's copy)."""
        ks, cache = self.keyspace, self.cache
        metrics, written = cache.metrics, cache._local_written
        if ks.groups is None:
            return delete([self.bt.fn_stamp], self.delete_guard, metrics, written)
        what = describe("function", [self.name])
        stamps = [ks.function_stamps(self.name)]
        return invalidate(stamps, self.delete_guard, what, ks.groups, metrics, written)

    @property
    def ttl(self) -> float:
        return self.bt.ttl

    def plan(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any], list[str]]:
        """(ids, bound arguments, one key per id)."""
        bound = self.keys.bind(args, kwargs)
        ids = list(bound[self.ids_param])
        keys = [self.keys.value_key({**bound, self.ids_param: i}) for i in ids]
        return ids, bound, keys


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
        return spec.cache._driver.drive(spec.flow(args, kwargs))

    def invalidate(self, *args: Any, **kwargs: Any) -> int:
        """Delete the entries of these ids; returns how many existed."""
        spec = self._spec
        keys = spec.plan(args, kwargs)[2]
        return spec.cache._driver.drive(
            delete(
                keys, spec.delete_guard, spec.cache.metrics, spec.cache._local_written
            )
        )

    def invalidate_all(self) -> bool:
        """Drop every entry of this function in O(1)."""
        spec = self._spec
        return bool(spec.cache._driver.drive(spec.invalidate_all_flow()))


class AsyncCachedBatch(_BatchBase):
    def __init__(self, spec: BatchSpec) -> None:
        super().__init__(spec)
        if hasattr(inspect, "markcoroutinefunction"):
            inspect.markcoroutinefunction(self)

    async def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        spec = self._spec
        return await spec.cache._adriver.drive(spec.flow(args, kwargs))

    async def invalidate(self, *args: Any, **kwargs: Any) -> int:
        """Delete the entries of these ids; returns how many existed."""
        spec = self._spec
        keys = spec.plan(args, kwargs)[2]
        return await spec.cache._adriver.drive(
            delete(
                keys, spec.delete_guard, spec.cache.metrics, spec.cache._local_written
            )
        )

    async def invalidate_all(self) -> bool:
        """Drop every entry of this function in O(1)."""
        spec = self._spec
        return bool(await spec.cache._adriver.drive(spec.invalidate_all_flow()))


def make_batch(
    cache: Owner,
    fn: Callable[..., Any],
    *,
    ttl: float | None,
    ids: str | None,
    name: str | None,
    ignore: Iterable[str],
    policy: BackendErrorPolicy | None,
) -> Any:
    """The wrapper for ``@cache.cached_batch`` (``ttl``/``policy`` None: the Cache's)."""
    if not callable(fn):
        raise ConfigurationError(
            f"cache.cached_batch() decorates functions, got {type(fn).__name__}"
        )
    keys = KeyBuilder(fn, prefix=cache.keyspace, ignore=ignore, name=name)
    params = list(keys.signature.parameters)
    if not params:
        raise ConfigurationError(
            "cached_batch: the function must take the ids as a parameter"
        )
    spec = BatchSpec(cache, fn, keys, ids or params[0], name or keys.name, ttl, policy)
    if inspect.iscoroutinefunction(fn):
        return AsyncCachedBatch(spec)
    return SyncCachedBatch(spec)
