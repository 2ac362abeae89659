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
import codecs
import inspect
import os
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast
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
    "Exchange",
    "FirstUse",
    "LuaScript",
    "SyncRedis",
    "TxConflict",
    "TxPipeline",
    "TxUnsent",
    "acommand_within",
    "adelete_by_node",
    "adiagnose",
    "aeval_within",
    "aeviction_policy",
    "by_slot",
    "check_url",
    "command_within",
    "connection_kwargs",
    "delete_by_node",
    "delete_each",
    "diagnose",
    "eval_within",
    "eviction_policy",
    "map_error",
    "mget_each",
    "misconfiguration",
    "process_id",
    "resolve_url",
    "server_message",
]

T = TypeVar("T")

DEFAULT_URL = "redis://127.0.0.1:6379/0"
SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
#: redis-py's packer when hiredis is installed (the "fast" extra), and hiredis's own
#: pack function: command_within packs with it directly (see _send).
_HIREDIS_PACKER: Any = getattr(redis.connection, "HiredisRespSerializer", None)
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # without hiredis, redis-py's packer is the Python one
    _HIREDIS_PACKER = None

_SCHEMES = ("redis", "rediss", "unix", "memory", SENTINEL_SCHEME, CLUSTER_SCHEME)

# Re-exported so that the rest of rcache never imports redis-py itself.
WatchError = rex.WatchError
RedisError = rex.RedisError
RedisTimeoutError = rex.TimeoutError
REDIS_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    rex.ConnectionError,
    rex.TimeoutError,
)

#: Errors worth a retry: the command may not have reached Redis, or its reply was lost.
#: CLUSTERDOWN and TRYAGAIN are a Redis Cluster mid-failover or mid-resharding: transient
#: replies (the command was not run), not a bad command.
TRANSIENT: tuple[type[BaseException], ...] = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.BusyLoadingError,
    rex.ClusterDownError,
    rex.TryAgainError,
    ConnectionError,
    TimeoutError,
)

#: Everything redis-py raises. RedisClusterException (its client-side cross-slot check,
#: "cannot be connected", ...) derives from Exception, not RedisError: without it here a
#: cluster error would escape map_error and the bypass policy.
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    rex.RedisError,
    rex.RedisClusterException,
)
_REDIS_OR_OS_ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, OSError)

_CROSS_SLOT_HINT = (
    "the keys of one command must share a Redis Cluster hash slot: put the shared "
    "part of their names in a hash tag ('{cart:7}:items', '{cart:7}:total')"
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
    "unix:///path/to/redis.sock?db=0, "
    "redis+sentinel://host:26379,host2:26379/service_name/0, "
    "redis+cluster://host:7000,host2:7001 or memory://"
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
    if scheme in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        MultiHostURL(url)  # several hosts: urlsplit's port would refuse them
        return url
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


class MultiHostURL:
    """A parsed ``redis+sentinel://`` or ``redis+cluster://`` URL (pure).

    ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db][?opts]``
    names the sentinels (port default 26379), the monitored service and the database; the
    user and password are the primary's (as in Celery's and Kombu's ``sentinel://``
    URLs), not the sentinels'. ``redis+cluster://[[user]:password@]host:port[,...][?opts]``
    names seed nodes (port default 6379); a cluster has only database 0. Query options
    are redis-py's URL options (``socket_timeout=0.5``, ...).
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        default_port = 26379 if self.scheme == SENTINEL_SCHEME else 6379
        self.hosts: list[tuple[str, int]] = []
        for item in filter(None, hostlist.split(",")):
            host, sep, port = item.rpartition(":")
            if not sep:
                host, port = item, str(default_port)
            if not host or not port.isdigit():
                raise ConfigurationError(
                    f"bad host {item!r} in {_redact(url)!r}: write host:port"
                )
            self.hosts.append((host.strip("[]"), int(port)))
        if not self.hosts:
            raise ConfigurationError(
                f"no host in {_redact(url)!r}: write {self.scheme}://host:port"
            )
        path = [p for p in parts.path.split("/") if p]
        self.service = ""
        db = "0"
        if self.scheme == SENTINEL_SCHEME:
            if not path or len(path) > 2:
                raise ConfigurationError(
                    f"{_redact(url)!r} names no service: write "
                    "redis+sentinel://host:26379,host2:26379/service_name/0"
                )
            self.service = path[0]
            db = path[1] if len(path) == 2 else "0"
        elif path not in ([], ["0"]):
            raise ConfigurationError(
                f"a Redis Cluster has only database 0, got {_redact(url)!r}: "
                "write redis+cluster://host:7000,host2:7001"
            )
        if not db.isdigit():
            raise ConfigurationError(f"bad database {db!r} in {_redact(url)!r}")
        # redis-py parses (and type-converts) the credentials and query options
        auth = f"{userinfo}@" if userinfo else ""
        query = f"?{parts.query}" if parts.query else ""
        try:
            options = redis.connection.parse_url(  # type: ignore[no-untyped-call]
                f"redis://{auth}h:1/{db}{query}"
            )
        except ValueError as exc:
            raise ConfigurationError(f"bad option in {_redact(url)!r}: {exc}") from None
        options.pop("host", None)
        options.pop("port", None)
        if self.scheme == CLUSTER_SCHEME:
            options.pop("db", None)
        self.options: dict[str, Any] = options


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


def _map_cluster_error(exc: BaseException) -> RCacheError | None:
    """Redis Cluster errors: cross-slot is a usage error (BackendError, never an
    outage: it must not open the breaker); a topology in flux is an outage."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (rex.ClusterCrossSlotError, rex.CrossSlotTransactionError)) or (
        isinstance(exc, rex.RedisClusterException) and "same key slot" in str(exc)
    ):
        return BackendError(f"Redis Cluster refused {text}: {_CROSS_SLOT_HINT}", exc)
    if isinstance(exc, (rex.AskError, rex.SlotNotCoveredError)):
        # MOVED/ASK that outlived redis-py's own redirections: slots moving (or a
        # plain redis:// URL pointing at a cluster node: use redis+cluster://).
        return BackendUnavailableError(f"Redis Cluster unavailable: {text}", exc)
    if isinstance(exc, rex.RedisClusterException) and any(
        s in str(exc) for s in ("cannot be connected", "not covered", "agree")
    ):
        return BackendUnavailableError(f"Redis Cluster unavailable: {text}", exc)
    if isinstance(exc, rex.ClusterError) and "TTL exhausted" in str(exc):
        # redis-py gave up after its own 16 tries of TRYAGAIN (a multi-key command
        # during resharding), MOVED or ASK: slots are moving, an outage for now
        return BackendUnavailableError(f"Redis Cluster unavailable: {text}", exc)
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
    cluster = _map_cluster_error(exc)
    if cluster is not None:
        return cluster
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

    The deployment is explicit, never guessed per call: ``redis+sentinel://`` or a client
    from ``Sentinel.master_for`` (``sentinel``), ``redis+cluster://`` or a
    ``redis.cluster.RedisCluster`` (``cluster``), else one server.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
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
        self._user_cluster = client is not None and _is_cluster_client(client)
        if client is not None and not (
            self._user_cluster or isinstance(client, redis.Redis)
        ):
            raise ConfigurationError(
                "client= takes a synchronous redis.Redis (or Sentinel.master_for(...), or "
                "a redis.cluster.RedisCluster); pass an asyncio client factory as "
                "async_client=lambda: redis.asyncio.Redis(...)"
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
        self._user_sentinel = client is not None and _sentinel_pool(client) is not None
        self._multi: tuple[str, MultiHostURL | None] | None = None
        self._fake_server: Any = None
        #: what :meth:`describe` says of a user client (else ``"client"``)
        self.label: str | None = None

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
    def multi(self) -> MultiHostURL | None:
        """The parsed ``redis+sentinel://``/``redis+cluster://`` URL, else None (parsed
        once per URL: the URL may still change until first use)."""
        url = self.url
        if self._multi is None or self._multi[0] != url:
            multi = None
            if url is not None and url.startswith(
                (SENTINEL_SCHEME + ":", CLUSTER_SCHEME + ":")
            ):
                multi = MultiHostURL(url)
            self._multi = (url or "", multi)
        return self._multi[1]

    @property
    def cluster(self) -> bool:
        """Redis Cluster, from the client given or the URL's scheme (never guessed)."""
        if self.user_client is not None:
            return self._user_cluster
        multi = self.multi
        return multi is not None and multi.scheme == CLUSTER_SCHEME

    @property
    def sentinel(self) -> bool:
        """A primary found through Sentinel, from the client given or the URL."""
        if self.user_client is not None:
            return self._user_sentinel
        multi = self.multi
        return multi is not None and multi.scheme == SENTINEL_SCHEME

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
            return self._sync_from_user()
        if self.memory:
            import fakeredis

            return fakeredis.FakeRedis(server=self._fake_server)
        assert self.url is not None
        if self.multi is not None:
            return self._sync_multi(self.multi, self._opts(blocking))
        return redis.Redis.from_url(self.url, **self._opts(blocking))

    def _sync_from_user(self) -> redis.Redis:
        client = self.user_client
        if self.cluster:
            if client.get_connection_kwargs().get("decode_responses"):
                raise ConfigurationError(
                    "rcache reads bytes: create the RedisCluster with "
                    "decode_responses=False (the default)"
                )
            return cast("redis.Redis", client)
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        if not kwargs.get("decode_responses"):
            return cast("redis.Redis", client)
        sentinel = _sentinel_pool(client)
        if sentinel is not None:
            return cast(
                "redis.Redis",
                sentinel.sentinel_manager.master_for(
                    sentinel.service_name,
                    redis_class=redis.Redis,
                    decode_responses=False,
                ),
            )
        return redis.Redis(
            connection_pool=pool.__class__(
                connection_class=pool.connection_class,
                **{**kwargs, "decode_responses": False},
            )
        )

    @staticmethod
    def _sync_multi(multi: MultiHostURL, opts: dict[str, Any]) -> redis.Redis:
        opts = {**opts, **multi.options}
        if multi.scheme == CLUSTER_SCHEME:
            from redis.cluster import ClusterNode, RedisCluster

            retry = opts.pop("retry")
            nodes = [ClusterNode(h, p) for h, p in multi.hosts]  # type: ignore[no-untyped-call]
            return cast(
                "redis.Redis", RedisCluster(startup_nodes=nodes, retry=retry, **opts)
            )
        from redis.sentinel import Sentinel

        sentinels: Any = Sentinel(multi.hosts, **opts)  # type: ignore[no-untyped-call]
        return cast(
            "redis.Redis", sentinels.master_for(multi.service, redis_class=redis.Redis)
        )

    def async_client(self, *, blocking: bool = False) -> redis.asyncio.Redis:
        if not self.used:
            self._first_use()
        if self.async_factory is not None:
            return self.async_factory()
        if self.user_client is not None:
            return self._async_from_user(blocking)
        if self.memory:
            import fakeredis

            return fakeredis.FakeAsyncRedis(server=self._fake_server)
        assert self.url is not None
        opts = self._opts(blocking)
        opts["retry"] = redis.asyncio.retry.Retry(NoBackoff(), 0)
        if self.multi is not None:
            return self._async_multi(
                self.multi.scheme,
                self.multi.hosts,
                self.multi.service,
                {**opts, **self.multi.options},
            )
        return redis.asyncio.Redis.from_url(self.url, **opts)

    def _async_from_user(self, blocking: bool) -> redis.asyncio.Redis:
        client = self.user_client
        retry = redis.asyncio.retry.Retry(NoBackoff(), 0)
        if self.cluster:
            # the sync client's seeds and connection settings, for redis.asyncio.cluster
            from redis.asyncio.cluster import RedisCluster

            seeds = [(n.host, n.port) for n in client.get_nodes()]
            kwargs = _async_kwargs(client.get_connection_kwargs(), RedisCluster)
            for name in ("host", "port", "startup_nodes"):
                kwargs.pop(name, None)
            return self._async_multi(
                CLUSTER_SCHEME, seeds, "", {**kwargs, "retry": retry}
            )
        sentinel = _sentinel_pool(client)
        if sentinel is not None:
            # A Sentinel.master_for() client: its pool proxies the sentinel manager,
            # which redis.asyncio.Redis(**connection_kwargs) cannot use (AttributeError
            # on the first async call): build the asyncio twin from the same sentinels.
            manager = sentinel.sentinel_manager
            hosts = [
                (
                    s.connection_pool.connection_kwargs["host"],
                    s.connection_pool.connection_kwargs["port"],
                )
                for s in manager.sentinels
            ]
            kwargs = _async_kwargs(manager.connection_kwargs)
            kwargs.update(_async_kwargs(sentinel.connection_kwargs))
            kwargs.pop("connection_pool", None)
            return self._async_multi(
                SENTINEL_SCHEME,
                hosts,
                sentinel.service_name,
                {**kwargs, "retry": retry},
            )
        kwargs = _async_kwargs(client.connection_pool.connection_kwargs)
        # a sync pool made with them off does not list them: off here too (see
        # __init__; and a RESP2 twin, as the local tier's, refuses them on)
        maint = self.options.get("maint_notifications_config")
        if maint is not None:
            kwargs.setdefault("maint_notifications_config", maint)
        return redis.asyncio.Redis(**kwargs, retry=retry)

    @staticmethod
    def _async_multi(
        scheme: str, hosts: list[tuple[str, int]], service: str, opts: dict[str, Any]
    ) -> redis.asyncio.Redis:
        if scheme == CLUSTER_SCHEME:
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            retry = opts.pop("retry")
            nodes = [ClusterNode(h, p) for h, p in hosts]
            return cast(
                "redis.asyncio.Redis",
                RedisCluster(startup_nodes=nodes, retry=retry, **opts),
            )
        from redis.asyncio.sentinel import Sentinel

        sentinels: Any = Sentinel(hosts, **opts)  # type: ignore[no-untyped-call]
        return cast(
            "redis.asyncio.Redis",
            sentinels.master_for(service, redis_class=redis.asyncio.Redis),
        )

    def describe(self) -> str:
        if self.url is not None:
            return _redact(self.url)
        return self.label or "client"


def connection_kwargs(client: Any) -> Mapping[str, Any]:
    """A client's connection settings: from its pool, or a cluster client's own."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        return cast("Mapping[str, Any]", pool.connection_kwargs)
    getter = getattr(client, "get_connection_kwargs", None)
    return cast("Mapping[str, Any]", getter() if getter is not None else {})


def socket_timeout(client: Any) -> float | None:
    """The client's socket timeout (None: none, or not a redis-py client). Read through
    connection_kwargs(), which also knows cluster clients (they have no pool): without
    it a lock wait on Redis Cluster had no I/O cap while the server hung."""
    try:
        kwargs = connection_kwargs(client)
    except AttributeError:  # a pool without connection settings (a test double)
        return None
    timeout = kwargs.get("socket_timeout") if hasattr(kwargs, "get") else None
    return float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else None


def _is_cluster_client(client: object) -> bool:
    """A Redis Cluster client, sync or asyncio (the one duck test for it)."""
    # redis.cluster.RedisCluster and redis.asyncio.cluster.RedisCluster both route with
    # a nodes_manager; duck-typed so that plain redis.Redis users never import the
    # cluster modules.
    return hasattr(client, "nodes_manager")


def _is_cluster_node(parser: object) -> bool:
    """A redis.asyncio.cluster.ClusterNode (it hands out connections itself)."""
    return hasattr(parser, "acquire_connection")


def _sentinel_pool(client: Any) -> Any:
    """The SentinelConnectionPool of a ``Sentinel.master_for()`` client, else None."""
    pool = getattr(client, "connection_pool", None)
    if hasattr(pool, "sentinel_manager") and hasattr(pool, "service_name"):
        return pool
    return None


def _close_sentinels(client: Any) -> None:
    """Close the sentinel connections of a client that rcache built from a URL."""
    pool = _sentinel_pool(client)
    if pool is not None:
        for sentinel in pool.sentinel_manager.sentinels:
            sentinel.close()


def _async_kwargs(
    kwargs: Mapping[str, Any], client_class: Any = redis.asyncio.Redis
) -> dict[str, Any]:
    """Sync connection settings the asyncio client accepts, decoding off, no retry.

    redis-py 8 sync pools carry arguments the asyncio client rejects (himport_registry,
    maint_notifications_pool_handler, orig_host_address, redis_connect_func, ...).
    """
    accepted = inspect.signature(client_class.__init__).parameters
    out = {k: v for k, v in kwargs.items() if k in accepted and k != "retry"}
    out["decode_responses"] = False
    return out


def _retry_options(policy: RetryPolicy, client: Any) -> dict[str, Any]:
    """When to stop, how long to wait and what to retry (:func:`_retries`'s rule, for
    the attempts after the first): one rule for both drivers."""
    return {
        "stop": tenacity.stop_after_attempt(policy.attempts - 1)
        | tenacity.stop_after_delay(policy.max_time),
        "wait": tenacity.wait_random_exponential(
            multiplier=policy.backoff, max=policy.max_backoff
        ),
        "retry": tenacity.retry_if_exception(
            lambda exc: _retries(policy, exc, True, client)
        ),
        "reraise": True,
    }


#: This process's fork generation, bumped in a forked child by an ``os.register_at_fork``
#: hook that the first client registers (nothing is registered at import). A client
#: made in an older generation was the parent's. One list read per call where
#: ``os.getpid()`` was a system call per call (3 per cache hit against the floor's 2).
_FORKS = [0]
#: ``os.getpid()``, kept current by the same hook; read by :func:`process_id`
_PID = [0]
_WATCHING = [False]


def _forked() -> None:
    _FORKS[0] += 1
    _PID[0] = os.getpid()


def _watch_forks() -> None:
    """Register the fork hook, once per process. Two threads racing here register it
    twice, which is harmless: a fork then bumps the generation twice."""
    if not _WATCHING[0]:
        _PID[0] = os.getpid()
        if hasattr(os, "register_at_fork"):  # no fork where it is missing (Windows)
            os.register_at_fork(after_in_child=_forked)
        _WATCHING[0] = True


def process_id() -> int:
    """``os.getpid()`` without a system call per use (lock tokens and owners)."""
    if not _WATCHING[0]:
        _watch_forks()
    return _PID[0]


#: what a first try may raise that run() maps (and retries, when transient)
_TRIED: tuple[type[BaseException], ...] = (*TRANSIENT, *REDIS_ERRORS)


def _retries(policy: RetryPolicy, exc: BaseException, retry: bool, client: Any) -> bool:
    """Is ``exc``, raised by a first try on ``client``, worth the rest of the retry
    schedule?

    A reply that did not come within the socket timeout is retried only when that
    timeout fits in ``policy.max_time``: on a hung Redis the retry waits as long again
    (first in its new connection's handshake), which doubled a cache call's stall (a
    paused server: 2.0 s per call with the 1 s default, 4 s before the breaker opened)
    where the policy promises ``max_time`` for retries. A reply lost fast (a reset,
    a refused connection) is retried as before, and so is a timeout of a client whose
    socket timeout is short (``?socket_timeout=0.3``)."""
    if not (retry and _transient(exc) and policy.attempts > 1):
        return False
    if isinstance(exc, (rex.TimeoutError, TimeoutError)):
        timeout = socket_timeout(client)
        return timeout is not None and timeout <= policy.max_time
    return True


def _direct_sync(client: Any) -> bool:
    """May :meth:`SyncRedis.mget` read below redis-py's command layer on ``client``?
    Only a plain ``redis.Redis`` on a plain ``ConnectionPool``. Redis Cluster (no one
    pool), Sentinel (its pool finds the primary), memory:// (fakeredis), a
    single-connection client, a client-side cache or an MGET response callback go
    through the client's ``mget``."""
    pool = getattr(client, "connection_pool", None)
    return (
        type(client) is redis.Redis
        and type(pool) is redis.ConnectionPool
        and client.connection is None
        and getattr(pool, "cache", None) is None
        and "MGET" not in client.response_callbacks
    )


def _direct_async(client: Any) -> tuple[bool, bool]:
    """(May :meth:`AsyncRedis.mget` read below ``redis.asyncio``'s command layer on
    ``client`` (as :func:`_direct_sync`), may it pack with hiredis). redis.asyncio packs
    in Python with the pool's encoder: hiredis writes the same bytes for UTF-8 text."""
    pool = getattr(client, "connection_pool", None)
    direct = (
        type(client) is redis.asyncio.Redis
        and type(pool) is redis.asyncio.ConnectionPool
        and not client.single_connection_client
        and getattr(pool, "cache", None) is None
        and "MGET" not in client.response_callbacks
    )
    if not direct or _HIREDIS_PACKER is None:
        return direct, False
    kwargs = cast(Any, pool).connection_kwargs
    abstract: Any = redis.asyncio.connection.AbstractConnection
    try:
        utf8 = codecs.lookup(kwargs.get("encoding", "utf-8")).name == "utf-8"
    except LookupError:
        utf8 = False
    return direct, (
        utf8
        and kwargs.get("encoding_errors", "strict") == "strict"
        and getattr(cast(Any, pool).connection_class, "pack_command", None)
        is abstract.pack_command
    )


class Exchange:
    """A pooled connection for one request/reply exchange (``with Exchange(pool) as
    conn``, ``async with`` on an asyncio pool). Any failure but the server's own answer
    (ResponseError: the connection is in step) drops the connection, so that a reply
    left pending (a timeout, a cancellation) never answers the next command; it goes
    back to the pool either way. A class, not a generator: it runs on every read."""

    __slots__ = ("conn", "pool")

    def __init__(self, pool: Any) -> None:
        self.pool = pool  # redis-py's connection API is untyped

    def __enter__(self) -> Any:
        conn = self.conn = self.pool.get_connection()
        return conn

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            if kind is not None and not issubclass(kind, rex.ResponseError):
                self.conn.disconnect()
        finally:
            self.pool.release(self.conn)

    async def __aenter__(self) -> Any:
        conn = self.conn = await self.pool.get_connection()
        return conn

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            if kind is not None and not issubclass(kind, rex.ResponseError):
                await self.conn.disconnect(nowait=True)
        finally:
            await self.pool.release(self.conn)


def _read(client: redis.Redis, args: tuple[Any, ...]) -> Any:
    """Send one command on a pooled connection and read its reply: what redis-py's
    ``execute_command`` does, without its retry wrapper (off in rcache's clients:
    rcache retries itself), its closure and its observability recorders. As there, a
    connection that failed is dropped, never pooled with a reply pending; packed as
    :func:`_send` packs."""
    with Exchange(client.connection_pool) as conn:
        _send(conn, args)
        return conn.read_response()


async def _aread(
    client: redis.asyncio.Redis, args: tuple[Any, ...], packed: bool
) -> Any:
    """Async twin of :func:`_read` (``packed``: hiredis packs, see
    :func:`_direct_async`). A cancelled read drops its connection."""
    async with Exchange(client.connection_pool) as conn:
        if packed:
            await conn.send_packed_command(_hiredis_pack(args))
        else:
            await conn.send_command(*args)
        return await conn.read_response()


class FirstUse(Protocol):
    """A check run with each new main client before its first command, until it passes
    once in the process (a cluster Cache's recorded slot groups: ``_slots.py``)."""

    @property
    def checked(self) -> bool: ...

    def check(self, client: Any) -> None: ...

    async def acheck(self, client: Any) -> None: ...


class SyncRedis:
    """Lazily created sync client plus ``run``: error mapping and retries in one place."""

    def __init__(
        self, spec: ClientSpec, retry: RetryPolicy, first_use: FirstUse | None = None
    ) -> None:
        self._spec = spec
        self._retry = retry
        self._first_use = first_use
        self._client: redis.Redis | None = None
        self._gen = -1  # the fork generation whose client is ready (made, checked)
        self._made_gen = -1  # the fork generation that made _client
        self._blocking: redis.Redis | None = None
        self._blocking_gen = -1
        #: (a client, whether mget reads below its command layer), decided once per
        #: client: a test may put another client in place
        self._reads: tuple[Any, bool] = (None, False)

    @property
    def memory(self) -> bool:
        """memory:// (fakeredis, in-process: nothing blocks or hangs)."""
        return self._spec.memory

    @property
    def client(self) -> redis.Redis:
        client = self._client
        if client is None or self._gen != _FORKS[0]:
            client = self._connect()
        return client

    def _connect(self) -> redis.Redis:
        """Make this process's client, then run the first-use check with it (its
        errors mapped; until it passes, every command runs it again)."""
        _watch_forks()
        gen = _FORKS[0]
        client = self._client
        if client is None or self._made_gen != gen:
            client = self._client = self._spec.sync_client()
            self._made_gen = gen
        first_use = self._first_use
        if first_use is not None and not first_use.checked:
            try:
                first_use.check(client)
            except REDIS_ERRORS as exc:
                raise map_error(exc) from exc
        self._gen = gen
        return client

    @property
    def blocking_client(self) -> redis.Redis:
        """A second client for blocking commands (BLMOVE), whose socket timeout outlasts
        the longest block (MAX_BLOCK); the main client keeps its short timeout."""
        client = self._blocking
        if client is None or self._blocking_gen != _FORKS[0]:
            _watch_forks()
            client = self._blocking = self._spec.sync_client(blocking=True)
            self._blocking_gen = _FORKS[0]
        return client

    def run(self, op: Callable[[redis.Redis], T], *, retry: bool = True) -> T:
        """Run ``op(client)``; retry transient errors if ``retry``; map every error."""
        client = self.client
        try:
            return op(client)
        except _TRIED as exc:
            if not _retries(self._retry, exc, retry, client):
                raise map_error(exc) from exc
            first = exc
        return self._retry_after(first, op, client)

    def mget(self, keys: list[str]) -> Any:
        """``MGET keys``, the read of every cache hit, on :meth:`run`'s terms (errors
        mapped; a transient one retried on the same schedule, the failed read being the
        first attempt). On a plain client it reads below redis-py's command layer
        (:func:`_read`): ~420 fewer bytecodes a hit, ~20 us here. What that skips is
        redis-py's OpenTelemetry command metrics, for this read only."""
        client = self._client
        if client is None or self._gen != _FORKS[0]:
            client = self.client
        reads = self._reads
        if reads[0] is not client:
            reads = self._reads = (client, _direct_sync(client))
        try:
            if reads[1]:
                return _read(client, ("MGET", *keys))
            return client.mget(keys)
        except _TRIED as exc:
            if not _retries(self._retry, exc, True, client):
                raise map_error(exc) from exc
            first = exc
        return self._retry_after(first, lambda c: c.mget(keys), client)

    def _retry_after(
        self, first: BaseException, op: Callable[[redis.Redis], T], client: redis.Redis
    ) -> T:
        """The rest of the retry schedule after a first try failed with ``first``."""
        try:
            return tenacity.Retrying(**_retry_options(self._retry, client))(op, client)
        except _REDIS_OR_OS_ERRORS as exc:
            raise map_error(exc) from first

    def close(self) -> None:
        if self._client is not None and self._spec.user_client is not self._client:
            self._client.close()
            _close_sentinels(self._client)
        if self._blocking is not None:
            self._blocking.close()
            if self._spec.user_client is not self._blocking:
                _close_sentinels(self._blocking)
        self._client = self._blocking = None
        self._reads = (None, False)


class AsyncRedis:
    """One ``redis.asyncio`` client per running event loop; same ``run`` contract."""

    def __init__(
        self, spec: ClientSpec, retry: RetryPolicy, first_use: FirstUse | None = None
    ) -> None:
        self._spec = spec
        self._retry = retry
        self._first_use = first_use
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, redis.asyncio.Redis
        ] = weakref.WeakKeyDictionary()
        # clients made before first_use passed (run() checks before moving them over)
        self._unchecked: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, redis.asyncio.Redis
        ] = weakref.WeakKeyDictionary()
        self._checking: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.Lock
        ] = weakref.WeakKeyDictionary()
        self._blocking: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, redis.asyncio.Redis
        ] = weakref.WeakKeyDictionary()
        #: (weak reference to a client, does mget read below its command layer, does
        #: it pack with hiredis): decided once per client, which lives with its loop
        self._reads: tuple[Callable[[], Any], bool, bool] = (_nothing, False, False)

    @property
    def memory(self) -> bool:
        """memory:// (see SyncRedis.memory)."""
        return self._spec.memory

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
            client = self._unchecked.get(loop)
            if client is None:
                client = self._spec.async_client()
                first_use = self._first_use
                if first_use is None or first_use.checked:
                    self._clients[loop] = client
                else:
                    self._unchecked[loop] = client
        return client

    async def _connect(self) -> redis.asyncio.Redis:
        """This loop's client, once the first-use check passed (see SyncRedis)."""
        loop = asyncio.get_running_loop()
        client = self.client
        first_use = self._first_use
        if first_use is not None and not first_use.checked:
            # one check per loop at a time: the loop's other first commands wait for
            # it rather than race a client that is still connecting
            lock = self._checking.get(loop)
            if lock is None:
                lock = self._checking[loop] = asyncio.Lock()
            async with lock:
                if not first_use.checked:
                    try:
                        await first_use.acheck(client)
                    except REDIS_ERRORS as exc:
                        raise map_error(exc) from exc
        self._unchecked.pop(loop, None)
        self._clients[loop] = client
        return client

    async def run(
        self, op: Callable[[redis.asyncio.Redis], Awaitable[T]], *, retry: bool = True
    ) -> T:
        asked = _cancel_requests()
        result = await self._run(op, retry)
        _raise_if_cancelled(asked)  # a cancellation redis-py swallowed (see there)
        return result

    async def _run(
        self, op: Callable[[redis.asyncio.Redis], Awaitable[T]], retry: bool
    ) -> T:
        client = self._clients.get(asyncio.get_running_loop())
        if client is None:
            client = await self._connect()
        try:
            return await op(client)
        except _TRIED as exc:
            if not _retries(self._retry, exc, retry, client):
                raise map_error(exc) from exc
            first = exc
        return await self._retry_after(first, op, client)

    async def mget(self, keys: list[str]) -> Any:
        """Async twin of :meth:`SyncRedis.mget`; a cancellation that redis-py swallowed
        is raised as in :meth:`run`, after the connection went back to the pool."""
        asked = _cancel_requests()
        client = self.client
        reads = self._reads
        if reads[0]() is not client:
            reads = self._reads = (weakref.ref(client), *_direct_async(client))
        try:
            if reads[1]:
                rows = await _aread(client, ("MGET", *keys), reads[2])
            else:
                rows = await client.mget(keys)
        except _TRIED as exc:
            if not _retries(self._retry, exc, True, client):
                raise map_error(exc) from exc
            rows = await self._retry_after(exc, lambda c: c.mget(keys), client)
        _raise_if_cancelled(asked)
        return rows

    async def _retry_after(
        self,
        first: BaseException,
        op: Callable[[redis.asyncio.Redis], Awaitable[T]],
        client: redis.asyncio.Redis,
    ) -> T:
        """The rest of the retry schedule after a first try failed with ``first``."""

        async def attempt() -> T:
            # a coroutine *function*: tenacity would not await a lambda's coroutine
            return await op(client)

        try:
            return await tenacity.AsyncRetrying(**_retry_options(self._retry, client))(
                attempt
            )
        except _REDIS_OR_OS_ERRORS as exc:
            raise map_error(exc) from first

    async def aclose(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        for clients in (self._clients, self._unchecked, self._blocking):
            client = clients.pop(loop, None)
            if client is not None:
                await client.aclose()
                # a redis+sentinel:// client also holds connections to the sentinels
                pool = _sentinel_pool(client)
                if pool is not None:
                    for sentinel in pool.sentinel_manager.sentinels:
                        await sentinel.aclose()


def _nothing() -> None:
    """A dead weak reference's answer (no client decided yet)."""
    return None


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
    # source = destination: one key, so one hash slot on Redis Cluster
    client.blmove(probe, probe, 0.01)  # type: ignore[arg-type]
    db = connection_kwargs(client).get("db", 0)
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
    await client.blmove(probe, probe, 0.01)  # type: ignore[arg-type]
    db = connection_kwargs(client).get("db", 0)
    return _check_report(info, int(db or 0))


_INCLUDE = re.compile(r"^-- @include (_\w+)$", re.MULTILINE)


class LuaScript:
    """A Lua script: rcache's own (``rcache/_scripts/NAME.lua``) from its ``name``, or
    any ``source`` (integrations: ``rcache.spi.packaged_script``).

    Called with EVALSHA; on NOSCRIPT (a restarted or flushed server) it loads the source
    and retries once, so the next call after a Redis restart still works. The header of
    every script states its KEYS, ARGV and return codes. A line ``-- @include NAME``
    pastes the shared preamble ``rcache/_scripts/NAME.lua``. Integrations run it on a
    cache with ``rcache.spi.run_script``, which maps errors.
    """

    def __init__(self, name: str, source: str | None = None) -> None:
        self.name = name
        self._given = source
        # (source, sha), read and hashed on first use: nothing is read at import time
        self._loaded: tuple[str, str] | None = None

    def _load(self) -> tuple[str, str]:
        import hashlib
        from importlib import resources

        def read(script: str) -> str:
            return resources.files("rcache._scripts").joinpath(script).read_text()

        source = self._given
        if source is None:
            source = read(f"{self.name}.lua")
        # Shared preambles (server clock, fences) are written once, in _shared.lua, and
        # pasted where a script says "-- @include NAME": Redis scripts cannot import.
        source = _INCLUDE.sub(lambda m: read(f"{m.group(1)}.lua"), source)
        loaded = self._loaded = (source, hashlib.sha1(source.encode()).hexdigest())
        return loaded

    @property
    def source(self) -> str:
        """The script's text, shared preambles pasted in."""
        return (self._loaded or self._load())[0]

    @property
    def sha(self) -> str:
        """The SHA1 that EVALSHA names it by."""
        return (self._loaded or self._load())[1]

    def __call__(
        self, client: redis.Redis, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        """Run on ``client`` (redis-py's errors, unmapped)."""
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except rex.NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)

    async def acall(
        self, client: redis.asyncio.Redis, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        """Async twin of calling the script, on a ``redis.asyncio.Redis``."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except rex.NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    def _queue(
        self, client: Any, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]
    ) -> Any:
        return by_slot(
            client,
            [("EVALSHA", self.sha, len(keys), *keys, *args) for keys, args in calls],
            [keys[0] for keys, _ in calls],
        )

    @staticmethod
    def _failed(replies: Sequence[Any]) -> list[int]:
        """The calls that met NOSCRIPT (their node lost the script), or raise the
        first other error."""
        missing = []
        for i, reply in enumerate(replies):
            if isinstance(reply, rex.NoScriptError):
                missing.append(i)
            elif isinstance(reply, Exception):
                raise reply
        return missing

    def each(
        self, client: Any, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]
    ) -> list[Any]:
        """Run the script once per ``(keys, args)`` in one pipeline: on a cluster, one
        round trip per node, all nodes at once. The calls that met NOSCRIPT run again
        after SCRIPT LOAD (which a cluster client sends to every primary)."""
        replies = list(self._queue(client, calls).execute(raise_on_error=False))
        missing = self._failed(replies)
        if missing:
            client.script_load(self.source)
            again = self._queue(client, [calls[i] for i in missing]).execute()
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def aeach(
        self, client: Any, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]
    ) -> list[Any]:
        """Async twin of :meth:`each`."""
        replies = list(await self._queue(client, calls).execute(raise_on_error=False))
        missing = self._failed(replies)
        if missing:
            await client.script_load(self.source)
            again = await self._queue(client, [calls[i] for i in missing]).execute()
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies


def by_slot(client: Any, commands: Sequence[Sequence[Any]], keys: Sequence[str]) -> Any:
    """A Redis Cluster pipeline of ``commands``, each sent to the primary serving the
    slot of its key in ``keys`` (all of a command's keys share that slot). Naming the
    node spares redis-py's per-command key extraction (most of a 256-command
    pipeline's client time); the pipeline still follows MOVED/ASK. Its ``execute()``
    writes to every node before it reads a reply: one round trip per node, all at
    once."""
    pipe = client.pipeline()
    if not client.nodes_manager.slots_cache:  # an asyncio client before its first use
        for command in commands:
            pipe.execute_command(*command)
        return pipe
    primary = _primary_of(client)
    for command, key in zip(commands, keys, strict=True):
        pipe.execute_command(*command, target_nodes=[primary(key)])
    return pipe


def delete_each(client: Any, keys: Sequence[str]) -> Any:
    """``DEL`` of each key (they span slots), pipelined per node: the replies in order
    (a list, or an awaitable of one with an asyncio cluster client)."""
    return by_slot(client, [("DEL", k) for k in keys], keys).execute()


#: deletes keys of several slots on the node that serves them (cluster_delete.lua)
_CLUSTER_DELETE: list[LuaScript] = []


def _cluster_delete() -> LuaScript:
    if not _CLUSTER_DELETE:  # read on first use, not at import
        _CLUSTER_DELETE.append(LuaScript("cluster_delete"))
    return _CLUSTER_DELETE[0]


def _primary_of(client: Any) -> Callable[[str], Any]:
    """key -> the primary serving its slot, from the cluster client's slot map. Read
    straight from ``slots_cache`` (primary first): ``get_node_from_slot`` goes through a
    deprecation wrapper that cost more than the rest of a 256-key fan-out."""
    from redis.crc import key_slot

    manager = client.nodes_manager
    slots = manager.slots_cache

    def primary(key: str) -> Any:
        slot = key_slot(key.encode("utf-8", "surrogatepass"))
        nodes = slots.get(slot)
        # an uncovered slot: redis-py's own call raises SlotNotCoveredError
        return nodes[0] if nodes else manager.get_node_from_slot(slot)

    return primary


def _by_node(client: Any, keys: Sequence[str]) -> dict[str, tuple[Any, list[int]]]:
    """node name -> (node, positions in ``keys`` of the keys it serves)."""
    primary = _primary_of(client)
    nodes: dict[str, tuple[Any, list[int]]] = {}
    for i, key in enumerate(keys):
        node = primary(key)
        nodes.setdefault(node.name, (node, []))[1].append(i)
    return nodes


def _delete_pipe(
    client: Any,
    script: LuaScript,
    keys: Sequence[str],
    parts: list[tuple[Any, list[int]]],
) -> Any:
    pipe = client.pipeline()
    for node, positions in parts:
        args = [keys[i] for i in positions]
        pipe.execute_command("EVALSHA", script.sha, 0, *args, target_nodes=[node])
    return pipe


def _delete_replies(
    keys: Sequence[str],
    parts: list[tuple[Any, list[int]]],
    replies: Sequence[Any],
    out: list[int],
) -> tuple[list[tuple[Any, list[int]]], list[int]]:
    """Fill ``out`` from the nodes that answered; (the parts that met NOSCRIPT, the
    positions of keys to delete one by one: a node no longer serves their slot)."""
    noscript: list[tuple[Any, list[int]]] = []
    single: list[int] = []
    for part, reply in zip(parts, replies, strict=True):
        if isinstance(reply, rex.NoScriptError):
            noscript.append(part)
        elif isinstance(reply, rex.ResponseError):
            single.extend(part[1])  # "non local key": slots moved since the map
        elif isinstance(reply, BaseException):
            raise reply
        else:
            for i, n in zip(part[1], reply, strict=True):
                out[i] = int(n)
    return noscript, single


def delete_by_node(client: Any, keys: Sequence[str]) -> list[int]:
    """Delete ``keys`` (they span slots) with one command per node serving them, all
    nodes at once (cluster_delete.lua); one integer per key, 1 if it existed. A node
    that no longer serves a key's slot (resharding, a failover not seen yet) has its
    keys deleted one by one, following MOVED."""
    if not client.nodes_manager.slots_cache:
        return [int(n) for n in delete_each(client, keys)]
    script = _cluster_delete()
    out = [0] * len(keys)
    parts = list(_by_node(client, keys).values())
    replies = _delete_pipe(client, script, keys, parts).execute(raise_on_error=False)
    noscript, single = _delete_replies(keys, parts, replies, out)
    if noscript:
        client.script_load(script.source)  # every primary
        replies = _delete_pipe(client, script, keys, noscript).execute(
            raise_on_error=False
        )
        single += _delete_replies(keys, noscript, replies, out)[1]
    if single:
        replies = delete_each(client, [keys[i] for i in single])
        for i, n in zip(single, replies, strict=True):
            out[i] = int(n)
    return out


async def adelete_by_node(client: Any, keys: Sequence[str]) -> list[int]:
    """Async twin of :func:`delete_by_node`."""
    if not client.nodes_manager.slots_cache:
        return [int(n) for n in await delete_each(client, keys)]
    script = _cluster_delete()
    out = [0] * len(keys)
    parts = list(_by_node(client, keys).values())
    pipe = _delete_pipe(client, script, keys, parts)
    replies = await pipe.execute(raise_on_error=False)
    noscript, single = _delete_replies(keys, parts, replies, out)
    if noscript:
        await client.script_load(script.source)
        pipe = _delete_pipe(client, script, keys, noscript)
        replies = await pipe.execute(raise_on_error=False)
        single += _delete_replies(keys, noscript, replies, out)[1]
    if single:
        replies = await delete_each(client, [keys[i] for i in single])
        for i, n in zip(single, replies, strict=True):
            out[i] = int(n)
    return out


def mget_each(client: Any, reads: Sequence[Sequence[str]]) -> Any:
    """One ``MGET`` per list of keys (each list in one slot), pipelined per node."""
    commands = [("MGET", *keys) for keys in reads]
    return by_slot(client, commands, [keys[0] for keys in reads]).execute()


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
    if type(client) is not redis.Redis and _is_cluster_client(client):
        # A RedisCluster has no one pool: run the command on the client of the node
        # serving its slot. That bypasses the cluster client's MOVED handling, so a
        # MOVED re-reads the slot table for the next try (a failover moved the slot).
        cluster: Any = client
        node = cluster.nodes_manager.get_node_from_slot(cluster.determine_slot(*args))
        node_client = node.redis_connection
        if node_client is None:  # redis-py drops it after the node's connection error
            _refresh_slots(cluster)
            raise rex.ConnectionError(f"Redis Cluster node {node.name}: no connection")
        try:
            return command_within(node_client, limit, *args, on_sent=on_sent)
        except _SLOT_STALE:
            _refresh_slots(cluster)
            raise
    with Exchange(client.connection_pool) as conn:
        try:
            _send(conn, args)
            if on_sent is not None:
                on_sent()
            # Without a tighter limit the socket timeout bounds the read: no poll first.
            wait = _reply_wait(limit, conn.socket_timeout)
            if wait is not None and not conn.can_read(timeout=wait):
                raise rex.TimeoutError(f"no reply from Redis within {wait}s")
            # A plain client's reply to a command without a response callback (EVALSHA,
            # not BLPOP) is what its parse_response would return: read it directly. The
            # names are upper case, as redis-py's case-insensitive table stores them, so
            # a plain dict lookup tells. A subclass may hook parse_response: keep it.
            name = args[0]
            callbacks: Any = client.response_callbacks
            if type(client) is redis.Redis and not dict.__contains__(callbacks, name):
                return conn.read_response()
            return client.parse_response(conn, str(name))  # type: ignore[no-untyped-call]
        except (TypeError, AttributeError) as exc:
            conn.disconnect()
            if getattr(conn, "_sock", None) is not None:
                raise
            # Another thread closed the client (Cache.close()) while this one waited:
            # the poll woke on the shut-down socket and redis-py's reader then met
            # _sock None (TypeError from hiredis' can_read, AttributeError from the
            # Python parser). A waiter must see a closed connection, not a TypeError
            # out of acquire().
            raise rex.ConnectionError(
                "the connection was closed while waiting"
            ) from exc


#: What tells that the slot table a command was routed by is out of date: the slot
#: moved (MOVED), or its node is gone (refused, reset: a SIGKILLed primary whose
#: replica takes over). command_within and acommand_within route below the cluster
#: client, which would refresh its table itself on these; a reply that did not come in
#: time (TimeoutError) is not one: a hung node would hang the refresh as well.
_SLOT_STALE: tuple[type[BaseException], ...] = (rex.MovedError, rex.ConnectionError)


def _refresh_slots(cluster: Any) -> None:
    """Re-read a sync cluster client's slot table for the next try (if every node is
    down, the next try reports it)."""
    try:
        cluster.nodes_manager.initialize()
    except _REDIS_OR_OS_ERRORS:
        pass


async def _arefresh_slots(client: Any, exc: BaseException) -> None:
    """Async twin of :func:`_refresh_slots` for an asyncio cluster client (else
    nothing); not after MaxConnectionsError (the pool, not the node)."""
    if not _is_cluster_client(client) or isinstance(exc, rex.MaxConnectionsError):
        return
    try:
        await client.nodes_manager.initialize()
    except _REDIS_OR_OS_ERRORS:
        pass  # every node down: the next try reports it


def _send(conn: Any, args: tuple[Any, ...]) -> None:
    """``conn.send_command(*args)``; with redis-py's hiredis packer, packed by hiredis
    directly, as that packer does for rcache's arguments (a command name without
    spaces, str/bytes/numbers), without its per-argument generator: an EVALSHA has
    8-10 arguments, and packing them cost a lock more than its own logic."""
    if type(getattr(conn, "_command_packer", None)) is _HIREDIS_PACKER:
        conn.send_packed_command([_hiredis_pack(args)])
    else:
        conn.send_command(*args)


def _reply_wait(limit: float | None, socket_timeout: float | None) -> float | None:
    """How long to wait for a reply when ``limit`` bounds it more tightly than the
    connection's socket timeout, which bounds every read anyway; else None (no poll
    before the read, no ``wait_for`` task: the common case costs what a plain command
    costs)."""
    if limit is None or (socket_timeout is not None and limit >= socket_timeout):
        return None
    return max(limit, 0.001)


def _cancel_requests() -> tuple[Any, int]:
    """(The current task, how many times it was asked to cancel and did not uncancel):
    what :func:`_raise_if_cancelled` compares with later. ``Task.cancelling()`` is
    Python >= 3.11; on 3.10, where this cannot be told, (None, 0). The task is looked
    up once: ``asyncio.current_task`` is Python code before 3.12."""
    task: Any = asyncio.current_task()
    if task is None or not _CAN_TELL:
        return None, 0
    return task, task.cancelling()


#: Task.cancelling() exists (Python >= 3.11)
_CAN_TELL = hasattr(asyncio.Task, "cancelling")


def _raise_if_cancelled(asked: tuple[Any, int]) -> None:
    """Deliver a cancellation that was requested since ``asked`` but never raised.

    Before Python 3.12, ``asyncio.wait_for`` returns the inner result when the
    caller's cancellation and the inner completion land in the same loop turn
    (CPython gh-86296), and redis-py wraps every send's ``drain()`` (and the connect
    handshake) in it: a cancelled lock acquire then went on to BLPOP and took the lock
    when the holder's lease ran out, 10 s later. The callers undo by token what the
    call may have done, as for any cancellation.
    """
    task, count = asked
    if task is not None and task.cancelling() > count:
        raise asyncio.CancelledError


async def acommand_within(
    client: redis.asyncio.Redis,
    limit: float | None,
    *args: Any,
    on_sent: Callable[[], object] | None = None,
) -> Any:
    """Async twin of :func:`command_within`."""
    if _is_cluster_client(client):
        # Run on a connection of the node serving the slot, as the sync twin does, so
        # that the cancellation checks below apply: through the cluster client's own
        # execute_command, a cancellation swallowed by redis-py's wait_for around the
        # send (gh-86296) went on to BLPOP, and a cancelled waiter took the lock.
        cluster: Any = client
        asked = _cancel_requests()
        await cluster.initialize()  # once: a no-op when the slot table is read
        node = (await cluster.get_nodes_from_slot(*args))[0]
        try:
            return await _acommand_on(
                node, node.acquire_connection(), asked, limit, args, on_sent
            )
        except _SLOT_STALE as exc:
            await _arefresh_slots(cluster, exc)
            raise
    asked = _cancel_requests()
    pool: Any = client.connection_pool
    conn: Any = await pool.get_connection()
    try:
        return await _acommand_on(client, conn, asked, limit, args, on_sent)
    finally:
        await pool.release(conn)


async def _acommand_on(
    parser: Any,
    conn: Any,
    asked: tuple[Any, int],
    limit: float | None,
    args: tuple[Any, ...],
    on_sent: Callable[[], object] | None,
) -> Any:
    """acommand_within's command on ``conn``, whose reply ``parser`` (a client, or a
    cluster node) parses; ``asked``: the cancellations before the connection was
    taken. A cluster node's connection goes back to its node here."""
    node = _is_cluster_node(parser)
    try:
        if node:
            # what the node's own execute_command does first: a connection marked
            # at a topology refresh (stale READONLY or routing state) reconnects
            await parser.disconnect_if_needed(conn)
        _raise_if_cancelled(asked)
        await conn.send_command(*args)
        if on_sent is not None:
            on_sent()
        # before the read: a swallowed cancellation must not wait out a BLPOP
        _raise_if_cancelled(asked)
        reply = parser.parse_response(conn, str(args[0]))
        wait = _reply_wait(limit, conn.socket_timeout)
        if wait is None:
            return await reply  # the socket timeout bounds it: no wait_for task
        try:
            return await asyncio.wait_for(reply, wait)
        except asyncio.TimeoutError:
            raise rex.TimeoutError(f"no reply from Redis within {wait}s") from None
    except rex.ResponseError:
        raise
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    finally:
        if node:
            parser.release(conn)


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


# -- a write confirmed by replicas: the script and WAIT on one connection ---------------


def _confirm_commands(
    script: LuaScript, keys: list[Any], args: list[Any], replicas: int, wait_ms: int
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return ("EVALSHA", script.sha, len(keys), *keys, *args), ("WAIT", replicas, wait_ms)


def _confirm_end(
    limit: float | None, socket_timeout: Any, wait_ms: int
) -> float | None:
    """When the last reply (WAIT's) must have come: the script's own bound (``limit``,
    else the socket timeout) plus WAIT's timeout, which it spends on the server."""
    base = limit if limit is not None else socket_timeout
    if base is None:
        return None
    return time.monotonic() + float(base) + wait_ms / 1000


def _confirmed(replies: list[Any]) -> tuple[Any, int] | None:
    """(script reply, replicas that acknowledged), or None after NOSCRIPT (load the
    script and send both again); a server error raises (WAIT on a replica, MOVED)."""
    reply, acked = replies
    if isinstance(reply, rex.NoScriptError):
        return None
    for item in (reply, acked):
        if isinstance(item, BaseException):
            raise item
    return reply, int(acked)


def eval_confirmed_within(
    client: redis.Redis,
    script: LuaScript,
    keys: list[Any],
    args: list[Any],
    replicas: int,
    wait_ms: int,
    limit: float | None,
    on_sent: Callable[[], object] | None = None,
) -> tuple[Any, int]:
    """Run ``script`` and then ``WAIT replicas wait_ms``, written at once on one
    connection; replies (the script's reply, how many replicas acknowledged).

    WAIT counts the replicas that acknowledged the writes of *its own* connection, so
    it must follow the script on the same one (a pooled client's next command may take
    another connection; Redisson's ``syncSlaves`` batches them likewise). The script's
    reply is awaited at most ``limit`` s (None: the socket timeout), WAIT's that plus
    ``wait_ms``. On Redis Cluster both go to the primary serving ``keys[0]``'s slot.
    """
    if type(client) is not redis.Redis and _is_cluster_client(client):
        cluster: Any = client
        node = cluster.nodes_manager.get_node_from_slot(cluster.keyslot(keys[0]))
        node_client = node.redis_connection
        if node_client is None:  # as in command_within
            _refresh_slots(cluster)
            raise rex.ConnectionError(f"Redis Cluster node {node.name}: no connection")
        try:
            return eval_confirmed_within(
                node_client,
                script,
                keys,
                args,
                replicas,
                wait_ms,
                limit,
                on_sent,
            )
        except _SLOT_STALE:  # a failover moved the slot: re-read (see command_within)
            _refresh_slots(cluster)
            raise
    commands = _confirm_commands(script, keys, args, replicas, wait_ms)
    replies: list[Any] = []
    with Exchange(client.connection_pool) as conn:
        conn.send_packed_command(conn.pack_commands(commands))
        if on_sent is not None:
            on_sent()
        end = _confirm_end(limit, conn.socket_timeout, wait_ms)
        for _ in commands:
            if end is not None:
                wait = max(end - time.monotonic(), 0.001)
                if not conn.can_read(timeout=wait):
                    raise rex.TimeoutError(f"no reply from Redis within {wait:.3f}s")
            try:
                replies.append(conn.read_response())
            except rex.ResponseError as exc:  # read whole: the connection is in sync
                replies.append(exc)
    result = _confirmed(replies)
    if result is None:
        client.script_load(script.source)
        return eval_confirmed_within(
            client, script, keys, args, replicas, wait_ms, limit, on_sent
        )
    return result


async def aeval_confirmed_within(
    client: redis.asyncio.Redis,
    script: LuaScript,
    keys: list[Any],
    args: list[Any],
    replicas: int,
    wait_ms: int,
    limit: float | None,
    on_sent: Callable[[], object] | None = None,
) -> tuple[Any, int]:
    """Async twin of :func:`eval_confirmed_within`."""
    commands = _confirm_commands(script, keys, args, replicas, wait_ms)
    asked = _cancel_requests()
    if _is_cluster_client(client):
        cluster: Any = client
        if not cluster.nodes_manager.slots_cache:
            await cluster.initialize()
        node = cluster.get_node_from_key(keys[0])
        conn: Any = node.acquire_connection()
        release: Callable[[], Any] = lambda: node.release(conn)  # noqa: E731
    else:
        pool: Any = client.connection_pool
        conn = await pool.get_connection()
        release = lambda: pool.release(conn)  # noqa: E731
    try:
        try:
            _raise_if_cancelled(asked)
            await conn.send_packed_command(conn.pack_commands(commands))
            if on_sent is not None:
                on_sent()
            _raise_if_cancelled(asked)
            end = _confirm_end(limit, conn.socket_timeout, wait_ms)
            replies: list[Any] = []
            for _ in commands:
                wait = None if end is None else max(end - time.monotonic(), 0.001)
                try:
                    replies.append(await conn.read_response(timeout=wait))
                except rex.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            done = release()
            if inspect.isawaitable(done):
                await done
        result = _confirmed(replies)
    except _SLOT_STALE as exc:
        await _arefresh_slots(client, exc)
        raise
    if result is None:
        await client.script_load(script.source)  # a cluster client: every primary
        return await aeval_confirmed_within(
            client, script, keys, args, replicas, wait_ms, limit, on_sent
        )
    return result


# -- transactions: one redis-py pipeline in WATCH/MULTI/EXEC mode -----------------------


class TxConflict(Exception):
    """EXEC was refused because a watched key changed: nothing was written."""


class TxUnsent(Exception):
    """A connection error before EXEC was sent: nothing was written."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(original)
        self.original = original


#: Connection-level failures: whether an EXEC already sent was applied is unknown.
_LOST: tuple[type[BaseException], ...] = (*TRANSIENT, OSError)

_AFTER_EXEC = (
    "the connection to Redis was lost after EXEC was sent, so the transaction may "
    "or may not have been applied; it is not retried because running it again could "
    "apply it twice: check the data before trying again"
)


def _watch_lost(exc: rex.WatchError) -> bool:
    """True if redis-py raised this WatchError for a dead connection, not a conflict.

    redis-py raises ``WatchError("A ConnectionError occurred while watching ...")``
    from inside its retry handler (``Pipeline._disconnect_raise_on_watching``), so the
    connection error is the ``__context__``.
    """
    return isinstance(exc.__context__, _LOST)


def _at_exec(exc: BaseException) -> BaseException | None:
    """What a failure of EXEC means; None: not Redis's (a cancellation)."""
    if isinstance(exc, rex.WatchError):
        if _watch_lost(exc):
            return BackendUnavailableError(_AFTER_EXEC, exc.__context__)
        return TxConflict()
    if isinstance(exc, _LOST):
        return BackendUnavailableError(_AFTER_EXEC, exc)
    if isinstance(exc, REDIS_ERRORS):
        return map_error(exc)
    return None


def _cause(signal: BaseException, exc: BaseException) -> BaseException | None:
    # a conflict is no error of redis-py's to show; the rest keep what redis-py raised
    return None if isinstance(signal, TxConflict) else exc


def _before_exec(exc: BaseException) -> BaseException | None:
    """What a failure before EXEC means; None: the caller's own exception."""
    if isinstance(exc, rex.WatchError):
        # a conflict here means the caller's function ran EXEC itself
        return TxUnsent(exc.__context__ or exc) if _watch_lost(exc) else TxConflict()
    # Only redis-py's connection errors mean "nothing was sent": an OSError or
    # TimeoutError raised by the caller's own function must propagate unchanged.
    if isinstance(exc, REDIS_CONNECTION_ERRORS):
        return TxUnsent(exc)
    if isinstance(exc, REDIS_ERRORS):
        return map_error(exc)
    return None


class TxPipeline:
    """The redis-py pipeline of one optimistic transaction (sync and async twins).

    The only code that knows redis-py's WATCH pipeline and its internals. Each step
    says what a failure means for the transaction flow (``_transaction.py``):

    * before EXEC (WATCH, the caller's function and reads): a lost connection raises
      :class:`TxUnsent` (nothing written, safe to retry); a WatchError is a conflict
      (:class:`TxConflict`) unless redis-py raised it for a lost connection; any other
      Redis error is mapped; the caller's own exception propagates unchanged. The
      pipeline is reset (UNWATCH, connection back to the pool) after any of them.
    * EXEC: a conflict raises :class:`TxConflict`; a lost connection raises
      BackendUnavailableError, since the transaction may have been applied and running
      it again could apply it twice.
    """

    __slots__ = ("_client", "_connect", "_pipe", "cluster")

    def __init__(self, client: Any) -> None:
        self.cluster = _is_cluster_client(client)
        self._client = client
        # redis-py 8.1's asyncio cluster transaction does not initialize the client
        # (slots, node connections) itself: WATCH as the client's first command fails
        # with "got Future attached to a different loop". (The sync client initializes
        # in its constructor.)
        self._connect = self.cluster
        self._pipe: Any = client.pipeline(transaction=True)  # sends nothing

    def call(self, op: Callable[[Any], T]) -> T:
        """``op(pipe)`` before EXEC (see the class docstring)."""
        try:
            return op(self._pipe)
        except BaseException as exc:
            self._reset()
            signal = _before_exec(exc)
            if signal is None:
                raise
            raise signal from _cause(signal, exc)

    async def acall(self, op: Callable[[Any], Any]) -> Any:
        """Async twin of :meth:`call`; awaits what ``op`` returns if it is awaitable."""
        if self._connect:
            try:
                await self._client.initialize()  # idempotent
            except REDIS_ERRORS as exc:
                raise map_error(exc) from exc
            self._connect = False
        try:
            result = op(self._pipe)
            return await result if inspect.isawaitable(result) else result
        except BaseException as exc:
            await self._areset()
            signal = _before_exec(exc)
            if signal is None:
                raise
            raise signal from _cause(signal, exc)

    def execute(self, queue: Callable[[Any], object] | None = None) -> list[Any]:
        """``queue(pipe)`` (MULTI and the writes, still before EXEC), then EXEC."""
        if queue is not None:
            self.call(queue)
        try:
            return cast("list[Any]", self._pipe.execute())
        except BaseException as exc:
            signal = _at_exec(exc)
            if signal is None:
                raise
            raise signal from _cause(signal, exc)

    async def aexecute(self, queue: Callable[[Any], object] | None = None) -> list[Any]:
        """Async twin of :meth:`execute`."""
        if queue is not None:
            await self.acall(queue)
        try:
            return cast("list[Any]", await self._pipe.execute())
        except BaseException as exc:
            signal = _at_exec(exc)
            if signal is None:
                raise
            raise signal from _cause(signal, exc)

    def release(self) -> None:
        """Reset the pipeline if it still WATCHes or holds a connection."""
        if self._in_use():
            self._reset()

    async def arelease(self) -> None:
        """Async twin of :meth:`release`."""
        if self._in_use():
            await self._areset()

    def _in_use(self) -> bool:
        pipe = self._pipe
        # A cluster pipeline (redis-py >= 6) keeps WATCH state in its execution
        # strategy, not in .watching/.connection: always reset it.
        if not hasattr(pipe, "watching"):
            return True
        return bool(pipe.watching or pipe.connection is not None)

    def _reset(self) -> None:
        """UNWATCH and give the connection back; a dead connection is just dropped."""
        pipe = self._pipe
        try:
            pipe.reset()
        except (RedisError, OSError):
            if not hasattr(pipe, "watching"):
                return  # a cluster pipeline's reset() drops its connection itself
            # redis-py's reset() only catches ConnectionError around UNWATCH; after a
            # timeout the connection is in an unknown state: drop it, keep the pool
            # whole.
            conn = self._detach()
            if conn is not None:
                conn.disconnect()
                pipe.connection_pool.release(conn)

    async def _areset(self) -> None:
        pipe = self._pipe
        try:
            await pipe.reset()
        except (RedisError, OSError):
            if not hasattr(pipe, "watching"):
                return
            conn = self._detach()
            if conn is not None:
                await conn.disconnect()
                await pipe.connection_pool.release(conn)

    def _detach(self) -> Any:
        """Take the connection off a pipeline whose reset failed; clear its state."""
        pipe = self._pipe
        conn, pipe.connection = pipe.connection, None
        pipe.watching = False
        pipe.explicit_transaction = False
        return conn


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
