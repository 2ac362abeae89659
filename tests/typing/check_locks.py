"""Type-level contracts of the lock API, checked by ``mypy --strict`` (not run)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from typing_extensions import assert_type

import rcache
from rcache._lock import Lease, Lock, ReadLock, RWLock, Semaphore, WriteLock

cache = rcache.Cache("redis://127.0.0.1:6379/0")


def sync_use() -> None:
    lock = cache.lock("report:2024-11", ttl=30, timeout=10)
    assert_type(lock, Lock)
    with lock as held:
        assert_type(held, Lock)
        assert_type(held.fence, int)
        held.ensure_held()
    assert_type(lock.acquire(timeout=0), bool)
    lock.extend(30)
    lock.release()
    assert_type(lock.lease, "Lease | None")
    rw = cache.rwlock("doc:1")
    assert_type(rw, RWLock)
    with rw.read() as r:
        assert_type(r, ReadLock)
    with rw.write() as w:
        assert_type(w, WriteLock)
    with cache.semaphore("api-quota", limit=5) as s:
        assert_type(s, Semaphore)


async def async_use() -> None:
    async with cache.lock("x", ttl=30) as held:
        assert_type(held, Lock)
    lock = cache.lock("x")
    assert_type(await lock.aacquire(timeout=0), bool)
    await lock.aextend(30)
    await lock.arelease()
    async with cache.rwlock("doc:1").read() as r:
        assert_type(r, ReadLock)
    async with cache.semaphore("q", limit=2) as s:
        assert_type(s, Semaphore)


@cache.locked("invoice:{invoice_id}", ttl=30, timeout=5)
def pay(invoice_id: int, amount: float = 0.0) -> str:
    return f"{invoice_id}:{amount}"


@cache.locked("invoice:{invoice_id}", ttl=30)
async def apay(invoice_id: int) -> int:
    return invoice_id


assert_type(pay(1), str)
assert_type(pay(1, amount=2.5), str)
pay("1")  # type: ignore[arg-type]
pay(1, wrong=2)  # type: ignore[call-arg]


async def call_apay() -> None:
    assert_type(await apay(1), int)
    await apay("x")  # type: ignore[arg-type]


def apay_shape(f: Callable[[int], Coroutine[Any, Any, int]]) -> None: ...


apay_shape(apay)


def on_lost(lease: Lease) -> None:
    assert_type(lease.fence, int)


cache.lock("with-callback", on_lost=on_lost, max_hold="10m")


class Billing:
    @cache.locked("bill:{self.account}:{n}", ttl=30)
    def charge(self, n: int) -> str:
        return f"{n}"

    @cache.locked("bill:{self.account}", ttl=30)
    async def acharge(self, n: int) -> int:
        return n

    account = "acme"


assert_type(Billing().charge(1), str)
Billing().charge("x")  # type: ignore[arg-type]


async def call_acharge() -> None:
    assert_type(await Billing().acharge(1), int)
