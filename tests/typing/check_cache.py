"""Checked by mypy --strict (not run by pytest): decorated functions keep signatures."""

from __future__ import annotations

from typing_extensions import assert_type

import rcache

cache = rcache.Cache("memory://")


@cache.cached(ttl=60)
def get_user(user_id: int, verbose: bool = False) -> dict[str, int]:
    return {"id": user_id}


@cache.cached(ttl="10m", key="user:{user_id}")
async def load_user(user_id: int) -> list[str]:
    return []


assert_type(get_user(1), dict[str, int])
assert_type(get_user(1, verbose=True), dict[str, int])
assert_type(get_user.invalidate(1), bool)
assert_type(get_user.refresh(1), dict[str, int])
assert_type(get_user.key_for(1), str)
assert_type(get_user.invalidate_all(), bool)


async def use() -> None:
    assert_type(await load_user(1), list[str])
    assert_type(await load_user.invalidate(1), bool)
    assert_type(await load_user.refresh(1), list[str])
    assert_type(load_user.key_for(1), str)
    assert_type(await load_user.invalidate_all(), bool)


class Repo:
    @cache.cached(ttl=5, ignore=("self",))
    def find(self, x: int) -> str:
        return str(x)


assert_type(Repo().find(1), str)
assert_type(Repo().find.invalidate(1), bool)
