"""Slot groups on Redis Cluster, without a server: the grouped key names
(``KeySpace(prefix, groups=B)``), every key of an entry in one hash slot whatever the
names hold (checked with redis-py's own ``key_slot``), the recorded-B comparison and the
invalidation fan-out flow driven by hand."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from redis.crc import key_slot

import rcache
from rcache._cluster import DeleteCopies, GroupsRecord, describe, invalidate
from rcache._exceptions import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
)
from rcache._flow import Run
from rcache._keys import KeyBuilder
from rcache._policy import Guard
from rcache._slots import DEFAULT_GROUPS, group_of, hash_tag
from rcache.spi import KeySpace


def _slot(key: str) -> int:
    return int(key_slot(key.encode("utf-8", "surrogatepass")))


def test_grouped_names_are_pinned() -> None:
    ks = KeySpace("shop", groups=256)
    g = group_of("app.get_user:[42]", 256)
    assert ks.value("app.get_user", "[42]") == f"shop:{{shop.{g}}}:c:app.get_user:[42]"
    value = ks.value("app.get_user", "[42]")
    assert ks.group_of_key(value) == g
    assert ks.lease(value) == value + ":lease"
    assert ks.ready(value) == value + ":ready"
    assert ks.function_stamp("app.get_user", 17) == "shop:{shop.17}:s:f:app.get_user"
    assert ks.tag_stamp("user:42", 17) == "shop:{shop.17}:s:t:user:42"
    assert ks.values("app.f", 3) == "shop:{shop.3}:c:app.f:"
    k = group_of("user:42", 256)
    assert ks.explicit("user:42") == f"shop:{{shop.{k}}}:k:user:42"
    assert ks.groups_record() == "shop:cluster:groups"
    # every copy of a stamp, one per group
    stamps = ks.tag_stamps("t")
    assert len(stamps) == 256 == len(set(stamps))
    assert ks.function_stamps("f")[5] == "shop:{shop.5}:s:f:f"
    # locks, rcache-celery's keys and probes keep their single-primary names
    assert ks.lock("n").fence == KeySpace("shop").lock("n").fence == "shop:l:{n}:fence"
    assert ks.lock_guard("r:1") == "shop:celery:l:{r:1}"
    assert ks.unique_guard("t", "d") == "shop:celery:u:{t:d}"
    assert ks.probe("ab") == "shop:check:ab"
    assert ks.group_of_key(ks.lock("n").base) is None
    # single primary: no groups at all, and one copy of each stamp
    single = KeySpace("shop")
    assert single.groups is None and single.head() == "shop"
    assert single.tag_stamps("t") == ["shop:s:t:t"]
    assert single.function_stamps("f") == ["shop:s:f:f"]
    assert single.value("m.f", "[1]") == single.values("m.f") + "[1]"
    assert single.group_of_key("shop:c:m.f:[1]") is None
    assert repr(ks) == "KeySpace('shop', groups=256)"
    assert ks != single and KeySpace("shop", groups=256) == ks


def test_a_grouped_keyspace_refuses_what_has_no_single_name() -> None:
    ks = KeySpace("shop", groups=8)
    with pytest.raises(ConfigurationError, match="copy per slot group"):
        _ = ks.tag_prefix
    with pytest.raises(ConfigurationError, match="slot group"):
        ks.function_stamp("f")
    with pytest.raises(ConfigurationError, match="braces"):
        KeySpace("sh{op}", groups=8)
    with pytest.raises(ConfigurationError, match="slot_groups=256"):
        KeySpace("shop", groups=0)


_ALPHABET = "ab{}:[]\"' .é\\/0"


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, n)))


def test_every_key_of_an_entry_hashes_to_one_slot_with_braces_anywhere() -> None:
    """Value, lease, wake-up list, the group's stamp copies: one slot, for decorated
    functions (names and arguments with braces) and for key= templates."""
    rng = random.Random(15)
    for groups in (1, 16, DEFAULT_GROUPS, 16384):
        ks = KeySpace("app", groups=groups)
        for _ in range(400):
            name, tag = _text(rng, 12) or "f", _text(rng, 10)

            def f(x: Any, y: Any = None) -> Any:
                return x

            f.__qualname__ = name
            builder = KeyBuilder(f, prefix=ks)
            args = (_text(rng, 20), {"k{": _text(rng, 5)})
            for value in (
                builder.build(args, {}),  # default key: name + encoded arguments
                ks.explicit(_text(rng, 15) or "k"),  # explicit keys and templates
            ):
                group = ks.group_of_key(value)
                assert group is not None and 0 <= group < groups
                keys = [
                    value,
                    ks.lease(value),
                    ks.ready(value),
                    ks.function_stamp(builder.name, group),
                    ks.tag_stamp(tag, group),
                ]
                assert len({_slot(k) for k in keys}) == 1, keys


def test_explicit_keys_sharing_a_hash_tag_share_a_slot() -> None:
    # what a one-slot transaction over explicit keys relies on
    ks = KeySpace("app", groups=256)
    assert hash_tag("{cart:7}:qty") == "cart:7" == hash_tag("x{cart:7}")
    assert hash_tag("{}x") == "{}x" and hash_tag("a{b") == "a{b"
    assert _slot(ks.explicit("{cart:7}:qty")) == _slot(ks.explicit("{cart:7}:total"))
    assert ks.group_of_key(ks.explicit("{cart:7}")) == group_of("cart:7", 256)


def test_key_templates_and_key_callables_land_in_the_explicit_keys_group() -> None:
    ks = KeySpace("app", groups=64)

    def user(uid: int) -> int:
        return uid

    by_template = KeyBuilder(user, prefix=ks, key="user:{uid}")
    by_callable = KeyBuilder(user, prefix=ks, key=lambda uid: f"user:{uid}")
    assert by_template.build((42,), {}) == ks.explicit("user:42")
    assert by_callable.build((42,), {}) == ks.explicit("user:42")
    # rebase back to one primary: the class's own per-call methods again
    by_template.rebase("app")
    assert by_template.build((42,), {}) == "app:k:user:42"
    assert "build" not in vars(by_template)


def test_the_single_primary_key_builder_pays_nothing_for_groups() -> None:
    def f(x: int) -> int:
        return x

    builder = KeyBuilder(f, prefix="app")
    assert "build" not in vars(builder) and "value_key" not in vars(builder)
    assert builder.build((1,), {}) == "app:c:" + builder.name + ":[1]"


def test_cache_on_a_cluster_url_groups_its_keys_without_connecting() -> None:
    cache = rcache.Cache("redis+cluster://127.0.0.1:1", prefix="shop", slot_groups=32)
    assert cache.keyspace == KeySpace("shop", groups=32)
    assert cache._key("user:1") == KeySpace("shop", groups=32).explicit("user:1")
    with pytest.raises(ConfigurationError, match="braces"):
        rcache.Cache("redis+cluster://127.0.0.1:1", prefix="a{b}")
    with pytest.raises(ConfigurationError, match="slot_groups"):
        rcache.Cache("redis+cluster://127.0.0.1:1", slot_groups=0)
    # elsewhere slot_groups is validated and ignored: the layout does not change
    single = rcache.Cache("redis://127.0.0.1:1", prefix="shop", slot_groups=32)
    assert single.keyspace == KeySpace("shop")
    assert single._key("user:1") == "shop:k:user:1"
    with pytest.raises(ConfigurationError, match="slot_groups"):
        rcache.Cache("redis://127.0.0.1:1", slot_groups="many")  # type: ignore[arg-type]


# -- the recorded B ----------------------------------------------------------------------


class _Client:
    def __init__(self, recorded: bytes | None) -> None:
        self.recorded = recorded
        self.calls: list[tuple[Any, ...]] = []

    def set(self, key: str, value: int, *, nx: bool, get: bool) -> bytes | None:
        self.calls.append((key, value, nx, get))
        return self.recorded


def test_the_first_process_records_b_and_the_same_b_passes() -> None:
    record = GroupsRecord("app:cluster:groups", 256, "app")
    client = _Client(None)
    record.check(client)
    assert client.calls == [("app:cluster:groups", 256, True, True)]
    assert record.checked
    record.check(client)  # once per process
    assert len(client.calls) == 1
    again = GroupsRecord("app:cluster:groups", 256, "app")
    again.check(_Client(b"256"))
    assert again.checked


def test_another_b_is_refused_with_what_to_write() -> None:
    record = GroupsRecord("app:cluster:groups", 64, "app")
    with pytest.raises(ConfigurationError) as info:
        record.check(_Client(b"256"))
    text = str(info.value)
    assert "slot_groups=256" in text and "slot_groups=64" in text
    assert "Cache(..., slot_groups=256)" in text and "DEL app:cluster:groups" in text
    assert not record.checked  # every command checks again until it is fixed
    with pytest.raises(ConfigurationError, match="not a slot group count"):
        record.check(_Client(b"junk"))


async def test_the_async_check_records_too() -> None:
    class _Async(_Client):
        async def set(  # type: ignore[override]
            self, key: str, value: int, *, nx: bool, get: bool
        ) -> bytes | None:
            return super().set(key, value, nx=nx, get=get)

    record = GroupsRecord("app:cluster:groups", 8, "app")
    await record.acheck(_Async(b"8"))
    assert record.checked
    with pytest.raises(ConfigurationError):
        await GroupsRecord("k", 8, "app").acheck(_Async(b"9"))


def test_a_forked_child_checks_again(monkeypatch: pytest.MonkeyPatch) -> None:
    record = GroupsRecord("k", 8, "app")
    record.check(_Client(None))
    pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: pid + 1)
    assert not record.checked


# -- the invalidation fan-out, driven by hand ---------------------------------------------

GUARD = Guard("app", "delete", "bypass")


def test_an_invalidation_deletes_every_copy_and_counts_what_had_one() -> None:
    copies = [["t1.0", "t1.1", "t1.2"], ["t2.0", "t2.1", "t2.2"]]
    flow = invalidate(copies, GUARD, "tags 't1', 't2'", 3)
    command = flow.send(None)
    assert isinstance(command, DeleteCopies)
    assert list(command.keys) == [k for c in copies for k in c]
    # whatever the cache's policy, a failure raises (it may be partial)
    assert command.guard == Guard("app", "delete", "raise")
    with pytest.raises(StopIteration) as done:
        flow.send([0, 1, 0, 0, 0, 0])  # t1 had a copy in group 1, t2 none
    assert done.value.value == 1


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (BackendUnavailableError("node down"), BackendUnavailableError),
        (BackendError("CLUSTERDOWN"), BackendError),
    ],
)
def test_a_failed_invalidation_raises_saying_it_may_be_partial(
    error: BackendError, kind: type[BackendError]
) -> None:
    flow = invalidate([["a.0", "a.1"]], GUARD, describe("tag", ["a"]), 2)
    flow.send(None)
    with pytest.raises(kind, match="reached all 2 slot groups") as info:
        flow.throw(error)
    assert "tag 'a'" in str(info.value) and "call it again" in str(info.value)


def test_nothing_to_invalidate_sends_nothing() -> None:
    with pytest.raises(StopIteration) as done:
        invalidate([], GUARD, "nothing", 4).send(None)
    assert done.value.value == 0
    assert describe("tag", ["a", "b", "c", "d"]) == "tags 'a', 'b', 'c', ..."


# -- configure() and the batch flow, driven by hand -----------------------------------------


def test_configure_moves_decorated_functions_between_layouts() -> None:
    cache = rcache.Cache("redis://127.0.0.1:1", prefix="app", ttl=60)

    @cache.cached(name="m.f", tags=["user:{x}"])
    def f(x: int) -> int:
        return x

    assert f.key_for(1) == "app:c:m.f:[1]"
    cache.configure(url="redis+cluster://127.0.0.1:1", slot_groups=16)
    ks = KeySpace("app", groups=16)
    key = f.key_for(1)
    assert key == ks.value("m.f", "[1]")
    group = ks.group_of_key(key)
    spec = f._spec  # type: ignore[attr-defined]
    assert spec.stamp_keys((1,), {}, key) == [
        ks.function_stamp("m.f", group),
        ks.tag_stamp("user:1", group),
    ]
    cache.configure(url="redis://127.0.0.1:1")
    assert f.key_for(1) == "app:c:m.f:[1]"
    assert spec.stamp_keys((1,), {}, "app:c:m.f:[1]") == [
        "app:s:f:m.f",
        "app:s:t:user:1",
    ]


def test_the_grouped_batch_flow_reads_claims_computes_and_stores_per_group() -> None:
    from rcache._cluster import EvalEach
    from rcache._flow import Compute

    cache = rcache.Cache("redis+cluster://127.0.0.1:1", prefix="app", slot_groups=4)
    computed: list[list[int]] = []

    @cache.cached_batch(ttl=60, name="m.users")
    def users(ids: list[int]) -> dict[int, int]:
        computed.append(ids)
        return {i: i * 10 for i in ids}

    spec = users._spec  # type: ignore[attr-defined]
    ids = [1, 2, 3, 4, 5, 6]
    keys = users.keys_for(ids)  # type: ignore[attr-defined]
    groups = list(dict.fromkeys(cache.keyspace.group_of_key(k) for k in keys))
    assert len(groups) > 1
    flow = spec.flow((ids,), {})
    first = flow.send(None)  # Redis's clock is not known yet: TIME from any node
    assert isinstance(first, Run)
    read = flow.send([1_700_000_000, 0])
    assert isinstance(read, Run)  # one pipelined MGET per group
    # every group: no stamp, no values (a cold cache)
    rows = [
        [None] * (1 + sum(1 for k in keys if cache.keyspace.group_of_key(k) == g))
        for g in groups
    ]
    claims = flow.send(rows)
    assert isinstance(claims, EvalEach) and len(claims.calls) == len(groups)
    for (claim_keys, _), g in zip(claims.calls, groups, strict=True):
        stamp = cache.keyspace.function_stamp("m.users", g)
        assert claim_keys[2:] == [stamp]  # each group's own copy
    compute = flow.send([[1, 0, 1_700_000_000_000_000, 0, b"s%d" % g] for g in groups])
    assert isinstance(compute, Compute)
    stores = flow.send({i: i * 10 for i in ids})
    assert isinstance(stores, EvalEach) and len(stores.calls) == len(groups)
    for (store_keys, store_args), g in zip(stores.calls, groups, strict=True):
        assert store_keys[0] == cache.keyspace.function_stamp("m.users", g)
        assert all(cache.keyspace.group_of_key(k) == g for k in store_keys[1:])
        assert store_args[0] == b"s%d" % g  # stored under its group's stamp
    with pytest.raises(StopIteration) as done:
        flow.send([len(c[0]) - 1 for c in stores.calls])
    assert done.value.value == {i: i * 10 for i in ids}
