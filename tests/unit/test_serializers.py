from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest

from rcache import (
    ConfigurationError,
    JsonSerializer,
    MsgpackSerializer,
    PickleSerializer,
    SerializationError,
)
from rcache._serializers import (
    UndecodableError,
    decode_envelope,
    encode_envelope,
    resolve_serializer,
)

VALUES: list[Any] = [
    {"a": 1, "b": [1, 2.5, "x", None, True]},
    (1, 2, (3, 4)),
    [1, (2, 3)],
    {1: "int key", "1": "str key", (1, 2): "tuple key"},
    dt.datetime(2024, 11, 1, 12, 30, 5, 123, tzinfo=dt.timezone.utc),
    dt.datetime(2024, 11, 1, 12, 30),
    dt.date(2024, 11, 1),
    dt.time(12, 30),
    dt.timedelta(days=1, seconds=5, microseconds=7),
    uuid.UUID(int=12345),
    Decimal("1.10"),
    b"\x00\xffbytes",
    {1, 2, 3},
    frozenset({"a"}),
    {"$rc": "user data that looks like a tag", "v": 1},
    "",
    0,
]


@pytest.mark.parametrize("serializer", [JsonSerializer(), MsgpackSerializer()])
@pytest.mark.parametrize("value", VALUES)
def test_round_trip_keeps_types(serializer: Any, value: Any) -> None:
    back = serializer.loads(serializer.dumps(value))
    assert back == value
    assert type(back) is type(value)


def test_unserializable_value_names_the_type() -> None:
    class Thing:
        pass

    with pytest.raises(SerializationError, match="Thing"):
        JsonSerializer().dumps({"x": Thing()})


def test_pickle_requires_a_secret_and_verifies() -> None:
    with pytest.raises(ConfigurationError, match="secret"):
        PickleSerializer(secret="short")
    with pytest.raises(ConfigurationError, match="PickleSerializer"):
        resolve_serializer("pickle")
    a = PickleSerializer(secret="a" * 32)
    b = PickleSerializer(secret="b" * 32)
    data = a.dumps({"x": object.__name__})
    assert a.loads(data) == {"x": "object"}
    with pytest.raises(SerializationError, match="signature"):
        b.loads(data)
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(SerializationError):
        a.loads(tampered)
    rotated = PickleSerializer(secret=["c" * 32, "a" * 32])
    assert rotated.loads(data) == {"x": "object"}


def test_unknown_serializer_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="json"):
        resolve_serializer("yaml")


def test_envelope_round_trip_and_metadata() -> None:
    s = JsonSerializer()
    data = encode_envelope(
        s, {"a": 1}, compute_time=0.25, fresh_for=60, stamp=b"ab", now=1000.0
    )
    env = decode_envelope(s, data)
    assert env.value == {"a": 1}
    assert env.created_at == 1000.0
    assert env.compute_time == pytest.approx(0.25)
    assert env.fresh_until == 1060.0
    assert env.stamp == b"ab"


def test_none_is_distinct_from_a_miss() -> None:
    s = JsonSerializer()
    assert decode_envelope(s, encode_envelope(s, None, fresh_for=1)).value is None


@pytest.mark.parametrize("raw", [b"", b"garbage", b"rc\x09" + b"\x00" * 40])
def test_foreign_bytes_are_undecodable(raw: bytes) -> None:
    with pytest.raises(UndecodableError):
        decode_envelope(JsonSerializer(), raw)


def test_other_serializer_reads_as_undecodable() -> None:
    data = encode_envelope(MsgpackSerializer(), [1], fresh_for=1)
    with pytest.raises(UndecodableError, match="msgpack"):
        decode_envelope(JsonSerializer(), data)


def test_corrupt_payload_is_undecodable() -> None:
    s = JsonSerializer()
    data = encode_envelope(s, {"a": 1}, fresh_for=1)
    with pytest.raises(UndecodableError):
        decode_envelope(s, data[:-2])


# -- issue 14 items 9 and 12 --------------------------------------------------------------


@pytest.mark.parametrize("serializer", [JsonSerializer(), MsgpackSerializer()])
def test_every_encode_failure_is_a_serialization_error(serializer: Any) -> None:
    for value in (10**5000, {"n": [10**5000]}, 2**70):
        if isinstance(serializer, JsonSerializer) and value == 2**70:
            continue  # JSON has no 64-bit limit
        with pytest.raises(SerializationError) as info:
            serializer.dumps(value)
        assert "0000" not in str(info.value)  # no part of the value in the message


def test_every_decode_failure_is_undecodable() -> None:
    s = JsonSerializer()
    for payload in (b'{"n": 1' + b"1" * 5000 + b"}", b'{"$rc":"dt","v":"SECRETVALUE"}'):
        data = encode_envelope(s, "x", fresh_for=1)
        data = data[: -len(b'"x"')] + payload
        with pytest.raises(UndecodableError) as info:
            decode_envelope(s, data)
        assert "SECRETVALUE" not in str(info.value)
        assert info.value.reason == "ValueError"


def test_third_party_serializer_errors_are_mapped() -> None:
    class Odd:
        name = "odd"

        def dumps(self, value: Any) -> bytes:
            raise OverflowError(f"cannot {value}")

        def loads(self, data: bytes) -> Any:
            raise KeyError(data)

    with pytest.raises(SerializationError, match="OverflowError"):
        encode_envelope(Odd(), "SECRET", fresh_for=1)


@pytest.mark.parametrize(
    ("secret", "match"),
    [
        (32, "str or bytes"),  # bytes(32) would be 32 NUL bytes
        (None, "secret=None"),
        ("", "at least 32"),
        ("x" * 31, "at least 32"),
        (b"y" * 16, "at least 32"),
        (["x" * 32, 32], "str or bytes"),
        (["x" * 32, None], "secret=None"),
        ([], "needs a secret"),
        (bytearray(b"z" * 40), "str or bytes"),
    ],
)
def test_pickle_secret_must_be_long_text(secret: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        PickleSerializer(secret=secret)


def test_pickle_secret_rotation_and_bytes() -> None:
    old = PickleSerializer(secret=b"o" * 32)
    new = PickleSerializer(secret=["n" * 32, b"o" * 32])
    assert new.loads(old.dumps({"a": 1})) == {"a": 1}
    assert new.loads(new.dumps((1,))) == (1,)
