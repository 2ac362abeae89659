"""Locks on a real local Redis Cluster: what only a cluster has (hash slots, several
primaries, a failover). Every lock behaviour also runs here through
test_lock.py and test_lock_faults.py (``topologies("single", "cluster")``).

The slot and hand-off tests use the session cluster; the fault tests start a cluster
of their own, because they kill a primary or unassign a slot.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

import rcache
from rcache._exceptions import (
    BackendUnavailableError,
    ConfigurationError,
    LockNotAcquiredError,
)
from rcache.testing import RedisCluster, wait_until

sys.path.insert(0, str(Path(__file__).parents[1] / "concurrency"))
import lockworkers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CTX = multiprocessing.get_context("spawn")


@pytest.fixture
def cache(cluster_url: str) -> Iterator[rcache.Cache]:
    c = rcache.Cache(cluster_url, prefix="t")
    yield c
    c.close()


def _keys_by_node(cluster: RedisCluster, pattern: str) -> dict[int, list[bytes]]:
    """KEYS ``pattern`` on every primary: {port: keys} (empty nodes left out)."""
    found = {}
    for node in cluster.primaries():
        client = node.client()
        try:
            keys = client.keys(pattern)
        finally:
            client.close()
        if keys:
            found[node.port] = keys
    return found


def _escape(text: str) -> str:
    """``text`` as a literal in a KEYS pattern."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


# -- hash slots ------------------------------------------------------------------------


NAMES = ["order:{7}:pay", "{a}b", "x}y{z", "a{", "{}", "[tag]*?"]


@pytest.mark.parametrize("name", NAMES)
def test_every_key_of_a_lock_is_in_one_slot_with_braces_in_the_name(
    redis_cluster: RedisCluster, cache: rcache.Cache, name: str
) -> None:
    """Each kind, held, with a waiter (another thread) that gives up: its lease,
    fence, waiter marker, queue, permits, intents and wake-up keys are all (KEYS on
    every primary) on one node, in the slot of the lock's base key."""
    base = f"t:l:{{{name}}}"
    kinds: list[tuple[Any, Any]] = [
        (cache.lock(name, ttl=10), cache.lock(name)),
        (cache.lock(name, ttl=10, fair=True), cache.lock(name, fair=True)),
        (cache.semaphore(name, limit=1, ttl=10), cache.semaphore(name, limit=1)),
        (cache.rwlock(name, ttl=10).read(), cache.rwlock(name).write()),
    ]
    seen: set[bytes] = set()
    for holder, waiter in kinds:
        with holder:
            tried: list[bool] = []

            def wait(w: Any = waiter, out: list[bool] = tried) -> None:
                out.append(w.acquire(0.05))

            t = threading.Thread(target=wait)
            t.start()
            t.join(10)
            assert tried == [False]  # it waited, leaving its marks
            found = _keys_by_node(redis_cluster, _escape(base) + "*")
            assert len(found) == 1, f"{name!r}: keys on several nodes: {found}"
            seen.update(*found.values())
    # lease, fences, waiter marker, queue, permits, readers, intents
    assert len(seen) >= 8, seen
    assert {key_slot(k) for k in seen} == {key_slot(base.encode())}


def test_a_name_whose_keys_cannot_share_a_slot_is_refused(cache: rcache.Cache) -> None:
    # "t:l:{}x}": an empty hash tag, each key hashed whole (was CROSSSLOT at acquire)
    for make in (
        lambda: cache.lock("}x"),
        lambda: cache.semaphore("}x", limit=2),
        lambda: cache.rwlock("}x"),
        lambda: cache.locked("}x"),
    ):
        with pytest.raises(ConfigurationError, match="hash slot"):
            make()


# -- across processes ------------------------------------------------------------------


@pytest.mark.parametrize("fair", [False, True], ids=["lock", "fair"])
def test_a_hand_off_across_processes_counts_each_section_once(
    redis_cluster: RedisCluster, cluster_url: str, fair: bool
) -> None:
    """Four spawned processes (two sync, two asyncio) take turns 25 times each on one
    lock and, inside, do an unfenced read-modify-write of a counter. A lost update
    (the counter short of 100), overlapping sections or fences out of grant order
    would show a lock that let two holders in. Shown able to fail: with the
    ``with cache.lock(...)`` lines of lockworkers.cluster_handoff_worker replaced by
    ``contextlib.nullcontext(...)``, the counter ended at 41 and 50 of 100."""
    n_procs, n_each = 4, 25
    name = f"handoff:{fair}"
    ready, go = CTX.Queue(), CTX.Event()
    procs = [
        CTX.Process(
            target=lockworkers.cluster_handoff_worker,
            args=(cluster_url, name, n_each, mode, fair, ready, go),
            daemon=True,
        )
        for mode in ("sync", "async", "sync", "async")
    ]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=60)
        go.set()
        for p in procs:
            p.join(90)
            assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(10)
    client = redis_cluster.client()
    try:
        assert int(client.get(f"{{{name}}}:counter") or 0) == n_procs * n_each
        records = [json.loads(r) for r in client.lrange(f"{{{name}}}:log", 0, -1)]
    finally:
        client.close()
    assert len(records) == n_procs * n_each
    fences = [fence for fence, _, _ in records]  # in grant order (RPUSH under the lock)
    assert fences == sorted(fences) and len(set(fences)) == len(fences)
    by_entry = sorted(records, key=lambda r: r[1])
    for (_, _, left), (_, entered, _) in itertools.pairwise(by_entry):
        assert left <= entered, "two holders at once"


# -- faults: each test owns its cluster --------------------------------------------------


Outcome = tuple[str, str, str, float]  # kind, mode, what acquire did, seconds


def _make(cache: rcache.Cache, kind: str, ttl: float) -> Any:
    name = f"{{v}}:{kind}"  # one hash tag "{v": every lock of this test on one primary
    if kind == "lock":
        return cache.lock(name, ttl=ttl)
    if kind == "fair":
        return cache.lock(name, ttl=ttl, fair=True)
    if kind == "sem":
        return cache.semaphore(name, limit=1, ttl=ttl)
    return cache.rwlock(name, ttl=ttl).write()


KINDS = ("lock", "fair", "sem", "write")


async def _settle(locks: list[Any]) -> None:
    """Wait for the locks' background clean-ups (a given-up waiter withdraws, the
    first acquire reads the eviction policy): one still running at ``aclose()``
    would open a new client that nobody closes."""
    while any(lock._background for lock in locks):
        await asyncio.gather(
            *(t for lock in locks for t in lock._background), return_exceptions=True
        )


def _outcome(run: Callable[[], bool]) -> tuple[str, float]:
    start = time.monotonic()
    try:
        what = "acquired" if run() else "timed out"
    except (LockNotAcquiredError, BackendUnavailableError) as exc:
        what = type(exc).__name__
    except BaseException as exc:  # anything else fails the test below
        what = f"unexpected {exc!r}"
    return what, time.monotonic() - start


def test_waiters_keep_their_budget_when_the_primary_is_sigkilled() -> None:
    """Holders on one primary; a sync and an asyncio waiter per kind (lock, fair lock,
    semaphore, RW write) blocked there with an 8 s budget. SIGKILL the primary: each
    waiter returns within its budget plus the I/O margin, acquired or with
    LockNotAcquiredError/BackendUnavailableError, never hanging and never anything
    else; once the replica took over, new acquires succeed in both modes."""
    budget = 8.0
    with RedisCluster() as cluster:
        holder = rcache.Cache(cluster.url, prefix="t")
        waiters = rcache.Cache(cluster.url, prefix="t")
        held = [_make(holder, kind, 30) for kind in KINDS]
        for lock in held:
            assert lock.acquire(timeout=5)
        primary = cluster.node_for("t:l:{{v}:lock}")
        outcomes: list[Outcome] = []

        def sync_waiter(kind: str) -> None:
            lock = _make(waiters, kind, 10)
            outcomes.append((kind, "sync", *_outcome(lambda: lock.acquire(budget))))

        async def async_waiters() -> None:
            made: list[Any] = []

            async def one(kind: str) -> None:
                lock = _make(waiters, kind, 10)
                made.append(lock)
                start = time.monotonic()
                try:
                    what = "acquired" if await lock.aacquire(budget) else "timed out"
                except (LockNotAcquiredError, BackendUnavailableError) as exc:
                    what = type(exc).__name__
                except BaseException as exc:
                    what = f"unexpected {exc!r}"
                outcomes.append((kind, "async", what, time.monotonic() - start))

            await asyncio.gather(*(one(kind) for kind in KINDS))
            await _settle(made)
            await waiters.aclose()

        threads = [threading.Thread(target=sync_waiter, args=(k,)) for k in KINDS]
        threads.append(threading.Thread(target=asyncio.run, args=(async_waiters(),)))
        admin = primary.client()
        try:
            for t in threads:
                t.start()
            wait_until(
                lambda: (
                    sum(1 for c in admin.client_list() if c.get("cmd") == "blpop")
                    >= 2 * len(KINDS)
                ),
                timeout=6,
                interval=0.01,
                message="every waiter blocked on the primary",
            )
        finally:
            admin.close()
        cluster.kill_primary(primary)
        for t in threads:
            t.join(budget + 10)
        assert not any(t.is_alive() for t in threads), "a waiter hangs"
        assert len(outcomes) == 2 * len(KINDS)
        allowed = {"acquired", "timed out", "LockNotAcquiredError"}
        for kind, mode, what, seconds in outcomes:
            assert what in allowed | {"BackendUnavailableError"}, (kind, mode, what)
            # the budget, then one bounded reply wait and connect (1 s each)
            assert seconds < budget + 2.5, (kind, mode, what, seconds)
        print(sorted(outcomes))

        cluster.wait_promoted(primary)

        def acquires_again() -> bool:
            lock = waiters.lock("{v}:after", ttl=5)
            try:
                if not lock.acquire(timeout=1):
                    return False
            except LockNotAcquiredError:
                return False
            lock.release()
            return True

        wait_until(acquires_again, timeout=15, interval=0.1, message="sync acquires")

        async def async_acquires_again() -> None:
            deadline = time.monotonic() + 15
            while True:
                lock = waiters.lock("{v}:after-async", ttl=5)
                try:
                    if await lock.aacquire(timeout=1):
                        await lock.arelease()
                        await _settle([lock])
                        break
                except LockNotAcquiredError:
                    pass
                await _settle([lock])
                assert time.monotonic() < deadline, "async acquires after failover"
                await asyncio.sleep(0.1)
            await waiters.aclose()

        asyncio.run(async_acquires_again())
        for lock in held:
            lock.raise_on_not_owned = False
            try:
                lock.release()
            except rcache.LockError:
                pass  # the lease may have been lost in the failover: said, not raised
        holder.close()
        waiters.close()


def test_clusterdown_and_tryagain_are_backend_unavailable() -> None:
    """A slot served by nobody (CLUSTERDOWN) and a slot migrating with some of a
    lock's keys moved (TRYAGAIN): the lock fails closed with LockNotAcquiredError from
    BackendUnavailableError, in both modes, within its budget."""
    with RedisCluster(replicas=0) as cluster:
        cache = rcache.Cache(cluster.url, prefix="t")
        name = "{m}"
        with cache.lock(name, ttl=5):  # the fence counter now exists; the lease not
            pass
        base = f"t:l:{{{name}}}"
        slot = key_slot(base.encode())
        source = cluster.node_for(base)
        target = next(n for n in cluster.primaries() if n.port != source.port)
        src, dst = source.client(), target.client()

        def fails_unavailable(match: str) -> None:
            start = time.monotonic()
            with pytest.raises(LockNotAcquiredError) as info:
                cache.lock(name, ttl=5).acquire(timeout=1)
            assert isinstance(info.value.__cause__, BackendUnavailableError)
            assert match in str(info.value.__cause__), info.value.__cause__
            assert time.monotonic() - start < 3

            async def attempt() -> None:
                lock = cache.lock(name, ttl=5)
                try:
                    with pytest.raises(LockNotAcquiredError) as ainfo:
                        await lock.aacquire(timeout=1)
                    assert isinstance(ainfo.value.__cause__, BackendUnavailableError)
                finally:
                    await _settle([lock])
                    await cache.aclose()

            asyncio.run(attempt())

        try:
            src_id = src.execute_command("CLUSTER MYID").decode()
            dst_id = dst.execute_command("CLUSTER MYID").decode()
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            # the fence is on the source, the lease key nowhere: a multi-key script
            # in a migrating slot gets TRYAGAIN
            fails_unavailable("TryAgain")
            for node in (src, dst):
                node.execute_command("CLUSTER SETSLOT", slot, "STABLE")
            with cache.lock(name, ttl=5):
                pass  # served again
            src.execute_command("CLUSTER DELSLOTS", slot)
            fails_unavailable("ClusterDown")
        finally:
            src.close()
            dst.close()
            cache.close()
