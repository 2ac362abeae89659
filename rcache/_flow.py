"""Flows and their drivers: every multi-step protocol is written once.

A *flow* is a generator that yields :class:`Command` objects and receives their replies,
and returns its result (httpx's ``Auth.auth_flow``; tenacity's ``iter()`` loop, which
yields ``DoAttempt``/``DoSleep`` to a 24-line driver per mode). The flow decides; it
never does IO. :class:`SyncDriver` and :class:`AsyncDriver` execute its commands. An
error of a command is thrown into the flow at its ``yield``, so a flow's
``try``/``finally`` gives up a lease whatever happens; a flow is unit-tested by sending
it scripted replies, without Redis.

A command knows how to run itself in each mode (``run``/``arun``), so a module can add a
command without touching the drivers. The drivers hold the one guarded path: a command
with a :class:`~rcache._policy.Guard` (a cache command) is skipped while the breaker is
open and its errors go to :class:`~rcache._policy.Failures`; without one (locks,
transactions) its error raises. Errors are mapped to rcache's tree in ``_redis.py``
(``SyncRedis.run``/``AsyncRedis.run``), nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from rcache._exceptions import RCacheError
from rcache._policy import Failures, Guard
from rcache._redis import (
    MAX_BLOCK,
    AsyncRedis,
    LuaScript,
    RedisTimeoutError,
    SyncRedis,
    acommand_within,
    command_within,
)

__all__ = [
    "AsyncDriver",
    "Block",
    "Command",
    "Compute",
    "Critical",
    "Eval",
    "Flow",
    "Run",
    "Sleep",
    "SyncDriver",
]

R = TypeVar("R")
#: A flow: yields commands, receives their replies, returns R.
Flow = Generator["Command", Any, R]

#: How much longer than its own timeout a blocking wait (or a call made for a wait: the
#: lock's) may take for its reply before Redis counts as hung: a blocked command answers
#: within a few ms of its timeout (issue 14: with Redis stopped, acquire(timeout=2)
#: returned after 9.4 s, on the blocking client's socket timeout).
IO_MARGIN = 0.2


class Command:
    """One step a flow asks its driver to take. ``guard`` marks a cache command."""

    __slots__ = ()
    guard: Guard | None = None

    def run(self, driver: SyncDriver) -> Any:
        raise NotImplementedError

    async def arun(self, driver: AsyncDriver) -> Any:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Run(Command):
    """``op(client)`` on the main client: ``lambda c: c.mget(keys)`` serves both modes
    (the sync client returns the reply, the asyncio one an awaitable)."""

    op: Callable[[Any], Any]
    guard: Guard | None = None
    retry: bool = True

    def run(self, driver: SyncDriver) -> Any:
        return driver.redis.run(self.op, retry=self.retry)

    async def arun(self, driver: AsyncDriver) -> Any:
        return await driver.redis.run(self.op, retry=self.retry)


@dataclass(frozen=True, slots=True)
class Eval(Command):
    """A packaged Lua script (EVALSHA, loading it again after NOSCRIPT)."""

    script: LuaScript
    keys: Sequence[Any]
    args: Sequence[Any]
    guard: Guard | None = None
    retry: bool = True

    def run(self, driver: SyncDriver) -> Any:
        script, keys, args = self.script, self.keys, self.args
        return driver.redis.run(lambda c: script(c, keys, args), retry=self.retry)

    async def arun(self, driver: AsyncDriver) -> Any:
        script, keys, args = self.script, self.keys, self.args
        return await driver.redis.run(
            lambda c: script.acall(c, keys, args), retry=self.retry
        )


@dataclass(frozen=True, slots=True)
class Block(Command):
    """Wait up to ``timeout`` s for a wake-up pushed on the list ``key``, on the blocking
    client, awaiting the reply at most ``timeout`` plus ``IO_MARGIN``: a hung or cut-off
    Redis must not hold the caller's budget on a socket timeout. memory:// runs the same
    command on fakeredis, which blocks in process (and nothing there can hang).

    A cache fill (``pop`` False): BLMOVE from and to the same list, so one wake-up wakes
    every waiter; replies False when Redis did not answer in time, else True (other
    errors: the next command reports them). A lock waiter (``pop`` True): BLPOP, so one
    release wakes one waiter; replies BLPOP's reply, errors mapped as any command's
    (the lock falls back to a short sleep)."""

    key: str
    timeout: float
    pop: bool = False

    @property
    def _timeout(self) -> float:
        return max(0.001, min(self.timeout, MAX_BLOCK))

    def _op(self, blocking: Any, memory: bool, within: Any) -> Callable[[Any], Any]:
        """The blocking call (``within``: command_within or its async twin)."""
        timeout, key = self._timeout, self.key
        if self.pop:
            argv: tuple[Any, ...] = ("BLPOP", key, timeout)
        else:
            argv = ("BLMOVE", key, key, "LEFT", "RIGHT", timeout)
        if memory:
            return lambda _c: blocking.execute_command(*argv)
        return lambda _c: within(blocking, timeout + IO_MARGIN, *argv)

    def run(self, driver: SyncDriver) -> Any:
        redis = driver.redis
        op = self._op(redis.blocking_client, redis.memory, command_within)
        if self.pop:
            return redis.run(op, retry=False)
        try:
            op(None)
        except RedisTimeoutError:
            return False
        except Exception:
            time.sleep(min(self._timeout, 0.05))
        return True

    async def arun(self, driver: AsyncDriver) -> Any:
        redis = driver.redis
        op = self._op(redis.blocking_client, redis.memory, acommand_within)
        if self.pop:
            return await redis.run(op, retry=False)
        try:
            await op(None)
        except RedisTimeoutError:
            return False
        except Exception:
            await asyncio.sleep(min(self._timeout, 0.05))
        return True


@dataclass(frozen=True, slots=True)
class Sleep(Command):
    seconds: float

    def run(self, driver: SyncDriver) -> None:
        time.sleep(self.seconds)

    async def arun(self, driver: AsyncDriver) -> None:
        await asyncio.sleep(self.seconds)


@dataclass(frozen=True, slots=True)
class Compute(Command):
    """Call the user's function (awaited in async mode); its exceptions reach the flow
    unchanged."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None

    def run(self, driver: SyncDriver) -> Any:
        return self.fn(*self.args, **(self.kwargs or {}))

    async def arun(self, driver: AsyncDriver) -> Any:
        return await self.fn(*self.args, **(self.kwargs or {}))


@dataclass(frozen=True, slots=True)
class Critical(Command):
    """A step that must finish once sent (giving up a lease, a release): the async
    driver shields it from cancellation; the cancellation still reaches the flow."""

    command: Command

    @property
    def guard(self) -> Guard | None:  # type: ignore[override]
        return self.command.guard

    def run(self, driver: SyncDriver) -> Any:
        return self.command.run(driver)

    async def arun(self, driver: AsyncDriver) -> Any:
        return await asyncio.shield(self.command.arun(driver))


class SyncDriver:
    """Executes commands with a sync client; ``drive`` runs a flow to its result."""

    __slots__ = ("failures", "redis")

    def __init__(self, redis: SyncRedis, failures: Failures) -> None:
        self.redis = redis
        self.failures = failures

    def execute(self, command: Command) -> Any:
        """The one guarded path of sync mode (see the module docstring)."""
        guard = command.guard
        if guard is None:
            return command.run(self)
        breaker = self.failures.breaker
        if not breaker.allow():
            return self.failures.skipped(guard)
        try:
            reply = command.run(self)
        except RCacheError as exc:
            return self.failures.failed(guard, exc)
        except BaseException:
            breaker.abandon()  # cancelled or interrupted: no verdict on Redis
            raise
        breaker.success()
        return reply

    def drive(self, flow: Flow[R]) -> R:
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                if error is None:
                    command = flow.send(reply)
                else:
                    command, error = flow.throw(error), None
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            try:
                reply = self.execute(command)
            except BaseException as exc:
                reply, error = None, exc


class AsyncDriver:
    """Async twin of :class:`SyncDriver`."""

    __slots__ = ("background", "failures", "redis")

    def __init__(self, redis: AsyncRedis, failures: Failures) -> None:
        self.redis = redis
        self.failures = failures
        #: Tasks started for this driver's flows that outlive their caller (a lock's
        #: clean-up after a cancelled wait, a shielded release): ``Cache.aclose``
        #: lets them finish, or they would open a client nobody closes.
        self.background: set[asyncio.Task[Any]] = set()

    async def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for this loop's background tasks, then cancel the
        rest (what they would undo expires by its TTL)."""
        loop = asyncio.get_running_loop()
        pending = [t for t in self.background if t.get_loop() is loop]
        if not pending:
            return
        _done, late = await asyncio.wait(pending, timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)

    async def execute(self, command: Command) -> Any:
        """The one guarded path of async mode (see :meth:`SyncDriver.execute`)."""
        guard = command.guard
        if guard is None:
            return await command.arun(self)
        breaker = self.failures.breaker
        if not breaker.allow():
            return self.failures.skipped(guard)
        try:
            reply = await command.arun(self)
        except RCacheError as exc:
            return self.failures.failed(guard, exc)
        except BaseException:
            breaker.abandon()  # cancelled or interrupted: no verdict on Redis
            raise
        breaker.success()
        return reply

    async def drive(self, flow: Flow[R]) -> R:
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                if error is None:
                    command = flow.send(reply)
                else:
                    command, error = flow.throw(error), None
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            try:
                reply = await self.execute(command)
            except GeneratorExit:
                # this coroutine is being closed unawaited: nothing can run any more
                # (a flow's clean-up step would be ignored); leases run out by TTL
                with contextlib.suppress(RuntimeError):
                    flow.close()
                raise
            except BaseException as exc:
                reply, error = None, exc
