"""Redis Cluster errors through map_error, the one place redis-py errors are mapped (pure)."""

from __future__ import annotations

import pytest
import redis.exceptions as rex

from rcache import BackendError, BackendUnavailableError
from rcache._redis import REDIS_ERRORS, TRANSIENT, map_error


def test_client_side_cross_slot_is_a_clear_backend_error_not_an_outage() -> None:
    # redis-py's own check (RedisCluster.determine_slot) raises this Exception subclass
    exc = rex.RedisClusterException("MGET - all keys must map to the same key slot")
    assert not isinstance(exc, rex.RedisError)
    assert isinstance(exc, REDIS_ERRORS)  # so SyncRedis/AsyncRedis.run catch it
    mapped = map_error(exc)
    assert type(mapped) is BackendError
    assert mapped.original is exc
    assert "hash tag" in str(mapped)
    assert "{cart:7}" in str(mapped)


@pytest.mark.parametrize(
    "exc",
    [
        rex.ClusterCrossSlotError("Keys in request don't hash to the same slot"),
        rex.CrossSlotTransactionError("Cross-slot keys in a transaction"),
    ],
)
def test_server_and_transaction_cross_slot_are_backend_errors(exc: Exception) -> None:
    mapped = map_error(exc)
    assert type(mapped) is BackendError
    assert "hash tag" in str(mapped)


@pytest.mark.parametrize(
    "exc",
    [
        rex.ClusterDownError("CLUSTERDOWN The cluster is down"),
        rex.MasterDownError("MASTERDOWN Link with MASTER is down"),
        rex.TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
    ],
)
def test_clusterdown_and_tryagain_are_transient_outages(exc: Exception) -> None:
    assert isinstance(exc, TRANSIENT)  # retried with backoff, then bypassed
    mapped = map_error(exc)
    assert isinstance(mapped, BackendUnavailableError)
    assert mapped.original is exc


@pytest.mark.parametrize(
    "exc",
    [
        rex.MovedError("3999 127.0.0.1:6381"),
        rex.AskError("3999 127.0.0.1:6381"),
        rex.SlotNotCoveredError('Slot "3999" is not covered by the cluster.'),
        rex.RedisClusterException(
            "Redis Cluster cannot be connected. Please provide at least one reachable node"
        ),
        rex.RedisClusterException(
            "All slots are not covered after query all startup_nodes."
        ),
    ],
)
def test_redirect_storms_and_lost_topology_are_outages(exc: Exception) -> None:
    assert isinstance(map_error(exc), BackendUnavailableError)


@pytest.mark.parametrize(
    "exc",
    [
        rex.ClusterError("TTL exhausted."),
        # what ClusterPipeline raises after the same retries (async: the args tuple)
        rex.ClusterError(
            "Command # 1 (MGET a b) of pipeline caused error: ('TTL exhausted.',)"
        ),
    ],
)
def test_tryagain_after_redis_pys_own_retries_is_an_outage(exc: Exception) -> None:
    # measured: a multi-key read of a MIGRATING slot got TRYAGAIN, redis-py retried
    # 16 times (0.43 s) and raised ClusterError("TTL exhausted."); it was a BackendError
    mapped = map_error(exc)
    assert isinstance(mapped, BackendUnavailableError)
    assert mapped.original is exc


def test_other_cluster_client_errors_are_backend_errors() -> None:
    exc = rex.RedisClusterException("shard_hint is deprecated in cluster mode")
    mapped = map_error(exc)
    assert type(mapped) is BackendError
    assert "shard_hint" in str(mapped)
