"""Capture the real output of every ``rcache`` command for README "Operating rcache".

Starts a throwaway redis-server on port 6390 (``--port`` to change), builds a small
shop: cached functions, tags, explicit keys, locks of every kind held by another
process (with a waiter), and Celery tasks (one enqueued, one running in a real solo
worker), then runs each command as a subprocess and prints command + output in
Markdown. Not a test; run it with ``.venv/bin/python docs/capture_operating.py``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import rcache
from rcache.testing import RedisServer, wait_until

HOLDER = textwrap.dedent(
    """
    import sys, threading, rcache
    cache = rcache.Cache(sys.argv[1], prefix="shop")
    cache.lock("invoice:42", ttl=120).acquire()
    cache.rwlock("catalog-import", ttl=300).write().acquire()
    sem = cache.semaphore("payments-api", limit=3, ttl=60)
    sem.acquire()
    def wait():
        other = rcache.Cache(sys.argv[1], prefix="shop")
        try:
            other.lock("invoice:42", ttl=30).acquire(timeout=600)
        except rcache.RCacheError:
            pass
    threading.Thread(target=wait, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
    """
)

APP = textwrap.dedent(
    """
    import os, time
    from celery import Celery
    import rcache, rcache_celery

    URL = os.environ["DEMO_URL"]
    app = Celery("shop", broker=URL.replace("/0", "/1"), backend=URL.replace("/0", "/2"))
    cache = rcache.Cache(URL, prefix="shop")
    rcache_celery.install(app, cache)

    @cache.cached(ttl="1h")
    def get_user(user_id):
        return {"id": user_id, "name": f"user {user_id}"}

    @cache.cached(ttl="10m", tags=["catalog"])
    def top_products(category, page=1):
        return [f"{category}-{i}" for i in range(20)]

    @app.task(base=rcache_celery.UniqueTask, name="shop.sync_user", unique_on=["user_id"])
    def sync_user(user_id):
        return user_id

    @app.task(base=rcache_celery.LockedTask, name="shop.build_report",
              lock_key="report:{day}", lock_ttl=60)
    def build_report(day):
        time.sleep(120)
    """
)


def run(cmd: list[str], env: dict[str, str], stdin: str | None = None) -> str:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "rcache"), *cmd],
        input=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # prompts (stderr) in order with the output
        text=True,
        env=env,
        timeout=120,
    )
    # a terminal would echo the typed answer after the prompt
    return out.stdout.replace("[y/N]: ", "[y/N]: y\n").rstrip("\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=6390)
    args = parser.parse_args()
    with RedisServer(port=args.port) as server, tempfile.TemporaryDirectory() as tmp:
        url = server.url
        env = {**os.environ, "RCACHE_URL": url, "DEMO_URL": url, "PYTHONPATH": tmp}
        cache = rcache.Cache(url, prefix="shop")
        Path(tmp, "shop_tasks.py").write_text(APP)
        sys.path.insert(0, tmp)
        os.environ["DEMO_URL"] = url
        import shop_tasks  # type: ignore[import-not-found]

        get_user, top_products = shop_tasks.get_user, shop_tasks.top_products
        for i in range(1500):
            get_user(i)
        for category in ("books", "games", "music"):
            for page in range(1, 11):
                top_products(category, page)
        for i in range(200):
            cache.set(f"page:/products/{i}", "<html>" + "x" * 2000, ttl=600)

        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "ready"
        sem = cache.semaphore("payments-api", limit=3, ttl=60)
        sem.acquire()

        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "shop_tasks",
                "worker",
                "-P",
                "solo",
                "--loglevel",
                "WARNING",
            ],
            cwd=tmp,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        shop_tasks.build_report.delay("2026-11-28")
        r = server.client()
        wait_until(
            lambda: r.exists("shop:celery:l:{report:2026-11-28}"),
            timeout=60,
            message="the report task runs",
        )
        shop_tasks.sync_user.apply_async((7,), countdown=300)
        shop_tasks.sync_user.apply_async((8,), countdown=300)
        wait_until(lambda: r.exists("shop:l:{invoice:42}:w"), timeout=10)
        time.sleep(0.2)  # let the leases run a little, for the LEFT column

        commands: list[tuple[list[str], str | None]] = [
            (["doctor", url, "--prefix", "shop"], None),
            (["stats", "--prefix", "shop"], None),
            (["locks", "--prefix", "shop"], None),
            (["tasks", "--prefix", "shop"], None),
            (["invalidate-tag", "catalog", "--prefix", "shop"], "y\n"),
            (["locks", "release", "invoice:42", "--force", "--prefix", "shop"], "y\n"),
            (["locks", "--prefix", "shop"], None),
            (["clear", "--prefix", "shop", "--dry-run"], None),
            (["clear", "--prefix", "shop"], "y\n"),
            (["stats", "--prefix", "shop", "--json"], None),
        ]
        try:
            for cmd, stdin in commands:
                print("```bash\n$ rcache " + " ".join(cmd) + "\n```\n```text")
                print(run(cmd, env, stdin))
                print("```\n")
        finally:
            worker.kill()  # the report task sleeps: no warm shutdown
            worker.wait(timeout=30)
            holder.stdin.close()
            holder.wait(timeout=30)
            holder.stdout.close()
            r.close()
            cache.close()


if __name__ == "__main__":
    main()
