"""What a Cache does differently on Redis Cluster: slot groups at work.

The rules (which group an entry is in, how its keys are tagged) are pure and live in
``_slots.py``; :class:`~rcache._keys.KeySpace` names the keys. Here is what needs Redis:

* :class:`GroupsRecord`: every process must use the same number of groups (B); the
  first command of a process records B or compares it with the recorded one.
* :func:`invalidate`: a function's or a tag's stamp has a copy in each of the B groups,
  and an invalidation deletes them all with one command per node, every node at once
  (``cluster_delete.lua``: B = 256 took 0.9 ms against 8.7 ms for 256 pipelined
  DELs, whose cost is redis-py's client CPU per command). A failure may have deleted some
  copies and not others, so it raises whatever ``on_backend_error`` says: a bypassed partial
  invalidation would leave the entries of the missed groups valid without a word.
* :func:`batch`: ``@cache.cached_batch`` with its ids split by group: one MGET per
  group (the group's function stamp and its entries), one claim per group missing its
  stamp and one ``cache_store_many`` per group, each step pipelined per node.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rcache._cache_protocol import CACHE_CLAIM, CACHE_STORE_MANY
from rcache._exceptions import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
)
from rcache._flow import AsyncDriver, Command, Compute, Eval, Flow, Run, SyncDriver
from rcache._metrics import MetricsSink
from rcache._policy import BYPASS, Guard
from rcache._readthrough import Batch
from rcache._redis import LuaScript, adelete_by_node, delete_by_node, mget_each

__all__ = [
    "DeleteCopies",
    "EvalEach",
    "GroupsRecord",
    "batch",
    "describe",
    "invalidate",
]


class GroupsRecord:
    """B as recorded in Redis (``{prefix}:cluster:groups``), checked once per process
    before the first command of a cluster Cache (``_redis.SyncRedis``/``AsyncRedis``
    call it when they make a client).

    One ``SET key B NX GET`` records B if no process did, and answers what was recorded:
    another B raises :class:`ConfigurationError` saying what to write (a setting to fix,
    never an outage: the failure policy does not bypass it). A Redis error leaves the
    check to the next command.
    """

    __slots__ = ("_pid", "groups", "key", "prefix")

    def __init__(self, key: str, groups: int, prefix: str) -> None:
        self.key = key
        self.groups = groups
        self.prefix = prefix
        self._pid = 0  # the process that checked (a forked child checks again)

    @property
    def checked(self) -> bool:
        return self._pid == os.getpid()

    def check(self, client: Any) -> None:
        """Record B, or compare it with the recorded one (sync client)."""
        if not self.checked:
            self.compare(client.set(self.key, self.groups, nx=True, get=True))

    async def acheck(self, client: Any) -> None:
        """Async twin of :meth:`check`."""
        if not self.checked:
            self.compare(await client.set(self.key, self.groups, nx=True, get=True))

    def compare(self, recorded: bytes | str | None) -> None:
        """Raise unless ``recorded`` (the reply of ``SET NX GET``) is None or B."""
        if recorded is not None:
            text = recorded.decode() if isinstance(recorded, bytes) else str(recorded)
            if text != str(self.groups):
                raise ConfigurationError(self._mismatch(text))
        self._pid = os.getpid()

    def _mismatch(self, text: str) -> str:
        if not text.isdigit():
            return (
                f"{self.key!r} holds {text!r}, not a slot group count: DEL it, and "
                f"this process records slot_groups={self.groups} at its next command"
            )
        return (
            f"this Redis Cluster's cache under prefix {self.prefix!r} uses "
            f"slot_groups={text} (recorded in {self.key!r}) and this process has "
            f"slot_groups={self.groups}: every process must use the same, or an "
            "invalidation in one leaves the entries of the others valid. Write "
            f"Cache(..., slot_groups={text}); to change it, stop every process that "
            f"uses {text}, then DEL {self.key}"
        )


@dataclass(frozen=True, slots=True)
class DeleteCopies(Command):
    """Delete keys that span slots, one command per node (``delete_by_node``): one
    integer per key, 1 if it existed."""

    keys: Sequence[str]
    guard: Guard | None = None

    def run(self, driver: SyncDriver) -> Any:
        keys = self.keys
        return driver.redis.run(lambda c: delete_by_node(c, keys))

    async def arun(self, driver: AsyncDriver) -> Any:
        keys = self.keys
        return await driver.redis.run(lambda c: adelete_by_node(c, keys))


def invalidate(
    copies: Sequence[Sequence[str]],
    guard: Guard,
    what: str,
    groups: int,
    metrics: MetricsSink | None = None,
    written: Callable[[Sequence[str]], None] | None = None,
) -> Flow[int]:
    """Delete every copy of each stamp (``copies``: one list per function or tag);
    how many had at least one (each counted as a removal if ``metrics`` is given;
    ``written(keys)`` after it in every case, as ``_readthrough.delete``). Any failure
    raises (see the module docstring).

    :param guard: names the metric; its policy is not followed (always "raise").
    :param what: what is invalidated, for the error message (``"tag 'user:1'"``).
    """
    keys = [key for stamp in copies for key in stamp]
    if not keys:
        return 0
    strict = Guard(guard.name, guard.operation, "raise")
    try:
        replies = yield DeleteCopies(keys, strict)
    except BackendError as exc:
        kind = (
            BackendUnavailableError
            if isinstance(exc, BackendUnavailableError)
            else BackendError
        )
        raise kind(
            f"could not confirm that the invalidation of {what} reached all {groups} "
            f"slot groups ({exc.message}): entries in a group it missed stay valid; "
            "call it again once the cluster answers",
            exc.original,
        ) from exc
    finally:
        if written is not None:
            written(keys)
    found = 0
    start = 0
    for stamp in copies:
        end = start + len(stamp)
        found += any(int(n) for n in replies[start:end])
        start = end
    if metrics is not None:
        for _ in range(found):
            metrics.cache_removal(guard.name)
    return found


def describe(kind: str, names: Sequence[str]) -> str:
    """``"tag 'a'"``, ``"tags 'a', 'b'"``: what an invalidation is of, for messages."""
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{kind}{'s' if len(names) > 1 else ''} {shown}"


@dataclass(frozen=True, slots=True)
class EvalEach(Command):
    """A Lua script once per ``(keys, args)``, pipelined per node (``LuaScript.each``):
    the replies in order."""

    script: LuaScript
    calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]
    guard: Guard | None = None

    def run(self, driver: SyncDriver) -> Any:
        script, calls = self.script, self.calls
        return driver.redis.run(lambda c: script.each(c, calls))

    async def arun(self, driver: AsyncDriver) -> Any:
        script, calls = self.script, self.calls
        return await driver.redis.run(lambda c: script.aeach(c, calls))


def _eval(command: Command) -> Eval:
    # Batch builds its script calls as Eval commands; here their KEYS and ARGV go
    # into one pipeline with the other groups'
    assert isinstance(command, Eval)
    return command


def batch(
    part: Callable[[int], Batch],
    ids: list[Any],
    bound: dict[str, Any],
    keys: list[str],
    group_of: Callable[[str], int | None],
) -> Flow[dict[Any, Any]]:
    """A call of a batch function on a cluster (``_readthrough.batch`` split by slot
    group): present entries in one pipelined read, the function called once with every
    missing id, their results stored per group (each group's store rejected if
    ``invalidate_all`` raced the computation). ``part(g)`` is the function's settings
    with group ``g``'s stamp. Returns ``{id: value}``."""
    if not ids:
        return {}
    members: dict[int, list[int]] = {}  # group -> positions in ids
    for i, key in enumerate(keys):
        group = group_of(key)
        assert group is not None  # a value key of a grouped KeySpace
        members.setdefault(group, []).append(i)
    groups = list(members)
    parts = {g: part(g) for g in groups}
    head = parts[groups[0]]
    clock = head.host._clock
    stamps: dict[int, bytes | None] = {}
    found: dict[Any, Any] = {}
    missing: list[Any] = []
    reply: Any = BYPASS
    offset = clock.offset()
    if offset is None:  # Redis's clock, from any node (they share the host's clock)
        now_reply = yield Run(lambda c: c.time(), head.get)
        if now_reply is not BYPASS:
            clock.saw(int(now_reply[0]) * 1_000_000 + int(now_reply[1]))
            offset = clock.offset()
    if offset is not None:
        reads = [[parts[g].fn_stamp, *(keys[i] for i in members[g])] for g in groups]
        reply = yield Run(lambda c: mget_each(c, reads), head.get)
    if reply is BYPASS:  # without Redis: compute all, store nothing
        missing = list(ids)
    else:
        now = clock.monotonic() + (offset or 0.0)
        for g, rows in zip(groups, reply, strict=True):
            got, lost = parts[g].split([ids[i] for i in members[g]], now, rows)
            found.update(got)
            missing.extend(lost)
            if lost:
                stamps[g] = rows[0]
        if not missing:
            return found
        unstamped = [g for g, stamp in stamps.items() if stamp is None]
        if unstamped:  # no stamp yet: create the groups' copies to store under
            claims = [_eval(parts[g].stamp_claim()) for g in unstamped]
            got = yield EvalEach(
                CACHE_CLAIM, [(c.keys, c.args) for c in claims], head.get
            )
            if got is not BYPASS:
                for g, r in zip(unstamped, got, strict=True):
                    stamps[g] = parts[g].claimed(r).stamps[0]
    start = time.perf_counter()
    computed = head.check_result(
        (yield Compute(head.fn, (), {**bound, head.ids_param: missing}))
    )
    elapsed = time.perf_counter() - start
    head.host.metrics.cache_load(head.name, "success", elapsed)
    stores = [
        _eval(
            parts[g].store(
                [ids[i] for i in members[g]],
                [keys[i] for i in members[g]],
                computed,
                stamp,
                elapsed,
            )
        )
        for g, stamp in stamps.items()
        if stamp is not None
    ]
    stores = [c for c in stores if c.keys[1:]]  # groups with something to store
    if stores and computed:
        n = yield EvalEach(
            CACHE_STORE_MANY, [(c.keys, c.args) for c in stores], head.put
        )
        if n is not BYPASS:
            for _ in range(sum(CACHE_STORE_MANY.parse(x) for x in n)):
                head.host.metrics.cache_put(head.name)
    return {**found, **{i: computed[i] for i in missing if i in computed}}
