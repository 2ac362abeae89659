"""Server-assisted invalidation for the local tier: ``CLIENT TRACKING`` in RESP2.

* **One listener per process and Redis server**: a connection pinned to RESP2 (redis-py
  8 speaks RESP3 by default, and its PubSub drops RESP3 ``invalidate`` pushes without a
  word), subscribed to ``__redis__:invalidate``. Redis sends it the names of tracked
  keys that were written, deleted, expired or evicted (also when its tracking table
  overflows: the keys it forgets are sent as invalidated), and a null message on
  FLUSHALL/FLUSHDB. The listener is PINGed every second; no PONG within a second, an
  error or an EOF counts as lost: the tier is flushed, reads stop storing, and the
  listener reconnects (10 ms, then doubling up to 2 s). A server restart is an EOF.
* **Tracked reads**: a dedicated RESP2 pool per ``Cache`` (per mode; per event loop for
  asyncio) whose connections send ``CLIENT TRACKING ON REDIRECT <listener id>``
  pipelined with their first read, and again after every reconnect of theirs (a
  connect callback forgets the redirect) or of the listener (the id changed). Only
  the local tier's reads run there, so Redis tracks exactly the keys it holds.
  (OPTIN on the main pool was measured too: one more command per read, ``CLIENT
  CACHING YES``, for the same tracking; see CHANGELOG.)
* **One thread**, ``rcache-tracking``, serves every listener of the process through a
  selector; it starts with the first local tier used and ends when no store is left.
  With listeners on several servers, a reconnect runs on a short-lived helper thread
  (``rcache-tracking-connect``): a server that hangs would otherwise hold the thread
  for its connect timeout and delay the other servers' invalidations by as much.
  Nothing happens at import time. A forked child starts with an empty tier and no
  listener; the first read there connects its own.

* **Redis Cluster** (:class:`ClusterListeners`): a listener per primary, all feeding
  one guard (``CLIENT TRACKING REDIRECT`` names a client of the same server, so each
  node's tracked connections redirect to that node's listener). An entry's keys share
  a slot (slot groups), so its read is one command on the primary serving that slot,
  on a tracked connection of that node (a :class:`TrackedReader` per node). The slot
  map is read on a helper thread at start and checked every second (``CLUSTER
  SLOTS``); a change of it, a read that meets MOVED/ASK, and any one listener's
  disconnect or reconnect flush the *whole* tier (simplest; such events are rare) and
  the listeners follow the new primaries. A read whose node has no subscribed
  listener yet, or that met MOVED, goes through the Cache's own cluster client and
  is not kept.

``memory://`` has no server to track with: the tier stays off there.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis
import redis.asyncio
import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from rcache._exceptions import ConfigurationError
from rcache._flow import AsyncDriver, Command, SyncDriver
from rcache._local import Invalidations, LocalStore, LocalTier, Token
from rcache._logging import RateLimitedLog, cache_log
from rcache._policy import Guard
from rcache._redis import (
    ClientSpec,
    Exchange,
    LuaScript,
    _async_kwargs,
    _sentinel_pool,
    connection_kwargs,
    misconfiguration,
)

__all__ = [
    "CHANNEL",
    "ClusterListeners",
    "ClusterReader",
    "Listener",
    "Tier",
    "TrackedRead",
    "TrackedReader",
    "atracking_client",
    "attach",
    "guard_for",
    "is_active",
    "reader_for",
    "server_key",
    "tracking_client",
    "tracking_supported",
    "wait_ready",
]

CHANNEL: Final = "__redis__:invalidate"
#: the listener is PINGed this often ...
HEALTH_INTERVAL: Final = 1.0
#: ... and counted as lost when no PONG came this long after a PING: the longest a
#: silently dead connection (no RST, no EOF) leaves entries served unchecked
HEALTH_TIMEOUT: Final = 1.0
RECONNECT_FIRST: Final = 0.01
RECONNECT_MAX: Final = 2.0
LISTENER_NAME: Final = "rcache-invalidations"
#: a cluster's slot map is checked this often (a failover or resharding seen within it)
TOPOLOGY_INTERVAL: Final = 1.0

_log = RateLimitedLog(cache_log, interval=60.0)

# process state, created on first use (nothing at import time); reset in a forked child
_lock = threading.Lock()
_listeners: dict[Hashable, Listener] = {}
_clusters: dict[Hashable, ClusterListeners] = {}
_loop: _Loop | None = None
_hooked = False


def tracking_supported(spec: ClientSpec) -> str | None:
    """None if the local tier can track keys on ``spec``'s server, else why not."""
    if (
        spec.async_factory is not None
        and spec.user_client is None
        and spec._url_arg is None
    ):
        return (
            "the local tier's listener is a sync connection: give the Cache a url= "
            "(or client=) besides async_client=, so that it reaches the same server"
        )
    return None


def server_key(spec: ClientSpec) -> Hashable:
    """Caches that reach the same server with the same settings share a listener."""
    if spec.user_client is not None:
        return ("client", id(spec.user_client))
    plain = (str, int, float, bool, type(None))
    options = tuple(
        sorted(
            (k, v)
            for k, v in spec.options.items()
            if isinstance(v, plain) and k != "retry"
        )
    )
    return ("url", spec.url, options)


def _overrides(**more: Any) -> dict[str, Any]:
    # RESP2: invalidations arrive as pub/sub messages redis-py parses in both modes;
    # no redis-py retries (the caller's retry policy applies, as for every command)
    return {"protocol": 2, "decode_responses": False, **more}


def tracking_client(spec: ClientSpec, **more: Any) -> redis.Redis:
    """A sync client with its own pool, same server and settings as ``spec``, RESP2."""
    base = spec.sync_client()
    options = _overrides(retry=Retry(NoBackoff(), 0), **more)
    sentinel = _sentinel_pool(base)
    if sentinel is not None:
        return sentinel.sentinel_manager.master_for(  # type: ignore[no-any-return]
            sentinel.service_name, redis_class=redis.Redis, **options
        )
    pool = base.connection_pool
    kwargs = {**pool.connection_kwargs, **options}
    if base is not spec.user_client:
        base.close()  # a throwaway made from the URL: it never connected
    return redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, **kwargs
        )
    )


async def atracking_client(spec: ClientSpec) -> redis.asyncio.Redis:
    """Async twin of :func:`tracking_client`, for the running event loop."""
    base = spec.async_client()
    options = _overrides(retry=redis.asyncio.retry.Retry(NoBackoff(), 0))
    sentinel = _sentinel_pool(base)
    if sentinel is not None:
        return sentinel.sentinel_manager.master_for(  # type: ignore[no-any-return]
            sentinel.service_name, redis_class=redis.asyncio.Redis, **options
        )
    pool: Any = base.connection_pool
    kwargs = {**pool.connection_kwargs, **options}
    await base.aclose()  # made for its settings only; it never connected
    return redis.asyncio.Redis(
        connection_pool=redis.asyncio.ConnectionPool(
            connection_class=pool.connection_class, **kwargs
        )
    )


def _close(client: redis.Redis) -> None:
    # a client given its pool leaves the pool open on close()
    client.connection_pool.disconnect()
    client.close()


# -- the listener ----------------------------------------------------------------------


class Listener:
    """One RESP2 connection subscribed to ``__redis__:invalidate``, feeding
    :attr:`guard` (the :class:`~rcache._local.Invalidations` of its server, or of its
    cluster for the listener of ``node``, a primary). Its methods other than the
    constructor run on the ``rcache-tracking`` thread."""

    def __init__(
        self,
        key: Hashable,
        spec: ClientSpec,
        guard: Invalidations | None = None,
        node: Hashable = None,
    ) -> None:
        self.key = key
        self.spec = spec
        self.node = node
        self.guard = guard if guard is not None else Invalidations()
        self.guard.demand = _demand
        self.guard.link(node)
        #: set when its node is no longer a primary: the loop closes it
        self.retired = False
        self._client: redis.Redis | None = None
        self._conn: Any = None
        self._sock: Any = None
        self._first = True
        self.retry_at = 0.0
        self._backoff = RECONNECT_FIRST
        self._ping_at = 0.0
        self._pong_due: float | None = None
        # a connection made on a helper thread, waiting to be installed
        self.connecting = False
        self._pending: tuple[Any, int] | Exception | None = None
        self._pending_lock = threading.Lock()
        self._closed = False
        #: connections made and lost (tests, observability)
        self.connects = 0
        self.losses = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def client_id(self) -> int | None:
        return self.guard.client_id(self.node)

    def _open(self) -> tuple[Any, int] | Exception:
        """Connect and subscribe; blocks up to the connect timeout. Returns the
        connection and its client id, or the error."""
        conn: Any = None
        try:
            if self._client is None:
                self._client = tracking_client(
                    self.spec, client_name=LISTENER_NAME, socket_keepalive=True
                )
            pool = self._client.connection_pool
            conn = pool.get_connection()
            conn.send_command("CLIENT", "ID")
            client_id = int(conn.read_response())
            conn.send_command("SUBSCRIBE", CHANNEL)
            conn.read_response()
        except Exception as exc:
            if conn is not None:
                conn.disconnect()
                self._release(conn)
            return exc
        return conn, client_id

    def _opened(
        self, selector: selectors.BaseSelector, result: tuple[Any, int] | Exception
    ) -> None:
        if isinstance(result, Exception):
            self._retry_later()
            hint = misconfiguration(result)
            _log.warning(
                "listener:" + self.spec.describe(),
                "rcache: the local tier cannot subscribe to invalidations at %s "
                "(%s: %s%s); local hits are off until it can",
                self.spec.describe(),
                type(result).__name__,
                result,
                f"; {hint}" if hint else "",
            )
            return
        conn, client_id = result
        self._conn = conn
        self._sock = conn._sock  # redis-py keeps the socket there (2.x to 8.x)
        selector.register(self._sock, selectors.EVENT_READ, self)
        self.connects += 1
        self._backoff = RECONNECT_FIRST
        now = time.monotonic()
        self._ping_at = now + HEALTH_INTERVAL
        self._pong_due = None
        self.guard.connected(client_id, first=self._first, node=self.node)
        self._first = False

    def connect(self, selector: selectors.BaseSelector) -> None:
        """Connect on the listener thread (nothing else to serve meanwhile)."""
        self._opened(selector, self._open())

    def connect_aside(self, wake: Callable[[], None]) -> None:
        """Connect on a short-lived thread, so that a server that does not answer
        cannot hold up the invalidations of the others (the thread would block for
        the connect timeout); the loop installs the result (:meth:`installed`)."""
        self.connecting = True

        def run() -> None:
            result = self._open()
            with self._pending_lock:
                if self._closed and not isinstance(result, Exception):
                    result[0].disconnect()  # closed meanwhile: nobody will install it
                    self._release(result[0])
                    return
                self._pending = result
            wake()

        threading.Thread(
            target=run, name="rcache-tracking-connect", daemon=True
        ).start()

    def installed(self, selector: selectors.BaseSelector) -> None:
        """Install what :meth:`connect_aside` got, if it is done."""
        with self._pending_lock:
            result, self._pending = self._pending, None
        if result is not None:
            self.connecting = False
            self._opened(selector, result)

    def readable(self, selector: selectors.BaseSelector) -> None:
        conn = self._conn
        if conn is None:  # lost earlier in the same round of events
            return
        try:
            while True:
                self._handle(conn.read_response())
                if not conn.can_read(0):
                    return
        except Exception:  # EOF, reset, a protocol error: the connection is gone
            self.lost(selector)

    def _handle(self, message: Any) -> None:
        kind = message[0] if isinstance(message, list) and message else None
        if kind == b"message":
            keys = message[2]
            if keys is None:  # FLUSHALL / FLUSHDB: every key changed
                self.guard.flush("flushall")
            else:
                self.guard.invalidate(keys)
        elif kind == b"pong":
            self._pong_due = None

    def tick(self, now: float, loop: _Loop, aside: bool) -> float:
        """Reconnect or health-check as due; returns when to come back. ``aside``:
        other listeners are connected, so connect on a helper thread."""
        selector = loop.selector
        if self._conn is None:
            if self.connecting:
                return now + HEALTH_INTERVAL  # the helper wakes the loop when done
            if now >= self.retry_at:
                if aside:
                    self.connect_aside(loop.wake)
                    return now + HEALTH_INTERVAL
                self.connect(selector)
            return now + HEALTH_INTERVAL if self._conn is not None else self.retry_at
        if self._pong_due is not None and now >= self._pong_due:
            self.lost(selector)
            return self.retry_at
        if now >= self._ping_at:
            try:
                self._conn.send_command("PING")
            except Exception:
                self.lost(selector)
                return self.retry_at
            self._ping_at = now + HEALTH_INTERVAL
            self._pong_due = now + HEALTH_TIMEOUT
        due = self._ping_at if self._pong_due is None else self._pong_due
        return min(due, self._ping_at)

    def lost(self, selector: selectors.BaseSelector) -> None:
        """The connection is gone or unusable: flush, and reconnect soon."""
        self._close_conn(selector)
        self.losses += 1
        self.guard.disconnected(self.node)
        self._retry_later()

    def _retry_later(self) -> None:
        self.retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, RECONNECT_MAX)

    def _close_conn(self, selector: selectors.BaseSelector) -> None:
        conn, sock = self._conn, self._sock
        self._conn = self._sock = None
        if sock is not None:
            try:
                selector.unregister(sock)
            except (KeyError, ValueError, OSError):
                pass
        if conn is not None:
            conn.disconnect()
            self._release(conn)

    def _release(self, conn: Any) -> None:
        if self._client is not None:
            try:
                self._client.connection_pool.release(conn)
            except Exception:
                pass

    def close(self, selector: selectors.BaseSelector | None) -> None:
        """No store is left: close the connection and its pool (listener thread)."""
        with self._pending_lock:
            self._closed = True
            pending, self._pending = self._pending, None
        if pending is not None and not isinstance(pending, Exception):
            pending[0].disconnect()
            self._release(pending[0])
        if selector is not None:
            self._close_conn(selector)
        if self._client is not None:
            _close(self._client)
            self._client = None
        if self.client_id is not None:
            self.guard.disconnected(self.node)

    def after_fork(self) -> None:
        # the socket is the parent's: forget it without a word to the server
        # (redis-py's disconnect() skips shutdown() in another pid)
        self._conn = self._sock = self._client = None
        self._pending_lock = threading.Lock()
        self._pending = None
        self.connecting = False
        self._first = True
        self.retry_at = 0.0
        self._backoff = RECONNECT_FIRST


class _Loop:
    """The process's one ``rcache-tracking`` thread: a selector over the listeners'
    sockets and a wake-up socket pair."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.thread = threading.Thread(
            target=self._run, name="rcache-tracking", daemon=True
        )
        self.stopping = False

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def _run(self) -> None:
        global _loop
        listeners: list[Listener] = []
        try:
            while True:
                with _lock:
                    if self.stopping:  # interpreter exit: close every connection
                        for listener in _listeners.values():
                            listener.close(self.selector)
                        for cluster in _clusters.values():
                            cluster.close()
                        return
                    listeners = []
                    for key, listener in list(_listeners.items()):
                        if listener.guard.stores and not listener.retired:
                            listeners.append(listener)
                        else:  # its caches are gone or closed, or not a primary now
                            del _listeners[key]
                            listener.close(self.selector)
                    clusters = []
                    for key, cluster in list(_clusters.items()):
                        if cluster.guard.stores:
                            clusters.append(cluster)
                        else:
                            del _clusters[key]
                            cluster.close()
                    if not listeners and not clusters:
                        _loop = None
                        return
                now = time.monotonic()
                until = now + HEALTH_INTERVAL
                for cluster in clusters:
                    until = min(until, cluster.tick(now, self))
                for listener in listeners:
                    listener.installed(self.selector)
                up = sum(1 for listener in listeners if listener.connected)
                for listener in listeners:
                    aside = up > (1 if listener.connected else 0)
                    until = min(until, listener.tick(now, self, aside))
                timeout = max(0.0, until - time.monotonic())
                for key, _ in self.selector.select(timeout):
                    if key.data is None:
                        self._drain()
                    else:
                        key.data.readable(self.selector)
        except BaseException:  # never expected: say so, drop the tier, stop
            cache_log.exception("rcache: the local tier's listener thread failed")
            with _lock:
                if _loop is self:
                    _loop = None
            for listener in listeners:
                listener.close(self.selector)
        finally:
            self._close()

    def stop(self) -> None:
        """Close every listener and end the thread (at interpreter exit)."""
        self.stopping = True
        self.wake()
        self.thread.join(timeout=2.0)

    def _drain(self) -> None:
        try:
            while self._wake_r.recv(256):
                pass
        except OSError:
            pass

    def _close(self) -> None:
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()


def _start_locked() -> _Loop:
    global _loop, _hooked
    if not _hooked:
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
        # a daemon thread is frozen at exit with its sockets open: close them first
        atexit.register(_at_exit)
        _hooked = True
    loop = _loop
    if loop is None or not loop.thread.is_alive():
        loop = _loop = _Loop()
        loop.thread.start()
    return loop


def _demand() -> None:
    """A read found the listener down: make sure the thread runs (a forked child has
    none) and let it try now."""
    loop = _loop
    if loop is not None and loop.thread.is_alive():
        return
    with _lock:
        _start_locked().wake()


def _at_exit() -> None:
    loop = _loop
    if loop is not None and loop.thread.is_alive():
        loop.stop()


def _after_fork_in_child() -> None:
    global _lock, _loop
    _lock = threading.Lock()  # the parent's may have been held by another thread
    _loop = None  # its thread did not come along
    guards = {}
    for listener in list(_listeners.values()):
        listener.after_fork()
        guards[id(listener.guard)] = listener.guard
    for cluster in list(_clusters.values()):
        cluster.after_fork()
        guards[id(cluster.guard)] = cluster.guard
    for guard in guards.values():  # once each: a cluster's is shared by its listeners
        guard.after_fork()


def attach(
    spec: ClientSpec, options: LocalTier, name: str, metrics: Any
) -> tuple[LocalStore, Listener | ClusterListeners]:
    """A new store on ``spec``'s server (or cluster), fed by its listener(s)."""
    why = tracking_supported(spec)
    if why is not None:
        raise ConfigurationError(why)
    key = server_key(spec)
    source: Listener | ClusterListeners | None
    with _lock:
        if spec.cluster:
            source = _clusters.get(key)
            if source is None:
                source = _clusters[key] = ClusterListeners(key, spec)
        else:
            source = _listeners.get(key)
            if source is None:
                source = _listeners[key] = Listener(key, spec)
        # made under _lock: the thread closes a listener without stores
        store = LocalStore(options, source.guard, name, metrics)
        _start_locked().wake()
    return store, source


def reader_for(
    spec: ClientSpec, source: Listener | ClusterListeners
) -> TrackedReader | ClusterReader:
    """The tracked reads of one Cache fed by ``source`` (from :func:`attach`)."""
    if isinstance(source, ClusterListeners):
        return ClusterReader(source)
    return TrackedReader(spec, source.guard)


# -- Redis Cluster ---------------------------------------------------------------------

#: (first slot, last slot, primary host, primary port) of each range: a slot map
_Shape = tuple[tuple[int, int, str, int], ...]


class ClusterListeners:
    """The local tier on one Redis Cluster: a :class:`Listener` per primary, all feeding
    one :attr:`guard`, and the slot map that routes each tracked read to its node
    (``guard.route``). The map is read by a helper thread (``rcache-tracking-slots``,
    blocking IO never runs on the listener thread) at start and every
    :data:`TOPOLOGY_INTERVAL`; the loop installs what it found (:meth:`tick`)."""

    def __init__(self, key: Hashable, spec: ClientSpec) -> None:
        self.key = key
        self.spec = spec
        self.guard = Invalidations()
        self.guard.demand = _demand
        self.guard.route = self._route
        #: slot -> the name of the primary serving it, None until the map is read
        self._slots: list[str | None] | None = None
        self.shape: _Shape | None = None
        #: primary name -> connection settings of that node (listeners and readers)
        self.nodes: dict[str, ClientSpec] = {}
        #: primary name -> its listener (changed under _lock, on the loop thread)
        self.listeners: dict[str, Listener] = {}
        self._client: Any = None  # reads the slot map (helper threads only)
        self.check_at = 0.0
        self._checking = False
        self._pending: tuple[_Shape, dict[str, tuple[str, int]]] | Exception | None
        self._pending = None
        self._pending_lock = threading.Lock()
        self._closed = False
        #: slot map changes seen after the first (tests, observability)
        self.changes = 0

    def __repr__(self) -> str:
        return f"<ClusterListeners {self.spec.describe()} {sorted(self.listeners)}>"

    def _route(self, key: bytes) -> str | None:
        slots = self._slots
        return None if slots is None else slots[key_slot(key)]

    def listener_of(self, key: str | bytes) -> Listener | None:
        """The listener of the primary serving ``key`` (tests, observability)."""
        node = self._route(key.encode() if isinstance(key, str) else key)
        return None if node is None else self.listeners.get(node)

    @property
    def client_id(self) -> list[int] | None:
        """The subscribed listeners' ids, or None while none is (tests)."""
        ids = self.guard.state[1]
        return sorted(ids.values()) if ids else None

    def stale(self) -> None:
        """A read met MOVED/ASK or lost its node: check the slot map now."""
        self.check_at = 0.0
        loop = _loop
        if loop is not None:
            loop.wake()

    def moved(self) -> None:
        """A read met MOVED/ASK: the map this tier followed is out of date. Flush (an
        entry read from a node that no longer serves its slot is not tracked where
        its key is written now) and read the map again. Until then reads are not
        tracked (no route); the map is installed even if it looks unchanged (the node
        asked may not have seen the change yet, and then the next check will)."""
        self._slots = None
        self.shape = None
        self.guard.flush("topology")
        self.stale()

    def tick(self, now: float, loop: _Loop) -> float:
        """Install a finished check; start one when due. Returns when to come back."""
        with self._pending_lock:
            result, self._pending = self._pending, None
        if result is not None:
            self._checking = False
            self._apply(result, loop)
        if self._checking:
            return now + TOPOLOGY_INTERVAL  # the helper wakes the loop when done
        if now >= self.check_at:
            self._checking = True
            self.check_at = now + TOPOLOGY_INTERVAL

            def run() -> None:
                found = self._check()
                with self._pending_lock:
                    self._pending = found
                loop.wake()

            threading.Thread(
                target=run, name="rcache-tracking-slots", daemon=True
            ).start()
        return self.check_at

    def _check(self) -> tuple[_Shape, dict[str, tuple[str, int]]] | Exception:
        """Read the slot map (helper thread): its shape and the primaries."""
        try:
            if self._client is None:
                self._client = self.spec.sync_client()
            ranges = self._client.execute_command("CLUSTER SLOTS")
        except Exception as exc:
            return exc
        finally:
            if self._closed:  # closed meanwhile: nobody else will close the client
                self.close()
        shape = tuple(
            sorted(
                (int(lo), int(hi), str(info["primary"][0]), int(info["primary"][1]))
                for (lo, hi), info in ranges.items()
            )
        )
        primaries = {f"{h}:{p}": (h, p) for _, _, h, p in shape}
        return shape, primaries

    def _apply(
        self,
        result: tuple[_Shape, dict[str, tuple[str, int]]] | Exception,
        loop: _Loop,
    ) -> None:
        if isinstance(result, Exception):
            _log.warning(
                "slots:" + self.spec.describe(),
                "rcache: the local tier cannot read the slot map of %s (%s: %s); "
                "reads are not kept locally until it can",
                self.spec.describe(),
                type(result).__name__,
                result,
            )
            return
        shape, primaries = result
        if shape == self.shape:
            return
        slots: list[str | None] = [None] * 16384
        for lo, hi, host, port in shape:
            slots[lo : hi + 1] = [f"{host}:{port}"] * (hi - lo + 1)
        template = _async_kwargs(connection_kwargs(self._client), redis.Redis)
        for name in ("host", "port", "redis_connect_func", "cache", "cache_config"):
            template.pop(name, None)
        # a cluster client does not pass it to its nodes; RESP2 needs it off
        maint = self.spec.options.get("maint_notifications_config")
        if maint is not None:
            template["maint_notifications_config"] = maint
        first = self.shape is None
        with _lock:
            if self._closed:
                return
            nodes = dict(self.nodes)
            for name, (host, port) in primaries.items():
                if name not in self.listeners:
                    # a template the tracked pools copy their settings from (never
                    # connected itself)
                    nodes[name] = ClientSpec(
                        client=redis.Redis(host=host, port=port, **template)
                    )
                    nodes[name].label = name  # what logs name
                    self.listeners[name] = _listeners[(self.key, name)] = Listener(
                        (self.key, name), nodes[name], self.guard, node=name
                    )
            for name in [n for n in self.listeners if n not in primaries]:
                self.listeners.pop(name).retired = True  # the loop closes it
                self.guard.unlink(name)
            self.nodes = nodes
            self._slots = slots
            self.shape = shape
        if not first:
            self.changes += 1
            # after the new map is in place: a read that began on the old one is
            # refused by the new epoch
            self.guard.flush("topology")
        loop.wake()  # the new listeners connect in the next round

    def close(self) -> None:
        """No store is left (its listeners are closed by the loop as well)."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None and client is not self.spec.user_client:
            client.close()

    def after_fork(self) -> None:
        # the parent's connections are forgotten, not closed (redis-py checks the pid)
        self._client = None
        self._checking = False
        self._pending = None
        self._pending_lock = threading.Lock()
        self.check_at = 0.0


# -- tracked reads ---------------------------------------------------------------------


class TrackedReader:
    """The tracked reads of one ``Cache``: its own RESP2 pools (sync, and one per event
    loop), each connection redirected to the listener before its first read."""

    def __init__(self, spec: ClientSpec, guard: Invalidations) -> None:
        self._spec = spec  # one server (a cluster: one node, see ClusterReader)
        self._guard = guard
        self._client: redis.Redis | None = None
        self._pid = 0
        self._aclients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, redis.asyncio.Redis
        ] = weakref.WeakKeyDictionary()

    def _on_connect(self, conn: Any) -> None:
        # a new socket: a new server session, with tracking off
        conn._rcache_redirect = None

    def _hook(self, conn: Any) -> None:
        if not getattr(conn, "_rcache_hooked", False):
            conn._rcache_redirect = None
            conn.register_connect_callback(self._on_connect)
            conn._rcache_hooked = True

    def _plan(self, conn: Any, token: Token, argv: Sequence[Any]) -> list[Any]:
        """The commands to send: ``argv``, after a redirect if this connection's is
        not the token's listener (the token is marked unusable if it cannot be)."""
        want = token.client_id
        if want is None or conn._rcache_redirect == want:
            return [tuple(argv)]
        if conn._rcache_redirect == -want:  # refused on this connection: no retry
            token.ok = False
            return [tuple(argv)]
        if want != self._guard.client_id(token.node):
            # the listener moved on since the read began: the token is refused anyway;
            # never redirect to an old id (a restarted server hands ids out again)
            token.ok = False
            return [tuple(argv)]
        return [("CLIENT", "TRACKING", "ON", "REDIRECT", want), tuple(argv)]

    def _refused(self, conn: Any, token: Token, exc: Exception) -> None:
        """CLIENT TRACKING was refused: an ACL without the permission, or the listener
        left meanwhile. This read is not kept; the connection does not ask again for
        this listener."""
        token.ok = False
        if token.client_id is not None:
            conn._rcache_redirect = -token.client_id
        hint = misconfiguration(exc)
        if hint is not None:  # not the race with a listener that just left
            _log.warning(
                "tracking:" + self._spec.describe(),
                "rcache: Redis refused CLIENT TRACKING (%s; %s); reads are not kept "
                "locally",
                exc,
                hint,
            )

    @property
    def client(self) -> redis.Redis:
        client = self._client
        if client is None or self._pid != os.getpid():
            client = self._client = tracking_client(self._spec)
            self._pid = os.getpid()
        return client

    def read(
        self,
        token: Token,
        argv: Sequence[Any],
        script: LuaScript | None = None,
        client: Any = None,
    ) -> Any:
        """Run ``argv`` (a read: GET, MGET, or EVALSHA of ``script``) on a tracked
        connection; the reply, as redis-py parses it without callbacks. ``client``
        (the Cache's own) is for :class:`ClusterReader`'s untracked reads."""
        with Exchange(self.client.connection_pool) as conn:
            # get_connection() connected it; a reconnect ran _on_connect (redirect off)
            self._hook(conn)
            commands = self._plan(conn, token, argv)
            conn.send_packed_command(conn.pack_commands(commands))
            if len(commands) == 2:
                try:
                    conn.read_response()
                    conn._rcache_redirect = token.client_id
                except rex.ResponseError as exc:
                    self._refused(conn, token, exc)
            try:
                return conn.read_response()
            except rex.NoScriptError:
                if script is None:
                    raise
                conn.send_command("SCRIPT", "LOAD", script.source)
                conn.read_response()
                conn.send_command(*argv)
                return conn.read_response()

    async def _aclient(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            client = self._aclients[loop] = await atracking_client(self._spec)
        return client

    async def aread(
        self,
        token: Token,
        argv: Sequence[Any],
        script: LuaScript | None = None,
        client: Any = None,
    ) -> Any:
        """Async twin of :meth:`read`."""
        # a cancelled or failed read leaves its reply unread: Exchange drops it
        async with Exchange((await self._aclient()).connection_pool) as conn:
            self._hook(conn)
            commands = self._plan(conn, token, argv)
            await conn.send_packed_command(conn.pack_commands(commands))
            if len(commands) == 2:
                try:
                    await conn.read_response()
                    conn._rcache_redirect = token.client_id
                except rex.ResponseError as exc:
                    self._refused(conn, token, exc)
            try:
                return await conn.read_response()
            except rex.NoScriptError:
                if script is None:
                    raise
                await conn.send_command("SCRIPT", "LOAD", script.source)
                await conn.read_response()
                await conn.send_command(*argv)
                return await conn.read_response()

    def close(self) -> None:
        if self._client is not None:
            _close(self._client)
            self._client = None

    async def aclose(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        client = self._aclients.pop(loop, None)
        if client is not None:
            # a client given its pool leaves the pool open on aclose()
            await client.connection_pool.disconnect()
            await client.aclose()


#: a tracked read on the wrong node: the slot map moved (CLUSTERDOWN: the cluster is
#: reconfiguring); the read is redone untracked and the tier flushed
_MOVED: Final = (rex.AskError, rex.TryAgainError, rex.ClusterDownError)


class ClusterReader:
    """The tracked reads of one ``Cache`` on Redis Cluster: a :class:`TrackedReader`
    per primary, the one of the token's node (``guard.route`` chose it from the slot
    map before the read was sent). A read with no node to track it (the map is not
    read yet, or its node has no listener yet) or that met MOVED/ASK goes through the
    Cache's own cluster client, which follows redirects, and is not kept."""

    def __init__(self, cluster: ClusterListeners) -> None:
        self._cluster = cluster
        self._readers: dict[str, TrackedReader] = {}
        self._lock = threading.Lock()

    def _reader(self, token: Token) -> TrackedReader | None:
        node = token.node
        if not token.ok or not isinstance(node, str):
            return None
        reader = self._readers.get(node)
        if reader is None:
            spec = self._cluster.nodes.get(node)
            if spec is None:
                return None
            with self._lock:  # one per node: a second would leave a pool open
                reader = self._readers.get(node)
                if reader is None:
                    reader = TrackedReader(spec, self._cluster.guard)
                    self._readers[node] = reader
        return reader

    def read(
        self,
        token: Token,
        argv: Sequence[Any],
        script: LuaScript | None = None,
        client: Any = None,
    ) -> Any:
        reader = self._reader(token)
        if reader is not None:
            try:
                return reader.read(token, argv, script)
            except _MOVED:
                self._cluster.moved()
            except (rex.ConnectionError, rex.TimeoutError):
                self._cluster.stale()  # a failover may be under way
                raise
        token.ok = False
        try:
            return client.execute_command(*argv)
        except rex.NoScriptError:
            if script is None:
                raise
            return client.execute_command("EVAL", script.source, *argv[2:])

    async def aread(
        self,
        token: Token,
        argv: Sequence[Any],
        script: LuaScript | None = None,
        client: Any = None,
    ) -> Any:
        """Async twin of :meth:`read`."""
        reader = self._reader(token)
        if reader is not None:
            try:
                return await reader.aread(token, argv, script)
            except _MOVED:
                self._cluster.moved()
            except (rex.ConnectionError, rex.TimeoutError):
                self._cluster.stale()
                raise
        token.ok = False
        try:
            return await client.execute_command(*argv)
        except rex.NoScriptError:
            if script is None:
                raise
            return await client.execute_command("EVAL", script.source, *argv[2:])

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()

    async def aclose(self) -> None:
        for reader in self._readers.values():
            await reader.aclose()


@dataclass(frozen=True, slots=True)
class TrackedRead(Command):
    """A read whose keys Redis tracks for the local tier's listener (a flow command:
    the driver's guarded path, error mapping and retries apply as for ``Run``).

    ``argv`` is the read (``("GET", key)``, ``("MGET", *keys)`` or ``("EVALSHA",
    sha, n, *keys)`` with ``script`` set for a NOSCRIPT reload); ``token`` comes from
    ``store.begin(keys)``, taken before this command is yielded."""

    reader: TrackedReader | ClusterReader
    token: Token
    argv: tuple[Any, ...]
    guard: Guard | None = None
    script: LuaScript | None = None

    def run(self, driver: SyncDriver) -> Any:
        reader, token, argv, script = self.reader, self.token, self.argv, self.script
        return driver.redis.run(lambda c: reader.read(token, argv, script, c))

    async def arun(self, driver: AsyncDriver) -> Any:
        reader, token, argv, script = self.reader, self.token, self.argv, self.script
        return await driver.redis.run(lambda c: reader.aread(token, argv, script, c))


def wait_ready(listener: Listener | ClusterListeners, timeout: float) -> bool:
    """Block until ``listener`` is subscribed (a cluster's: every primary's) (tests,
    benchmarks, warm-up)."""
    return listener.guard.ready.wait(timeout)


class Tier:
    """A local store and the tracked reads that fill it: what a read path needs.

    ``store.get(key)`` on the hit path; on a miss ``token = store.begin(keys)``, then
    ``yield tier.read(token, argv, guard)`` and ``store.store(token, key, value, ...)``.
    """

    __slots__ = ("listener", "reader", "store")

    def __init__(
        self,
        store: LocalStore,
        reader: TrackedReader | ClusterReader,
        listener: Listener | ClusterListeners,
    ) -> None:
        self.store = store
        self.reader = reader
        self.listener = listener

    def read(
        self,
        token: Token,
        argv: tuple[Any, ...],
        guard: Guard | None,
        script: LuaScript | None = None,
    ) -> TrackedRead:
        """The flow command reading ``argv`` tracked, for ``token``."""
        return TrackedRead(self.reader, token, argv, guard, script)


def guard_for(key: Hashable) -> Invalidations | None:
    """The guard of the server with :func:`server_key` ``key`` if a local tier of this
    process reads from it (so that a write made through any ``Cache`` drops this
    process's copies at once)."""
    source = (_listeners.get(key) or _clusters.get(key)) if is_active() else None
    return None if source is None else source.guard


def is_active() -> bool:
    """Does any local tier read in this process (any listener exists)?"""
    return bool(_listeners or _clusters)
