"""The hit path's fast paths give exactly what the general paths give (issue 13).

KeyBuilder.build skips binding and JSON for scalar arguments; JsonSerializer.loads
decodes payloads without tagged objects with msgspec (or json.loads without a hook).
Each is checked against the general path on generated inputs, and the stored bytes
are checked to be what the previous encoder wrote.
"""

from __future__ import annotations

import json
import math
import random
import struct
from collections.abc import Callable
from typing import Any

import pytest

from rcache import JsonSerializer, MsgpackSerializer, _serializers
from rcache._keys import KeyBuilder
from rcache._metrics import InMemoryMetrics, bypass_counter, untimed_bypass
from rcache._serializers import _encode_tree, _object_hook

# -- keys -------------------------------------------------------------------------------

_CHARS = [chr(i) for i in range(130)] + ["é", "中", "\u2028", "\x7f", " ", '"', "\\"]


def _scalar(rnd: random.Random) -> Any:
    r = rnd.random()
    if r < 0.3:
        big = [2**63, -(2**70), 2**256, 2**257, 10**90, 10**95, 10**5000]
        return rnd.choice([0, -1, 7, *big, rnd.randint(-(10**9), 10**9)])
    if r < 0.85:
        n = rnd.randint(0, 100 if rnd.random() < 0.1 else 8)
        return "".join(rnd.choice(_CHARS) for _ in range(n))
    return rnd.choice([None, True, False, 1.5, (1,), [1], {"a": 1}, b"x"])


def _general(k: KeyBuilder, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    return k._key_prefix + k.encode_args(k.bind(args, kwargs))


def one(a: Any) -> None: ...


def two(a: Any, b: Any = 2) -> None: ...


def test_scalar_fast_path_gives_the_general_key() -> None:
    rnd = random.Random(13)
    k1, k2 = KeyBuilder(one, prefix="p"), KeyBuilder(two, prefix="p")
    fast = 0
    for _ in range(20_000):
        a, b = _scalar(rnd), _scalar(rnd)
        for k, args in ((k1, (a,)), (k2, (a, b))):
            assert k.build(args, {}) == _general(k, args, {}), args
            fast += k._fast(args) is not None
    assert fast > 10_000  # the generator does exercise the fast path


@pytest.mark.parametrize(
    ("args", "suffix"),
    [
        ((42,), "[42]"),
        ((-7,), "[-7]"),
        (("alice",), '["alice"]'),
        (("a:b/c.d-e_f",), '["a:b/c.d-e_f"]'),
        (("",), '[""]'),
        ((None,), "[null]"),
        ((True,), "[true]"),
        ((False,), "[false]"),
    ],
)
def test_fast_keys_keep_the_stored_layout(args: tuple[Any, ...], suffix: str) -> None:
    k = KeyBuilder(one, prefix="p")
    assert k._fast(args) is not None
    assert k.build(args, {}) == f"p:c:{k.name}:{suffix}"


@pytest.mark.parametrize(
    "args", [("a b",), ('a"b',), ("a\\b",), ("é",), ("x" * 95,), (1.5,), (10**100,)]
)
def test_values_json_would_escape_or_hash_take_the_general_path(
    args: tuple[Any, ...],
) -> None:
    k = KeyBuilder(one, prefix="p")
    assert k._fast(args) is None
    assert k.build(args, {}) == _general(k, args, {})


def test_fast_path_is_off_for_keyword_calls_ignores_and_templates() -> None:
    k = KeyBuilder(two, prefix="p")
    assert k.build((1,), {"b": 3}) == _general(k, (1,), {"b": 3})
    assert k.build((1,), {}) == k.build((1, 2), {})  # the default is bound
    assert KeyBuilder(two, prefix="p", ignore=("b",))._arity == -1
    assert KeyBuilder(two, prefix="p", key="t:{a}")._arity == -1
    assert KeyBuilder(two, prefix="p", key=lambda a, b=2: str(a))._arity == -1

    def star(*args: Any) -> None: ...

    assert KeyBuilder(star, prefix="p")._arity == -1


# -- JSON decoding ------------------------------------------------------------------------


def _tree(rnd: random.Random, depth: int = 0) -> Any:
    r = rnd.random()
    if depth < 3 and r < 0.2:
        return [_tree(rnd, depth + 1) for _ in range(rnd.randint(0, 4))]
    if depth < 3 and r < 0.4:
        return {
            "".join(rnd.choice(_CHARS) for _ in range(rnd.randint(0, 5))): _tree(
                rnd, depth + 1
            )
            for _ in range(rnd.randint(0, 4))
        }
    if r < 0.55:
        return "".join(rnd.choice(_CHARS) for _ in range(rnd.randint(0, 12)))
    if r < 0.7:
        return rnd.choice([0, -1, 2**64, -(2**100), rnd.randint(-(10**18), 10**18)])
    if r < 0.9:
        return rnd.choice(
            [
                struct.unpack("<d", rnd.randbytes(8))[0],
                rnd.random() * 10 ** rnd.randint(-320, 308),
                -0.0,
                5e-324,
                math.inf,
                -math.inf,
                math.nan,
            ]
        )
    return rnd.choice([None, True, False])


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@pytest.mark.parametrize("plain", ["default", "stdlib"])
def test_json_fast_decode_equals_the_hooked_stdlib_decode(
    plain: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if plain == "stdlib":  # as without msgspec installed
        monkeypatch.setattr(_serializers, "_PLAIN_JSON", json.loads)
    rnd = random.Random(1313)
    s = JsonSerializer()
    for _ in range(5_000):
        data = s.dumps(_tree(rnd))
        expected = json.loads(data, object_hook=_object_hook)
        assert _same(s.loads(data), expected), data


@pytest.mark.parametrize(
    "data",
    [
        b"NaN",
        b"[Infinity, -Infinity]",
        b"1e400",
        b"\xef\xbb\xbf[1]",  # a BOM
        b'"\\ud800"',  # a lone surrogate
        b'{"\\u0024rc": "tuple", "v": [1, 2]}',  # a tag spelt with an escape
        b'{"$\\u0072c": "set", "v": [1]}',
        b'{"a": {"$rc": "tuple", "v": [1]}}',
        b'"$rc is only text here"',
        b'{"$rc": "x", "v": 1, "w": 2}',  # three keys: not a tag
    ],
)
def test_json_payloads_msgspec_refuses_or_that_hold_tags_decode_as_before(
    data: bytes,
) -> None:
    expected = json.loads(data, object_hook=_object_hook)
    assert _same(JsonSerializer().loads(data), expected)


def test_json_decode_errors_are_still_serialization_errors() -> None:
    from rcache import SerializationError

    for data in (b"[1] x", b'"a\xffb"', b"[" * 5000 + b"]" * 5000, b"1" * 5000):
        with pytest.raises(SerializationError):
            JsonSerializer().loads(data)


def test_json_bytes_are_what_the_previous_encoder_wrote() -> None:
    rnd = random.Random(7)
    for _ in range(2_000):
        value = _tree(rnd)
        old = json.dumps(
            _encode_tree(value), separators=(",", ":"), ensure_ascii=False
        ).encode()
        assert JsonSerializer().dumps(value) == old


def test_msgpack_skips_the_hook_only_without_tags() -> None:
    s = MsgpackSerializer()
    assert s.loads(s.dumps({"a": (1, 2)})) == {"a": (1, 2)}
    assert s.loads(s.dumps({"a": [1, {"b": "$rc"}]})) == {"a": [1, {"b": "$rc"}]}


# -- in-memory metrics ------------------------------------------------------------------


@pytest.mark.parametrize("tally", ["c", "lock"])
def test_in_memory_counts_stay_exact_across_threads(
    tally: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from rcache import _metrics

    if tally == "lock":  # as on an interpreter without the C tally
        monkeypatch.setattr(_metrics, "_TALLY", None)
    m = _metrics.InMemoryMetrics()

    def work() -> None:
        for _ in range(20_000):
            m.cache_get("f", "hit")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.count("cache_gets", "f", "hit") == 160_000


class _Recorder:
    """A sink with the three event methods only (no cache_bypassed)."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def cache_error(self, cache: str, operation: str, error: str) -> None:
        self.events.append(("cache_error", cache, operation, error))

    def cache_get(self, cache: str, result: str) -> None:
        self.events.append(("cache_get", cache, result))

    def cache_load(self, cache: str, result: str, seconds: float) -> None:
        self.events.append(("cache_load", cache, result, seconds))


class _OwnBypass(InMemoryMetrics):
    """Overrides cache_bypassed: its own method must be called (no C shortcut)."""

    def cache_bypassed(self, cache: str, result: str, seconds: float) -> None:
        self.cache_error(cache, "get", "CircuitOpen")
        self.cache_get(cache, "miss")
        self.cache_load(cache, result, seconds)
        self.counts[("own", cache)] += 1


@pytest.mark.parametrize(
    "sink", ["memory", "memory, untimed", "subclass", "prometheus", "three calls"]
)
def test_a_bypassed_call_counts_what_its_three_events_count(sink: str) -> None:
    from prometheus_client import CollectorRegistry

    from rcache.metrics import PrometheusMetrics

    def sinks() -> Any:
        if sink.startswith("memory"):
            return InMemoryMetrics()
        if sink == "subclass":
            return _OwnBypass()
        if sink == "prometheus":
            return PrometheusMetrics(registry=CollectorRegistry())
        return _Recorder()

    def state(m: Any) -> Any:
        if isinstance(m, InMemoryMetrics):
            return dict(m.counts)
        if isinstance(m, _Recorder):
            return m.events
        samples = (s for f in m.registry.collect() for s in f.samples)
        # every series but its creation time
        return [
            (s.name, s.labels, s.value) for s in samples if "_created" not in s.name
        ]

    combined, separate = sinks(), sinks()
    for name, result, seconds in [
        ("f", "success", 0.5),
        ("g", "failure", 2.0),
        ("f", "failure", 0.25),
        ("f", "success", 1.0),
    ]:
        untimed = untimed_bypass(combined, name)
        assert (untimed is not None) == sink.startswith("memory")
        if sink == "memory, untimed" and result == "success":
            untimed()  # type: ignore[misc]
        else:
            bypass_counter(combined)(name, result, seconds)
        if sink == "subclass":
            separate.counts[("own", name)] += 1
        separate.cache_error(name, "get", "CircuitOpen")
        separate.cache_get(name, "miss")
        separate.cache_load(name, result, seconds)
    assert state(combined) == state(separate)
    assert state(combined)  # something was counted


# -- templates ----------------------------------------------------------------------------


def _render_general(t: Any, bound: dict[str, Any]) -> str:
    fixed, plain = t.fixed, t._plain
    t.fixed, t._plain = None, False
    try:
        return str(t.render(bound))
    finally:
        t.fixed, t._plain = fixed, plain


@pytest.mark.parametrize(
    "template",
    ["users", "user:{x}", "{x}", "a:{x}:b:{y}:c", "{x}:{y}", "f:{x!r}", "g:{x:>4}"],
)
def test_template_fast_render_equals_the_general_render(template: str) -> None:
    from rcache._keys import Template

    def outcome(render: Callable[[Any, dict[str, Any]], str], bound: Any) -> Any:
        try:
            return render(t, bound)
        except (ValueError, TypeError) as exc:  # e.g. format(b"x", ">4"), the same
            return type(exc)

    t = Template(template)
    rnd = random.Random(3)
    for _ in range(2_000):
        bound = {"x": _scalar(rnd), "y": _scalar(rnd)}
        assert outcome(Template.render, bound) == outcome(_render_general, bound)
