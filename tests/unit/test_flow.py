"""The drivers and the one guarded path (_flow, _policy), without Redis.

Commands here are scripted stand-ins: a flow's behaviour must not depend on what runs
its commands, and the guard must act the same in both modes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import pytest

from rcache._breaker import CircuitBreaker
from rcache._config import BreakerPolicy
from rcache._exceptions import (
    BackendError,
    BackendMisconfiguredError,
    BackendUnavailableError,
)
from rcache._flow import AsyncDriver, Command, Critical, Flow, SyncDriver
from rcache._logging import RateLimitedLog
from rcache._metrics import InMemoryMetrics
from rcache._policy import BYPASS, Failures, Guard


@dataclass(frozen=True, slots=True)
class Scripted(Command):
    """Replies ``reply`` or raises it (an exception instance)."""

    reply: Any
    guard: Guard | None = None

    def run(self, driver: Any) -> Any:
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply

    async def arun(self, driver: Any) -> Any:
        await asyncio.sleep(0)
        return self.run(driver)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(mode: str) -> tuple[Callable[[Flow[Any]], Any], Failures, Clock]:
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(failures=2, reset_after=1.0), clock=clock)
    failures = Failures(
        breaker,
        InMemoryMetrics(),
        lambda: "redis://test",
        RateLimitedLog(logging.getLogger("rcache.test")),
    )
    if mode == "sync":
        sync = SyncDriver(None, failures)  # type: ignore[arg-type]
        return sync.drive, failures, clock
    adriver = AsyncDriver(None, failures)  # type: ignore[arg-type]

    def drive(flow: Flow[Any]) -> Any:
        return asyncio.run(adriver.drive(flow))

    return drive, failures, clock


MODES = ["sync", "async"]
GET = Guard("fn", "get", "bypass")
RAISE = Guard("fn", "get", "raise")


@pytest.mark.parametrize("mode", MODES)
def test_replies_reach_the_flow_and_its_return_value_is_the_result(mode: str) -> None:
    drive, _, _ = make(mode)

    def flow() -> Flow[tuple[Any, Any]]:
        a = yield Scripted(1)
        b = yield Scripted("two")
        return a, b

    assert drive(flow()) == (1, "two")


@pytest.mark.parametrize("mode", MODES)
def test_an_unguarded_error_is_thrown_into_the_flow_where_it_can_clean_up(
    mode: str,
) -> None:
    drive, _, _ = make(mode)
    seen: list[str] = []

    def flow() -> Flow[None]:
        try:
            yield Scripted(BackendUnavailableError("down"))
        finally:
            seen.append("released")
            yield Scripted("release")  # a flow may still talk to Redis in finally

    with pytest.raises(BackendUnavailableError):
        drive(flow())
    assert seen == ["released"]


@pytest.mark.parametrize("mode", MODES)
def test_a_flow_may_catch_a_command_error_and_go_on(mode: str) -> None:
    drive, _, _ = make(mode)

    def flow() -> Flow[Any]:
        try:
            yield Scripted(ValueError("user code failed"))
        except ValueError:
            return (yield Scripted("fallback"))
        return "unreached"

    assert drive(flow()) == "fallback"


@pytest.mark.parametrize("mode", MODES)
def test_a_guarded_error_is_bypassed_counted_and_opens_the_breaker(mode: str) -> None:
    drive, failures, _ = make(mode)

    def flow() -> Flow[Any]:
        return (yield Scripted(BackendUnavailableError("down"), GET))

    assert drive(flow()) is BYPASS
    assert drive(flow()) is BYPASS
    assert (
        failures.metrics.count("cache_errors", "fn", "get", "BackendUnavailableError")
        == 2
    )
    # two failures open the breaker: the next command is skipped, not run
    assert failures.breaker.blocked()
    ran: list[int] = []

    @dataclass(frozen=True, slots=True)
    class Probe(Scripted):
        def run(self, driver: Any) -> Any:
            ran.append(1)
            return "ran"

        async def arun(self, driver: Any) -> Any:
            return self.run(driver)

    def probe() -> Flow[Any]:
        return (yield Probe(None, GET))

    assert drive(probe()) is BYPASS
    assert ran == []
    assert failures.metrics.count("cache_errors", "fn", "get", "CircuitOpen") == 1


@pytest.mark.parametrize("mode", MODES)
def test_the_breaker_half_opens_and_one_success_closes_it(mode: str) -> None:
    drive, failures, clock = make(mode)

    def flow(reply: Any) -> Flow[Any]:
        return (yield Scripted(reply, GET))

    drive(flow(BackendUnavailableError("down")))
    drive(flow(BackendUnavailableError("down")))
    assert failures.breaker.blocked()
    clock.now = 1.5
    assert drive(flow("ok")) == "ok"
    assert not failures.breaker.blocked()
    assert failures.breaker.state == 0


@pytest.mark.parametrize("mode", MODES)
def test_misconfiguration_is_raised_or_bypassed_but_never_opens_the_breaker(
    mode: str,
) -> None:
    drive, failures, _ = make(mode)
    wrong = BackendMisconfiguredError("WRONGPASS")

    def flow(guard: Guard) -> Flow[Any]:
        return (yield Scripted(wrong, guard))

    for _ in range(5):
        assert drive(flow(GET)) is BYPASS
    with pytest.raises(BackendMisconfiguredError):
        drive(flow(RAISE))
    assert failures.breaker.state == 0
    assert (
        failures.metrics.count("cache_errors", "fn", "get", "BackendMisconfiguredError")
        == 6
    )


@pytest.mark.parametrize("mode", MODES)
def test_under_raise_an_open_breaker_raises_unavailable(mode: str) -> None:
    drive, failures, _ = make(mode)
    failures.breaker.failure()
    failures.breaker.failure()

    def flow() -> Flow[Any]:
        return (yield Scripted("never", RAISE))

    with pytest.raises(BackendUnavailableError, match="circuit breaker open"):
        drive(flow())


def test_a_critical_step_finishes_although_the_caller_is_cancelled() -> None:
    _, failures, _ = make("async")
    driver = AsyncDriver(None, failures)  # type: ignore[arg-type]
    finished = asyncio.Event()

    @dataclass(frozen=True, slots=True)
    class Slow(Command):
        def run(self, driver: Any) -> Any:
            raise AssertionError("async only")

        async def arun(self, driver: Any) -> Any:
            await asyncio.sleep(0.05)
            finished.set()
            return "released"

    seen: list[str] = []

    def flow() -> Flow[None]:
        try:
            yield Critical(Slow())
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> None:
        task = asyncio.ensure_future(driver.drive(flow()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(finished.wait(), 5)

    asyncio.run(main())
    assert seen == ["cancelled"]
    assert finished.is_set()


@pytest.mark.parametrize("mode", MODES)
def test_a_probe_answered_with_an_error_reply_closes_the_breaker(mode: str) -> None:
    # Redis answered (READONLY after a failover): it is reachable. Before, the probe
    # slot stayed taken and every later call was skipped until a restart.
    drive, failures, clock = make(mode)

    def flow(reply: Any) -> Flow[Any]:
        return (yield Scripted(reply, GET))

    drive(flow(BackendUnavailableError("down")))
    drive(flow(BackendUnavailableError("down")))
    clock.now = 1.5
    assert drive(flow(BackendError("READONLY You can't write against a replica"))) is (
        BYPASS
    )
    assert failures.breaker.state == 0
    assert drive(flow("ok")) == "ok"


@pytest.mark.parametrize("mode", MODES)
def test_a_probe_that_gets_no_answer_frees_the_slot_for_the_next_caller(
    mode: str,
) -> None:
    drive, failures, clock = make(mode)

    def flow(reply: Any) -> Flow[Any]:
        return (yield Scripted(reply, GET))

    drive(flow(BackendUnavailableError("down")))
    drive(flow(BackendUnavailableError("down")))
    clock.now = 1.5
    with pytest.raises(KeyboardInterrupt):
        drive(flow(KeyboardInterrupt()))
    # half-open still, and the next caller probes (and closes it)
    assert drive(flow("ok")) == "ok"
    assert failures.breaker.state == 0


class _Suspend:
    """Suspends its awaiter once, with no event loop involved."""

    def __await__(self) -> Generator[None, None, None]:
        yield


def test_closing_an_unawaited_drive_closes_the_flow_without_running_more() -> None:
    _, failures, _ = make("async")
    driver = AsyncDriver(None, failures)  # type: ignore[arg-type]
    after: list[str] = []

    @dataclass(frozen=True, slots=True)
    class Forever(Command):
        def run(self, driver: Any) -> Any:
            raise AssertionError("async only")

        async def arun(self, driver: Any) -> Any:
            await _Suspend()

    def flow() -> Flow[None]:
        try:
            yield Forever()
        finally:
            after.append("closed")
            yield Scripted("give the lease up")  # as load() does: cannot run now

    coro = driver.drive(flow())
    coro.send(None)  # runs up to the suspension
    coro.close()  # as the garbage collector does; must not raise "ignored GeneratorExit"
    assert after == ["closed"]
