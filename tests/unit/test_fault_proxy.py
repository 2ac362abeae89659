"""rcache.testing.FaultProxy: relays, drops replies, blackholes, cuts, closes cleanly."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from rcache.testing import FaultProxy, RedisServer, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", redis_server.port) as p:
        yield p


def _client(proxy: FaultProxy, timeout: float = 0.3) -> redis.Redis:
    return redis.Redis.from_url(
        proxy.url, socket_timeout=timeout, socket_connect_timeout=timeout
    )


def test_relays_commands_and_replies(proxy: FaultProxy) -> None:
    client = _client(proxy)
    assert client.set("fp:relay", b"x" * 200_000)  # larger than one read
    assert client.get("fp:relay") == b"x" * 200_000
    assert proxy.connections == 1
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"
    client.close()


def test_dropped_replies_are_lost_but_the_commands_ran(
    proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    client = _client(proxy)
    client.ping()
    proxy.drop_replies(1)
    with pytest.raises(redis.TimeoutError):
        client.incr("fp:dropped")  # ran on the server, its reply never came
    assert redis_client.get("fp:dropped") == b"1"
    assert client.incr("fp:dropped") == 2  # one reply only: relaying again
    proxy.drop_replies()
    for _ in range(2):
        with pytest.raises(redis.TimeoutError):
            client.incr("fp:dropped")
    # The first ran; the second's new connection got no reply to its handshake, so it
    # was never sent.
    assert redis_client.get("fp:dropped") == b"3"
    proxy.restore()
    assert client.incr("fp:dropped") == 4
    client.close()


def test_blackhole_is_a_partition_until_restored(
    proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    client = _client(proxy)
    client.ping()
    proxy.blackhole()
    start = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        client.set("fp:hole", 1)
    assert time.monotonic() - start < 2.0  # the socket timeout, not a hang
    assert redis_client.exists("fp:hole") == 0  # the command never arrived
    with pytest.raises((redis.TimeoutError, redis.ConnectionError)):
        _client(proxy).ping()  # a new connection is accepted, never answered
    proxy.restore()
    assert client.set("fp:hole", 1)  # redis-py reconnects after the timeout
    client.close()


def test_cut_resets_connections_and_refuses_new_ones(proxy: FaultProxy) -> None:
    client = _client(proxy)
    client.ping()
    proxy.cut()
    assert proxy.connections == 0
    with pytest.raises(redis.ConnectionError):
        client.ping()
    proxy.restore()
    assert client.ping()
    client.close()


def test_bounded_connections(redis_server: RedisServer) -> None:
    with FaultProxy("127.0.0.1", redis_server.port, max_connections=2) as proxy:
        clients = [_client(proxy) for _ in range(3)]
        clients[0].ping()
        clients[1].ping()
        with pytest.raises(redis.ConnectionError):
            clients[2].ping()
        assert proxy.connections == 2
        for c in clients:
            c.close()
        wait_until(lambda: proxy.connections == 0, 5, message="closed connections")


def test_close_stops_the_thread_and_frees_the_port(redis_server: RedisServer) -> None:
    before = threading.active_count()
    proxy = FaultProxy("127.0.0.1", redis_server.port).start()
    client = _client(proxy)
    client.ping()
    proxy.close()
    assert threading.active_count() == before
    with pytest.raises(redis.ConnectionError):
        _client(proxy).ping()  # nothing listens any more
    client.close()
    with pytest.raises(ValueError, match="count >= 1"):
        FaultProxy().drop_replies(0)
