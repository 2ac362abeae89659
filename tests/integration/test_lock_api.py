"""The lock objects' public API: every sync method has an ``a`` twin with the same
parameters (style.md: acquire/aacquire, release/arelease, extend/aextend, ...)."""

from __future__ import annotations

import inspect

import pytest

import rcache
from rcache import FairLock, Lease, Lock, ReadLock, RWLock, Semaphore, WriteLock

#: Nothing here touches Redis: the marker keeps the lock modules alike (no test here
#: takes the topology, so each runs once).
pytestmark = pytest.mark.topologies("single", "cluster")

#: The lock-like classes whose sync methods have ``a`` twins.
LOCK_CLASSES = [Lock, FairLock, ReadLock, WriteLock, Semaphore]

DUNDER_PAIRS = [("__enter__", "__aenter__"), ("__exit__", "__aexit__")]


def _public_methods(cls: type) -> dict[str, object]:
    return {
        name: member
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


@pytest.mark.parametrize("cls", [*LOCK_CLASSES, Lease], ids=lambda c: c.__name__)
def test_every_sync_method_has_an_async_twin(cls: type) -> None:
    methods = _public_methods(cls)
    sync = [n for n, m in methods.items() if not inspect.iscoroutinefunction(m)]
    if cls is not Lease:
        assert {"acquire", "release", "extend", "ensure_held"} <= set(sync)
    for name in sync:
        twin = methods.get("a" + name)
        assert twin is not None, f"{cls.__name__}.{name} has no a{name}"
        assert inspect.iscoroutinefunction(twin), f"{cls.__name__}.a{name} is not async"
        assert list(inspect.signature(methods[name]).parameters.values()) == list(
            inspect.signature(twin).parameters.values()  # type: ignore[arg-type]
        ), f"{cls.__name__}.{name} and a{name} differ in parameters"
    for name in methods:
        if inspect.iscoroutinefunction(methods[name]):
            assert name.startswith("a") and name[1:] in methods, name
    for sync_name, async_name in DUNDER_PAIRS if cls is not Lease else []:
        s, a = getattr(cls, sync_name), getattr(cls, async_name)
        assert inspect.iscoroutinefunction(a)
        assert list(inspect.signature(s).parameters) == list(
            inspect.signature(a).parameters
        )


def test_rwlock_and_lease_have_no_io_methods_without_twins() -> None:
    assert set(_public_methods(RWLock)) == {"read", "write"}  # factories, no IO
    assert set(_public_methods(Lease)) == {"ensure_held", "aensure_held"}


def test_cache_has_the_lock_factories() -> None:
    for name in ("lock", "locked", "rwlock", "semaphore"):
        assert callable(getattr(rcache.Cache, name))
