"""Flask integration (extra ``rcache-redis[flask]``): configuration from ``app.config``,
view caching keyed on the request, and ``/metrics`` in one line.

::

    import rcache
    from flask import Flask
    from rcache.flask import FlaskCache

    cache = FlaskCache()  # at import time; its .cache is an rcache.Cache

    def create_app() -> Flask:
        app = Flask(__name__)
        app.config["RCACHE_URL"] = "redis://127.0.0.1:6379/0"
        cache.init_app(app)
        ...

    @app.get("/search")
    @cache.cached_view(ttl="5m", vary=["Accept-Language"])
    def search(): ...

``init_app`` reads these ``app.config`` keys, each optional (the ``Cache`` parameter of
the same name): ``RCACHE_URL``, ``RCACHE_PREFIX``, ``RCACHE_TTL``,
``RCACHE_SERIALIZER``, ``RCACHE_ON_BACKEND_ERROR``, ``RCACHE_REDIS_OPTIONS``,
``RCACHE_NAME``, ``RCACHE_LOCK_URL``. Without ``RCACHE_URL`` the URL comes from
``$RCACHE_URL`` or ``$REDIS_URL`` at first use.

Which requests and responses are cached, and how a request becomes a key, is the same
for every framework (``rcache._http``): ``GET``/``HEAD`` only, keyed on the method, the
path, the sorted query string and the headers named in ``vary=``; stored only for 2xx
responses without ``Set-Cookie`` or ``Cache-Control: no-store``/``private``; a request
with ``Cache-Control: no-store`` bypasses the cache. Status, headers and body are
stored. Concurrent misses of one key share one computation, as with ``@cache.cached``.

Use it for views whose response depends only on the request's path, query string and
the headers named in ``vary=``: not for views that read the session or the user.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import flask

from rcache._cache import Cache
from rcache._config import BackendErrorPolicy, Duration
from rcache._exceptions import ConfigurationError
from rcache._http import (
    check_metrics_path,
    check_view_options,
    lazy_cached,
    request_cacheable,
    request_signature,
    response_cacheable,
    stored_headers,
)
from rcache._keys import qualified_name

__all__ = ["CONFIG_KEYS", "FlaskCache", "serve_metrics"]

F = TypeVar("F", bound=Callable[..., Any])

CONFIG_KEYS = {
    "RCACHE_URL": "url",
    "RCACHE_PREFIX": "prefix",
    "RCACHE_TTL": "ttl",
    "RCACHE_SERIALIZER": "serializer",
    "RCACHE_ON_BACKEND_ERROR": "on_backend_error",
    "RCACHE_REDIS_OPTIONS": "redis_options",
    "RCACHE_NAME": "name",
    "RCACHE_LOCK_URL": "lock_url",
}
"""The ``app.config`` keys ``init_app`` reads, and the ``Cache.configure`` parameter
each one sets."""


class _Call:
    """One request's view arguments, and its response when that is not to be cached
    (ignored by the key: see ``FlaskCache.cached_view``)."""

    __slots__ = ("args", "kwargs", "response")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args = args
        self.kwargs = kwargs
        self.response: flask.Response | None = None


class FlaskCache:
    """A Flask extension around an :class:`rcache.Cache`.

    :param cache: the cache to configure and use; default a new ``rcache.Cache()``,
        configured by :meth:`init_app`.
    :param app: call :meth:`init_app` on it now (single-app style).
    """

    def __init__(self, cache: Cache | None = None, app: flask.Flask | None = None):
        self.cache = cache if cache is not None else Cache()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Configure the cache from ``app.config`` (keys in :data:`CONFIG_KEYS`).

        :raises ConfigurationError: an unknown ``RCACHE_*`` key (a typo), an invalid
            value, or settings that differ from those the cache already uses.
        """
        unknown = sorted(
            k for k in app.config if k.startswith("RCACHE_") and k not in CONFIG_KEYS
        )
        if unknown:
            raise ConfigurationError(
                f"unknown app.config keys {unknown}: rcache reads {sorted(CONFIG_KEYS)}"
            )
        options = {
            param: app.config[key]
            for key, param in CONFIG_KEYS.items()
            if app.config.get(key) is not None
        }
        self.cache.configure(**options)
        app.extensions["rcache"] = self

    def cached_view(
        self,
        ttl: Duration | None = None,
        *,
        vary: Iterable[str] = (),
        name: str | None = None,
        tags: Iterable[str] = (),
        on_backend_error: BackendErrorPolicy | None = None,
        stampede: bool = True,
    ) -> Callable[[F], F]:
        """Cache a (sync) view's responses; put it below ``@app.get(...)``.

        :param ttl: how long a response is kept (default: the cache's ttl).
        :param vary: request headers whose values are part of the key, such as
            ``["Accept-Language"]`` (``Cookie`` and ``Authorization`` work but make
            an entry per user).
        :param name: the name in keys and metrics (default ``view:module.qualname``).
        :param tags: fixed tag names, so that ``cache.invalidate_tags("products")``
            drops these responses.
        :param on_backend_error: override the cache's policy; :param stampede: share
            one computation per key (default True).

        The decorated view gets ``invalidate_all()`` (drop all its responses).

        :raises ConfigurationError: at decoration time, for an ``async def`` view, a
            bad ttl, vary or tag; at the first request, when neither ``ttl=`` nor the
            cache (``RCACHE_TTL``) gives a ttl.
        """
        vary_names, tag_list = check_view_options(
            ttl, vary, tags, "cached_view", "products"
        )

        def decorate(view: F) -> F:
            if inspect.iscoroutinefunction(view):
                raise ConfigurationError(
                    f"cached_view decorates sync Flask views; {qualified_name(view)} is "
                    "async: for async frameworks use rcache.fastapi.cached_response"
                )
            label = name or f"view:{qualified_name(view)}"

            def render(signature: str, call: _Call) -> dict[str, Any] | None:
                response = flask.make_response(view(*call.args, **call.kwargs))
                headers = list(response.headers.items())
                if response.is_streamed or not response_cacheable(
                    response.status_code, headers
                ):
                    call.response = response  # served to this caller, not stored
                    return None
                return {
                    "s": response.status_code,
                    "h": stored_headers(headers),
                    "b": response.get_data(),
                }

            cached_render = lazy_cached(
                self.cache,
                render,
                ttl=ttl,
                label=label,
                tags=tag_list,
                on_backend_error=on_backend_error,
                stampede=stampede,
            )

            @functools.wraps(view)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                request = flask.request
                if not request_cacheable(
                    request.method, request.headers.get("Cache-Control")
                ):
                    return view(*args, **kwargs)
                signature = request_signature(
                    request.method,
                    request.path,
                    request.args.items(multi=True),
                    request.headers.get,
                    vary_names,
                )
                call = _Call(args, kwargs)
                payload = cached_render.get()(signature, call)
                if payload is None:
                    # not cacheable; a caller that shared another's computation of it
                    # has no response of its own yet
                    if call.response is not None:
                        return call.response
                    return view(*args, **kwargs)
                return flask.Response(
                    payload["b"], status=payload["s"], headers=payload["h"]
                )

            def invalidate_all() -> bool:
                """Drop every cached response of this view (O(1))."""
                return bool(cached_render.get().invalidate_all())

            wrapper.invalidate_all = invalidate_all  # type: ignore[attr-defined]
            return wrapper  # type: ignore[return-value]

        return decorate


def serve_metrics(
    app: flask.Flask, path: str = "/metrics", registry: Any = None
) -> None:
    """Serve rcache's Prometheus metrics at ``path`` (extra ``prometheus`` too).

    Multiprocess-aware under gunicorn (see ``rcache.metrics.export_registry``); the
    path answers without a redirect, with or without a trailing slash.
    """
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    from rcache.metrics import make_wsgi_app

    check_metrics_path(path)
    app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, {path.rstrip("/"): make_wsgi_app(registry)}
    )
