"""rcache-celery's guards when the rcache Cache is a Redis Cluster (issue 15).

A real prefork worker (broker db 4 on the session server) whose Cache, and so every
guard key and run marker, lives on a local 3-primary cluster: the guards' Lua scripts
keep their keys in one slot (hash tags), and a cached function warms there too.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.exceptions import WorkerLostError
from rcc_helpers import Worker, eventually, runs

from rcache.testing import RedisCluster, RedisServer

pytestmark = pytest.mark.slow

BROKER_DB = 4


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(replicas=0) as c:
        yield c


@pytest.fixture(scope="module")
def ns_cluster(
    celery_redis: RedisServer, cluster: RedisCluster
) -> Iterator[SimpleNamespace]:
    """The producer side: its Cache is the cluster too (UniqueTask dedups there)."""
    module = importlib.import_module("rcc_app")
    built: SimpleNamespace = module.build(BROKER_DB, None, cluster.url)
    yield built
    built.cache.close()
    built.app.close()


@pytest.fixture(scope="module")
def worker_cluster(
    celery_redis: RedisServer,
    cluster: RedisCluster,
    ns_cluster: SimpleNamespace,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Worker]:
    w = Worker(
        "wc",
        celery_redis,
        tmp_path_factory.mktemp("wc"),
        RCC_BROKER_DB=str(BROKER_DB),
        RCC_CACHE_URL=cluster.url,
    )
    try:
        w.wait_ready(ns_cluster.app)
        yield w
    finally:
        w.stop()


def _stored(cluster: RedisCluster, key: str, payload: bytes) -> bool:
    """Does the entry under ``key`` hold ``payload`` (its JSON)?"""
    client = cluster.client()
    try:
        return payload in (client.get(key) or b"")
    finally:
        client.close()


def _on_cluster(cluster: RedisCluster, key: str) -> bool:
    client = cluster.client()
    try:
        return bool(client.exists(key))
    finally:
        client.close()


def test_unique_task_dedups_on_the_cluster(
    ns_cluster: SimpleNamespace,
    worker_cluster: Any,
    cluster: RedisCluster,
    r: redis.Redis,
    token: str,
) -> None:
    first = ns_cluster.unique.delay(token)
    again = [ns_cluster.unique.delay(token) for _ in range(5)]
    assert {a.id for a in again} == {first.id}
    eventually(lambda: runs(r, token) == 1, message="the one run started")
    guards = [
        k.decode()
        for node in cluster.primaries()
        for k in node.client().keys("rcc:celery:u:*")
    ]
    assert guards  # the guard key is on the cluster, not on the broker's server
    assert all(_on_cluster(cluster, g) for g in guards)
    r.set(f"gate:{token}", 1)
    assert first.get(timeout=20) == token
    later = ns_cluster.unique.delay(token)  # released: a new task
    assert later.id != first.id and later.get(timeout=20) == token
    assert runs(r, token) == 2


def test_locked_task_excludes_on_the_cluster(
    ns_cluster: SimpleNamespace, worker_cluster: Any, r: redis.Redis, token: str
) -> None:
    results = [ns_cluster.fenced.delay(token, i) for i in range(8)]
    assert sorted(res.get(timeout=60) for res in results) == list(range(8))
    assert runs(r, token) == 8
    assert int(r.get(f"fence:{token}") or 0) == 8  # no lost update: never overlapped
    assert not r.get(f"overlap:{token}")


def test_the_worker_warms_a_cached_function_on_the_cluster(
    ns_cluster: SimpleNamespace,
    worker_cluster: Any,
    r: redis.Redis,
    cluster: RedisCluster,
) -> None:
    """warm(): the worker recomputes the entries (under its gate key, on the cluster);
    the producer's next call is a hit on what the worker stored."""
    before = int(r.get("computed:books") or 0)  # other workers warm "books" too
    ns_cluster.warm_task.delay()  # ignore_result: poll for what it did
    eventually(
        lambda: int(r.get("computed:books") or 0) > before, message="the worker warmed"
    )
    computed = int(r.get("computed:books") or 0)
    # the counter moves inside the function, the entry lands when it returns: wait for
    # the worker's store, or the producer's call can come first and compute (a race
    # seen once in CI: ['books', 2] == ['books', 1])
    key = ns_cluster.top_products.key_for("books")
    eventually(
        lambda: _stored(cluster, key, f'["books",{computed}]'.encode()),
        message="the worker stored what it computed",
    )
    assert ns_cluster.top_products("books") == ["books", computed]  # a hit...
    assert int(r.get("computed:books") or 0) == computed  # ...computed by the worker


def test_sigkill_of_the_child_frees_the_key_on_the_cluster(
    ns_cluster: SimpleNamespace,
    worker_cluster: Any,
    cluster: RedisCluster,
    r: redis.Redis,
    token: str,
) -> None:
    """Crash safety on the cluster: the worker's main process releases the guard of a
    child that was SIGKILLed mid-task (test_recovery.py's first test, on the cluster)."""
    key = str(ns_cluster.suicide._guard_key((token,), {}))
    res = ns_cluster.suicide.delay(token)
    eventually(lambda: runs(r, token) == 1, message="the task ran")
    killed = time.monotonic()  # the task SIGKILLs itself right after its INCR
    eventually(lambda: not _on_cluster(cluster, key), timeout=5, message="released")
    assert time.monotonic() - killed < 1.0  # the lease (lock_ttl=30) did not expire
    with pytest.raises(WorkerLostError):
        res.get(timeout=20, propagate=True)
    # not vacuous: the main process released this task's key itself (its log says so;
    # checking the key right after delay() raced with a fast worker in CI)
    released = f"released rcc.suicide[{res.id}] after worker_lost"
    eventually(lambda: released in worker_cluster.log.read_text(), message="logged")
