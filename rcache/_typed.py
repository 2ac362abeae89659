"""Typed values: a cached function's return annotation drives how its values decode.

``-> User`` (a dataclass, ``NamedTuple``, ``TypedDict``, ``Enum``, Pydantic v2 model or
msgspec ``Struct``) and containers of them (``list[User]``, ``dict[str, User]``,
``User | None``) are stored as plain JSON and come back as the annotated type, not a
dict. The work is done by a library that already does it well, imported only when such
an annotation is seen, so ``import rcache`` stays light:

* Pydantic's ``TypeAdapter`` when the annotation involves a Pydantic model;
* otherwise msgspec when installed (it decodes a 5-field dataclass in ~0.7 µs against
  Pydantic's ~1.5 µs on the benchmark machine, and both beat the tagged JSON of an
  untyped value, ~11 µs for the same fields as a dict), else Pydantic.

Unannotated functions and plain annotations (``dict``, ``int``, ``list[str]``, ``Any``)
keep the untyped path. An annotation naming a class neither library can decode fails
at decoration time. Only the tree serializers (JSON, msgpack) are wrapped: pickle
already keeps types, and a custom serializer is the user's to define.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import sys
import types
import typing
import uuid
from collections import abc
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from rcache._exceptions import ConfigurationError, SerializationError
from rcache._serializers import JsonSerializer, MsgpackSerializer, Serializer

__all__ = ["LazyTyped", "TypedValues", "caller_namespace", "typed_values"]

_PLAIN: frozenset[Any] = frozenset(
    {
        Any,
        object,
        None,
        type(None),
        int,
        float,
        str,
        bool,
        bytes,
        dict,
        list,
        tuple,
        set,
        frozenset,
        dt.datetime,
        dt.date,
        dt.time,
        dt.timedelta,
        uuid.UUID,
        Decimal,
    }
)
#: generic origins whose arguments decide: list[int] is plain, list[User] typed
_CONTAINERS: frozenset[Any] = frozenset(
    {
        list,
        dict,
        tuple,
        set,
        frozenset,
        typing.Union,
        types.UnionType,
        typing.Literal,
        typing.Annotated,
        abc.Mapping,
        abc.MutableMapping,
        abc.Sequence,
        abc.MutableSequence,
        abc.Set,
        abc.MutableSet,
        abc.Collection,
        abc.Iterable,
    }
)
_NO_ANNOTATION: Any = object()


def _is_pydantic(tp: Any) -> bool:
    pydantic = sys.modules.get("pydantic")  # a model's module has imported it already
    return (
        pydantic is not None
        and isinstance(tp, type)
        and issubclass(tp, pydantic.BaseModel)
    )


def _is_struct(tp: Any) -> bool:
    msgspec = sys.modules.get("msgspec")
    return (
        msgspec is not None and isinstance(tp, type) and issubclass(tp, msgspec.Struct)
    )


def _structured(tp: Any) -> bool:
    return isinstance(tp, type) and (
        dataclasses.is_dataclass(tp)
        or (issubclass(tp, tuple) and hasattr(tp, "_fields"))  # NamedTuple
        or typing.is_typeddict(tp)
        or issubclass(tp, enum.Enum)
        or _is_pydantic(tp)
        or _is_struct(tp)
    )


def _scan(tp: Any, found: dict[str, Any]) -> None:
    """Record in ``found`` whether ``tp`` holds structured types, Pydantic models or a
    type nothing here can decode (the first such, for the error message)."""
    if isinstance(tp, typing.TypeVar) or tp is Ellipsis:
        return
    if _hashable(tp) and tp in _PLAIN:
        return
    origin = typing.get_origin(tp)
    if origin is not None:
        if _is_pydantic(origin):  # a generic model: Page[User]
            found["structured"] = found["pydantic"] = True
            return
        if origin in _CONTAINERS:
            args = typing.get_args(tp)
            if origin is typing.Literal:
                return
            if origin is typing.Annotated:
                args = args[:1]
            for arg in args:
                _scan(arg, found)
            return
        found.setdefault("bad", tp)
        return
    if _structured(tp):
        found["structured"] = True
        if _is_pydantic(tp):
            found["pydantic"] = True
        return
    if isinstance(tp, (str, typing.ForwardRef)):
        found.setdefault("unresolved", tp)
        return
    found.setdefault("bad", tp)


def _hashable(tp: Any) -> bool:
    try:
        hash(tp)
    except TypeError:
        return False
    return True


def caller_namespace() -> dict[str, Any] | None:
    """Locals of the frame that applied the decorator (classes defined in a function)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        "rcache."
    ):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None or frame.f_locals is frame.f_globals:
        return None  # module level: get_type_hints reads the function's globals
    return dict(frame.f_locals)


def return_annotation(fn: Callable[..., Any], localns: dict[str, Any] | None) -> Any:
    """The resolved return annotation; _NO_ANNOTATION if there is none; raises
    NameError for a name that cannot be resolved (yet)."""
    raw = getattr(fn, "__annotations__", {}).get("return", _NO_ANNOTATION)
    if raw is _NO_ANNOTATION:
        return _NO_ANNOTATION
    hints = typing.get_type_hints(fn, localns=localns)
    return hints.get("return", _NO_ANNOTATION)


def _codec_error(tp: Any) -> str:
    return getattr(tp, "__qualname__", None) or repr(tp)


class TypedValues:
    """Encoders and decoders for one return annotation, built at decoration time."""

    def __init__(self, tp: Any, owner: str, uses_pydantic: bool) -> None:
        self.tp = tp
        self.owner = owner
        self.backend = ""
        self._json: Serializer | None = None
        self._wrapped: dict[int, tuple[Serializer, Serializer]] = {}
        errors: list[str] = []
        if not uses_pydantic:
            try:
                self._build_msgspec()
            except ImportError:
                pass
            except TypeError as exc:  # e.g. a union of two dataclasses
                errors.append(f"msgspec: {exc}")
        if not self.backend:
            try:
                self._build_pydantic()
            except ImportError:
                pass
            except Exception as exc:  # PydanticSchemaGenerationError and kin
                errors.append(f"pydantic: {type(exc).__name__}: {exc}")
        if not self.backend:
            why = "; ".join(errors) or "neither msgspec nor pydantic is installed"
            raise ConfigurationError(
                f"{owner} is annotated -> {_codec_error(tp)}, which rcache decodes "
                f"with msgspec or Pydantic ({why}): "
                'pip install "rcache-redis[typed]" (msgspec) or pydantic, or annotate '
                "a plain type such as -> dict"
            )

    def _build_msgspec(self) -> None:
        import msgspec

        tp = self.tp
        encoder = msgspec.json.Encoder()
        decoder = msgspec.json.Decoder(tp)  # TypeError now if msgspec cannot
        owner = self.owner

        def dumps(value: Any) -> bytes:
            try:
                return encoder.encode(value)
            except (TypeError, msgspec.EncodeError) as exc:
                raise SerializationError(
                    f"{owner}: cannot encode a {type(value).__qualname__}: {exc}"
                ) from None

        def loads(data: bytes) -> Any:
            try:
                return decoder.decode(data)
            except msgspec.DecodeError as exc:
                raise SerializationError(f"{owner}: not a {tp!r}: {exc}") from None

        def to_tree(value: Any) -> Any:
            try:
                return msgspec.to_builtins(value)
            except (TypeError, msgspec.EncodeError) as exc:
                raise SerializationError(
                    f"{owner}: cannot encode a {type(value).__qualname__}: {exc}"
                ) from None

        def from_tree(tree: Any) -> Any:
            try:
                return msgspec.convert(tree, tp, strict=False)
            except msgspec.ValidationError as exc:
                raise SerializationError(f"{owner}: not a {tp!r}: {exc}") from None

        self._set("msgspec", dumps, loads, to_tree, from_tree)

    def _build_pydantic(self) -> None:
        import pydantic

        tp = self.tp
        adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(tp)
        owner = self.owner
        # ValidationError and PydanticSerializationError are ValueErrors
        bad = (ValueError, TypeError)

        def dumps(value: Any) -> bytes:
            try:
                return adapter.dump_json(value, warnings="error")
            except bad as exc:
                raise SerializationError(
                    f"{owner}: cannot encode a {type(value).__qualname__} as "
                    f"{_codec_error(tp)}: {exc}"
                ) from None

        def loads(data: bytes) -> Any:
            try:
                return adapter.validate_json(data)
            except bad as exc:
                raise SerializationError(f"{owner}: not a {tp!r}: {exc}") from None

        def to_tree(value: Any) -> Any:
            try:
                return adapter.dump_python(value, mode="json", warnings="error")
            except bad as exc:
                raise SerializationError(
                    f"{owner}: cannot encode a {type(value).__qualname__}: {exc}"
                ) from None

        def from_tree(tree: Any) -> Any:
            try:
                return adapter.validate_python(tree)
            except bad as exc:
                raise SerializationError(f"{owner}: not a {tp!r}: {exc}") from None

        self._set("pydantic", dumps, loads, to_tree, from_tree)

    def _set(
        self,
        backend: str,
        dumps: Callable[[Any], bytes],
        loads: Callable[[bytes], Any],
        to_tree: Callable[[Any], Any],
        from_tree: Callable[[Any], Any],
    ) -> None:
        self.backend = backend
        self._json = _Codec("json", dumps, loads)
        self._to_tree = to_tree
        self._from_tree = from_tree

    def serializer(self, base: Serializer) -> Serializer:
        """The serializer for this function's values under the cache's ``base``."""
        hit = self._wrapped.get(id(base))
        if hit is not None and hit[0] is base:
            return hit[1]
        wrapped: Serializer
        if type(base) is JsonSerializer:
            assert self._json is not None
            wrapped = self._json  # plain JSON bytes, decoded by the typed library
        elif isinstance(base, MsgpackSerializer):
            to_tree, from_tree = self._to_tree, self._from_tree
            wrapped = _Codec(
                base.name,
                lambda v: base.dumps(to_tree(v)),
                lambda b: from_tree(base.loads(b)),
            )
        else:
            wrapped = base  # pickle keeps types; a custom serializer is the user's
        self._wrapped[id(base)] = (base, wrapped)
        return wrapped


class _Codec:
    __slots__ = ("dumps", "loads", "name")

    def __init__(
        self, name: str, dumps: Callable[[Any], bytes], loads: Callable[[bytes], Any]
    ) -> None:
        self.name = name
        self.dumps = dumps
        self.loads = loads


class LazyTyped:
    """A return annotation that names a class not defined yet at decoration time (a
    method returning its own class): resolved at the first call instead."""

    def __init__(
        self, fn: Callable[..., Any], owner: str, localns: dict[str, Any] | None
    ) -> None:
        self._fn = fn
        self._owner = owner
        self._localns = localns
        self._typed: TypedValues | _Unset | None = _UNSET

    def serializer(self, base: Serializer) -> Serializer:
        typed = self._typed
        if isinstance(typed, _Unset):
            typed = self._typed = _resolve(
                self._fn, self._owner, base, self._localns, defer=False
            )
        return base if typed is None else typed.serializer(base)


class _Unset:
    pass


_UNSET = _Unset()


def typed_values(
    fn: Callable[..., Any],
    owner: str,
    base: Serializer,
    localns: dict[str, Any] | None,
) -> TypedValues | LazyTyped | None:
    """What decodes ``fn``'s values: None when its return annotation is plain or absent.

    :raises ConfigurationError: the annotation names a type that cannot be decoded
        (under the JSON or msgpack serializer).
    """
    typed: TypedValues | LazyTyped | None = _resolve(
        fn, owner, base, localns, defer=True
    )
    return typed


def _resolve(
    fn: Callable[..., Any],
    owner: str,
    base: Serializer,
    localns: dict[str, Any] | None,
    *,
    defer: bool,
) -> Any:
    try:
        tp = return_annotation(fn, localns)
    except NameError as exc:
        if defer:
            return LazyTyped(fn, owner, localns)
        raise ConfigurationError(
            f"cannot resolve the return annotation of {owner} ({exc}); rcache decodes "
            "cached values as that type: import it at run time (not only under "
            "`if TYPE_CHECKING:`), or annotate a plain type such as -> dict"
        ) from None
    except TypeError:  # not a function (a callable object, a partial): untyped
        return None
    if tp is _NO_ANNOTATION:
        return None
    found: dict[str, Any] = {}
    _scan(tp, found)
    tree_serializer = isinstance(base, (JsonSerializer, MsgpackSerializer))
    if "bad" in found and tree_serializer:
        bad = found["bad"]
        raise ConfigurationError(
            f"{owner} is annotated -> {_codec_error(tp)}, and {_codec_error(bad)} is "
            f"not a type the {base.name} serializer can store: return a dataclass, "
            "NamedTuple, TypedDict, Enum, Pydantic model or plain data (dict, list, "
            "str, int, ...), or use serializer=rcache.PickleSerializer(secret=...)"
        )
    if not found.get("structured") or "bad" in found:
        return None
    return TypedValues(tp, owner, bool(found.get("pydantic")))
