"""``install(app, cache)`` / ``uninstall(app)``: the cache and the main-process hooks.

The hooks run in the worker's **main process**, where Celery reports what a pool child
cannot: a child killed by SIGKILL or the OOM killer (``task_failure`` with
``WorkerLostError``), a hard time limit (``task_failure`` with ``TimeLimitExceeded``,
celery PR #10226), ``revoke()`` with or without ``terminate=True`` (``task_revoked``).
Each releases the task's guard key at once, owner-checked, instead of leaving it for an
hour (celery-once #147, #110) or forever (celery-singleton #29, #40).

A killed child is only noticed when the pool reaps it. Celery's prefork pool reaps on
the child's exit (its sentinel pipe closes) with ``waitpid(WNOHANG)``, but the pipe closes
before the kernel lets the parent reap the child; when the parent is that quick, the
child is skipped and only reaped by the pool's 5-second maintenance timer (measured:
release 4-5 s after SIGKILL in 10 of 12 runs). ``worker_ready`` adds a reaping timer
every ``REAP_INTERVAL`` seconds, so that a lost worker is reported within a second.

Signals are connected with ``weak=False`` (the receivers are closures) and a
``dispatch_uid`` per app, so ``install`` is idempotent and ``uninstall`` mirrors it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import signals  # type: ignore[import-untyped]
from celery.exceptions import (  # type: ignore[import-untyped]
    TimeLimitExceeded,
    WorkerLostError,
)

from rcache import ConfigurationError
from rcache_celery._metrics import metrics_for
from rcache_celery._state import State, attach, detach, maybe_state

if TYPE_CHECKING:
    from celery import Celery

    from rcache import Cache

__all__ = ["install", "uninstall"]

log = logging.getLogger("rcache.celery")
#: How often the worker's main process looks for dead pool children (Celery: 5 s).
REAP_INTERVAL = 0.25


def install(app: Celery, cache: Cache, *, metrics: Any = None) -> None:
    """Attach ``cache`` to ``app`` and connect the worker hooks.

    :param app: the Celery app (call this where the app is created, so that producers,
        workers and beat all run it).
    :param cache: the ``rcache.Cache`` holding dedup keys, locks and warmed entries.
    :param metrics: an ``rcache.metrics.PrometheusMetrics`` to register the task
        metrics with; default ``cache.metrics``. With any other sink they are off.
    :raises ConfigurationError: if ``app`` is already installed with another cache.

    Idempotent for the same cache. Nothing connects to Redis here: clients are created
    lazily in the process that uses them (after the prefork fork, celery #4607).
    """
    current = maybe_state(app)
    if current is not None:
        if current.cache is cache:
            return
        raise ConfigurationError(
            "rcache_celery is already installed on this app with another cache: "
            "call rcache_celery.uninstall(app) first"
        )
    uid = f"rcache_celery:{id(app)}"
    state = State(
        app, cache, metrics_for(metrics if metrics is not None else cache.metrics), uid
    )
    attach(state)
    signals.task_failure.connect(_on_failure, weak=False, dispatch_uid=uid + ":failure")
    signals.task_revoked.connect(_on_revoked, weak=False, dispatch_uid=uid + ":revoked")
    signals.worker_ready.connect(
        _on_worker_ready, weak=False, dispatch_uid=uid + ":ready"
    )


def uninstall(app: Celery) -> None:
    """Disconnect what ``install`` connected; a no-op if it is not installed."""
    state = maybe_state(app)
    if state is None:
        return
    signals.task_failure.disconnect(dispatch_uid=state.uid + ":failure")
    signals.task_revoked.disconnect(dispatch_uid=state.uid + ":revoked")
    signals.worker_ready.disconnect(dispatch_uid=state.uid + ":ready")
    if state.reaper is not None:
        state.reaper.cancel()
    detach(state)


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Reap dead pool children every REAP_INTERVAL (see the module docstring).

    ``sender`` is the worker's consumer, in the main process. Only the prefork pool has
    children to reap (``maintain_pool``) and an event loop (``hub``) to time it.
    """
    state = maybe_state(getattr(sender, "app", None))
    hub = getattr(sender, "hub", None)
    pool = getattr(sender, "pool", None)
    maintain = getattr(pool, "maintain_pool", None)
    if state is None or hub is None or maintain is None or state.reaper is not None:
        return

    def reap() -> None:
        maintain()
        _report_orphans(getattr(pool, "_pool", None))

    state.reaper = hub.call_repeatedly(REAP_INTERVAL, reap)


def _report_orphans(asyncpool: Any) -> None:
    """Report as lost the jobs accepted by a pool child that is gone.

    billiard reports a dead child's job only if the child's acknowledgement of it was
    read before the child was reaped (``_join_exited_workers``: "acked by gone"). When
    the child dies first (SIGKILL right after it started the job), the acknowledgement
    is read afterwards, and the job waits for the next child exit to be noticed: in CI
    a key stayed held for more than 10 s after its child was killed (it would have
    waited for its lease). Such a job is reported here the way Celery's own pool
    reports a lost one (``on_job_process_lost``: ``WorkerLostError``), within a reap.
    """
    cache = getattr(asyncpool, "_cache", None)
    workers = getattr(asyncpool, "_pool", None)
    lost = getattr(asyncpool, "on_job_process_lost", None)
    if not cache or workers is None or lost is None:
        return
    alive = {worker.pid for worker in workers}
    for job in list(cache.values()):
        try:
            if job.ready():
                continue
            gone = next((pid for pid in job.worker_pids() if pid not in alive), None)
            if gone is not None:
                lost(job, gone, 0)  # the exit code was taken by the reaper
        except Exception as exc:  # pool internals changed: never break the worker
            log.debug("rcache-celery: orphan check skipped: %r", exc)
            return


def _on_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    # In a pool child the task already released its key in __call__ (before the result
    # was stored); only the main-process failures below need a release from here.
    if isinstance(exception, WorkerLostError):
        reason = "worker_lost"
    elif isinstance(exception, TimeLimitExceeded):
        reason = "time_limit"
    else:
        return
    _recover(sender, task_id, args, kwargs, reason)


def _on_revoked(
    sender: Any = None,
    request: Any = None,
    terminated: bool = False,
    expired: bool = False,
    **_: Any,
) -> None:
    if request is None:
        return
    reason = "expired" if expired else "revoked"
    _recover(sender, request.id, request.args, request.kwargs, reason)


def _recover(
    task: Any, task_id: str | None, args: Any, kwargs: Any, reason: str
) -> None:
    from rcache_celery._tasks import GuardedTask

    if not isinstance(task, GuardedTask) or task_id is None:
        return
    state = maybe_state(task.app)
    if state is None:
        return
    try:
        owned = task._release_from_main(task_id, tuple(args or ()), dict(kwargs or {}))
    except Exception as exc:  # a hook must never break the worker; the lease expires
        log.warning(
            "rcache-celery: could not release %s[%s] after %s: %r",
            task.name,
            task_id,
            reason,
            exc,
        )
        return
    if owned:
        state.metrics.recovery(task.name, reason)
        log.info("rcache-celery: released %s[%s] after %s", task.name, task_id, reason)
