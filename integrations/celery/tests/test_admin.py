"""task_guards(): the keys UniqueTask and LockedTask hold, with task ids and states."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import redis
from rcc_helpers import eventually, runs

import rcache_celery

pytestmark = pytest.mark.slow


def test_task_guards_lists_running_enqueued_and_locked_tasks(
    ns: SimpleNamespace, worker: Any, r: redis.Redis, token: str
) -> None:
    cache = ns.cache
    running = ns.unique.delay(token)  # runs until the gate opens
    eventually(lambda: runs(r, token) == 1, message="the unique task started")
    later = ns.quick.apply_async((token,), countdown=60)  # enqueued, not started
    locked = ns.locked_skip.delay(token)  # holds skip:{token} until the gate opens
    eventually(lambda: runs(r, token) == 2, message="the locked task started")

    guards = rcache_celery.task_guards(cache)
    ids = {running.id, later.id, locked.id}
    mine = [g for g in guards if g.task_id in ids]
    rows = {(g.kind, g.task_id): g for g in mine}
    unique = rows["unique", running.id]
    assert unique.state == "running" and unique.task == "rcc.unique"
    assert 0 < unique.remaining <= 3
    assert rows["unique", later.id].state == "enqueued"
    assert rows["unique", later.id].task == "rcc.quick"
    lock = rows["locked", locked.id]
    assert lock.state == "running" and lock.name == f"skip:{token}"
    assert lock.task is None
    assert all(g.key.startswith(f"{cache.prefix}:celery:") for g in mine)

    r.set(f"gate:{token}", 1)
    running.get(timeout=20)
    locked.get(timeout=20)
    later.revoke()
    eventually(
        lambda: (
            not any(
                g.task_id in {running.id, locked.id}
                for g in rcache_celery.task_guards(cache)
            )
        ),
        message="guards released",
    )


async def test_atask_guards_matches(ns: SimpleNamespace, token: str) -> None:
    cache = ns.cache
    sent = ns.quick.apply_async((token + "a",), countdown=120)
    sync_rows = [g for g in rcache_celery.task_guards(cache) if g.task_id == sent.id]
    async_rows = [
        g for g in await rcache_celery.atask_guards(cache) if g.task_id == sent.id
    ]
    assert [(g.kind, g.state, g.key) for g in async_rows] == [
        (g.kind, g.state, g.key) for g in sync_rows
    ]
    assert len(sync_rows) == 1
    sent.revoke()
    await cache.aclose()
