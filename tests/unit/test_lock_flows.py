"""The lock flows (acquire, release, extend) driven by hand with scripted replies: no
Redis, no driver. Each test sends the replies a server would give and checks the
commands the flow yields, what it returns or raises, and the lease it leaves."""

from __future__ import annotations

import logging
import re
import weakref
from typing import Any

import pytest

import rcache
from rcache import _lock
from rcache._exceptions import (
    BackendUnavailableError,
    LockError,
    LockNotAcquiredError,
    LockNotOwnedError,
    LockReleaseUnconfirmedError,
)
from rcache._flow import Command, Flow, Sleep
from rcache._metrics import InMemoryMetrics

ENV = _lock._Env(_lock._Caps(io=1.0, block=0.8, memory=False), None)


class Clock:
    """The flows' monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """Drives a flow: ``send``/``throw`` answer the pending command and return the next
    one (None once the flow returned; its value is then in ``result``)."""

    def __init__(self, flow: Flow[Any]) -> None:
        self.flow = flow
        self.result: Any = None
        self.command: Command | None = self._step(lambda: flow.send(None))

    def _step(self, advance: Any) -> Command | None:
        try:
            self.command = advance()
        except StopIteration as stop:
            self.result, self.command = stop.value, None
        return self.command

    def send(self, reply: Any) -> Command | None:
        return self._step(lambda: self.flow.send(reply))

    def throw(self, exc: BaseException) -> Command | None:
        return self._step(lambda: self.flow.throw(exc))

    def eval(self, script: str) -> _lock._Eval:
        """The pending command, checked to be a call of ``script``."""
        command = self.command
        assert isinstance(command, _lock._Eval), command
        assert command.call.spec.name == script
        return command


class Renewer:
    """Stands in for the per-process renewer: records, starts no thread."""

    def __init__(self) -> None:
        self.leases: set[_lock.Lease] = set()

    def add(self, lease: _lock.Lease) -> None:
        self.leases.add(lease)

    def remove(self, lease: _lock.Lease) -> None:
        self.leases.discard(lease)


@pytest.fixture(autouse=True)
def renewer(monkeypatch: pytest.MonkeyPatch) -> Renewer:
    fake = Renewer()
    monkeypatch.setattr(_lock, "get_renewer", lambda: fake)
    # each test its own re-entry table (leases of earlier tests die only with the GC)
    monkeypatch.setattr(_lock, "_EXCLUSIVE", weakref.WeakValueDictionary())
    return fake


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(_lock, "_monotonic", fake)
    return fake


@pytest.fixture
def cache() -> rcache.Cache:
    c = rcache.Cache("redis://127.0.0.1:1/0", prefix="t")  # never connects
    _lock._POLICIES[c._spec] = "noeviction"  # known: no policy check is yielded
    return c


def _metrics(cache: rcache.Cache) -> InMemoryMetrics:
    assert isinstance(cache.metrics, InMemoryMetrics)
    return cache.metrics


def acquiring(lock: _lock._LeasedLock, timeout: Any = None, **kwargs: Any) -> Scripted:
    """An acquire flow past its environment step, at its first try."""
    run = Scripted(lock._acquire_flow(timeout, **kwargs))
    assert run.command is _lock._ENV
    run.send(ENV)
    return run


def holding(lock: _lock._LeasedLock, fence: int = 7) -> _lock.Lease:
    run = acquiring(lock)
    run.send([1, fence])
    assert run.result is True
    assert lock.lease is not None
    return lock.lease


# -- the protocol ------------------------------------------------------------------------


def test_builders_put_keys_and_arguments_in_script_order() -> None:
    call = _lock.lock_acquire(
        "k", "k:fence", "k:w", "k:h", token="tok", ttl=1.5, mode="0", marker=2.0
    )
    assert call.spec.name == "lock_acquire"
    assert call.keys == ["k", "k:fence", "k:w", "k:h"]
    assert call.args == ["tok", 1500, "0", 2000]
    assert _lock.lock_release("k", "s", "w", "h", token="tok").args == [
        "tok",
        2000,
        1,
        10,
    ]
    assert _lock.rw_read("r", "w", "q", "s", token="t", ttl=1, waited=True).args[2] == (
        "1"
    )
    assert _lock.fair_release("k", "q", "qt", "fs:", token="t", side="a").args[2] == "a"
    assert _lock.lock_wake("sig").keys == ["sig"]
    assert _lock.lock_wake("sig", "k").keys == ["sig", "k"]


def test_replies_parse_into_named_codes() -> None:
    assert _lock.Attempt.parse([b"1", b"42"]) == (_lock.Acquired.GRANTED, 42)
    assert _lock.Attempt.parse([0, 1500]).code is _lock.Acquired.BUSY
    assert _lock.Attempt.parse([2, 9]).code is _lock.Acquired.RESERVED
    assert set(_lock._GONE) == {_lock.Released.OTHER, _lock.Released.GONE}


def test_scripts_are_read_on_first_use_only() -> None:
    # LockScript's own lazy wrapper is gone: a lock script is a LuaScript, which reads
    # its file on first use and keeps it.
    spec = _lock.LuaScript("lock_extend")
    assert spec._loaded is None
    assert "PEXPIRE" in spec.source
    assert spec._loaded is not None


def test_shared_wake_up_push_is_pasted_where_included() -> None:
    source = _lock.LuaScript("sem_release").source
    assert "local function push_wakeup" in source
    assert source.count("'LPUSH'") == 1  # only inside push_wakeup


# -- acquire ------------------------------------------------------------------------------


def test_granted_at_the_first_try(cache: rcache.Cache, clock: Clock) -> None:
    lock = cache.lock("n", ttl=10)
    run = acquiring(lock)
    call = run.eval("lock_acquire").call
    assert call.keys == ["t:l:{n}", "t:l:{n}:fence", "t:l:{n}:w", "t:l:{n}:h"]
    token, ttl, mode, marker = call.args
    assert (ttl, mode, marker) == (10_000, _lock.Try.FIRST, 1800)  # block cap + 1 s
    assert run.command.deadline is None  # type: ignore[union-attr]
    clock.now += 0.003
    assert run.send([1, 42]) is None
    assert run.result is True
    lease = lock.lease
    assert lease is not None and lease.token == token and lease.fence == 42
    assert lease.held and not lease.watched  # explicit acquire: not renewed
    assert _metrics(cache).count("lock_acquires", "n", "acquired") == 1


def test_busy_then_woken_by_a_release(cache: rcache.Cache, clock: Clock) -> None:
    lock = cache.lock("n", ttl=10)
    run = acquiring(lock, timeout=5)
    first = run.eval("lock_acquire")
    assert first.deadline == clock.now + 5
    pop = run.send([0, 3000])  # busy: the holder's lease ends in 3 s
    assert isinstance(pop, _lock._Pop)
    assert pop.key == "t:l:{n}:signal"
    assert pop.timeout == pytest.approx(0.8)  # never past the blocking client's cap
    clock.now += 0.2
    retry = run.send([b"t:l:{n}:signal", b"1"])
    assert isinstance(retry, _lock._Eval)
    assert retry.call.args[2] == _lock.Try.RETRY  # ignores the hand-off grace
    assert retry.call.args[0] == first.call.args[0]  # the same token: idempotent
    run.send([1, 43])
    assert run.result is True
    assert lock.fence == 43


def test_pop_waits_no_longer_than_the_holders_lease(
    cache: rcache.Cache, clock: Clock
) -> None:
    run = acquiring(cache.lock("n"), timeout=5)
    pop = run.send([0, 120])
    assert isinstance(pop, _lock._Pop)
    assert pop.timeout == pytest.approx(0.122)  # PTTL + slack: a crash costs PTTL


def test_timeout_gives_up_and_counts(cache: rcache.Cache, clock: Clock) -> None:
    lock = cache.lock("n")
    run = acquiring(lock, timeout=0.5)
    pop = run.send([0, 3000])
    assert isinstance(pop, _lock._Pop)
    assert pop.timeout == pytest.approx(0.5)  # the rest of the budget
    clock.now += 0.5
    run.send(None)  # no wake-up came
    clock.now += 0.001
    assert run.send([0, 2500]) is None  # plain Lock: no place to give up
    assert run.result is False
    assert lock.lease is None
    assert _metrics(cache).count("lock_acquires", "n", "timeout") == 1


def test_with_raises_when_its_acquire_times_out(
    cache: rcache.Cache, clock: Clock, renewer: Renewer
) -> None:
    lock = cache.lock("n", timeout=0)
    run = acquiring(lock, timeout=_lock._DEFAULT, renew=True, required=True)
    assert run.eval("lock_acquire").call.args[2] == _lock.Try.ONCE
    with pytest.raises(LockNotAcquiredError, match=re.escape("within 0.0s")):
        run.send([0, 100])
    assert _metrics(cache).count("lock_acquires", "n", "busy") == 1
    run = acquiring(lock, timeout=_lock._DEFAULT, renew=True, required=True)
    run.send([1, 3])
    assert renewer.leases == {lock.lease}  # `with` renews by default


def test_reserved_for_a_woken_waiter_sleeps_and_tries_first_again(
    cache: rcache.Cache, clock: Clock
) -> None:
    run = acquiring(cache.lock("n"), timeout=5)
    sleep = run.send([2, 10])  # free, but a woken waiter's turn for 10 ms
    assert isinstance(sleep, Sleep)
    assert sleep.seconds == pytest.approx(0.012)
    clock.now += 0.012
    again = run.send(None)
    assert isinstance(again, _lock._Eval)
    assert again.call.args[2] == _lock.Try.FIRST  # not a woken waiter itself
    run.send([1, 5])
    assert run.result is True


def test_not_reentrant_through_the_same_or_another_object(
    cache: rcache.Cache, clock: Clock
) -> None:
    lock = cache.lock("n")
    holding(lock)
    with pytest.raises(LockError, match="not reentrant"):
        Scripted(lock._acquire_flow(None))
    other = cache.lock("n")
    with pytest.raises(LockError, match=r"cannot wait for .* already holds it"):
        Scripted(other._acquire_flow(None))  # would wait for itself forever
    run = acquiring(other, timeout=0)  # a single try is still a try
    run.send([0, 100])
    assert run.result is False


def test_a_failed_try_is_undone_in_the_background_and_fails_closed(
    cache: rcache.Cache, clock: Clock
) -> None:
    lock = cache.lock("n")
    run = acquiring(lock, timeout=5)
    token = run.eval("lock_acquire").call.args[0]
    failure = BackendUnavailableError("reset")
    detach = run.throw(failure)  # the script may have run: its reply was lost
    assert isinstance(detach, _lock._Detach)
    assert not detach.inline  # not on the caller's budget
    with pytest.raises(LockNotAcquiredError, match="fail closed") as info:
        run.send(None)
    assert info.value.__cause__ is failure
    undo = Scripted(detach.flow)
    release = undo.eval("lock_release")
    assert release.call.args[0] == token and release.retry is False
    assert undo.send(1) is None  # Lock has no queue place to leave
    assert _metrics(cache).count("lock_acquires", "n", "error") == 1


def test_an_interrupted_try_is_undone_before_the_interrupt_propagates(
    cache: rcache.Cache, clock: Clock
) -> None:
    run = acquiring(cache.semaphore("n", limit=2), timeout=None)
    detach = run.throw(KeyboardInterrupt())
    assert isinstance(detach, _lock._Detach) and detach.inline
    with pytest.raises(KeyboardInterrupt):
        run.send(None)
    assert Scripted(detach.flow).eval("sem_release")


def test_a_cancelled_waiter_passes_its_wake_up_on(
    cache: rcache.Cache, clock: Clock
) -> None:
    run = acquiring(cache.lock("n"), timeout=None)
    run.send([0, 5000])
    detach = run.throw(KeyboardInterrupt())  # e.g. CancelledError while blocked
    assert isinstance(detach, _lock._Detach) and detach.inline
    wake = Scripted(detach.flow).eval("lock_wake")
    assert wake.call.keys == ["t:l:{n}:signal", "t:l:{n}"]  # only while it is free
    with pytest.raises(KeyboardInterrupt):
        run.send(None)


def test_wake_up_channel_failure_falls_back_to_a_jittered_sleep(
    cache: rcache.Cache, clock: Clock
) -> None:
    run = acquiring(cache.lock("n"), timeout=5)
    run.send([0, 5000])
    sleep = run.throw(BackendUnavailableError("blocking client reset"))
    assert isinstance(sleep, Sleep)
    assert 0.005 <= sleep.seconds <= 0.05
    assert isinstance(run.send(None), _lock._Eval)


def test_the_eviction_policy_is_read_once_per_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = rcache.Cache("redis://127.0.0.1:1/0", prefix="t")
    run = Scripted(cache.lock("n")._acquire_flow(None))
    detach = run.send(ENV)
    assert isinstance(detach, _lock._Detach)
    assert isinstance(run.send(None), _lock._Eval)
    again = Scripted(cache.lock("m")._acquire_flow(None))
    assert isinstance(again.send(ENV), _lock._Eval)  # claimed: not read twice
    check = Scripted(detach.flow)
    assert check.command is _lock._READ_POLICY
    with caplog.at_level(logging.ERROR, logger="rcache.lock"):
        check.send("allkeys-lru")
    assert "noeviction" in caplog.text
    assert _metrics(cache).count("lock_eviction_risk", "allkeys-lru") == 1


# -- fair lock, RW lock, semaphore --------------------------------------------------------


def test_fair_waiter_blocks_on_its_own_list_and_leaves_the_queue(
    cache: rcache.Cache, clock: Clock
) -> None:
    lock = cache.lock("n", fair=True)
    run = acquiring(lock, timeout=1)
    call = run.eval("lock_fair_acquire").call
    assert call.keys[2:] == ["t:l:{n}:fq", "t:l:{n}:fqt", "t:l:{n}:fqn"]
    assert call.args[2:] == [3200, "1"]  # place kept 4 x the block cap, joins
    token = call.args[0]
    pop = run.send([0, 0])  # behind a waiter taking its turn
    assert isinstance(pop, _lock._Pop)
    assert pop.key == f"t:l:{{n}}:fs:{token}"
    assert pop.timeout == pytest.approx(0.8)
    clock.now += 1.0
    run.send(None)
    leave = run.send([0, 0])
    assert isinstance(leave, _lock._Eval)
    assert leave.call.spec.name == "lock_fair_release"
    assert leave.call.args == [token, 2000, _lock.Side.ABANDON]
    assert leave.deadline == 1001.0  # bounded by the spent budget's margin
    assert run.send(1) is None
    assert run.result is False


def test_rwlock_reader_waits_on_the_reader_signal(
    cache: rcache.Cache, clock: Clock
) -> None:
    read = cache.rwlock("d").read()
    run = acquiring(read, timeout=5)
    call = run.eval("rwlock_read").call
    assert call.keys == [
        "t:l:{d}:rw:r",
        "t:l:{d}:rw:w",
        "t:l:{d}:rw:wq",
        "t:l:{d}:rw:rs",
    ]
    assert call.args[2] == "0"
    pop = run.send([0, 400])
    assert isinstance(pop, _lock._Pop) and pop.key == "t:l:{d}:rw:rs"
    retry = run.send(None)
    assert isinstance(retry, _lock._Eval) and retry.call.args[2] == "1"
    run.send([1, 0])
    assert read.lease is not None and read.lease.fence == 0  # reads are not fenced
    release = Scripted(read._release_flow(*read._releasing()))  # type: ignore[misc]
    assert release.eval("rwlock_release").call.args[1] == _lock.Side.READ


def test_rwlock_writer_withdraws_its_intent_when_it_gives_up(
    cache: rcache.Cache, clock: Clock
) -> None:
    write = cache.rwlock("d").write()
    run = acquiring(write, timeout=0.1)
    assert run.eval("rwlock_write").call.args[2] == 3200  # intent kept 4 x cap
    run.send([0, 50])
    clock.now += 0.1
    run.send(None)
    withdraw = run.send([0, 50])
    assert isinstance(withdraw, _lock._Eval)
    assert withdraw.call.args[1] == _lock.Side.ABANDON
    run.send(1)
    assert run.result is False


def test_semaphore_permit_round_trip(cache: rcache.Cache, clock: Clock) -> None:
    sem = cache.semaphore("q", limit=3, ttl=2)
    run = acquiring(sem, timeout=5)
    call = run.eval("sem_acquire").call
    assert call.keys == ["t:l:{q}:sem", "t:l:{q}:sem:fence"]
    assert call.args[1:] == [2000, 3]
    pop = run.send([0, 700])
    assert isinstance(pop, _lock._Pop) and pop.key == "t:l:{q}:sem:signal"
    run.send(None)
    run.send([1, 9])
    assert sem.fence == 9
    extend = Scripted(sem._extend_flow(5))
    assert extend.eval("sem_extend").call.args[1] == 5000
    extend.send(1)
    release = Scripted(sem._release_flow(*sem._releasing()))  # type: ignore[misc]
    assert release.eval("sem_release").call.args[1:] == [2000, 3]
    release.send(1)
    assert sem.lease is None
    assert _metrics(cache).count("lock_releases", "q", "released") == 1


# -- release ------------------------------------------------------------------------------


def test_release_deletes_by_token(cache: rcache.Cache, clock: Clock) -> None:
    lock = cache.lock("n")
    lease = holding(lock)
    run = Scripted(lock._release_flow(*lock._releasing()))  # type: ignore[misc]
    call = run.eval("lock_release").call
    assert call.args[0] == lease.token
    assert run.send(1) is None
    assert lease.released and lock.lease is None
    assert _metrics(cache).count("locks_held", "n") == 0


@pytest.mark.parametrize(
    ("code", "reason"),
    [(-1, "expired"), (0, "taken over by another holder")],
)
def test_release_of_a_lost_lease_says_why_and_deletes_nothing(
    cache: rcache.Cache, clock: Clock, code: int, reason: str
) -> None:
    lock = cache.lock("n")
    lease = holding(lock)
    run = Scripted(lock._release_flow(*lock._releasing()))  # type: ignore[misc]
    with pytest.raises(LockNotOwnedError, match=f"{reason} before the release"):
        run.send(code)
    assert lease.lost and lock.lease is None
    assert _metrics(cache).count("lock_releases", "n", "not_owned") == 1


def test_a_retried_release_finding_the_key_gone_released_it(
    cache: rcache.Cache, clock: Clock
) -> None:
    lock = cache.lock("n")
    holding(lock)
    run = Scripted(lock._release_flow(*lock._releasing()))  # type: ignore[misc]
    run.eval("lock_release").attempts = 2  # the first reply was lost, retried
    assert run.send(-1) is None  # no spurious LockNotOwnedError
    assert _metrics(cache).count("lock_releases", "n", "released") == 1


def test_release_sent_without_a_reply_is_unconfirmed(
    cache: rcache.Cache, clock: Clock
) -> None:
    lock = cache.lock("n")
    lease = holding(lock)
    run = Scripted(lock._release_flow(*lock._releasing()))  # type: ignore[misc]
    on_sent = run.eval("lock_release").on_sent
    assert on_sent is not None
    on_sent()
    with pytest.raises(LockReleaseUnconfirmedError):
        run.throw(BackendUnavailableError("no reply"))
    assert lease.unconfirmed and not lease.held


def test_release_never_sent_keeps_the_lease(cache: rcache.Cache, clock: Clock) -> None:
    lock = cache.lock("n")
    lease = holding(lock)
    run = Scripted(lock._release_flow(*lock._releasing()))  # type: ignore[misc]
    with pytest.raises(LockError, match="before the release was sent") as info:
        run.throw(BackendUnavailableError("refused"))
    assert not isinstance(info.value, LockReleaseUnconfirmedError)
    assert lock.lease is lease and lease.held


def test_release_without_a_hold(cache: rcache.Cache) -> None:
    with pytest.raises(LockNotOwnedError, match="does not hold it"):
        cache.lock("n")._releasing()
    assert cache.lock("n", raise_on_not_owned=False)._releasing() is None


# -- extend -------------------------------------------------------------------------------


def test_extend_replaces_the_lease_from_when_it_was_sent(
    cache: rcache.Cache, clock: Clock
) -> None:
    lock = cache.lock("n", ttl=10)
    lease = holding(lock)
    clock.now += 5
    run = Scripted(lock._extend_flow(2))
    call = run.eval("lock_extend").call
    assert call.args == [lease.token, 2000]
    clock.now += 0.01  # the reply arrives later: the deadline counts from the send
    run.send(1)
    assert lease.ttl == 2
    assert lease.deadline == pytest.approx(1005 + 2 - 0.022)


def test_extend_of_a_lost_lease_marks_it_lost(
    cache: rcache.Cache, clock: Clock, renewer: Renewer
) -> None:
    lost: list[_lock.Lease] = []
    lock = cache.lock("n", on_lost=lost.append)
    lease = holding(lock)
    assert renewer.leases == {lease}  # watched: it has an on_lost callback
    run = Scripted(lock._extend_flow(None))
    with pytest.raises(LockNotOwnedError, match="expired before extend"):
        run.send(-1)
    assert lost == [lease] and lease.lost
    assert not renewer.leases


def test_extend_failure_is_a_lock_error_and_keeps_the_lease(
    cache: rcache.Cache, clock: Clock
) -> None:
    lock = cache.lock("n")
    lease = holding(lock)
    run = Scripted(lock._extend_flow(None))
    with pytest.raises(LockError, match="could not extend"):
        run.throw(BackendUnavailableError("down"))
    assert lease.held


def test_the_renewer_renews_with_the_kinds_extend_script(
    cache: rcache.Cache, clock: Clock
) -> None:
    lock = cache.lock("n", ttl=3)
    lease = holding(lock)
    command = lease._renew_command()
    assert command.script.name == "lock_extend"
    assert command.args == [lease.token, 3000]
    assert command.guard is None  # locks fail closed
    read = cache.rwlock("d", ttl=2).read()
    assert holding(read, 0)._renew_command().script.name == "sem_extend"
