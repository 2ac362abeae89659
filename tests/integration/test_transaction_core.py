"""The cluster one-slot check on a client that looks like a cluster, on real Redis.

(The IO-free parts of the transaction helpers are tested in tests/unit/.)"""

from __future__ import annotations

from typing import Any

import pytest
import redis

import rcache


class _ClusterLike(redis.Redis):
    """A plain client that looks like a RedisCluster to the slot check."""

    nodes_manager = object()


def test_cluster_client_rejects_cross_slot_keys_before_sending(
    redis_server: Any, redis_url: str
) -> None:
    client = _ClusterLike(port=redis_server.port)
    cache = rcache.Cache(client=client, prefix="test")
    calls = 0

    def fn(pipe: Any) -> None:
        nonlocal calls
        calls += 1
        pipe.multi()
        pipe.set("{cart:7}:items", 1)
        pipe.set("{cart:7}:total", 2)

    with pytest.raises(rcache.ConfigurationError, match="one hash slot"):
        cache.transaction(fn, watch=["cart:7:items", "cart:7:total"])
    assert calls == 0
    assert cache.transaction(fn, watch=["{cart:7}:items", "{cart:7}:total"]) == [
        True,
        True,
    ]
    client.close()
