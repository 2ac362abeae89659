"""Type-level contracts of the transaction helpers (checked by mypy --strict, not run)."""

from __future__ import annotations

from typing import Any

from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.client import Pipeline
from typing_extensions import assert_type

import rcache
from rcache._transaction import Script, TransactionStats

cache = rcache.Cache("redis://127.0.0.1:6379/0", prefix="typing")
stats = TransactionStats()


def take_one(pipe: Pipeline) -> None:
    stock = int(pipe.get("stock:42") or 0)
    pipe.multi()
    pipe.set("stock:42", stock - 1)


async def atake_one(pipe: AsyncPipeline) -> None:
    await pipe.get("stock:42")
    pipe.multi()  # type: ignore[no-untyped-call]
    pipe.set("stock:42", 1)


def add_qty(cart: dict[str, int] | None) -> dict[str, int]:
    return {**(cart or {}), "qty": 3}


def sync_usage() -> None:
    assert_type(cache.transaction(take_one, watch=["stock:42"], retries=20), list[Any])
    assert_type(
        cache.transaction(take_one, watch=[b"k"], max_time="2s", stats=stats), list[Any]
    )
    assert_type(cache.update("cart:7", add_qty, ttl=600), dict[str, int])
    script = cache.script("return 1", idempotent=True)
    assert_type(script, Script)
    assert_type(script.run(keys=["k"], args=[1, "x", b"y", 2.5]), Any)
    assert_type(script.sha, str)
    assert_type(stats.conflicts, int)


async def async_usage() -> None:
    assert_type(await cache.atransaction(atake_one, watch=["stock:42"]), list[Any])
    assert_type(await cache.aupdate("cart:7", add_qty, ttl=600), dict[str, int])
    script = await cache.ascript("return 1", load=True)
    assert_type(await script.arun(keys=["k"]), Any)


def misuse() -> None:
    cache.transaction(atake_one, watch=["k"])  # type: ignore[arg-type]
    cache.update("cart:7", add_qty, ttl=600).upper()  # type: ignore[attr-defined]
