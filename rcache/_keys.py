"""Canonical, collision-free cache keys (pure, no IO).

A key is built from the function's full qualified name and its arguments *bound to the
signature with defaults applied*, so ``f(1, b=2)``, ``f(1, 2)`` and ``f(1)`` (when
``b=2`` is the default) share one key. Arguments are encoded type-preservingly as JSON:
``f(1)`` and ``f("1")`` differ, and so do ``f("a b")`` and ``f("a", "b")`` (dogpile
joins arguments with spaces; cashews formats them with ``str()``).

Redis key layout (``prefix`` defaults to ``"rcache"``)::

    {prefix}:c:{module.qualname}:{args}      value of a decorated function
    {prefix}:c:{module.qualname}:h:{digest}  same, when the encoded args are long
    {prefix}:k:{key}                         explicit keys and key= templates
    {prefix}:s:{name}                        version stamps (per function, per tag)
    {prefix}:l:{{name}}[:aux]                locks; aux keys share the slot by hash tag

``{args}`` is the canonical JSON of the bound arguments (it always starts with ``[``), so
it can never collide with the ``h:`` form or with another function's keys.
"""

from __future__ import annotations

import enum
import hashlib
import inspect
import json
import string
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from rcache._exceptions import ConfigurationError
from rcache._serializers import _encode_tree, _Unsupported

__all__ = ["KeyBuilder", "qualified_name"]

_MAX_PLAIN = 96  # longer encoded arguments are hashed (blake2b-128, hex)
_SAFE = set(string.printable) - set(" \t\n\r\x0b\x0c")


def qualified_name(fn: Callable[..., Any]) -> str:
    """``module.QualName`` of ``fn``, the namespace of its cache keys."""
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if qualname is None:
        qualname = type(fn).__qualname__
    return f"{module}.{qualname}"


def _key_tree(obj: Any) -> Any:
    """Like the JSON value encoder, plus classes, enums and ``__rcache_key__``."""
    t = type(obj)
    if t is str or t is int or t is float or t is bool or obj is None:
        return obj
    if t is list:
        return [_key_tree(x) for x in obj]
    if t is tuple:
        return {"$rc": "tuple", "v": [_key_tree(x) for x in obj]}
    if t is dict:
        if all(type(k) is str for k in obj) and "$rc" not in obj:
            return {k: _key_tree(v) for k, v in obj.items()}  # dumps sorts the keys
        pairs = [[_key_tree(k), _key_tree(v)] for k, v in obj.items()]
        pairs.sort(key=lambda kv: json.dumps(kv, sort_keys=True))
        return {"$rc": "dict", "v": pairs}
    if isinstance(obj, type):
        return {"$rc": "type", "v": qualified_name(obj)}
    if isinstance(obj, enum.Enum):
        return {"$rc": "enum", "v": [qualified_name(t), obj.name]}
    hook = getattr(obj, "__rcache_key__", None)
    if hook is not None:
        return {"$rc": "obj", "v": [qualified_name(t), _key_tree(hook())]}
    return _encode_tree(obj)


class KeyBuilder:
    """Compiled at decoration time; ``build(args, kwargs)`` runs on every call."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        prefix: str,
        key: str | Callable[..., str] | None = None,
        ignore: Iterable[str] = (),
        name: str | None = None,
    ) -> None:
        self.fn = fn
        self.name = name or qualified_name(fn)
        try:
            self.signature = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"cannot read the signature of {self.name}: {exc}; pass key= a callable"
            ) from None
        params = self.signature.parameters
        self.ignore = frozenset(ignore)
        if isinstance(ignore, str):
            raise ConfigurationError(
                f"ignore= takes a sequence of names: write ignore=({ignore!r},)"
            )
        unknown = sorted(self.ignore - set(params))
        if unknown:
            raise ConfigurationError(
                f"ignore= names {unknown} that {self.name} does not take; "
                f"its parameters are {list(params)}"
            )
        self._names = list(params)
        self._kinds = {n: p.kind for n, p in params.items()}
        self._defaults = {
            n: p.default
            for n, p in params.items()
            if p.default is not inspect.Parameter.empty
        }
        # The fast binder handles the common shape (no *args/**kwargs, no positional-only
        # quirks); anything else goes through inspect.Signature.bind.
        self._simple = all(
            p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params.values()
        )
        self._n_positional = sum(
            p.kind is p.POSITIONAL_OR_KEYWORD for p in params.values()
        )
        self._template: str | None = None
        self._key_fn: Callable[..., str] | None = None
        self.rebase(prefix)
        if key is None:
            pass
        elif isinstance(key, str):
            self._template = key
            self.check_template(key)
        elif callable(key):
            self._key_fn = key
        else:
            raise ConfigurationError(
                f"key= must be a template string like 'user:{{user_id}}' or a callable, "
                f"got {type(key).__name__}"
            )

    def rebase(self, prefix: str) -> None:
        """Build keys under ``prefix`` (``Cache.configure`` before first use)."""
        self.prefix = prefix
        self._key_prefix = f"{prefix}:c:{self.name}:"
        self._explicit_prefix = f"{prefix}:k:"

    def check_template(self, template: str, what: str = "key template") -> None:
        """Raise ConfigurationError unless ``template`` names only parameters."""
        params = self.signature.parameters
        try:
            fields = [
                f for _, f, _, _ in string.Formatter().parse(template) if f is not None
            ]
        except ValueError as exc:
            raise ConfigurationError(f"bad {what} {template!r}: {exc}") from None
        for field in fields:
            head = field.split(".", 1)[0].split("[", 1)[0]
            if head == "" or head.isdigit():
                raise ConfigurationError(
                    f"{what} {template!r} must name parameters, like "
                    f"'{{{next(iter(params), 'arg')}}}', not positions"
                )
            if head not in params:
                raise ConfigurationError(
                    f"{what} {template!r} names {head!r}, which {self.name} does not "
                    f"take; its parameters are {list(params)}"
                )

    # -- per call -----------------------------------------------------------------------

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Arguments by parameter name, defaults applied (raises TypeError like a call)."""
        if self._simple and len(args) <= self._n_positional:
            names = self._names
            bound = dict(zip(names, args, strict=False))
            if not kwargs and len(args) == len(names):
                return bound
            used = 0
            for name in names[len(args) :]:
                if name in kwargs:
                    bound[name] = kwargs[name]
                    used += 1
                elif name in self._defaults:
                    bound[name] = self._defaults[name]
                else:
                    break  # a required argument is missing: let bind() raise TypeError
            else:
                if used == len(kwargs):  # no unknown or doubled keyword arguments
                    return bound
        ba = self.signature.bind(*args, **kwargs)
        ba.apply_defaults()
        return dict(ba.arguments)

    def build(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        if self._key_fn is not None:
            return self._explicit_prefix + str(self._key_fn(*args, **kwargs))
        bound = self.bind(args, kwargs)
        if self._template is not None:
            return self._explicit_prefix + self._template.format_map(bound)
        return self._key_prefix + self.encode_args(bound)

    def encode_args(self, bound: Mapping[str, Any]) -> str:
        values = []
        for name in self._names:
            if name in self.ignore:
                continue
            kind = self._kinds[name]
            value = bound.get(name, ())
            if kind is inspect.Parameter.VAR_KEYWORD:
                value = dict(sorted(dict(value or {}).items()))
            try:
                values.append(_key_tree(value))
            except _Unsupported as exc:
                raise ConfigurationError(
                    f"cannot build a cache key for {self.name}: argument {name!r} is a "
                    f"{exc.args[0].__qualname__}; write ignore=({name!r},), give the class "
                    "a __rcache_key__() method, or pass key="
                ) from None
        text = json.dumps(
            values, separators=(",", ":"), sort_keys=True, ensure_ascii=False
        )
        if len(text) <= _MAX_PLAIN and _SAFE.issuperset(text):
            return text
        return "h:" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
