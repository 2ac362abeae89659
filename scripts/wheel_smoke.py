"""Smoke test of the installed wheels (run by scripts/wheel-smoke, never from the checkout).

scripts/wheel-smoke copies this file into a temporary folder outside the checkout and runs
it with the python of a fresh venv into which plain ``pip`` installed the two wheels:

    RCACHE_CHECKOUT=/path/to/checkout /tmp/x/venv/bin/python smoke.py

It asserts that rcache and rcache_celery come from that venv and that nothing of the
checkout is on ``sys.path``, then, against a throwaway ``redis-server``
(``rcache.testing.RedisServer``, shipped in the wheel): a cached function (miss, hit,
invalidate), a lock contended from a second thread, and a ``UniqueTask`` round trip
through a real ``celery worker`` started from the venv's ``bin/celery`` on that Redis as
broker and result backend. Every wait has a deadline; the worker and the server are
stopped on the way out, also on failure.

The worker imports this same file as the module ``smoke``: with ``RCACHE_SMOKE_URL`` set
in its environment, the module builds the Celery app at import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery  # type: ignore[import-untyped]

import rcache
import rcache_celery
from rcache.testing import RedisServer

URL_VAR = "RCACHE_SMOKE_URL"
TASK_NAME = "smoke.add"
DEADLINE = 60.0  # seconds, for any single wait below


def inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder)


def where() -> dict[str, Any]:
    """Where this process imports from: checked in the smoke run and in the worker."""
    return {
        "prefix": sys.prefix,
        "base_prefix": sys.base_prefix,
        "rcache": rcache.__file__,
        "rcache_celery": rcache_celery.__file__,
        "sys_path": [p for p in sys.path if p],
        "cwd": str(Path.cwd()),
    }


def check_where(seen: dict[str, Any], who: str) -> None:
    checkout = Path(os.environ["RCACHE_CHECKOUT"]).resolve()
    venv = Path(seen["prefix"]).resolve()
    assert seen["prefix"] != seen["base_prefix"], f"{who}: not running in a venv"
    assert not inside(venv, checkout), f"{who}: the venv {venv} is inside the checkout"
    for name in ("rcache", "rcache_celery"):
        assert inside(seen[name], venv), f"{who}: {name} from {seen[name]}, not {venv}"
    on_path = [p for p in seen["sys_path"] if inside(p, checkout)]
    assert not on_path, f"{who}: the checkout is on sys.path: {on_path}"
    assert not inside(seen["cwd"], checkout), (
        f"{who}: cwd {seen['cwd']} in the checkout"
    )


def add(x: int, y: int) -> dict[str, Any]:
    return {"sum": x + y, "where": where()}


def make_app(url: str) -> tuple[Any, Any]:
    """The Celery app on ``url`` (broker, results and cache) and its unique task."""
    app = Celery("smoke", broker=url, backend=url)
    app.conf.broker_connection_retry_on_startup = True
    rcache_celery.install(app, rcache.Cache(url, prefix="smoke-celery"))
    task = app.task(base=rcache_celery.UniqueTask, name=TASK_NAME, unique_ttl=120)(add)
    return app, task


if os.environ.get(URL_VAR):  # the worker's import of this module
    app, _task = make_app(os.environ[URL_VAR])


def smoke_cache(server: RedisServer) -> None:
    cache = rcache.Cache(server.url, prefix="smoke")
    calls: list[int] = []

    @cache.cached(ttl=60)
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    assert square(4) == 16 and calls == [4], "miss: the function runs once"
    assert square(4) == 16 and calls == [4], "hit: served from Redis"
    assert server.client().keys("smoke*"), "the hit was not served from Redis"
    assert square.invalidate(4) is True, "invalidate: the entry was there"
    assert square(4) == 16 and calls == [4, 4], "after invalidate: computed again"
    print("wheel-smoke: cached function: miss, hit, invalidate, miss")


def smoke_lock(server: RedisServer) -> None:
    cache = rcache.Cache(server.url, prefix="smoke")
    results: list[bool] = []

    def contender() -> None:
        other = cache.lock("smoke-lock", ttl=10)
        results.append(other.acquire(timeout=0))

    with cache.lock("smoke-lock", ttl=10, timeout=5) as lock:
        lock.ensure_held()
        fence = lock.fence
        thread = threading.Thread(target=contender)
        thread.start()
        thread.join(DEADLINE)
        assert results == [False], f"a second holder got the held lock: {results}"
    after = cache.lock("smoke-lock", ttl=10)
    assert after.acquire(timeout=0), "the released lock could not be taken again"
    after.release()
    print(f"wheel-smoke: lock: held (fence {fence}), contended, released")


def smoke_celery(server: RedisServer, celery_bin: Path) -> None:
    app, task = make_app(server.url)
    # Queued twice before any worker runs: the second delay() is the first one's task.
    first = task.delay(2, 3)
    second = task.delay(2, 3)
    assert second.id == first.id, f"UniqueTask queued twice: {first.id} {second.id}"
    env = {**os.environ, URL_VAR: server.url}
    worker = subprocess.Popen(
        [
            str(celery_bin),
            "-A",
            "smoke",
            "--quiet",  # no banner
            "worker",
            "--pool=solo",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=WARNING",
            f"--hostname=smoke-{os.getpid()}@%h",
        ],
        env=env,
        cwd=Path.cwd(),
    )
    try:
        result = first.get(timeout=DEADLINE)
        assert result["sum"] == 5, result
        check_where(result["where"], "celery worker")
        # Released when the task ended: the same arguments queue a new task.
        third = task.delay(2, 3)
        assert third.id != first.id, "the dedup key outlived the task"
        assert third.get(timeout=DEADLINE)["sum"] == 5
    finally:
        stop(worker)
        app.close()
    print("wheel-smoke: UniqueTask: deduplicated, run by a celery worker, released")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()  # a warm shutdown
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def main() -> int:
    started = time.monotonic()
    check_where(where(), "smoke script")
    celery_bin = Path(sys.prefix) / "bin" / "celery"
    assert celery_bin.is_file(), f"{celery_bin} missing: was rcache-celery installed?"
    with RedisServer(start_timeout=DEADLINE) as server:
        smoke_cache(server)
        smoke_lock(server)
        smoke_celery(server, celery_bin)
    print(
        f"wheel-smoke: rcache {rcache.__version__} and rcache-celery "
        f"{rcache_celery.__version__} from {sys.prefix}: OK "
        f"({time.monotonic() - started:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
