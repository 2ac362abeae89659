"""Examples are part of the product: each runs against the test server and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


# Every runnable example script; each must exit 0 against the test server.
SCRIPTS = sorted(
    p.name for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_")
)


def test_every_example_is_listed() -> None:
    assert {"demo.py", "cache_decorator.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script: str, redis_url: str) -> None:
    out = run(script, {"REDIS_URL": redis_url})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "finished" in out.stdout


def test_demo_with_redis(redis_url: str) -> None:
    out = run("demo.py", {"REDIS_URL": redis_url})
    assert out.returncode == 0, out.stderr
    assert "[miss:" in out.stdout and "[hit:" in out.stdout
    assert "invalidate(42) -> True" in out.stdout


def test_demo_falls_back_to_memory_without_redis_server(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "REDIS_URL": ""}  # no redis-server on this PATH
    out = run("demo.py", env)
    assert out.returncode == 0, out.stderr
    assert "memory://" in out.stdout.splitlines()[0]
    assert "demo finished" in out.stdout
