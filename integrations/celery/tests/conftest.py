"""Fixtures for rcache-celery: a redis-server and real prefork workers, per session.

One redis-server serves as broker (db 0, and db 3 for the short-visibility worker),
result backend (db 1) and cache (db 2). Workers are ``celery -A rcc_app worker -P
prefork -c 2`` subprocesses, ready when they answer ``app.control.ping()``. Tests share
the workers and keep apart by using fresh tokens (arguments) per test.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from rcache.testing import RedisServer, free_port

HERE = Path(__file__).resolve().parent
# The worker subprocesses import rcc_app from here; so do the tests (rcc_helpers).
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from rcc_helpers import Worker  # noqa: E402 -- needs the path above


@pytest.fixture(scope="session")
def celery_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    os.environ["RCC_REDIS"] = f"redis://127.0.0.1:{server.port}"
    try:
        yield server
    finally:
        server.stop()


def _close(app: Any) -> None:
    # AsyncResult.__del__ unsubscribes from the result backend: collect them while
    # the server still runs, or they raise "connection refused" at interpreter exit.
    gc.collect()
    app.close()


@pytest.fixture(scope="session")
def ns(celery_redis: RedisServer) -> Iterator[SimpleNamespace]:
    """The test process's copy of the app and its tasks (the producer side)."""
    module = importlib.import_module("rcc_app")
    yield module.ns
    _close(module.ns.app)


@pytest.fixture
def r(celery_redis: RedisServer) -> Iterator[redis.Redis]:
    client = celery_redis.client(db=2)
    yield client
    client.close()


@pytest.fixture
def token(celery_redis: RedisServer) -> Iterator[str]:
    """A fresh argument per test; its gate is opened at teardown so that no task of
    this test keeps a shared worker's child busy."""
    value = uuid.uuid4().hex[:12]
    yield value
    client = celery_redis.client(db=2)
    client.set(f"gate:{value}", 1)
    client.close()


@pytest.fixture(scope="session")
def worker(
    celery_redis: RedisServer,
    ns: SimpleNamespace,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Worker]:
    """Worker A: broker db 0, default visibility timeout."""
    tmp = tmp_path_factory.mktemp("wa")
    (tmp / "prom").mkdir()
    w = Worker(
        "wa",
        celery_redis,
        tmp,
        PROMETHEUS_MULTIPROC_DIR=str(tmp / "prom"),
        RCC_METRICS_PORT=str(free_port()),
    )
    try:
        w.wait_ready(ns.app)
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="session")
def ns_vt(celery_redis: RedisServer, ns: SimpleNamespace) -> Iterator[SimpleNamespace]:
    """A producer for worker B: broker db 3, visibility_timeout 2 s."""
    module = importlib.import_module("rcc_app")
    built: SimpleNamespace = module.build(3, 2.0)
    yield built
    _close(built.app)


@pytest.fixture(scope="session")
def worker_vt(
    celery_redis: RedisServer,
    ns_vt: SimpleNamespace,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Worker]:
    """Worker B: broker db 3 with ``visibility_timeout=2``; shares the cache db."""
    w = Worker(
        "wb", celery_redis, tmp_path_factory.mktemp("wb"), RCC_BROKER_DB="3", RCC_VT="2"
    )
    try:
        w.wait_ready(ns_vt.app)
        yield w
    finally:
        w.stop()
