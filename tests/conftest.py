"""Shared fixtures: one throwaway redis-server per test session, flushed after each test.

Tests that kill, pause or restart Redis start their own server with ``redis_server_factory``.
A missing ``redis-server`` fails the run (with a pointer to ./scripts/test); set
RCACHE_ALLOW_SKIP=1 to skip Redis tests instead.

**Topologies.** ``redis_url``, ``redis_client`` and ``cache`` serve the single server, or
the session's Redis Cluster (3 primaries, 3 replicas, flushed after each test) in the
``cluster`` topology. A module marked ``pytest.mark.topologies("single", "cluster")``
runs every test in both; ``RCACHE_TEST_TOPOLOGY=cluster`` runs any test on the cluster.
A test of the single-primary layout itself (key names, one server's command counts) is
marked ``single_server`` and skipped on the cluster, where ``test_cluster_cache.py``
states the cluster's own (grouped keys, B DELs per invalidation).
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis

import rcache
from rcache.testing import RedisCluster, RedisServer, default_executable


def _need_redis() -> None:
    if default_executable() is None:
        if os.environ.get("RCACHE_ALLOW_SKIP") == "1":
            pytest.skip("redis-server not installed and RCACHE_ALLOW_SKIP=1")
        pytest.fail(
            "redis-server is not on PATH: run ./scripts/test (it installs it) or "
            "apt-get install redis-server",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The session's shared server. Do not kill it: use redis_server_factory."""
    _need_redis()
    with RedisServer() as server:
        yield server


TOPOLOGIES = ("single", "cluster")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("topologies")
    if marker is not None and "topology" in metafunc.fixturenames:
        topologies = marker.args
        if metafunc.definition.get_closest_marker("single_server"):
            # a fact of the single-primary layout: not collected on the cluster at all
            # (test_cluster_cache.py states the cluster's), rather than reported skipped
            topologies = tuple(t for t in topologies if t != "cluster")
        metafunc.parametrize("topology", topologies, indirect=True)


@pytest.fixture
def topology(request: pytest.FixtureRequest) -> str:
    """``"single"`` or ``"cluster"``: what redis_url, redis_client and cache serve."""
    name = getattr(request, "param", None) or os.environ.get(
        "RCACHE_TEST_TOPOLOGY", "single"
    )
    if name not in TOPOLOGIES:
        raise pytest.UsageError(f"RCACHE_TEST_TOPOLOGY must be one of {TOPOLOGIES}")
    if name == "cluster" and request.node.get_closest_marker("single_server"):
        pytest.skip("a fact of the single-primary layout (see test_cluster_cache.py)")
    return str(name)


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, topology: str) -> Iterator[str]:
    if topology == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        yield cluster.url
        cluster.flush()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    yield server.url
    client = server.client()
    client.flushall()
    client.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """The session's Redis Cluster (3 primaries, 3 replicas), started on first use (~2 s).
    Do not kill its nodes: failover tests start their own RedisCluster."""
    _need_redis()
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture
def cluster_url(redis_cluster: RedisCluster) -> Iterator[str]:
    """The session cluster's ``redis+cluster://`` URL, flushed after the test."""
    yield redis_cluster.url
    redis_cluster.flush()


@pytest.fixture
def redis_client(
    request: pytest.FixtureRequest, topology: str, redis_url: str
) -> Iterator[redis.Redis]:
    """A raw client of what redis_url serves (a RedisCluster on the cluster)."""
    if topology == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        client: redis.Redis = cluster.client()  # type: ignore[assignment]
    else:
        client = request.getfixturevalue("redis_server").client()
    yield client
    client.close()


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[[], RedisServer]]:
    """Start extra servers that the test may kill, pause or restart."""
    _need_redis()
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer().start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
async def cache(redis_url: str) -> AsyncIterator[rcache.Cache]:
    """A Cache on the session server; async so that its loop's client is closed in-loop."""
    c = rcache.Cache(redis_url, prefix="test")
    yield c
    # aclose() lets this loop's lock clean-ups (a cancelled waiter withdrawing, a
    # compensating release) finish first: they would open a client nobody closes.
    await c.aclose()
    c.close()


class Mode:
    """One behaviour test, run in sync and in async mode (the ``mode`` fixture).

    Write the function once as a plain ``def`` and decorate it with
    ``mode.cached(cache, ...)``: in async mode it becomes an ``async def`` with the same
    name and signature. Call anything that is sync in one mode and a coroutine in the
    other with ``await mode(fn, *args)`` (``f``, ``f.refresh``, ``f.invalidate``...).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_async = name == "async"

    def __repr__(self) -> str:
        return self.name

    def cached(self, cache: rcache.Cache, **options: Any) -> Callable[[Any], Any]:
        def decorate(body: Callable[..., Any]) -> Any:
            if not self.is_async:
                return cache.cached(**options)(body)

            @functools.wraps(body)
            async def twin(*args: Any, **kwargs: Any) -> Any:
                return body(*args, **kwargs)

            return cache.cached(**options)(twin)

        return decorate

    async def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        return await result if self.is_async else result

    async def close(self, cache: rcache.Cache) -> None:
        """Close the clients of this mode (async: this event loop's)."""
        if self.is_async:
            await cache.aclose()
        else:
            cache.close()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> Mode:
    """Run the test once with sync functions and once with ``async def`` ones."""
    return Mode(request.param)
