"""Multi-process lock tests on a real redis-server (spawned processes, not threads).

L1: many processes on one name with an unfenced read-modify-write counter: no lost update,
no overlap, fences strictly increasing in grant order. L2/L3: holder SIGKILL and
SIGSTOP/SIGCONT. L18/L19: RW lock and semaphore, including a killed holder.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import rcache

sys.path.insert(0, str(Path(__file__).parent))
import lockworkers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

CTX = multiprocessing.get_context("spawn")


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for p in started:
        if p.is_alive():
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.join(10)


def _start(procs: list[Any], target: Any, *args: Any) -> Any:
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    procs.append(p)
    return p


def _run_all(procs: list[Any], ready: Any, go: Any, count: int) -> None:
    for _ in range(count):
        ready.get(timeout=60)
    go.set()
    for p in procs:
        p.join(80)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"


@pytest.mark.parametrize(("fair", "n_each"), [(False, 120), (True, 40)])
def test_eight_processes_no_lost_update_no_overlap_fences_in_order(
    redis_url: str, tmp_path: Path, procs: list[Any], fair: bool, n_each: int
) -> None:
    n_procs = 8
    counter = tmp_path / "counter"
    counter.write_text("0")
    ready, go = CTX.Queue(), CTX.Event()
    logs = [tmp_path / f"log{i}.json" for i in range(n_procs)]
    for log in logs:
        _start(
            procs,
            lockworkers.counter_worker,
            redis_url,
            "counter",
            n_each,
            str(counter),
            str(log),
            ready,
            go,
            fair,
        )
    _run_all(procs, ready, go, n_procs)

    total = n_procs * n_each
    assert int(counter.read_text()) == total  # no lost update
    records = sorted(
        (tuple(r) for log in logs for r in json.loads(log.read_text())),
        key=lambda r: r[0],
    )
    assert [r[0] for r in records] == list(range(total))  # each value read exactly once
    fences = [r[1] for r in records]
    assert all(a < b for a, b in itertools.pairwise(fences)), "fences not increasing"
    for prev, nxt in itertools.pairwise(records):  # CLOCK_MONOTONIC is system-wide
        assert nxt[2] >= prev[3], f"critical sections overlap: {prev} {nxt}"


def test_sigkilled_holder_is_replaced_within_pttl(
    redis_url: str, redis_client: redis.Redis, procs: list[Any]
) -> None:
    cache = rcache.Cache(redis_url, prefix="t")
    queue = CTX.Queue()
    holder = _start(
        procs, lockworkers.hold_worker, redis_url, "crash", 1.5, "lock", queue
    )
    queue.get(timeout=30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    pttl = redis_client.pttl("t:l:{crash}") / 1000
    assert pttl > 0, "the killed holder's lease should still be running"
    start = time.monotonic()
    lock = cache.lock("crash", ttl=5, timeout=10)
    assert lock.acquire()
    elapsed = time.monotonic() - start
    # One re-check at the end of the PTTL, no extra TTL; Redis's blocked-client timer
    # runs at hz=10, so allow 100 ms plus scheduling slack on a 2-core box.
    assert elapsed <= pttl + 0.4, (elapsed, pttl)
    lock.release()
    cache.close()


def test_sigstopped_holder_past_ttl_cannot_hurt_new_holder(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path, procs: list[Any]
) -> None:
    cache = rcache.Cache(redis_url, prefix="t")
    queue = CTX.Queue()
    go, out = tmp_path / "go", tmp_path / "out.json"
    child = _start(
        procs,
        lockworkers.stopped_holder,
        redis_url,
        "stop",
        0.8,
        queue,
        str(go),
        str(out),
    )
    old_token = queue.get(timeout=30)
    old_fence = int(redis_client.get("t:l:{stop}:fence") or 0)  # the child's fence
    os.kill(child.pid, signal.SIGSTOP)
    lock = cache.lock("stop", ttl=30, timeout=10)
    assert lock.acquire()  # after the stopped holder's lease ran out
    new_fence = lock.fence
    os.kill(child.pid, signal.SIGCONT)
    go.write_text("go")
    child.join(30)
    assert child.exitcode == 0
    result = json.loads(out.read_text())
    assert result == {
        "on_lost": ["stop"],
        "ensure_held": "LockLostError",
        "release": "LockNotOwnedError",
    }
    # The stale release deleted nothing: the new holder's key is intact.
    assert redis_client.get("t:l:{stop}") == lock.lease.token.encode()  # type: ignore[union-attr]
    assert lock.lease.token != old_token  # type: ignore[union-attr]
    assert new_fence == old_fence + 1
    lock.release()
    cache.close()


def test_semaphore_limit_across_processes_and_killed_permit_reclaimed(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path, procs: list[Any]
) -> None:
    limit = 2
    queue = CTX.Queue()
    killed = _start(
        procs, lockworkers.hold_worker, redis_url, "sem", 1.0, "sem:2", queue
    )
    queue.get(timeout=30)
    os.kill(killed.pid, signal.SIGKILL)
    killed.join(10)
    procs.clear()
    ready, go = CTX.Queue(), CTX.Event()
    outs = [tmp_path / f"sem{i}.json" for i in range(4 * limit)]
    for out in outs:
        _start(
            procs,
            lockworkers.semaphore_worker,
            redis_url,
            "sem",
            limit,
            25,
            str(out),
            ready,
            go,
        )
    _run_all(procs, ready, go, len(outs))
    peaks = [json.loads(o.read_text())["peak"] for o in outs]
    assert max(peaks) <= limit
    assert max(peaks) == limit  # the limit was actually reached (the test can fail)
    assert redis_client.zcard("t:l:{sem}:sem") == 0  # the dead permit was reclaimed


def test_rwlock_processes_and_killed_reader(
    redis_url: str, tmp_path: Path, procs: list[Any]
) -> None:
    cache = rcache.Cache(redis_url, prefix="t")
    queue = CTX.Queue()
    reader = _start(
        procs, lockworkers.hold_worker, redis_url, "doc", 1.0, "read", queue
    )
    queue.get(timeout=30)
    os.kill(reader.pid, signal.SIGKILL)
    reader.join(10)
    procs.clear()
    start = time.monotonic()
    with cache.rwlock("doc", timeout=10).write():
        elapsed = time.monotonic() - start
    assert elapsed <= 1.0 + 0.5  # the dead reader's own lease, not forever

    ready, go = CTX.Queue(), CTX.Event()
    outs = [tmp_path / f"rw{i}.json" for i in range(6)]
    for out in outs:
        _start(procs, lockworkers.rw_worker, redis_url, "doc", 40, str(out), ready, go)
    _run_all(procs, ready, go, len(outs))
    results = [json.loads(o.read_text()) for o in outs]
    assert sum(r["bad"] for r in results) == 0
    assert sum(r["writes"] for r in results) == 6 * 10
    cache.close()
