"""The typed protocol of the cache's Lua scripts: one spec per script.

Each spec names its script (loaded lazily, once per process), builds its KEYS and ARGV
in the order the script's header states, and parses its reply into a NamedTuple, so
that no caller reads a reply by position (``got[1]``) or compares a bare return code.
The flows in ``_readthrough.py`` are the only users; ``_decorated.py`` and ``_batch.py``
reach Redis through them.

===================  ===========================================================
script               reply
===================  ===========================================================
``cache_read``       :class:`Read` (Redis TIME + MGET of value and stamps)
``cache_claim``      :class:`Claim` (lease taken?, its PTTL, TIME, repairs, stamps)
``cache_store``      :class:`Stored` (1 stored, 0 rejected, -1 released only)
``cache_store_many`` the number of entries stored
``cache_renew``      1 renewed, 0 lost (read by ``_leases.KeyLeases``)
===================  ===========================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

from rcache._config import ttl_ms
from rcache._exceptions import RCacheError
from rcache._flow import AsyncDriver, Command, Eval, SyncDriver
from rcache._policy import Guard
from rcache._redis import LuaScript, RedisTimeoutError

__all__ = [
    "CACHE_CLAIM",
    "CACHE_READ",
    "CACHE_RENEW",
    "CACHE_STORE",
    "CACHE_STORE_MANY",
    "Claim",
    "Read",
    "ScriptSpec",
    "Store",
    "Stored",
]


class ScriptSpec(LuaScript):
    """A packaged Lua script (read on first use, as every :class:`LuaScript`) that
    builds its own :class:`Eval`; subclasses add typed ``keys``/``args``/``parse``."""

    def command(
        self, keys: Sequence[Any], args: Sequence[Any], guard: Guard | None
    ) -> Eval:
        return Eval(self, keys, args, guard)


# -- cache_read ----------------------------------------------------------------------


class Read(NamedTuple):
    """Redis's clock and the rows of an MGET (value first, then the stamps)."""

    now_us: int
    rows: list[bytes | None]


class _ReadSpec(ScriptSpec):
    @staticmethod
    def parse(reply: Sequence[Any]) -> Read:
        return Read(int(reply[0]), list(reply[1:]))


# -- cache_claim ---------------------------------------------------------------------


class Claim(NamedTuple):
    """What ``cache_claim`` answered."""

    claimed: bool  #: the lease is ours (or we only read the stamps)
    lease_pttl: int  #: ms the other holder's lease still runs (0 if ours)
    now_us: int  #: Redis TIME
    repaired: int  #: keys of ours that held another type and were replaced
    stamps: list[bytes]  #: the stamps the computation runs under, in key order


class _ClaimSpec(ScriptSpec):
    @staticmethod
    def keys(lease_key: str, ready_key: str, stamp_keys: Sequence[str]) -> list[str]:
        return [lease_key, ready_key, *stamp_keys]

    @staticmethod
    def args(
        token: str,
        lease_ttl: float | None,
        stamp_ttl_ms: int,
        new_stamps: Sequence[str],
    ) -> list[Any]:
        """``lease_ttl`` None: only read (creating if missing) the stamps."""
        lease = 0 if lease_ttl is None else ttl_ms(lease_ttl)
        return [token, lease, stamp_ttl_ms, *new_stamps]

    @staticmethod
    def parse(reply: Sequence[Any]) -> Claim:
        return Claim(
            int(reply[0]) == 1,
            int(reply[1]),
            int(reply[2]),
            int(reply[3]),
            list(reply[4:]),
        )


# -- cache_store ---------------------------------------------------------------------


class Stored(IntEnum):
    """``cache_store``'s return codes."""

    REJECTED = 0  #: a stamp changed or vanished while computing: not written
    STORED = 1
    RELEASED = -1  #: nothing to store: the lease was only given up


class _StoreSpec(ScriptSpec):
    @staticmethod
    def keys(
        value_key: str, lease_key: str, ready_key: str, stamp_keys: Sequence[str]
    ) -> list[str]:
        return [value_key, lease_key, ready_key, *stamp_keys]

    @staticmethod
    def args(
        token: str,
        data: bytes,
        entry_ttl_ms: int,
        lease_ttl: float,
        stamps: Sequence[bytes],
    ) -> list[Any]:
        """``data`` b"" only gives up the lease and wakes the waiters."""
        return [token, data, entry_ttl_ms, ttl_ms(lease_ttl), *stamps]

    @staticmethod
    def parse(reply: Any) -> Stored:
        return Stored(int(reply))


def may_answer(exc: RCacheError) -> bool:
    """Is a second, small command worth sending after ``exc``? Not after a timeout:
    Redis is hung, and another attempt would only add its socket timeout."""
    original = getattr(exc, "original", None)
    return not isinstance(original, (TimeoutError, RedisTimeoutError))


@dataclass(frozen=True, slots=True)
class Store(Command):
    """``cache_store`` writing an entry; if that fails but Redis may still answer (an
    oversized value closes the connection: proto-max-bulk-len), ``release`` gives up
    the lease at once, or the next caller would wait the whole lease (issue 14 item 8).
    The write's error then goes on to the guarded path as usual."""

    write: Eval
    release: Eval | None = None
    guard: Guard | None = None

    def run(self, driver: SyncDriver) -> Any:
        try:
            return self.write.run(driver)
        except RCacheError as exc:
            if self.release is not None and may_answer(exc):
                with contextlib.suppress(RCacheError):
                    self.release.run(driver)
            raise

    async def arun(self, driver: AsyncDriver) -> Any:
        try:
            return await self.write.arun(driver)
        except RCacheError as exc:
            if self.release is not None and may_answer(exc):
                with contextlib.suppress(RCacheError):
                    await self.release.arun(driver)
            raise


# -- cache_store_many ----------------------------------------------------------------


class _StoreManySpec(ScriptSpec):
    @staticmethod
    def keys(fn_stamp_key: str, value_keys: Sequence[str]) -> list[str]:
        return [fn_stamp_key, *value_keys]

    @staticmethod
    def args(stamp: bytes, entry_ttl_ms: int, data: Sequence[bytes]) -> list[Any]:
        return [stamp, entry_ttl_ms, *data]

    @staticmethod
    def parse(reply: Any) -> int:
        """How many entries were stored (0: an invalidation raced the computation)."""
        return int(reply)


# -- cache_renew: renewed by rcache._leases.KeyLeases (reply 1 renewed, 0 lost) ------


CACHE_READ = _ReadSpec("cache_read")
CACHE_CLAIM = _ClaimSpec("cache_claim")
CACHE_STORE = _StoreSpec("cache_store")
CACHE_STORE_MANY = _StoreManySpec("cache_store_many")
CACHE_RENEW = ScriptSpec("cache_renew")
