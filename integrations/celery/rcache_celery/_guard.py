"""The guard protocol: owner-checked keys shared by UniqueTask and LockedTask.

A *guard key* holds the id of the task that owns it. A UniqueTask takes it when it is
enqueued (``SET key id NX GET PX``: one round trip tells a duplicate caller which task
already owns it); a LockedTask takes it when it starts. Every copy that is about to run
calls ``begin`` (Lua), which also sets a *run marker* for its own task id, so that
copies of the same id are told apart:

* ``queued``: the id will be delivered again (``retry()``, ``acks_late`` requeue after a
  lost worker): the next delivery is the owner;
* ``running``: a copy with this id runs right now (a visibility-timeout redelivery,
  celery-singleton #38): another copy is ignored;
* ``done``: the id already ran (a late redelivery): another copy is ignored.

Release and renewal are compare-and-act on the task id: nobody deletes or extends
another task's key (celery-once PR #101 was never merged). Keys::

    {prefix}:celery:u:{<task name>:<args digest>}         dedup guard (UniqueTask)
    {prefix}:celery:l:{<lock name>}                       lock guard (LockedTask)
    <guard key>:r:<task id>                               run marker, same hash slot
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rcache.spi import (
    LuaScript,
    RenewedLease,
    packaged_script,
    renew_lease,
    run,
    run_script,
    stop_renewing,
    ttl_ms,
)

if TYPE_CHECKING:
    import redis

    from rcache import Cache

__all__ = [
    "BEGIN",
    "FINISH",
    "RELEASE",
    "RENEW",
    "Guard",
    "begin",
    "finish",
    "renewer",
]

log = logging.getLogger("rcache.celery")


def _script(name: str) -> LuaScript:
    return packaged_script("rcache_celery", f"_scripts/{name}.lua")


class _Scripts:
    """Loaded on first use: nothing is read at import time."""

    _loaded: dict[str, LuaScript] = {}  # noqa: RUF012 -- a per-process read-only cache

    def __getitem__(self, name: str) -> LuaScript:
        script = self._loaded.get(name)
        if script is None:
            script = self._loaded[name] = _script(name)
        return script


SCRIPTS = _Scripts()
BEGIN, FINISH, RENEW, RELEASE = "begin", "finish", "renew", "release"

# begin() codes, see _scripts/begin.lua
ACQUIRED, OWNER, RUNNING_ELSEWHERE, ALREADY_DONE, HELD, FREE = 0, 1, 2, 3, -1, -2


def digest(text: str) -> str:
    """A short, brace-free digest: hash tags must not contain ``{`` or ``}``."""
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def tag_safe(name: str) -> str:
    """``name`` if it can sit inside a hash tag, else its digest."""
    if "{" in name or "}" in name or len(name) > 200:
        return digest(name)
    return name


@dataclass(frozen=True)
class Guard:
    """One guard key and the run marker of one task id."""

    cache: Cache
    key: str
    task_id: str

    @property
    def marker(self) -> str:
        return self.cache.keyspace.run_marker(self.key, self.task_id)


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def begin(guard: Guard, lease: float, *, acquire: bool) -> tuple[int, str]:
    """Run ``begin.lua``: the code and the holder's task id."""
    script = SCRIPTS[BEGIN]
    keys = [guard.key, guard.marker]
    args = [guard.task_id, ttl_ms(lease), "1" if acquire else "0"]
    code, holder = run_script(guard.cache, script, keys, args)
    return int(code), _decode(holder)


def finish(guard: Guard, state: str, ttl: float) -> bool:
    """Run ``finish.lua`` (``state`` is ``"done"`` or ``"queued"``); True if owned."""
    script = SCRIPTS[FINISH]
    keys = [guard.key, guard.marker]
    args = [guard.task_id, state, ttl_ms(ttl)]
    return bool(run_script(guard.cache, script, keys, args))


def release(cache: Cache, key: str, value: str) -> bool:
    """Compare-and-delete a plain guard key."""
    script = SCRIPTS[RELEASE]
    return bool(run_script(cache, script, [key], [value]))


def renew_once(guard: Guard, lease: float) -> bool:
    script = SCRIPTS[RENEW]
    keys = [guard.key, guard.marker]
    args = [guard.task_id, ttl_ms(lease)]
    return bool(run_script(guard.cache, script, keys, args, retry=False))


def set_nx_get(cache: Cache, key: str, value: str, ttl: float) -> str | None:
    """``SET key value NX GET PX ttl``: None if set, else the value already there."""

    def op(c: redis.Redis) -> Any:
        return c.set(key, value, nx=True, get=True, px=ttl_ms(ttl))

    existing = run(cache, op)
    return None if existing is None else _decode(existing)


class Renewer:
    """Running tasks' leases, renewed by rcache's per-process lease renewer.

    Running tasks renew their lease every ``lease / 3`` instead of holding a one-hour
    lock (celery-once #147, celery-singleton #40): if every release hook is lost (the
    worker host dies), the key expires within one lease. A lost lease (Redis says the
    key is another task's, or no renewal succeeded for a whole lease) is logged and
    reported, never raised (redbeat #230: a lost lock that raises crash-loops beat).

    No thread of its own: the renewer thread is rcache's (one per process for locks,
    cache computations and task guards), started lazily by the first lease, so a thread
    started before a prefork fork never counts (Artemis PR #2632, celery #4607).
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._leases: dict[int, RenewedLease] = {}
        self._lock = threading.Lock()
        self._next = 0

    def add(self, guard: Guard, lease: float, label: str) -> int:
        """Renew ``guard`` every ``lease / 3``; ``label`` (the task name) names it in
        ``cache.metrics.lock_renewal`` (``rcache_lock_renewals_total``)."""
        metrics = guard.cache.metrics

        def lost(reason: str) -> None:
            metrics.lock_renewal(label, "lost")
            # the task id and name only: the guard key holds the task's arguments
            log.warning(
                "rcache-celery: task %s (%s) lost its lease (%s)",
                guard.task_id,
                label,
                reason,
            )

        renewed = renew_lease(
            guard.cache,
            SCRIPTS[RENEW],
            [guard.key, guard.marker],
            [guard.task_id, ttl_ms(lease)],
            ttl=lease,
            retry=False,
            name=f"of task {guard.task_id} ({label})",  # no key: it holds arguments
            logger=log,
            on_renewed=lambda: metrics.lock_renewal(label, "renewed"),
            on_lost=lost,
        )
        with self._lock:
            self._next += 1
            handle = self._next
            self._leases[handle] = renewed
        return handle

    def remove(self, handle: int) -> bool:
        """Stop renewing; True if the lease was lost while it was renewed."""
        with self._lock:
            renewed = self._leases.pop(handle, None)
        return renewed is not None and stop_renewing(renewed)


_renewer: Renewer | None = None
_renewer_lock = threading.Lock()


def renewer() -> Renewer:
    """This process's renewer (re-created in a forked child: threads do not survive fork)."""
    global _renewer
    with _renewer_lock:
        if _renewer is None or _renewer.pid != os.getpid():
            _renewer = Renewer()
        return _renewer
