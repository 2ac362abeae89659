"""Every shipped Lua script compiles on a real server once its shared preamble is
pasted in, and no include directive reaches Redis."""

from __future__ import annotations

from importlib import resources

import pytest
import redis

from rcache._redis import LuaScript

SCRIPTS = sorted(
    p.name.removesuffix(".lua")
    for p in resources.files("rcache._scripts").iterdir()
    if p.name.endswith(".lua") and not p.name.startswith("_")
)


def test_scripts_are_found() -> None:
    assert {"lock_acquire", "sem_acquire", "cache_claim"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_compiles_with_its_preamble(
    name: str, redis_client: redis.Redis
) -> None:
    script = LuaScript(name)
    assert "@include" not in script.source
    assert redis_client.script_load(script.source) == script.sha


def test_fenced_scripts_share_one_next_fence() -> None:
    shared = resources.files("rcache._scripts").joinpath("_shared.lua").read_text()
    for name in ("lock_acquire", "lock_fair_acquire", "rwlock_write", "sem_acquire"):
        raw = resources.files("rcache._scripts").joinpath(f"{name}.lua").read_text()
        assert "local function next_fence" not in raw  # written once, in _shared.lua
        assert shared.strip() in LuaScript(name).source
