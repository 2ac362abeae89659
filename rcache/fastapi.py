"""FastAPI/Starlette integration (extra ``rcache-redis[fastapi]``): a lifespan that
configures and closes the cache, a dependency, response caching for async endpoints,
and ``/metrics``.

::

    import rcache
    import rcache.fastapi
    from fastapi import FastAPI

    cache = rcache.Cache()  # at import time; configured by the lifespan
    app = FastAPI(lifespan=rcache.fastapi.lifespan(cache, url="redis://127.0.0.1:6379/0"))

    @app.get("/items/{item_id}")
    @rcache.fastapi.cached_response(cache, ttl="5m", vary=["Accept-Language"])
    async def read_item(item_id: int, q: str | None = None) -> Item: ...

``cached_response`` follows the same rules as ``rcache.flask`` (``rcache._http``): only
``GET``/``HEAD``; keyed on method, path, sorted query string and the ``vary`` headers;
a request with ``Cache-Control: no-store`` bypasses the cache. What the endpoint
returns is stored:

* a value (a Pydantic model, a dataclass, a list of them, a dict...): its return
  annotation drives decoding as with ``@cache.cached`` (typed values), so a hit hands
  FastAPI the same model, which its ``response_model`` then renders as on a miss;
* a ``Response``: its status, headers and body, if the status is 2xx and it has no
  ``Set-Cookie`` and no ``Cache-Control: no-store``/``private``; streaming responses
  are never stored.

The endpoint's signature is kept (OpenAPI, dependencies, validation); a ``Request``
parameter is added for the key when the endpoint has none. Headers set on an injected
``response: Response`` parameter are not replayed on a hit: return a ``Response`` for
that. Use it for endpoints whose answer depends only on the request's path, query string
and ``vary`` headers (not on the user, unless ``vary=["Authorization"]``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import struct
import typing
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Annotated, Any, TypeVar

from fastapi import Depends
from fastapi.encoders import jsonable_encoder
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

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
from rcache._serializers import JsonSerializer, Serializer
from rcache._typed import caller_namespace, typed_values

__all__ = [
    "CacheDep",
    "cached_response",
    "get_cache",
    "lifespan",
    "serve_metrics",
]

F = TypeVar("F", bound=Callable[..., Any])
_REQUEST_PARAM = "rcache_request"
_HEADER = struct.Struct("<I")


def lifespan(
    cache: Cache, **settings: Any
) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """A lifespan for ``FastAPI(lifespan=...)``/``Starlette(lifespan=...)``.

    On start-up it applies ``settings`` with :meth:`rcache.Cache.configure` (the same
    settings again, from a second app or test client, are a no-op) and puts the cache
    on ``app.state.rcache`` for :func:`get_cache`; on shut-down it closes the cache's
    clients. To combine it with your own lifespan, enter it inside yours:
    ``async with rcache.fastapi.lifespan(cache)(app): yield``.
    """

    @contextlib.asynccontextmanager
    async def manage(app: Any) -> AsyncIterator[None]:
        if settings:
            cache.configure(**settings)
        app.state.rcache = cache
        try:
            yield
        finally:
            await cache.aclose()
            cache.close()

    return manage


def get_cache(request: Request) -> Cache:
    """A dependency: the cache the app's :func:`lifespan` installed."""
    cache = getattr(request.app.state, "rcache", None)
    if not isinstance(cache, Cache):
        raise ConfigurationError(
            "no rcache.Cache on app.state: create the app with "
            "FastAPI(lifespan=rcache.fastapi.lifespan(cache, ...))"
        )
    return cache


CacheDep = Annotated[Cache, Depends(get_cache)]
"""The cache as an endpoint parameter: ``async def f(cache: rcache.fastapi.CacheDep)``
(the :func:`get_cache` dependency)."""


class _Call:
    """One request's endpoint arguments and, when not stored, its result."""

    __slots__ = ("args", "kwargs", "result", "returned")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args = args
        self.kwargs = kwargs
        self.result: Any = None
        self.returned = False


def _returns_response(annotation: Any) -> bool:
    """``-> Response``, ``-> HTMLResponse`` or a union with one."""
    if isinstance(annotation, type):
        return issubclass(annotation, Response)
    return any(_returns_response(a) for a in typing.get_args(annotation))


def cached_response(
    cache: Cache,
    ttl: Duration | None = None,
    *,
    vary: Iterable[str] = (),
    name: str | None = None,
    tags: Iterable[str] = (),
    on_backend_error: BackendErrorPolicy | None = None,
    stampede: bool = True,
) -> Callable[[F], F]:
    """Cache an ``async def`` endpoint's answers; put it below ``@app.get(...)``.

    :param ttl: how long an answer is kept (default: the cache's ttl).
    :param vary: request headers whose values are part of the key.
    :param name: the name in keys and metrics (default ``view:module.qualname``).
    :param tags: fixed tag names for ``cache.invalidate_tags(...)``.
    :param on_backend_error: override the cache's policy; :param stampede: share one
        computation per key across tasks and processes (default True).

    The decorated endpoint gets ``invalidate_all()`` (a coroutine).

    :raises ConfigurationError: at decoration time, for a sync endpoint, a return
        annotation that cannot be decoded, a bad ttl, vary or tag; at the first
        request, when neither ``ttl=`` nor the cache (configured by the lifespan)
        gives a ttl.
    """
    vary_names, tag_list = check_view_options(
        ttl, vary, tags, "cached_response", "items"
    )
    localns = caller_namespace()

    def decorate(endpoint: F) -> F:
        label = name or f"view:{qualified_name(endpoint)}"
        if not inspect.iscoroutinefunction(endpoint):
            raise ConfigurationError(
                f"cached_response decorates async def endpoints; {label} is sync: "
                "make it async def, or cache the function it calls with @cache.cached"
            )
        signature = _resolved_signature(endpoint, localns)
        request_name = next(
            (
                p.name
                for p in signature.parameters.values()
                if isinstance(p.annotation, type) and issubclass(p.annotation, Request)
            ),
            None,
        )
        values: Serializer | None = None
        if not _returns_response(signature.return_annotation):
            typed = typed_values(endpoint, label, JsonSerializer(), localns)
            if typed is not None:
                values = typed.serializer(JsonSerializer())

        def encode_value(value: Any) -> bytes:
            if values is not None:
                return b"v" + values.dumps(value)
            return (
                b"j"
                + json.dumps(
                    jsonable_encoder(value), separators=(",", ":"), ensure_ascii=False
                ).encode()
            )

        async def render(signature: str, call: _Call) -> bytes | None:
            result = await endpoint(*call.args, **call.kwargs)
            if not isinstance(result, Response):
                return encode_value(result)
            headers = [
                (k.decode("latin-1"), v.decode("latin-1"))
                for k, v in result.raw_headers
            ]
            if isinstance(result, StreamingResponse) or not response_cacheable(
                result.status_code, headers
            ):
                call.result, call.returned = result, True  # served, not stored
                return None
            head = json.dumps(
                {"s": result.status_code, "h": stored_headers(headers)}
            ).encode()
            return b"r" + _HEADER.pack(len(head)) + head + bytes(result.body)

        cached_render = lazy_cached(
            cache,
            render,
            ttl=ttl,
            label=label,
            tags=tag_list,
            on_backend_error=on_backend_error,
            stampede=stampede,
        )

        def decode(data: bytes) -> Any:
            kind, body = data[:1], data[1:]
            if kind == b"v" and values is not None:
                return values.loads(body)
            if kind == b"r":
                (n,) = _HEADER.unpack_from(body)
                head = json.loads(body[_HEADER.size : _HEADER.size + n])
                response = Response(body[_HEADER.size + n :], status_code=head["s"])
                response.raw_headers += [
                    (k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in head["h"]
                ]
                return response
            return json.loads(body)

        @functools.wraps(endpoint)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if request_name is None:
                request = kwargs.pop(_REQUEST_PARAM, None)
            else:
                request = kwargs.get(request_name)
            if request is None:  # Starlette passes the request positionally
                request = next((a for a in args if isinstance(a, Request)), None)
            if request is None:
                raise ConfigurationError(
                    f"{label}: cached_response found no Request among the endpoint's "
                    "arguments: use it on FastAPI/Starlette endpoints"
                )
            if not request_cacheable(
                request.method, request.headers.get("cache-control")
            ):
                return await endpoint(*args, **kwargs)
            key = request_signature(
                request.method,
                request.url.path,
                request.query_params.multi_items(),
                request.headers.get,
                vary_names,
            )
            call = _Call(args, kwargs)
            data = await cached_render.get()(key, call)
            if data is None:
                # not stored; a task that shared another's computation has no answer
                # of its own yet
                return call.result if call.returned else await endpoint(*args, **kwargs)
            return decode(data)

        params = list(signature.parameters.values())
        if request_name is None:
            params.append(
                inspect.Parameter(
                    _REQUEST_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=Request
                )
            )
        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]

        async def invalidate_all() -> bool:
            """Drop every cached answer of this endpoint (O(1))."""
            return bool(await cached_render.get().invalidate_all())

        wrapper.invalidate_all = invalidate_all  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def _resolved_signature(
    fn: Callable[..., Any], localns: dict[str, Any] | None
) -> inspect.Signature:
    """``fn``'s signature with string annotations resolved, so that FastAPI reads the
    same types through the wrapper (whose globals are this module's)."""
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn, localns=localns, include_extras=True)
    except (NameError, TypeError):
        return signature
    params = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in signature.parameters.values()
    ]
    return signature.replace(
        parameters=params,
        return_annotation=hints.get("return", signature.return_annotation),
    )


class _ASGIEndpoint:
    """An ASGI app as a Starlette ``Route`` endpoint (a plain function would be taken
    for a request handler)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def serve_metrics(app: Any, path: str = "/metrics", registry: Any = None) -> None:
    """Serve rcache's Prometheus metrics at ``path`` on a FastAPI/Starlette app.

    Both ``/metrics`` and ``/metrics/`` answer 200 directly: ``app.mount("/metrics",
    ...)`` would answer ``/metrics`` with a 307 redirect to ``/metrics/``. The route
    is left out of the OpenAPI schema.
    """
    from rcache.metrics import make_asgi_app

    check_metrics_path(path)
    endpoint = _ASGIEndpoint(make_asgi_app(registry))
    base = path.rstrip("/")
    for p in (base, base + "/"):
        app.router.routes.append(Route(p, endpoint, include_in_schema=False))
