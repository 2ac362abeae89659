"""Cache warming through Celery beat: recompute entries before they expire."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rcache import ConfigurationError
from rcache.spi import (
    Duration,
    cached_info,
    parse_duration,
    qualified_name,
    run,
    ttl_ms,
)
from rcache_celery._guard import release, tag_safe
from rcache_celery._state import state_of

if TYPE_CHECKING:
    from celery import Celery  # type: ignore[import-untyped]

__all__ = ["warm"]

log = logging.getLogger("rcache.celery")


def _entries(
    args: Iterable[Sequence[Any] | Mapping[str, Any]],
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    out: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    for entry in args:
        if isinstance(entry, Mapping):
            out.append(((), dict(entry)))
        elif isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence):
            raise ConfigurationError(
                f"warm(args=...) takes a list of argument tuples (or keyword dicts), like "
                f"[('books',), ('games',)]; got the entry {entry!r}"
            )
        else:
            out.append((tuple(entry), {}))
    return out


def warm(
    app: Celery,
    fn: Any,
    *,
    every: Duration,
    args: Iterable[Sequence[Any] | Mapping[str, Any]] = ((),),
    jitter: Duration | None = None,
    name: str | None = None,
) -> Any:
    """Register a beat entry that recomputes ``fn``'s entries before they expire.

    :param app: an app on which ``rcache_celery.install(app, cache)`` ran.
    :param fn: a function decorated with ``@cache.cached(ttl=...)`` (sync or async).
    :param every: the period (seconds, ``"4m"``); it must be shorter than the entries'
        ttl, so that each is recomputed before it expires.
    :param args: the argument tuples (or keyword dicts) of the entries to keep warm.
    :param jitter: up to this many seconds of random delay before each run, so that
        many warmers with the same period do not hit the database together; default
        5% of ``every`` (at most 5 s).
    :param name: the task and beat entry name; default ``rcache_celery.warm:<fn>``.
    :returns: the registered task (``.delay()`` warms now).
    :raises ConfigurationError: for a function that is not cached, or a period that
        is not shorter than its ttl.

    Each run takes a dedup key for most of a period first, so two beats (or a beat's
    catch-up after a restart, or ``worker -B`` next to a ``celery beat``) never compute
    twice. Works with ``celery beat`` and ``celery worker -B``: call ``warm`` where the
    app is created, so that beat and workers both register it.
    """
    spec = cached_info(fn)
    if spec is None:
        raise ConfigurationError(
            f"warm() takes a function decorated with @cache.cached; got {fn!r}"
        )
    refresh = fn.refresh
    period = parse_duration(every)
    ttl = spec.ttl
    if jitter is None:
        spread = min(0.05 * period, 5.0)
    elif jitter == 0:
        spread = 0.0
    else:
        spread = parse_duration(jitter)
    if period + spread >= ttl:
        raise ConfigurationError(
            f"warm(every={period:g}s, jitter={spread:g}s) for {spec.name} would let its "
            f"entries (ttl={ttl:g}s) expire first: warm more often than the ttl"
        )
    gate_ttl = max(0.9 * (period - spread), 0.001)
    entries = _entries(args)
    task_name = name or f"rcache_celery.warm:{qualified_name(spec.function)}"
    is_async = spec.is_async

    def failed_entry(args: tuple[Any, ...], exc: BaseException) -> None:
        log.warning("rcache-celery: warming %s%r failed: %r", spec.name, args, exc)

    def refresh_all() -> tuple[int, int]:
        done = failed = 0
        for a, kw in entries:
            try:
                refresh(*a, **kw)
                done += 1
            except Exception as exc:  # one bad entry must not stop the others
                failed += 1
                failed_entry(a, exc)
        return done, failed

    async def arefresh_all() -> tuple[int, int]:
        done = failed = 0
        try:
            for a, kw in entries:
                try:
                    await refresh(*a, **kw)
                    done += 1
                except Exception as exc:
                    failed += 1
                    failed_entry(a, exc)
        finally:
            # The async client belongs to this short-lived loop: close it with it.
            await spec.cache.aclose()
        return done, failed

    def run_warm(self: Any) -> int:
        state = state_of(app)
        cache = state.cache
        if spread:
            time.sleep(random.uniform(0, spread))
        gate = cache.keyspace.warm_gate(tag_safe(task_name))
        token = self.request.id or "manual"
        # The gate lives for most of a period: a second beat (whatever its phase) or a
        # catch-up run inside that window is skipped, while this beat's next tick,
        # a period later minus at most the jitter, finds it gone.
        taken = run(cache, lambda c: c.set(gate, token, nx=True, px=ttl_ms(gate_ttl)))
        if not taken:
            log.info("rcache-celery: %s skipped, another run is recent", task_name)
            return 0
        start = time.perf_counter()
        if is_async:
            done, failed = asyncio.run(arefresh_all())
        else:
            done, failed = refresh_all()
        seconds = time.perf_counter() - start
        if failed:
            release(cache, gate, token)  # let the next tick try again
        result = "failure" if failed else "success"
        state.metrics.warm_run(spec.name, result, done, failed, seconds)
        return done

    task = app.task(name=task_name, bind=True, ignore_result=True, shared=False)(
        run_warm
    )
    schedule = dict(app.conf.beat_schedule or {})
    # expires: a warm run stuck in a backlog past its period is pointless.
    schedule[task_name] = {
        "task": task_name,
        "schedule": period,
        "options": {"expires": period},
    }
    app.conf.beat_schedule = schedule
    return task
