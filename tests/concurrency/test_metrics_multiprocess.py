"""Multiprocess metrics: several processes write, ONE exporter serves the exact sums.

Each process is started with ``PROMETHEUS_MULTIPROC_DIR`` already in its environment (as
the README says to do in the start-up shell), does real cache traffic against the
session's redis-server, and the test scrapes a single exporter over HTTP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from rcache import ConfigurationError
from rcache.metrics import PrometheusMetrics, mark_process_dead
from rcache.testing import free_port, wait_until

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "metricsworkers.py"


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


def _l(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    **labels: str,
) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"missing {name}{labels}"
    return samples[key]


@pytest.fixture
def mp_env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    d = tmp_path / "prom"
    d.mkdir()
    env = dict(os.environ)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(d)
    env["RCACHE_TEST_REDIS_URL"] = redis_url
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(HERE.parent.parent), env.get("PYTHONPATH", "")]
    )
    return env


def test_worker_processes_sum_in_one_exporter(
    mp_env: dict[str, str], redis_url: str
) -> None:
    exporter = subprocess.Popen(
        [sys.executable, str(WORKERS), "exporter"],
        env=mp_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert exporter.stdout is not None
        port = int(exporter.stdout.readline())
        url = f"http://127.0.0.1:{port}/metrics"
        # Before any worker wrote anything, the exporter answers with no rcache series.
        assert "rcache_cache_gets_total" not in get(url)

        n, calls = 4, 25
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(WORKERS),
                    "worker",
                    redis_url,
                    str(i),
                    str(calls),
                    "1" if i < 2 else "0",
                ],
                env=mp_env,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(n)
        ]
        for w in workers:
            out, _ = w.communicate(timeout=60)
            assert w.returncode == 0
            assert out.strip() == "done"

        s = parse(get(url))
        assert (
            value(s, "rcache_cache_gets_total", cache="mp.fn", result="miss")
            == n * calls
        )
        assert (
            value(s, "rcache_cache_gets_total", cache="mp.fn", result="hit")
            == n * calls
        )
        assert value(s, "rcache_cache_gets_total", cache="mp.fn", result="stale") == 0
        assert value(s, "rcache_cache_puts_total", cache="mp.fn") == n * calls
        assert (
            value(
                s,
                "rcache_cache_load_duration_seconds_count",
                cache="mp.fn",
                result="success",
            )
            == n * calls
        )
        assert value(s, "rcache_cache_gets_total", cache="mpcache", result="hit") == n
        assert value(s, "rcache_cache_puts_total", cache="mpcache") == n
        lock = {
            (name, labels): v
            for (name, labels), v in s.items()
            if name.startswith("rcache_lock") and ("lock", "mp.lock") in labels
        }
        assert (
            lock[("rcache_lock_acquires_total", _l(lock="mp.lock", result="acquired"))]
            == n
        )
        assert (
            lock[("rcache_lock_releases_total", _l(lock="mp.lock", result="released"))]
            == n
        )
        assert lock[("rcache_lock_held_seconds_count", _l(lock="mp.lock"))] == n
        assert value(s, "rcache_locks_held", lock="mp.lock") == 0
        # livesum: the two workers that exited holding "mp.hold" still count until
        # their death is recorded (gunicorn's child_exit hook does this).
        assert value(s, "rcache_locks_held", lock="mp.hold") == 2
        assert (
            value(s, "rcache_lock_acquires_total", lock="mp.hold", result="acquired")
            == 2
        )
        # No pid label anywhere (the gauges use live* modes, never "all").
        assert all("pid" not in dict(labels) for (_, labels) in s)
        # The breaker gauge (livemax) is one series per cache, not per process.
        assert value(s, "rcache_cache_breaker_state", cache="mpcache") == 0

        for w in workers:
            mark_process_dead(w.pid, mp_env["PROMETHEUS_MULTIPROC_DIR"])
        after = parse(get(url))
        held = [v for (name, _), v in after.items() if name == "rcache_locks_held"]
        assert sum(held) == 0
        # Counters and histograms of dead processes stay in the totals.
        assert (
            value(after, "rcache_cache_gets_total", cache="mp.fn", result="hit")
            == n * calls
        )
    finally:
        assert exporter.stdin is not None
        exporter.stdin.close()
        try:
            exporter.wait(timeout=10)
        except subprocess.TimeoutExpired:
            exporter.kill()
            exporter.wait()
        assert exporter.stdout is not None
        exporter.stdout.close()


GUNICORN_CONF = """
from rcache.metrics import mark_process_dead

def child_exit(server, worker):
    mark_process_dead(worker.pid)
"""


def test_gunicorn_workers_sum_behind_their_own_metrics_route(
    mp_env: dict[str, str], tmp_path: Path
) -> None:
    gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent))
    assert gunicorn is not None, "gunicorn is a dev dependency; run uv sync"
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(GUNICORN_CONF)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            gunicorn,
            "-w",
            "2",
            "-b",
            f"127.0.0.1:{port}",
            "-c",
            str(conf),
            "--chdir",
            str(HERE),
            "--log-level",
            "warning",
            "metricsworkers:app",
        ],
        env=mp_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                get(base + "/metrics", timeout=2)
                return True
            except OSError:
                return False

        wait_until(up, timeout=30, interval=0.05, message="gunicorn to answer")
        keys = 20
        for i in range(keys):  # sequential: exactly one miss per key
            get(f"{base}/work?i={i}")
        pids: set[str] = set()
        hits = 0
        lock = threading.Lock()

        def hammer() -> None:
            nonlocal hits
            for i in range(keys):
                body = get(f"{base}/work?i={i}")
                with lock:
                    hits += 1
                    pids.add(body.split()[1])

        # Parallel clients so that both workers serve (asserted below), in rounds until
        # both pids were seen (a deadline bounds it).
        def both_served() -> bool:
            threads = [threading.Thread(target=hammer) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            return len(pids) >= 2

        wait_until(both_served, timeout=30, interval=0, message="both workers to serve")

        # Any worker may answer /metrics: each reads every process's file.
        for _ in range(4):
            s = parse(get(base + "/metrics"))
            assert (
                value(s, "rcache_cache_gets_total", cache="gu.fn", result="miss")
                == keys
            )
            assert (
                value(s, "rcache_cache_gets_total", cache="gu.fn", result="hit") == hits
            )
            assert value(s, "rcache_cache_puts_total", cache="gu.fn") == keys
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_env_set_after_import_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This pytest process imported prometheus_client without the variable: its values
    # live in memory, which an exporter under PROMETHEUS_MULTIPROC_DIR would never see.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(ConfigurationError, match="before Python starts"):
        PrometheusMetrics(registry=CollectorRegistry())
