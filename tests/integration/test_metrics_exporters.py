"""The exporters as users mount them: Starlette/FastAPI routes, HTTPS, the loopback default.

Each test has its own ``CollectorRegistry`` and real cache traffic against the session's
redis-server.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import rcache
from rcache import ConfigurationError
from rcache.metrics import PrometheusMetrics, make_asgi_app, start_http_server


def hits(text: str, cache: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (
                s.name == "rcache_cache_gets_total"
                and s.labels.get("cache") == cache
                and s.labels.get("result") == "hit"
            ):
                return float(s.value)
    raise AssertionError(f"no hit series for {cache}")


@pytest.fixture
def traffic(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CollectorRegistry]:
    """A registry with one hit of cache "ex" in it."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    registry = CollectorRegistry()
    cache = rcache.Cache(
        redis_url, prefix="ex", metrics=PrometheusMetrics(registry=registry)
    )
    cache.set("k", 1, ttl=10)
    assert cache.get("k") == 1
    yield registry
    cache.close()


def _home(request: object) -> PlainTextResponse:
    return PlainTextResponse("shop")


def test_starlette_add_route_answers_metrics_with_and_without_slash(
    traffic: CollectorRegistry,
) -> None:
    app = Starlette(routes=[Route("/", _home)])
    app.add_route("/metrics", make_asgi_app(traffic))  # as the README says
    with TestClient(app) as client:
        plain = client.get("/metrics", follow_redirects=False)
        assert plain.status_code == 200, plain.status_code  # no 307
        assert hits(plain.text, "ex") == 1
        slash = client.get("/metrics/")  # redirected to /metrics, then served
        assert slash.status_code == 200
        assert hits(slash.text, "ex") == 1
        assert client.get("/").text == "shop"  # the app's own routes are untouched


def test_starlette_mount_redirects_the_bare_path(traffic: CollectorRegistry) -> None:
    """Why the README says add_route: a mount answers /metrics with a 307."""
    app = Starlette()
    app.mount("/metrics", make_asgi_app(traffic))
    with TestClient(app) as client:
        assert client.get("/metrics/").status_code == 200
        bare = client.get("/metrics", follow_redirects=False)
        assert bare.status_code == 307


def test_start_http_server_binds_loopback_by_default(
    traffic: CollectorRegistry,
) -> None:
    with start_http_server(0, registry=traffic) as server:
        assert server.host == "127.0.0.1"
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=10) as response:
            assert hits(response.read().decode(), "ex") == 1
    with pytest.raises(OSError):  # closed: nothing listens any more
        urllib.request.urlopen(server.url, timeout=2)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_start_http_server_serves_https(
    traffic: CollectorRegistry, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    with start_http_server(
        0, registry=traffic, certfile=str(cert), keyfile=str(key)
    ) as server:
        assert server.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(server.url, timeout=10, context=context) as resp:
            assert hits(resp.read().decode(), "ex") == 1
        # plain HTTP is refused by a TLS server
        with pytest.raises(OSError):
            urllib.request.urlopen(server.url.replace("https", "http"), timeout=5)


def test_https_needs_both_files(traffic: CollectorRegistry) -> None:
    with pytest.raises(ConfigurationError, match="certfile= and keyfile="):
        start_http_server(0, registry=traffic, certfile="cert.pem")
