"""LockedTask with two real prefork workers; visibility-timeout redelivery."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from rcc_helpers import eventually, log_has, runs

import rcache_celery

pytestmark = pytest.mark.slow


def test_two_workers_never_overlap(
    ns: SimpleNamespace,
    ns_vt: SimpleNamespace,
    worker: Any,
    worker_vt: Any,
    r: redis.Redis,
    token: str,
) -> None:
    """20 runs of one lock key spread over two workers (4 children): a fenced
    read-modify-write counter loses no update and no run saw another running."""
    n = 20
    results = [(ns if i % 2 else ns_vt).fenced.delay(token, i) for i in range(n)]
    assert sorted(res.get(timeout=90) for res in results) == list(range(n))
    assert runs(r, token) == n
    assert int(r.get(f"fence:{token}") or 0) == n
    assert int(r.get(f"overlap:{token}") or 0) == 0
    assert not r.exists(ns.fenced._guard_key((token, 0), {}))
    # Both workers took part (contention across processes, not within one).
    assert "rcc.fenced" in worker.log_text()
    assert "rcc.fenced" in worker_vt.log_text()


def test_on_locked_skip_ignores_the_second_copy(
    ns: SimpleNamespace, worker: Any, r: redis.Redis, token: str
) -> None:
    first = ns.locked_skip.delay(token)
    eventually(lambda: runs(r, token) == 1, message="first run holds the lock")
    second = ns.locked_skip.delay(token)
    assert log_has(worker, f"rcc.locked_skip[{second.id}] found")
    r.set(f"gate:{token}", 1)
    first.get(timeout=20)
    assert runs(r, token) == 1
    assert second.state == "PENDING"


def test_countdown_past_visibility_timeout_runs_once(
    ns_vt: SimpleNamespace,
    worker_vt: Any,
    r: redis.Redis,
    token: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """visibility_timeout=2 s, countdown=6 s: kombu restores the unacked message while
    the first copy waits, so the worker holds several copies of the same task id;
    exactly one runs, the others are ignored and counted."""
    with caplog.at_level(logging.WARNING, logger="rcache.celery"):
        res = ns_vt.quick.apply_async((token,), countdown=6)
    assert "visibility_timeout" in caplog.text
    assert res.get(timeout=60) == 1
    assert log_has(worker_vt, f"ignored a redelivered copy of rcc.quick[{res.id}]", 30)
    assert runs(r, token) == 1


def test_on_locked_wait_then_fail(
    ns: SimpleNamespace, worker: Any, r: redis.Redis, token: str
) -> None:
    """Two tasks share the lock "wait:{token}": the waiter runs after the holder; a
    fail-fast task gets TaskLockedError (it survives the result backend)."""
    first = ns.locked_wait.delay(token, 1)
    eventually(lambda: runs(r, token) == 1, message="holder runs")
    failing = ns.locked_fail.delay(token)
    with pytest.raises(rcache_celery.TaskLockedError) as info:
        failing.get(timeout=20)
    assert info.value.holder == first.id
    assert runs(r, token) == 1
    second = ns.locked_wait.delay(token, 2)
    assert log_has(worker, f"rcc.locked_wait[{second.id}] found")
    r.set(f"gate:{token}", 1)
    assert (first.get(timeout=20), second.get(timeout=30)) == (1, 2)
    assert runs(r, token) == 2  # the fail-fast task never ran its body
