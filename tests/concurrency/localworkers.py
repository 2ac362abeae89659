"""A process with a local tier, driven line by line on stdin (tests/concurrency).

    python localworkers.py REDIS_URL

Commands (one per line; each answers one line on stdout):
    load KEY        read KEY until this process holds it locally     -> "ok"
    watch KEY       poll until the local entry of KEY is gone       -> "gone <t>"
    write KEY VAL   cache.set(KEY, VAL)                             -> "wrote <t0> <t1>"
    quit

Times are ``time.monotonic()``, one clock for every process of the machine (Linux
CLOCK_MONOTONIC): ``t0`` before the write is sent, ``t1`` after Redis acknowledged it,
``t`` when the watcher saw its entry dropped.
"""

from __future__ import annotations

import sys
import time

import rcache
from rcache._local import MISSING


def main(url: str) -> None:
    cache = rcache.Cache(url, prefix="mp", ttl=60, local=True)
    tier = cache._local_tier(cache._local_option(True))
    assert tier is not None
    tier.listener.guard.ready.wait(10)
    store = tier.store
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "load":
            deadline = time.monotonic() + 10
            while store.get(args[0]) is MISSING and time.monotonic() < deadline:
                cache.get(args[0])
            print("ok" if store.get(args[0]) is not MISSING else "no", flush=True)
        elif cmd == "watch":
            print("watching", flush=True)
            deadline = time.monotonic() + 5
            while store.get(args[0]) is not MISSING and time.monotonic() < deadline:
                time.sleep(0.00005)  # lets the listener thread take the GIL
            print(f"gone {time.monotonic()!r}", flush=True)
        elif cmd == "write":
            t0 = time.monotonic()
            cache.set(args[0], args[1])
            print(f"wrote {t0!r} {time.monotonic()!r}", flush=True)
        elif cmd == "quit":
            break
    cache.close()


if __name__ == "__main__":
    main(sys.argv[1])
