"""Where the examples find Redis: $REDIS_URL, else a throwaway redis-server, else memory://."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator


@contextlib.contextmanager
def redis_url(*, memory_ok: bool = True) -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    if shutil.which("redis-server"):
        from rcache.testing import RedisServer

        with RedisServer() as server:
            print(f"(started a throwaway redis-server at {server.url})")
            yield server.url
        return
    if not memory_ok:
        raise SystemExit(
            "this example needs redis-server: apt-get install redis-server"
        )
    print("(no redis-server found: using the embedded memory:// backend)")
    yield "memory://"
