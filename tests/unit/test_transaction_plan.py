"""The IO-free parts of the transaction helpers: slots, the retry plan, stats."""

from __future__ import annotations

import pickle
import threading

import pytest
import redis.crc

import rcache
from rcache._redis import TxConflict as _Conflict
from rcache._redis import TxUnsent as _Unsent
from rcache._transaction import (
    TransactionStats,
    _Plan,
    check_one_slot,
    hash_slot,
)


@pytest.mark.parametrize(
    "key",
    [
        "foo",
        "stock:42",
        "{user1000}.following",
        "{user1000}.followers",
        "{}x",  # empty tag: the whole key is hashed
        "a{b",  # no closing brace
        "x{}{y}",  # the first "{" decides
        "{a}{b}",
        "é{ü}",
        b"\xff\x00bytes",
    ],
)
def test_hash_slot_matches_redis_py(key: str | bytes) -> None:
    raw = key.encode() if isinstance(key, str) else key
    assert hash_slot(key) == redis.crc.key_slot(raw)


def test_hash_slot_known_values() -> None:
    assert hash_slot("foo") == 12182  # from the Redis Cluster specification
    assert hash_slot("{user1000}.following") == hash_slot("{user1000}.followers")


def test_check_one_slot() -> None:
    check_one_slot(["{cart:7}:items", "{cart:7}:total"])
    check_one_slot(["only-one"])
    check_one_slot([])
    with pytest.raises(rcache.ConfigurationError, match="hash tag"):
        check_one_slot(["stock:1", "stock:2"])


def test_plan_retry_decisions_and_final_errors() -> None:
    stats = TransactionStats()
    plan = _Plan(["k"], retries=3, max_time=1.0, transient_limit=2, stats=stats)
    assert plan.should_retry(plan.conflict())
    first = plan.unsent(ConnectionError("reset"))
    assert plan.should_retry(first)  # 1 transient failure, limit 2
    second = plan.unsent(ConnectionError("reset"))
    assert not plan.should_retry(second)
    assert not plan.should_retry(ValueError("the caller's"))
    error = plan.final_error(second)
    assert isinstance(error, rcache.BackendUnavailableError)
    plan.started()
    plan.started()
    conflict = plan.final_error(_Conflict())
    assert isinstance(conflict, rcache.TransactionConflictError)
    assert (conflict.keys, conflict.attempts) == (["k"], 2)
    plan.finished(committed=False)
    plan.finished(committed=True)  # recorded once only
    assert (stats.calls, stats.commits, stats.conflicts, stats.transient_retries) == (
        1,
        0,
        1,
        2,
    )
    assert (stats.attempts, stats.last_attempts) == (2, 2)


def test_plan_with_no_retries_never_retries_the_first_attempt() -> None:
    plan = _Plan(["k"], retries=0, max_time=1.0, transient_limit=5, stats=None)
    plan.started()
    assert plan.delay(_Conflict()) is None
    assert plan.delay(_Unsent(ConnectionError())) is None


def test_stats_are_thread_safe_and_picklable() -> None:
    stats = TransactionStats()

    def work() -> None:
        for _ in range(2000):
            stats._add(calls=1, conflicts=1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (stats.calls, stats.conflicts) == (8000, 8000)
    copy = pickle.loads(pickle.dumps(stats))
    assert copy == stats
    copy._add(commits=1)  # the lock was recreated
    assert copy.commits == 1
