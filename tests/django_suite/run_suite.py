"""Run Django's generic cache tests (``BaseCacheTests``) against rcache's backend.

Started in a subprocess by ``tests/integration/test_django_suite.py``::

    python run_suite.py --tests-dir DJANGO_SDIST/tests --url redis://127.0.0.1:PORT/1 \
        --serializer json --mode sync --out result.json

The test class is made the way Django's own ``RedisCacheTests`` is: ``BaseCacheTests``
plus ``TestCase`` under ``override_settings(CACHES=caches_setting_for_tests(base=...,
exclude={"cull", "zero_cull"}))``. The tests listed in ``skips.py`` are replaced by
skips carrying their reason; the result (passed, failed, skipped, timings) is written as
JSON for the calling test to assert on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import unittest
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tests-dir", required=True, type=Path)
    parser.add_argument("--url", required=True)
    parser.add_argument("--serializer", choices=("json", "pickle"), default="json")
    parser.add_argument("--mode", choices=("sync", "async"), default="sync")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--prefix", default="rcache")
    args = parser.parse_args()

    sys.path[:0] = [str(args.tests_dir), str(HERE)]
    import django
    from django.conf import settings

    backend = (
        "rcache.django.RCacheBackend"
        if args.mode == "sync"
        else "async_driven.AsyncDrivenBackend"
    )
    params: dict[str, Any] = {
        "BACKEND": backend,
        "LOCATION": args.url,
        "OPTIONS": {
            "serializer": args.serializer,
            "on_backend_error": "raise",
            # runs sharing a server (the cluster has one database) keep apart
            "prefix": args.prefix,
        },
    }
    settings.configure(
        SECRET_KEY="rcache-django-suite-" + "k" * 40,
        DATABASES={
            "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}
        },
        INSTALLED_APPS=["cache"],
        CACHES={"default": params},
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        USE_TZ=False,
    )
    django.setup()

    from cache.tests import BaseCacheTests, caches_setting_for_tests
    from django.test import TestCase, override_settings
    from django.test.runner import DiscoverRunner
    from skips import for_run

    skips = for_run(args.serializer, args.mode)
    missing = sorted(n for n in skips if not hasattr(BaseCacheTests, n))
    attrs: dict[str, Any] = {
        name: unittest.skip(reason)(getattr(BaseCacheTests, name))
        for name, reason in skips.items()
        if name not in missing
    }
    cls = override_settings(
        CACHES=caches_setting_for_tests(base=params, exclude={"cull", "zero_cull"})
    )(type("RCacheBackendTests", (BaseCacheTests, TestCase), attrs))

    runner = DiscoverRunner(verbosity=0, interactive=False)
    runner.setup_test_environment()
    old_config = runner.setup_databases()
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(cls)
    started = time.perf_counter()
    result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(suite)
    seconds = time.perf_counter() - started
    runner.teardown_databases(old_config)
    runner.teardown_test_environment()

    def name(test: Any) -> str:
        return str(test.id()).rsplit(".", 1)[-1]

    def tracebacks(items: list[tuple[Any, str]]) -> dict[str, str]:
        return {str(t): tb for t, tb in items}

    report = {
        "django": django.get_version(),
        "mode": args.mode,
        "serializer": args.serializer,
        "ran": result.testsRun,
        "all_tests": sorted(n for n in dir(BaseCacheTests) if n.startswith("test_")),
        "failures": tracebacks(result.failures),
        "errors": tracebacks(result.errors),
        "unexpected_successes": [str(t) for t in result.unexpectedSuccesses],
        "skipped": {name(t): reason for t, reason in result.skipped},
        "skip_list_not_in_django": missing,
        "seconds": round(seconds, 2),
    }
    args.out.write_text(json.dumps(report, indent=1))
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
