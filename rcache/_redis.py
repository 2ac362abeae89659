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
import re
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, urlsplit

import redis
import redis.asyncio
import redis.exceptions as rex
import tenacity
from redis.backoff import NoBackoff
from redis.retry import Retry

from rcache._config import RetryPolicy
from rcache._exceptions import (
    BackendError,
    BackendMisconfiguredError,
    BackendUnavailableError,
    ConfigurationError,
    RCacheError,
)
from rcache._logging import cache_log

__all__ = [
    "AsyncRedis",
    "ClientSpec",
    "LuaScript",
    "SyncRedis",
    "acommand_within",
    "adiagnose",
    "aeval_within",
    "aeviction_policy",
    "check_url",
    "command_within",
    "diagnose",
    "eval_within",
    "eviction_policy",
    "map_error",
    "misconfiguration",
    "resolve_url",
    "server_message",
]

T = TypeVar("T")

DEFAULT_URL = "redis://127.0.0.1:6379/0"
_SCHEMES = ("redis", "rediss", "unix", "memory")

# Re-exported so that the rest of rcache never imports redis-py itself.
WatchError = rex.WatchError
RedisError = rex.RedisError
RedisTimeoutError = rex.TimeoutError
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

#: Never retried although redis-py derives AuthenticationError from ConnectionError: a
#: wrong password stays wrong (a retry only doubles the failed logins).
NOT_TRANSIENT: tuple[type[BaseException], ...] = (rex.AuthenticationError,)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT) and not isinstance(exc, NOT_TRANSIENT)


#: The longest a single blocking command (BLMOVE) may block, in seconds.
MAX_BLOCK = 25.0

#: Conservative client defaults: a cache must fail fast, not hang a web request.
DEFAULT_OPTIONS: dict[str, Any] = {
    "socket_timeout": 1.0,
    "socket_connect_timeout": 1.0,
    "socket_keepalive": True,
}


def resolve_url(url: str | None) -> str:
    """``url``, else ``$RCACHE_URL``, else ``$REDIS_URL``, else the local default;
    checked by :func:`check_url`."""
    url = (
        url
        or os.environ.get("RCACHE_URL")
        or os.environ.get("REDIS_URL")
        or DEFAULT_URL
    )
    return check_url(url)


#: "user:password@" in any URL, even one urlsplit cannot read.
_USERINFO_PASSWORD = re.compile(r"(?<=:)[^:@/]+(?=@)")
_URL_FORMS = (
    "redis://host:6379/0, rediss://host:6380/0, redis://:password@host:6379/0, "
    "unix:///path/to/redis.sock?db=0 or memory://"
)


def check_url(url: str) -> str:
    """Return ``url`` if rcache can connect with it, else raise ConfigurationError.

    The one URL check (construction, ``configure()`` and URLs read from the
    environment all go through it), so a typo fails where it is written instead of at
    the first call with redis-py's bare ``ValueError``. Checks the scheme, the ``//``
    after it, the host, the port (1-65535), the database number (path or ``?db=``,
    an integer >= 0) and the values of the query options redis-py parses. Whether the
    database exists is the server's business: see :meth:`rcache.Cache.check`.
    """
    if not isinstance(url, str):
        raise ConfigurationError(
            f"the Redis URL must be a string, got {type(url).__name__}: write "
            + _URL_FORMS
        )
    shown = _redact(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            f"unknown URL scheme in {shown!r}: write " + _URL_FORMS
        )
    if not url.startswith(scheme):
        raise ConfigurationError(
            f"the scheme of Redis URL {shown!r} must be lower case: write "
            f"{_redact(scheme + url[len(scheme) :])!r}"
        )
    if scheme == "memory":
        return url
    if not url[len(scheme) + 1 :].startswith("//"):
        # "redis:/127.0.0.1:6379" or "redis:127.0.0.1": urlsplit finds no host at all
        rest = url[len(scheme) + 1 :].lstrip("/")
        example = (
            f"unix:///{rest}"
            if scheme == "unix"
            else f"{scheme}://{rest or 'host:6379/0'}"
        )
        raise ConfigurationError(
            f"malformed Redis URL {shown!r}: the scheme must be followed by '//'; "
            f"write {_redact(example)!r}"
        )
    if scheme == "unix":
        if parts.netloc or not parts.path:
            raise ConfigurationError(
                f"malformed Redis URL {shown!r}: a socket URL has three slashes and an "
                "absolute path: write unix:///path/to/redis.sock?db=0"
            )
    else:
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None and not 0 < port < 65536:
            raise ConfigurationError(
                f"bad port in Redis URL {shown!r}: write a number from 1 to 65535, "
                f"e.g. {scheme}://{parts.hostname or 'host'}:6379/0"
            )
        if not parts.hostname:
            raise ConfigurationError(
                f"no host in Redis URL {shown!r}: write {scheme}://host:6379/0 "
                f"({scheme}://127.0.0.1:6379/0 for a local server)"
            )
        db = parts.path.strip("/")
        if db and not (db.isascii() and db.isdigit()):
            raise ConfigurationError(
                f"bad database number {db!r} in Redis URL {shown!r}: the path is the "
                f"database index, an integer >= 0: write {scheme}://"
                f"{parts.hostname}:{port or 6379}/0"
            )
    for name, values in parse_qs(parts.query).items():
        if name == "db" and not all(v.isascii() and v.isdigit() for v in values):
            raise ConfigurationError(
                f"bad database number {values[-1]!r} in Redis URL {shown!r}: write "
                "?db=0 (an integer >= 0)"
            )
    try:
        redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:  # a query option redis-py cannot parse
        raise ConfigurationError(
            f"Redis URL {shown!r} is not valid: {exc} write " + _URL_FORMS
        ) from None
    return url


def _redact(url: str) -> str:
    """``url`` without its password, also when it is malformed ("redis:/:pw@host")."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        url = url.replace(f":{password}@", ":***@")
    return _USERINFO_PASSWORD.sub("***", url)


def server_message(exc: BaseException) -> str:
    """The error text of ``exc`` fit for a log line: never a value.

    Redis error replies name the problem, not the data, except "unknown command" which
    echoes the arguments (keys, values): those are cut off.
    """
    text = str(exc).split(", with args beginning with", 1)[0].strip()
    return text[:300] if text else type(exc).__name__


#: Response errors no retry can fix, by the start of the server's message.
_MISCONFIGURED_REPLIES: tuple[tuple[str, str], ...] = (
    (
        "db index is out of range",
        "the database number in the URL does not exist on this server (16 by "
        "default: 0-15; see its `databases` setting): write e.g. "
        "redis://host:6379/0",
    ),
    (
        "invalid db index",
        "the database number in the URL is not valid: write e.g. redis://host:6379/0",
    ),
    (
        "wrongtype",
        "a key under this cache's prefix holds a value of another type: another "
        "program writes there; give the cache a prefix of its own (prefix=...)",
    ),
    (
        "noauth",
        "the server requires a password: write redis://:password@host:6379/0 "
        "(or redis://user:password@host:6379/0)",
    ),
    (
        "unknown command",
        "the server lacks a command rcache uses: rcache needs Redis >= 6.2 with "
        "scripting and blocking commands enabled (not renamed by rename-command or "
        "filtered by a proxy)",
    ),
)


def misconfiguration(exc: BaseException) -> str | None:
    """What to change when ``exc`` is an error no retry can fix, else None."""
    if isinstance(exc, rex.AuthenticationError):
        return (
            "the server rejected the credentials: check the user and password in the "
            "URL (redis://user:password@host:6379/0) or username=/password= options"
        )
    if isinstance(exc, rex.NoPermissionError):
        return (
            "the ACL user rcache connects as lacks a permission: grant it the commands "
            "and keys it needs, e.g. ACL SETUSER <user> ~<prefix>:* +@read +@write "
            "+@scripting +@blocking +@connection"
        )
    if isinstance(exc, rex.NoScriptError):
        # LuaScript loads a missing script and retries once: NOSCRIPT after that means
        # the server does not keep what was loaded.
        return (
            "the server dropped a Lua script right after rcache loaded it (a proxy "
            "sending SCRIPT LOAD and EVALSHA to different servers, or scripts being "
            "flushed): connect rcache to the server directly"
        )
    if isinstance(exc, rex.ResponseError):
        text = str(exc).lower()
        for start, hint in _MISCONFIGURED_REPLIES:
            if text.startswith((start, "err " + start)):
                return hint
    return None


def map_error(exc: BaseException) -> RCacheError:
    """Translate a redis-py (or socket) exception into rcache's tree.

    * errors no retry can fix (credentials, database index, ACL, WRONGTYPE, unknown
      command, NOSCRIPT after a reload): :class:`BackendMisconfiguredError`, whose
      message is the server's own plus what to change;
    * Redis could not be reached (refused, reset, timed out, loading):
      :class:`BackendUnavailableError` (the only kind that opens the circuit breaker);
    * any other error reply: :class:`BackendError`.
    """
    if isinstance(exc, RCacheError):
        return exc
    hint = misconfiguration(exc)
    if hint is not None:
        return BackendMisconfiguredError(
            f"Redis refused the command ({type(exc).__name__}: "
            f"{server_message(exc)}): {hint}",
            exc,
        )
    if isinstance(exc, (*TRANSIENT, OSError)):
        return BackendUnavailableError(
            f"Redis unavailable: {type(exc).__name__}: {server_message(exc)}", exc
        )
    return BackendError(
        f"Redis error: {type(exc).__name__}: {server_message(exc)}", exc
    )


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
        if client is None and (
            url is not None
            or os.environ.get("RCACHE_URL")
            or os.environ.get("REDIS_URL")
        ):
            # a malformed URL, given or already in the environment, fails here, at
            # construction; the environment is still read again at first use
            resolve_url(url)
        self._url_arg = url
        self._url: str | None = None
        #: set when the first client is made: the settings are in use from then on
        self.used = False
        self._fake_server: Any = None

    @property
    def url(self) -> str | None:
        """The URL clients connect to, resolved on first use: the one given, else
        ``$RCACHE_URL``, else ``$REDIS_URL``, else the local default. None when a user
        client was given instead."""
        if self.user_client is not None:
            return None
        if self._url is not None:
            return self._url
        # not cached before first use: the environment may still change until then
        return resolve_url(self._url_arg)

    @property
    def memory(self) -> bool:
        url = self.url
        return url is not None and url.startswith("memory://")

    @property
    def defaulted(self) -> bool:
        """True when no URL came from the code or the environment."""
        return (
            self.user_client is None
            and self.async_factory is None
            and not (
                self._url_arg
                or os.environ.get("RCACHE_URL")
                or os.environ.get("REDIS_URL")
            )
        )

    def _first_use(self) -> None:
        """Resolve the URL and make the embedded server on the first client."""
        if self.user_client is None:
            self._url = resolve_url(self._url_arg)
            if self.defaulted:
                # the run that found this wrote to someone else's server: say so once
                cache_log.warning(
                    "rcache: no Redis URL was configured (Cache(url=...), "
                    "cache.configure(url=...), $RCACHE_URL or $REDIS_URL); "
                    "connecting to the default %s",
                    DEFAULT_URL,
                )
        self.used = True
        if self.memory and self._fake_server is None:
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
        if not self.used:
            self._first_use()
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
        if not self.used:
            self._first_use()
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
        retry=tenacity.retry_if_exception(_transient),
        reraise=True,
    )


def _aretrying(policy: RetryPolicy) -> tenacity.AsyncRetrying:
    return tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(policy.attempts - 1)
        | tenacity.stop_after_delay(policy.max_time),
        wait=tenacity.wait_random_exponential(
            multiplier=policy.backoff, max=policy.max_backoff
        ),
        retry=tenacity.retry_if_exception(_transient),
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
        except NOT_TRANSIENT as exc:
            raise map_error(exc) from exc
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
        except NOT_TRANSIENT as exc:
            raise map_error(exc) from exc
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


_CHECK_SOURCE = (
    "redis.call('SET', KEYS[1], '1', 'PX', 10000) return redis.call('DEL', KEYS[1])"
)


def _check_report(info: Any, db: int) -> str:
    version = info.get("redis_version") if isinstance(info, dict) else None
    server = f"Redis {version}" if version else "Redis"
    return (
        f"{server}, db {db}: connect, read, write, Lua scripts and blocking commands "
        "work"
    )


def diagnose(client: redis.Redis, probe: str) -> str:
    """Exercise what rcache needs on ``client`` (used by ``Cache.check``): connect and
    authenticate, read, write and delete a probe key under the cache's prefix, load
    and run a script on it, and block briefly in BLMOVE. Raises what redis-py raises
    (``run`` maps it); returns a one-line summary."""
    client.ping()
    try:
        info: Any = client.info("server")
    except rex.ResponseError:  # NOPERM, or memory:// (no INFO): nice to have only
        info = {}
    client.set(probe, b"1", px=10_000)
    client.get(probe)
    client.delete(probe)
    LuaScript("rcache_check", _CHECK_SOURCE)(client, [probe], [])
    client.blmove(probe, probe + ":to", 0.01)  # type: ignore[arg-type]
    db = client.connection_pool.connection_kwargs.get("db", 0)
    return _check_report(info, int(db or 0))


async def adiagnose(client: redis.asyncio.Redis, probe: str) -> str:
    """Async twin of :func:`diagnose`."""
    await client.ping()
    try:
        info: Any = await client.info("server")
    except rex.ResponseError:
        info = {}
    await client.set(probe, b"1", px=10_000)
    await client.get(probe)
    await client.delete(probe)
    await LuaScript("rcache_check", _CHECK_SOURCE).acall(client, [probe], [])
    await client.blmove(probe, probe + ":to", 0.01)  # type: ignore[arg-type]
    db = client.connection_pool.connection_kwargs.get("db", 0)
    return _check_report(info, int(db or 0))


_INCLUDE = re.compile(r"^-- @include (_\w+)$", re.MULTILINE)


class LuaScript:
    """A Lua script shipped as package data (``rcache/_scripts/NAME.lua``).

    Called with EVALSHA; on NOSCRIPT (a restarted or flushed server) it loads the source
    and retries once, so the next call after a Redis restart still works. The header of
    every script states its KEYS, ARGV and return codes.
    """

    def __init__(self, name: str, source: str | None = None) -> None:
        import hashlib
        from importlib import resources

        def read(script: str) -> str:
            return resources.files("rcache._scripts").joinpath(script).read_text()

        if source is None:
            source = read(f"{name}.lua")
        # Shared preambles (server clock, fences) are written once, in _shared.lua, and
        # pasted where a script says "-- @include NAME": Redis scripts cannot import.
        source = _INCLUDE.sub(lambda m: read(f"{m.group(1)}.lua"), source)
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


def command_within(
    client: redis.Redis,
    limit: float | None,
    *args: Any,
    on_sent: Callable[[], object] | None = None,
) -> Any:
    """Run one command, waiting at most ``limit`` seconds for its reply to start
    (None: the connection's socket timeout); ``on_sent()`` runs once it is written.

    A client's socket timeout bounds each read, but a lock wait needs a bound that
    follows its own remaining budget (issue 14: with Redis stopped, ``acquire(timeout=2)``
    returned after 9.4 s, its BLPOP waiting on the 30 s socket timeout of the blocking
    client). A connection whose reply did not come is dropped, so that a late reply can
    never answer the next command.
    """
    pool = client.connection_pool
    conn: Any = pool.get_connection()  # redis-py's connection API is untyped
    try:
        conn.send_command(*args)
        if on_sent is not None:
            on_sent()
        wait = conn.socket_timeout if limit is None else max(limit, 0.001)
        if not conn.can_read(timeout=wait):
            raise rex.TimeoutError(f"no reply from Redis within {wait}s")
        return cast(Any, client).parse_response(conn, str(args[0]))
    except rex.ResponseError:
        raise  # the server answered: the connection is in sync
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


async def acommand_within(
    client: redis.asyncio.Redis,
    limit: float | None,
    *args: Any,
    on_sent: Callable[[], object] | None = None,
) -> Any:
    """Async twin of :func:`command_within`."""
    pool: Any = client.connection_pool
    conn: Any = await pool.get_connection()
    try:
        await conn.send_command(*args)
        if on_sent is not None:
            on_sent()
        wait = conn.socket_timeout if limit is None else max(limit, 0.001)
        try:
            return await asyncio.wait_for(
                cast(Any, client).parse_response(conn, str(args[0])), wait
            )
        except asyncio.TimeoutError:
            raise rex.TimeoutError(f"no reply from Redis within {wait}s") from None
    except rex.ResponseError:
        raise
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)


def eval_within(
    client: redis.Redis,
    script: LuaScript,
    keys: list[Any],
    args: list[Any],
    limit: float | None,
    on_sent: Callable[[], object] | None = None,
) -> Any:
    """``script(client, keys, args)`` with its reply awaited at most ``limit`` seconds
    (plus one SCRIPT LOAD on NOSCRIPT, under the client's own socket timeout)."""
    command = ("EVALSHA", script.sha, len(keys), *keys, *args)
    try:
        return command_within(client, limit, *command, on_sent=on_sent)
    except rex.NoScriptError:
        client.script_load(script.source)
        return command_within(client, limit, *command, on_sent=on_sent)


async def aeval_within(
    client: redis.asyncio.Redis,
    script: LuaScript,
    keys: list[Any],
    args: list[Any],
    limit: float | None,
    on_sent: Callable[[], object] | None = None,
) -> Any:
    """Async twin of :func:`eval_within`."""
    command = ("EVALSHA", script.sha, len(keys), *keys, *args)
    try:
        return await acommand_within(client, limit, *command, on_sent=on_sent)
    except rex.NoScriptError:
        await client.script_load(script.source)
        return await acommand_within(client, limit, *command, on_sent=on_sent)


def _policy(reply: Any, info: Any) -> str:
    if isinstance(reply, dict):
        for name, value in reply.items():
            if _text(name) == "maxmemory-policy":
                return _text(value)
    if isinstance(info, dict) and "maxmemory_policy" in info:
        return _text(info["maxmemory_policy"])
    return ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def eviction_policy(client: redis.Redis) -> str:
    """The server's ``maxmemory-policy``: ``CONFIG GET``, or ``INFO memory`` where
    CONFIG is not permitted (managed Redis, ACL users); "" if neither tells."""
    try:
        return _policy(client.config_get("maxmemory-policy"), None)
    except rex.ResponseError:  # NOPERM, or CONFIG renamed away
        return _policy(None, client.info("memory"))


async def aeviction_policy(client: redis.asyncio.Redis) -> str:
    """Async twin of :func:`eviction_policy`."""
    try:
        return _policy(await client.config_get("maxmemory-policy"), None)
    except rex.ResponseError:
        return _policy(None, await client.info("memory"))
