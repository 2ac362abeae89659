"""Serializers and the versioned value envelope (pure, no IO).

The default serializer is JSON that keeps the Python types common in cached values:
``datetime``, ``date``, ``time``, ``timedelta``, ``UUID``, ``Decimal``, ``bytes``,
``tuple`` (kept apart from ``list``), ``set``/``frozenset`` and dicts whose keys are not
strings. Such values are written as small tagged objects ``{"$rc": tag, "v": ...}``;
a user dict that itself has a ``"$rc"`` key is escaped, so nothing is ambiguous.

Pickle is never used unless asked for, and then only signed with HMAC-SHA256
(``PickleSerializer(secret=...)``): an unsigned pickle in a shared Redis is remote code
execution for anyone who can write to it (beaker #191, cashews #266).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import pickle
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

from rcache._exceptions import ConfigurationError, SerializationError

__all__ = [
    "Envelope",
    "JsonSerializer",
    "MsgpackSerializer",
    "PickleSerializer",
    "Serializer",
    "decode_envelope",
    "encode_envelope",
    "resolve_serializer",
]


@runtime_checkable
class Serializer(Protocol):
    """Turns values into bytes and back.

    ``name`` is stored (as a short id) in every envelope so that values written by one
    serializer are read as misses, not garbage, by another.
    """

    name: str

    def dumps(self, value: Any) -> bytes:
        """Encode ``value``; raise ``TypeError`` for a type it cannot keep."""
        ...

    def loads(self, data: bytes) -> Any:
        """Decode what :meth:`dumps` wrote."""
        ...


_TAG = "$rc"


class _Unsupported(TypeError):
    pass


def _encode_tree(obj: Any) -> Any:
    """Return a JSON-able tree for ``obj``, tagging the types plain JSON would change."""
    t = type(obj)
    if t is str or t is int or t is float or t is bool or obj is None:
        return obj
    if t is list:
        return [_encode_tree(x) for x in obj]
    if t is dict:
        if all(type(k) is str for k in obj) and _TAG not in obj:
            return {k: _encode_tree(v) for k, v in obj.items()}
        return {
            _TAG: "dict",
            "v": [[_encode_tree(k), _encode_tree(v)] for k, v in obj.items()],
        }
    if t is tuple:
        return {_TAG: "tuple", "v": [_encode_tree(x) for x in obj]}
    if t is dt.datetime:
        return {_TAG: "dt", "v": obj.isoformat()}
    if t is dt.date:
        return {_TAG: "date", "v": obj.isoformat()}
    if t is dt.time:
        return {_TAG: "time", "v": obj.isoformat()}
    if t is dt.timedelta:
        return {_TAG: "td", "v": [obj.days, obj.seconds, obj.microseconds]}
    if t is uuid.UUID:
        return {_TAG: "uuid", "v": obj.hex}
    if t is Decimal:
        return {_TAG: "dec", "v": str(obj)}
    if t is bytes:
        return {_TAG: "b", "v": base64.b64encode(obj).decode("ascii")}
    if t is set or t is frozenset:
        items = [_encode_tree(x) for x in obj]
        try:  # a stable order makes equal sets encode equally (keys use this encoder)
            items.sort(key=lambda x: json.dumps(x, sort_keys=True))
        except TypeError:
            pass
        return {_TAG: "set" if t is set else "fset", "v": items}
    # Subclasses of the plain types (IntEnum, str Enum, NamedTuple, ...) would come back as
    # their base type; refuse rather than change the type silently.
    raise _Unsupported(t)


def _tree(value: Any, fmt: str) -> Any:
    """``_encode_tree(value)``, its failures as SerializationError (JSON and msgpack)."""
    try:
        return _encode_tree(value)
    except _Unsupported as exc:
        raise SerializationError(
            f"cannot serialize a value of type {exc.args[0].__qualname__} to {fmt}"
        ) from None
    except RecursionError:
        raise SerializationError("cannot serialize a self-referencing value") from None


def _tuple(v: Any) -> Any:
    return tuple(v)


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "dict": lambda v: dict(v),
    "tuple": _tuple,
    "dt": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "td": lambda v: dt.timedelta(days=v[0], seconds=v[1], microseconds=v[2]),
    "uuid": uuid.UUID,
    "dec": Decimal,
    "b": base64.b64decode,
    "set": set,
    "fset": frozenset,
}


def _plain_json() -> Callable[[bytes], Any]:
    """A JSON decoder for payloads without tagged objects: msgspec's when installed
    (the ``fast`` extra; about 5x the standard library on a small dict), else
    ``json.loads`` (its cached decoder: no ``object_hook`` to build per call).
    Resolved on first use, so ``import rcache`` does not import msgspec."""
    global _PLAIN_JSON
    try:
        import msgspec
    except ImportError:
        _PLAIN_JSON = json.loads
    else:
        _PLAIN_JSON = msgspec.json.Decoder().decode
    return _PLAIN_JSON


_PLAIN_JSON: Callable[[bytes], Any] | None = None


def _object_hook(d: dict[str, Any]) -> Any:
    tag = d.get(_TAG)
    if tag is None or len(d) != 2:
        return d
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise SerializationError("unknown JSON tag")  # no text from the data
    return decoder(d["v"])


#: what json.dumps(tree, separators=(",", ":"), ensure_ascii=False) builds per call
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


class JsonSerializer:
    """JSON that round-trips the common Python value types (see module docstring)."""

    name = "json"

    def dumps(self, value: Any) -> bytes:
        if _PLAIN_JSON is None:
            # Resolve the fast decoder (importing msgspec: tens of ms) on the first
            # write, which a computation pays for anyway, rather than on the first hit
            # (the demo's first hit showed 78 ms).
            _plain_json()
        tree = _tree(value, "JSON")
        try:
            return _ENCODER.encode(tree).encode()
        except (ValueError, TypeError, RecursionError) as exc:
            # e.g. an int over sys.get_int_max_str_digits() (4,300) digits: ValueError
            # (issue 14 item 9); the message would quote the value, so only its type
            raise SerializationError(
                f"cannot serialize this value to JSON ({type(exc).__name__})"
            ) from None

    def loads(self, data: bytes) -> Any:
        # No tagged object can be in there? A "$rc" key is written as is (the encoder
        # escapes no "$"); any \u escape (a control character, or JSON from another
        # writer) could spell one. Then a decode without the hook is exact. msgspec
        # refuses a few things the standard library reads (NaN, Infinity, 1e400, a
        # BOM) and decodes the rest to the same values; what it refuses, json decides.
        if type(data) is bytes and b"$rc" not in data and b"\\u" not in data:
            try:
                return (_PLAIN_JSON or _plain_json())(data)
            except Exception:
                pass
        try:
            return json.loads(data, object_hook=_object_hook)
        except SerializationError:
            raise
        except Exception as exc:
            # never put the exception's text here: fromisoformat() and friends quote
            # the stored value, and this message is logged (issue 14 item 13)
            raise SerializationError(
                f"cannot decode JSON value ({type(exc).__name__})"
            ) from None


class MsgpackSerializer:
    """msgpack (extra ``fast``): smaller than JSON; keeps the same types as JsonSerializer."""

    name = "msgpack"

    def __init__(self) -> None:
        try:
            import msgpack
        except ImportError:
            raise ConfigurationError(
                'serializer="msgpack" needs msgpack: pip install "rcache-redis[fast]"'
            ) from None
        self._msgpack = msgpack

    def dumps(self, value: Any) -> bytes:
        tree = _tree(value, "msgpack")
        try:
            return bytes(self._msgpack.packb(tree, use_bin_type=True))
        except Exception as exc:  # OverflowError for ints beyond 64 bits, ...
            raise SerializationError(
                f"cannot serialize this value to msgpack ({type(exc).__name__})"
            ) from None

    def loads(self, data: bytes) -> Any:
        try:
            if type(data) is bytes and b"$rc" not in data:
                # no tag key (msgpack has no escapes): the hook would return every
                # map unchanged, so skip its call per map
                return self._msgpack.unpackb(data, raw=False)
            return self._msgpack.unpackb(data, raw=False, object_hook=_object_hook)
        except SerializationError:
            raise
        except Exception as exc:  # type only: the text may quote the value (item 13)
            raise SerializationError(
                f"cannot decode msgpack value ({type(exc).__name__})"
            ) from None


class PickleSerializer:
    """Pickle, signed with HMAC-SHA256: only for caches no untrusted party can write to.

    ``secret`` is required: a ``str`` or ``bytes`` of at least 32 bytes (HMAC-SHA256's
    block of entropy). Values whose signature does not match (tampered, or written with
    another secret) are refused and read as misses. Pass several secrets as
    ``secret=[new, old]`` to rotate: the first signs, all verify.

    :raises ConfigurationError: for a missing (``None``, e.g. an unset environment
        variable), short or non-text secret. ``bytes(32)`` would be 32 NUL bytes, so an
        ``int`` is refused, not taken as a length (issue 14 item 12).
    """

    name = "pickle"
    _DIGEST = 32
    _MIN_SECRET = 32

    def __init__(self, secret: str | bytes | list[str | bytes]) -> None:
        items = list(secret) if isinstance(secret, (list, tuple)) else [secret]
        hint = (
            "e.g. PickleSerializer(secret=os.environ['RCACHE_SECRET']) with a random "
            'value such as python -c "import secrets; print(secrets.token_hex(32))"'
        )
        if not items:
            raise ConfigurationError(f"PickleSerializer needs a secret= ({hint})")
        keys: list[bytes] = []
        for item in items:
            if item is None:
                raise ConfigurationError(
                    "PickleSerializer got secret=None (an unset environment variable?): "
                    f"pass a str or bytes of at least {self._MIN_SECRET} bytes, {hint}"
                )
            if isinstance(item, str):
                key = item.encode()
            elif isinstance(item, bytes):
                key = item
            else:
                raise ConfigurationError(
                    f"PickleSerializer secret= takes str or bytes (or a list of them "
                    f"to rotate), got {type(item).__name__}: {hint}"
                )
            if len(key) < self._MIN_SECRET:
                raise ConfigurationError(
                    f"PickleSerializer needs a secret of at least {self._MIN_SECRET} "
                    f"bytes, got {len(key)}: {hint}"
                )
            keys.append(key)
        self._keys = keys

    def dumps(self, value: Any) -> bytes:
        try:
            payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle this value ({type(exc).__name__})"
            ) from None
        return self._sign(payload)

    def _sign(self, payload: bytes) -> bytes:
        """The stored form: HMAC-SHA256 of ``payload`` under the first secret, then it."""
        return hmac.new(self._keys[0], payload, hashlib.sha256).digest() + payload

    def loads(self, data: bytes) -> Any:
        sig, payload = data[: self._DIGEST], data[self._DIGEST :]
        for key in self._keys:
            if hmac.compare_digest(
                sig, hmac.new(key, payload, hashlib.sha256).digest()
            ):
                return pickle.loads(payload)
        raise SerializationError("pickle signature mismatch: value refused")


def resolve_serializer(spec: str | Serializer | None) -> Serializer:
    """Return a serializer for ``"json"``, ``"msgpack"`` or a Serializer instance."""
    if spec is None or spec == "json":
        return JsonSerializer()
    if spec == "msgpack":
        return MsgpackSerializer()
    if spec == "pickle":
        raise ConfigurationError(
            'serializer="pickle" is unsafe unsigned: write '
            "serializer=rcache.PickleSerializer(secret=...) to opt in"
        )
    if isinstance(spec, str):
        raise ConfigurationError(
            f"unknown serializer {spec!r}: write serializer='json', 'msgpack' or a "
            "Serializer instance"
        )
    if not isinstance(spec, Serializer):
        raise ConfigurationError(
            "serializer= must be 'json', 'msgpack' or an object with name, dumps() and loads()"
        )
    return spec


# -- envelope -------------------------------------------------------------------------
#
# b"rc" | version:u8 | flags:u8 | created_at:f64 | compute_time:f32 | fresh_until:f64 |
# stamp_len:u8 | stamp | serializer name len:u8 | serializer name | payload
#
# Fixed-width header parsed with one struct.unpack_from: decoding costs well under a
# microsecond on the hit path. fresh_until is the logical expiry (the Redis TTL may be
# longer to keep a stale copy); stamp is the digest of the tag/function version stamps
# the value was computed under (issue 3).

_MAGIC = b"rc"
_VERSION = 1
_HEADER = struct.Struct("<2sBBdfdB")
FLAG_NONE = 1  # the cached value is None (kept apart from a miss)


@dataclass(slots=True)
class Envelope:
    """A decoded entry: its value and what the freshness decisions read.

    Read-only by convention, not ``frozen``: a frozen dataclass's ``__init__`` sets
    each field through ``object.__setattr__``, which doubles its cost on the hit path.
    """

    value: Any
    created_at: float
    compute_time: float
    fresh_until: float
    stamp: bytes


def encode_envelope(
    serializer: Serializer,
    value: Any,
    *,
    compute_time: float = 0.0,
    fresh_for: float,
    stamp: bytes = b"",
    now: float | None = None,
) -> bytes:
    now = time.time() if now is None else now
    flags = 0
    if value is None:
        flags, payload = FLAG_NONE, b""
    else:
        try:
            payload = serializer.dumps(value)
        except SerializationError:
            raise
        except Exception as exc:  # a third-party serializer may raise anything (item 9)
            raise SerializationError(
                f"serializer {serializer.name!r} failed ({type(exc).__name__})"
            ) from None
    name = serializer.name.encode()
    header = _HEADER.pack(
        _MAGIC, _VERSION, flags, now, compute_time, now + fresh_for, len(stamp)
    )
    return b"".join((header, stamp, bytes((len(name),)), name, payload))


class UndecodableError(SerializationError):
    """The bytes in Redis are not an envelope this version and serializer can read.

    ``reason`` is a short, value-free description for logs: the name of the error
    that stopped decoding, never its text (which may quote the stored value).
    """

    reason: str = "corrupt"


_HEADER_SIZE = _HEADER.size


def decode_envelope(serializer: Serializer, data: bytes) -> Envelope:
    """Decode ``data``; raise UndecodableError for anything foreign or corrupt."""
    try:
        magic, version, flags, created, compute, fresh_until, slen = (
            _HEADER.unpack_from(data)
        )
    except struct.error:
        raise _undecodable("not an rcache envelope (too short)", "short") from None
    if magic != _MAGIC or version != _VERSION:
        raise _undecodable("not an rcache envelope of a known version", "version")
    pos = _HEADER_SIZE + slen
    stamp = data[_HEADER_SIZE:pos]
    nlen = data[pos] if pos < len(data) else 0
    name = data[pos + 1 : pos + 1 + nlen]
    pos += 1 + nlen
    if name != serializer.name.encode():
        raise _undecodable(
            f"value written by serializer {name.decode(errors='replace')!r}, "
            f"cache uses {serializer.name!r}",
            "other serializer",
        )
    if flags & FLAG_NONE:
        value = None
    else:
        try:
            value = serializer.loads(data[pos:])
        except Exception as exc:  # a third-party serializer may raise anything
            # the innermost error's type, not its text: a custom serializer may quote
            # the value in its message
            cause = exc.__context__ if isinstance(exc, SerializationError) else exc
            raise _undecodable(
                f"{type(cause or exc).__name__} while decoding",
                type(cause or exc).__name__,
            ) from None
    return Envelope(value, created, compute, fresh_until, bytes(stamp))


def _undecodable(message: str, reason: str) -> UndecodableError:
    exc = UndecodableError(message)
    exc.reason = reason
    return exc
