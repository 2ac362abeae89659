"""Task options are checked when Celery builds the task class, not inside a worker.

No broker traffic: the app is finalized (or ``lazy=False``), so ``@app.task`` builds
the class at decoration, and a typo raises there. ``shared=False`` everywhere: a shared
task would be built again, and raise again, in every app finalized later.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

import rcache
import rcache_celery
from rcache_celery import LockedTask, UniqueTask


@pytest.fixture
def app() -> Iterator[Any]:
    app = Celery("registration", broker="memory://", set_as_current=False)
    app.finalize()
    yield app
    app.close()


def test_lock_key_typo_fails_at_decoration(app: Any) -> None:
    with pytest.raises(rcache.ConfigurationError) as info:

        @app.task(
            base=LockedTask, name="reg.report", lock_key="report:{dya}", shared=False
        )
        def report(day: str) -> None: ...

    message = str(info.value)
    assert "reg.report" in message
    assert "lock_key 'report:{dya}' names 'dya'" in message
    assert "['day']" in message  # the task's parameters
    assert "lock_key='report:{day}'" in message  # the probable fix


def test_lock_key_of_a_bound_task_ignores_self(app: Any) -> None:
    @app.task(
        base=LockedTask, name="reg.bound", bind=True, lock_key="b:{day}", shared=False
    )
    def bound(self: Any, day: str) -> None: ...

    assert bound.lock_key == "b:{day}"
    with pytest.raises(rcache.ConfigurationError, match="parameters are \\['day'\\]"):

        @app.task(
            base=LockedTask,
            name="reg.bound2",
            bind=True,
            lock_key="b:{self}",
            shared=False,
        )
        def bound2(self: Any, day: str) -> None: ...


def test_unknown_on_locked_fails_at_decoration(app: Any) -> None:
    with pytest.raises(rcache.ConfigurationError) as info:

        @app.task(base=LockedTask, name="reg.q", on_locked="queue", shared=False)
        def q(x: int) -> None: ...

    message = str(info.value)
    assert "reg.q: on_locked='queue' is not valid" in message
    for choice in ("'skip'", "'retry'", "'wait'", "'fail'"):
        assert choice in message


def test_unique_task_options_fail_at_decoration(app: Any) -> None:
    with pytest.raises(rcache.ConfigurationError, match="on_duplicate='ignore'"):

        @app.task(base=UniqueTask, name="reg.u1", on_duplicate="ignore", shared=False)
        def u1(x: int) -> None: ...

    with pytest.raises(rcache.ConfigurationError, match=r"unique_on names \['y'\]"):

        @app.task(base=UniqueTask, name="reg.u2", unique_on=["y"], shared=False)
        def u2(x: int) -> None: ...


def test_subclassed_options_fail_at_class_creation() -> None:
    with pytest.raises(rcache.ConfigurationError, match="on_locked='later'"):

        class Later(LockedTask):  # type: ignore[misc]
            on_locked = "later"

    # a base without run() is checked when a task derives from it
    class Report(LockedTask):  # type: ignore[misc]
        lock_key = "report:{dya}"

    app = Celery("registration2", broker="memory://", set_as_current=False)
    try:
        with pytest.raises(rcache.ConfigurationError, match="names 'dya'"):

            @app.task(base=Report, name="reg.sub", lazy=False, shared=False)
            def sub(day: str) -> None: ...

    finally:
        app.close()


def test_lazy_app_fails_before_any_task_runs() -> None:
    """On an app that is not finalized, Celery builds the class at finalization:
    the error comes from the first use (delay, app.tasks, worker start)."""
    app = Celery("registration3", broker="memory://", set_as_current=False)
    try:

        @app.task(base=LockedTask, name="reg.lazy", lock_key="x:{nope}", shared=False)
        def lazy(x: int) -> None: ...

        with pytest.raises(rcache.ConfigurationError, match="names 'nope'"):
            app.finalize()
    finally:
        app.close()


def test_valid_options_are_accepted(app: Any) -> None:
    @app.task(
        base=LockedTask,
        name="reg.ok",
        lock_key="r:{day}:{user.id}",
        on_locked="skip",
        shared=False,
    )
    def ok(day: str, user: Any) -> None: ...

    @app.task(
        base=UniqueTask,
        name="reg.uok",
        unique_on=["x"],
        on_duplicate="raise",
        shared=False,
    )
    def uok(x: int, y: int = 0) -> None: ...

    assert isinstance(ok, rcache_celery.LockedTask)
    assert isinstance(uok, rcache_celery.UniqueTask)
