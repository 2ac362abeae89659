"""The admin API against real redis-servers: clear, stats, locks, force_release."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest
import redis

import rcache
from rcache._admin import escape_glob
from rcache.testing import RedisServer, wait_until

pytestmark = pytest.mark.timeout(90)


def _fill(r: redis.Redis, prefix: str) -> None:
    """Entries of every kind under ``prefix``."""
    pipe = r.pipeline(transaction=False)
    for i in range(30):
        pipe.set(f"{prefix}:c:shop.users.get_user:[{i}]", b"x" * 10, px=60_000)
    for i in range(5):
        pipe.set(f"{prefix}:c:shop.items.top:h:{i:032x}", b"y", px=60_000)
    pipe.set(f"{prefix}:c:shop.items.top:h:{0:032x}:lease", b"tok", px=60_000)
    for i in range(7):
        pipe.set(f"{prefix}:k:page:{i}", b"z", px=60_000)
    pipe.set(f"{prefix}:s:t:user:1", b"s1")
    pipe.set(f"{prefix}:s:t:catalog", b"s2")
    pipe.set(f"{prefix}:s:f:shop.users.get_user", b"s3")
    pipe.execute()


# -- clear --------------------------------------------------------------------------------


def test_clear_dry_run_counts_then_deletes_only_the_prefix(
    redis_url: str, redis_client: redis.Redis
) -> None:
    _fill(redis_client, "app")
    # neighbours that a careless pattern would hit
    for key in ("app2:c:x", "appx", "other:app:1", "app", "xapp:k:1"):
        redis_client.set(key, b"keep")
    cache = rcache.Cache(redis_url, prefix="app")
    with cache.lock("nightly", ttl=30):
        dry = cache.clear(dry_run=True)
        assert dry.dry_run and dry.deleted == 0
        # 30 + 5 + 1 lease + 7 + 3 stamps = 46 data keys; lock key + fence kept
        assert dry.matched == 48 and dry.kept == 2
        assert redis_client.dbsize() == 48 + 5

        done = cache.clear()
        assert (done.matched, done.deleted, done.kept) == (48, 46, 2)
        assert not done.interrupted and done.batches >= 1
        left = sorted(k.decode() for k in redis_client.keys("*"))
        assert left == sorted(
            [
                "app2:c:x",
                "appx",
                "other:app:1",
                "app",
                "xapp:k:1",
                "app:l:{nightly}",
                "app:l:{nightly}:fence",
            ]
        )
    # include_locks removes locks and fences too
    redis_client.set("app:celery:u:{t:1}", b"task-id")
    everything = cache.clear(include_locks=True)
    assert everything.deleted == 2  # the fence counter and the guard
    assert sorted(redis_client.keys("*")) == sorted(
        k.encode() for k in ("app2:c:x", "appx", "other:app:1", "app", "xapp:k:1")
    )
    cache.close()


@pytest.mark.parametrize("prefix", ["a*b", "a?b", "a[bc]d", "a\\b", "pre]fix"])
def test_clear_escapes_glob_characters_in_the_prefix(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    # keys the unescaped pattern would match, and a key under the real prefix
    victims = ["aXb:1", "ab:2", "axxb:3", "ac:4", "abd:5", "a\\bc:6", "prefix:7", "ab"]
    for key in victims:
        redis_client.set(key, b"keep")
    redis_client.set(f"{prefix}:k:mine", b"go")
    cache = rcache.Cache(redis_url, prefix=prefix)
    result = cache.clear()
    assert (result.matched, result.deleted) == (1, 1)
    assert redis_client.get(f"{prefix}:k:mine") is None
    for key in victims:
        if key != f"{prefix}:k:mine":
            assert redis_client.get(key) == b"keep", key
    cache.close()


def test_escape_glob() -> None:
    assert escape_glob("a*b?c[d]e\\f") == "a\\*b\\?c\\[d\\]e\\\\f"
    assert escape_glob("plain:prefix") == "plain:prefix"


async def test_aclear_matches_clear(redis_url: str, redis_client: redis.Redis) -> None:
    _fill(redis_client, "asy")
    redis_client.set("asy2:k:1", b"keep")
    cache = rcache.Cache(redis_url, prefix="asy")
    dry = await cache.aclear(dry_run=True)
    assert (dry.matched, dry.deleted) == (46, 0)
    done = await cache.aclear(batch_size=7)
    assert (done.matched, done.deleted) == (46, 46)
    assert done.batches >= 46 // 7
    assert redis_client.keys("*") == [b"asy2:k:1"]
    await cache.aclose()


def test_clear_stops_when_on_batch_says_so(
    redis_url: str, redis_client: redis.Redis
) -> None:
    pipe = redis_client.pipeline(transaction=False)
    for i in range(2000):
        pipe.set(f"stop:k:{i}", b"1")
    pipe.execute()
    cache = rcache.Cache(redis_url, prefix="stop")
    seen: list[rcache.ClearResult] = []

    def on_batch(progress: rcache.ClearResult) -> bool:
        seen.append(progress)
        return len(seen) < 2  # stop after the second page

    result = cache.clear(batch_size=100, on_batch=on_batch)
    assert result.interrupted
    assert 0 < result.deleted < 2000
    # what it reports deleted is exactly what is gone
    assert redis_client.dbsize() == 2000 - result.deleted
    rest = cache.clear()
    assert rest.deleted == 2000 - result.deleted and not rest.interrupted
    cache.close()


def test_clear_rejects_bad_batch_size(cache: rcache.Cache) -> None:
    with pytest.raises(rcache.ConfigurationError, match="batch_size"):
        cache.clear(batch_size=0)


def test_clear_on_the_memory_backend() -> None:
    cache = rcache.Cache("memory://", prefix="mem")
    cache.set("a", 1, ttl=60)
    cache.set("b", 2, ttl=60)
    assert cache.clear(dry_run=True).matched == 2
    assert cache.clear().deleted == 2
    assert cache.get("a") is None


# -- stats ----------------------------------------------------------------------------------


def test_stats_counts_entries_per_function_tags_locks_and_memory(
    redis_url: str, redis_client: redis.Redis
) -> None:
    _fill(redis_client, "st")
    redis_client.set("st:celery:u:{t:1}", b"id")
    redis_client.set("stx:k:1", b"not ours")
    cache = rcache.Cache(redis_url, prefix="st")
    with cache.lock("a"), cache.semaphore("pool", limit=3):
        stats = cache.stats()
    assert stats.keys == 46 + 1 + 4  # data, guard, lock + fence, permits + fence
    assert stats.entries == 30 + 5 + 7
    assert stats.explicit_entries == 7
    assert [(f.name, f.entries) for f in stats.functions] == [
        ("shop.users.get_user", 30),
        ("shop.items.top", 5),
    ]
    assert stats.tags == 2 and stats.tag_names == ("catalog", "user:1")
    assert stats.computations == 1
    assert stats.locks_held == 2
    assert stats.celery_keys == 1
    assert stats.memory_sampled == min(51, 200)
    assert stats.memory_bytes is not None and stats.memory_bytes > 51 * 10
    cache.close()


async def test_astats_matches_stats(redis_url: str, redis_client: redis.Redis) -> None:
    _fill(redis_client, "ast")
    cache = rcache.Cache(redis_url, prefix="ast")
    a = await cache.astats(sample=10)
    s = cache.stats(sample=10)
    assert (a.keys, a.entries, a.functions, a.tags) == (
        s.keys,
        s.entries,
        s.functions,
        s.tags,
    )
    assert a.memory_sampled == 10
    await cache.aclose()
    cache.close()


# -- locks ----------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, rcache
    cache = rcache.Cache(sys.argv[1], prefix="lk")
    plain = cache.lock("orders", ttl=60)
    plain.acquire()
    w = cache.rwlock("doc", ttl=60).write()
    w.acquire()
    s = cache.semaphore("api", limit=3, ttl=60)
    s.acquire()
    fair = cache.lock("queue", ttl=60, fair=True)
    fair.acquire()
    print(plain.fence, w.fence, s.fence, fair.fence, flush=True)
    sys.stdin.read()  # hold until the test closes stdin
    """
)


@pytest.fixture
def holder(redis_url: str) -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    fences = [int(x) for x in proc.stdout.readline().split()]
    assert len(fences) == 4, "holder failed to start"
    yield proc, fences
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)
    proc.stdout.close()


def test_locks_lists_every_kind_with_holder_fence_lease_and_waiters(
    redis_url: str, holder: tuple[subprocess.Popen[str], list[int]]
) -> None:
    proc, (f_plain, f_write, f_sem, f_fair) = holder
    cache = rcache.Cache(redis_url, prefix="lk")
    # readers of another RW lock and a second permit held here
    reader = cache.rwlock("wiki", ttl=20).read()
    reader.acquire()
    permit = cache.semaphore("api", limit=3, ttl=20)
    permit.acquire()
    # waiters: a thread waits on the plain lock, another queues on the fair lock
    waiters_done = threading.Event()

    def wait_on(lock: rcache.Lock) -> None:
        try:
            lock.acquire(timeout=30)
        except rcache.LockNotAcquiredError:
            pass
        waiters_done.set()

    waiter_cache = rcache.Cache(redis_url, prefix="lk")
    t1 = threading.Thread(target=wait_on, args=(waiter_cache.lock("orders"),))
    t2 = threading.Thread(target=wait_on, args=(waiter_cache.lock("queue", fair=True),))
    t1.start()
    t2.start()

    def snapshot() -> dict[tuple[str, str], rcache.LockInfo] | None:
        rows = {(i.name, i.kind): i for i in cache.locks()}
        queue = rows.get(("queue", "fair lock"))
        ready = len(rows) == 5 and queue is not None and queue.waiters == 1
        return rows if ready and rows["orders", "lock"].waiting else None

    by_name = wait_until(snapshot, timeout=10)
    try:
        orders = by_name["orders", "lock"]
        assert orders.holders[0].pid == proc.pid
        assert orders.holders[0].mode == "exclusive"
        assert 50 < orders.holders[0].remaining <= 60
        assert orders.fence == f_plain and orders.waiting and orders.waiters is None

        queue = by_name["queue", "fair lock"]
        assert queue.holders[0].pid == proc.pid and queue.fence == f_fair
        assert queue.waiters == 1 and queue.waiting

        doc = by_name["doc", "rwlock"]
        assert [h.mode for h in doc.holders] == ["write"]
        assert doc.holders[0].pid == proc.pid and doc.fence == f_write

        wiki = by_name["wiki", "rwlock"]
        assert [h.mode for h in wiki.holders] == ["read"]
        assert wiki.holders[0].pid == os.getpid()
        assert 10 < wiki.holders[0].remaining <= 20

        api = by_name["api", "semaphore"]
        assert sorted(h.pid for h in api.holders if h.pid) == sorted(
            [proc.pid, os.getpid()]
        )
        assert {h.mode for h in api.holders} == {"permit"}
        assert api.fence == f_sem + 1
    finally:
        reader.release()
        permit.release()
        waiter_cache.lock("orders").force_release()  # frees the waiters quickly
        waiter_cache.lock("queue").force_release()
        t1.join(30)
        t2.join(30)
        cache.close()
        waiter_cache.close()
    assert waiters_done.is_set()


async def test_alocks_matches_locks(redis_url: str) -> None:
    cache = rcache.Cache(redis_url, prefix="al")
    async with cache.lock("x"), cache.rwlock("y").read():
        a = await cache.alocks()
        s = cache.locks()
    assert [(i.name, i.kind) for i in a] == [("x", "lock"), ("y", "rwlock")]
    assert [(i.name, i.kind, i.fence) for i in a] == [
        (i.name, i.kind, i.fence) for i in s
    ]
    assert await cache.alocks() == []
    await cache.aclose()
    cache.close()


def test_locks_ignores_free_names_and_other_prefixes(
    redis_url: str, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache(redis_url, prefix="fr")
    with cache.lock("used"):
        pass
    other = rcache.Cache(redis_url, prefix="fr2")
    with other.lock("theirs"):
        assert cache.locks() == []  # only a fence counter is left under fr
    assert redis_client.exists("fr:l:{used}:fence")
    cache.close()
    other.close()


# -- force_release ----------------------------------------------------------------------------


def test_force_release_fences_off_the_old_holder(
    redis_url: str, redis_client: redis.Redis
) -> None:
    app = rcache.Cache(redis_url, prefix="fx")
    operator = rcache.Cache(redis_url, prefix="fx")
    old = app.lock("invoice:7", ttl=30)
    assert old.acquire()
    old_fence = old.fence
    token = old.lease.token if old.lease else ""

    result = operator.lock("invoice:7").force_release()
    assert result.released == (token,)
    assert result.fence == old_fence + 1
    assert redis_client.get("fx:l:{invoice:7}:fence") == str(old_fence + 1).encode()
    assert not redis_client.exists("fx:l:{invoice:7}")

    # a resource that checks the fence against the counter rejects the old holder
    current = int(redis_client.get("fx:l:{invoice:7}:fence") or 0)
    assert old_fence < current

    with pytest.raises(rcache.LockNotOwnedError):
        old.extend()
    new = app.lock("invoice:7", ttl=30)
    assert new.acquire(timeout=0)
    new_fence = new.fence
    assert new_fence > result.fence > old_fence
    # the old holder's release deletes nothing of the new holder's
    with pytest.raises(rcache.LockNotOwnedError):
        old.release()
    new_token = new.lease.token if new.lease else ""
    assert redis_client.get("fx:l:{invoice:7}") == new_token.encode()
    new.release()
    # nothing held: a second force_release removes nothing and still bumps the fence
    again = operator.lock("invoice:7").force_release()
    assert again.released == () and again.fence == new_fence + 1
    app.close()
    operator.close()


def test_force_release_then_old_holder_release_raises_not_owned(
    redis_url: str,
) -> None:
    app = rcache.Cache(redis_url, prefix="fy")
    operator = rcache.Cache(redis_url, prefix="fy")
    old = app.lock("job", ttl=30)
    old.acquire()
    operator.lock("job").force_release()
    with pytest.raises(rcache.LockNotOwnedError, match="no longer held"):
        old.release()
    app.close()
    operator.close()


def test_force_release_wakes_a_waiter_at_once(redis_url: str) -> None:
    app = rcache.Cache(redis_url, prefix="fw")
    stuck = app.lock("batch", ttl=60)  # a holder that would keep it for a minute
    stuck.acquire()
    got: list[int] = []

    def wait() -> None:
        other = rcache.Cache(redis_url, prefix="fw")
        lock = other.lock("batch", ttl=5)
        if lock.acquire(timeout=30):
            got.append(lock.fence)
            lock.release()
        other.close()

    t = threading.Thread(target=wait)
    t.start()
    r = redis.Redis.from_url(redis_url)
    wait_until(lambda: r.exists("fw:l:{batch}:w"), timeout=10)
    result = app.lock("batch").force_release()
    t.join(timeout=10)  # well under the 60 s lease and the 20 s re-check
    assert not t.is_alive()
    assert got and got[0] == result.fence + 1
    r.close()
    app.close()


def test_force_release_of_semaphore_and_rw_sides(
    redis_url: str, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache(redis_url, prefix="fz")
    sem = cache.semaphore("pool", limit=2, ttl=30)
    sem.acquire()
    sem_fence = sem.fence
    assert sem_fence is not None
    result = cache.semaphore("pool", limit=2).force_release()
    assert len(result.released) == 1 and result.fence == sem_fence + 1
    with pytest.raises(rcache.LockNotOwnedError):
        sem.extend()

    rw = cache.rwlock("doc", ttl=30)
    rw.read().acquire()
    read_result = cache.rwlock("doc").read().force_release()
    assert len(read_result.released) == 1 and read_result.fence is None
    with pytest.raises(rcache.LockNotOwnedError):
        rw.read().extend()
    rw.write().acquire()
    w_fence = rw.write().fence
    write_result = cache.rwlock("doc").write().force_release()
    assert write_result.fence == w_fence + 1
    with pytest.raises(rcache.LockNotOwnedError):
        rw.write().release()
    assert cache.locks() == []
    cache.close()


async def test_aforce_release(redis_url: str) -> None:
    cache = rcache.Cache(redis_url, prefix="fa")
    try:
        lock = cache.lock("a", ttl=30)
        await lock.aacquire()
        fence = lock.fence
        result = await cache.lock("a").aforce_release()
        assert result.fence == fence + 1 and len(result.released) == 1
        with pytest.raises(rcache.LockNotOwnedError):
            await lock.aextend()
        with pytest.raises(rcache.LockNotOwnedError):
            await lock.arelease()
    finally:
        await cache.aclose()
        cache.close()


def test_force_release_leaves_a_lost_fence_counter_to_the_acquire_script(
    redis_server_factory: object,
) -> None:
    # a counter lost with the dataset is not recreated small by force_release
    server: RedisServer = redis_server_factory()  # type: ignore[operator]
    cache = rcache.Cache(server.url, prefix="lost")
    r = server.client()
    r.set("lost:l:{x}", b"1:abc", px=30_000)  # a holder whose counter is gone
    result = cache.lock("x").force_release()
    assert result.released == ("1:abc",) and result.fence is None
    assert not r.exists("lost:l:{x}:fence")
    r.close()
    cache.close()
