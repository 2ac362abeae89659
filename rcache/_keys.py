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

Key and tag **templates** (``key="item:{a}:{b}"``, ``tags=["user:{uid}"]``) encode each
field as unambiguously as default keys, readable for the common cases:

* an ``int`` as its decimal digits: ``user:{uid}`` with 42 gives ``user:42``;
* a ``str`` of ASCII letters, digits and ``_`` that starts with a letter or ``_`` as it
  is: ``alice`` gives ``user:alice``;
* any other ``str`` as a JSON string: ``"1"``, ``"y:z"``, ``"a b"``, ``""``;
* anything else as a one-element JSON array of its canonical key encoding: ``[1.5]``,
  ``[true]``, ``[null]``, ``[{"$rc":"tuple","v":[1,2]}]``.

The first character tells the kind, and each kind ends unambiguously, so
``item:{a}:{b}`` gives different keys for ``("x", "y:z")`` and ``("x:y", "z")``
(``item:x:"y:z"`` and ``item:"x:y":z``), and ``user("1")`` differs from ``user(1)``
(cashews formats fields with ``str()``: both collide there). For that, a field other
than the last must be followed by a character that cannot continue a bare field
(not a letter, digit or ``_``): ``"{a}{b}"`` is refused at decoration time. To
invalidate a tag, write it as the template renders it: ``invalidate_tags("user:42")``
for an int, ``invalidate_tags('user:"1"')`` for the string ``"1"``.
"""

from __future__ import annotations

import enum
import hashlib
import inspect
import json
import re
import string
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from rcache._exceptions import ConfigurationError
from rcache._serializers import _encode_tree, _Unsupported

__all__ = ["KeyBuilder", "qualified_name"]

_MAX_PLAIN = 96  # longer encoded arguments are hashed (blake2b-128, hex)
_SAFE = set(string.printable) - set(" \t\n\r\x0b\x0c")
# ints beyond sys.get_int_max_str_digits() (4,300 digits) cannot be written in decimal
_MAX_INT_BITS = 10_000
_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CONTINUES = frozenset(string.ascii_letters + string.digits + "_")


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
    if t is str or t is float or t is bool or obj is None:
        return obj
    if t is int:
        if obj.bit_length() <= _MAX_INT_BITS:
            return obj
        return {"$rc": "int", "v": format(obj, "x")}  # decimal would raise (item 9)
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


def template_field(value: Any) -> str:
    """How a template field renders ``value`` (see the module docstring)."""
    t = type(value)
    if t is int and value.bit_length() <= _MAX_INT_BITS:
        return str(value)
    if t is str:
        if _BARE.match(value):
            return value  # type: ignore[no-any-return]
        return json.dumps(value, ensure_ascii=False)
    tree = _key_tree(value)
    return "[" + json.dumps(tree, separators=(",", ":"), sort_keys=True) + "]"


class Template:
    """A key or tag template compiled at decoration time (fields: see module doc)."""

    _formatter = string.Formatter()

    def __init__(self, template: str) -> None:
        self.template = template
        # (literal, field name or None, is a plain parameter name, conversion, spec)
        self._parts: list[tuple[str, str | None, bool, str | None, str]] = [
            (literal, name, name is not None and name.isidentifier(), conv, spec or "")
            for literal, name, spec, conv in self._formatter.parse(template)
        ]
        self.fields = [p[1] for p in self._parts if p[1] is not None]
        #: the rendered text when the template has no field (render() returns it)
        self.fixed: str | None = None if self.fields else template
        # fields that are plain parameter names, without conversion or format spec:
        # render() reads them from the bound arguments directly (the common case)
        self._plain = all(
            plain and conv is None and not spec
            for _, name, plain, conv, spec in self._parts
            if name is not None
        )

    def check(self, what: str) -> None:
        """Refuse a field followed by something that could continue it."""
        parts = self._parts
        for i, (_, name, _, _, _) in enumerate(parts):
            if name is None or i + 1 >= len(parts):
                continue
            following, next_name = parts[i + 1][0], parts[i + 1][1]
            if next_name is None:
                continue  # the last field: only a fixed suffix follows it
            if following == "" or following[0] in _CONTINUES:
                raise ConfigurationError(
                    f"{what} {self.template!r}: put a separator such as ':' after "
                    f"{{{name}}}, or two different arguments could give one key"
                )

    def render(self, bound: Mapping[str, Any]) -> str:
        """The template with each field's value encoded (see the module docstring)."""
        if self.fixed is not None:
            return self.fixed
        if self._plain:
            return "".join(
                [
                    literal if name is None else literal + template_field(bound[name])
                    for literal, name, _, _, _ in self._parts
                ]
            )
        out = []
        for literal, name, plain, conv, spec in self._parts:
            out.append(literal)
            if name is None:
                continue
            if plain and conv is None and not spec:
                value = bound[name]
            else:
                value = self._formatter.get_field(name, (), bound)[0]
                if conv is not None:
                    value = self._formatter.convert_field(value, conv)
                if spec:
                    value = format(value, spec)
            out.append(template_field(value))
        return "".join(out)


class KeyBuilder:
    """Compiled at decoration time; ``build(args, kwargs)`` runs on every call."""

    #: strs that canonical JSON writes as '"' + s + '"' and that stay within _SAFE:
    #: printable ASCII other than space, '"' and backslash (build()'s fast path)
    _VERBATIM = re.compile(r"[!#-\[\]-~]*\Z")
    #: canonical JSON, built once (json.dumps with these options builds one per call)
    _JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=False)

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
        self._template: Template | None = None
        self._key_fn: Callable[..., str] | None = None
        self.rebase(prefix)
        if key is None:
            pass
        elif isinstance(key, str):
            self.check_template(key)
            self._template = Template(key)
        elif callable(key):
            self._key_fn = key
        else:
            raise ConfigurationError(
                f"key= must be a template string like 'user:{{user_id}}' or a callable, "
                f"got {type(key).__name__}"
            )
        # build()'s fast path (_fast) applies to calls that give every parameter
        # positionally, for default keys with nothing ignored; -1: never
        fast = key is None and self._simple and not self.ignore
        self._arity = len(params) if fast and self._n_positional == len(params) else -1

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
        Template(template).check(what)

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
        """The full Redis key of a call with ``args`` and ``kwargs``."""
        if len(args) == self._arity and not kwargs:
            key = self._fast(args)
            if key is not None:
                return key
        if self._key_fn is not None:
            return self._explicit_prefix + str(self._key_fn(*args, **kwargs))
        bound = self.bind(args, kwargs)
        if self._template is not None:
            return self._explicit_prefix + self._template.render(bound)
        return self._key_prefix + self.encode_args(bound)

    def _fast(self, args: tuple[Any, ...]) -> str | None:
        """The key of ``args`` when every one is an int, a short plain str, a bool or
        None (the common ``get_user(42)``), written as :meth:`encode_args` would write
        it, without binding or JSON; None for anything else (then build() does it all).
        """
        scalar = self._scalar
        if len(args) == 1:  # the most common shape, without a list and a join
            text = scalar(args[0])
            if text is None:
                return None
            text = "[" + text + "]"
        else:
            parts = []
            for value in args:
                part = scalar(value)
                if part is None:
                    return None
                parts.append(part)
            text = "[" + ",".join(parts) + "]"
        if len(text) > _MAX_PLAIN:
            return None  # hashed: the general path
        return self._key_prefix + text

    @staticmethod
    def _scalar(value: Any) -> str | None:
        """Canonical JSON of an int, a plain ASCII str, a bool or None, as
        :meth:`encode_args` writes it (``json.dumps(int)`` is ``int.__repr__``); None
        for anything else."""
        t = type(value)
        if t is int:
            # a longer int cannot fit _MAX_PLAIN anyway, and str() refuses ints beyond
            # sys.get_int_max_str_digits(): both are the general path's
            return str(value) if value.bit_length() <= 256 else None
        if t is str:
            # escapes, spaces or non-ASCII: left to JSON and _SAFE
            return '"' + value + '"' if KeyBuilder._VERBATIM.match(value) else None
        if value is None:
            return "null"
        if value is True:
            return "true"
        if value is False:
            return "false"
        return None

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
        text = self._JSON.encode(values)
        if len(text) <= _MAX_PLAIN and _SAFE.issuperset(text):
            return text
        return "h:" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
