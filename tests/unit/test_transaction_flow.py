"""The transaction attempt flow and its pipeline steps, without Redis.

The flow (``_transaction.attempts`` and the ``transaction``/``update`` flows on it) is
driven by hand with scripted replies: each test sends what Redis would have answered,
or throws what the step would have raised. ``TxPipeline`` (``_redis.py``), which turns
redis-py's pipeline failures into those outcomes, runs over a stand-in redis-py
pipeline in both modes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import pytest
import redis

from rcache._config import RetryPolicy, TxOptions
from rcache._exceptions import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    TransactionConflictError,
)
from rcache._flow import Flow, Sleep
from rcache._metrics import InMemoryMetrics
from rcache._redis import TxConflict, TxPipeline, TxUnsent
from rcache._serializers import encode_envelope, resolve_serializer
from rcache._transaction import (
    TransactionStats,
    _Exec,
    _Open,
    _Plan,
    _Release,
    _Step,
    attempts,
    transaction_flow,
    update_flow,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Host:
    """The parts of Cache the flows read."""

    def __init__(self, transient_attempts: int = 2) -> None:
        self.name = "test"
        self.serializer = resolve_serializer("json")
        self.metrics = InMemoryMetrics()
        self.retry = RetryPolicy(attempts=transient_attempts)

    def _key(self, key: str) -> str:
        return "test:k:" + key

    def _ttl(self, ttl: Any) -> float:
        return 60.0 if ttl is None else float(ttl)


class Pipe:
    """Stands in for TxPipeline: the flow only reads ``cluster`` and passes it on."""

    def __init__(self, cluster: bool = False) -> None:
        self.cluster = cluster


class Recorder:
    """A redis-py pipeline stand-in that records what a step's op does to it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, *args, *sorted(kwargs.items())))

        return record


def opened(flow: Flow[Any], pipe: Pipe) -> Any:
    """Start ``flow``: it asks for a pipeline first; the command after that."""
    assert isinstance(flow.send(None), _Open)
    return flow.send(pipe)


def watched(command: Any) -> list[Any]:
    """The keys a WATCH step watches."""
    assert isinstance(command, _Step)
    rec = Recorder()
    command.op(rec)
    assert rec.calls[0][0] == "watch"
    return list(rec.calls[0][1:])


def finish(flow: Flow[Any], command: Any) -> Any:
    """Answer the final release: the flow's result (or its exception)."""
    assert isinstance(command, _Release)
    with pytest.raises(StopIteration) as stop:
        flow.send(None)
    return stop.value.value


def plan(
    retries: int = 3, max_time: float = 10.0, clock: Clock | None = None, **kw: Any
) -> _Plan:
    # rand picks the upper bound: the backoff is the jitter's ceiling, deterministic
    return _Plan(
        ["k"],
        retries,
        max_time,
        kw.pop("transient_limit", 2),
        kw.pop("stats", None),
        clock=clock or Clock(),
        rand=lambda low, high: high,
    )


def one_step(value: Any = "value") -> Callable[[Any], Flow[tuple[None, Any]]]:
    """An attempt that runs one step (the caller's function) and returns ``value``."""

    def attempt(pipe: Any) -> Flow[tuple[None, Any]]:
        yield _Step(pipe, lambda p: None)
        return None, value

    return attempt


# -- the attempt loop ---------------------------------------------------------------------


def test_commits_on_the_first_attempt() -> None:
    stats = TransactionStats()
    pipe = Pipe()
    body = Recorder()

    def fn(p: Any) -> None:
        body.calls.append(("fn", p))

    flow = transaction_flow(Host(), fn, ["stock:42"], False, TxOptions(), stats)
    command = opened(flow, pipe)
    assert watched(command) == ["stock:42"]
    command = flow.send(True)
    assert isinstance(command, _Step) and command.pipe is cast(Any, pipe)
    command.op("the pipeline")  # the caller's function gets the pipeline
    assert body.calls == [("fn", "the pipeline")]
    command = flow.send(None)
    assert isinstance(command, _Exec) and command.queue is None
    assert finish(flow, flow.send([True, 1])) == [True, 1]
    assert (stats.calls, stats.commits, stats.attempts, stats.conflicts) == (1, 1, 1, 0)


def test_prefixed_watches_the_cache_keys_and_no_watch_sends_none() -> None:
    host = Host()
    flow = transaction_flow(host, lambda p: None, ["cart:7"], True, TxOptions(), None)
    assert watched(opened(flow, Pipe())) == ["test:k:cart:7"]
    flow = transaction_flow(host, lambda p: None, (), False, TxOptions(), None)
    command = opened(flow, Pipe())
    assert isinstance(command, _Step)  # straight to the function: nothing to WATCH
    assert isinstance(flow.send(None), _Exec)


def test_conflict_backs_off_then_commits() -> None:
    stats = TransactionStats()
    flow = attempts(plan(stats=stats), ["k"], one_step())
    command = opened(flow, Pipe())
    flow.send(True)  # WATCH answered; now the function
    assert isinstance(flow.send(None), _Exec)
    command = flow.throw(TxConflict())  # EXEC refused: a watched key changed
    assert command == Sleep(0.0005)
    assert watched(flow.send(None)) == ["k"]  # attempt 2 starts with WATCH again
    flow.send(True)
    assert isinstance(flow.send(None), _Exec)
    assert finish(flow, flow.send([True])) == ([True], "value")
    assert (stats.attempts, stats.conflicts, stats.commits, stats.last_attempts) == (
        2,
        1,
        1,
        2,
    )


def test_retries_exhausted_raise_a_conflict_error_with_the_attempts() -> None:
    stats = TransactionStats()
    flow = attempts(plan(retries=2, stats=stats), ["k"], one_step())
    opened(flow, Pipe())
    sleeps = []
    for attempt in range(3):
        flow.send(True)  # WATCH
        assert isinstance(flow.send(None), _Exec)
        command = flow.throw(TxConflict())
        if attempt < 2:
            assert isinstance(command, Sleep)
            sleeps.append(command.seconds)
            flow.send(None)
    assert sleeps == [0.0005, 0.001]  # the jitter's ceiling doubles
    assert isinstance(command, _Release)  # nothing left WATCHed
    with pytest.raises(TransactionConflictError) as info:
        flow.send(None)
    assert (info.value.keys, info.value.attempts) == (["k"], 3)
    assert (stats.attempts, stats.conflicts, stats.commits) == (3, 3, 0)


def test_retries_stop_when_the_time_budget_is_spent() -> None:
    clock = Clock()
    flow = attempts(plan(retries=100, max_time=1.0, clock=clock), ["k"], one_step())
    opened(flow, Pipe())
    for now in (5.0, 5.5):  # the budget counts from the first failure (t=5)
        clock.now = now
        flow.send(True)
        flow.send(None)
        assert isinstance(flow.throw(TxConflict()), Sleep)
        flow.send(None)
    clock.now = 6.0
    flow.send(True)
    flow.send(None)
    assert isinstance(flow.throw(TxConflict()), _Release)
    with pytest.raises(TransactionConflictError) as info:
        flow.send(None)
    assert info.value.attempts == 3


def test_backoff_is_capped_for_long_runs() -> None:
    p = plan(retries=10_000)
    for _ in range(5000):
        p.started()
    assert p.delay(TxConflict()) == 0.05


def test_connection_lost_before_exec_is_retried_within_the_transient_budget() -> None:
    stats = TransactionStats()
    lost = redis.ConnectionError("reset")
    flow = attempts(plan(stats=stats, transient_limit=2), ["k"], one_step())
    assert watched(opened(flow, Pipe())) == ["k"]
    assert isinstance(flow.throw(TxUnsent(lost)), Sleep)  # at WATCH: nothing sent
    flow.send(None)
    assert isinstance(flow.throw(TxUnsent(lost)), _Release)
    with pytest.raises(BackendUnavailableError) as info:
        flow.send(None)
    assert info.value.__cause__ is lost
    assert (stats.transient_retries, stats.attempts, stats.commits) == (2, 2, 0)


def test_user_exception_aborts_unwatches_and_propagates_unchanged() -> None:
    stats = TransactionStats()
    flow = attempts(plan(stats=stats), ["k"], one_step())
    opened(flow, Pipe())
    flow.send(True)
    error = ValueError("out of stock")
    command = flow.throw(error)  # raised by the caller's function
    assert isinstance(command, _Release)  # UNWATCH before the error propagates
    with pytest.raises(ValueError) as info:
        flow.send(None)
    assert info.value is error
    assert (stats.calls, stats.attempts, stats.commits, stats.conflicts) == (1, 1, 0, 0)


def test_error_after_exec_is_never_retried() -> None:
    flow = attempts(plan(), ["k"], one_step())
    opened(flow, Pipe())
    flow.send(True)
    flow.send(None)
    lost = BackendUnavailableError("lost after EXEC was sent")
    assert isinstance(flow.throw(lost), _Release)
    with pytest.raises(BackendUnavailableError) as info:
        flow.send(None)
    assert info.value is lost


def test_cluster_refuses_keys_in_several_slots_before_anything_is_sent() -> None:
    flow = transaction_flow(
        Host(), lambda p: None, ["a", "b"], False, TxOptions(), None
    )
    assert isinstance(flow.send(None), _Open)
    with pytest.raises(ConfigurationError, match="hash tag"):
        flow.send(Pipe(cluster=True))
    keys = ["{cart:7}:items", "{cart:7}:total"]
    flow = transaction_flow(Host(), lambda p: None, keys, False, TxOptions(), None)
    assert watched(opened(flow, Pipe(cluster=True))) == keys
    flow = transaction_flow(
        Host(), lambda p: None, ["a", "b"], False, TxOptions(), None
    )
    assert watched(opened(flow, Pipe(cluster=False))) == ["a", "b"]


def test_closed_flow_records_the_outcome_and_sends_nothing() -> None:
    stats = TransactionStats()
    flow = attempts(plan(stats=stats), ["k"], one_step())
    opened(flow, Pipe())
    flow.close()  # e.g. garbage collected mid-way: no RuntimeError from a yield
    assert (stats.calls, stats.commits, stats.attempts) == (1, 0, 1)


# -- update: the read-modify-write of a cached value ----------------------------------


def test_update_reads_decodes_and_queues_the_new_value() -> None:
    host = Host()
    seen = []

    def add(cart: Any) -> Any:
        seen.append(cart)
        return {**cart, "qty": cart["qty"] + 1}

    flow = update_flow(host, "cart:7", add, 30, TxOptions(), None)
    assert watched(opened(flow, Pipe())) == ["test:k:cart:7"]
    read = flow.send(True)
    assert isinstance(read, _Step)
    rec = Recorder()
    read.op(rec)
    assert rec.calls == [("get", "test:k:cart:7")]
    stored = encode_envelope(host.serializer, {"qty": 1}, fresh_for=30)
    command = flow.send(stored)
    assert isinstance(command, _Exec) and command.queue is not None
    rec = Recorder()
    command.queue(rec)
    assert [c[0] for c in rec.calls] == ["multi", "set"]
    assert rec.calls[1][1] == "test:k:cart:7" and rec.calls[1][3] == ("px", 30_000)
    assert finish(flow, flow.send([True])) == {"qty": 2}
    assert seen == [{"qty": 1}]
    assert host.metrics.count("cache_puts", "test") == 1


def test_update_treats_missing_and_undecodable_as_none() -> None:
    host = Host()
    for raw in (None, b"not an envelope"):
        flow = update_flow(host, "k", lambda v: {"was": v}, None, TxOptions(), None)
        opened(flow, Pipe())
        flow.send(True)
        assert isinstance(flow.send(raw), _Exec)
        assert finish(flow, flow.send([True])) == {"was": None}
    assert host.metrics.count("cache_errors", "test", "decode", "UndecodableError") == 1


def test_update_function_error_unwatches_and_propagates() -> None:
    error = KeyError("boom")

    def boom(value: Any) -> Any:
        raise error

    flow = update_flow(Host(), "k", boom, None, TxOptions(), None)
    opened(flow, Pipe())
    flow.send(True)
    assert isinstance(flow.send(None), _Release)
    with pytest.raises(KeyError) as info:
        flow.send(None)
    assert info.value is error


def test_options_are_validated_once() -> None:
    assert TxOptions.of(3, "2s") == TxOptions(3, 2.0)
    for retries in (-1, 1.5, True):
        with pytest.raises(ConfigurationError, match="retries"):
            TxOptions.of(retries, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_time"):
        TxOptions.of(1, 0)


# -- TxPipeline: redis-py's failures, in both modes -------------------------------------


class FakePipeline:
    """The parts of a redis-py (asyncio) pipeline that TxPipeline uses."""

    def __init__(self, mode: str, failures: dict[str, BaseException]) -> None:
        self.mode = mode
        self.failures = failures
        self.watching = False
        self.explicit_transaction = False
        self.connection: Any = None
        self.connection_pool = self
        self.log: list[str] = []

    def _reply(self, name: str, value: Any = None) -> Any:
        def act() -> Any:
            self.log.append(name)
            if name in self.failures:
                raise self.failures[name]
            return value

        if self.mode == "sync":
            return act()

        async def aact() -> Any:
            return act()

        return aact()

    def watch(self, *keys: Any) -> Any:
        self.watching, self.connection = True, Conn(self.mode, self.log)
        return self._reply("watch", True)

    def execute(self) -> Any:
        return self._reply("execute", [True])

    def reset(self) -> Any:
        if "reset" not in self.failures:
            self.watching, self.connection = False, None
        return self._reply("reset")

    def release(self, conn: Any) -> Any:
        return self._reply("pool.release")


class Conn:
    def __init__(self, mode: str, log: list[str]) -> None:
        self.mode = mode
        self.log = log

    def disconnect(self) -> Any:
        self.log.append("disconnect")
        return asyncio.sleep(0) if self.mode == "async" else None


class FakeClient:
    def __init__(self, pipe: FakePipeline) -> None:
        self.pipe = pipe

    def pipeline(self, transaction: bool) -> FakePipeline:
        assert transaction
        return self.pipe


def run(mode: str, tx: TxPipeline, step: str, *op: Any) -> Any:
    """``tx.step(*op)``, or ``await tx.astep(*op)`` in async mode."""
    if mode == "sync":
        return getattr(tx, step)(*op)
    return asyncio.run(getattr(tx, "a" + step)(*op))


def fake(mode: str, **failures: BaseException) -> tuple[TxPipeline, FakePipeline]:
    pipe = FakePipeline(mode, failures)
    return TxPipeline(FakeClient(pipe)), pipe


def watch(pipe: Any) -> Any:
    return pipe.watch("k")


def watch_then(error: BaseException) -> Callable[[Any], Any]:
    """The caller's function: reads under WATCH, then raises ``error``."""

    def fn(pipe: Any) -> Any:
        pipe.watching, pipe.connection = True, Conn(pipe.mode, pipe.log)
        raise error

    return fn


def _lost_watch() -> redis.WatchError:
    """A WatchError as redis-py raises it for a connection lost while WATCHing: from
    inside its handler of the connection error, which is the ``__context__``."""
    exc = redis.WatchError("A ConnectionError occurred while watching one or more keys")
    exc.__context__ = redis.ConnectionError("Connection reset by peer")
    return exc


MODES = ["sync", "async"]


@pytest.mark.parametrize("mode", MODES)
def test_pipeline_step_replies_and_commits(mode: str) -> None:
    tx, pipe = fake(mode)
    assert not tx.cluster
    assert run(mode, tx, "call", watch) is True
    assert run(mode, tx, "execute") == [True]
    assert pipe.log == ["watch", "execute"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "error", [ValueError("mine"), OSError("disk full"), TimeoutError("my own")]
)
def test_pipeline_callers_error_unwatches_and_propagates_unchanged(
    mode: str, error: Exception
) -> None:
    tx, pipe = fake(mode)
    with pytest.raises(type(error)) as info:
        run(mode, tx, "call", watch_then(error))
    assert info.value is error
    assert pipe.log == ["reset"] and not pipe.watching


@pytest.mark.parametrize("mode", MODES)
def test_pipeline_connection_lost_before_exec_is_unsent(mode: str) -> None:
    lost = redis.ConnectionError("reset")
    tx, pipe = fake(mode, watch=lost)
    with pytest.raises(TxUnsent) as info:
        run(mode, tx, "call", watch)
    assert info.value.original is lost
    assert pipe.log == ["watch", "reset"]
    # redis-py's WatchError for a connection lost while WATCHing: unsent too
    tx, pipe = fake(mode, watch=_lost_watch())
    with pytest.raises(TxUnsent) as info:
        run(mode, tx, "call", watch)
    assert isinstance(info.value.original, redis.ConnectionError)


@pytest.mark.parametrize("mode", MODES)
def test_pipeline_watch_error_is_a_conflict_and_redis_errors_are_mapped(
    mode: str,
) -> None:
    tx, _ = fake(mode, execute=redis.WatchError("changed"))
    with pytest.raises(TxConflict):
        run(mode, tx, "execute")
    tx, pipe = fake(mode, watch=redis.ResponseError("WRONGTYPE Operation"))
    with pytest.raises(BackendError) as info:
        run(mode, tx, "call", watch)
    assert not isinstance(info.value, BackendUnavailableError)
    assert pipe.log == ["watch", "reset"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lost", [redis.TimeoutError("read"), _lost_watch()])
def test_pipeline_connection_lost_after_exec_is_not_unsent(
    mode: str, lost: Exception
) -> None:
    tx, _ = fake(mode, execute=lost)
    with pytest.raises(BackendUnavailableError, match="after EXEC"):
        run(mode, tx, "execute")


@pytest.mark.parametrize("mode", MODES)
def test_pipeline_queue_runs_before_exec(mode: str) -> None:
    tx, pipe = fake(mode)
    assert run(mode, tx, "execute", lambda p: p.log.append("queued")) == [True]
    assert pipe.log == ["queued", "execute"]


@pytest.mark.parametrize("mode", MODES)
def test_pipeline_that_cannot_unwatch_drops_its_connection(mode: str) -> None:
    tx, pipe = fake(mode, reset=redis.TimeoutError("no reply to UNWATCH"))
    with pytest.raises(ValueError):
        run(mode, tx, "call", watch_then(ValueError()))
    assert pipe.log == ["reset", "disconnect", "pool.release"]
    assert (pipe.watching, pipe.connection, pipe.explicit_transaction) == (
        False,
        None,
        False,
    )


@pytest.mark.parametrize("mode", MODES)
def test_pipeline_release_resets_only_a_pipeline_in_use(mode: str) -> None:
    tx, pipe = fake(mode)
    run(mode, tx, "release")
    assert pipe.log == []
    run(mode, tx, "call", watch)
    run(mode, tx, "release")
    assert pipe.log == ["watch", "reset"]
