"""In-process checks of keys, TTLs and configuration errors (no worker needed)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from celery import Celery

import rcache
import rcache_celery
from rcache.testing import RedisServer, free_port
from rcache_celery._tasks import _delay_seconds


@pytest.fixture
def app(celery_redis: RedisServer) -> Iterator[Any]:
    # Broker db 5: no worker consumes it; published messages just sit there.
    app = Celery("core", broker=f"redis://127.0.0.1:{celery_redis.port}/5")
    cache = rcache.Cache(
        f"redis://127.0.0.1:{celery_redis.port}/2", prefix="c" + uuid.uuid4().hex[:8]
    )
    rcache_celery.install(app, cache)
    yield app
    rcache_celery.uninstall(app)
    app.close()


def test_keys_bind_defaults_and_preserve_types(app: Any) -> None:
    @app.task(base=rcache_celery.UniqueTask, name="core.f", shared=False)
    def f(a: Any, b: int = 2, *, c: str = "x") -> None: ...

    key = f._guard_key
    assert key((1,), {}) == key((), {"a": 1}) == key((1, 2), {"c": "x"})
    assert key((1,), {}) != key(("1",), {})
    assert key((1,), {}) != key((1, 3), {})
    assert key(({"k": "{}"},), {}).count("{") == 1  # digests keep the hash tag intact


def test_pending_ttl_covers_the_countdown(app: Any, r: redis.Redis) -> None:
    @app.task(base=rcache_celery.UniqueTask, name="core.g", unique_ttl=1, shared=False)
    def g(x: int) -> None: ...

    res = g.apply_async((1,), countdown=30)
    key = g._guard_key((1,), {})
    assert r.get(key) == res.id.encode()
    assert 30_000 < r.pttl(key) <= 91_000  # unique_ttl/lock_ttl + the 30 s delay
    eta = datetime.now(timezone.utc) + timedelta(seconds=100)
    res2 = g.apply_async((2,), eta=eta)
    assert r.pttl(g._guard_key((2,), {})) > 100_000
    assert g.apply_async((2,), eta=eta).id == res2.id


def test_delay_seconds() -> None:
    assert _delay_seconds(None, None) == 0
    assert _delay_seconds(5, None) == 5
    assert _delay_seconds(-1, None) == 0
    soon = datetime.now(timezone.utc) + timedelta(seconds=50)
    assert 45 < _delay_seconds(None, soon) <= 50
    assert 45 < _delay_seconds(None, soon.isoformat()) <= 50
    assert 45 < _delay_seconds(None, soon.replace(tzinfo=None)) <= 50


def test_configuration_errors_name_the_fix(app: Any) -> None:
    @app.task(
        base=rcache_celery.UniqueTask, name="core.h", unique_on=["nope"], shared=False
    )
    def h(x: int) -> None: ...

    with pytest.raises(rcache.ConfigurationError, match="parameters are"):
        h.delay(1)

    @app.task(
        base=rcache_celery.LockedTask, name="core.i", lock_key="r:{day}", shared=False
    )
    def i(x: int) -> None: ...

    with pytest.raises(rcache.ConfigurationError, match="'day'"):
        i._guard_key((1,), {})


def test_lock_keys_use_the_template(app: Any) -> None:
    @app.task(
        base=rcache_celery.LockedTask,
        name="core.j",
        lock_key="report:{day}",
        shared=False,
    )
    def j(day: str, verbose: bool = False) -> None: ...

    key = j._guard_key(("mon",), {"verbose": True})
    assert key.endswith(":celery:l:{report:mon}")
    assert key == j._guard_key((), {"day": "mon"})


def test_enqueue_fails_closed_when_redis_is_down(celery_redis: RedisServer) -> None:
    app = Celery("down", broker=f"redis://127.0.0.1:{celery_redis.port}/5")
    cache = rcache.Cache(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    rcache_celery.install(app, cache)

    @app.task(base=rcache_celery.UniqueTask, name="down.f", shared=False)
    def f(x: int) -> None: ...

    try:
        with pytest.raises(rcache.BackendUnavailableError):
            f.delay(1)
    finally:
        rcache_celery.uninstall(app)
        app.close()


def test_warm_task_refreshes_sync_and_async_entries_under_a_gate(
    app: Any, celery_redis: RedisServer, r: redis.Redis
) -> None:
    cache = rcache_celery._state.state_of(app).cache
    calls: list[str] = []

    @cache.cached(ttl=60)
    def top(category: str) -> str:
        calls.append(category)
        return category.upper()

    @cache.cached(ttl=60)
    async def atop(category: str) -> str:
        calls.append("a" + category)
        return category

    task = rcache_celery.warm(
        app, top, every=30, jitter=0, args=[("x",), {"category": "y"}]
    )
    atask = rcache_celery.warm(app, atop, every=30, jitter=0, args=[("z",)])
    assert app.conf.beat_schedule[task.name]["schedule"] == 30
    assert task.apply().get() == 2
    assert atask.apply().get() == 1
    assert sorted(calls) == ["az", "x", "y"]
    assert r.pttl(top.key_for("x")) > 55_000
    assert top("x") == "X" and len(calls) == 3  # served warm
    assert task.apply().get() == 0  # a second beat within the period: skipped
    assert len(calls) == 3


def test_uninstall_disconnects_the_hooks(app: Any) -> None:
    from celery import signals

    def receivers() -> int:
        return len(signals.task_failure.receivers) + len(signals.task_revoked.receivers)

    before = receivers()
    rcache_celery.uninstall(app)
    assert receivers() == before - 2
    rcache_celery.install(app, rcache.Cache("memory://"))
    assert receivers() == before
