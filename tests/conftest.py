"""Shared fixtures: one throwaway redis-server per test session, flushed after each test.

Tests that kill, pause or restart Redis start their own server with ``redis_server_factory``.
A missing ``redis-server`` fails the run (with a pointer to ./scripts/test); set
RCACHE_ALLOW_SKIP=1 to skip Redis tests instead.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator

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


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    yield redis_server.url
    client = redis_server.client()
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
def redis_client(redis_server: RedisServer, redis_url: str) -> Iterator[redis.Redis]:
    client = redis_server.client()
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
    await c.aclose()
    c.close()
