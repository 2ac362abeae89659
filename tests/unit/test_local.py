"""The local tier's store and sequence guard, fed with synthetic invalidations (no Redis).

The listener (``rcache._tracking``) calls ``Invalidations.invalidate/flush/connected/
disconnected``; these tests call them directly, between a read's ``begin`` and its
``store``, to pin down the guard: seq, epoch, null message (flush), fork.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from datetime import timedelta
from typing import Any

import pytest

import rcache
from rcache._exceptions import ConfigurationError
from rcache._local import (
    MISSING,
    Invalidations,
    LocalStore,
    LocalTier,
    args_key,
    resolve_local,
)
from rcache._metrics import InMemoryMetrics


def make(
    max_entries: int = 100,
    ttl: float = 60.0,
    max_bytes: int | None = None,
    copy: bool = False,
    last_max: int = 1 << 13,
) -> tuple[LocalStore, Invalidations, InMemoryMetrics]:
    guard = Invalidations(last_max=last_max)
    guard.connected(7, first=True)  # as the listener does once subscribed
    metrics = InMemoryMetrics()
    store = LocalStore(
        LocalTier(max_entries=max_entries, ttl=ttl, max_bytes=max_bytes, copy=copy),
        guard,
        "app",
        metrics,
    )
    return store, guard, metrics


def put(store: LocalStore, key: Any, value: Any, *redis_keys: str, **kw: Any) -> bool:
    token = store.begin(redis_keys or (f"r:{key}",))
    return store.store(token, key, value, **kw)


# -- options ---------------------------------------------------------------------------


def test_local_tier_defaults_and_public_name() -> None:
    tier = rcache.LocalTier()
    assert (tier.max_entries, tier.ttl, tier.max_bytes, tier.copy) == (
        10_000,
        30.0,
        None,
        False,
    )
    assert LocalTier(ttl=timedelta(minutes=1)).ttl == 60.0
    assert LocalTier(ttl="250ms") == LocalTier(ttl=0.25)
    with pytest.raises(AttributeError):
        tier.ttl = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"max_entries": 0}, "max_entries"),
        ({"max_entries": True}, "max_entries"),
        ({"max_entries": 1.5}, "max_entries"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": "soon"}, "ttl"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"max_bytes": "1MB"}, "max_bytes"),
        ({"copy": "yes"}, "copy"),
    ],
)
def test_local_tier_refuses_bad_options(kwargs: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        LocalTier(**kwargs)


def test_local_argument_is_checked() -> None:
    assert resolve_local(None) is None
    assert resolve_local(True) is True
    with pytest.raises(ConfigurationError, match="LocalTier"):
        resolve_local(10_000)


# -- the store ---------------------------------------------------------------------------


def test_store_then_get_same_object_by_default() -> None:
    store, _, metrics = make()
    value = {"a": [1]}
    assert put(store, "k", value)
    assert store.get("k") is value
    assert store.get("other") is MISSING
    assert metrics.local["app"] == 1


def test_copy_hands_out_copies() -> None:
    store, _, _ = make(copy=True)
    value = {"a": [1]}
    put(store, "k", value)
    value["a"].append(2)  # the caller's object is not the stored one
    got = store.get("k")
    assert got == {"a": [1]}
    got["a"].append(3)
    assert store.get("k") == {"a": [1]}


def test_entries_expire_by_tier_ttl_and_by_their_own_expiry() -> None:
    store, _, _ = make(ttl=0.05)
    put(store, "k", 1)
    put(store, "short", 2, expires_at=time.monotonic() + 0.01)
    assert not put(store, "past", 3, expires_at=time.monotonic() - 1)
    assert store.get("short") == 2
    deadline = time.monotonic() + 2
    while store.get("short") is not MISSING and time.monotonic() < deadline:
        time.sleep(0.002)
    assert store.get("short") is MISSING
    while store.get("k") is not MISSING and time.monotonic() < deadline:
        time.sleep(0.002)
    assert store.get("k") is MISSING and len(store) == 0
    assert store._index == {}


def test_lru_evicts_least_recently_used() -> None:
    store, _, _ = make(max_entries=3)
    for k in "abc":
        put(store, k, k)
    store.get("a")  # a is now the most recently used
    put(store, "d", "d")
    assert [k for k in "abcd" if store.get(k) is not MISSING] == ["a", "c", "d"]
    assert set(store._index) == {b"r:a", b"r:c", b"r:d"}


def test_max_bytes_bounds_the_sum_of_sizes() -> None:
    store, _, _ = make(max_bytes=100)
    for i in range(10):
        put(store, i, i, nbytes=30)
    assert len(store) == 3 and store.nbytes == 90
    assert not put(store, "huge", 0, nbytes=101)  # never fits: not stored at all
    assert store.get(9) == 9 and store.get(0) is MISSING


def test_an_invalidation_of_any_key_of_an_entry_drops_it() -> None:
    store, guard, metrics = make()
    put(store, "u1", 1, "v:1", "s:fn", "s:tag:a")
    put(store, "u2", 2, "v:2", "s:fn", "s:tag:b")
    put(store, "u3", 3, "v:3", "s:other")
    assert guard.invalidate([b"s:tag:a"]) == 1
    assert store.get("u1") is MISSING and store.get("u2") == 2
    assert guard.invalidate([b"s:fn"]) == 1  # the function stamp: u2 (u1 is gone)
    assert store.get("u2") is MISSING and store.get("u3") == 3
    assert set(store._index) == {b"v:3", b"s:other"}
    assert metrics.count("local_invalidations", "app") == 2


def test_replacing_an_entry_keeps_the_index_exact() -> None:
    store, guard, _ = make()
    put(store, "k", 1, "v:1", "s:a")
    put(store, "k", 2, "v:1", "s:b")
    guard.invalidate([b"s:a"])  # the old entry's stamp: the new entry stays
    assert store.get("k") == 2
    guard.invalidate([b"s:b"])
    assert store.get("k") is MISSING and store._index == {}


# -- the sequence guard ------------------------------------------------------------------


def test_an_invalidation_in_flight_refuses_the_store() -> None:
    store, guard, _ = make()
    token = store.begin(["v:1", "s:fn"])
    guard.invalidate([b"s:fn"])  # arrives between the reply and the store
    assert not store.store(token, "k", "old")
    assert store.get("k") is MISSING and store.refused == 1


def test_an_invalidation_before_the_read_began_does_not() -> None:
    store, guard, _ = make()
    guard.invalidate([b"v:1"])
    token = store.begin(["v:1"])
    guard.invalidate([b"v:2"])  # another key
    assert store.store(token, "k", "new")


def test_own_writes_drop_and_refuse_too() -> None:
    store, _, metrics = make()
    put(store, "k", 1, "v:1")
    token = store.begin(["v:1"])
    assert store.discard(["v:1"]) == 1
    assert store.get("k") is MISSING
    assert not store.store(token, "k", 1)
    assert metrics.count("local_invalidations", "app") == 0  # not received from Redis


@pytest.mark.parametrize("event", ["flushall", "disconnected", "reconnected", "fork"])
def test_epoch_events_flush_and_refuse_reads_in_flight(event: str) -> None:
    store, guard, metrics = make()
    put(store, "k", 1)
    token = store.begin(["r:other"])
    if event == "flushall":
        guard.flush("flushall")  # the null invalidation message
    elif event == "disconnected":
        guard.disconnected()
    elif event == "reconnected":
        guard.connected(8)
    else:
        guard.after_fork()
    assert len(store) == 0 and store._index == {}
    assert not store.store(token, "x", 1)
    reason = {"disconnected": "disconnect", "reconnected": "reconnect"}.get(
        event, event
    )
    assert metrics.count("local_flushes", "app", reason) == 1


def test_nothing_is_stored_while_the_listener_is_down() -> None:
    store, guard, _ = make()
    guard.disconnected()
    demanded: list[int] = []
    guard.demand = lambda: demanded.append(1)
    token = store.begin(["r:k"])
    assert demanded == [1]  # the read asks for the listener to come back
    assert not store.store(token, "k", 1)
    guard.connected(9)
    assert put(store, "k", 1)


def test_a_cluster_guard_routes_each_read_to_its_nodes_listener() -> None:
    """One guard for a cluster, a listener per node: a token names the node its keys'
    slot is served by and that node's listener id; ready once every node's listener
    is subscribed; one node's disconnect flushes every node's entries."""
    guard = Invalidations()
    guard.route = lambda key: "a" if key.startswith(b"a") else "b"
    guard.link("a")
    guard.link("b")
    store = LocalStore(LocalTier(), guard, "app", InMemoryMetrics())
    guard.connected(11, first=True, node="a")
    assert not guard.ready.is_set()  # b is not subscribed yet
    token = store.begin(["b:1"])
    assert (token.node, token.client_id, token.ok) == ("b", None, False)
    assert not store.store(token, "b1", 1)  # not tracked: never kept
    guard.connected(22, first=True, node="b")
    assert guard.ready.is_set()
    token = store.begin(["a:1"])
    assert (token.node, token.client_id) == ("a", 11)
    assert put(store, "a1", 1, "a:1") and put(store, "b1", 2, "b:1")
    token = store.begin(["a:2"])
    guard.disconnected("b")  # another node's listener: the whole tier, reads too
    assert len(store) == 0 and not store.store(token, "a2", 3)
    assert guard.client_id("a") == 11 and guard.client_id("b") is None
    assert not guard.ready.is_set()
    guard.unlink("b")  # no longer a primary: a's listener alone makes it ready
    assert guard.ready.is_set()
    assert put(store, "a2", 3, "a:2")


def test_an_unusable_token_is_refused() -> None:
    store, _, _ = make()
    token = store.begin(["r:k"])
    token.ok = False  # its connection could not be redirected to the listener
    assert not store.store(token, "k", 1)


def test_a_read_older_than_the_remembered_invalidations_is_refused() -> None:
    store, guard, _ = make(last_max=4)
    token = store.begin(["r:k"])
    for i in range(5):  # five other keys: the oldest is forgotten
        guard.invalidate([f"r:{i}".encode()])
    assert len(guard._last) == 4
    assert not store.store(token, "k", 1)  # cannot tell: refused, never stale
    assert put(store, "k", 1)


def test_after_fork_the_store_is_empty_and_waits_for_a_listener() -> None:
    store, guard, _ = make()
    put(store, "k", 1)
    guard.after_fork()
    assert len(store) == 0 and guard.client_id() is None and not guard.ready.is_set()
    assert not put(store, "k", 1)


def test_a_closed_store_stops_receiving_and_holds_nothing() -> None:
    store, guard, _ = make()
    put(store, "k", 1)
    store.close()
    assert len(store) == 0 and store not in guard.stores
    put(store, "k", 1)
    assert len(store) == 0


def test_stores_of_one_guard_share_invalidations() -> None:
    store, guard, _ = make()
    other = LocalStore(LocalTier(), guard, "fn")
    put(store, "a", 1, "v:1")
    put(other, "b", 1, "v:1")
    guard.invalidate([b"v:1"])
    assert len(store) == len(other) == 0


def _churn(store: LocalStore, guard: Invalidations, start: int, stop: int) -> None:
    """Distinct keys read and stored, and (other) keys invalidated."""
    for i in range(start, stop):
        token = guard.begin((f"v:{i}", "s:fn"))
        store.store(token, (i,), i, nbytes=10)
        if i % 8 == 0:
            guard.invalidate([f"v:{i - 5000}".encode()])  # evicted already


def _sizes(store: LocalStore, guard: Invalidations) -> tuple[int, ...]:
    stamp = store._index.get(b"s:fn")
    return (
        len(store),
        len(store._index),
        len(stamp) if isinstance(stamp, set) else 1,
        len(guard._last),
        store.nbytes,
    )


@pytest.mark.slow
def test_memory_stays_bounded_under_a_million_distinct_keys() -> None:
    store, guard, _ = make(max_entries=1000)
    bound = (1000, 1001, 1000, 1 << 13, 10_000)  # 1000 value keys + the fn stamp
    for start in range(0, 1_000_000, 250_000):
        _churn(store, guard, start, start + 250_000)
        assert _sizes(store, guard) == bound
    # and in bytes: once every structure is full, nothing accumulates
    store, guard, _ = make(max_entries=1000)
    gc.collect()
    tracemalloc.start()
    try:
        _churn(store, guard, 0, 80_000)
        gc.collect()
        warm = tracemalloc.get_traced_memory()[0]
        _churn(store, guard, 80_000, 120_000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - warm
    finally:
        tracemalloc.stop()
    assert _sizes(store, guard) == bound
    # 40 000 more keys kept would take >= 8 MB; the tables' own resizing, < 1 MB
    assert grown < 2**20, grown


# -- local keys --------------------------------------------------------------------------


def test_args_key_is_typed() -> None:
    ns = object()
    keys = {args_key(ns, (v,)) for v in (1, True, 1.0, "1", b"1", None, 0.0, -0.0)}
    assert None not in keys and len(keys) == 8
    assert args_key(ns, (1, "a")) == args_key(ns, (1, "a"))
    assert args_key(ns, (1, "a")) != args_key(ns, ("a", 1))
    assert args_key(ns, ([1],)) is None  # not a plain scalar: use the Redis key
    assert args_key(ns, (1, (2,))) is None
    assert args_key(ns, ()) == (ns,)


def test_a_store_that_is_gone_is_no_longer_fed() -> None:
    store, guard, _ = make()
    other = LocalStore(LocalTier(), guard, "fn")
    assert len(guard.stores) == 2
    del other
    gc.collect()
    assert guard.stores == [store]
    guard.invalidate([b"x"])  # no dead store in the way
    LocalStore(LocalTier(), guard, "fn2")  # adding prunes the dead references
    assert len(guard._refs) <= 2


# -- entries that record their stamps (decorated functions) -------------------------------


def stamped(store: LocalStore, key: Any, value: Any, **stamps: bytes) -> bool:
    """A read of ``v:<key>`` and the stamps ``s:<name>`` with these values."""
    names = [f"s:{n}" for n in stamps]
    token = store.begin([f"v:{key}", *names])
    return store.store(
        token, key, value, stamps=list(zip(names, stamps.values(), strict=True))
    )


def test_a_stamp_invalidation_makes_its_entries_miss_until_one_reread() -> None:
    store, guard, _ = make()
    stamped(store, 1, "a", fn=b"F1", t1=b"T1")
    stamped(store, 2, "b", fn=b"F1", t2=b"T2")
    assert store.get(1) == "a" and store.get(2) == "b"
    guard.invalidate([b"s:fn"])  # e.g. a store extended its TTL: same value
    assert store.get(1) is MISSING and store.get(2) is MISSING
    assert len(store) == 2  # kept, not served
    stamped(store, 1, "a", fn=b"F1", t1=b"T1")  # one re-read: the same value
    assert store.get(2) == "b"  # valid again without its own round trip


def test_a_changed_stamp_never_revalidates_the_old_entries() -> None:
    store, guard, _ = make()
    stamped(store, 1, "a", fn=b"F1")
    stamped(store, 2, "b", fn=b"F1")
    guard.invalidate([b"s:fn"])  # invalidate_all: deleted, then made anew
    stamped(store, 1, "a2", fn=b"F2")
    assert store.get(1) == "a2"
    assert store.get(2) is MISSING  # recorded F1


def test_a_value_key_invalidation_still_drops_a_stamped_entry() -> None:
    store, guard, _ = make()
    stamped(store, 1, "a", fn=b"F1")
    guard.invalidate([b"v:1"])
    assert len(store) == 0
    assert guard.stamp_values == {} and guard._stamp_refs == {}


def test_the_stamp_table_stays_bounded() -> None:
    store, guard, _ = make(max_entries=10)
    for i in range(1000):  # a tag per argument: user:{i}
        stamped(store, i, i, fn=b"F", **{f"user{i}": b"U"})
    assert len(store) == 10
    assert len(guard.stamp_values) == 11 and guard._stamp_refs[b"s:fn"] == 10
    store.close()
    assert guard.stamp_values == {} and guard._stamp_refs == {}


def test_a_stamp_invalidated_in_flight_refuses_the_store() -> None:
    store, guard, _ = make()
    token = store.begin(["v:1", "s:fn"])
    guard.invalidate([b"s:fn"])
    assert not store.store(token, 1, "a", stamps=[("s:fn", b"F1")])
    assert guard.stamp_values == {}
