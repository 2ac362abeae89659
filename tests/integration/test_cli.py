"""The ``rcache`` command through click's CliRunner, and as real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result

import rcache
from rcache._cli import cli
from rcache.testing import RedisServer, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def run(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    for var in ("RCACHE_URL", "REDIS_URL", "RCACHE_PREFIX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RCACHE_URL", redis_url)

    def invoke(*args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)

    return invoke


def _keys(r: redis.Redis, prefix: str, n: int) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"{prefix}:k:item:{i}", b"v")
    pipe.execute()


# -- doctor --------------------------------------------------------------------------------


def test_doctor_reports_every_check(run: Callable[..., Result], redis_url: str) -> None:
    out = run("doctor", redis_url)
    assert out.exit_code == 0, out.output
    for name in ("reachable", "latency", "server", "maxmemory-policy", "persistence"):
        assert name in out.output
    assert "mode standalone" in out.output and "noeviction" in out.output
    # the test server runs without persistence: a warning that says what to do
    assert "WARN" in out.output
    checks = json.loads(run("doctor", "--json").stdout)  # URL from $RCACHE_URL
    by_name = {c["name"]: c for c in checks}
    assert by_name["acl"]["status"] == "ok"
    assert by_name["clock"]["status"] == "ok"
    assert by_name["persistence"]["status"] == "warn"
    assert "appendfsync always" in by_name["persistence"]["detail"]


def test_doctor_unreachable_fails(run: Callable[..., Result]) -> None:
    from rcache.testing import free_port

    out = run("doctor", f"redis://127.0.0.1:{free_port()}/0")
    assert out.exit_code == 1
    assert "reachable" in out.output and "FAIL" in out.output


def test_doctor_names_denied_commands_and_eviction_risk(
    run: Callable[..., Result],
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    admin = server.client()
    admin.execute_command(
        "ACL", "SETUSER", "app", "on", ">pw", "~shop:*", "+@all", "-evalsha", "-unlink"
    )
    admin.execute_command(
        "ACL", "SETUSER", "tiny", "on", ">pw", "~shop:*", "+ping", "+acl|whoami"
    )
    admin.config_set("maxmemory-policy", "allkeys-lru")
    admin.config_set("maxmemory", "100mb")
    url = f"redis://app:pw@127.0.0.1:{server.port}/0"
    out = run("doctor", url, "--prefix", "shop")
    assert out.exit_code == 1, out.output
    assert "EVALSHA" in out.output and "UNLINK" in out.output
    assert "allkeys-lru" in out.output and "fence" in out.output
    assert "pw@" not in out.output  # the password is never printed

    # a user that may not even ask: permissions unknown, said so, not a failure
    tiny = run("doctor", f"redis://tiny:pw@127.0.0.1:{server.port}/0", "--json")
    by_name = {c["name"]: c for c in json.loads(tiny.stdout)}
    assert by_name["acl"]["status"] == "info"
    assert "not permitted" in by_name["acl"]["detail"]
    assert by_name["maxmemory-policy"]["status"] == "warn"  # from INFO
    admin.close()


# -- stats, locks --------------------------------------------------------------------------


def test_stats_table_and_json(
    run: Callable[..., Result], redis_url: str, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache(redis_url, prefix="st")

    @cache.cached(ttl=60)
    def get_user(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    for i in range(5):
        get_user(i)
    with cache.lock("nightly"):
        table = run("stats", "--prefix", "st")
        data = json.loads(run("stats", "--prefix", "st", "--json").stdout)
    assert table.exit_code == 0
    assert "get_user" in table.output and "locks held" in table.output
    assert data["entries"] == 5 and data["locks_held"] == 1
    assert data["functions"][0]["entries"] == 5
    cache.close()


def test_locks_lists_watches_and_force_releases(
    run: Callable[..., Result], redis_url: str, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache(redis_url, prefix="rcache")
    lock = cache.lock("invoice:42", ttl=60)
    lock.acquire()
    fence = lock.fence
    out = run("locks")
    assert out.exit_code == 0
    assert "invoice:42" in out.output and str(os.getpid()) in out.output
    rows = json.loads(run("locks", "--json").stdout)
    assert rows[0]["name"] == "invoice:42" and rows[0]["fence"] == fence
    assert rows[0]["holders"][0]["pid"] == os.getpid()
    watched = run("locks", "--watch", "--interval", "0.01", "--iterations", "2")
    assert watched.output.count("invoice:42") == 2

    # destructive: needs --force, refuses keys, asks, and "n" changes nothing
    refused = run("locks", "release", "invoice:42")
    assert refused.exit_code == 2 and "--force" in refused.output
    key = run("locks", "release", "rcache:l:{invoice:42}", "--force", "--yes")
    assert key.exit_code == 2 and "not a Redis key" in key.output
    no = run("locks", "release", "invoice:42", "--force", input="n\n")
    assert no.exit_code == 1 and "Aborted" in no.output
    assert redis_client.exists("rcache:l:{invoice:42}")

    yes = run("locks", "release", "invoice:42", "--force", input="y\n")
    assert yes.exit_code == 0, yes.output
    assert f"fence now {fence + 1}" in yes.output
    assert not redis_client.exists("rcache:l:{invoice:42}")
    with pytest.raises(rcache.LockNotOwnedError):
        lock.release()
    assert "no lock held" in run("locks").output
    nothing = run("locks", "release", "invoice:42", "--force", "--yes")
    assert "nothing holds" in nothing.output
    cache.close()


def test_locks_release_of_rwlock_and_semaphore(
    run: Callable[..., Result], redis_url: str
) -> None:
    cache = rcache.Cache(redis_url, prefix="rcache")
    cache.rwlock("doc", ttl=30).read().acquire()
    cache.semaphore("pool", limit=2, ttl=30).acquire()
    for name in ("doc", "pool"):
        out = run("locks", "release", name, "--force", "--yes", "--json")
        assert out.exit_code == 0, out.output
        released = [r for r in json.loads(out.stdout) if r["released"]]
        assert len(released) == 1
    assert cache.locks() == []
    cache.close()


# -- clear, invalidate-tag -------------------------------------------------------------------


def test_clear_asks_counts_and_touches_only_the_prefix(
    run: Callable[..., Result], redis_client: redis.Redis
) -> None:
    _keys(redis_client, "shop", 1200)
    _keys(redis_client, "shop2", 10)
    redis_client.set("shopx", b"keep")
    assert run("clear").exit_code == 2  # --prefix is required
    empty = run("clear", "--prefix", "")
    assert empty.exit_code == 2 and "--allow-empty-prefix" in empty.output

    dry = run("clear", "--prefix", "shop", "--dry-run")
    assert "1200 keys" in dry.output and redis_client.dbsize() == 1211
    no = run("clear", "--prefix", "shop", input="n\n")
    assert no.exit_code == 1 and "Delete 1200 keys" in no.output
    assert redis_client.dbsize() == 1211

    done = run("clear", "--prefix", "shop", "--batch-size", "100", "--json", "--yes")
    result = json.loads(done.stdout)
    assert result["deleted"] == 1200 and result["batches"] >= 12
    assert not result["interrupted"]
    assert redis_client.dbsize() == 11  # shop2:* and shopx untouched

    everything = run("clear", "--prefix", "", "--allow-empty-prefix", "--yes")
    assert everything.exit_code == 0 and redis_client.dbsize() == 0


def test_invalidate_tag(
    run: Callable[..., Result], redis_url: str, redis_client: redis.Redis
) -> None:
    cache = rcache.Cache(redis_url, prefix="rcache")
    calls = []

    @cache.cached(ttl=60, tags=["catalog"])
    def top() -> int:
        calls.append(1)
        return len(calls)

    assert top() == 1 and top() == 1
    out = run("invalidate-tag", "catalog", "missing", "--yes")
    assert out.exit_code == 0 and "1 had entries" in out.output
    assert top() == 2
    cache.close()


# -- Celery --------------------------------------------------------------------------------


def test_tasks_lists_guard_keys(
    run: Callable[..., Result], redis_client: redis.Redis
) -> None:
    key = "rcache:celery:u:{shop.sync_user:" + "a" * 32 + "}"
    redis_client.set(key, b"task-1", px=60_000)
    redis_client.set(key + ":r:task-1", b"running", px=60_000)
    out = run("tasks")
    assert out.exit_code == 0
    assert "shop.sync_user" in out.output and "task-1" in out.output
    assert "running" in out.output
    rows = json.loads(run("tasks", "--json").stdout)
    assert rows[0]["task_id"] == "task-1" and rows[0]["kind"] == "unique"


def test_tasks_without_rcache_celery_says_what_to_install(
    run: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "rcache_celery", None)  # import fails
    out = CliRunner().invoke(cli, ["tasks"])
    assert out.exit_code == 1 and "pip install rcache-celery" in out.output


# -- real subprocesses -----------------------------------------------------------------------


def _console_script() -> Path:
    return Path(sys.executable).parent / "rcache"


def test_console_script_and_python_m_run(
    redis_url: str, redis_client: redis.Redis
) -> None:
    _keys(redis_client, "sub", 50)
    env = {**os.environ, "RCACHE_URL": redis_url}
    env.pop("RCACHE_PREFIX", None)
    script = _console_script()
    assert script.exists(), "the rcache console script is not installed"
    out = subprocess.run(
        [str(script), "stats", "--prefix", "sub", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["entries"] == 50
    out = subprocess.run(
        [sys.executable, "-m", "rcache", "clear", "--prefix", "sub", "--yes"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "deleted 50 keys" in out.stdout
    assert redis_client.dbsize() == 0


@pytest.fixture
def big(redis_server_factory: Callable[[], RedisServer]) -> RedisServer:
    server = redis_server_factory()
    r = server.client()
    pipe = r.pipeline(transaction=False)
    for i in range(40_000):
        pipe.set(f"big:k:{i}", b"v")
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    r.close()
    return server


def test_ctrl_c_stops_clear_and_reports_exactly_what_was_deleted(
    big: RedisServer,
) -> None:
    r = big.client()
    env = {**os.environ, "RCACHE_URL": big.url}
    proc = subprocess.Popen(
        # tiny batches so that the clear is still running when SIGINT arrives
        [
            sys.executable,
            "-m",
            "rcache",
            "clear",
            "--prefix",
            "big",
            "--yes",
            "--json",
            "--batch-size",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    wait_until(lambda: r.dbsize() < 39_000, timeout=30, message="deleting started")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    result = json.loads(stdout)
    assert result["interrupted"]
    assert 0 < result["deleted"] < 40_000
    # what it says it deleted is what is gone: nothing unaccounted for
    assert r.dbsize() == 40_000 - result["deleted"]
    r.close()


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[str]:
    """A real redis-sentinel (monitoring a primary that need not exist)."""
    from rcache.testing import free_port

    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        "sentinel monitor shop-primary 127.0.0.1 6399 1\n"
    )
    proc = subprocess.Popen(
        ["redis-server", str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(up, timeout=10, message="sentinel answers")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.kill()
        proc.wait(timeout=10)


def test_doctor_on_a_sentinel_fails_and_names_the_primary(
    run: Callable[..., Result], sentinel: str
) -> None:
    out = run("doctor", sentinel)
    assert out.exit_code == 1
    assert "mode sentinel" in out.output and "FAIL" in out.output
    checks = json.loads(run("doctor", sentinel, "--json").stdout)
    assert [c["name"] for c in checks] == ["reachable", "latency", "server"]
    assert "shop-primary at 127.0.0.1:6399" in checks[-1]["detail"]


def test_doctor_on_a_cluster_node_warns(
    run: Callable[..., Result], tmp_path: Path
) -> None:
    server = RedisServer(
        extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
    ).start()
    try:
        checks = json.loads(run("doctor", server.url, "--json").stdout)
    finally:
        server.close()
    by_name = {c["name"]: c for c in checks}
    assert by_name["server"]["status"] == "warn"
    assert "mode cluster" in by_name["server"]["detail"]
