"""``min_replicas=`` in the lock flows, driven by hand with scripted replies (no Redis):
options checked once, the grant released again when too few replicas acknowledged it,
extend and renewal confirmed likewise."""

from __future__ import annotations

import pickle
import weakref
from typing import Any

import pytest

import rcache
from rcache import _lock
from rcache._config import LockOptions
from rcache._exceptions import ConfigurationError, LockError, LockNotReplicatedError
from rcache._flow import Critical, Flow
from rcache._metrics import InMemoryMetrics

ENV = _lock._Env(_lock._Caps(io=1.0, block=0.8, memory=False), None)


class _Renewer:
    def add(self, lease: Any) -> None: ...

    def remove(self, lease: Any) -> None: ...


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lock, "get_renewer", _Renewer)
    monkeypatch.setattr(_lock, "_EXCLUSIVE", weakref.WeakValueDictionary())


@pytest.fixture
def cache() -> rcache.Cache:
    c = rcache.Cache("redis://127.0.0.1:1/0", prefix="t")  # never connects
    _lock._POLICIES[c._spec] = "noeviction"
    return c


def _acquiring(lock: _lock._LeasedLock, timeout: Any = None) -> tuple[Flow[Any], Any]:
    flow = lock._acquire_flow(timeout)
    assert flow.send(None) is _lock._ENV
    return flow, flow.send(ENV)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_replicas": -1}, "min_replicas must be an int >= 0"),
        ({"min_replicas": True}, "min_replicas must be an int >= 0"),
        ({"min_replicas": 1.5}, "min_replicas must be an int >= 0"),
        ({"min_replicas": "1"}, "min_replicas must be an int >= 0"),
        ({"replica_timeout": 0}, "replica_timeout"),
        ({"replica_timeout": "0.5ms"}, "between 1ms and 60s"),
        ({"replica_timeout": 61}, "between 1ms and 60s"),
    ],
)
def test_options_are_checked_where_given(
    cache: rcache.Cache, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        cache.lock("n", **options)
    with pytest.raises(ConfigurationError, match=message):
        cache.locked("n", **options)


def test_confirmation_is_off_by_default_and_costs_nothing(cache: rcache.Cache) -> None:
    assert _lock.Confirm.of(LockOptions()) is None
    assert _lock.Confirm.of(LockOptions(min_replicas=2, replica_timeout="250ms")) == (
        2,
        250,
    )
    _, command = _acquiring(cache.lock("n"))
    assert isinstance(command, _lock._Eval) and command.confirm is None
    assert _lock.Confirm.of(cache.rwlock("d", min_replicas=1).write().options) == (
        1,
        1000,
    )


def test_a_confirmed_grant_is_a_grant(cache: rcache.Cache) -> None:
    lock = cache.lock("n", min_replicas=1)
    flow, command = _acquiring(lock)
    assert isinstance(command, _lock._Eval) and command.confirm == (1, 1000)
    with pytest.raises(StopIteration) as done:
        flow.send(([1, 42], 1))
    assert done.value.value is True
    assert lock.fence == 42


def test_an_unconfirmed_grant_is_released_and_raises_at_once(
    cache: rcache.Cache,
) -> None:
    lock = cache.lock("n", min_replicas=2, replica_timeout=0.5)
    flow, command = _acquiring(lock, timeout=30)
    token = command.call.args[0]
    release = flow.send(([1, 42], 1))
    assert isinstance(release, Critical)  # a cancelled caller still releases
    assert isinstance(release.command, _lock._Eval)
    assert release.command.call.spec.name == "lock_release"
    assert release.command.call.args[0] == token
    with pytest.raises(LockNotReplicatedError, match=r"only 1 replica.*500ms") as err:
        flow.send(1)
    assert (err.value.required, err.value.acknowledged) == (2, 1)
    assert lock.lease is None
    metrics = cache.metrics
    assert isinstance(metrics, InMemoryMetrics)
    assert metrics.count("lock_acquires", "n", "unreplicated") == 1
    back = pickle.loads(pickle.dumps(err.value))
    assert (str(back), back.required, back.acknowledged) == (str(err.value), 2, 1)


def test_a_busy_try_ignores_the_replica_count(cache: rcache.Cache) -> None:
    flow, _ = _acquiring(cache.lock("n", min_replicas=1), timeout=5)
    assert isinstance(flow.send(([0, 3000], 0)), _lock._Pop)  # waits as usual


def test_extend_is_confirmed_or_leaves_the_deadline(cache: rcache.Cache) -> None:
    lock = cache.lock("n", ttl=10, min_replicas=1)
    flow, _ = _acquiring(lock)
    with pytest.raises(StopIteration):
        flow.send(([1, 7], 1))
    lease = lock.lease
    assert lease is not None
    deadline = lease.deadline
    extend = lock._extend_flow(20)
    assert extend.send(None).confirm == (1, 1000)  # type: ignore[attr-defined]
    with pytest.raises(LockError, match="the extend of lock 'n'"):
        extend.send((1, 0))
    assert lease.deadline == deadline and lease.held
    extend = lock._extend_flow(20)
    extend.send(None)
    with pytest.raises(StopIteration):
        extend.send((1, 1))
    assert lease.deadline > deadline


def test_a_renewal_counts_only_once_confirmed(cache: rcache.Cache) -> None:
    lock = cache.lock("n", min_replicas=1)
    flow, _ = _acquiring(lock)
    with pytest.raises(StopIteration):
        flow.send(([1, 7], 1))
    lease = lock.lease
    assert lease is not None
    command = lease._renew_command()
    assert isinstance(command, _lock._Renewal)
    assert command._checked((1, 1)) == 1
    assert command._checked((0, 0)) == 0  # gone: the renewer marks it lost
    with pytest.raises(LockError, match="the renewal"):  # retried soon by the renewer
        command._checked((1, 0))
    plain = cache.lock("p")
    flow, _ = _acquiring(plain)
    with pytest.raises(StopIteration):
        flow.send([1, 7])
    assert plain.lease is not None
    assert not isinstance(plain.lease._renew_command(), _lock._Renewal)
