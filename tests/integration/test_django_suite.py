"""Conformance bar: Django's own generic cache tests against ``rcache.django``.

Django's source distribution ships ``tests/cache/tests.py``; its ``BaseCacheTests`` are
the tests every Django cache backend runs (``RedisCacheTests`` is ``BaseCacheTests`` +
``TestCase`` with CACHES pointed at Redis). This module downloads the sdist of exactly
the installed Django with pip (cached between runs), extracts ``tests/cache/`` and runs
the family in subprocesses (``tests/django_suite/run_suite.py``) on a throwaway
redis-server: sync and natively async (``tests/django_suite/async_driven.py``), under the
default JSON serializer and the signed pickle one. Every test passes except the ones
listed, with their reasons, in ``tests/django_suite/skips.py``; the run must skip exactly
those.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rcache.testing import RedisCluster, RedisServer

django = pytest.importorskip("django")  # the dev group installs it: never skipped in CI

SUITE = Path(__file__).resolve().parents[1] / "django_suite"
sys.path.insert(0, str(SUITE))
from skips import for_run  # noqa: E402

RUNS = [
    ("sync", "json", "single"),
    ("sync", "pickle", "single"),
    ("async", "json", "single"),
    ("async", "pickle", "single"),
    # the same bar on the session Redis Cluster (keys in slot groups, get_many split)
    ("sync", "pickle", "cluster"),
    ("async", "json", "cluster"),
]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _sdist_tests(version: str) -> Path:
    """``tests/`` of Django ``version``'s sdist, downloaded with pip once per machine."""
    root = Path(
        os.environ.get("RCACHE_DJANGO_SDIST_DIR")
        or Path(tempfile.gettempdir()) / "rcache-django-sdist"
    )
    tests = root / f"django-{version}" / "tests"
    if (tests / "cache" / "tests.py").is_file():
        return tests
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                "--disable-pip-version-check",
                "--quiet",
                f"django=={version}",
                "-d",
                tmp,
            ],
            check=True,
            timeout=240,
        )
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            # the top folder is "django-X.Y.Z" (older sdists: "Django-X.Y.Z")
            members = [
                m
                for m in tar.getmembers()
                if m.name.split("/")[1:3] == ["tests", "cache"]
            ]
            assert members, f"no tests/cache/ in {archive.name}"
            tar.extractall(tmp, members=members, filter="data")
            top = members[0].name.split("/")[0]
        # rename is atomic: a concurrent or interrupted run never sees half a tree
        staged = Path(tmp) / top
        try:
            staged.rename(root / f"django-{version}")
        except OSError:  # another run got there first
            shutil.rmtree(staged, ignore_errors=True)
    return tests


@pytest.fixture(scope="module")
def suite_runs(redis_cluster: RedisCluster) -> Iterator[dict[tuple[str, ...], Any]]:
    """Start the runs at once (they mostly sleep in Django's expiry tests)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH: run ./scripts/test", pytrace=False)
    tests_dir = _sdist_tests(django.__version__)
    out = Path(tempfile.mkdtemp(prefix="rcache-django-suite-"))
    with RedisServer() as server:
        procs = {}
        for db, (mode, serializer, topology) in enumerate(RUNS, start=1):
            name = f"{mode}-{serializer}-{topology}"
            report = out / f"{name}.json"
            url = f"redis://127.0.0.1:{server.port}/{db}"
            if topology == "cluster":  # one database there: a prefix per run instead
                url = redis_cluster.url
            cmd = [
                sys.executable,
                str(SUITE / "run_suite.py"),
                "--tests-dir",
                str(tests_dir),
                "--url",
                url,
                "--prefix",
                name,
                "--mode",
                mode,
                "--serializer",
                serializer,
                "--out",
                str(report),
            ]
            log = (out / f"{name}.log").open("w")
            procs[mode, serializer, topology] = (
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT),
                report,
                log,
            )
        results: dict[tuple[str, ...], Any] = {}
        for key, (proc, report, log) in procs.items():
            try:
                code = proc.wait(timeout=240)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
            output = Path(log.name).read_text()
            data = json.loads(report.read_text()) if report.exists() else None
            results[key] = (code, data, output)
        yield results
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize(("mode", "serializer", "topology"), RUNS)
def test_django_cache_suite_passes(
    suite_runs: dict[tuple[str, ...], Any], mode: str, serializer: str, topology: str
) -> None:
    code, report, output = suite_runs[mode, serializer, topology]
    assert report is not None, output[-4000:]
    assert report["django"] == django.__version__
    problems = {**report["failures"], **report["errors"]}
    assert not problems, "\n\n".join(f"{k}\n{v}" for k, v in problems.items())
    assert not report["unexpected_successes"]
    assert code == 0, output[-4000:]
    skips = for_run(serializer, mode)
    # the skip list names real Django tests, and exactly those were skipped
    assert report["skip_list_not_in_django"] == []
    assert report["skipped"] == skips
    assert report["ran"] == len(report["all_tests"])
    assert report["ran"] - len(skips) >= 44  # 54 in Django 5.2: the bar is not empty
