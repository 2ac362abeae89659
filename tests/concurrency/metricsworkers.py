"""Processes for the multiprocess metrics tests (run as a script, or as a gunicorn app).

``PROMETHEUS_MULTIPROC_DIR`` must be in the environment before prometheus_client is
imported, so every role here is a fresh process started with it set:

    python metricsworkers.py worker REDIS_URL WORKER_ID CALLS HOLD
        cached traffic with keys of its own (CALLS misses then CALLS hits), one explicit
        set/get, the contended lock "mp.lock" once, and with HOLD=1 a lock it exits
        holding (metrics name "mp.hold"); prints "done".
    python metricsworkers.py exporter
        start_http_server(0) over the directory; prints the port, serves until stdin
        closes.
    gunicorn metricsworkers:app
        GET /work?i=N runs a cached call; GET /metrics serves the summed metrics.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import rcache
from rcache.metrics import PrometheusMetrics, make_wsgi_app, start_http_server


def worker(url: str, worker_id: int, calls: int, hold: bool) -> None:
    metrics = PrometheusMetrics()
    cache = rcache.Cache(url, prefix="mp", name="mpcache", metrics=metrics)

    @cache.cached(ttl=60, name="mp.fn")
    def fn(worker: int, i: int) -> int:
        return worker * 1000 + i

    for i in range(calls):
        assert fn(worker_id, i) == worker_id * 1000 + i  # miss
    for i in range(calls):
        assert fn(worker_id, i) == worker_id * 1000 + i  # hit
    cache.set(f"explicit:{worker_id}", worker_id, ttl=60)
    assert cache.get(f"explicit:{worker_id}") == worker_id
    # Contended: every worker takes the same lock once (generous timeout: all succeed).
    with cache.lock("mp.lock", ttl=10, timeout=30):
        pass
    if hold:
        # Exit while holding: the live gauge keeps counting this process until its
        # death is recorded (mark_process_dead); the lease itself expires by its TTL.
        held = cache.lock(f"mp.hold.{worker_id}", ttl=30, metrics_name="mp.hold")
        assert held.acquire(timeout=5)
    cache.close()
    print("done", flush=True)


def exporter() -> None:
    server = start_http_server(0)
    print(server.port, flush=True)
    sys.stdin.read()  # serve until the test closes our stdin
    server.close()


# -- gunicorn app: one cache per worker process, metrics summed over all of them ---------

_state: dict[str, Any] = {}


def _cached() -> Any:
    if "fn" not in _state:
        metrics = PrometheusMetrics()
        cache = rcache.Cache(
            os.environ["RCACHE_TEST_REDIS_URL"],
            prefix="gu",
            name="gucache",
            metrics=metrics,
        )

        @cache.cached(ttl=60, name="gu.fn")
        def fn(i: int) -> int:
            return i * 2

        _state["fn"] = fn
        _state["metrics_app"] = make_wsgi_app()
    return _state["fn"]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    fn = _cached()
    if environ["PATH_INFO"] == "/metrics":
        result: Iterable[bytes] = _state["metrics_app"](environ, start_response)
        return result
    i = int(environ["QUERY_STRING"].split("=", 1)[1])
    body = f"{fn(i)} {os.getpid()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1")
    elif role == "exporter":
        exporter()
    else:
        raise SystemExit(f"unknown role {role!r}")
