"""Slot groups: every key of a cache entry in one hash slot on Redis Cluster.

A cached entry is read in one ``MGET`` (value, function stamp, tag stamps) and claimed
and stored by one Lua script (value, ``:lease``, ``:ready``, stamps). Redis Cluster
refuses both when the keys hash to different slots (CROSSSLOT). dogpile's cluster
backend only swaps the client, and its ``mget`` raises on cross-slot keys (redis-py
#2862); cashews has no tags on a cluster.

Here each entry belongs to one of ``groups`` (B) slot groups, chosen by a stable hash
of its key, and every key it touches carries the group's hash tag::

    shop:{shop.17}:c:app.get_user:[42]          value (and :lease, :ready)
    shop:{shop.17}:s:f:app.get_user             group 17's copy of the function stamp
    shop:{shop.17}:s:t:user:42                  group 17's copy of a tag stamp

so a hit stays one MGET and the scripts run unchanged in one slot. Invalidating a tag
or a function deletes its copy in all B groups (O(B), about 2 ms for B=256 on three
primaries); a copy is created lazily by the next claim in its group. Every process must
use the same B: it is recorded in Redis (``{prefix}:cluster:groups``) at first use and a
different B is refused, because a process with another B would leave the others'
copies valid after an invalidation. Single-primary and Sentinel layouts do not change.
"""

from __future__ import annotations

import zlib

from rcache._exceptions import ConfigurationError

__all__ = [
    "DEFAULT_GROUPS",
    "check_groups",
    "check_prefix",
    "group_of",
    "group_tag",
    "hash_tag",
]

#: At least ~16 groups per primary keeps them balanced (256 split 79/86/91 over three
#: primaries) while an invalidation stays a couple of milliseconds.
DEFAULT_GROUPS = 256
_MAX_GROUPS = 16384  # as many as there are slots: more cannot spread further


def check_groups(groups: object) -> int:
    """``slot_groups`` validated: an int from 1 to 16384."""
    if (
        isinstance(groups, bool)
        or not isinstance(groups, int)
        or not 1 <= groups <= _MAX_GROUPS
    ):
        raise ConfigurationError(
            f"slot_groups must be an int from 1 to {_MAX_GROUPS}, got {groups!r}: "
            f"write slot_groups={DEFAULT_GROUPS} (the default)"
        )
    return groups


def check_prefix(prefix: str) -> str:
    """A prefix usable on a cluster: braces in it would become the hash tag."""
    if "{" in prefix or "}" in prefix:
        raise ConfigurationError(
            f"on Redis Cluster the prefix may not contain braces, got {prefix!r}: "
            "rcache puts each entry's hash tag after it (prefix:{prefix.N}:...)"
        )
    return prefix


def group_of(key: str, groups: int) -> int:
    """The entry's group: stable across processes and Python versions (CRC-32, not
    ``hash()``, which is salted per process)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % groups


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes of ``key``: the text between its first ``{`` and the
    next ``}`` if that is not empty, else the whole key. An explicit key's group is
    chosen from it, so that explicit keys sharing a hash tag (``{cart:7}:qty``,
    ``{cart:7}:total``) still share a slot under the group's tag (transactions)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def group_tag(prefix: str, group: int) -> str:
    """The base of a group's keys: ``prefix:{prefix.group}``."""
    return f"{prefix}:{{{prefix}.{group}}}"
