"""Every Redis key rcache and rcache-celery write, pinned byte for byte.

The layout is a compatibility promise (data written by one version is read by the next,
without a migration): a change here needs a migration note in the CHANGELOG. The first
test pins what :class:`KeySpace` names; the second that rcache's operations write those
names and nothing else (on the embedded ``memory://`` backend: no server needed).
"""

from __future__ import annotations

import pytest

import rcache
from rcache._keys import LOCK_KEY
from rcache.spi import KeySpace, LockKeys


def test_every_key_name_is_pinned() -> None:
    ks = KeySpace("app")
    assert ks.prefix == "app"
    # cache entries
    assert ks.values("mod.f") == "app:c:mod.f:"
    assert ks.explicit("user:42") == ks.explicit_prefix + "user:42" == "app:k:user:42"
    assert ks.function_stamp("mod.f") == "app:s:f:mod.f"
    assert ks.tag_stamp("user:42") == ks.tag_prefix + "user:42" == "app:s:t:user:42"
    assert ks.lease("app:c:mod.f:[1]") == "app:c:mod.f:[1]:lease"
    assert ks.ready("app:c:mod.f:[1]") == "app:c:mod.f:[1]:ready"
    # locks: every key of one name carries the hash tag {name}
    lk = ks.lock("n")
    assert isinstance(lk, LockKeys)
    assert {
        "base": lk.base,
        "fence": lk.fence,
        "signal": lk.signal,
        "waiting": lk.waiting,
        "grace": lk.grace,
        "queue": lk.queue,
        "queue_expiry": lk.queue_expiry,
        "tickets": lk.tickets,
        "fair_signals": lk.fair_signals,
        "permits": lk.permits,
        "permits_fence": lk.permits_fence,
        "permits_signal": lk.permits_signal,
        "readers": lk.readers,
        "writer": lk.writer,
        "intents": lk.intents,
        "read_signal": lk.read_signal,
        "write_signal": lk.write_signal,
        "rw_fence": lk.rw_fence,
    } == {
        "base": "app:l:{n}",
        "fence": "app:l:{n}:fence",
        "signal": "app:l:{n}:signal",
        "waiting": "app:l:{n}:w",
        "grace": "app:l:{n}:h",
        "queue": "app:l:{n}:fq",
        "queue_expiry": "app:l:{n}:fqt",
        "tickets": "app:l:{n}:fqn",
        "fair_signals": "app:l:{n}:fs:",
        "permits": "app:l:{n}:sem",
        "permits_fence": "app:l:{n}:sem:fence",
        "permits_signal": "app:l:{n}:sem:signal",
        "readers": "app:l:{n}:rw:r",
        "writer": "app:l:{n}:rw:w",
        "intents": "app:l:{n}:rw:wq",
        "read_signal": "app:l:{n}:rw:rs",
        "write_signal": "app:l:{n}:rw:ws",
        "rw_fence": "app:l:{n}:rw:fence",
    }
    # rcache-celery
    assert ks.unique_guard("t.send", "ab12") == "app:celery:u:{t.send:ab12}"
    assert ks.lock_guard("report:1") == "app:celery:l:{report:1}"
    assert (
        ks.warm_gate("rcache_celery.warm:m.f")
        == "app:celery:w:{rcache_celery.warm:m.f}"
    )
    assert ks.run_marker("app:celery:l:{x}", "id-1") == "app:celery:l:{x}:r:id-1"
    # tools
    assert ks.probe("0a1b") == "app:check:0a1b"
    assert ks.pattern() == "app:*"
    assert KeySpace("a*b").pattern("l:") == "a\\*b:l:*"


def test_every_lock_suffix_is_recognised_by_the_admin_parser() -> None:
    lk = KeySpace("app").lock("n")
    for suffix in LockKeys.SUFFIXES:
        key = lk.base + suffix + ("tok" if suffix == ":fs:" else "")
        m = LOCK_KEY.match(key[len("app:") :])
        assert m is not None and m.group("name") == "n", suffix


def test_operations_write_exactly_the_keyspace_names() -> None:
    cache = rcache.Cache("memory://", prefix="app", ttl=60)
    ks = cache.keyspace
    assert ks == KeySpace("app")

    @cache.cached(tags=["user:{uid}"], name="m.f")
    def f(uid: int) -> int:
        return uid

    @cache.cached_batch(ids="ids", name="m.g")
    def g(ids: list[int]) -> dict[int, int]:
        return {i: i for i in ids}

    f(1)
    g([1])
    f.invalidate_all()
    cache.invalidate_tags("user:1")
    f(1)
    cache.set("x", 1)
    with cache.lock("n"):
        pass
    with cache.lock("fair", fair=True):
        pass
    with cache.semaphore("s", limit=2):
        pass
    rw = cache.rwlock("rw")
    with rw.write():
        pass
    with rw.read():
        pass

    value = f.key_for(1)
    assert value == ks.values("m.f") + "[1]" == "app:c:m.f:[1]"
    durable = {
        value,
        ks.values("m.g") + "[1]",
        ks.explicit("x"),
        ks.function_stamp("m.f"),
        ks.function_stamp("m.g"),
        ks.tag_stamp("user:1"),
        ks.lock("n").fence,
        ks.lock("fair").fence,
        ks.lock("s").permits_fence,
        ks.lock("rw").rw_fence,
    }
    # wake-up lists live for a moment after a release or a store
    transient = {
        ks.ready(value),
        ks.lock("n").signal,
        ks.lock("s").permits_signal,
        ks.lock("rw").read_signal,
        ks.lock("rw").write_signal,
    }
    client = cache._sync.client
    written = {k.decode() for k in client.keys("*")}
    assert written - transient == durable
    assert cache.tag_key("user:1") == ks.tag_stamp("user:1")
    cache.close()


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("report:{dya}", "did you mean {day}: lock_key='report:{day}'?"),
        ("report:{0}", "must name parameters"),
        ("report:{day}{n}", "put a separator"),
        ("report:{day", "bad lock_key"),
    ],
)
def test_one_template_rule(template: str, message: str) -> None:
    from rcache.spi import check_template

    with pytest.raises(rcache.ConfigurationError) as info:
        check_template(template, ["day", "n"], owner="reg.report", what="lock_key")
    assert message in str(info.value)
    check_template("report:{day}:{n.x}", ["day", "n"], owner="reg.report")
