"""``UniqueTask`` and ``LockedTask``: Celery task bases guarded by owner-checked keys.

Both share the run-time protocol of ``_guard.py`` in ``__call__``, the one hook that
runs before Celery stores the result (``on_success``/``after_return`` run after it, so
a client could see SUCCESS while the key is still held, and a ``result.get();
task.delay()`` would be deduplicated against a finished run).
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal

from celery import Task  # type: ignore[import-untyped]
from celery.exceptions import (  # type: ignore[import-untyped]
    Ignore,
    Reject,
    Retry,
    WorkerLostError,
)
from celery.utils import uuid  # type: ignore[import-untyped]
from celery.worker.request import Request  # type: ignore[import-untyped]

import rcache_celery._guard as _guard
from rcache import ConfigurationError, RCacheError
from rcache.spi import KeyBuilder, check_template
from rcache_celery._exceptions import DuplicateTaskError, TaskLockedError
from rcache_celery._guard import Guard
from rcache_celery._state import State, maybe_state, state_of

__all__ = ["GuardedRequest", "GuardedTask", "LockedTask", "UniqueTask"]

log = logging.getLogger("rcache.celery")

#: Message header of copies that skip the guard (canvas members, caller-chosen ids).
UNGUARDED = "rcache_unguarded"
#: apply_async options that mark a member of a group, chord or chain.
_CANVAS_OPTIONS = ("group_id", "chord", "chain", "group_index")
_REDIS_SCHEMES = ("redis://", "rediss://", "sentinel://", "redis+socket://")


@dataclass
class _Run:
    guard: Guard
    handle: int | None
    queued: bool = False


def _delay_seconds(countdown: Any, eta: Any) -> float:
    """Seconds until an ETA/countdown task becomes due (0 for an immediate task)."""
    if countdown is not None:
        return max(float(countdown), 0.0)
    if eta is None:
        return 0.0
    when: datetime
    if isinstance(eta, str):
        when = datetime.fromisoformat(eta)
    elif isinstance(eta, datetime):
        when = eta
    else:
        return 0.0
    if when.tzinfo is None:  # Celery reads a naive ETA as UTC (enable_utc default)
        when = when.replace(tzinfo=timezone.utc)
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


def _header(request: Any, name: str) -> Any:
    value = getattr(request, name, None)
    if value is None:
        headers = getattr(request, "headers", None)
        if isinstance(headers, Mapping):
            value = headers.get(name)
    return value


def _run_parameters(cls: type) -> list[str] | None:
    """The parameter names of a task class's ``run`` as callers pass them (without
    ``self`` for a method), or None while the class has no ``run`` of its own yet (a
    base class that tasks will derive from)."""
    for klass in cls.__mro__:
        if "run" in klass.__dict__:
            break
    else:  # pragma: no cover - Task defines run
        return None
    if klass is Task or not issubclass(klass, Task):
        return None
    run = klass.__dict__["run"]
    method = not isinstance(run, staticmethod)  # @app.task without bind=True: static
    if not method:
        run = run.__func__
    try:
        params = list(inspect.signature(run).parameters)
    except (TypeError, ValueError):  # no signature to check against: checked at run
        return None
    return params[1:] if method else params


def _task_label(cls: type) -> str:
    name = cls.__dict__.get("name") or getattr(cls, "name", None)
    return str(name) if name else cls.__qualname__


def _check_choice(task: Any, option: str, choices: Sequence[str]) -> None:
    """``task`` (a task class or instance) has a valid ``option``, or raise."""
    value = getattr(task, option)
    if value not in choices:
        label = _task_label(task if isinstance(task, type) else type(task))
        listed = ", ".join(repr(c) for c in choices)
        raise ConfigurationError(
            f"{label}: {option}={value!r} is not valid: write {option}= one of {listed}"
        )


class GuardedTask(Task):  # type: ignore[misc]
    """Common base of UniqueTask and LockedTask (not meant to be used directly)."""

    Request = "rcache_celery._tasks:GuardedRequest"

    #: Lease while running, renewed every ``lock_ttl / 3`` by a watchdog thread; if
    #: every release hook is lost the key expires within this time.
    lock_ttl: float = 60.0
    #: How long a finished task id is remembered, so that a late redelivery of the same
    #: message (Redis ``visibility_timeout``, celery-singleton #38) is ignored.
    redelivery_window: float = 3600.0

    #: Run-time behaviour on an app without install(): LockedTask refuses to run
    #: unlocked; a UniqueTask was deduplicated at enqueue time and runs.
    _fail_closed: ClassVar[bool] = False

    # -- configuration, compiled on first use ---------------------------------------

    def _state(self) -> State:
        return state_of(self.app)

    def _keys(self) -> KeyBuilder:
        builder: KeyBuilder | None = self.__dict__.get("_rcache_keys")
        if builder is None:
            builder = KeyBuilder(
                self.run, prefix="", ignore=self._ignored_params(), name=self.name
            )
            self.__dict__["_rcache_keys"] = builder
        return builder

    def _ignored_params(self) -> Sequence[str]:
        return ()

    def _bound(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return self._keys().bind(tuple(args), kwargs)

    def _guard_key(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def _pending_ttl(self, delay: float) -> float:
        return self.lock_ttl + delay

    def _warn_visibility(self, delay: float) -> None:
        # A countdown/ETA longer than the Redis broker's visibility_timeout is delivered
        # again and again (kombu #337, celery #2599, #5306): the run-time guard makes
        # the copies harmless, but the user should know.
        conf = self.app.conf
        url = str(conf.broker_url or "")
        if delay <= 0 or not url.startswith(_REDIS_SCHEMES):
            return
        vt = float(
            (conf.broker_transport_options or {}).get("visibility_timeout", 3600)
        )
        if delay > vt:
            log.warning(
                "rcache-celery: %s is due in %.0fs, past the Redis broker's "
                "visibility_timeout (%.0fs): the message will be redelivered; the "
                "copies are ignored at run time, but raise "
                "broker_transport_options['visibility_timeout']",
                self.name,
                delay,
                vt,
            )

    # -- run time ---------------------------------------------------------------------

    def _run_key(
        self, request: Any, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> str | None:
        """The guard key of this delivery, or None to run unguarded."""
        if _header(request, UNGUARDED):
            return None
        return self._guard_key(args, kwargs)

    def _on_held(self, guard: Guard, holder: str) -> Any:
        raise NotImplementedError

    def _on_ran(self) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager or not request.id:
            # Direct calls and eager mode run unguarded (documented).
            return super().__call__(*args, **kwargs)
        state = maybe_state(self.app)
        if state is None:
            if self._fail_closed:
                state = self._state()  # raises ConfigurationError: how to install
            return super().__call__(*args, **kwargs)
        key = self._run_key(request, args, kwargs)
        if key is None:
            return super().__call__(*args, **kwargs)
        guard = Guard(state.cache, key, request.id)
        code, holder = self._begin(guard)
        if code in (_guard.RUNNING_ELSEWHERE, _guard.ALREADY_DONE):
            # The same message twice: a visibility-timeout redelivery while the first
            # copy runs, or after it finished. Ignored (no fake SUCCESS), and counted.
            state.metrics.runtime_duplicate(self.name, "redelivered")
            log.warning(
                "rcache-celery: ignored a redelivered copy of %s[%s] (%s)",
                self.name,
                request.id,
                "still running" if code == _guard.RUNNING_ELSEWHERE else "already ran",
            )
            raise Ignore()
        if code not in (_guard.ACQUIRED, _guard.OWNER):
            return self._on_held(guard, holder)
        run = _Run(guard, _guard.renewer().add(guard, self.lock_ttl, self.name))
        request.rcache_run = run
        try:
            result = super().__call__(*args, **kwargs)
        except Retry:
            self._stop_renewing(run)
            if not run.queued:  # a Retry raised without self.retry(): nothing re-runs
                self._finish(guard, "done", self.redelivery_window)
            raise
        except Reject as exc:
            self._stop_renewing(run)
            if exc.requeue:
                self._finish(guard, "queued", self._pending_ttl(0))
            else:
                self._finish(guard, "done", self.redelivery_window)
            raise
        except BaseException:
            self._stop_renewing(run)
            self._on_ran()
            self._finish(guard, "done", self.redelivery_window)
            raise
        self._stop_renewing(run)
        self._on_ran()
        # Released before the trace stores SUCCESS: `result.get(); task.delay()` then
        # always enqueues a new run.
        self._finish(guard, "done", self.redelivery_window)
        return result

    def _begin(self, guard: Guard) -> tuple[int, str]:
        return _guard.begin(guard, self.lock_ttl, acquire=True)

    def _finish(self, guard: Guard, state: str, ttl: float) -> None:
        # The task's own outcome stands even if Redis is unreachable now: the key is
        # no longer renewed, so it expires within lock_ttl.
        try:
            _guard.finish(guard, state, ttl)
        except RCacheError as exc:
            log.warning(
                "rcache-celery: could not release %s for %s[%s] (%r); it expires "
                "within lock_ttl=%ss",
                guard.key,
                self.name,
                guard.task_id,
                exc,
                self.lock_ttl,
            )

    @staticmethod
    def _stop_renewing(run: _Run) -> None:
        if run.handle is not None:
            _guard.renewer().remove(run.handle)
            run.handle = None

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: Any = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """``Task.retry`` that keeps the guard key for the re-queued copy.

        Before Celery publishes the retry (same task id), the key's TTL is stretched
        over the countdown and the run marker says "queued", so the next delivery is
        the owner, whichever worker gets it (celery-singleton #10, #20: retries were
        deduplicated against themselves and never re-queued).
        """
        run: _Run | None = getattr(self.request, "rcache_run", None)
        if run is not None and not run.queued and not self.request.called_directly:
            max_r = self.max_retries if max_retries is None else max_retries
            if max_r is None or self.request.retries < max_r:
                delay = _delay_seconds(
                    countdown
                    if (countdown is not None or eta)
                    else self.default_retry_delay,
                    eta,
                )
                self._stop_renewing(run)
                self._finish(run.guard, "queued", self._pending_ttl(delay))
                run.queued = True
        return super().retry(
            args, kwargs, exc, throw, eta, countdown, max_retries, **options
        )

    # -- main process -----------------------------------------------------------------

    def _release_from_main(
        self, task_id: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> bool:
        key = self._guard_key(args, kwargs)
        return _guard.finish(
            Guard(self._state().cache, key, task_id), "done", self.redelivery_window
        )

    def _handover_from_main(
        self, task_id: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> bool:
        key = self._guard_key(args, kwargs)
        return _guard.finish(
            Guard(self._state().cache, key, task_id), "queued", self._pending_ttl(0)
        )


class UniqueTask(GuardedTask):
    """A task that is never queued twice with the same arguments.

    ``delay()``/``apply_async()`` take the dedup key with ``SET key id NX GET PX``: a
    duplicate caller gets the existing task's ``AsyncResult`` from that one round trip
    (or ``DuplicateTaskError`` with ``on_duplicate="raise"``). The key is held while the
    task is queued (``unique_ttl`` plus any countdown) and while it runs (a lease of
    ``lock_ttl``, renewed), and released when it finishes, before its result is stored.

    Options (``@app.task(base=UniqueTask, ...)``):

    * ``unique_on``: parameter names that identify a duplicate (default: all).
      Arguments are bound to the signature with defaults, so ``f(1)``, ``f(x=1)`` and
      ``f(1, y=2)`` (``y=2`` default) are the same task; ``f(1)`` and ``f("1")`` are not.
    * ``unique_ttl``: seconds the key lives while queued (default 3600).
    * ``on_duplicate``: ``"return_existing"`` (default) or ``"raise"``.

    Members of groups, chords and chains, and calls with a caller-chosen ``task_id``
    that is already taken, are **not** deduplicated: handing them another task's id
    would hang the chord waiting for it. Eager mode is not deduplicated either.
    """

    unique_on: Sequence[str] | None = None
    unique_ttl: float = 3600.0
    on_duplicate: Literal["return_existing", "raise"] = "return_existing"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Runs when Celery builds the task class (@app.task(base=UniqueTask, ...)):
        # a typo fails at registration, not in a worker.
        super().__init_subclass__(**kwargs)
        _check_choice(cls, "on_duplicate", _ON_DUPLICATE)
        unique_on, params = cls.unique_on, _run_parameters(cls)
        if isinstance(unique_on, str):
            raise ConfigurationError(
                f"{_task_label(cls)}: unique_on takes a list of parameter names: "
                f"write unique_on=[{unique_on!r}]"
            )
        if unique_on is not None and params is not None:
            unknown = sorted(set(unique_on) - set(params))
            if unknown:
                raise ConfigurationError(
                    f"{_task_label(cls)}: unique_on names {unknown}, which the task "
                    f"does not take; its parameters are {params}"
                )

    def _ignored_params(self) -> Sequence[str]:
        if self.unique_on is None:
            return ()
        if isinstance(self.unique_on, str):
            raise ConfigurationError(
                f"{self.name}: unique_on takes a list of names: write "
                f"unique_on=[{self.unique_on!r}]"
            )
        params = list(inspect.signature(self.run).parameters)
        unknown = sorted(set(self.unique_on) - set(params))
        if unknown:
            raise ConfigurationError(
                f"{self.name}: unique_on names {unknown}, which the task does not take; "
                f"its parameters are {params}"
            )
        return [p for p in params if p not in self.unique_on]

    def _guard_key(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        keys = self._keys()
        encoded = keys.encode_args(keys.bind(tuple(args), kwargs))
        return self._state().cache.keyspace.unique_guard(
            _guard.tag_safe(self.name), _guard.digest(encoded)
        )

    def _pending_ttl(self, delay: float) -> float:
        return max(self.unique_ttl, self.lock_ttl) + delay

    def _on_held(self, guard: Guard, holder: str) -> Any:
        # A copy that was not enqueued through apply_async (send_task, a beat that does
        # not import the task: celery-once #136, #113, #88) while another task owns
        # the key: ignored and counted, never a fake SUCCESS, never a DEL of the
        # owner's key (as celery-heimdall does).
        self._state().metrics.runtime_duplicate(self.name, "bypassed_apply")
        log.warning(
            "rcache-celery: ignored %s[%s]: task %s owns its dedup key (sent without "
            "apply_async?)",
            self.name,
            guard.task_id,
            holder,
        )
        raise Ignore()

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: Any = None,
        **options: Any,
    ) -> Any:
        """Queue the task unless an equal one is queued or running.

        One ``SET NX GET`` decides: a duplicate returns the existing task's
        ``AsyncResult`` (or raises ``DuplicateTaskError`` with
        ``on_duplicate="raise"``). Eager mode and canvas members are not deduplicated.
        """
        if self.app.conf.task_always_eager:
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        # Fail closed: a unique task whose app was never installed would silently
        # enqueue duplicates.
        state = self._state()
        if any(options.get(name) is not None for name in _CANVAS_OPTIONS):
            return self._publish_unguarded(
                args, kwargs, task_id, producer, link, link_error, shadow, options
            )
        key = self._guard_key(args or (), kwargs or {})
        delay = _delay_seconds(options.get("countdown"), options.get("eta"))
        tid = task_id or uuid()
        existing = _guard.set_nx_get(state.cache, key, tid, self._pending_ttl(delay))
        if existing is not None and existing != tid:
            if task_id is not None:
                # The caller already promised this id to someone (a chord body, a
                # link): publish it, unguarded, rather than hand back another id.
                return self._publish_unguarded(
                    args, kwargs, task_id, producer, link, link_error, shadow, options
                )
            state.metrics.dedup(self.name, "duplicate")
            if self.on_duplicate == "raise":
                raise DuplicateTaskError(self.name, existing)
            return self.AsyncResult(existing)
        # existing == tid: the owner re-publishes itself (retry(), retry_on_worker_lost):
        # its key was kept for it.
        state.metrics.dedup(self.name, "enqueued")
        self._warn_visibility(delay)
        try:
            return super().apply_async(
                args, kwargs, tid, producer, link, link_error, shadow, **options
            )
        except BaseException:
            # Publishing failed: free the key, or nobody could enqueue these arguments
            # until it expires (celery-once #123).
            if existing is None:
                _guard.release(state.cache, key, tid)
            raise

    def _publish_unguarded(
        self,
        args: Any,
        kwargs: Any,
        task_id: str | None,
        producer: Any,
        link: Any,
        link_error: Any,
        shadow: Any,
        options: dict[str, Any],
    ) -> Any:
        headers = dict(options.get("headers") or {})
        headers[UNGUARDED] = True
        options["headers"] = headers
        return super().apply_async(
            args, kwargs, task_id, producer, link, link_error, shadow, **options
        )


_ON_LOCKED = ("skip", "retry", "wait", "fail")
_ON_DUPLICATE = ("return_existing", "raise")


class LockedTask(GuardedTask):
    """A task of which at most one runs at a time per lock key, across all workers.

    The lock is taken when a copy starts (value: its task id), renewed while it runs,
    and released when it finishes, fails, is revoked, hits its hard time limit or
    loses its worker process. ``self.retry()`` keeps it for the re-queued copy.

    Options (``@app.task(base=LockedTask, ...)``):

    * ``lock_key``: a template over the task's parameters (``"report:{day}"``);
      default: the task name and all arguments.
    * ``lock_ttl``: the lease in seconds (default 60), renewed every third of it.
    * ``on_locked``: what a copy does when another holds the lock: ``"skip"`` (ignored,
      no result), ``"retry"`` (default: re-queued after ``lock_retry_delay`` seconds,
      jittered, up to ``max_retries``), ``"wait"`` (polls up to ``lock_wait_timeout``)
      or ``"fail"`` (``TaskLockedError``).
    """

    lock_key: str | None = None
    on_locked: Literal["skip", "retry", "wait", "fail"] = "retry"
    lock_retry_delay: float = 1.0
    lock_wait_timeout: float | None = None
    _fail_closed: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check the options when Celery builds the task class.

        That is at ``@app.task(base=LockedTask, ...)`` on a finalized app (or with
        ``lazy=False``), else when the app finalizes: the first ``delay()``, access to
        ``app.tasks`` or worker start-up. Either way before any copy runs: a
        ``lock_key`` naming a parameter the task does not take, or an unknown
        ``on_locked``, used to fail only inside the worker.
        """
        super().__init_subclass__(**kwargs)
        _check_choice(cls, "on_locked", _ON_LOCKED)
        template = cls.lock_key
        if template is not None and not isinstance(template, str):
            raise ConfigurationError(
                f"{_task_label(cls)}: lock_key takes a template string over the "
                f"task's parameters, e.g. lock_key='report:{{day}}', got {template!r}"
            )
        params = _run_parameters(cls)
        if template is not None and params is not None:
            check_template(template, params, owner=_task_label(cls), what="lock_key")

    def _guard_key(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        keyspace = self._state().cache.keyspace
        template = self.lock_key
        if template is None:
            keys = self._keys()
            encoded = keys.encode_args(keys.bind(tuple(args), kwargs))
            name = f"{_guard.tag_safe(self.name)}:{_guard.digest(encoded)}"
        else:
            if self.__dict__.get("_rcache_checked") != template:
                # Checked when the class was built (__init_subclass__); again here for
                # options set on the instance afterwards.
                _check_choice(self, "on_locked", _ON_LOCKED)
                self._keys().check_template(template, what="lock_key")
                self.__dict__["_rcache_checked"] = template
            name = _guard.tag_safe(template.format_map(self._bound(args, kwargs)))
        return keyspace.lock_guard(name)

    def _run_key(
        self, request: Any, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> str | None:
        return self._guard_key(args, kwargs)  # locks hold inside canvases too

    def _begin(self, guard: Guard) -> tuple[int, str]:
        code, holder = _guard.begin(guard, self.lock_ttl, acquire=True)
        if code != _guard.HELD or self.on_locked != "wait":
            return code, holder
        log.info(
            "rcache-celery: %s[%s] found %s held by task %s: wait",
            self.name,
            guard.task_id,
            guard.key,
            holder,
        )
        timeout = (
            self.lock_ttl if self.lock_wait_timeout is None else self.lock_wait_timeout
        )
        deadline = time.monotonic() + timeout
        pause = 0.01
        while code == _guard.HELD and time.monotonic() < deadline:
            time.sleep(min(pause * random.uniform(0.5, 1.5), 0.5))
            pause = min(pause * 2, 0.5)
            code, holder = _guard.begin(guard, self.lock_ttl, acquire=True)
        return code, holder

    def _on_ran(self) -> None:
        self._state().metrics.locked(self.name, "ran")

    def _on_held(self, guard: Guard, holder: str) -> Any:
        metrics = self._state().metrics
        policy = self.on_locked
        log.info(
            "rcache-celery: %s[%s] found %s held by task %s: %s",
            self.name,
            guard.task_id,
            guard.key,
            holder,
            policy,
        )
        if policy == "skip":
            metrics.locked(self.name, "skipped")
            raise Ignore()
        if policy == "retry":
            metrics.locked(self.name, "retried")
            delay = self.lock_retry_delay * random.uniform(0.5, 1.5)
            raise self.retry(countdown=delay)
        metrics.locked(self.name, "failed")
        raise TaskLockedError(guard.key, holder)


class GuardedRequest(Request):  # type: ignore[misc]
    """Worker-side request (main process) that hands the key to a requeued delivery.

    When a pool child dies and Celery requeues the message (``acks_late`` with
    ``task_reject_on_worker_lost``, or ``retry_on_worker_lost``), no ``task_failure``
    fires; the run marker would still say "running" and the redelivery would be taken
    for a duplicate. Marking it "queued" makes the redelivery the owner.
    """

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # ExceptionWithTraceback
        task = self.task
        if isinstance(
            exc, (WorkerLostError, SystemExit, KeyboardInterrupt)
        ) and isinstance(task, GuardedTask):
            requeue = (task.acks_late and task.reject_on_worker_lost) or getattr(
                task, "retry_on_worker_lost", False
            )
            if requeue and maybe_state(task.app) is not None:
                try:
                    task._handover_from_main(self.id, self.args, self.kwargs)
                except Exception as err:  # never break the worker; the lease expires
                    log.warning(
                        "rcache-celery: hand-over of %s failed: %r", self.id, err
                    )
        return super().on_failure(exc_info, send_failed_event, return_ok)
