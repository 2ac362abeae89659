"""The admin API's pure parts: key classification, lock rows, clear planning."""

from __future__ import annotations

import pytest

from rcache._admin import (
    _Census,
    _ClearPlan,
    _describe,
    _lock_names,
    escape_glob,
)
from rcache._exceptions import ConfigurationError


def test_lock_names_group_aux_keys_by_name() -> None:
    keys = [
        b"p:l:{a:b}",
        b"p:l:{a:b}:fence",
        b"p:l:{a:b}:fs:123:abc",
        b"p:l:{doc}:rw:r",
        b"p:l:{x}y}:sem",  # a name with a brace still parses
        b"p:l:{nope",  # not a lock key
    ]
    assert _lock_names(keys, "p") == {
        "a:b": {"", ":fence", ":fs:"},
        "doc": {":rw:r"},
        "x}y": {":sem"},
    }


def test_describe_reads_holders_by_server_time() -> None:
    now = 1_000_000
    rows = _describe(
        "doc",
        {
            "writer": None,
            "writer_pttl": -2,
            "readers": [(b"7:aa", now + 1500), (b"8:bb", now - 1)],  # one expired
            "intents": 2,
            "rw_fence": b"9",
        },
        now,
    )
    assert len(rows) == 1
    row = rows[0]
    assert row.kind == "rwlock" and row.fence == 9 and row.waiters == 2
    assert [(h.token, h.mode, h.remaining, h.pid) for h in row.holders] == [
        ("7:aa", "read", 1.5, 7)
    ]


def test_describe_skips_free_locks_and_keeps_waited_ones() -> None:
    free = {
        "lock": None,
        "lock_pttl": -2,
        "fence": b"4",
        "waiting": 0,
        "fair": 0,
        "fair_live": 0,
    }
    assert _describe("x", free, 0) == []
    waited = {**free, "waiting": 1}
    (row,) = _describe("x", waited, 0)
    assert row.holders == () and row.waiting and row.waiters is None


def test_census_classifies_keys() -> None:
    c = _Census("app", sample=2)
    c.add(
        [
            b"app:c:mod.f:[1]",
            b"app:c:mod.f:h:" + b"0" * 32,
            b"app:c:mod.g:[2]:lease",
            b"app:c:mod.g:[2]:ready",
            b"app:k:page",
            b"app:s:t:tag1",
            b"app:s:f:mod.f",
            b"app:l:{a}",
            b"app:celery:u:{t:1}",
            b"other:k:1",  # never counted
        ]
    )
    stats = c.finish([100, 300], held=1)
    assert stats.keys == 9 and stats.entries == 3 and stats.explicit_entries == 1
    assert [(f.name, f.entries) for f in stats.functions] == [("mod.f", 2)]
    assert stats.computations == 1 and stats.tags == 1 and stats.other_keys == 2
    assert stats.memory_bytes == 200 * 9 and stats.memory_sampled == 2
    assert len(c.reservoir) == 2


def test_clear_plan_keeps_locks_and_refuses_outsiders() -> None:
    plan = _ClearPlan("a*b", dry_run=False, include_locks=False, batch=10)
    assert plan.match == "a\\*b:*"
    doomed = plan.select([b"a*b:k:1", b"a*b:l:{x}", b"a*b:celery:u:{y}", b"axb:k:1"])
    assert doomed == [b"a*b:k:1"]
    assert (plan.result.matched, plan.result.kept) == (3, 2)
    everything = _ClearPlan("", dry_run=True, include_locks=False, batch=10)
    assert everything.match == "*"
    assert everything.select([b"x", b"y:l:{z}"]) == [b"x", b"y:l:{z}"]


@pytest.mark.parametrize("batch", [0, -1, 100_001, True, 1.5])
def test_clear_plan_rejects_bad_batches(batch: object) -> None:
    with pytest.raises(ConfigurationError, match="batch_size"):
        _ClearPlan("p", dry_run=False, include_locks=False, batch=batch)  # type: ignore[arg-type]


def test_escape_glob_round_trip() -> None:
    assert escape_glob("[a]") == "\\[a\\]"
