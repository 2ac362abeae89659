"""The only module that imports redis-py: clients, error mapping and retries.

* ``SyncRedis`` creates its client lazily, in the process that uses it.
* ``AsyncRedis`` keeps one ``redis.asyncio`` client per event loop: an asyncio client is
  bound to the loop it was first used on (pytest-asyncio #622, redis-py #3048).
* ``map_error`` is the one place redis-py exceptions become rcache exceptions.
* Transient errors (connection reset/refused, timeout) are retried by tenacity with
  jittered exponential backoff bounded in count and total time; redis-py's own retries are
  switched off so that they cannot add seconds to a call during an outage.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.exceptions as rex
import tenacity
from redis.backoff import NoBackoff
from redis.retry import Retry

from rcache._config import RetryPolicy
from rcache._exceptions import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    RCacheError,
)

__all__ = [
    "AsyncRedis",
    "ClientSpec",
    "LuaScript",
    "SyncRedis",
    "map_error",
    "resolve_url",
]

T = TypeVar("T")

DEFAULT_URL = "redis://127.0.0.1:6379/0"
_SCHEMES = ("redis", "rediss", "unix", "memory")

# Re-exported so that the rest of rcache never imports redis-py itself.
WatchError = rex.WatchError
RedisError = rex.RedisError
REDIS_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    rex.ConnectionError,
    rex.TimeoutError,
)

#: Errors worth a retry: the command may not have reached Redis, or its reply was lost.
TRANSIENT: tuple[type[BaseException], ...] = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.BusyLoadingError,
    ConnectionError,
    TimeoutError,
)

#: The longest a single blocking command (BLMOVE) may block, in seconds.
MAX_BLOCK = 25.0

#: Conservative client defaults: a cache must fail fast, not hang a web request.
DEFAULT_OPTIONS: dict[str, Any] = {
    "socket_timeout": 1.0,
    "socket_connect_timeout": 1.0,
    "socket_keepalive": True,
}


def resolve_url(url: str | None) -> str:
    """``url``, else ``$RCACHE_URL``, else ``$REDIS_URL``, else the local default."""
    url = (
        url
        or os.environ.get("RCACHE_URL")
        or os.environ.get("REDIS_URL")
        or DEFAULT_URL
    )
    scheme = urlsplit(url).scheme
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            f"unknown URL scheme in {_redact(url)!r}: write redis://host:6379/0, "
            "rediss://host:6380/0, unix:///path/to/redis.sock or memory://"
        )
    return url


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def map_error(exc: BaseException) -> RCacheError:
    """Translate a redis-py (or socket) exception into rcache's tree."""
    if isinstance(exc, RCacheError):
        return exc
    if isinstance(exc, (*TRANSIENT, OSError)):
        return BackendUnavailableError(
            f"Redis unavailable: {type(exc).__name__}: {exc}", exc
        )
    return BackendError(f"Redis error: {type(exc).__name__}: {exc}", exc)


class ClientSpec:
    """How to build clients: from a URL, or from user-supplied clients.

    rcache stores binary envelopes, so its clients never decode responses. A user client
    created with ``decode_responses=True`` is not modified: rcache builds a twin with the
    same connection settings and ``decode_responses=False``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: redis.Redis | None = None,
        async_client: Callable[[], redis.asyncio.Redis] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.options = {**DEFAULT_OPTIONS, **(options or {})}
        self.options["retry"] = Retry(NoBackoff(), 0)
        self.options["decode_responses"] = False
        # redis-py 8.1: with maintenance notifications on "auto" the asyncio pool skips
        # its stale-connection check (ConnectionPool.ensure_connection), so the first
        # async command after a Redis restart fails with "Connection closed by server".
        try:
            from redis.maint_notifications import MaintNotificationsConfig
        except ImportError:  # older redis-py: no maintenance notifications
            pass
        else:
            self.options.setdefault(
                "maint_notifications_config", MaintNotificationsConfig(enabled=False)
            )
        self.user_client = client
        self.async_factory = async_client
        if client is not None and url is not None:
            raise ConfigurationError("pass either a URL or client=, not both")
        if client is not None and not isinstance(client, redis.Redis):
            raise ConfigurationError(
                "client= takes a synchronous redis.Redis; pass an asyncio client factory "
                "as async_client=lambda: redis.asyncio.Redis(...)"
            )
        self.url = resolve_url(url) if client is None else None
        self.memory = self.url is not None and self.url.startswith("memory://")
        self._fake_server: Any = None
        if self.memory:
            try:
                import fakeredis
                import lupa  # noqa: F401 -- Lua is part of the memory:// contract
            except ImportError:
                raise ConfigurationError(
                    'memory:// needs fakeredis with Lua: pip install "rcache-redis[memory]"'
                ) from None
            self._fake_server = fakeredis.FakeServer()

    def _opts(self, blocking: bool) -> dict[str, Any]:
        opts = dict(self.options)
        if blocking:
            opts["socket_timeout"] = MAX_BLOCK + 5.0
        return opts

    def sync_client(self, *, blocking: bool = False) -> redis.Redis:
        if self.user_client is not None:
            kwargs = self.user_client.connection_pool.connection_kwargs
            if kwargs.get("decode_responses"):
                return redis.Redis(
                    connection_pool=self.user_client.connection_pool.__class__(
                        connection_class=self.user_client.connection_pool.connection_class,
                        **{**kwargs, "decode_responses": False},
                    )
                )
            return self.user_client
        if self.memory:
            import fakeredis

            return fakeredis.FakeRedis(server=self._fake_server)
        assert self.url is not None
        return redis.Redis.from_url(self.url, **self._opts(blocking))

    def async_client(self, *, blocking: bool = False) -> redis.asyncio.Redis:
        if self.async_factory is not None:
            return self.async_factory()
        if self.user_client is not None:
            kwargs = dict(self.user_client.connection_pool.connection_kwargs)
            kwargs["decode_responses"] = False
            kwargs.pop("retry", None)
            # redis-py 8 sync pools carry arguments the asyncio client rejects
            # (himport_registry, maint_notifications_pool_handler, orig_host_address, ...)
            accepted = inspect.signature(redis.asyncio.Redis.__init__).parameters
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
            return redis.asyncio.Redis(
                **kwargs, retry=redis.asyncio.retry.Retry(NoBackoff(), 0)
            )
        if self.memory:
            import fakeredis

            return fakeredis.FakeAsyncRedis(server=self._fake_server)
        assert self.url is not None
        opts = self._opts(blocking)
        opts["retry"] = redis.asyncio.retry.Retry(NoBackoff(), 0)
        return redis.asyncio.Redis.from_url(self.url, **opts)

    def describe(self) -> str:
        if self.url is not None:
            return _redact(self.url)
        return "client"


def _retrying(policy: RetryPolicy) -> tenacity.Retrying:
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts - 1)
        | tenacity.stop_after_delay(policy.max_time),
        wait=tenacity.wait_random_exponential(
            multiplier=policy.backoff, max=policy.max_backoff
        ),
        retry=tenacity.retry_if_exception_type(TRANSIENT),
        reraise=True,
    )


def _aretrying(policy: RetryPolicy) -> tenacity.AsyncRetrying:
    return tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(policy.attempts - 1)
        | tenacity.stop_after_delay(policy.max_time),
        wait=tenacity.wait_random_exponential(
            multiplier=policy.backoff, max=policy.max_backoff
        ),
        retry=tenacity.retry_if_exception_type(TRANSIENT),
        reraise=True,
    )


class SyncRedis:
    """Lazily created sync client plus ``run``: error mapping and retries in one place."""

    def __init__(self, spec: ClientSpec, retry: RetryPolicy) -> None:
        self._spec = spec
        self._retry = retry
        self._client: redis.Redis | None = None
        self._pid = 0
        self._blocking: redis.Redis | None = None
        self._blocking_pid = 0

    @property
    def client(self) -> redis.Redis:
        client = self._client
        if client is None or self._pid != os.getpid():
            client = self._client = self._spec.sync_client()
            self._pid = os.getpid()
        return client

    @property
    def blocking_client(self) -> redis.Redis:
        """A second client for blocking commands (BLMOVE), whose socket timeout outlasts
        the longest block (MAX_BLOCK); the main client keeps its short timeout."""
        client = self._blocking
        if client is None or self._blocking_pid != os.getpid():
            client = self._blocking = self._spec.sync_client(blocking=True)
            self._blocking_pid = os.getpid()
        return client

    def run(self, op: Callable[[redis.Redis], T], *, retry: bool = True) -> T:
        """Run ``op(client)``; retry transient errors if ``retry``; map every error."""
        client = self.client
        try:
            return op(client)
        except TRANSIENT as exc:
            if not retry or self._retry.attempts <= 1:
                raise map_error(exc) from exc
            first = exc
        except rex.RedisError as exc:
            raise map_error(exc) from exc
        try:
            return _retrying(self._retry)(op, client)
        except (rex.RedisError, OSError) as exc:
            raise map_error(exc) from first

    def close(self) -> None:
        if self._client is not None and self._spec.user_client is not self._client:
            self._client.close()
        if self._blocking is not None:
            self._blocking.close()
        self._client = self._blocking = None


class AsyncRedis:
    """One ``redis.asyncio`` client per running event loop; same ``run`` contract."""

    def __init__(self, spec: ClientSpec, retry: RetryPolicy) -> None:
        self._spec = spec
        self._retry = retry
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, redis.asyncio.Redis
        ] = weakref.WeakKeyDictionary()
        self._blocking: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, redis.asyncio.Redis
        ] = weakref.WeakKeyDictionary()

    @property
    def blocking_client(self) -> redis.asyncio.Redis:
        """This loop's client for blocking commands (see SyncRedis.blocking_client)."""
        loop = asyncio.get_running_loop()
        client = self._blocking.get(loop)
        if client is None:
            client = self._blocking[loop] = self._spec.async_client(blocking=True)
        return client

    @property
    def client(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = self._spec.async_client()
        return client

    async def run(
        self, op: Callable[[redis.asyncio.Redis], Awaitable[T]], *, retry: bool = True
    ) -> T:
        client = self.client
        try:
            return await op(client)
        except TRANSIENT as exc:
            if not retry or self._retry.attempts <= 1:
                raise map_error(exc) from exc
            first = exc
        except rex.RedisError as exc:
            raise map_error(exc) from exc

        async def attempt() -> T:
            # a coroutine *function*: tenacity would not await a lambda's coroutine
            return await op(client)

        try:
            return await _aretrying(self._retry)(attempt)
        except (rex.RedisError, OSError) as exc:
            raise map_error(exc) from first

    async def aclose(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        for clients in (self._clients, self._blocking):
            client = clients.pop(loop, None)
            if client is not None:
                await client.aclose()


class LuaScript:
    """A Lua script shipped as package data (``rcache/_scripts/NAME.lua``).

    Called with EVALSHA; on NOSCRIPT (a restarted or flushed server) it loads the source
    and retries once, so the next call after a Redis restart still works. The header of
    every script states its KEYS, ARGV and return codes.
    """

    def __init__(self, name: str, source: str | None = None) -> None:
        import hashlib
        from importlib import resources

        if source is None:
            source = (
                resources.files("rcache._scripts").joinpath(f"{name}.lua").read_text()
            )
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, client: redis.Redis, keys: list[Any], args: list[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except rex.NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)

    async def acall(
        self, client: redis.asyncio.Redis, keys: list[Any], args: list[Any]
    ) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except rex.NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)
