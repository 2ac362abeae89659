"""The local tier: decoded values in process memory, in front of Redis (issue 16).

A local hit is a dict lookup (about a microsecond); what keeps it correct is Redis's
own invalidation messages (``CLIENT TRACKING``, fed in by ``rcache._tracking``). This
module is pure: no IO, no threads; the listener calls into it.

* :class:`LocalTier` is the public option object (bounds, local TTL, copy on read).
* :class:`LocalStore` holds the entries: an LRU ``OrderedDict`` bounded by entries (and
  optionally by bytes), each entry with its own deadline (the tier's TTL capped by the
  value's logical expiry) and the Redis keys it was read from. An invalidation of its
  value key drops it. Its version stamps (function and tag stamps, shared by many
  entries) are recorded with their values and checked on every hit against the
  guard's table of current stamp values, which an invalidation of a stamp empties:
  ``cache_store.lua`` extends a stamp's TTL on every store, and Redis reports that as
  an invalidation; dropping every entry of the function then would empty the tier at
  each miss. One re-read puts the (unchanged, never reused) stamp value back and the
  other entries are valid again.
* :class:`Invalidations` is the sequence guard of one Redis server (or of one Redis
  Cluster: one guard fed by a listener per primary), shared by every store reading
  from it. A read takes a :class:`Token` before it is sent; its reply is
  stored only if none of its keys was invalidated while it was in flight and the epoch
  did not change. The epoch moves on every event after which no invalidation can be
  trusted to have arrived: the listener (re)connected or disconnected, a FLUSHALL or
  FLUSHDB (a null invalidation), a fork; on a cluster also any one node's listener
  event and a change of the slot map; the stores are flushed then.

Why a guard (race, measured in ``benchmarks/bench_local.py`` and tested): a reader gets
the old value from Redis, a writer replaces it, the invalidation reaches the listener,
and only then does the reader store its reply. Without the guard the old value stays
in the tier until its TTL (cashews ``client_side`` stores replies this way); with it the
store is refused.
"""

from __future__ import annotations

import copy as _copy
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from rcache._config import Duration, parse_duration
from rcache._exceptions import ConfigurationError
from rcache._policy import MISSING

__all__ = ["MISSING", "Invalidations", "LocalStore", "LocalTier", "Token", "args_key"]

_monotonic = time.monotonic

#: How many invalidated keys the guard remembers with their sequence number. A read
#: that began before the oldest one forgotten is refused (it cannot be told whether
#: one of its keys was among them): only a read in flight while more than this many
#: keys were invalidated loses its local store, never correctness.
LAST_MAX: Final = 1 << 13


@dataclass(frozen=True, init=False)
class LocalTier:
    """Options of the local (in-process) tier: ``Cache(local=LocalTier(...))`` or
    ``@cache.cached(local=LocalTier(...))``.

    Hot values are kept decoded in this process and served without a round trip;
    Redis's invalidation messages (``CLIENT TRACKING``) drop an entry when another
    client (or this one) writes, deletes, expires or evicts any key it was read from.
    See the README section "The local tier" for the guarantees and their limits.

    :param max_entries: the most entries kept (least recently used go first).
    :param ttl: the longest an entry is served locally (seconds, ``"30s"``,
        timedelta); it also expires with the value's own freshness.
    :param max_bytes: optional bound on the sum of the entries' sizes as read from
        Redis (their encoded bytes; the decoded objects take a few times more).
    :param copy: hand out a deep copy on every local hit (about 2-3 µs for a small
        dict) instead of the stored object. Off by default: callers then share one
        object and must not mutate it.
    :raises ConfigurationError: a bound or the ttl is not a positive number.

    Example::

        cache = rcache.Cache(url, local=rcache.LocalTier(max_entries=50_000, ttl="1m"))
    """

    max_entries: int
    ttl: float
    max_bytes: int | None
    copy: bool

    def __init__(
        self,
        max_entries: int = 10_000,
        ttl: Duration = "30s",
        max_bytes: int | None = None,
        copy: bool = False,
    ) -> None:
        if (
            isinstance(max_entries, bool)
            or not isinstance(max_entries, int)
            or max_entries < 1
        ):
            raise ConfigurationError(
                f"LocalTier(max_entries=...) takes a positive int, got {max_entries!r}: "
                "write LocalTier(max_entries=10_000)"
            )
        seconds = parse_duration(ttl, what="LocalTier ttl")
        if max_bytes is not None and (
            isinstance(max_bytes, bool)
            or not isinstance(max_bytes, int)
            or max_bytes < 1
        ):
            raise ConfigurationError(
                f"LocalTier(max_bytes=...) takes a positive int or None, got "
                f"{max_bytes!r}: write LocalTier(max_bytes=64 * 2**20) for 64 MiB"
            )
        if not isinstance(copy, bool):
            raise ConfigurationError(
                f"LocalTier(copy=...) takes True or False, got {copy!r}"
            )
        object.__setattr__(self, "max_entries", max_entries)
        object.__setattr__(self, "ttl", seconds)
        object.__setattr__(self, "max_bytes", max_bytes)
        object.__setattr__(self, "copy", copy)


def resolve_local(value: object, what: str = "local") -> LocalTier | bool | None:
    """Check a ``local=`` argument: None (the default), a bool, or a LocalTier."""
    if value is None or isinstance(value, (bool, LocalTier)):
        return value
    raise ConfigurationError(
        f"{what}= takes True, False or rcache.LocalTier(...), got "
        f"{type(value).__name__}: write {what}=True or "
        f'{what}=rcache.LocalTier(max_entries=10_000, ttl="30s")'
    )


class Token:
    """A read in flight: the guard's sequence number and epoch when it began, the
    Redis keys it reads, and the node it goes to with that node's listener id.
    ``ok`` turns False if the read could not be tracked (its connection could not be
    redirected to the listener)."""

    __slots__ = ("client_id", "epoch", "keys", "node", "ok", "seq")

    def __init__(
        self,
        seq: int,
        epoch: int,
        client_id: int | None,
        keys: tuple[bytes, ...],
        node: Hashable = None,
    ) -> None:
        self.seq = seq
        self.epoch = epoch
        self.client_id = client_id
        self.keys = keys
        self.node = node
        self.ok = client_id is not None


def _encode(keys: Iterable[str | bytes]) -> tuple[bytes, ...]:
    # redis-py sends str keys as UTF-8; invalidation messages name them in bytes
    return tuple([k.encode() if isinstance(k, str) else k for k in keys])


def _no_demand() -> None:
    pass


class Invalidations:
    """The sequence guard and the stores of one Redis server (one listener), or of one
    Redis Cluster (a listener per primary, each a *node*: the single server's node is
    None). On a cluster every node's event moves the one epoch: the whole tier is
    flushed, not only what that node served (simplest, and a cluster's listeners
    reconnect rarely).

    Fed by the listener thread (:meth:`invalidate`, :meth:`flush`, :meth:`connected`,
    :meth:`disconnected`) and by this process's own writes (:meth:`invalidate` too, so
    that a write never leaves this process's own stale copy behind). Every change to
    the stores happens under :attr:`lock`, so checking a token and storing its entry is
    atomic with respect to invalidations.
    """

    def __init__(self, last_max: int = LAST_MAX) -> None:
        self.lock = threading.Lock()
        self.seq = 0
        #: (epoch, {node: its listener's client id, while subscribed}), replaced as
        #: a whole so that a reader sees a consistent pair without the lock
        self.state: tuple[int, dict[Hashable, int]] = (0, {})
        #: the nodes with a listener (ready when each is subscribed)
        self._links: set[Hashable] = set()
        #: on a cluster: a read's first key -> the node serving its slot (None while
        #: the slot map is unknown: the read is not tracked)
        self.route: Callable[[bytes], Hashable] | None = None
        self.floor = 0
        # invalidated key -> seq, oldest first (an OrderedDict: a plain dict popped from
        # the front scans its deleted slots, O(n) a pop)
        self._last: OrderedDict[bytes, int] = OrderedDict()
        self._last_max = last_max
        # the stores fed by this guard, held weakly (a Cache that goes away takes its
        # store along); a tuple of the references, since iterating a WeakSet costs
        # microseconds per message
        self._refs: dict[int, weakref.ref[LocalStore]] = {}
        self._live: tuple[weakref.ref[LocalStore], ...] = ()
        #: set by the listener: start (or wake) it when a read finds it down
        self.demand: Callable[[], None] = _no_demand
        #: set while every listener is subscribed (tests and benchmarks wait on it)
        self.ready = threading.Event()
        #: invalidated keys received and flushes, by reason (observability, tests)
        self.received = 0
        self.flushes: dict[str, int] = {}
        #: stamp key -> its current value, as last read (and not invalidated since):
        #: entries that record their stamps are valid while these still match
        self.stamp_values: dict[bytes, bytes] = {}
        self._stamp_refs: dict[bytes, int] = {}  # how many entries record each stamp

    @property
    def stores(self) -> list[LocalStore]:
        """The live stores fed by this guard."""
        found = [ref() for ref in self._live]
        return [s for s in found if s is not None]

    def add(self, store: LocalStore) -> None:
        """Feed ``store`` from now on. Call under :attr:`lock`."""
        # no weakref callback: it could run in any thread, amid an iteration of _refs
        refs = {k: r for k, r in self._refs.items() if r() is not None}
        refs[id(store)] = weakref.ref(store)
        self._refs = refs
        self._live = tuple(refs.values())

    def discard(self, store: LocalStore) -> None:
        """Stop feeding ``store``. Call under :attr:`lock`."""
        refs = {k: r for k, r in self._refs.items() if r() not in (None, store)}
        self._refs = refs
        self._live = tuple(refs.values())

    # -- reads ----------------------------------------------------------------------

    def begin(self, keys: Iterable[str | bytes]) -> Token:
        """Take a token before sending a read of ``keys``."""
        epoch, ids = self.state
        encoded = _encode(keys)
        route = self.route
        node = None if route is None else route(encoded[0])
        client_id = ids.get(node)
        if client_id is None:
            self.demand()
        return Token(self.seq, epoch, client_id, encoded, node)

    def admit(self, token: Token) -> bool:
        """May ``token``'s reply be stored? Call under :attr:`lock`."""
        if (
            not token.ok
            or token.epoch != self.state[0]
            or token.client_id is None
            or token.seq < self.floor
        ):
            return False
        last, seq = self._last, token.seq
        return all(last.get(k, -1) <= seq for k in token.keys)

    # -- events ---------------------------------------------------------------------

    def invalidate(self, keys: Sequence[str | bytes], *, received: bool = True) -> int:
        """Redis said ``keys`` changed (``received``), or this process wrote them:
        refuse the reads in flight on them and drop their entries everywhere. Returns
        how many entries were dropped."""
        encoded = _encode(keys)
        dropped = 0
        with self.lock:
            self.seq = seq = self.seq + 1
            last = self._last
            values = self.stamp_values
            for k in encoded:
                last[k] = seq
                last.move_to_end(k)  # the dict stays in seq order
                values.pop(k, None)  # a stamp: every entry recording it misses now
            while len(last) > self._last_max:
                self.floor = last.popitem(last=False)[1]
            stores = self.stores
            for store in stores:
                dropped += store._drop(encoded)
            if received:
                self.received += len(encoded)
        for store in stores:
            store._invalidated(len(encoded) if received else 0)
        return dropped

    def flush(self, reason: str) -> None:
        """No invalidation can be trusted to have arrived (``reason``: ``flushall``,
        ``disconnect``, ``reconnect``, ``fork``, ``clear``, ``topology``: a cluster's
        slot map changed or a read met MOVED/ASK): empty every store and
        refuse every read in flight."""
        self._new_epoch(reason)

    def link(self, node: Hashable = None) -> None:
        """A listener feeds this guard for ``node`` from now on."""
        with self.lock:
            self._links.add(node)
            self.ready.clear()

    def unlink(self, node: Hashable) -> None:
        """``node``'s listener is gone for good (no longer a primary)."""
        with self.lock:
            self._links.discard(node)
            if self._links <= self.state[1].keys():
                self.ready.set()

    def client_id(self, node: Hashable = None) -> int | None:
        """``node``'s listener id while it is subscribed."""
        return self.state[1].get(node)

    def connected(
        self, client_id: int, *, first: bool = False, node: Hashable = None
    ) -> None:
        """``node``'s listener is subscribed as ``client_id``: reads may store again.
        Reads that began before are refused (their redirect went elsewhere).
        ``first``: the listener's first connection (nothing to flush, nothing
        counted)."""
        ids = {**self.state[1], node: client_id}
        self._new_epoch(None if first else "reconnect", ids)
        if self._links <= ids.keys():
            self.ready.set()

    def disconnected(self, node: Hashable = None) -> None:
        """``node``'s listener lost its connection: invalidations may have been
        lost."""
        self.ready.clear()
        ids = {k: v for k, v in self.state[1].items() if k != node}
        self._new_epoch("disconnect", ids)

    def _new_epoch(
        self, reason: str | None, ids: dict[Hashable, int] | None = None
    ) -> None:
        with self.lock:
            epoch, current = self.state
            self.state = (epoch + 1, current if ids is None else ids)
            self.floor = self.seq  # tokens of the old epoch are refused anyway
            self._last.clear()
            stores = self.stores
            for store in stores:
                store._clear()
            self.stamp_values.clear()
            self._stamp_refs.clear()
            if reason is not None:
                self.flushes[reason] = self.flushes.get(reason, 0) + 1
        if reason is not None:
            for store in stores:
                store._flushed(reason)

    def hold(
        self, stamps: tuple[tuple[bytes, bytes], ...]
    ) -> tuple[tuple[bytes, bytes], ...]:
        """An admitted read saw ``stamps``: they are the current values. Returns them
        with the table's own objects (a hit compares by identity first). Under lock."""
        values, refs = self.stamp_values, self._stamp_refs
        held = []
        for k, v in stamps:
            current = values.get(k)
            if current == v:
                v = current
            else:
                values[k] = v
            refs[k] = refs.get(k, 0) + 1
            held.append((k, v))
        return tuple(held)

    def release(self, stamps: tuple[tuple[bytes, bytes], ...]) -> None:
        """An entry recording ``stamps`` went away. Under lock."""
        refs = self._stamp_refs
        for k, _ in stamps:
            n = refs.get(k, 0) - 1
            if n > 0:
                refs[k] = n
            else:  # no entry records it: forget it (the table stays bounded)
                refs.pop(k, None)
                self.stamp_values.pop(k, None)

    def after_fork(self) -> None:
        """In a forked child: start empty, with no listener (it is the parent's)."""
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.state = (self.state[0] + 1, {})
        self.floor = self.seq
        self._last = OrderedDict()
        self.stamp_values.clear()
        self._stamp_refs.clear()
        self.flushes["fork"] = self.flushes.get("fork", 0) + 1
        for store in self.stores:
            store._after_fork()


class _Entry:
    __slots__ = ("expires", "keys", "nbytes", "stamps", "value")

    def __init__(
        self,
        value: Any,
        expires: float,
        keys: tuple[bytes, ...],
        nbytes: int,
        stamps: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self.value = value
        self.expires = expires
        self.keys = keys  # dropped when one of these is invalidated
        self.nbytes = nbytes
        self.stamps = stamps  # valid while guard.stamp_values still holds these


class LocalStore:
    """Entries of one local tier (a ``Cache``'s, or one function's own ``LocalTier``).

    :meth:`get` is the hit path (no lock: one dict lookup, a monotonic clock read and
    an LRU touch); :meth:`begin` and :meth:`store` go around a Redis read. The store
    is bound to the :class:`Invalidations` guard of the Redis server it reads from.
    """

    def __init__(
        self,
        options: LocalTier,
        guard: Invalidations,
        name: str,
        metrics: Any = None,
    ) -> None:
        self.options = options
        self.guard = guard
        self.name = name
        self._ttl = options.ttl
        self._max_entries = options.max_entries
        self._max_bytes = options.max_bytes or 0
        self._copy = options.copy
        self._data: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._stamp_values = guard.stamp_values
        # Redis key -> the local key reading it, or a set of them (a stamp shared by
        # many entries): most value keys have one local entry, and a set costs 200 B
        self._index: dict[bytes, Any] = {}
        self._bytes = 0
        #: stores refused by the sequence guard (tests, benchmarks)
        self.refused = 0
        self._metrics = metrics
        self._m_inv = getattr(metrics, "local_invalidations", None)
        self._m_flush = getattr(metrics, "local_flush", None)
        self._m_entries = getattr(metrics, "local_entries", None)
        with guard.lock:
            guard.add(self)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"<LocalStore {self.name} {len(self._data)}/{self._max_entries}>"

    @property
    def nbytes(self) -> int:
        """The sum of the entries' sizes as given to :meth:`store`."""
        return self._bytes

    # -- hit path -------------------------------------------------------------------

    def get(self, key: Hashable) -> Any:
        """The value stored under ``key``, or :data:`MISSING` (absent or expired)."""
        entry = self._data.get(key)
        if entry is None:
            return MISSING
        if entry.expires <= _monotonic():
            self._expire(key, entry)
            return MISSING
        if entry.stamps:
            values = self._stamp_values
            for k, v in entry.stamps:
                if values.get(k) != v:  # invalidated (or changed) since it was read
                    return MISSING
        try:
            self._data.move_to_end(key)
        except KeyError:  # dropped by another thread meanwhile: still a valid read
            pass
        if self._copy:
            return _copy.deepcopy(entry.value)
        return entry.value

    # -- around a Redis read ----------------------------------------------------------

    def begin(self, keys: Iterable[str | bytes]) -> Token:
        """Take a token before sending the read of ``keys`` (every Redis key the entry
        depends on: its value key, function stamp and tag stamps)."""
        return self.guard.begin(keys)

    def store(
        self,
        token: Token,
        key: Hashable,
        value: Any,
        *,
        expires_at: float | None = None,
        nbytes: int = 0,
        stamps: Iterable[tuple[str | bytes, bytes]] = (),
    ) -> bool:
        """Keep ``value`` under ``key`` unless a key of ``token`` was invalidated since
        it began (or the epoch moved). ``expires_at``: the value's logical expiry on
        the ``time.monotonic()`` clock (the tier's ttl caps it); ``nbytes``: its size
        as read from Redis (for ``max_bytes``). Returns whether it was stored.

        ``stamps``: (key, value) of the version stamps the value was read with
        (function and tag stamps, shared by many entries). The entry is then checked
        against their current values on every hit instead of being dropped with them:
        a stamp merely touched (its TTL extended by a store) costs one re-read, which
        puts the same value back and revalidates every entry recording it, instead of
        dropping all of them. Stamps are random and never reused, so an equal value is
        an unchanged stamp. Every other key of ``token`` drops the entry."""
        now = _monotonic()
        expires = now + self._ttl
        if expires_at is not None and expires_at < expires:
            expires = expires_at
        if expires <= now or (self._max_bytes and nbytes > self._max_bytes):
            return False
        if self._copy:
            value = _copy.deepcopy(value)  # the caller keeps the object it was given
        pairs = tuple((k.encode() if isinstance(k, str) else k, v) for k, v in stamps)
        keys = token.keys
        if pairs:
            stamped = {k for k, _ in pairs}
            keys = tuple(k for k in keys if k not in stamped)
        guard = self.guard
        with guard.lock:
            if not guard.admit(token):
                self.refused += 1
                return False
            if pairs:
                pairs = guard.hold(pairs)
            self._insert(key, _Entry(value, expires, keys, nbytes, pairs))
            size = len(self._data)
        if self._m_entries is not None:
            self._m_entries(self.name, size)
        return True

    def discard(self, redis_keys: Sequence[str | bytes]) -> int:
        """This process wrote ``redis_keys``: drop their entries in every store of this
        server now (Redis's own message follows), and refuse reads in flight."""
        return self.guard.invalidate(redis_keys, received=False)

    def clear(self) -> None:
        """Empty every store of this Redis server (reason ``clear``)."""
        self.guard.flush("clear")

    def close(self) -> None:
        """Stop receiving invalidations; the store stays empty from now on."""
        with self.guard.lock:
            self.guard.discard(self)
            for entry in self._data.values():
                self.guard.release(entry.stamps)
            self._clear()
        self._max_entries = 0  # nothing stays: _insert evicts at once

    # -- under guard.lock -----------------------------------------------------------

    def _insert(self, key: Hashable, entry: _Entry) -> None:
        data, index = self._data, self._index
        old = data.pop(key, None)
        if old is not None:
            self._unindex(key, old, None)
        data[key] = entry
        self._bytes += entry.nbytes
        for k in entry.keys:
            ref = index.get(k)
            if ref is None:
                index[k] = key
            elif type(ref) is set:
                ref.add(key)
            elif ref != key:
                index[k] = {ref, key}
        while len(data) > self._max_entries or (
            self._max_bytes and self._bytes > self._max_bytes
        ):
            if not data:
                break
            k0, e0 = data.popitem(last=False)  # least recently used
            self._unindex(k0, e0, None)

    def _unindex(self, key: Hashable, entry: _Entry, skip: bytes | None) -> None:
        self._bytes -= entry.nbytes
        if entry.stamps:
            self.guard.release(entry.stamps)
        index = self._index
        for k in entry.keys:
            if k == skip:
                continue
            ref = index.get(k)
            if ref is None:
                continue
            if type(ref) is set:
                ref.discard(key)
                if not ref:
                    del index[k]
            elif ref == key:
                del index[k]

    def _drop(self, keys: tuple[bytes, ...]) -> int:
        data, index = self._data, self._index
        dropped = 0
        for k in keys:
            ref = index.pop(k, None)
            if ref is None:
                continue
            for local_key in ref if type(ref) is set else (ref,):
                entry = data.pop(local_key, None)
                if entry is not None:
                    self._unindex(local_key, entry, k)
                    dropped += 1
        return dropped

    def _clear(self) -> None:
        # new objects: a lock-free get() on the old dict still reads a consistent one
        self._data = OrderedDict()
        self._index = {}
        self._bytes = 0

    def _expire(self, key: Hashable, entry: _Entry) -> None:
        with self.guard.lock:
            if self._data.get(key) is entry:
                del self._data[key]
                self._unindex(key, entry, None)

    def _after_fork(self) -> None:
        self._clear()
        self._flushed("fork")

    # -- metrics, outside the lock ------------------------------------------------------

    def _invalidated(self, keys: int) -> None:
        if keys and self._m_inv is not None:
            self._m_inv(self.name, keys)
        if self._m_entries is not None:
            self._m_entries(self.name, len(self._data))

    def _flushed(self, reason: str) -> None:
        if self._m_flush is not None:
            self._m_flush(self.name, reason)
        if self._m_entries is not None:
            self._m_entries(self.name, len(self._data))


#: argument types whose value alone, with the type, names the argument: a local key can
#: be built from them without the Redis key (1, True and 1.0 are equal in a dict but
#: are different keys in Redis, hence the type beside each value)
_PLAIN: Final = frozenset({int, str, bytes, bool, type(None)})


def args_key(namespace: Hashable, args: tuple[Any, ...]) -> Hashable | None:
    """A local key for positional ``args`` of plain scalars, typed so that ``1``,
    ``True`` and ``1.0`` differ; None when an argument is of another type (then use
    the Redis key itself as the local key). Floats go by ``float.hex`` (``0.0`` and
    ``-0.0`` are different keys in Redis, equal in a dict)."""
    if len(args) == 1:
        a = args[0]
        t = type(a)
        if t in _PLAIN:
            return (namespace, t, a)
        if t is float:
            return (namespace, t, a.hex())
        return None
    parts: list[Any] = [namespace]
    for a in args:
        t = type(a)
        if t in _PLAIN:
            parts += (t, a)
        elif t is float:
            parts += (t, a.hex())
        else:
            return None
    return tuple(parts)
