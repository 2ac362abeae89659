"""Locks under hostile conditions (issue 14), each on real redis-servers: data loss,
eviction, a stopped server, lost replies and a partition (through FaultProxy)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import rcache
from rcache import _lock
from rcache._exceptions import (
    ConfigurationError,
    LockError,
    LockNotAcquiredError,
    LockNotOwnedError,
    LockReleaseUnconfirmedError,
)
from rcache._metrics import InMemoryMetrics
from rcache.testing import FaultProxy, RedisServer, wait_until

pytestmark = [pytest.mark.timeout(90), pytest.mark.topologies("single", "cluster")]

#: The FaultProxy tests put one proxy in front of the single server.
_PROXIED = pytest.mark.single_server(
    reason="a FaultProxy in front of the single server (on a cluster it would front "
    "one node only)"
)

#: How far past its budget a wait may return while Redis hangs (before the fix: 7 s
#: past a 2 s budget). Covers the per-call margin, one retry's backoff and a loaded box.
OVERRUN = 0.8
#: How late on_lost may fire after the lease's client-side deadline (before: 1.35 s
#: here, ~0.7 s in the issue; after: about 1 ms), with slack for a loaded 2-core box.
LATENESS = 0.25


async def _apoll(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    """wait_until for coroutines: poll without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def _release(lock: Any, mode: str) -> None:
    if mode == "sync":
        lock.release()
    else:
        await lock.arelease()


def _metrics(cache: rcache.Cache) -> InMemoryMetrics:
    assert isinstance(cache.metrics, InMemoryMetrics)
    return cache.metrics


@pytest.fixture
def paused_later() -> Iterator[list[RedisServer]]:
    """Servers a test pauses: always resumed at the end, whatever happened."""
    servers: list[RedisServer] = []
    yield servers
    for server in servers:
        server.resume()


# -- 1. fences never go backwards after data loss -------------------------------------


def _fences(cache: rcache.Cache) -> dict[str, int]:
    """One fence of each fenced kind (acquired and released)."""
    out = {}
    with cache.lock("f", ttl=5) as lock:
        out["lock"] = lock.fence
    with cache.lock("ff", ttl=5, fair=True) as fair:
        out["fair"] = fair.fence
    with cache.semaphore("fs", limit=2, ttl=5) as sem:
        out["semaphore"] = sem.fence
    with cache.rwlock("fw", ttl=5).write() as write:
        out["write"] = write.fence
    return out


def test_fences_rise_across_a_restart_without_persistence(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    cache = rcache.Cache(server.url, prefix="t")
    before = [_fences(cache) for _ in range(3)]
    for kind in before[0]:  # strictly increasing while the counter lives
        assert before[0][kind] < before[1][kind] < before[2][kind]
    client = server.client()
    client.shutdown(nosave=True)  # the dataset, fence counters included, is gone
    client.close()
    assert server.process is not None
    server.process.wait(10)
    server.start()  # same port, empty
    after = _fences(cache)
    for kind, fence in after.items():
        assert fence > before[-1][kind], (kind, before[-1][kind], fence)
    cache.close()


def test_fence_rises_after_its_counter_alone_is_lost(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    with cache.lock("evicted", ttl=5) as lock:
        first = lock.fence
    # What eviction of the counter (it has no TTL, so only allkeys-*) or a FLUSHDB does.
    redis_client.delete("test:l:{evicted}:fence")
    with cache.lock("evicted", ttl=5) as lock:
        assert lock.fence > first


# -- 2. an eviction policy that can take a held lock ----------------------------------


def _evicting_server() -> RedisServer:
    return RedisServer(
        extra_args=["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]
    ).start()


async def test_evicting_policy_is_reported_once_loudly_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="rcache.lock")
    with _evicting_server() as server:
        cache = rcache.Cache(server.url, prefix="t")
        with cache.lock("a", ttl=5):
            pass
        async with cache.lock("b", ttl=5):
            pass
        with cache.semaphore("c", limit=1, ttl=5):
            pass
        wait_until(
            lambda: _metrics(cache).count("lock_eviction_risk", "allkeys-lru") >= 1,
            5,
            message="the eviction-risk metric",
        )
        async with cache.lock("d", ttl=5):
            pass
        records = [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
        assert len(records) == 1, [r.getMessage() for r in records]
        message = records[0].getMessage()
        assert "allkeys-lru" in message and "noeviction" in message
        assert "lock_url=" in message  # says what to write
        assert _metrics(cache).count("lock_eviction_risk", "allkeys-lru") == 1
        await cache.aclose()
        cache.close()


def test_eviction_policy_read_through_info_when_config_is_forbidden(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="rcache.lock")
    with _evicting_server() as server:
        admin = server.client()
        admin.execute_command(
            "ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", "-config"
        )
        cache = rcache.Cache(f"redis://app:pw@127.0.0.1:{server.port}/0", prefix="t")
        with cache.lock("a", ttl=5):
            pass
        wait_until(
            lambda: _metrics(cache).count("lock_eviction_risk", "allkeys-lru") == 1,
            5,
            message="the eviction-risk metric (from INFO memory)",
        )
        assert "pw" not in caplog.text  # the URL is redacted in the warning
        admin.close()
        cache.close()


def test_noeviction_server_is_quiet_and_lock_url_keeps_locks_apart(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="rcache.lock")
    with _evicting_server() as cache_server:
        cache = rcache.Cache(cache_server.url, prefix="t", lock_url=redis_server.url)
        cache.set("k", 1, ttl=5)
        locks = redis_server.client()
        cached = cache_server.client()
        with cache.lock("apart", ttl=5):
            assert locks.exists("t:l:{apart}") == 1  # on the lock server ...
            assert cached.exists("t:l:{apart}") == 0  # ... not on the cache server
        with cache.semaphore("apart-s", limit=1, ttl=5):
            assert locks.exists("t:l:{apart-s}:sem") == 1
        assert cached.exists("t:k:k") == 1  # the cache itself stays where it was
        # The lock server's policy (noeviction) was checked: nothing to report.
        lock_spec = cache._lock_home()._spec
        wait_until(lambda: _lock._POLICIES.get(lock_spec), 5, message="policy check")
        assert _lock._POLICIES[lock_spec] == "noeviction"
        assert _metrics(cache).count("lock_eviction_risk", "allkeys-lru") == 0
        assert "maxmemory-policy" not in caplog.text
        locks.flushall()
        locks.close()
        cached.close()
        cache.close()


# -- 3. on_lost fires by the client-side deadline, whatever the renewal IO does -------


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_on_lost_fires_by_the_deadline_while_redis_is_stopped(
    redis_server_factory: Callable[[], RedisServer],
    paused_later: list[RedisServer],
    mode: str,
) -> None:
    server = redis_server_factory()
    paused_later.append(server)
    cache = rcache.Cache(server.url, prefix="t")
    fired: list[tuple[float, float]] = []  # (when, the lease's deadline then)
    lock = cache.lock(
        "deadline",
        ttl=1,
        on_lost=lambda lease: fired.append((time.monotonic(), lease.deadline)),
    )
    if mode == "sync":  # entered as `with` / `async with` do: renewed every ttl/3
        lock.__enter__()
    else:
        await lock.__aenter__()
    lease = lock.lease
    assert lease is not None
    renewed = _metrics(cache).count("lock_renewals", "deadline", "renewed")
    await _apoll(  # async leases renew on this loop: poll without blocking it
        lambda: _metrics(cache).count("lock_renewals", "deadline", "renewed") > renewed
    )
    server.pause()  # the next renewal hangs on its socket timeout (1 s, retried)
    await _apoll(lambda: fired or time.monotonic() > lease.deadline + 5)
    server.resume()
    assert fired, "on_lost never fired"
    when, deadline = fired[0]
    late = when - deadline
    assert 0 <= late < LATENESS, f"on_lost {late:+.3f}s after the deadline"
    assert not lease.held
    assert _metrics(cache).count("lock_renewals", "deadline", "lost") == 1
    # The renewal sent during the pause may run on SIGCONT and keep the key a while
    # longer: released (or "not owned" if it expired), never an error.
    lock.raise_on_not_owned = False
    await _release(lock, mode)
    await cache.aclose()
    cache.close()


# -- 4. waits keep their budget while Redis hangs ----------------------------------------


def _waiter(cache: rcache.Cache, kind: str) -> tuple[Any, Any]:
    """(holder, waiter) of one kind: the holder makes the waiter wait."""
    if kind == "lock":
        return cache.lock("w", ttl=30), cache.lock("w", ttl=30)
    if kind == "fair":
        return cache.lock("w", ttl=30, fair=True), cache.lock("w", ttl=30, fair=True)
    if kind == "semaphore":
        return cache.semaphore("w", 1, ttl=30), cache.semaphore("w", 1, ttl=30)
    rw = cache.rwlock("w", ttl=30)
    if kind == "read":
        return rw.write(), cache.rwlock("w", ttl=30).read()
    return rw.read(), cache.rwlock("w", ttl=30).write()


async def _acquire(lock: Any, mode: str, timeout: float) -> bool:
    """``acquire`` (in a worker thread: the loop keeps running) or ``aacquire``."""
    if mode == "sync":
        return bool(await asyncio.to_thread(lock.acquire, timeout))
    return bool(await lock.aacquire(timeout))


async def _timed_wait(lock: Any, mode: str, budget: float) -> tuple[str, float]:
    """(acquired/timeout/error, seconds taken) of one acquire with a budget."""
    start = time.monotonic()
    try:
        outcome = "acquired" if await _acquire(lock, mode, budget) else "timeout"
    except LockNotAcquiredError:
        outcome = "error"
    return outcome, time.monotonic() - start


KINDS = ["lock", "fair", "semaphore", "read", "write"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("when", ["blocked", "before"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_wait_keeps_its_budget_while_redis_is_stopped(
    redis_server_factory: Callable[[], RedisServer],
    paused_later: list[RedisServer],
    mode: str,
    kind: str,
    when: str,
) -> None:
    server = redis_server_factory()
    paused_later.append(server)
    cache = rcache.Cache(server.url, prefix="t")
    holder, waiter = _waiter(cache, kind)
    assert await _acquire(holder, mode, 2)
    budget = 1.5
    if when == "before":
        server.pause()
        outcome, elapsed = await _timed_wait(waiter, mode, budget)
    else:
        task = asyncio.ensure_future(_timed_wait(waiter, mode, budget))
        probe = server.client()
        await _apoll(  # blocked in BLPOP, on the long-timeout blocking client
            lambda: b"cmd=blpop" in probe.execute_command("CLIENT", "LIST"), 5
        )
        probe.close()
        server.pause()
        outcome, elapsed = await task
    server.resume()
    assert outcome in ("timeout", "error")
    assert elapsed < budget + OVERRUN, f"{kind}: {elapsed:.2f}s for a {budget}s budget"
    # The give-up clean-up (compensating release, abandoned intent) runs in the
    # background once Redis answers again: let it finish before the loop closes.
    await _apoll(lambda: not waiter._background and not holder._background)
    await cache.aclose()
    cache.close()


# -- 5. lost replies on release; lease bounds -----------------------------------------


@pytest.fixture
def proxy(redis_server: RedisServer, redis_url: str) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", redis_server.port) as p:
        yield p


@_PROXIED
async def test_release_whose_replies_are_lost_is_reported_unconfirmed(
    proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache(proxy.url, prefix="t")
    with cache.lock("warm-up", ttl=5):
        pass  # the scripts are loaded (else the lost reply would be a NOSCRIPT error)
    for mode in ("sync", "async"):
        lock = cache.lock(f"u-{mode}", ttl=30)
        assert lock.acquire(timeout=2) if mode == "sync" else await lock.aacquire(2)
        assert redis_client.exists(f"t:l:{{u-{mode}}}") == 1
        proxy.drop_replies()  # the release runs, every reply (and the retry's) is lost
        with pytest.raises(LockReleaseUnconfirmedError, match="most likely released"):
            await _release(lock, mode)
        proxy.restore()
        assert redis_client.exists(f"t:l:{{u-{mode}}}") == 0  # Redis did release it
        assert lock.lease is not None and not lock.lease.held  # not claimed as held
        # Released (unconfirmed), so a second release confirms without raising.
        await _release(lock, mode)
        assert lock.lease is None
        m = _metrics(cache)
        assert m.count("lock_releases", f"u-{mode}", "unconfirmed") == 1
        assert m.count("lock_releases", f"u-{mode}", "released") == 1
    await cache.aclose()
    cache.close()


@_PROXIED
def test_release_that_cannot_be_sent_keeps_the_lease(
    proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache(proxy.url, prefix="t")
    lock = cache.lock("unsent", ttl=30)
    assert lock.acquire(timeout=2)
    proxy.cut()  # reset and refused: the release never reaches Redis
    with pytest.raises(LockError) as info:
        lock.release()
    assert not isinstance(info.value, LockReleaseUnconfirmedError)
    assert redis_client.exists("t:l:{unsent}") == 1
    assert lock.held  # still ours: the release can be retried
    proxy.restore()
    lock.release()
    assert redis_client.exists("t:l:{unsent}") == 0
    cache.close()


@_PROXIED
def test_partitioned_holder_learns_first_and_cannot_hurt_the_next(
    proxy: FaultProxy, redis_url: str, redis_client: redis.Redis
) -> None:
    """L7: the holder is cut off (blackhole) past its lease, then healed."""
    cut_off = rcache.Cache(proxy.url, prefix="t")
    other = rcache.Cache(redis_url, prefix="t")
    lost_at: list[float] = []
    lock = cut_off.lock(
        "part", ttl=1, on_lost=lambda _l: lost_at.append(time.monotonic())
    )
    lock.__enter__()  # renewed, as in `with lock:`
    old_fence = lock.fence
    proxy.blackhole()
    second = other.lock("part", ttl=10, timeout=5)
    assert second.acquire()  # once the partitioned lease expired on the server
    granted_at = time.monotonic()
    assert lost_at and lost_at[0] <= granted_at  # the old holder knew first
    assert second.fence > old_fence
    proxy.restore()
    with pytest.raises(LockNotOwnedError):  # leaving the block: "not owned" ...
        lock.__exit__(None, None, None)
    # ... and the new holder's key is intact
    assert redis_client.get("t:l:{part}") == second.lease.token.encode()  # type: ignore[union-attr]
    second.release()
    cut_off.close()
    other.close()


@pytest.mark.parametrize("ttl", [0.005, "1ms", 1e17, "400d"])
def test_lease_out_of_range_is_refused_at_construction(
    cache: rcache.Cache, ttl: Any
) -> None:
    for make in (
        lambda: cache.lock("x", ttl=ttl),
        lambda: cache.semaphore("x", 2, ttl=ttl),
        lambda: cache.rwlock("x", ttl=ttl),
        lambda: cache.locked("x", ttl=ttl),
    ):
        with pytest.raises(
            ConfigurationError, match=r"between 10ms and 365 days.*write"
        ):
            make()
    with cache.lock("ok", ttl=0.01) as lock, pytest.raises(ConfigurationError):
        lock.extend(1e17)


# -- re-entering a held lock (issue 12) -------------------------------------------------


async def test_reentry_says_this_thread_or_task_holds_it(cache: rcache.Cache) -> None:
    with cache.lock("re", ttl=5):
        with (
            pytest.raises(
                LockNotAcquiredError, match="this thread/task already holds it"
            ),
            cache.lock("re", ttl=5, timeout=0),
        ):
            pass
        with pytest.raises(LockError, match="this thread/task already holds it"):
            cache.lock("re", ttl=5).acquire(timeout=None)  # would wait for itself
        assert cache.lock("re").acquire(timeout=0) is False  # a try is still a try
    async with cache.rwlock("re2", ttl=5).write():
        with pytest.raises(LockNotAcquiredError, match="already holds it"):
            async with cache.rwlock("re2", ttl=5, timeout=0).write():
                pass

    @cache.locked("job:{n}", ttl=5, timeout=0)
    def job(n: int, again: bool) -> int:
        return job(n, False) if again else n  # re-enters job:{n} from inside it

    with pytest.raises(LockNotAcquiredError, match="already holds it"):
        job(0, True)

    # Another thread holding it is plain contention, not re-entry.
    held = threading.Event()
    done = threading.Event()

    def other() -> None:
        with cache.lock("re3", ttl=5):
            held.set()
            done.wait(5)

    t = threading.Thread(target=other)
    t.start()
    held.wait(5)
    with pytest.raises(LockNotAcquiredError) as info, cache.lock("re3", timeout=0.05):
        pass
    assert "already holds" not in str(info.value)
    done.set()
    t.join(5)
