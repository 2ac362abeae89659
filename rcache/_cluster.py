"""What a Cache does differently on Redis Cluster: slot groups at work.

The rules (which group an entry is in, how its keys are tagged) are pure and live in
``_slots.py``; :class:`~rcache._keys.KeySpace` names the keys. Here is what needs Redis:

* :class:`GroupsRecord`: every process must use the same number of groups (B); the
  first command of a process records B or compares it with the recorded one.
* :func:`invalidate`: a function's or a tag's stamp has a copy in each of the B groups,
  and an invalidation deletes them all, pipelined per node (redis-py's ClusterPipeline
  sends to every node before it reads a reply). A failure may have deleted some copies
  and not others, so it raises whatever ``on_backend_error`` says: a bypassed partial
  invalidation would leave the entries of the missed groups valid without a word.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from rcache._exceptions import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
)
from rcache._flow import Flow, Run
from rcache._policy import Guard

__all__ = ["GroupsRecord", "delete_each", "describe", "invalidate"]


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


def delete_each(client: Any, keys: Sequence[str]) -> Any:
    """``DEL`` of each key (they span slots), pipelined per node: the replies in order
    (a list, or an awaitable of one with an asyncio cluster client)."""
    pipe = client.pipeline()
    for key in keys:
        pipe.execute_command("DEL", key)
    return pipe.execute()


def invalidate(
    copies: Sequence[Sequence[str]], guard: Guard, what: str, groups: int
) -> Flow[int]:
    """Delete every copy of each stamp (``copies``: one list per function or tag);
    how many had at least one. Any failure raises (see the module docstring).

    :param guard: names the metric; its policy is not followed (always "raise").
    :param what: what is invalidated, for the error message (``"tag 'user:1'"``).
    """
    keys = [key for stamp in copies for key in stamp]
    if not keys:
        return 0
    strict = Guard(guard.name, guard.operation, "raise")
    try:
        replies = yield Run(lambda c: delete_each(c, keys), strict)
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
    found = 0
    start = 0
    for stamp in copies:
        end = start + len(stamp)
        found += any(int(n) for n in replies[start:end])
        start = end
    return found


def describe(kind: str, names: Sequence[str]) -> str:
    """``"tag 'a'"``, ``"tags 'a', 'b'"``: what an invalidation is of, for messages."""
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{kind}{'s' if len(names) > 1 else ''} {shown}"
