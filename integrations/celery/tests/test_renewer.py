"""Task guards share rcache's per-process lease renewer with locks and computations."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import rcache
from rcache.testing import RedisServer, wait_until
from rcache_celery import _guard


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_guards_locks_and_computations_share_one_renewer_thread(
    celery_redis: RedisServer,
) -> None:
    url = f"redis://127.0.0.1:{celery_redis.port}/2"
    caches = [rcache.Cache(url, prefix=f"one{i}") for i in range(2)]
    client = celery_redis.client(db=2)
    release = threading.Event()
    workers: list[threading.Thread] = []
    handles: list[int] = []
    guards: list[_guard.Guard] = []
    try:
        for cache in caches:
            # A running task's guard, as LockedTask.__call__ registers it.
            guard = _guard.Guard(
                cache, f"{cache.prefix}:celery:l:{{{uuid.uuid4().hex}}}", "task-1"
            )
            assert _guard.begin(guard, 0.3, acquire=True)[0] == _guard.ACQUIRED
            handles.append(_guard.renewer().add(guard, 0.3, "one"))
            guards.append(guard)

            @cache.cached(ttl=60, lease_ttl=0.3, name="f")
            def compute() -> int:
                release.wait(10)
                return 1

            def hold(cache: rcache.Cache, compute: Callable[[], int]) -> None:
                with cache.lock("one", ttl=0.3):
                    compute()

            workers.append(threading.Thread(target=hold, args=(cache, compute)))
            workers[-1].start()

        def renewed(cache: rcache.Cache) -> int:
            return cache.metrics.count("lock_renewals", "one", "renewed")  # type: ignore[attr-defined,no-any-return]

        # Guards and locks of both caches renewed past several TTLs (same label).
        wait_until(lambda: all(renewed(c) >= 8 for c in caches), 10, message="renewals")
        assert len(list(client.scan_iter(match="*:lease"))) == 2
        assert [client.get(g.key) for g in guards] == [b"task-1", b"task-1"]
        assert len(_threads("rcache-lock-renewer")) == 1
        assert _threads("rcache-celery-renewer") == []
        assert _threads("rcache-lease-keeper") == []
    finally:
        release.set()
        for worker in workers:
            worker.join(10)
        for handle in handles:
            assert _guard.renewer().remove(handle) is False  # never lost
        for cache in caches:
            cache.close()
        client.close()
