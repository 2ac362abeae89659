"""What ``install`` attaches to a Celery app (a leaf: the task bases, the hooks and
``warm`` all read it, and it imports none of them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rcache import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery  # type: ignore[import-untyped]

    from rcache import Cache
    from rcache_celery._metrics import NullCeleryMetrics

__all__ = ["State", "attach", "detach", "maybe_state", "state_of"]

_ATTR = "_rcache_celery_state"


@dataclass
class State:
    """What ``install`` attached to an app."""

    app: Celery
    cache: Cache
    metrics: NullCeleryMetrics
    uid: str
    reaper: Any = None  # the hub timer entry of _install._on_worker_ready


def state_of(app: Celery) -> State:
    """The installed state of ``app``; a ConfigurationError tells how to install."""
    found: State | None = getattr(app, _ATTR, None)
    if found is None:
        raise ConfigurationError(
            f"rcache_celery is not installed on the Celery app {app.main!r}: call "
            "rcache_celery.install(app, cache) where the app is created"
        )
    return found


def maybe_state(app: Celery) -> State | None:
    """The installed state of ``app``, or None."""
    return getattr(app, _ATTR, None)


def attach(state: State) -> None:
    setattr(state.app, _ATTR, state)


def detach(state: State) -> None:
    delattr(state.app, _ATTR)
