"""``min_replicas=``: a grant confirmed with WAIT, on real primaries and replicas.

A primary with one replica (``replicaof``), a Sentinel set whose primary is SIGKILLed,
the session Redis Cluster (each primary has a replica). What is shown, and what is not,
is said in each test's docstring; no fixed sleeps: every wait polls with a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

import rcache
from rcache.testing import (
    FaultProxy,
    RedisCluster,
    RedisSentinel,
    RedisServer,
    wait_until,
)

pytestmark = pytest.mark.slow


def _link_up(primary: RedisServer, replica: RedisServer, replicas: int = 1) -> bool:
    p, r = primary.client(socket_timeout=1), replica.client(socket_timeout=1)
    try:
        up = r.info("replication").get("master_link_status") == "up"
        info = p.info("replication")
        online = [
            k for k, v in info.items() if k.startswith("slave") and "online" in str(v)
        ]
        return up and len(online) >= replicas  # "online": past the initial sync
    finally:
        p.close()
        r.close()


def _replica_of(primary: RedisServer, port: int | None = None) -> RedisServer:
    """A replica of ``primary`` (through ``port`` when given: a proxy's), linked up."""
    args = ["--replicaof", "127.0.0.1", str(port or primary.port)]
    replica = RedisServer(extra_args=["--repl-diskless-sync-delay", "0", *args])
    replica.start()
    wait_until(
        lambda: _link_up(primary, replica), timeout=10, message="the replica link"
    )
    wait_until(lambda: _acks(primary), timeout=10, message="a replica acknowledging")
    return replica


def _acks(primary: RedisServer) -> bool:
    """A write acknowledged by the replica (SET and WAIT pipelined: one connection)."""
    client = primary.client(socket_timeout=2)
    try:
        pipe = client.pipeline(transaction=False)
        pipe.set("warm-up", 1)
        pipe.execute_command("WAIT", 1, 500)
        return int(pipe.execute()[1]) >= 1
    finally:
        client.close()


@pytest.fixture
def pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary and its replica, owned by the test (it may pause the replica)."""
    with RedisServer(extra_args=["--repl-diskless-sync-delay", "0"]) as primary:
        replica = _replica_of(primary)
        try:
            yield primary, replica
        finally:
            replica.close()


def _get(server: RedisServer, key: str) -> Any:
    client = server.client(socket_timeout=1)
    try:
        return client.get(key)
    finally:
        client.close()


def _primary_port(replica: RedisServer) -> int:
    client = replica.client(socket_timeout=1)
    try:
        return int(client.info("replication")["master_port"])
    finally:
        client.close()


def test_grant_is_on_the_replica_when_acquire_returns(
    pair: tuple[RedisServer, RedisServer],
) -> None:
    """WAIT ran on the grant's connection: once acquire() returns, the replica has the
    token (read at once, no polling). Without WAIT this read could race replication."""
    primary, replica = pair
    cache = rcache.Cache(primary.url, prefix="r")
    lock = cache.lock("job", ttl=30, min_replicas=1)
    for _ in range(20):  # many grants: each one confirmed, not a lucky race
        assert lock.acquire(timeout=1)
        lease = lock.lease
        assert lease is not None
        assert _get(replica, "r:l:{job}") == lease.token.encode()
        lock.extend(20)  # confirmed too (reply 1 and one replica)
        lock.release()
    with cache.semaphore("pool", 2, min_replicas=1) as sem:
        assert sem.held
    with cache.rwlock("doc", min_replicas=1).read() as read:
        assert read.held
    cache.close()


async def test_async_grant_is_on_the_replica_when_acquire_returns(
    pair: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = pair
    cache = rcache.Cache(primary.url, prefix="r")
    async with cache.lock("job", ttl=30, min_replicas=1, timeout=1) as lock:
        lease = lock.lease
        assert lease is not None
        assert _get(replica, "r:l:{job}") == lease.token.encode()
        await lock.aextend(20)
    async with cache.lock("job", fair=True, min_replicas=1, timeout=1) as fair:
        assert fair.held
    await cache.aclose()


@pytest.mark.parametrize("decode", [False, True])
async def test_user_clients_in_both_decode_responses_modes(
    pair: tuple[RedisServer, RedisServer], decode: bool
) -> None:
    """Given clients (client=, async_client=) in both modes: the script's reply and
    WAIT's count are read alike."""
    primary, replica = pair
    client = redis.Redis(host="127.0.0.1", port=primary.port, decode_responses=decode)

    def factory() -> redis.asyncio.Redis:
        return redis.asyncio.Redis(
            host="127.0.0.1", port=primary.port, decode_responses=decode
        )

    cache = rcache.Cache(client=client, async_client=factory, prefix="dec")
    with cache.lock("m", ttl=5, min_replicas=1) as lock:
        assert lock.lease is not None
        assert _get(replica, "dec:l:{m}") == lock.lease.token.encode()
    async with cache.semaphore("s", 1, min_replicas=1) as sem:
        assert sem.held
    with pytest.raises(rcache.LockNotReplicatedError):
        await cache.lock("m", min_replicas=2, replica_timeout=0.05).aacquire(1)
    assert client.exists("dec:l:{m}") == 0
    await cache.aclose()
    cache.close()
    client.close()


def test_more_replicas_than_exist_fail_closed_and_leave_no_lock(
    pair: tuple[RedisServer, RedisServer],
) -> None:
    primary, _ = pair
    cache = rcache.Cache(primary.url, prefix="r")
    lock = cache.lock("job", min_replicas=2, replica_timeout="1s", timeout=5)
    started = time.monotonic()
    with pytest.raises(rcache.LockNotReplicatedError) as raised:
        lock.acquire()
    assert time.monotonic() - started < 3  # raised at once, not retried for 5 s
    assert (raised.value.required, raised.value.acknowledged) == (2, 1)
    assert isinstance(raised.value, rcache.LockNotAcquiredError)
    assert _get(primary, "r:l:{job}") is None  # the grant was released again
    assert lock.lease is None and not lock.held
    assert cache.lock("job").acquire(timeout=0)  # free for others at once
    cache.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_paused_replica_fails_within_the_budget_and_leaves_no_lock(
    pair: tuple[RedisServer, RedisServer], mode: str
) -> None:
    """The replica SIGSTOPped: the grant is not acknowledged; the acquire raises after
    replica_timeout (plus a round trip), never holds, and the key is gone."""
    primary, replica = pair
    cache = rcache.Cache(primary.url, prefix="r")
    lock = cache.lock("job", ttl=30, min_replicas=1, replica_timeout=0.3, timeout=3)
    replica.pause()
    try:
        started = time.monotonic()
        with pytest.raises(rcache.LockNotReplicatedError, match="only 0 replica"):
            await _enter(lock, mode)
        elapsed = time.monotonic() - started
        assert 0.3 <= elapsed < 1.5, elapsed
        assert _get(primary, "r:l:{job}") is None
        assert not lock.held
    finally:
        replica.resume()
    await cache.aclose()


async def _enter(lock: rcache.Lock, mode: str) -> None:
    if mode == "sync":
        with lock:
            pass
    else:
        async with lock:
            pass


def test_paused_replica_stops_confirming_renewals(
    pair: tuple[RedisServer, RedisServer],
) -> None:
    """extend() on the primary alone is not confirmed: LockError, and the lease's local
    deadline stays where the last confirmed extend put it."""
    primary, replica = pair
    cache = rcache.Cache(primary.url, prefix="r")
    # a generous replica_timeout: the grant must be confirmed on a loaded 2-core box
    lock = cache.lock("job", ttl=5, min_replicas=1, replica_timeout=1)
    assert lock.acquire(timeout=1)
    lease = lock.lease
    assert lease is not None
    deadline = lease.deadline
    replica.pause()
    try:
        with pytest.raises(rcache.LockError, match="the extend of lock 'job'"):
            lock.extend(60)
        assert lease.deadline == deadline and lease.held
    finally:
        replica.resume()
    lock.release()
    cache.close()


def test_unconfirmed_renewals_let_the_lease_run_out_locally(
    pair: tuple[RedisServer, RedisServer],
) -> None:
    """Auto-renewal with the replica paused: the primary applies each renewal, but none
    is confirmed, so the holder's lease ends at its local deadline (where a failover to
    that replica would leave it) while the primary still has the key. A lock without
    min_replicas, renewed over the same time, stays held."""
    primary, replica = pair
    cache = rcache.Cache(primary.url, prefix="r")
    # replica_timeout well under ttl/3: each renewal waits it out while unconfirmed
    lock = cache.lock("job", ttl=3, min_replicas=1, replica_timeout=0.3, timeout=5)
    plain = cache.lock("plain", ttl=3, timeout=5)
    lost: list[Any] = []
    with lock, plain:  # both auto-renewed every ttl/3
        lease = lock.lease
        assert lease is not None
        lease.on_lost = lost.append
        replica.pause()
        try:
            wait_until(lambda: not lock.held, timeout=10, message="the local deadline")
            assert _get(primary, "r:l:{job}") == lease.token.encode()  # renewed there
            assert plain.held
        finally:
            replica.resume()
    wait_until(lambda: lost, timeout=5, message="on_lost")
    cache.close()


def test_lost_grant_contrast_with_a_partitioned_replica() -> None:
    """The contrast, made deterministic: the replica replicates through a proxy that is
    then blackholed (a partition of the replication link only). Without min_replicas
    the lock is granted on the primary alone; the primary dies, the replica is promoted
    and the lock is gone: a second client gets it. With min_replicas=1 the same grant
    raises LockNotReplicatedError instead of reporting a hold a failover would lose.

    Shown: what WAIT changes for a grant the replica did not get. Not shown: that a
    confirmed grant survives every failover (a replica that acknowledged may still not
    be the one promoted; see the Sentinel test and the README)."""
    with RedisServer(extra_args=["--repl-diskless-sync-delay", "0"]) as primary:
        proxy = FaultProxy("127.0.0.1", primary.port).start()
        replica = _replica_of(primary, proxy.port)
        try:
            cache = rcache.Cache(primary.url, prefix="r")
            proxy.blackhole()
            confirmed = cache.lock("job", min_replicas=1, replica_timeout=0.2)
            with pytest.raises(rcache.LockNotReplicatedError):
                confirmed.acquire(timeout=1)
            plain = cache.lock("job", ttl=60)
            assert plain.acquire(timeout=1)  # granted: nothing checks the replica
            assert _get(primary, "r:l:{job}") is not None
            primary.kill()
            promoted = replica.client(socket_timeout=1)
            promoted.replicaof("no", "one")  # what a failover does
            promoted.close()
            cache.close()
            after = rcache.Cache(replica.url, prefix="r")
            assert _get(replica, "r:l:{job}") is None  # the grant is lost...
            assert after.lock("job").acquire(timeout=0)  # ...and granted again
            after.close()
        finally:
            proxy.close()
            replica.close()


def test_sentinel_failover_keeps_a_confirmed_grant() -> None:
    """Granted with min_replicas=1 through Sentinel, the primary SIGKILLed: after the
    failover the new primary holds the same token, and the holder's release finds it.

    With one replica the acknowledging replica is the promoted one; with several,
    Sentinel may promote one that did not acknowledge (WAIT does not steer the vote):
    this test does not show that case. Without min_replicas the grant survives here
    too almost always (replication takes microseconds): the deterministic contrast is
    test_lost_grant_contrast_with_a_partitioned_replica."""
    with RedisSentinel() as sentinels:
        cache = rcache.Cache(sentinels.url, prefix="s")
        # the first WAIT after a replica synced can take up to its 1 s ACK period
        lock = cache.lock("job", ttl=60, min_replicas=1, replica_timeout=3)
        assert lock.acquire(timeout=5)
        lease = lock.lease
        assert lease is not None
        old = sentinels.kill_primary()
        new = sentinels.wait_failover(old.port)
        assert _get(new, "s:l:{job}") == lease.token.encode()
        # the holder's client follows the failover; its release finds its token
        wait_until(_released(lock), timeout=10, message="the release after failover")
        assert _get(new, "s:l:{job}") is None
        cache.close()


def _released(lock: rcache.Lock) -> Any:
    def attempt() -> bool:
        try:
            lock.release()
        except rcache.LockNotOwnedError:
            raise
        except rcache.LockError:
            return False  # still connecting to the new primary
        return True

    return attempt


def test_cluster_grant_is_confirmed_by_the_slot_primarys_replica(
    redis_cluster: RedisCluster, cluster_url: str
) -> None:
    """On Redis Cluster, WAIT runs on the primary serving the lock's slot: once the
    acquire returns, that primary's replica has the token."""
    cache = rcache.Cache(cluster_url, prefix="c")
    # a cluster just formed: the first WAIT can take up to the replicas' 1 s ACK period
    lock = cache.lock("job", ttl=30, min_replicas=1, replica_timeout=3)
    assert lock.acquire(timeout=1)
    lease = lock.lease
    assert lease is not None
    primary = redis_cluster.node_for("c:l:{job}")
    replica = next(
        n for n in redis_cluster.replicas() if _primary_port(n) == primary.port
    )
    client = replica.client(socket_timeout=1)
    client.execute_command("READONLY")  # a replica serves reads after READONLY
    assert client.get("c:l:{job}") == lease.token.encode()
    client.close()
    lock.release()
    with pytest.raises(rcache.LockNotReplicatedError):
        cache.lock("job", min_replicas=2, replica_timeout=0.1).acquire(timeout=1)
    cache.close()


async def test_cluster_async_grant_is_confirmed(cluster_url: str) -> None:
    cache = rcache.Cache(cluster_url, prefix="c")
    async with cache.lock("job", min_replicas=1, replica_timeout=3, timeout=1) as lock:
        assert lock.held
    with pytest.raises(rcache.LockNotReplicatedError):
        await cache.lock("job", min_replicas=2, replica_timeout=0.1).aacquire(1)
    await cache.aclose()
