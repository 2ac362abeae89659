"""Operating rcache: clear a namespace, count what it holds, list and break locks.

What an operator on call needs, without hand-typed ``redis-cli`` on internal key names
(python-redis-lock's ``reset_all`` and celery-singleton's ``clear_locks`` run ``KEYS``
and wipe every worker's locks; Flask-Caching's ``clear()`` is ``KEYS`` + ``DEL``):

* Everything walks the keyspace with ``SCAN MATCH {prefix}:*`` and deletes with
  ``UNLINK`` in batches, never ``KEYS``: each batch is a few hundred keys, so the server
  is never blocked for more than a fraction of a millisecond per call and other clients
  keep being served between batches (bench: ``benchmarks/bench_admin.py``).
* The prefix is glob-escaped before it goes into ``MATCH`` (a prefix ``a*b`` must not
  match ``axb:...``), and every key SCAN returns is checked again against
  ``{prefix}:`` before it is deleted: nothing outside the prefix is ever touched.
* ``clear`` leaves lock keys (``{prefix}:l:*``) and Celery guard keys
  (``{prefix}:celery:*``) alone unless ``include_locks=True``: deleting a held lock lets
  a second holder in, and deleting its fence counter makes fences restart (a fence is
  only useful if it never goes backwards).
* ``force_release`` bumps the fence counter in the same script that deletes the lease,
  so a resource checking fences against the counter rejects the old holder, whose own
  release/extend then report ``LockNotOwnedError``.

The planning and parsing here are pure (no IO); each operation is one flow
(``clear_flow``, ``stats_flow``, ``locks_flow``, ``force_release_flow``) that
``Cache`` runs with its sync or async driver.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from rcache._exceptions import ConfigurationError
from rcache._flow import Eval, Flow, Run, SyncDriver
from rcache._keys import ENTRY_KEY, LOCK_KEY, KeySpace, escape_glob
from rcache._redis import LuaScript

__all__ = [
    "CacheStats",
    "ClearResult",
    "ForceReleaseResult",
    "FunctionStats",
    "Holder",
    "LockInfo",
    "escape_glob",
]

_FORCE_RELEASE = LuaScript("admin_force_release")

#: Keys per SCAN call and per UNLINK: large enough that 200,000 keys take a few hundred
#: round trips, small enough that one UNLINK of small values stays well under 1 ms.
DEFAULT_BATCH = 500
#: Keys whose MEMORY USAGE is read to estimate the namespace's memory.
DEFAULT_SAMPLE = 200

Kind = Literal["lock", "fair lock", "rwlock", "semaphore"]


def _text(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else raw.decode("utf-8", "backslashreplace")


# -- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClearResult:
    """What :meth:`Cache.clear` did (or, with ``dry_run``, would do).

    ``matched`` keys were found under the prefix; ``deleted`` of them were unlinked;
    ``kept`` are lock and Celery guard keys left in place (``include_locks=False``).
    ``interrupted`` is True when ``on_batch`` asked to stop: what was deleted until then
    is counted, the rest is untouched. ``longest_batch_ms`` is the longest UNLINK round
    trip seen by this client (the server is blocked for at most that long per batch).
    """

    prefix: str
    dry_run: bool
    matched: int = 0
    deleted: int = 0
    kept: int = 0
    batches: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    longest_batch_ms: float = 0.0


@dataclass(frozen=True)
class FunctionStats:
    """Cached entries of one decorated function (``module.qualname``)."""

    name: str
    entries: int


@dataclass(frozen=True)
class CacheStats:
    """A census of everything under the prefix (one SCAN pass).

    ``entries`` = values of decorated functions + explicit ``set()``/``key=`` entries;
    ``memory_bytes`` is estimated from ``MEMORY USAGE`` of ``memory_sampled`` random
    keys (None where the server refuses MEMORY USAGE).
    """

    prefix: str
    keys: int
    entries: int
    explicit_entries: int
    functions: tuple[FunctionStats, ...]
    tags: int
    tag_names: tuple[str, ...]
    computations: int
    lock_keys: int
    locks_held: int
    celery_keys: int
    other_keys: int
    memory_bytes: int | None
    memory_sampled: int
    seconds: float


@dataclass(frozen=True)
class Holder:
    """One holder of a lock: the token it acquired with (``pid:random`` for rcache's
    own locks), its mode (``exclusive``, ``write``, ``read`` or ``permit``) and the
    lease left, by the server's clock."""

    token: str
    mode: str
    remaining: float

    @property
    def pid(self) -> int | None:
        """The holder's process id, read from the token (None if it has none)."""
        head = self.token.split(":", 1)[0]
        return int(head) if head.isdigit() else None


@dataclass(frozen=True)
class LockInfo:
    """A lock, RW lock or semaphore that is held or waited for.

    ``fence`` is the current fence counter (the holder's fence for a lock and an RW
    writer). ``waiters`` is the number of waiters Redis records (fair locks, waiting RW
    writers); None for kinds that keep no count. For plain locks ``waiting`` tells
    that a waiter announced itself lately: the marker outlives each wait by up to the
    waiter's longest single block (~20 s), so it can outlast the waiter.
    """

    name: str
    kind: Kind
    holders: tuple[Holder, ...]
    fence: int | None
    waiters: int | None
    waiting: bool
    limit: int | None = None


@dataclass(frozen=True)
class ForceReleaseResult:
    """What :meth:`Lock.force_release` took away: the tokens of the live holders it
    removed and the fence counter afterwards (None for unfenced read leases)."""

    name: str
    kind: str
    released: tuple[str, ...]
    fence: int | None


# -- clear: pure plan, thin drivers ------------------------------------------------------


@dataclass
class _ClearPlan:
    prefix: str
    dry_run: bool
    include_locks: bool
    batch: int
    result: ClearResult = field(init=False)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if isinstance(self.batch, bool) or not isinstance(self.batch, int):
            raise ConfigurationError(f"batch_size must be an int, got {self.batch!r}")
        if not 1 <= self.batch <= 100_000:
            raise ConfigurationError(
                f"batch_size must be between 1 and 100000, got {self.batch}: "
                f"write batch_size={DEFAULT_BATCH}"
            )
        self.result = ClearResult(prefix=self.prefix, dry_run=self.dry_run)
        self._head = (self.prefix + ":").encode() if self.prefix else b""
        # a cluster's recorded slot groups are a setting, not cached data: kept
        record = (KeySpace(self.prefix).groups_record().encode(),)
        self._protected = (
            ()
            if not self.prefix
            else record
            if self.include_locks
            else (self._head + b"l:", self._head + b"celery:", *record)
        )

    @property
    def match(self) -> str:
        return KeySpace(self.prefix).pattern() if self.prefix else "*"

    def select(self, keys: Sequence[bytes | str]) -> list[bytes]:
        """The keys of one SCAN page to unlink (never one outside the prefix)."""
        doomed: list[bytes] = []
        kept = 0
        for key in keys:
            raw = key.encode() if isinstance(key, str) else key
            if not raw.startswith(self._head):
                continue  # defence in depth: MATCH already filtered
            if self._protected and raw.startswith(self._protected):
                kept += 1
                continue
            doomed.append(raw)
        r = self.result
        self.result = replace(
            r, matched=r.matched + len(doomed) + kept, kept=r.kept + kept
        )
        return doomed

    def unlinked(self, count: int, ms: float) -> None:
        r = self.result
        self.result = replace(
            r,
            deleted=r.deleted + count,
            batches=r.batches + 1,
            longest_batch_ms=max(r.longest_batch_ms, ms),
        )

    def finish(self, interrupted: bool) -> ClearResult:
        self.result = replace(
            self.result,
            interrupted=interrupted,
            seconds=time.monotonic() - self.started,
        )
        return self.result


OnBatch = Callable[[ClearResult], object]


def _scan(cursor: int, match: str, count: int) -> Callable[[Any], Any]:
    """One SCAN page; safe to retry (the same cursor gives the same page or more).

    On Redis Cluster there is no single cursor (each primary has its own): the page is
    one whole pass over every primary (redis-py's scan_iter), with cursor 0."""

    def page(c: Any) -> Any:
        if hasattr(c, "nodes_manager"):  # a cluster client, sync or asyncio
            keys = c.scan_iter(match=match, count=count)
            if hasattr(keys, "__aiter__"):

                async def collect() -> tuple[int, list[bytes]]:
                    return 0, [k async for k in keys]

                return collect()
            return 0, list(keys)
        return c.scan(cursor, match=match, count=count)

    return page


def _unlink(keys: list[bytes]) -> Callable[[Any], Any]:
    # UNLINK frees large values in a background thread; retrying it is harmless
    return lambda c: c.unlink(*keys)


def _chunks(keys: list[bytes], size: int) -> Iterable[list[bytes]]:
    for i in range(0, len(keys), size):
        yield keys[i : i + size]


def clear_flow(
    prefix: str,
    *,
    dry_run: bool = False,
    include_locks: bool = False,
    batch_size: int = DEFAULT_BATCH,
    on_batch: OnBatch | None = None,
) -> Flow[ClearResult]:
    """:meth:`Cache.clear` for any prefix ("" = the whole db), as a flow."""
    plan = _ClearPlan(prefix, dry_run, include_locks, batch_size)
    cursor: int = 0
    while True:
        cursor, keys = yield Run(_scan(cursor, plan.match, batch_size))
        for chunk in _chunks(plan.select(keys), batch_size):
            if dry_run:
                plan.unlinked(0, 0.0)
                continue
            t0 = time.perf_counter()
            n = yield Run(_unlink(chunk))
            plan.unlinked(int(n), (time.perf_counter() - t0) * 1000)
        stop = on_batch is not None and on_batch(plan.result) is False
        if int(cursor) == 0 or stop:
            return plan.finish(int(cursor) != 0)


def clear_prefix(
    driver: SyncDriver,
    prefix: str,
    *,
    dry_run: bool = False,
    include_locks: bool = False,
    batch_size: int = DEFAULT_BATCH,
    on_batch: OnBatch | None = None,
) -> ClearResult:
    """Run :func:`clear_flow` with ``driver`` (the CLI's entry point)."""
    return driver.drive(
        clear_flow(
            prefix,
            dry_run=dry_run,
            include_locks=include_locks,
            batch_size=batch_size,
            on_batch=on_batch,
        )
    )


# -- stats -------------------------------------------------------------------------------


@dataclass
class _Census:
    prefix: str
    sample: int
    started: float = field(default_factory=time.monotonic)
    keys: int = 0
    explicit: int = 0
    computations: int = 0
    tags: set[str] = field(default_factory=set)  # a tag's copies count once
    lock_keys: int = 0
    held: set[str] = field(default_factory=set)
    celery: int = 0
    other: int = 0
    functions: dict[str, int] = field(default_factory=dict)
    reservoir: list[bytes] = field(default_factory=list)
    _rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if isinstance(self.sample, bool) or not isinstance(self.sample, int):
            raise ConfigurationError(f"sample must be an int, got {self.sample!r}")
        if self.sample < 0:
            raise ConfigurationError(f"sample must be >= 0, got {self.sample}")
        self._head = len(self.prefix) + 1
        # on Redis Cluster, cache keys carry a slot group after the prefix:
        # {prefix}:{{prefix.G}}:c:..., :k:..., :s:... (KeySpace)
        self._group = "{" + self.prefix + "."

    @property
    def match(self) -> str:
        return KeySpace(self.prefix).pattern()

    def add(self, keys: Sequence[bytes]) -> None:
        head = self.prefix.encode() + b":"
        for raw in keys:
            if not raw.startswith(head):
                continue
            self.keys += 1
            # reservoir sampling: every key has the same chance to be measured
            if len(self.reservoir) < self.sample:
                self.reservoir.append(raw)
            else:
                j = self._rng.randrange(self.keys)
                if j < self.sample:
                    self.reservoir[j] = raw
            rest = _text(raw[self._head :])
            if rest.startswith(self._group):
                rest = rest[rest.find("}:") + 2 :]
            if rest.startswith("c:"):
                if rest.endswith(":lease"):
                    self.computations += 1
                    continue
                if rest.endswith(":ready"):  # a finished computation's wake-up signal
                    self.other += 1
                    continue
                m = ENTRY_KEY.match(rest)
                fn = m.group("fn") if m else "?"
                self.functions[fn] = self.functions.get(fn, 0) + 1
            elif rest.startswith("k:"):
                self.explicit += 1
            elif rest.startswith("s:t:"):
                self.tags.add(rest[4:])
            elif rest.startswith("s:"):
                self.other += 1
            elif rest.startswith("l:"):
                self.lock_keys += 1
                m = LOCK_KEY.match(rest)
                if m and m.group("aux") in ("", ":rw:w", ":rw:r", ":sem"):
                    self.held.add(m.group("name"))
            elif rest.startswith("celery:"):
                self.celery += 1
            else:
                self.other += 1

    def finish(self, sizes: Sequence[Any], held: int) -> CacheStats:
        measured = [int(s) for s in sizes if s is not None]
        memory = None
        if measured:
            memory = round(sum(measured) / len(measured) * self.keys)
        elif self.keys == 0:
            memory = 0
        functions = tuple(
            FunctionStats(n, c)
            for n, c in sorted(self.functions.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        decorated = sum(self.functions.values())
        return CacheStats(
            prefix=self.prefix,
            keys=self.keys,
            entries=decorated + self.explicit,
            explicit_entries=self.explicit,
            functions=functions,
            tags=len(self.tags),
            tag_names=tuple(sorted(self.tags)[:50]),
            computations=self.computations,
            lock_keys=self.lock_keys,
            locks_held=held,
            celery_keys=self.celery,
            other_keys=self.other,
            memory_bytes=memory,
            memory_sampled=len(measured),
            seconds=time.monotonic() - self.started,
        )


def _memory_usage(client: Any, keys: list[bytes]) -> Any:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.execute_command("MEMORY", "USAGE", key)
    return pipe.execute(raise_on_error=False)


def _sizes(replies: Sequence[Any]) -> list[int | None]:
    # a key deleted since the SCAN answers None; a server refusing MEMORY USAGE (an ACL,
    # the memory:// backend) answers an error object: both are left out of the estimate
    return [r if isinstance(r, int) else None for r in replies]


# -- locks -------------------------------------------------------------------------------


def _lock_names(keys: Iterable[bytes], prefix: str) -> dict[str, set[str]]:
    """Lock name -> the aux suffixes present, from keys under ``{prefix}:l:``."""
    found: dict[str, set[str]] = {}
    head = len(prefix) + 1
    for raw in keys:
        m = LOCK_KEY.match(_text(raw[head:]))
        if m is None:
            continue
        aux = m.group("aux")
        if aux.startswith(":fs:"):
            aux = ":fs:"
        found.setdefault(m.group("name"), set()).add(aux)
    return found


def _lock_queries(prefix: str, name: str, aux: set[str]) -> list[tuple[str, list[Any]]]:
    """The commands that describe one lock name (run in one pipeline for all names)."""
    k = KeySpace(prefix).lock(name)
    q: list[tuple[str, list[Any]]] = []
    if "" in aux or ":fq" in aux or ":w" in aux:
        q += [
            ("lock", ["GET", k.base]),
            ("lock_pttl", ["PTTL", k.base]),
            ("fence", ["GET", k.fence]),
            ("waiting", ["EXISTS", k.waiting]),
            ("fair", ["EXISTS", k.queue]),
            ("fair_live", ["ZCOUNT", k.queue_expiry, "(NOW", "+inf"]),
        ]
    if aux & {":rw:w", ":rw:r", ":rw:wq"}:
        q += [
            ("writer", ["GET", k.writer]),
            ("writer_pttl", ["PTTL", k.writer]),
            ("readers", ["ZRANGE", k.readers, "0", "-1", "WITHSCORES"]),
            ("intents", ["ZCOUNT", k.intents, "(NOW", "+inf"]),
            ("rw_fence", ["GET", k.rw_fence]),
        ]
    if ":sem" in aux:
        q += [
            ("permits", ["ZRANGE", k.permits, "0", "-1", "WITHSCORES"]),
            ("sem_fence", ["GET", k.permits_fence]),
        ]
    return q


def _int(v: Any) -> int | None:
    return None if v is None else int(v)


def _live(pairs: Sequence[Any], now_ms: int, mode: str) -> tuple[Holder, ...]:
    """Holders from ``ZRANGE ... WITHSCORES`` (member -> expiry in server ms)."""
    out = []
    for member, score in pairs:
        left = float(score) - now_ms
        if left > 0:
            out.append(Holder(_text(member), mode, round(left / 1000, 3)))
    return tuple(out)


def _describe(name: str, r: dict[str, Any], now_ms: int) -> list[LockInfo]:
    """LockInfo rows of one name from its query replies (pure)."""
    rows: list[LockInfo] = []
    if "lock" in r:
        holders: tuple[Holder, ...] = ()
        if r["lock"] is not None and int(r["lock_pttl"]) != -2:
            pttl = int(r["lock_pttl"])
            left = round(pttl / 1000, 3) if pttl >= 0 else float("inf")
            holders = (Holder(_text(r["lock"]), "exclusive", left),)
        fair = bool(int(r["fair"]))
        waiters = int(r["fair_live"]) if fair else None
        waiting = bool(int(r["waiting"])) or bool(waiters)
        if holders or waiting:
            rows.append(
                LockInfo(
                    name,
                    "fair lock" if fair else "lock",
                    holders,
                    _int(r["fence"]),
                    waiters,
                    waiting,
                )
            )
    if "writer" in r:
        holders = ()
        if r["writer"] is not None and int(r["writer_pttl"]) != -2:
            pttl = int(r["writer_pttl"])
            left = round(pttl / 1000, 3) if pttl >= 0 else float("inf")
            holders = (Holder(_text(r["writer"]), "write", left),)
        holders += _live(r["readers"], now_ms, "read")
        intents = int(r["intents"])
        if holders or intents:
            rows.append(
                LockInfo(
                    name, "rwlock", holders, _int(r["rw_fence"]), intents, intents > 0
                )
            )
    if "permits" in r:
        holders = _live(r["permits"], now_ms, "permit")
        if holders:
            rows.append(
                LockInfo(name, "semaphore", holders, _int(r["sem_fence"]), None, False)
            )
    return rows


def _now_ms(reply: Sequence[Any]) -> int:
    return int(reply[0]) * 1000 + int(reply[1]) // 1000


def _fix_now(cmd_args: list[Any], now_ms: int) -> list[Any]:
    return [f"({now_ms}" if a == "(NOW" else a for a in cmd_args]


def _lock_rows(
    prefix: str, names: dict[str, set[str]], now_ms: int, replies: Sequence[Any]
) -> list[LockInfo]:
    rows: list[LockInfo] = []
    i = 0
    for name, aux in sorted(names.items()):
        labels = [label for label, _ in _lock_queries(prefix, name, aux)]
        r = dict(zip(labels, replies[i : i + len(labels)], strict=True))
        i += len(labels)
        rows += _describe(name, r, now_ms)
    return rows


def _lock_commands(
    prefix: str, names: dict[str, set[str]], now_ms: int
) -> list[list[Any]]:
    cmds = []
    for name, aux in sorted(names.items()):
        cmds += [_fix_now(cmd, now_ms) for _, cmd in _lock_queries(prefix, name, aux)]
    return cmds


def _run_commands(client: Any, cmds: list[list[Any]]) -> Any:
    pipe = client.pipeline(transaction=False)
    for cmd in cmds:
        pipe.execute_command(*cmd)
    return pipe.execute()


# -- force release -----------------------------------------------------------------------


def force_release_flow(
    name: str, kind: str, keys: list[str], args: list[Any]
) -> Flow[ForceReleaseResult]:
    """:meth:`Lock.force_release` as a flow: ``admin_force_release.lua`` with the KEYS
    and ARGV that the lock object gives for its kind (``_LeasedLock._force_call``)."""
    reply = yield Eval(_FORCE_RELEASE, keys, args)
    tokens = tuple(_text(t) for t in reply[0])
    fence = int(reply[1]) if kind != "rwlock read" and int(reply[1]) > 0 else None
    return ForceReleaseResult(name, kind, tokens, fence)


def stats_flow(prefix: str, sample: int, batch_size: int) -> Flow[CacheStats]:
    """:meth:`Cache.stats` as a flow: one SCAN pass, then a sample's MEMORY USAGE."""
    census = _Census(prefix, sample)
    cursor: int = 0
    while True:
        cursor, keys = yield Run(_scan(cursor, census.match, batch_size))
        census.add(keys)
        if int(cursor) == 0:
            break
    sizes = []
    if census.reservoir:
        reservoir = census.reservoir
        sizes = _sizes((yield Run(lambda c: _memory_usage(c, reservoir))))
    held = len((yield from locks_flow(prefix, batch_size))) if census.held else 0
    return census.finish(sizes, held)


def locks_flow(prefix: str, batch_size: int) -> Flow[list[LockInfo]]:
    """:meth:`Cache.locks` as a flow."""
    match = KeySpace(prefix).pattern("l:")
    found: list[bytes] = []
    cursor: int = 0
    while True:
        cursor, keys = yield Run(_scan(cursor, match, batch_size))
        found += keys
        if int(cursor) == 0:
            break
    names = _lock_names(found, prefix)
    if not names:
        return []
    now_ms = _now_ms((yield Run(lambda c: c.time())))
    cmds = _lock_commands(prefix, names, now_ms)
    replies = yield Run(lambda c: _run_commands(c, cmds))
    return _lock_rows(prefix, names, now_ms, replies)
