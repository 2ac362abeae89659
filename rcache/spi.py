"""What integrations build on: rcache's service-provider interface (SPI).

``rcache-celery`` imports only ``rcache``, this module and ``rcache.metrics``; an
integration of your own can do the same and rely on the compatibility promise in the
CHANGELOG: the names below keep their meaning and signatures within a release series,
and a Redis key named by :class:`KeySpace` is never renamed without a migration note.

* **Keys.** :class:`KeySpace` names every Redis key rcache and its integrations write
  (``cache.keyspace`` is the cache's own); :class:`LockKeys` the keys of one lock.
* **Arguments.** :class:`KeyBuilder` binds a function's arguments with their defaults
  and encodes them as rcache's keys do; :func:`check_template` is the one rule for key
  templates (``"report:{day}"``); :func:`qualified_name` names a function.
* **Commands.** :func:`run` / :func:`arun` run a callable on the cache's client, and
  :func:`run_script` / :func:`arun_script` a :class:`LuaScript` (EVALSHA, reloaded after
  NOSCRIPT), with rcache's retries and error mapping: a Redis error raises
  :class:`~rcache.BackendUnavailableError` or another :class:`~rcache.RCacheError`. They
  fail closed: no circuit breaker, no bypass (that is for cache reads). :func:`scan` /
  :func:`ascan` list keys with SCAN, never KEYS.
* **Leases.** :func:`renew_lease` keeps a lease alive from rcache's one renewer thread
  per process (with locks and cache computations), :func:`stop_renewing` ends that.
* **Cached functions.** :func:`cached_info` describes a function decorated with
  ``@cache.cached``.
* **Durations.** :data:`Duration`, :func:`parse_duration`, :func:`ttl_ms`.

Importing this module connects nothing and starts nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol, cast

from rcache._admin import _scan
from rcache._config import Duration, parse_duration, ttl_ms
from rcache._decorated import AsyncCached, SyncCached
from rcache._flow import Eval, Run
from rcache._keys import KeyBuilder, KeySpace, LockKeys, check_template, qualified_name
from rcache._leases import Renewable, get_renewer, keep
from rcache._redis import LuaScript

if TYPE_CHECKING:
    import asyncio
    import logging

    from rcache._cache import Cache

__all__ = [
    "CachedInfo",
    "Duration",
    "KeyBuilder",
    "KeySpace",
    "LockKeys",
    "LuaScript",
    "RenewedLease",
    "arun",
    "arun_script",
    "ascan",
    "cached_info",
    "check_template",
    "packaged_script",
    "parse_duration",
    "qualified_name",
    "renew_lease",
    "run",
    "run_script",
    "scan",
    "stop_renewing",
    "ttl_ms",
]

_SCAN_BATCH = 500  # keys per SCAN call: rcache's admin commands use the same


def run(cache: Cache, op: Callable[[Any], Any], *, retry: bool = True) -> Any:
    """``op(client)`` on the cache's sync client; its reply.

    :param op: a callable taking a ``redis.Redis`` (``lambda c: c.set(k, v, nx=True)``,
        or one that runs a pipeline).
    :param retry: retry transient errors (connection reset, timeout) under the cache's
        RetryPolicy; pass False for a command that must not run twice.
    :raises RCacheError: the mapped Redis error (``BackendUnavailableError`` when Redis
        cannot be reached).
    """
    return cache._driver.execute(Run(op, retry=retry))


async def arun(cache: Cache, op: Callable[[Any], Any], *, retry: bool = True) -> Any:
    """Async twin of :func:`run`: ``op`` takes a ``redis.asyncio.Redis`` and returns
    an awaitable."""
    return await cache._adriver.execute(Run(op, retry=retry))


def run_script(
    cache: Cache,
    script: LuaScript,
    keys: Sequence[Any],
    args: Sequence[Any],
    *,
    retry: bool = True,
) -> Any:
    """Run ``script`` with ``KEYS`` = ``keys`` and ``ARGV`` = ``args`` on the cache's
    sync client; its raw reply (``bytes`` for strings).

    EVALSHA first; after NOSCRIPT (a restarted or flushed server) the source is loaded
    and the call made again. Errors as for :func:`run`.
    """
    return cache._driver.execute(Eval(script, keys, args, retry=retry))


async def arun_script(
    cache: Cache,
    script: LuaScript,
    keys: Sequence[Any],
    args: Sequence[Any],
    *,
    retry: bool = True,
) -> Any:
    """Async twin of :func:`run_script`."""
    return await cache._adriver.execute(Eval(script, keys, args, retry=retry))


@functools.cache
def packaged_script(package: str, path: str) -> LuaScript:
    """The Lua script shipped as package data ``path`` of ``package``, read on first
    use and kept for the process: ``packaged_script("rcache_celery",
    "_scripts/begin.lua")``. A line ``-- @include NAME`` pastes rcache's shared
    preamble ``NAME`` (server clock, wake-up pushes)."""
    source = resources.files(package).joinpath(path).read_text()
    name = path.rsplit("/", 1)[-1].removesuffix(".lua")
    return LuaScript(name, source=source)


def scan(cache: Cache, match: str, *, count: int = _SCAN_BATCH) -> list[bytes]:
    """Every key matching ``match`` (SCAN in pages of ``count``, never KEYS; on Redis
    Cluster, every primary). Build ``match`` with :meth:`KeySpace.pattern`. A key
    written during the scan may or may not be listed."""
    found: list[bytes] = []
    cursor = 0
    while True:
        cursor, keys = run(cache, _scan(cursor, match, count))
        found += keys
        if int(cursor) == 0:
            return found


async def ascan(cache: Cache, match: str, *, count: int = _SCAN_BATCH) -> list[bytes]:
    """Async twin of :func:`scan`."""
    found: list[bytes] = []
    cursor = 0
    while True:
        cursor, keys = await arun(cache, _scan(cursor, match, count))
        found += keys
        if int(cursor) == 0:
            return found


@dataclass(frozen=True)
class CachedInfo:
    """What an integration may know of a function decorated with ``@cache.cached``.

    ``name`` is its cache name (``module.qualname`` unless ``name=`` was given),
    ``function`` the undecorated function, ``ttl`` its entries' time to live in
    seconds, ``is_async`` whether it is an ``async def``.
    """

    name: str
    function: Callable[..., Any]
    cache: Cache
    ttl: float
    is_async: bool


def cached_info(fn: Any) -> CachedInfo | None:
    """A :class:`CachedInfo` for a function decorated with ``@cache.cached`` (also
    when bound as a method), or None for anything else (``@cache.cached_batch``
    included)."""
    if not isinstance(fn, (SyncCached, AsyncCached)):
        return None
    spec = fn._spec
    cache = cast("Cache", spec.cache)  # a spec knows its Cache by a protocol only
    return CachedInfo(
        spec.name, spec.fn, cache, float(spec.ttl), isinstance(fn, AsyncCached)
    )


class RenewedLease(Protocol):
    """What :func:`renew_lease` returns: pass it to :func:`stop_renewing`."""

    #: True once the lease is lost (Redis said so, or its deadline passed).
    lost: bool
    #: Why it was lost ("" while it is not).
    lost_reason: str


def renew_lease(
    cache: Cache,
    script: LuaScript,
    keys: Sequence[Any],
    args: Sequence[Any],
    *,
    ttl: float,
    retry: bool = True,
    loop: asyncio.AbstractEventLoop | None = None,
    name: str = "",
    logger: logging.Logger | None = None,
    on_renewed: Callable[[], object] | None = None,
    on_lost: Callable[[str], object] | None = None,
) -> RenewedLease:
    """Keep a lease of ``ttl`` seconds, taken just now, alive until
    :func:`stop_renewing`: every ``ttl / 3`` rcache's per-process renewer runs
    ``script`` with ``keys`` and ``args`` on the cache's client. The script replaces
    the lease's TTL if the lease is still the caller's and replies 1; any other reply
    means it is lost (expired or taken over).

    The lease is also lost when no renewal succeeded within ``ttl`` (a client-side
    deadline, counted from this call), so a holder cut off from Redis learns it before
    the server can give the lease to someone else. A failed renewal is retried within a
    second and logged at DEBUG (under ``logger``, default ``rcache.lock``).

    :param retry: retry transient errors within a renewal (False: a script that must
        not run twice).
    :param loop: the running event loop of an async holder: the renewal runs there,
        through the cache's async client (a blocked loop then loses its lease, as a
        paused process does). None: the cache's sync client, from the renewer thread.
    :param name: names the lease in log lines.
    :param on_renewed: called after each renewal; ``on_lost(reason)`` once, when the
        lease is lost. Both run in the renewer's threads (an async lease's on its loop):
        keep them short and thread-safe.
    """
    return keep(
        cache,
        Eval(script, keys, args, retry=retry),
        ttl=ttl,
        loop=loop,
        name=name,
        log=logger,
        on_renewed=on_renewed,
        on_lost=on_lost,
    )


def stop_renewing(lease: RenewedLease) -> bool:
    """Stop renewing ``lease`` (a reply still in flight is ignored); True if it was lost
    before. Call it before releasing the lease."""
    get_renewer().remove(cast(Renewable, lease))
    return lease.lost
