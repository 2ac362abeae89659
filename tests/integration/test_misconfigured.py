"""Misconfiguration is not an outage (real redis-server, real error replies).

A wrong database index, a wrong password or a missing ACL permission is logged at ERROR
with the server's message (never a value), counted, and does not open the circuit
breaker; ``cache.check()`` says what is wrong; under ``on_backend_error="raise"`` the
raised error does too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import redis

import rcache
from rcache import BackendMisconfiguredError, BackendUnavailableError
from rcache._breaker import CLOSED, OPEN
from rcache._redis import map_error
from rcache.testing import RedisServer

SECRET_VALUE = "s3cret-value-never-logged"


@pytest.fixture
def locked_server(
    redis_server_factory: Callable[[], RedisServer],
) -> RedisServer:
    """A server with a password and a read-only ACL user ("reader")."""
    server = redis_server_factory()
    admin = server.client()
    admin.execute_command(
        "ACL", "SETUSER", "reader", "on", ">readerpw", "~*", "+@read", "+@connection"
    )
    admin.config_set("requirepass", "adminpw")
    admin.close()
    return server


def errors(cache: rcache.Cache, name: str, error: str, operation: str = "get") -> int:
    metrics = cache.metrics
    assert isinstance(metrics, rcache.InMemoryMetrics)
    return metrics.count("cache_errors", name, operation, error)


def error_records(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and text in r.getMessage()
    ]


def _run_calls(cache: rcache.Cache, name: str, calls: int = 5) -> None:
    @cache.cached(ttl=60, name=name)
    def f(i: int) -> str:
        return SECRET_VALUE

    for i in range(calls):
        assert f(i) == SECRET_VALUE  # bypassed: the function's result, every time
    # more failures than BreakerPolicy.failures (2): an outage would have opened it
    assert cache.breaker.state == CLOSED


def test_wrong_db_index_is_logged_counted_and_keeps_the_breaker_closed(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    cache = rcache.Cache(redis_server.url.replace("/0", "/99"), prefix="bad")
    with caplog.at_level(logging.WARNING, logger="rcache.cache"):
        _run_calls(cache, "bad.db")
    logged = error_records(caplog, "DB index is out of range")
    assert logged, caplog.text
    assert "database number in the URL" in logged[0]
    assert SECRET_VALUE not in caplog.text
    assert errors(cache, "bad.db", "ResponseError") == 5
    with pytest.raises(BackendMisconfiguredError, match="DB index is out of range"):
        cache.check()
    assert cache.ping() is False
    cache.close()


async def test_wrong_db_index_async(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    cache = rcache.Cache(redis_server.url.replace("/0", "/99"), prefix="bad")

    @cache.cached(ttl=60, name="bad.adb")
    async def f(i: int) -> str:
        return SECRET_VALUE

    with caplog.at_level(logging.WARNING, logger="rcache.cache"):
        for i in range(4):
            assert await f(i) == SECRET_VALUE
    assert cache.breaker.state == CLOSED
    assert error_records(caplog, "DB index is out of range")
    assert errors(cache, "bad.adb", "ResponseError") == 4
    with pytest.raises(BackendMisconfiguredError, match="DB index is out of range"):
        await cache.acheck()
    await cache.aclose()


def test_raise_policy_says_what_is_wrong(redis_server: RedisServer) -> None:
    cache = rcache.Cache(
        redis_server.url.replace("/0", "/99"), on_backend_error="raise"
    )

    @cache.cached(ttl=60, name="bad.raise")
    def f() -> int:
        return 1

    for _ in range(3):
        with pytest.raises(BackendMisconfiguredError) as info:
            f()
        assert "DB index is out of range" in str(info.value)
        assert "write e.g. redis://host:6379/0" in str(info.value)
    assert cache.breaker.state == CLOSED
    cache.close()


def test_wrong_password(
    locked_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://:wrongpw@127.0.0.1:{locked_server.port}/0"
    cache = rcache.Cache(url, prefix="auth")
    with caplog.at_level(logging.WARNING, logger="rcache.cache"):
        _run_calls(cache, "auth.fn")
    logged = error_records(caplog, "invalid username-password pair")
    assert logged, caplog.text
    assert "wrongpw" not in caplog.text  # the password is never logged
    assert errors(cache, "auth.fn", "AuthenticationError") == 5
    with pytest.raises(BackendMisconfiguredError, match="credentials") as info:
        cache.check()
    assert "wrongpw" not in str(info.value)
    assert not isinstance(info.value, BackendUnavailableError)
    cache.close()
    # the right password: everything works
    good = rcache.Cache(f"redis://:adminpw@127.0.0.1:{locked_server.port}/0")
    assert "connect, read, write" in good.check()
    good.close()


def test_missing_acl_permission(
    locked_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://reader:readerpw@127.0.0.1:{locked_server.port}/0"
    cache = rcache.Cache(url, prefix="acl")
    with caplog.at_level(logging.WARNING, logger="rcache.cache"):
        _run_calls(cache, "acl.fn")
    # reads are allowed (MGET), the claim script is not: NOPERM for evalsha
    logged = error_records(caplog, "no permissions to run the 'evalsha' command")
    assert logged, caplog.text
    assert "ACL SETUSER" in logged[0]
    assert SECRET_VALUE not in caplog.text
    assert errors(cache, "acl.fn", "NoPermissionError") == 5
    with pytest.raises(BackendMisconfiguredError, match="no permissions"):
        cache.check()
    cache.close()


def test_unreachable_server_still_opens_the_breaker() -> None:
    """The other side: an outage is still an outage (the guard is not too wide)."""
    from rcache.testing import free_port

    cache = rcache.Cache(f"redis://127.0.0.1:{free_port()}/0", prefix="gone")

    @cache.cached(ttl=60, name="gone.fn")
    def f(i: int) -> int:
        return i

    for i in range(3):
        assert f(i) == i
    assert cache.breaker.state == OPEN
    with pytest.raises(BackendUnavailableError):
        cache.check()
    cache.close()


def test_error_replies_are_classified(redis_client: redis.Redis) -> None:
    """map_error on real replies: permanent ones are BackendMisconfiguredError."""
    redis_client.lpush("a-list", "x")
    with pytest.raises(redis.ResponseError) as wrongtype:
        redis_client.get("a-list")
    mapped = map_error(wrongtype.value)
    assert isinstance(mapped, BackendMisconfiguredError)
    assert "prefix" in str(mapped)
    with pytest.raises(redis.ResponseError) as unknown:
        redis_client.execute_command("NOSUCHCOMMAND", "key", SECRET_VALUE)
    mapped = map_error(unknown.value)
    assert isinstance(mapped, BackendMisconfiguredError)
    assert SECRET_VALUE not in str(mapped)  # Redis echoes the arguments: cut off
    with pytest.raises(redis.ResponseError) as noscript:
        redis_client.evalsha("0" * 40, 0)
    assert isinstance(map_error(noscript.value), BackendMisconfiguredError)
    redis_client.set("n", "abc")
    with pytest.raises(redis.ResponseError) as other:
        redis_client.incr("n")  # "not an integer": a plain error reply
    mapped = map_error(other.value)
    assert type(mapped) is rcache.BackendError
