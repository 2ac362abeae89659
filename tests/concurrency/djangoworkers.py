"""Worker for test_django_processes.py: ``incr`` a shared counter N times.

    python djangoworkers.py URL N [atomic|naive]

Prints every value incr() returned, one per line. ``naive`` uses Django's generic
BaseCache.incr (get, then set): the guard switched off, to show the test can fail.
"""

from __future__ import annotations

import sys

from django.conf import settings

settings.configure(SECRET_KEY="rcache-worker-" + "w" * 40)

from django.core.cache.backends.base import BaseCache  # noqa: E402

from rcache.django import RCacheBackend  # noqa: E402


def main() -> None:
    url, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cache = RCacheBackend(url, {"OPTIONS": {"on_backend_error": "raise"}})
    incr = cache.incr if mode == "atomic" else lambda k: BaseCache.incr(cache, k)
    out = [str(incr("counter")) for _ in range(n)]
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    main()
