"""The read-through flows (_readthrough), driven by hand with scripted replies: no Redis.

Each test sends a flow the replies Redis (or the user's function) would give, step by
step, and checks which commands the flow asked for, what it returned and how the call
was counted. A step is ``(kind, reply)``: the kind the command must be ("read", "mget",
"claim", "store", "block", "compute", "store_many", "del") and what it answers (an
exception instance is thrown into the flow, as the drivers do).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator
from typing import Any

import pytest

from rcache._breaker import CircuitBreaker
from rcache._cache_protocol import Store
from rcache._config import BreakerPolicy, CachedOptions
from rcache._decorated import RefreshPool
from rcache._exceptions import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    LockNotAcquiredError,
    SerializationError,
)
from rcache._flow import Block, Command, Compute, Critical, Eval, Run
from rcache._freshness import Freshness, stamp_blob
from rcache._keys import KeySpace
from rcache._logging import RateLimitedLog
from rcache._metrics import InMemoryMetrics
from rcache._policy import BYPASS, Failures, Guard
from rcache._readthrough import (
    Batch,
    Call,
    Flight,
    Mget,
    ReadThrough,
    ServerClock,
    batch,
    delete,
    load,
    read_through,
    refresh,
)
from rcache._serializers import JsonSerializer, decode_envelope, encode_envelope

NOW = 1_000_000.0  # Redis's clock in these tests (s)
NOW_US = int(NOW * 1e6)
STAMPS = [b"sf", b"st"]
KEY = "t:c:f:[1]"
CALL = Call(KEY, ["t:s:f:f", "t:s:t:users"], (1,), {})


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class Host:
    """The parts of a Cache that the flows read."""

    def __init__(self) -> None:
        self.metrics = InMemoryMetrics()
        self.serializer = JsonSerializer()
        self.keyspace = KeySpace("t")
        self.mono = Clock()
        self._clock = ServerClock(self.mono)
        self._log = RateLimitedLog(logging.getLogger("rcache.test"))
        self._failures = Failures(
            CircuitBreaker(BreakerPolicy()),
            self.metrics,
            lambda: "redis://t",
            self._log,
        )
        self.written: list[list[str]] = []

    def _local_written(self, keys: Any) -> None:  # the local tier's own-write hook
        self.written.append(list(keys))


class Hooks:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def hold(self, lease_key: str, token: str, ttl: float, held: bool) -> Any:
        self.events.append(("hold", (lease_key, held)))
        return lease_key

    def drop(self, lease: Any) -> None:
        self.events.append(("drop", lease))

    def refresh_later(self, call: Call) -> None:
        self.events.append(("refresh_later", call.key))


def make(
    policy: str = "bypass", fn: Any = None, **freshness: Any
) -> tuple[ReadThrough, Host, Hooks]:
    host = Host()
    rt = ReadThrough(
        host=host,
        name="f",
        fn=fn or (lambda x: x * 10),
        get=Guard("f", "get", policy),  # type: ignore[arg-type]
        put=Guard("f", "set", policy),  # type: ignore[arg-type]
        freshness=Freshness(**{"ttl": 60.0, **freshness}),
    )
    return rt, host, Hooks()


def entry(
    value: Any, created: float = NOW - 1, ttl: float = 60.0, compute: float = 0.01
) -> bytes:
    return encode_envelope(
        JsonSerializer(),
        value,
        compute_time=compute,
        fresh_for=ttl,
        stamp=stamp_blob(STAMPS),
        now=created,
    )


def kind(command: Command) -> str:
    if isinstance(command, Critical):
        command = command.command
    if isinstance(command, Store):
        return "store"
    if isinstance(command, Eval):
        return command.script.name.removeprefix("cache_")
    if isinstance(command, Block):
        return "block"
    if isinstance(command, Compute):
        return "compute"
    if isinstance(command, Mget):
        return "mget"
    if isinstance(command, Run):
        return "run"
    raise AssertionError(command)


def drive(flow: Generator[Command, Any, Any], steps: list[tuple[str, Any]]) -> Any:
    """Run ``flow`` on ``steps``; every step must be used. Compute steps with the reply
    ``RUN`` call the function."""
    steps = list(steps)
    try:
        command = flow.send(None)
        while True:
            assert steps, f"unexpected command {command!r}"
            want, reply = steps.pop(0)
            assert kind(command) == want, (kind(command), want)
            if reply is RUN:
                assert isinstance(command, Compute)
                reply = command.fn(*command.args, **(command.kwargs or {}))
            if isinstance(reply, BaseException):
                command = flow.throw(reply)
            else:
                command = flow.send(reply)
    except StopIteration as stop:
        assert not steps, f"steps left: {steps}"
        return stop.value


RUN: Any = object()


def read(value: bytes | None, stamps: list[bytes | None] = list(STAMPS)) -> list[Any]:  # noqa: B006
    return [NOW_US, value, *stamps]


def claim(
    claimed: bool, pttl: int = 0, repaired: int = 0, stamps: list[bytes] = STAMPS
) -> list[Any]:
    return [1 if claimed else 0, pttl, NOW_US, repaired, *stamps]


def gets(host: Host, result: str) -> int:
    return host.metrics.count("cache_gets", "f", result)


# -- hits --------------------------------------------------------------------------------


def test_fresh_hit_is_one_read_and_counted() -> None:
    rt, host, hooks = make()
    assert drive(read_through(rt, CALL, hooks), [("read", read(entry(7)))]) == 7
    assert gets(host, "hit") == 1
    assert hooks.events == []


def test_clock_known_reads_with_a_plain_mget() -> None:
    rt, host, hooks = make()
    drive(read_through(rt, CALL, hooks), [("read", read(entry(7)))])
    host.mono.now += 1.0  # within the resync period: Redis's clock is extrapolated
    command, offset = rt.reading(CALL)
    assert kind(command) == "mget" and offset is not None
    assert rt.seen([entry(8), *STAMPS], offset)[0].value == 8
    host.mono.now += 60.0  # too long ago: read TIME again
    assert kind(rt.reading(CALL)[0]) == "read"


def test_entry_under_other_stamps_is_a_miss() -> None:
    rt, _, _ = make()
    env, state = rt.seen(read(entry(7), [b"sf", b"changed"]), None)
    assert env is None and state == "miss"
    env, state = rt.seen(read(entry(7), [b"sf", None]), None)  # a tag was invalidated
    assert env is None and state == "miss"


def test_undecodable_entry_is_a_counted_miss() -> None:
    rt, host, _ = make()
    env, state = rt.seen(read(b"not an envelope"), None)
    assert env is None and state == "miss"
    assert host.metrics.count("cache_errors", "f", "decode", "UndecodableError") == 1


def test_early_refresh_recomputes_when_the_lease_is_won() -> None:
    rt, host, hooks = make(beta=1e9)  # every hit is "close to expiry"
    got = drive(
        read_through(rt, CALL, hooks),
        [
            ("read", read(entry(7, compute=1.0))),
            ("claim", claim(True)),
            ("compute", RUN),
            ("store", 1),
        ],
    )
    assert got == 10  # the new value
    assert gets(host, "hit") == 1 and gets(host, "miss") == 0
    assert host.metrics.count("cache_puts", "f") == 1
    assert hooks.events == [
        ("hold", ("t:c:f:[1]:lease", True)),
        ("drop", "t:c:f:[1]:lease"),
    ]


def test_early_refresh_lost_lease_serves_the_value() -> None:
    rt, host, hooks = make(beta=1e9)
    steps = [("read", read(entry(7, compute=1.0))), ("claim", claim(False, 500))]
    assert drive(read_through(rt, CALL, hooks), steps) == 7
    assert gets(host, "hit") == 1


def test_stale_serves_at_once_and_refreshes_in_the_background() -> None:
    rt, host, hooks = make(stale=30.0)
    stale = entry(7, created=NOW - 61)  # fresh until NOW - 1
    assert drive(read_through(rt, CALL, hooks), [("read", read(stale))]) == 7
    assert gets(host, "stale") == 1
    assert hooks.events == [("refresh_later", KEY)]
    # the refresh itself: claim, compute, store; counted nowhere as a get
    steps = [("claim", claim(True)), ("compute", RUN), ("store", 1)]
    assert drive(refresh(rt, CALL, hooks), steps) is None
    assert host.metrics.count("cache_puts", "f") == 1
    assert gets(host, "miss") == 0


def test_background_refresh_failure_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rt, _host, hooks = make(stale=30.0)
    steps = [
        ("claim", claim(True)),
        ("compute", ValueError("db down")),
        ("store", -1),  # the lease is given up
    ]
    with caplog.at_level(logging.WARNING, logger="rcache.test"):
        drive(refresh(rt, CALL, hooks), steps)
    assert "background refresh of f failed (ValueError)" in caplog.text
    # a lost race: someone else refreshes
    drive(refresh(rt, CALL, hooks), [("claim", claim(False, 900))])


# -- misses ------------------------------------------------------------------------------


def test_expired_claims_computes_and_stores() -> None:
    rt, host, hooks = make()
    steps = [
        ("read", read(None)),
        ("claim", claim(True)),
        ("compute", RUN),
        ("store", 1),
    ]
    assert drive(read_through(rt, CALL, hooks), steps) == 10
    assert gets(host, "miss") == 1
    assert host.metrics.count("cache_puts", "f") == 1
    assert host.metrics.count("cache_loads", "f", "success") == 1


def test_stored_entry_is_dated_by_redis_clock_under_the_claimed_stamps() -> None:
    rt, _, hooks = make()
    flow = read_through(rt, CALL, hooks)
    assert kind(flow.send(None)) == "read"
    flow.send(read(None))
    flow.send(claim(True))
    store = flow.send(10)  # the computed value
    assert isinstance(store, Critical) and isinstance(store.command, Store)
    write = store.command.write
    assert list(write.keys) == [KEY, KEY + ":lease", KEY + ":ready", *CALL.stamp_keys]
    _token, data, entry_ttl, lease_ms, *stamps = write.args
    assert stamps == STAMPS and entry_ttl == 60_000 and lease_ms == 10_000

    env = decode_envelope(JsonSerializer(), data)
    assert env.value == 10 and env.stamp == stamp_blob(STAMPS)
    assert abs(env.created_at - NOW) < 1.0  # Redis's clock, not this host's
    assert store.command.release is not None  # sent if the write fails


def test_wait_then_coalesced_value_from_another_process() -> None:
    rt, host, hooks = make()
    steps = [
        ("read", read(None)),
        ("claim", claim(False, pttl=2000)),
        ("block", True),
        ("mget", [entry(7), *STAMPS]),  # woken: re-read (the clock is known: MGET)
    ]
    assert drive(read_through(rt, CALL, hooks), steps) == 7
    assert gets(host, "coalesced") == 1
    assert hooks.events == []  # never computed


def test_wait_is_capped_by_the_holder_lease() -> None:
    rt, _, hooks = make(wait=30.0)
    flow = read_through(rt, CALL, hooks)
    flow.send(None)
    flow.send(read(None))
    block = flow.send(claim(False, pttl=1500))
    assert isinstance(block, Block)
    assert block.key == KEY + ":ready" and block.timeout == pytest.approx(1.505)


@pytest.mark.parametrize("on_wait_timeout", ["compute", "raise"])
def test_wait_timeout_computes_or_raises(on_wait_timeout: str) -> None:
    rt, host, hooks = make(wait=1.0, on_wait_timeout=on_wait_timeout)
    flow = read_through(rt, CALL, hooks)
    flow.send(None)
    flow.send(read(None))
    assert kind(flow.send(claim(False, pttl=5000))) == "block"
    host.mono.now += 2.0  # the wait's budget is spent
    assert kind(flow.send(True)) == "mget"  # woken, but the value is not there
    if on_wait_timeout == "raise":
        assert kind(flow.send([None, *STAMPS])) == "claim"
        with pytest.raises(LockNotAcquiredError, match="wait=1s"):
            flow.send(claim(False, pttl=3000))
        assert gets(host, "miss") == 1
        return
    assert kind(flow.send([None, *STAMPS])) == "claim"
    # still held by the other: compute anyway, and store under the claimed stamps
    assert kind(flow.send(claim(False, pttl=3000))) == "compute"
    assert kind(flow.send(10)) == "store"
    with pytest.raises(StopIteration) as stop:
        flow.send(1)
    assert stop.value.value == 10
    assert gets(host, "miss") == 1


@pytest.mark.parametrize("policy", ["bypass", "raise"])
def test_hung_redis_computes_without_the_cache(policy: str) -> None:
    rt, host, hooks = make(policy=policy)
    flow = read_through(rt, CALL, hooks)
    flow.send(None)
    flow.send(read(None))
    assert kind(flow.send(claim(False, pttl=5000))) == "block"
    if policy == "raise":
        with pytest.raises(BackendUnavailableError, match="did not answer a wait"):
            flow.send(False)
        return
    assert kind(flow.send(False)) == "compute"  # no reply within the budget
    with pytest.raises(StopIteration) as stop:
        flow.send(10)
    assert stop.value.value == 10
    assert gets(host, "miss") == 1
    assert host.metrics.count("cache_errors", "f", "get", "BackendUnavailableError")


def test_bypass_computes_without_the_cache() -> None:
    rt, host, hooks = make()
    assert drive(read_through(rt, CALL, hooks), [("read", BYPASS), ("compute", RUN)])
    assert gets(host, "miss") == 1
    # a claim bypassed (breaker opened meanwhile) also computes without storing
    rt, host, hooks = make()
    steps = [("read", read(None)), ("claim", BYPASS), ("compute", RUN)]
    assert drive(read_through(rt, CALL, hooks), steps) == 10
    assert gets(host, "miss") == 1 and host.metrics.count("cache_puts", "f") == 0


def test_stale_if_error_serves_the_old_value_and_gives_up_the_lease() -> None:
    rt, host, hooks = make(stale_if_error=600.0)
    old = entry(7, created=NOW - 61)  # expired a second ago
    steps = [
        ("read", read(old)),
        ("claim", claim(True)),
        ("compute", ConnectionError("database down")),
        ("store", -1),  # b"": only the release
    ]
    assert drive(read_through(rt, CALL, hooks), steps) == 7
    assert gets(host, "stale") == 1 and gets(host, "miss") == 0
    assert host.metrics.count("cache_loads", "f", "failure") == 1
    assert [e for e, _ in hooks.events] == ["hold", "drop"]


def test_failed_computation_without_fallback_raises_after_giving_up_the_lease() -> None:
    rt, host, hooks = make()
    flow = read_through(rt, CALL, hooks)
    flow.send(None)
    flow.send(read(None))
    flow.send(claim(True))
    release = flow.throw(KeyError("nope"))
    assert isinstance(release, Critical)
    assert release.command.write.args[1] == b""  # type: ignore[attr-defined]
    with pytest.raises(KeyError):
        flow.send(-1)
    assert gets(host, "miss") == 1


def test_invalidated_during_load_answers_but_does_not_store() -> None:
    rt, host, hooks = make()
    flight = Flight(CALL.stamp_keys)
    flow = read_through(rt, CALL, hooks, flight)
    flow.send(None)
    flow.send(read(None))
    flow.send(claim(True))
    flight.detached = True  # an invalidation in this process, while computing
    store = flow.send(10)
    assert store.command.write.args[1] == b""  # type: ignore[attr-defined]
    assert store.command.release is None  # type: ignore[attr-defined]
    with pytest.raises(StopIteration) as stop:
        flow.send(-1)
    assert stop.value.value == 10
    assert flight.result == "miss"
    assert host.metrics.count("cache_errors", "f", "set", "InvalidatedDuringLoad") == 1
    # cache_store.lua's own rejection (a stamp changed in another process) counts alike
    rt.stored(0)
    assert host.metrics.count("cache_errors", "f", "set", "InvalidatedDuringLoad") == 2


@pytest.mark.parametrize("on_unserializable", ["skip", "raise"])
def test_unserializable_result_still_gives_up_the_lease(on_unserializable: str) -> None:
    rt, host, hooks = make()
    rt = ReadThrough(
        host=host,
        name="f",
        fn=rt.fn,
        get=rt.get,
        put=rt.put,
        freshness=rt.freshness,
        on_unserializable=on_unserializable,  # type: ignore[arg-type]
    )
    flow = read_through(rt, CALL, hooks)
    flow.send(None)
    flow.send(read(None))
    assert kind(flow.send(claim(True))) == "compute"
    thing = object()
    if on_unserializable == "raise":
        release = flow.send(thing)  # the SerializationError waits for the release
        assert release.command.write.args[1] == b""  # type: ignore[attr-defined]
        with pytest.raises(SerializationError, match="on_unserializable='skip'"):
            flow.send(-1)
        return
    store = flow.send(thing)
    assert store.command.write.args[1] == b""  # type: ignore[attr-defined]
    with pytest.raises(StopIteration) as stop:
        flow.send(-1)
    assert stop.value.value is thing  # returned, not stored
    assert host.metrics.count("cache_errors", "f", "serialize", "SerializationError")


def test_repaired_key_of_another_type_is_counted() -> None:
    rt, host, hooks = make()
    steps = [
        ("read", read(None)),
        ("claim", claim(True, repaired=1)),
        ("compute", RUN),
        ("store", 1),
    ]
    drive(read_through(rt, CALL, hooks), steps)
    assert host.metrics.count("cache_errors", "f", "claim", "WrongType") == 1


def test_no_stampede_reads_stamps_without_a_lease() -> None:
    rt, host, hooks = make()
    rt = ReadThrough(
        host=host,
        name="f",
        fn=rt.fn,
        get=rt.get,
        put=rt.put,
        freshness=rt.freshness,
        stampede=False,
    )
    flow = read_through(rt, CALL, hooks)
    flow.send(None)
    claim_cmd = flow.send(read(None))
    assert claim_cmd.args[1] == 0  # type: ignore[attr-defined]  # no lease
    assert kind(flow.send(claim(True))) == "compute"
    flow.send(10)
    with pytest.raises(StopIteration):
        flow.send(1)
    assert hooks.events[0] == ("hold", ("t:c:f:[1]:lease", False))


def test_explicit_refresh_loads_without_counting_a_get() -> None:
    rt, host, hooks = make()
    steps = [("claim", claim(True)), ("compute", RUN), ("store", 1)]
    assert drive(load(rt, CALL, hooks), steps) == 10
    assert host.metrics.count("cache_gets", "f", "miss") == 0


def test_delete_counts_removals() -> None:
    host = Host()
    guard = Guard("f", "delete", "bypass")
    assert drive(delete(["a", "b"], guard, host.metrics), [("run", 2)]) == 2
    assert host.metrics.count("cache_removals", "f") == 2
    assert drive(delete(["a"], guard, host.metrics), [("run", BYPASS)]) == 0
    assert drive(delete([], guard), []) == 0


# -- the store command's fallback release ---------------------------------------------------


class FakeRedis:
    memory = False

    def __init__(self, errors: list[BaseException | None]) -> None:
        self.errors = errors
        self.calls = 0

    def run(self, op: Any, retry: bool = True) -> Any:
        self.calls += 1
        error = self.errors.pop(0)
        if error is not None:
            raise error
        return 1


def _store(errors: list[BaseException | None]) -> tuple[Store, Any]:
    redis = FakeRedis(errors)
    driver = type("D", (), {"redis": redis})()
    write = Eval(None, ["k"], ["t", b"data"])  # type: ignore[arg-type]
    release = Eval(None, ["k"], ["t", b""])  # type: ignore[arg-type]
    return Store(write, release, Guard("f", "set", "bypass")), driver


def test_store_that_fails_gives_up_the_lease_when_redis_may_answer() -> None:
    store, driver = _store([BackendError("max bulk len"), None])
    with pytest.raises(BackendError):
        store.run(driver)
    assert driver.redis.calls == 2  # the write, then the release


def test_store_that_times_out_sends_nothing_more() -> None:
    timeout = BackendUnavailableError("timed out", TimeoutError("read timed out"))
    store, driver = _store([timeout])
    with pytest.raises(BackendUnavailableError):
        store.run(driver)
    assert driver.redis.calls == 1


# -- batches -----------------------------------------------------------------------------


def make_batch() -> tuple[Batch, Host, list[list[int]]]:
    host = Host()
    calls: list[list[int]] = []

    def users(ids: list[int]) -> dict[int, str]:
        calls.append(list(ids))
        return {i: f"u{i}" for i in ids if i != 99}

    bt = Batch(
        host=host,
        name="f",
        fn=users,
        get=Guard("f", "get", "bypass"),
        put=Guard("f", "set", "bypass"),
        ids_param="ids",
        ttl=60.0,
        fn_stamp="t:s:f:f",
    )
    return bt, host, calls


def batch_entry(value: Any, stamp: bytes = b"sf") -> bytes:
    return encode_envelope(
        JsonSerializer(), value, fresh_for=60, stamp=stamp_blob([stamp]), now=NOW - 1
    )


def test_batch_partial_hits_compute_only_the_missing_ids() -> None:
    bt, host, calls = make_batch()
    ids, keys = [1, 2, 3, 99], ["k1", "k2", "k3", "k99"]
    flow = batch(bt, ids, {"ids": ids}, keys)
    first = flow.send(None)
    assert list(first.keys) == ["t:s:f:f", *keys]  # type: ignore[attr-defined]
    compute = flow.send([NOW_US, b"sf", batch_entry("u1"), None, None, None])
    assert isinstance(compute, Compute)
    store = flow.send(compute.fn(**(compute.kwargs or {})))
    assert calls == [[2, 3, 99]]
    assert list(store.keys) == ["t:s:f:f", "k2", "k3"]  # type: ignore[attr-defined]
    with pytest.raises(StopIteration) as stop:
        flow.send(2)
    assert stop.value.value == {1: "u1", 2: "u2", 3: "u3"}
    assert gets(host, "hit") == 1 and gets(host, "miss") == 3
    assert host.metrics.count("cache_puts", "f") == 2


def test_batch_all_hits_is_one_read() -> None:
    bt, _host, calls = make_batch()
    reply = [NOW_US, b"sf", batch_entry("a"), batch_entry("b")]
    assert drive(
        batch(bt, [1, 2], {"ids": [1, 2]}, ["k1", "k2"]), [("read", reply)]
    ) == {
        1: "a",
        2: "b",
    }
    assert calls == []


def test_batch_without_a_stamp_creates_one_before_storing() -> None:
    bt, _host, _ = make_batch()
    steps = [
        ("read", [NOW_US, None, None]),
        ("claim", claim(True, stamps=[b"new"])),
        ("compute", RUN),
        ("store_many", 1),
    ]
    assert drive(batch(bt, [1], {"ids": [1]}, ["k1"]), steps) == {1: "u1"}


def test_batch_bypassed_computes_everything_and_stores_nothing() -> None:
    bt, host, _calls = make_batch()
    steps = [("read", BYPASS), ("compute", RUN)]
    assert drive(batch(bt, [1, 2], {"ids": [1, 2]}, ["k1", "k2"]), steps) == {
        1: "u1",
        2: "u2",
    }
    assert gets(host, "miss") == 0  # as before: a bypassed batch is not counted per id


def test_batch_must_return_a_mapping() -> None:
    bt, _, _ = make_batch()
    flow = batch(bt, [1], {"ids": [1]}, ["k1"])
    flow.send(None)
    flow.send([NOW_US, b"sf", None])
    with pytest.raises(ConfigurationError, match="mapping"):
        flow.send([1])


# -- options -----------------------------------------------------------------------------


def test_cached_options_are_validated_once() -> None:
    o = CachedOptions.build(ttl="10m", early=True, lease_ttl=2, tags=["a"])
    assert o.ttl == 600 and o.beta == 1.0 and o.wait == 2 and o.tags == ("a",)
    assert CachedOptions.build().ttl is None  # the cache's default, followed later
    for bad in (
        {"early": 0},
        {"stale": 0},
        {"tags": "a"},
        {"on_wait_timeout": "wait"},
        {"on_backend_error": "ignore"},
        {"refresh_runner": 3},
        {"unless": 3},
    ):
        with pytest.raises(ConfigurationError):
            CachedOptions.build(**bad)
    with pytest.raises(AttributeError):
        o.ttl = 5  # type: ignore[misc]  # frozen


# -- the bounded refresh pool ---------------------------------------------------------------


def refresh_threads() -> int:
    return sum(t.name == "rcache-refresh" for t in threading.enumerate())


def test_refresh_pool_runs_every_job_on_a_bounded_number_of_threads() -> None:
    pool = RefreshPool(workers=3, idle=0.2)
    before = refresh_threads()
    gate = threading.Event()
    done: list[int] = []
    lock = threading.Lock()

    def job(i: int) -> Any:
        def run() -> None:
            gate.wait(10)
            with lock:
                done.append(i)

        return run

    for i in range(50):
        pool.submit(job(i))
    assert pool.threads == 3
    assert refresh_threads() - before <= 3
    gate.set()
    deadline = time.monotonic() + 10
    while len(done) < 50:
        assert time.monotonic() < deadline, "jobs did not all run"
        time.sleep(0.01)  # poll interval
    assert sorted(done) == list(range(50))
    while pool.threads:  # idle threads end
        assert time.monotonic() < deadline + 5, "idle refresh threads did not end"
        time.sleep(0.01)  # poll interval
    pool.submit(lambda: None)  # and start again on demand
    assert pool.threads == 1


def test_the_wrappers_warm_hit_judges_without_a_flow() -> None:
    rt, host, _ = make(stale=30.0)
    flight = Flight(CALL.stamp_keys)
    assert rt.hit([entry(7), *STAMPS], NOW, flight) == (True, 7)
    assert flight.result == "hit" and gets(host, "hit") == 1
    fresh, seen = rt.hit([entry(7, created=NOW - 61), *STAMPS], NOW, None)
    assert not fresh and seen[0].value == 7 and seen[1] == "stale"  # for the flow
    assert rt.hit(BYPASS, NOW, None) == (False, BYPASS)
    assert gets(host, "hit") == 1  # only the fresh one counted here
