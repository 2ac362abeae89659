"""Django backend ``incr`` is atomic across processes (one Lua call, INCRBY inside)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("django")  # the dev group installs it: never skipped in CI

pytestmark = pytest.mark.slow

WORKERS = Path(__file__).resolve().parent / "djangoworkers.py"
PROCESSES, EACH = 4, 250


def run_workers(url: str, mode: str) -> list[int]:
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKERS), url, str(EACH), mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    values: list[int] = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        values += [int(line) for line in out.split()]
    return values


def test_incr_from_four_processes_loses_no_update(
    redis_url: str, redis_client: object
) -> None:
    import redis

    assert isinstance(redis_client, redis.Redis)
    redis_client.set("rcache:k::1:counter", b"0")  # a raw int, as the backend stores it
    values = run_workers(redis_url, "atomic")
    total = PROCESSES * EACH
    # every increment returned a distinct value and none was lost
    assert sorted(values) == list(range(1, total + 1))
    assert redis_client.get("rcache:k::1:counter") == str(total).encode()
