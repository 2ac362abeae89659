"""rcache.testing.RedisServer cleans up after a test that forgot to."""

from __future__ import annotations

import subprocess
import sys

import redis

from rcache.testing import wait_until


def test_server_is_killed_when_its_owner_exits_without_close() -> None:
    code = (
        "from rcache.testing import RedisServer\n"
        "s = RedisServer().start()\n"
        "print(s.port)\n"
        "raise SystemExit(0)  # no close()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    port = int(out.stdout.strip())
    client = redis.Redis(port=port, socket_connect_timeout=0.5)

    def gone() -> bool:
        try:
            client.ping()
        except redis.ConnectionError:
            return True
        return False

    wait_until(gone, timeout=10, message="the orphaned redis-server to be gone")
    client.close()
