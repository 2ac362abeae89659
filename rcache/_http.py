"""What the web integrations (``rcache.flask``, ``rcache.fastapi``) share: which requests
and responses may be cached and how a request becomes a key. Pure, no framework import.

Rules, the same for every framework:

* only ``GET`` and ``HEAD`` are cached; ``HEAD`` shares ``GET``'s entry (the body is
  dropped on the way out, as an HTTP cache does);
* the key is the method, the path, the query string with its pairs sorted (so
  ``?b=2&a=1`` and ``?a=1&b=2`` share an entry, ``?q=a`` and ``?q=b`` do not) and the
  values of the request headers named in ``vary=``;
* a request with ``Cache-Control: no-store`` is neither served from nor stored in the
  cache; a response is stored only if its status is 2xx, it is not streamed, it has no
  ``Set-Cookie`` (a cookie is one user's) and its ``Cache-Control`` has neither
  ``no-store`` nor ``private``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from rcache._config import BackendErrorPolicy, Duration, parse_duration
from rcache._exceptions import ConfigurationError

if TYPE_CHECKING:
    from rcache._cache import Cache

__all__ = [
    "CACHEABLE_METHODS",
    "Lazy",
    "check_metrics_path",
    "check_vary",
    "check_view_options",
    "lazy_cached",
    "request_cacheable",
    "request_signature",
    "response_cacheable",
    "wants_no_store",
]

CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
#: never replayed from the cache: they describe one connection or one response's body
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "date",
        "set-cookie",
        "upgrade",
        "proxy-authenticate",
        "trailer",
    }
)


def check_vary(vary: Iterable[str]) -> tuple[str, ...]:
    """Header names, lower-cased and sorted; raises ConfigurationError for a bad one."""
    if isinstance(vary, str):
        raise ConfigurationError(f"vary= takes a list of header names: vary=[{vary!r}]")
    names = []
    for name in vary:
        if not isinstance(name, str) or not name or any(c in name for c in " :\r\n"):
            raise ConfigurationError(
                f"vary= takes header names such as 'Accept-Language', got {name!r}"
            )
        names.append(name.lower())
    return tuple(sorted(set(names)))


def _directives(cache_control: str | None) -> set[str]:
    if not cache_control:
        return set()
    return {d.split("=", 1)[0].strip().lower() for d in cache_control.split(",")}


def wants_no_store(cache_control: str | None) -> bool:
    """True when a request's ``Cache-Control`` says ``no-store``."""
    return "no-store" in _directives(cache_control)


def request_cacheable(method: str, cache_control: str | None) -> bool:
    """True when a request may be served from (and stored in) the cache."""
    return method in CACHEABLE_METHODS and not wants_no_store(cache_control)


def response_cacheable(
    status: int, headers: Iterable[tuple[str, str]], streamed: bool = False
) -> bool:
    if not 200 <= status < 300 or streamed:
        return False
    for name, value in headers:
        lname = name.lower()
        if lname == "set-cookie":
            return False
        if lname == "cache-control" and _directives(value) & {"no-store", "private"}:
            return False
    return True


def request_signature(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    header: Callable[[str], str | None],
    vary: tuple[str, ...],
) -> str:
    """A short digest of what identifies the response: see the module docstring."""
    method = "GET" if method == "HEAD" else method
    parts: list[Any] = [
        method,
        path,
        sorted(query),
        [[name, header(name) or ""] for name in vary],
    ]
    text = json.dumps(parts, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def check_view_options(
    ttl: Duration | None,
    vary: Iterable[str],
    tags: Iterable[str],
    decorator: str,
    example_tag: str,
) -> tuple[tuple[str, ...], list[str]]:
    """Decoration-time checks of a view decorator's options: the vary names and the
    tag list, or ConfigurationError (a bad ttl fails here, not at the first request)."""
    vary_names = check_vary(vary)
    if ttl is not None:
        parse_duration(ttl)
    tag_list = [tags] if isinstance(tags, str) else list(tags)
    for tag in tag_list:
        if "{" in tag or "}" in tag:
            raise ConfigurationError(
                f"{decorator} tags are fixed names, got {tag!r}: write "
                f"tags=[{example_tag!r}] and invalidate with cache.invalidate_tags(...)"
            )
    return vary_names, tag_list


def check_metrics_path(path: str) -> None:
    """``serve_metrics(path=...)`` takes a path such as ``/metrics``."""
    if not path.startswith("/") or path == "/":
        raise ConfigurationError(f"path must look like '/metrics', got {path!r}")


def stored_headers(headers: Iterable[tuple[str, str]]) -> list[list[str]]:
    return [[k, v] for k, v in headers if k.lower() not in _HOP_BY_HOP]


T = TypeVar("T")


class Lazy(Generic[T]):
    """A value built at once when ``eager``, else on first use: a view decorated at
    import time, before ``init_app`` or the lifespan gave the cache its default ttl,
    gets its cached function at its first request."""

    def __init__(self, build: Callable[[], T], *, eager: bool) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._value: T | None = build() if eager else None

    def get(self) -> T:
        value = self._value
        if value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._build()
                value = self._value
        return value


def lazy_cached(
    cache: Cache,
    render: Callable[..., Any],
    *,
    ttl: Duration | None,
    label: str,
    tags: list[str],
    on_backend_error: BackendErrorPolicy | None,
    stampede: bool,
) -> Lazy[Any]:
    """``render(signature, call)`` cached (``call`` left out of the key), built now when
    a ttl is known, else at the first request (see :class:`Lazy`)."""

    def build() -> Any:
        return cache.cached(
            ttl=ttl,
            name=label,
            ignore=("call",),
            cache_none=False,
            tags=tags,
            on_backend_error=on_backend_error,
            stampede=stampede,
        )(render)

    return Lazy(build, eager=ttl is not None or cache.default_ttl is not None)
