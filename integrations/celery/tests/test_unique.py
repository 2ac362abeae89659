"""UniqueTask against real prefork workers: dedup, release ordering, bypass."""

from __future__ import annotations

import multiprocessing
import pickle
import uuid
from types import SimpleNamespace
from typing import Any

import celery
import pytest
import redis
from rcc_helpers import delay_many, eventually, log_has, runs

import rcache_celery

pytestmark = pytest.mark.slow


def test_duplicate_delay_returns_the_existing_task(
    ns: SimpleNamespace, worker: Any, r: redis.Redis, token: str
) -> None:
    r1 = ns.unique.delay(token)
    r2 = ns.unique.delay(token, 0)  # positional default == omitted
    r3 = ns.unique.delay(token=token, payload=5)  # payload is not in unique_on
    assert r2.id == r1.id == r3.id
    eventually(lambda: runs(r, token) == 1, message="the one run started")
    r.set(f"gate:{token}", 1)
    assert r1.get(timeout=20) == token
    # Released before the result was stored: a delay() right after get() is new.
    r4 = ns.unique.delay(token)
    assert r4.id != r1.id
    assert r4.get(timeout=20) == token
    assert runs(r, token) == 2


def test_arguments_are_type_preserving(
    ns: SimpleNamespace, worker: Any, r: redis.Redis
) -> None:
    a = ns.quick.delay(7)
    b = ns.quick.delay("7")
    assert a.id != b.id
    a.get(timeout=20)
    b.get(timeout=20)


def test_on_duplicate_raise_and_pickling(
    ns: SimpleNamespace, r: redis.Redis, token: str
) -> None:
    task = ns.unique
    first = task.delay(token)
    task.on_duplicate = "raise"
    try:
        with pytest.raises(rcache_celery.DuplicateTaskError) as info:
            task.delay(token)
    finally:
        task.on_duplicate = "return_existing"
    assert info.value.task_id == first.id
    clone = pickle.loads(pickle.dumps(info.value))
    assert (clone.task_id, str(clone)) == (first.id, str(info.value))
    err = rcache_celery.TaskLockedError("k", "id")
    clone2 = pickle.loads(pickle.dumps(err))
    assert (str(clone2), clone2.lock, clone2.holder) == (str(err), "k", "id")


def test_thousand_concurrent_duplicates_run_once(
    ns: SimpleNamespace, worker: Any, r: redis.Redis, token: str
) -> None:
    """1,000 delay() calls at once: 500 from 2 spawned processes, 500 from threads."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        remote = pool.starmap_async(delay_many, [(token, 250, 8), (token, 250, 8)])
        local = delay_many(token, 500, 16)
        ids = set(local)
        for chunk in remote.get(timeout=90):
            ids.update(chunk)
    assert len(ids) == 1
    eventually(lambda: runs(r, token) == 1, message="the one run started")
    r.set(f"gate:{token}", 1)
    assert ns.unique.AsyncResult(ids.pop()).get(timeout=20) == token
    assert runs(r, token) == 1


def test_send_task_bypass_is_ignored_and_counted(
    ns: SimpleNamespace, worker: Any, r: redis.Redis, token: str
) -> None:
    first = ns.unique.delay(token)
    eventually(lambda: runs(r, token) == 1, message="first run started")
    bypass = ns.app.send_task("rcc.unique", args=[token])
    assert bypass.id != first.id
    assert log_has(worker, f"ignored rcc.unique[{bypass.id}]")
    r.set(f"gate:{token}", 1)
    assert first.get(timeout=20) == token
    assert runs(r, token) == 1
    assert bypass.state == "PENDING"  # Ignore(): no fake SUCCESS was stored


def test_send_task_without_a_holder_runs(
    ns: SimpleNamespace, worker: Any, r: redis.Redis, token: str
) -> None:
    assert ns.app.send_task("rcc.quick", args=[token]).get(timeout=20) == 1


def test_chord_with_duplicates_completes(
    ns: SimpleNamespace, worker: Any, r: redis.Redis
) -> None:
    x = uuid.uuid4().int % 10**9
    header = [ns.add.s(x, 1), ns.add.s(x, 1), ns.add.s(x, 2)]
    result = celery.chord(header)(ns.tsum.s())
    assert result.get(timeout=30) == 3 * x + 4
    assert int(r.get(f"runs:add:{x}:1") or 0) == 2  # canvas members skip dedup
    group_result = celery.group(ns.add.s(x, 5), ns.add.s(x, 5)).apply_async()
    assert group_result.get(timeout=30) == [x + 5, x + 5]


def test_beat_bypass_is_ignored_and_counted(
    ns: SimpleNamespace, worker: Any, r: redis.Redis, token: str, celery_redis: Any
) -> None:
    """A beat whose app does not import the task sends it with send_task, bypassing
    apply_async (celery-once #136): the copy is ignored at run time, no second run."""
    from celery.beat import ScheduleEntry, Scheduler

    first = ns.unique.delay(token)
    eventually(lambda: runs(r, token) == 1, message="first run started")
    beat_app = celery.Celery(
        "beat-only", broker=f"redis://127.0.0.1:{celery_redis.port}/0"
    )
    try:
        scheduler = Scheduler(app=beat_app, lazy=True)
        entry = ScheduleEntry(
            name="sync", task="rcc.unique", args=(token,), schedule=60, app=beat_app
        )
        assert "rcc.unique" not in beat_app.tasks
        copy = scheduler.apply_async(entry, advance=False)
        assert copy.id != first.id
        assert log_has(worker, f"ignored rcc.unique[{copy.id}]")
    finally:
        beat_app.close()
    r.set(f"gate:{token}", 1)
    assert first.get(timeout=20) == token
    assert runs(r, token) == 1
