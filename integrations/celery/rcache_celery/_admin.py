"""Operators' view of rcache-celery's keys: which tasks hold dedup and lock keys.

``task_guards(cache)`` lists every guard key under ``{prefix}:celery:`` (SCAN, never
KEYS) with the task id that owns it, that id's run state and the lease left; the
``rcache tasks`` command prints it. Keys (see ``_guard.py``)::

    {prefix}:celery:u:{<task name>:<args digest>}   UniqueTask dedup key
    {prefix}:celery:l:{<lock name>}                 LockedTask lock key
    {prefix}:celery:w:{<warm task name>}            warm() gate of the last run
    <guard key>:r:<task id>                         run marker: queued|running|done
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from rcache.spi import KeySpace, arun, ascan, run, scan

if TYPE_CHECKING:
    from rcache import Cache

__all__ = ["TaskGuard", "atask_guards", "task_guards"]

_GUARD = re.compile(r"^celery:(?P<kind>[ulw]):\{(?P<name>.*)\}$", re.DOTALL)
_KINDS: dict[str, Literal["unique", "locked", "warm"]] = {
    "u": "unique",
    "l": "locked",
    "w": "warm",
}
_DIGEST = re.compile(r"^(?P<task>.+):[0-9a-f]{32}$")


def _text(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class TaskGuard:
    """One guard key held by a task.

    ``state`` is the owner's run marker: ``running``, ``queued`` (will be delivered
    again: retry or requeue) or ``done``; ``enqueued`` when a UniqueTask was sent but
    no copy has started yet; ``last run`` for a warm() gate. ``task`` is the task name
    when the key carries it (UniqueTask, and LockedTask without ``lock_key``).
    """

    kind: Literal["unique", "locked", "warm"]
    name: str
    task: str | None
    task_id: str
    state: str
    remaining: float
    key: str


def _guards(prefix: str, keys: Sequence[bytes]) -> list[tuple[str, str, str]]:
    """(key, kind letter, name) of the guard keys among ``keys`` (markers left out)."""
    head = len(prefix) + 1
    out = []
    for raw in keys:
        key = _text(raw)
        m = _GUARD.match(key[head:])
        if m is not None:
            out.append((key, m.group("kind"), m.group("name")))
    return sorted(out)


def _first_pass(guards: list[tuple[str, str, str]]) -> Callable[[Any], Any]:
    def op(client: Any) -> Any:
        pipe = client.pipeline(transaction=False)
        for key, _, _ in guards:
            pipe.get(key)
            pipe.pttl(key)
        return pipe.execute()

    return op


def _second_pass(markers: list[str]) -> Callable[[Any], Any]:
    def op(client: Any) -> Any:
        pipe = client.pipeline(transaction=False)
        for key in markers:
            pipe.get(key)
        return pipe.execute()

    return op


def _rows(
    guards: list[tuple[str, str, str]], first: Sequence[Any], states: Sequence[Any]
) -> list[TaskGuard]:
    rows = []
    for i, (key, letter, name) in enumerate(guards):
        owner, pttl = first[2 * i], first[2 * i + 1]
        if owner is None:
            continue  # expired or released since the SCAN
        kind = _KINDS[letter]
        state = states[i]
        if state is not None:
            text = _text(state)
        else:
            text = {"unique": "enqueued", "warm": "last run"}.get(kind, "held")
        m = _DIGEST.match(name)
        task = m.group("task") if m else (name if kind == "warm" else None)
        left = round(int(pttl) / 1000, 3) if int(pttl) >= 0 else float("inf")
        rows.append(TaskGuard(kind, name, task, _text(owner), text, left, key))
    return rows


def _markers(
    keyspace: KeySpace, guards: list[tuple[str, str, str]], first: Sequence[Any]
) -> list[str]:
    return [
        keyspace.run_marker(
            key, _text(first[2 * i]) if first[2 * i] is not None else ""
        )
        for i, (key, _, _) in enumerate(guards)
    ]


def task_guards(cache: Cache) -> list[TaskGuard]:
    """The guard keys of UniqueTask, LockedTask and warm() under ``cache.prefix``,
    with their owner task ids and states (a snapshot: SCAN, then two pipelines).

    Example::

        for g in rcache_celery.task_guards(cache):
            print(g.kind, g.task, g.task_id, g.state, g.remaining)
    """
    found = scan(cache, cache.keyspace.pattern("celery:"))
    guards = _guards(cache.prefix, found)
    if not guards:
        return []
    first = run(cache, _first_pass(guards))
    states = run(cache, _second_pass(_markers(cache.keyspace, guards, first)))
    return _rows(guards, first, states)


async def atask_guards(cache: Cache) -> list[TaskGuard]:
    """Async twin of :func:`task_guards`."""
    found = await ascan(cache, cache.keyspace.pattern("celery:"))
    guards = _guards(cache.prefix, found)
    if not guards:
        return []
    first = await arun(cache, _first_pass(guards))
    states = await arun(cache, _second_pass(_markers(cache.keyspace, guards, first)))
    return _rows(guards, first, states)
