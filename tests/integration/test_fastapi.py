"""rcache.fastapi: lifespan, dependency, cached responses, /metrics; and the example app
under a real uvicorn process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

import rcache
import rcache.fastapi
from rcache import ConfigurationError
from rcache.metrics import PrometheusMetrics
from rcache.testing import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


class Item(BaseModel):
    id: int
    name: str
    tags: list[str] = []


@dataclasses.dataclass
class Stock:
    sku: str
    count: int


def make_app(redis_url: str) -> tuple[FastAPI, rcache.Cache, Counter[str]]:
    cache = rcache.Cache()  # import-time shape: configured by the lifespan
    calls: Counter[str] = Counter()
    app = FastAPI(lifespan=rcache.fastapi.lifespan(cache, url=redis_url, prefix="fa"))
    cached = rcache.fastapi.cached_response

    @app.get("/items/{item_id}")
    @cached(cache, ttl=60)
    async def item(item_id: int, q: str | None = None, limit: int = 10) -> Item:
        calls["item"] += 1
        return Item(id=item_id, name=f"{q}:{limit}:{calls['item']}")

    @app.get("/list")
    @cached(cache, ttl=60, vary=["Accept-Language"])
    async def listing(request: Request) -> list[Item]:
        calls["list"] += 1
        lang = request.headers.get("accept-language", "en")
        return [Item(id=1, name=f"{lang}{calls['list']}")]

    @app.get("/stock")
    @cached(cache, ttl=60)
    async def stock() -> Stock:
        calls["stock"] += 1
        return Stock("a", calls["stock"])

    @app.get("/raw/{code}")
    @cached(cache, ttl=60)
    async def raw(code: int) -> PlainTextResponse:
        calls[f"raw{code}"] += 1
        return PlainTextResponse(
            f"{code} #{calls[f'raw{code}']}", status_code=code, headers={"X-Kind": "k"}
        )

    @app.get("/missing")
    @cached(cache, ttl=60)
    async def missing() -> Item:
        calls["missing"] += 1
        raise HTTPException(404, "nope")

    @app.get("/nostore")
    @cached(cache, ttl=60)
    async def nostore() -> JSONResponse:
        calls["nostore"] += 1
        return JSONResponse(
            {"n": calls["nostore"]}, headers={"Cache-Control": "no-store"}
        )

    @app.get("/cookie")
    @cached(cache, ttl=60)
    async def cookie() -> JSONResponse:
        calls["cookie"] += 1
        response = JSONResponse({"n": calls["cookie"]})
        response.set_cookie("sid", str(calls["cookie"]))
        return response

    @app.get("/dep")
    async def dep(c: rcache.fastapi.CacheDep) -> dict[str, str]:
        return {"prefix": c.prefix}

    return app, cache, calls


@pytest.fixture
def api(redis_url: str) -> Iterator[tuple[TestClient, rcache.Cache, Counter[str]]]:
    app, cache, calls = make_app(redis_url)
    with TestClient(app) as client:
        yield client, cache, calls


def test_lifespan_configures_and_dependency_serves_the_cache(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RCACHE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    app, cache, _ = make_app(redis_url)
    assert cache.prefix == "rcache"  # nothing happened at construction
    with TestClient(app) as client:
        assert client.get("/dep").json() == {"prefix": "fa"}
        client.get("/items/1")
        assert any(k.startswith(b"fa:c:view:") for k in redis_client.scan_iter("fa:*"))
    with TestClient(app) as client:  # a second start-up: same settings, no error
        assert client.get("/items/1").status_code == 200


def test_pydantic_model_round_trips(api: Any) -> None:
    client, _, calls = api
    first = client.get("/items/7?q=x")
    second = client.get("/items/7?q=x")
    assert first.json() == second.json() == {"id": 7, "name": "x:10:1", "tags": []}
    assert calls["item"] == 1
    assert client.get("/stock").json() == client.get("/stock").json()
    assert calls["stock"] == 1


def test_query_string_is_part_of_the_key(api: Any) -> None:
    client, _, calls = api
    a = client.get("/items/1?q=a&limit=2").json()
    b = client.get("/items/1?q=b&limit=2").json()
    a2 = client.get("/items/1?limit=2&q=a").json()  # the same pairs, another order
    assert a != b and a2 == a
    assert calls["item"] == 2


def test_vary_headers_are_part_of_the_key(api: Any) -> None:
    client, _, calls = api
    en = client.get("/list", headers={"Accept-Language": "en"}).json()
    nb = client.get("/list", headers={"Accept-Language": "nb"}).json()
    assert client.get("/list", headers={"Accept-Language": "en"}).json() == en
    assert en[0]["name"] == "en1" and nb[0]["name"] == "nb2"
    client.get("/list", headers={"Accept-Language": "en", "X-Other": "1"})
    assert calls["list"] == 2


def test_responses_replayed_with_status_and_headers(api: Any) -> None:
    client, _, calls = api
    first = client.get("/raw/201")
    second = client.get("/raw/201")
    assert calls["raw201"] == 1
    assert second.status_code == 201
    assert second.text == first.text == "201 #1"
    assert second.headers["x-kind"] == "k"
    assert second.headers["content-type"] == first.headers["content-type"]


def test_non_2xx_no_store_and_cookies_are_not_cached(api: Any) -> None:
    client, _, calls = api
    assert [client.get("/raw/404").text for _ in range(2)] == ["404 #1", "404 #2"]
    assert [client.get("/missing").status_code for _ in range(2)] == [404, 404]
    assert calls["missing"] == 2
    assert [client.get("/nostore").json()["n"] for _ in range(2)] == [1, 2]
    assert [client.get("/cookie").json()["n"] for _ in range(2)] == [1, 2]
    # a request saying no-store neither reads nor fills the cache
    assert client.get("/items/3").json()["name"].endswith(":1")
    bypass = client.get("/items/3", headers={"Cache-Control": "no-store"})
    assert bypass.json()["name"].endswith(":2")
    assert client.get("/items/3").json()["name"].endswith(":1")


def test_openapi_signature_is_kept(api: Any) -> None:
    client, _, _ = api
    schema = client.get("/openapi.json").json()
    op = schema["paths"]["/items/{item_id}"]["get"]
    assert [p["name"] for p in op["parameters"]] == ["item_id", "q", "limit"]
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/Item"}
    assert "rcache_request" not in json.dumps(schema)
    assert "/metrics" not in schema["paths"]


def test_decoration_errors() -> None:
    cache = rcache.Cache("memory://")
    with pytest.raises(ConfigurationError, match="async def"):

        @rcache.fastapi.cached_response(cache, ttl=5)
        def sync() -> dict[str, int]:
            return {}

    class Opaque:
        pass

    with pytest.raises(ConfigurationError, match="Opaque"):

        @rcache.fastapi.cached_response(cache, ttl=5)
        async def opaque() -> Opaque:
            return Opaque()

    with pytest.raises(ConfigurationError, match="fixed names"):
        rcache.fastapi.cached_response(cache, ttl=5, tags=["item:{id}"])


def test_starlette_endpoint_and_ttl_from_the_lifespan(
    redis_url: str, redis_client: redis.Redis
) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Route

    cache = rcache.Cache()
    calls: list[str] = []

    @rcache.fastapi.cached_response(cache)  # no ttl yet: the lifespan brings it
    async def homepage(request):  # type: ignore[no-untyped-def]  # a plain Starlette one
        calls.append(request.query_params.get("q", ""))
        return PlainTextResponse(f"hi {request.query_params.get('q')}")

    app = Starlette(
        routes=[Route("/", homepage)],
        lifespan=rcache.fastapi.lifespan(cache, url=redis_url, prefix="st", ttl=90),
    )
    with TestClient(app) as client:
        assert client.get("/?q=a").text == client.get("/?q=a").text == "hi a"
        assert client.get("/?q=b").text == "hi b"
    assert calls == ["a", "b"]
    [key, *_] = [
        k for k in redis_client.scan_iter("st:c:view:*") if not k.endswith(b":ready")
    ]
    assert 60 < redis_client.ttl(key) <= 90


def test_get_cache_without_lifespan_says_what_to_write() -> None:
    app = FastAPI()

    @app.get("/")
    async def root(c: rcache.fastapi.CacheDep) -> str:
        return c.prefix

    with (
        TestClient(app) as client,
        pytest.raises(ConfigurationError, match="lifespan"),
    ):
        client.get("/")


def test_metrics_route_does_not_redirect(redis_url: str) -> None:
    registry = CollectorRegistry()
    cache = rcache.Cache(redis_url, prefix="fam", metrics=PrometheusMetrics(registry))
    app = FastAPI(lifespan=rcache.fastapi.lifespan(cache))
    rcache.fastapi.serve_metrics(app, registry=registry)

    @app.get("/")
    @rcache.fastapi.cached_response(cache, ttl=60, name="home")
    async def home() -> dict[str, str]:
        return {"home": "yes"}

    with TestClient(app, follow_redirects=False) as client:
        client.get("/")
        client.get("/")
        for path in ("/metrics", "/metrics/"):
            r = client.get(path)
            assert r.status_code == 200
            assert 'rcache_cache_gets_total{cache="home",result="hit"} 1.0' in r.text


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read()
        ctype = r.headers.get("content-type", "")
        return r.status, json.loads(body) if "json" in ctype else body.decode()


@pytest.mark.slow
def test_example_app_under_uvicorn(redis_url: str, redis_client: redis.Redis) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "REDIS_URL": redis_url, "EXAMPLE_SLOW_QUERY": "0.3"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "examples.fastapi_app:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def ready() -> bool:
            try:
                return _get(f"{base}/openapi.json")[0] == 200
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, (
                    server.stderr.read() if server.stderr else ""
                )
                return False

        wait_until(ready, timeout=30, message="uvicorn to answer")
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            status, body = _get(f"{base}/items/2")
            timings.append(time.perf_counter() - start)
            assert (
                status == 200
                and body["name"] == "Designing Data-Intensive Applications"
            )
        assert timings[0] >= 0.3 > timings[1]  # the slow query ran once
        assert _get(f"{base}/search?q=book")[1] != _get(f"{base}/search?q=game")[1]
        status, text = _get(f"{base}/metrics")  # no redirect to /metrics/
        assert status == 200 and "rcache_cache_gets_total" in text
        assert any(redis_client.scan_iter("api:c:*"))  # the lifespan's prefix
    finally:
        server.terminate()
        server.wait(30)
        if server.stderr is not None:
            server.stderr.close()
