"""The public surface: curated exports, a-twins in step, nothing at import."""

from __future__ import annotations

import inspect
import subprocess
import sys
from typing import Any

import pytest

import rcache
from rcache._decorated import AsyncCached, SyncCached

# Public sync methods that are factories, decorators or pure helpers (no I/O): no twin.
NO_TWIN = {
    "cached",
    "cached_batch",
    "configure",
    "lock",
    "locked",
    "rwlock",
    "script",
    "semaphore",
    "tag_key",
}


def test_all_is_sorted_and_complete() -> None:
    assert rcache.__all__ == sorted(rcache.__all__)
    for name in rcache.__all__:
        assert hasattr(rcache, name), name
    public = {n for n in dir(rcache) if not n.startswith("_")}
    # public submodules (imported by other tests, never by `import rcache`) are
    # attributes once imported; they are not names of rcache's own API
    submodules = {"metrics", "testing", "flask", "fastapi", "django", "spi"}
    assert public - set(rcache.__all__) <= {"annotations", *submodules}


def _public_methods(cls: type) -> dict[str, Any]:
    return {
        name: fn
        for name, fn in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def _twin_classes() -> list[type]:
    # the lock-like classes (tests/integration/test_lock_api.py checks them further)
    return [
        rcache.Cache,
        rcache.FairLock,
        rcache.Lease,
        rcache.Lock,
        rcache.ReadLock,
        rcache.Semaphore,
        rcache.WriteLock,
    ]


@pytest.mark.parametrize("cls", _twin_classes(), ids=lambda c: c.__name__)
def test_every_sync_operation_has_an_async_twin(cls: type) -> None:
    methods = _public_methods(cls)
    sync = {n: f for n, f in methods.items() if not inspect.iscoroutinefunction(f)}
    checked = 0
    for name, fn in sync.items():
        if name in NO_TWIN or (name.startswith("a") and name[1:] in sync):
            continue
        twin = methods.get("a" + name)
        assert twin is not None, f"{cls.__name__}.{name} has no async twin a{name}"
        assert inspect.iscoroutinefunction(twin), f"{cls.__name__}.a{name} is not async"
        assert list(inspect.signature(fn).parameters) == list(
            inspect.signature(twin).parameters
        ), f"{cls.__name__}.{name} and a{name} differ in parameters"
        checked += 1
    assert checked > 0


def test_decorated_helpers_are_in_step() -> None:
    for name in ("invalidate", "refresh", "key_for"):
        s, a = getattr(SyncCached, name), getattr(AsyncCached, name)
        assert inspect.signature(s) == inspect.signature(a)
        if name != "key_for":
            assert inspect.iscoroutinefunction(a) and not inspect.iscoroutinefunction(s)


def test_decorated_async_function_is_a_coroutine_function() -> None:
    cache = rcache.Cache("memory://")

    @cache.cached(ttl=1)
    async def f() -> int:
        return 1

    @cache.cached(ttl=1)
    def g() -> int:
        return 1

    assert inspect.iscoroutinefunction(f)
    assert not inspect.iscoroutinefunction(g)
    assert f.__name__ == "f" and f.__wrapped__ is not None


def test_import_has_no_side_effects() -> None:
    code = (
        "import sys, threading, logging\n"
        "before = threading.active_count()\n"
        "import rcache\n"
        "c = rcache.Cache('redis://127.0.0.1:1/0')\n"  # constructing must not connect either
        "assert threading.active_count() == before, 'thread started'\n"
        "assert 'prometheus_client' not in sys.modules, 'prometheus imported'\n"
        "assert 'fakeredis' not in sys.modules, 'fakeredis imported'\n"
        "assert 'click' not in sys.modules, 'click imported'\n"
        "assert not logging.getLogger('rcache').handlers\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_exceptions_form_one_tree_and_pickle() -> None:
    import pickle

    errors = [
        rcache.ConfigurationError("x"),
        rcache.BackendError("x", ValueError("y")),
        rcache.BackendUnavailableError("x"),
        rcache.SerializationError("x"),
        rcache.LockNotAcquiredError("x"),
        rcache.LockNotOwnedError("x"),
        rcache.LockLostError("x"),
        rcache.TransactionConflictError(["k"], 3),
    ]
    for e in errors:
        assert isinstance(e, rcache.RCacheError)
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)
    assert isinstance(rcache.LockNotAcquiredError("x"), TimeoutError)
    assert isinstance(rcache.ConfigurationError("x"), ValueError)
    assert issubclass(rcache.BackendUnavailableError, rcache.BackendError)


def test_import_rcache_imports_no_framework() -> None:
    """Integrations are modules behind extras (rcache.flask, rcache.fastapi,
    rcache.django) or
    distributions (rcache-celery): the core imports none of them, nor the typed-value
    libraries, nor prometheus_client."""
    code = (
        "import sys, rcache\n"
        "heavy = {'flask', 'fastapi', 'starlette', 'django', 'celery', 'pydantic',"
        " 'msgspec', 'prometheus_client', 'werkzeug'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_reads_no_lua_script() -> None:
    """Scripts are read and hashed on first use: importing every module of rcache (and
    constructing a Cache) opens no ``.lua`` file (``_admin`` read one at import)."""
    code = (
        "import sys, pkgutil, importlib\n"
        "opened = []\n"
        "sys.addaudithook(lambda e, a: opened.append(str(a[0])) if e == 'open'"
        " and str(a[0]).endswith('.lua') else None)\n"
        "import rcache\n"
        "for m in pkgutil.iter_modules(rcache.__path__):\n"
        "    if m.name not in ('django', 'flask', 'fastapi', '__main__'):\n"
        "        importlib.import_module('rcache.' + m.name)\n"
        "rcache.Cache('redis://127.0.0.1:1/0')\n"
        "assert not opened, opened\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
