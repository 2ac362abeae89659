"""The lease renewer's schedule, driven by an injected clock without Redis or threads:
when a lease is renewed, batched, retried, lost; and its threads' idle exit."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, cast

import pytest

from rcache._exceptions import BackendUnavailableError, RCacheError
from rcache._flow import Command, Eval, SyncDriver
from rcache._leases import LeaseRenewer, Renewable
from rcache._redis import LuaScript
from rcache.testing import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Inline(LeaseRenewer):
    """No threads: the test steps the schedule and IO runs inline."""

    def _start(self) -> None:
        pass

    def submit(self, job: Callable[[], object], client: object = None) -> None:
        job()

    def step(self) -> float:
        """One turn of the renewer thread at the clock's time; the next wake-up."""
        now = self._clock()
        due, wake = self._due(now)
        self._dispatch(due, now)
        return wake


class Scripted(Command):
    """Replies (or raises) from a list, and records when it ran."""

    __slots__ = ("clock", "ran", "replies")

    def __init__(self, clock: Clock, *replies: Any) -> None:
        self.clock = clock
        self.replies = list(replies)
        self.ran: list[float] = []

    def run(self, driver: SyncDriver) -> Any:
        self.ran.append(self.clock.now)
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply


class FakePipe:
    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.calls: list[tuple[Any, ...]] = []

    def execute_command(self, name: str, *args: Any) -> None:
        # the renewer sends EVALSHA by name: a cluster pipeline refuses evalsha()
        assert name == "EVALSHA"
        self.calls.append(args)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.client.pipelines.append(self.calls)
        return [self.client.reply(call) for call in self.calls]


class FakeClient:
    """Enough of redis.Redis for Eval and a renewal pipeline: replies by key
    (``EVALSHA sha 1 key ...``)."""

    def __init__(self, **replies: list[Any]) -> None:
        self.replies = replies
        self.pipelines: list[list[tuple[Any, ...]]] = []
        self.single: list[tuple[Any, ...]] = []

    def reply(self, call: tuple[Any, ...]) -> Any:
        return self.replies[call[2]].pop(0)

    def pipeline(self, transaction: bool = True) -> FakePipe:
        return FakePipe(self)

    def evalsha(self, *args: Any) -> Any:
        self.single.append(args)
        reply = self.reply(args)
        if isinstance(reply, BaseException):
            raise reply
        return reply


class FakeRedis:
    def __init__(self, client: FakeClient) -> None:
        self.client = client

    def run(self, op: Callable[[Any], Any], *, retry: bool = True) -> Any:
        return op(self.client)


def _driver(client: FakeClient | None = None) -> SyncDriver:
    return SyncDriver(cast(Any, FakeRedis(client or FakeClient())), cast(Any, None))


def _lease(
    command: Command,
    driver: SyncDriver | None = None,
    *,
    ttl: float = 3.0,
    sent: float = 0.0,
    **options: Any,
) -> Renewable:
    return Renewable(
        driver or _driver(), ttl=ttl, sent=sent, command=command, **options
    )


def test_renewed_every_third_of_the_ttl_from_the_time_it_was_sent() -> None:
    clock = Clock()
    renewer = Inline(clock=clock)
    renewed: list[float] = []
    command = Scripted(clock, 1, 1)
    lease = _lease(command, on_renewed=lambda: renewed.append(clock.now))
    renewer.add(lease)
    assert lease.deadline == pytest.approx(3.0 - 0.032)  # ttl - 1 % - 2 ms
    assert renewer.step() == 1.0  # nothing due: wake at sent + ttl / 3
    clock.now = 0.7  # more than ttl / 12 early: not yet
    assert renewer.step() == 1.0
    assert command.ran == []
    clock.now = 1.0
    renewer.step()
    assert command.ran == [1.0]
    assert renewed == [1.0]
    assert lease.next_renew == 2.0
    assert lease.deadline == pytest.approx(1.0 + 3.0 - 0.032)
    clock.now = 1.9  # within ttl / 12 of its time: renewed now (early is harmless)
    renewer.step()
    assert command.ran == [1.0, 1.9]
    assert len(renewer) == 1


def test_a_reply_other_than_1_loses_the_lease_once() -> None:
    clock = Clock()
    renewer = Inline(clock=clock)
    lost: list[str] = []
    lease = _lease(Scripted(clock, 0), on_lost=lost.append)
    renewer.add(lease)
    clock.now = 1.0
    renewer.step()
    assert lease.lost
    assert lost == ["Redis no longer holds its token (expired or taken over)"]
    assert len(renewer) == 0
    clock.now = 5.0
    renewer.add(lease)  # even if registered again, a loss is reported once
    renewer.step()
    assert len(lost) == 1


def test_the_deadline_loses_a_lease_whose_renewals_fail() -> None:
    clock = Clock()
    renewer = Inline(clock=clock)
    lost: list[str] = []
    down = BackendUnavailableError("down")
    command = Scripted(clock, *[down] * 100)
    lease = _lease(command, on_lost=lost.append)
    renewer.add(lease)
    clock.now = 1.0
    renewer.step()
    # A failure is retried soon, jittered: within [0.5, 1.5] x min(ttl / 10, 1 s).
    assert 1.0 + 0.15 <= lease.next_renew <= 1.0 + 0.45
    while not lost:
        clock.now = min(lease.next_renew, lease.deadline)
        renewer.step()
    assert clock.now == lease.deadline == pytest.approx(3.0 - 0.032)
    assert lost == ["its lease ran out without a successful renewal"]
    assert len(command.ran) >= 4  # it kept trying until the deadline
    assert len(renewer) == 0


def test_a_watched_lease_is_not_renewed_but_lost_at_its_deadline() -> None:
    clock = Clock()
    renewer = Inline(clock=clock)
    lost: list[str] = []
    command = Scripted(clock)
    lease = _lease(command, renew=False, on_lost=lost.append)
    renewer.add(lease)
    assert renewer.step() == lease.deadline
    clock.now = lease.deadline
    renewer.step()
    assert command.ran == []
    assert lost == ["its lease ran out without a successful renewal"]


def test_max_hold_stops_renewing_and_the_lease_runs_out() -> None:
    clock = Clock()
    renewer = Inline(clock=clock)
    lost: list[str] = []
    command = Scripted(clock, 1, 1, 1)
    lease = _lease(command, max_hold=2.5, on_lost=lost.append)
    renewer.add(lease)
    for now in (1.0, 2.0, 3.0):
        clock.now = now
        renewer.step()
    assert command.ran == [1.0, 2.0]  # none at or after sent + max_hold
    assert not lost
    clock.now = lease.deadline
    renewer.step()
    assert lost


def test_leases_of_one_client_due_together_share_one_pipeline() -> None:
    clock = Clock()
    renewer = Inline(clock=clock)
    client = FakeClient(k0=[1], k1=[1], k2=[0])
    driver = _driver(client)
    script = LuaScript("renew", source="return 1")
    lost: list[str] = []
    leases = [
        _lease(Eval(script, [f"k{i}"], ["t", 3000]), driver, sent=sent)
        for i, sent in enumerate((0.0, 0.2))
    ]
    leases.append(
        _lease(Eval(script, ["k2"], ["t", 3000]), driver, sent=0.1, on_lost=lost.append)
    )
    far = _lease(Eval(script, ["k3"], ["t", 3000]), driver, sent=0.5)
    for lease in [*leases, far]:
        renewer.add(lease)
    clock.now = 1.0
    renewer.step()
    assert len(client.pipelines) == 1  # one round trip for the three due
    assert sorted(call[2] for call in client.pipelines[0]) == ["k0", "k1", "k2"]
    assert client.single == []
    assert lost == ["Redis no longer holds its token (expired or taken over)"]
    assert far.next_renew == 0.5 + 1.0  # 0.5 s later than now: not batched


def test_a_failed_entry_of_a_pipeline_is_retried_alone() -> None:
    clock = Clock()
    renewer = Inline(clock=clock)
    client = FakeClient(a=[1], b=[RuntimeError("NOSCRIPT"), 1])
    driver = _driver(client)
    script = LuaScript("renew", source="return 1")
    leases = [_lease(Eval(script, [k], ["t", 3000]), driver) for k in ("a", "b")]
    for lease in leases:
        renewer.add(lease)
    clock.now = 1.0
    renewer.step()
    assert len(client.pipelines) == 1
    assert len(client.single) == 1  # only the failed one, through EVALSHA alone
    assert all(lease.next_renew == 2.0 and not lease.lost for lease in leases)


def test_a_reply_after_remove_is_ignored() -> None:
    clock = Clock()
    renewer = Inline(clock=clock)
    lost: list[str] = []

    class Released(Scripted):
        __slots__ = ()

        def run(self, driver: SyncDriver) -> Any:
            renewer.remove(lease)  # the owner released it while the renewal ran
            return 0

    lease = _lease(Released(clock), on_lost=lost.append)
    renewer.add(lease)
    clock.now = 1.0
    renewer.step()
    assert not lease.lost
    assert lost == []


def test_a_renewal_that_did_not_run_is_retried() -> None:
    clock = Clock()
    renewer = Inline(clock=clock)

    class Broken(Scripted):
        __slots__ = ()

        def run(self, driver: SyncDriver) -> Any:
            raise TypeError("a bug in a command")

    lease = _lease(Broken(clock))
    renewer.add(lease)
    clock.now = 1.0
    with pytest.raises(TypeError):
        renewer.step()
    assert 1.0 < lease.next_renew < 1.5  # not stuck "in flight" forever
    assert not lease.lost


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_threads_exit_when_idle_and_start_again_on_demand() -> None:
    renewer = LeaseRenewer(idle_exit=0.1)
    lease = _lease(Scripted(Clock()), renew=False, ttl=0.3, sent=time.monotonic())
    renewer.add(lease)
    thread = renewer._thread
    assert thread is not None and thread.is_alive()
    io: list[threading.Thread] = []
    renewer.submit(lambda: io.append(threading.current_thread()), "client")
    wait_until(lambda: io, 5, message="a background job")
    assert io[0].name == "rcache-lock-io"
    renewer.remove(lease)
    wait_until(lambda: not thread.is_alive(), 5, message="renewer idle exit")
    wait_until(lambda: not io[0].is_alive(), 5, message="IO thread idle exit")
    assert renewer._io == {}
    renewer.add(lease)  # a new lease starts a new thread
    assert renewer._thread is not None and renewer._thread is not thread
    assert renewer._thread.is_alive()
    renewer.remove(lease)


def test_a_failing_background_job_does_not_kill_its_thread() -> None:
    renewer = LeaseRenewer(idle_exit=0.1)
    ran = threading.Event()

    def fail() -> None:
        raise RCacheError("boom")

    renewer.submit(fail, "client")
    renewer.submit(ran.set, "client")
    assert ran.wait(5)
