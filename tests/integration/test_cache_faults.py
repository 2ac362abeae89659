"""Cache defects found under hostile conditions (issue 14, items 6-13), on real Redis.

Each test reproduces one defect: a skewed clock, an invalidation racing a computation,
an unserializable or oversized result, a huge int, colliding templates, a key of the
wrong type, a weak pickle secret, a value reaching the logs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

import rcache
from rcache._serializers import decode_envelope, encode_envelope
from rcache.testing import RedisServer, wait_until

HOUR = 3600.0


def redis_now(client: redis.Redis) -> float:
    sec, usec = client.time()
    return sec + usec / 1e6


def errors(cache: rcache.Cache, name: str, operation: str, error: str) -> int:
    m = cache.metrics
    assert isinstance(m, rcache.InMemoryMetrics)
    return m.count("cache_errors", name, operation, error)


@pytest.fixture
def skewed_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Shift this process's wall clock (time.time) by some seconds."""
    real = time.time

    def shift(seconds: float) -> None:
        monkeypatch.setattr(time, "time", lambda: real() + seconds)

    return shift


# -- item 6: freshness follows Redis's clock, not the host's ------------------------------


@pytest.mark.parametrize("skew", [-HOUR, HOUR])
def test_reader_clock_skew_does_not_keep_entries_fresh(
    redis_url: str,
    redis_client: redis.Redis,
    skewed_clock: Callable[[float], None],
    skew: float,
) -> None:
    writer = rcache.Cache(redis_url, prefix="skew")
    reader = rcache.Cache(redis_url, prefix="skew")
    calls: list[int] = []

    def make(cache: rcache.Cache) -> Any:
        # stale_if_error keeps the entry in Redis for 60 s: only freshness can expire it
        @cache.cached(ttl=0.5, stale_if_error=60, name="f")
        def f() -> int:
            calls.append(1)
            return len(calls)

        return f

    assert make(writer)() == 1
    written = redis_now(redis_client)
    skewed_clock(skew)  # the reader's clock steps back (or forward) an hour
    f = make(reader)
    assert f() == 1  # still fresh by Redis's clock
    wait_until(lambda: redis_now(redis_client) > written + 0.6, message="ttl to pass")
    # before: with the clock stepped back, the entry was served fresh for an hour
    assert f() == 2
    writer.close()
    reader.close()


async def test_reader_clock_skew_async(
    redis_url: str, redis_client: redis.Redis, skewed_clock: Callable[[float], None]
) -> None:
    cache = rcache.Cache(redis_url, prefix="askew")
    calls: list[int] = []

    @cache.cached(ttl=0.5, stale_if_error=60, name="f")  # Redis keeps it 60 s
    async def f() -> int:
        calls.append(1)
        return len(calls)

    assert await f() == 1
    written = redis_now(redis_client)
    skewed_clock(-HOUR)
    assert await f() == 1
    wait_until(lambda: redis_now(redis_client) > written + 0.6, message="ttl to pass")
    assert await f() == 2
    await cache.aclose()


def test_entry_dated_in_the_future_is_a_miss(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """An entry written by a clock an hour ahead (an old or foreign writer) is refused."""
    cache = rcache.Cache(redis_url, prefix="fut")

    @cache.cached(ttl=2, name="f")
    def f() -> str:
        return "computed"

    f.invalidate()
    assert f() == "computed"  # creates the stamps
    key = f.key_for()  # type: ignore[attr-defined]
    raw = redis_client.get(key)
    assert isinstance(raw, bytes)
    env = decode_envelope(cache.serializer, raw)
    forged = encode_envelope(
        cache.serializer,
        "from the future",
        fresh_for=2,
        stamp=env.stamp,
        now=time.time() + HOUR,
    )
    redis_client.set(key, forged, px=60_000)
    assert f() == "computed"
    cache.close()


# -- item 7: read-your-invalidations in this process --------------------------------------


class Source:
    """A computation that blocks until released, reading ``value`` when it starts."""

    def __init__(self) -> None:
        self.value = "old"
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls: list[str] = []

    def compute(self) -> str:
        value = self.value
        self.calls.append(value)
        if len(self.calls) == 1:  # the first computation is held until released
            self.started.set()
            assert self.release.wait(10)
        return value


INVALIDATIONS: dict[str, Callable[[rcache.Cache, Any], Any]] = {
    "invalidate_tags": lambda cache, fn: cache.invalidate_tags("doc:1"),
    "invalidate": lambda cache, fn: fn.invalidate(1),
    "invalidate_all": lambda cache, fn: fn.invalidate_all(),
}


@pytest.mark.parametrize("how", list(INVALIDATIONS))
def test_caller_after_invalidation_does_not_join_earlier_computation(
    cache: rcache.Cache, redis_client: redis.Redis, how: str
) -> None:
    src = Source()

    @cache.cached(ttl=60, tags=["doc:{doc_id}"], name=f"doc_{how}")
    def load(doc_id: int) -> str:
        return src.compute()

    first: list[str] = []
    t1 = threading.Thread(target=lambda: first.append(load(1)))
    t1.start()
    assert src.started.wait(10)
    src.value = "new"
    INVALIDATIONS[how](cache, load)  # has returned: later callers must see "new"
    second: list[str] = []
    t2 = threading.Thread(target=lambda: second.append(load(1)))
    t2.start()
    # the second caller is under way: before the fix it joined the first flight; now
    # it waits (BLMOVE) for the first computation's lease, which stores nothing
    wait_until(lambda: _joined(load) or blocked_on_blmove(redis_client), 5)
    src.release.set()
    t1.join(10)
    t2.join(10)
    assert first == ["old"]  # a caller that started before gets what was computed
    assert second == ["new"]  # before the fix: "old", from the detached flight
    assert load(1) == "new"  # and "old" was never stored


def _joined(fn: Any) -> bool:
    return any(f.followers for f in fn._spec.flights.values())


def blocked_on_blmove(client: redis.Redis) -> bool:
    """Is some client blocked in BLMOVE right now (CLIENT LIST flag "b")?"""
    return any(
        c.get("cmd") == "blmove" and "b" in c.get("flags", "")
        for c in client.client_list()
    )


@pytest.mark.parametrize("how", list(INVALIDATIONS))
async def test_caller_after_invalidation_does_not_join_earlier_computation_async(
    cache: rcache.Cache, how: str
) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    state = {"value": "old"}
    calls: list[str] = []

    @cache.cached(ttl=60, tags=["doc:{doc_id}"], name=f"adoc_{how}")
    async def load(doc_id: int) -> str:
        value = state["value"]
        calls.append(value)
        if len(calls) == 1:
            started.set()
            await asyncio.wait_for(release.wait(), 10)
        return value

    first = asyncio.create_task(load(1))
    await asyncio.wait_for(started.wait(), 10)
    state["value"] = "new"
    if how == "invalidate_tags":
        await cache.ainvalidate_tags("doc:1")
    elif how == "invalidate":
        await load.invalidate(1)
    else:
        await load.invalidate_all()  # type: ignore[attr-defined]
    second = asyncio.create_task(load(1))
    await asyncio.sleep(0)  # let it start (before the fix it joins the first flight)
    release.set()
    assert await asyncio.wait_for(first, 10) == "old"
    assert await asyncio.wait_for(second, 10) == "new"
    assert await load(1) == "new"


# -- item 8: a result that is not stored gives up its lease --------------------------------


class Unserializable:
    pass


async def test_unserializable_result_releases_the_lease(
    cache: rcache.Cache, redis_client: redis.Redis, mode: Any
) -> None:
    results: list[Any] = [Unserializable(), "ok"]

    @mode.cached(cache, ttl=60, lease_ttl=2, name="unser")
    def f() -> Any:
        return results.pop(0)

    with pytest.raises(rcache.SerializationError):
        await mode(f)
    assert not redis_client.exists(f.key_for() + ":lease")
    start = time.monotonic()
    assert await mode(f) == "ok"
    # before the fix the next caller waited out the whole 2 s lease (2.05 s)
    assert time.monotonic() - start < 0.5


@pytest.fixture
def small_bulk_server(redis_server_factory: Callable[[], RedisServer]) -> RedisServer:
    server = redis_server_factory()
    client = server.client()
    client.config_set("proto-max-bulk-len", "1mb")  # the smallest Redis accepts
    client.close()
    return server


async def test_oversized_result_releases_the_lease(
    small_bulk_server: RedisServer, mode: Any
) -> None:
    cache = rcache.Cache(small_bulk_server.url, prefix="big")
    client = small_bulk_server.client()

    @mode.cached(cache, ttl=60, lease_ttl=2, name="big")
    def f(n: int) -> str:
        return "x" * n

    # Redis refuses the write (connection closed)
    assert len(await mode(f, 2_000_000)) == 2_000_000
    assert not client.exists(f.key_for(2_000_000) + ":lease")
    start = time.monotonic()
    assert len(await mode(f, 2_000_000)) == 2_000_000
    assert time.monotonic() - start < 0.5  # before: 2.07 s, the whole lease
    client.close()
    await mode.close(cache)


# -- item 9: huge ints are SerializationErrors / counted misses ----------------------------


def test_huge_int_result_is_skipped_or_raised(cache: rcache.Cache) -> None:
    big = 10**5000

    @cache.cached(ttl=60, on_unserializable="skip", name="bigint_skip")
    def skip(n: int) -> int:
        return big + n

    assert skip(1) == big + 1  # returned, not stored, counted
    assert skip(1) == big + 1
    assert errors(cache, "bigint_skip", "serialize", "SerializationError") == 2

    @cache.cached(ttl=60, name="bigint_raise")
    def raise_(n: int) -> int:
        return big

    with pytest.raises(rcache.SerializationError, match="bigint_raise"):
        raise_(1)
    with pytest.raises(rcache.SerializationError):
        cache.set("k", big, ttl=10)


async def test_huge_int_argument_and_stored_value_async(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    big = 10**5000

    @cache.cached(ttl=60, name="abigint")
    async def f(n: int) -> str:
        return "ok"

    assert await f(big) == "ok"  # a huge argument makes a key (hashed)
    # an entry whose JSON holds a 5,000-digit int decodes as a counted miss
    data = encode_envelope(cache.serializer, "x", fresh_for=60)
    redis_client.set("test:k:n", data[: -len(b'"x"')] + b"1" * 5000, px=60_000)
    assert await cache.aget("n", "default") == "default"
    assert errors(cache, "test", "decode", "UndecodableError") == 1


# -- item 10: template keys and tags are collision-free -----------------------------------


def test_template_keys_and_tags_do_not_collide(cache: rcache.Cache) -> None:
    calls: list[tuple[Any, ...]] = []

    @cache.cached(ttl=60, key="item:{a}:{b}", tags=["t:{a}:{b}"])
    def item(a: Any, b: Any) -> str:
        calls.append((a, b))
        return f"{a}|{b}"

    assert item("x", "y:z") == "x|y:z"
    assert item("x:y", "z") == "x:y|z"  # before the fix: "x|y:z", the other's entry
    assert item(1, 2) == "1|2"
    assert item("1", "2") == "1|2"
    assert len(calls) == 4
    assert cache.invalidate_tags("t:1:2") == 1  # ints render as written
    item("1", "2")
    assert len(calls) == 4  # the str arguments' tag is another one: 't:"1":"2"'
    assert cache.invalidate_tags('t:"1":"2"') == 1
    item("1", "2")
    assert len(calls) == 5


# -- item 11: a key of the wrong type never disables caching ------------------------------


@pytest.mark.parametrize("slot", ["lease", "ready", "stamp"])
def test_wrong_type_at_our_keys_is_replaced(
    cache: rcache.Cache, redis_client: redis.Redis, slot: str
) -> None:
    calls: list[int] = []

    @cache.cached(ttl=60, tags=["w"], name=f"wrong_{slot}")
    def f() -> int:
        calls.append(1)
        return len(calls)

    key = f.key_for()  # type: ignore[attr-defined]
    squatted = {
        "lease": key + ":lease",
        "ready": key + ":ready",
        "stamp": cache.tag_key("w"),
    }[slot]
    if slot == "ready":
        redis_client.set(squatted, "not a list")  # waiters BLMOVE here
        redis_client.set(key + ":lease", "someone", px=300)
    else:
        redis_client.rpush(squatted, "squatter")  # no TTL: it would stay forever
    assert f() == 1
    assert f() == 1  # cached: before the fix every call recomputed (or waited)
    assert len(calls) == 1
    assert errors(cache, f"wrong_{slot}", "claim", "WrongType") == 1


async def test_wrong_type_lease_async(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    calls: list[int] = []

    @cache.cached(ttl=60, name="awrong")
    async def f() -> int:
        calls.append(1)
        return len(calls)

    redis_client.rpush(f.key_for() + ":lease", "squatter")  # type: ignore[attr-defined]
    assert await f() == 1
    assert await f() == 1
    assert calls == [1]


def test_lease_without_ttl_is_bounded(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    """A lease string without a TTL (written by hand) gets one lease period."""

    @cache.cached(ttl=60, lease_ttl=0.3, wait=5, name="nottl")
    def f() -> str:
        return "computed"

    redis_client.set(f.key_for() + ":lease", "stuck")  # type: ignore[attr-defined]
    start = time.monotonic()
    assert f() == "computed"
    assert time.monotonic() - start < 2.0


# -- item 13: no part of a value ever reaches the logs ------------------------------------

MARKER = "Zq7SECRETVALUEq7Z"


def _corrupt(cache: rcache.Cache, client: redis.Redis, key: str) -> None:
    """Store an envelope whose datetime holds MARKER (fromisoformat() quotes it)."""
    data = encode_envelope(cache.serializer, "x", fresh_for=60)
    payload = b'{"$rc":"dt","v":"' + MARKER.encode() + b'"}'
    client.set(key, data[: -len(b'"x"')] + payload, px=60_000)


def _no_marker(caplog: pytest.LogCaptureFixture) -> None:
    assert caplog.records, "the scenario should log something"
    for record in caplog.records:
        text = record.getMessage() + str(record.exc_info or "") + str(record.args)
        assert MARKER not in text, record.getMessage()


def test_values_never_reach_the_logs(
    cache: rcache.Cache,
    redis_client: redis.Redis,
    redis_server_factory: Callable[[], RedisServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    @cache.cached(ttl=60, stale=0.01, on_unserializable="skip", name="logs")
    def f(kind: str) -> Any:
        if kind == "error":
            raise ValueError(MARKER)
        if kind == "unserializable":
            return {MARKER: Unserializable()}
        return {"v": MARKER}

    assert f("ok") == {"v": MARKER}  # miss
    assert f("ok") == {"v": MARKER}  # hit
    _corrupt(cache, redis_client, f.key_for("ok"))  # type: ignore[attr-defined]
    assert f("ok") == {"v": MARKER}  # corrupt entry: a counted miss, logged
    assert f("unserializable")[MARKER]
    with pytest.raises(ValueError, match=MARKER):
        f("error")
    _corrupt(cache, redis_client, "test:k:plain")
    assert cache.get("plain") is None
    # a background refresh that fails with the marker in its message
    key = f.key_for("ok")  # type: ignore[attr-defined]
    redis_client.delete(key)
    state = {"fail": False}

    @cache.cached(ttl=0.05, stale=60, name="logs_refresh")
    def g() -> str:
        if state["fail"]:
            raise ValueError(MARKER)
        return MARKER

    g()
    state["fail"] = True
    wait_until(lambda: g() == MARKER and _logged(caplog, "background refresh"), 5)
    # an outage while the value is in hand
    server = redis_server_factory()
    down = rcache.Cache(server.url, prefix="down")

    @down.cached(ttl=60, name="logs_down")
    def h() -> str:
        return MARKER

    server.kill()
    assert h() == MARKER
    down.close()
    assert errors(cache, "logs", "decode", "UndecodableError") == 1
    _no_marker(caplog)


async def test_values_never_reach_the_logs_async(
    cache: rcache.Cache, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    @cache.cached(ttl=60, on_unserializable="skip", name="alogs")
    async def f(kind: str) -> Any:
        if kind == "error":
            raise ValueError(MARKER)
        if kind == "unserializable":
            return {MARKER: Unserializable()}
        return {"v": MARKER}

    assert await f("ok") == {"v": MARKER}
    assert await f("ok") == {"v": MARKER}
    _corrupt(cache, redis_client, f.key_for("ok"))  # type: ignore[attr-defined]
    assert await f("ok") == {"v": MARKER}
    assert (await f("unserializable"))[MARKER]
    with pytest.raises(ValueError, match=MARKER):
        await f("error")
    _corrupt(cache, redis_client, "test:k:plain")
    assert await cache.aget("plain") is None
    assert errors(cache, "alogs", "decode", "UndecodableError") == 1
    _no_marker(caplog)


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)
