"""rcache.flask: init_app from app.config, view caching keyed on the request, /metrics.

Flask's test client against the session's real redis-server; one test runs the app
under a real gunicorn with two worker processes, where sharing the cache between
processes is the point.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask, jsonify, make_response, request
from prometheus_client import CollectorRegistry

import rcache
from rcache import ConfigurationError
from rcache.flask import FlaskCache, serve_metrics
from rcache.metrics import PrometheusMetrics
from rcache.testing import free_port, wait_until


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RCACHE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)


def make_app(redis_url: str) -> tuple[Flask, FlaskCache, Counter[str]]:
    """The app-factory shape: extension and views exist before init_app."""
    ext = FlaskCache()
    calls: Counter[str] = Counter()
    app = Flask("t")

    @app.get("/search")
    @ext.cached_view(ttl=60)
    def search() -> Any:
        calls["search"] += 1
        return jsonify(q=request.args.get("q"), n=calls["search"])

    @app.get("/hello/<name>")
    @ext.cached_view(ttl=60, vary=["Accept-Language"])
    def hello(name: str) -> Any:
        calls["hello"] += 1
        lang = request.headers.get("Accept-Language", "en")
        return f"{'hei' if lang == 'nb' else 'hello'} {name} {calls['hello']}"

    @app.route("/status/<int:code>", methods=["GET", "POST"])
    @ext.cached_view(ttl=60)
    def status(code: int) -> Any:
        calls[f"status{code}"] += 1
        resp = make_response(f"code {code} #{calls[f'status{code}']}", code)
        resp.headers["X-Kind"] = "made"
        return resp

    @app.get("/nostore")
    @ext.cached_view(ttl=60)
    def nostore() -> Any:
        calls["nostore"] += 1
        resp = make_response(str(calls["nostore"]))
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.get("/cookie")
    @ext.cached_view(ttl=60)
    def cookie() -> Any:
        calls["cookie"] += 1
        resp = make_response(str(calls["cookie"]))
        resp.set_cookie("session", f"user{calls['cookie']}")
        return resp

    app.config.update(RCACHE_URL=redis_url, RCACHE_PREFIX="fl", RCACHE_TTL=30)
    ext.init_app(app)
    return app, ext, calls


@pytest.fixture
def flask_app(redis_url: str) -> Iterator[tuple[Flask, FlaskCache, Counter[str]]]:
    app, ext, calls = make_app(redis_url)
    yield app, ext, calls
    ext.cache.close()


def test_init_app_configures_a_cache_made_at_import(
    no_env: None, redis_url: str, redis_client: redis.Redis
) -> None:
    app, ext, _ = make_app(redis_url)
    assert app.extensions["rcache"] is ext
    assert ext.cache.prefix == "fl" and ext.cache.default_ttl == 30
    assert app.test_client().get("/search?q=a").status_code == 200
    keys = [k.decode() for k in redis_client.scan_iter("fl:c:view:*")]
    entries = [k for k in keys if not k.endswith(":ready")]  # + the wake-up list
    assert len(entries) == 1 and "search" in entries[0]
    ext.init_app(app)  # the same config again (a second app, a test): fine
    other = Flask("other")
    other.config["RCACHE_PREFIX"] = "changed"
    with pytest.raises(ConfigurationError, match="already in use"):
        ext.init_app(other)
    ext.cache.close()


def test_unknown_config_key_is_an_error(redis_url: str) -> None:
    app = Flask("typo")
    app.config["RCACHE_PREFX"] = "oops"
    with pytest.raises(ConfigurationError, match=r"RCACHE_PREFX.*RCACHE_PREFIX"):
        FlaskCache(rcache.Cache(redis_url), app)


def test_query_string_is_part_of_the_key(flask_app: Any) -> None:
    app, _, calls = flask_app
    client = app.test_client()
    a1 = client.get("/search?q=a&page=1").get_json()
    b = client.get("/search?q=b&page=1").get_json()
    a2 = client.get("/search?page=1&q=a").get_json()  # same pairs, other order
    assert a1 == {"q": "a", "n": 1} and b == {"q": "b", "n": 2}
    assert a2 == a1
    assert calls["search"] == 2
    client.get("/search")
    client.get("/search?q=")
    assert calls["search"] == 4  # no query and an empty q are two more keys


def test_vary_headers_are_part_of_the_key(flask_app: Any) -> None:
    app, _, calls = flask_app
    client = app.test_client()
    en = client.get("/hello/ada", headers={"Accept-Language": "en"}).get_data(True)
    nb = client.get("/hello/ada", headers={"Accept-Language": "nb"}).get_data(True)
    en2 = client.get("/hello/ada", headers={"Accept-Language": "en"}).get_data(True)
    assert (en, nb, en2) == ("hello ada 1", "hei ada 2", "hello ada 1")
    # a header not named in vary= does not split entries
    client.get("/hello/ada", headers={"Accept-Language": "en", "X-Other": "1"})
    assert calls["hello"] == 2


def test_status_headers_and_body_are_replayed(flask_app: Any) -> None:
    app, _, calls = flask_app
    client = app.test_client()
    first = client.get("/status/201")
    second = client.get("/status/201")
    assert calls["status201"] == 1
    assert second.status_code == 201
    assert second.headers["X-Kind"] == "made"
    assert second.headers["Content-Type"] == first.headers["Content-Type"]
    assert second.get_data() == first.get_data() == b"code 201 #1"
    head = client.head("/status/201")  # HEAD is served from GET's entry
    assert head.status_code == 201 and head.get_data() == b""
    assert calls["status201"] == 1


def test_non_2xx_and_non_get_are_not_cached(flask_app: Any) -> None:
    app, _, calls = flask_app
    client = app.test_client()
    assert [client.get("/status/404").status_code for _ in range(3)] == [404] * 3
    assert calls["status404"] == 3
    client.get("/status/500")
    client.get("/status/500")
    assert calls["status500"] == 2
    client.post("/status/200")
    client.post("/status/200")
    assert calls["status200"] == 2


def test_no_store_is_honoured(flask_app: Any) -> None:
    app, _, calls = flask_app
    client = app.test_client()
    assert [client.get("/nostore").get_data(True) for _ in range(2)] == ["1", "2"]
    # a request saying no-store neither reads nor fills the cache
    assert client.get("/search?q=z").get_json()["n"] == 1
    bypass = client.get("/search?q=z", headers={"Cache-Control": "no-store"})
    assert bypass.get_json()["n"] == 2
    assert client.get("/search?q=z").get_json()["n"] == 1
    assert calls["search"] == 2


def test_responses_setting_cookies_are_not_cached(flask_app: Any) -> None:
    app, _, _calls = flask_app
    client = app.test_client()
    assert [client.get("/cookie").get_data(True) for _ in range(2)] == ["1", "2"]


def test_invalidate_all_and_tags(redis_url: str) -> None:
    ext = FlaskCache(rcache.Cache(redis_url, prefix="flt"))
    app = Flask("tags")
    n = Counter[str]()

    @app.get("/list")
    @ext.cached_view(ttl=60, tags=["products"])
    def listing() -> Any:
        n["list"] += 1
        return str(n["list"])

    client = app.test_client()
    assert client.get("/list").get_data(True) == client.get("/list").get_data(True)
    ext.cache.invalidate_tags("products")
    assert client.get("/list").get_data(True) == "2"
    listing.invalidate_all()  # type: ignore[attr-defined]
    assert client.get("/list").get_data(True) == "3"
    ext.cache.close()


def test_decoration_errors() -> None:
    ext = FlaskCache(rcache.Cache("memory://"))
    with pytest.raises(ConfigurationError, match="async"):

        @ext.cached_view(ttl=5)
        async def view() -> str:
            return ""

    with pytest.raises(ConfigurationError, match="vary"):
        ext.cached_view(ttl=5, vary="Accept")
    with pytest.raises(ConfigurationError, match="fixed names"):
        ext.cached_view(ttl=5, tags=["product:{id}"])
    with pytest.raises(ConfigurationError, match="ttl"):
        ext.cached_view(ttl="soon")


def test_ttl_from_init_app_reaches_views_decorated_before(
    redis_url: str, redis_client: redis.Redis
) -> None:
    ext = FlaskCache(rcache.Cache(redis_url, prefix="flttl"))
    app = Flask("ttl")
    app.testing = True  # exceptions reach the test instead of becoming a 500

    @app.get("/a")
    @ext.cached_view()  # no ttl yet: RCACHE_TTL comes with init_app
    def a() -> str:
        return "a"

    client = app.test_client()
    with pytest.raises(ConfigurationError, match="no ttl"):
        client.get("/a")  # used before any ttl is known: says what to write
    app.config["RCACHE_TTL"] = "2m"
    ext.init_app(app)
    assert client.get("/a").get_data(True) == "a"
    [key] = [
        k for k in redis_client.scan_iter("flttl:c:view:*") if not k.endswith(b":ready")
    ]
    assert 100 < redis_client.ttl(key) <= 120
    ext.cache.close()


def test_metrics_in_one_line(redis_url: str) -> None:
    registry = CollectorRegistry()
    ext = FlaskCache(
        rcache.Cache(redis_url, prefix="flm", metrics=PrometheusMetrics(registry))
    )
    app = Flask("metrics")

    @app.get("/")
    @ext.cached_view(ttl=60, name="home")
    def home() -> str:
        return "home"

    serve_metrics(app, registry=registry)
    client = app.test_client()
    client.get("/")
    client.get("/")
    for path in ("/metrics", "/metrics/"):
        r = client.get(path)
        assert r.status_code == 200  # no redirect on either form
        text = r.get_data(as_text=True)
        assert 'rcache_cache_gets_total{cache="home",result="hit"} 1.0' in text
    ext.cache.close()


GUNICORN_APP = textwrap.dedent(
    """
    import os
    from flask import Flask
    from rcache.flask import FlaskCache

    cache = FlaskCache()
    app = Flask("gapp")
    app.config["RCACHE_URL"] = os.environ["TEST_REDIS_URL"]
    app.config["RCACHE_PREFIX"] = "gun"
    cache.init_app(app)

    @app.get("/who")
    @cache.cached_view(ttl=60)
    def who():
        return {"computed_by": os.getpid()}

    @app.after_request
    def served_by(response):  # added after the cache: names the answering worker
        response.headers["X-Served-By"] = str(os.getpid())
        return response
    """
)


def _get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.headers["X-Served-By"], r.read()


@pytest.mark.slow
def test_gunicorn_workers_share_cached_views(tmp_path: Path, redis_url: str) -> None:
    (tmp_path / "gapp.py").write_text(GUNICORN_APP)
    port = free_port()
    url = f"http://127.0.0.1:{port}/who"
    env = {**os.environ, "TEST_REDIS_URL": redis_url, "PYTHONPATH": str(tmp_path)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            "2",
            "-b",
            f"127.0.0.1:{port}",
            "gapp:app",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def up() -> bool:
            try:
                _get(url)
            except (urllib.error.URLError, ConnectionError):
                return False
            return True

        wait_until(up, timeout=30, message="gunicorn to answer")
        served: set[str] = set()
        bodies: set[bytes] = set()

        def both_workers_answered() -> bool:
            # concurrent requests: a sync worker serves one at a time, so the other
            # worker takes some of them
            with ThreadPoolExecutor(8) as pool:
                for worker, body in pool.map(lambda _: _get(url), range(16)):
                    served.add(worker)
                    bodies.add(body)
            return len(served) >= 2

        wait_until(both_workers_answered, timeout=30, message="both workers to answer")
        # one worker computed the page; the other served that same entry from Redis
        assert len(bodies) == 1
    finally:
        server.terminate()
        server.wait(30)
