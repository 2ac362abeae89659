"""Canonical, collision-free cache keys (pure, no IO).

A key is built from the function's full qualified name and its arguments *bound to the
signature with defaults applied*, so ``f(1, b=2)``, ``f(1, 2)`` and ``f(1)`` (when
``b=2`` is the default) share one key. Arguments are encoded type-preservingly as JSON:
``f(1)`` and ``f("1")`` differ, and so do ``f("a b")`` and ``f("a", "b")`` (dogpile
joins arguments with spaces; cashews formats them with ``str()``).

Redis key layout (``prefix`` defaults to ``"rcache"``); :class:`KeySpace` names every
key below, and nothing else formats one::

    {prefix}:c:{module.qualname}:{args}      value of a decorated function
    {prefix}:c:{module.qualname}:h:{digest}  same, when the encoded args are long
    <value key>:lease / :ready               its stampede lease / wake-up list
    {prefix}:k:{key}                         explicit keys and key= templates
    {prefix}:s:f:{module.qualname}           version stamp of a function
    {prefix}:s:t:{tag}                       version stamp of a tag
    {prefix}:l:{{name}}[:aux]                locks; aux keys share the slot by hash tag
    {prefix}:celery:u|l|w:{{...}}            rcache-celery's guard keys (see there)
    {prefix}:check:{token}                   Cache.check()'s short-lived probe

On Redis Cluster (``KeySpace(prefix, groups=B)``, see ``_slots.py``) every key of a cache
entry carries its slot group's hash tag after the prefix, so that the entry's value,
lease, wake-up list and its group's copies of the stamps share one hash slot::

    {prefix}:{{prefix.G}}:c:{module.qualname}:{args}   G = crc32("{name}:{args}") % B
    {prefix}:{{prefix.G}}:k:{key}                      G = crc32(key's hash tag) % B
    {prefix}:{{prefix.G}}:s:f:{module.qualname}        group G's copy of a stamp
    {prefix}:{{prefix.G}}:s:t:{tag}
    {prefix}:cluster:groups                            B, recorded at first use

Locks, rcache-celery's keys and the probe keep the single-primary names (their hash
tags already keep each of them in one slot).

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rcache._exceptions import ConfigurationError
from rcache._serializers import _encode_tree, _Unsupported
from rcache._slots import check_groups, check_prefix, group_of, group_tag, hash_tag

__all__ = [
    "KeyBuilder",
    "KeySpace",
    "LockKeys",
    "check_template",
    "escape_glob",
    "qualified_name",
]

_MAX_PLAIN = 96  # longer encoded arguments are hashed (blake2b-128, hex)
_SAFE = set(string.printable) - set(" \t\n\r\x0b\x0c")
# ints beyond sys.get_int_max_str_digits() (4,300 digits) cannot be written in decimal
_MAX_INT_BITS = 10_000
_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CONTINUES = frozenset(string.ascii_letters + string.digits + "_")
_GLOB = re.compile(r"([*?\[\]\\])")


def escape_glob(text: str) -> str:
    """``text`` with the glob characters of SCAN MATCH (``* ? [ ] \\``) escaped."""
    return _GLOB.sub(r"\\\1", text)


class LockKeys:
    """The keys of one lock name. Each contains ``{name}``, so on Redis Cluster they all
    hash to one slot and a lock script may touch any of them.

    ``base`` is an exclusive lock's lease (the holder's token, PX); the others::

        :fence                 INCR fencing counter (never expires, never deleted)
        :signal                wake-up list: release LPUSHes, waiters block on it
        :w / :h                "someone waits" marker / hand-off grace after a release
        :fq :fqt :fqn :fs:<t>  fair lock: FIFO queue, its expiries, tickets, per-waiter
                               wake-up lists
        :sem[:fence|:signal]   semaphore: permits ZSET (id -> expiry), fence, wake-ups
        :rw:r :rw:w :rw:wq     RW lock: readers ZSET, writer lease, writer intents,
        :rw:rs :rw:ws :rw:fence   reader and writer wake-ups, fence
    """

    __slots__ = ("base",)

    #: Every suffix a lock writes (``:fs:`` is followed by a waiter's token).
    SUFFIXES = (
        ":fence",
        ":signal",
        ":w",
        ":h",
        ":fq",
        ":fqt",
        ":fqn",
        ":fs:",
        ":sem",
        ":sem:fence",
        ":sem:signal",
        ":rw:r",
        ":rw:w",
        ":rw:wq",
        ":rw:rs",
        ":rw:ws",
        ":rw:fence",
    )

    def __init__(self, base: str) -> None:
        self.base = base

    def __repr__(self) -> str:
        return f"LockKeys({self.base!r})"

    @property
    def fence(self) -> str:
        """An exclusive or fair lock's fencing counter."""
        return self.base + ":fence"

    @property
    def signal(self) -> str:
        """An exclusive lock's wake-up list."""
        return self.base + ":signal"

    @property
    def waiting(self) -> str:
        """The "someone waits" marker of an exclusive lock."""
        return self.base + ":w"

    @property
    def grace(self) -> str:
        """The hand-off grace after a release that had waiters."""
        return self.base + ":h"

    @property
    def queue(self) -> str:
        """A fair lock's FIFO queue (ZSET of waiter tokens)."""
        return self.base + ":fq"

    @property
    def queue_expiry(self) -> str:
        """A fair lock's waiter expiries (ZSET)."""
        return self.base + ":fqt"

    @property
    def tickets(self) -> str:
        """A fair lock's ticket counter."""
        return self.base + ":fqn"

    @property
    def fair_signals(self) -> str:
        """The head of a fair lock's per-waiter wake-up lists (the token follows)."""
        return self.base + ":fs:"

    @property
    def permits(self) -> str:
        """A semaphore's permits (ZSET: permit id -> expiry)."""
        return self.base + ":sem"

    @property
    def permits_fence(self) -> str:
        """A semaphore's fencing counter."""
        return self.base + ":sem:fence"

    @property
    def permits_signal(self) -> str:
        """A semaphore's wake-up list."""
        return self.base + ":sem:signal"

    @property
    def readers(self) -> str:
        """An RW lock's readers (ZSET: token -> expiry)."""
        return self.base + ":rw:r"

    @property
    def writer(self) -> str:
        """An RW lock's writer lease."""
        return self.base + ":rw:w"

    @property
    def intents(self) -> str:
        """An RW lock's waiting writers (ZSET), which hold new readers back."""
        return self.base + ":rw:wq"

    @property
    def read_signal(self) -> str:
        """An RW lock's wake-up list for readers."""
        return self.base + ":rw:rs"

    @property
    def write_signal(self) -> str:
        """An RW lock's wake-up list for writers."""
        return self.base + ":rw:ws"

    @property
    def rw_fence(self) -> str:
        """An RW lock's fencing counter."""
        return self.base + ":rw:fence"


class KeySpace:
    """Names every Redis key rcache and rcache-celery write under one ``prefix``.

    The layout is in this module's docstring, and it is a compatibility promise: a key
    named here is never renamed without a migration note (``tests/unit/test_keyspace.py``
    pins each one). Integrations build their keys here too, so that hash tags for Redis
    Cluster are decided in one place. ``Cache.keyspace`` is the cache's own.

    ``groups`` (B) is given on Redis Cluster only: every cache key then carries one of B
    slot-group hash tags (``_slots.py``), and a function's or a tag's stamp has a copy
    in each group. The single-primary (and Sentinel) names do not change.

    Example::

        ks = KeySpace("shop")
        ks.explicit("user:42")          # 'shop:k:user:42'
        ks.lock("report").fence         # 'shop:l:{report}:fence'
        KeySpace("shop", groups=256).explicit("user:42")  # 'shop:{shop.G}:k:user:42'
    """

    __slots__ = ("_group_head", "_tag_prefix", "explicit_prefix", "groups", "prefix")

    def __init__(self, prefix: str, groups: int | None = None) -> None:
        self.prefix = prefix
        #: B on Redis Cluster (cache keys carry slot-group hash tags), else None
        self.groups = None if groups is None else check_groups(groups)
        if self.groups is not None:
            check_prefix(prefix)
        #: The head of every explicit key in the single-primary layout
        #: (``{prefix}:k:``); on a cluster the head depends on the key: use
        #: :meth:`explicit`.
        self.explicit_prefix = f"{prefix}:k:"
        self._tag_prefix = f"{prefix}:s:t:"
        # "prefix:{prefix." : what every grouped key starts with (the group follows)
        self._group_head = f"{prefix}:{{{prefix}."

    def __repr__(self) -> str:
        if self.groups is None:
            return f"KeySpace({self.prefix!r})"
        return f"KeySpace({self.prefix!r}, groups={self.groups})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, KeySpace)
            and other.prefix == self.prefix
            and other.groups == self.groups
        )

    def __hash__(self) -> int:
        return hash((self.prefix, self.groups))

    @property
    def tag_prefix(self) -> str:
        """The head of every tag's version stamp (``{prefix}:s:t:``): single-primary
        layout only (on a cluster each group has its copy: :meth:`tag_stamps`)."""
        if self.groups is not None:
            raise ConfigurationError(
                "on Redis Cluster a tag's stamp has a copy per slot group: use "
                "KeySpace.tag_stamps(tag) or tag_stamp(tag, group)"
            )
        return self._tag_prefix

    # -- slot groups (Redis Cluster) -----------------------------------------------------

    def head(self, group: int | None = None) -> str:
        """What the cache keys of ``group`` start with: ``{prefix}`` on one primary,
        ``{prefix}:{{prefix.G}}`` on a cluster (where ``group`` is required)."""
        if self.groups is None:
            return self.prefix
        if group is None:
            raise ConfigurationError(
                f"{self!r}: on Redis Cluster a cache key needs its slot group"
            )
        return group_tag(self.prefix, group)

    def group_of(self, body: str) -> int | None:
        """The slot group of an entry whose key ends with ``body`` (``name:args`` or an
        explicit key); None on one primary."""
        groups = self.groups
        return None if groups is None else group_of(body, groups)

    def group_of_key(self, key: str) -> int | None:
        """The slot group of a cache key named here (None on one primary, or for a key
        without a group: locks, rcache-celery's keys)."""
        head = self._group_head
        if self.groups is None or not key.startswith(head):
            return None
        end = key.find("}", len(head))
        digits = key[len(head) : end]
        return int(digits) if end > 0 and digits.isdigit() else None

    def groups_record(self) -> str:
        """Where a cluster records B at first use (``Cache`` refuses another B)."""
        return f"{self.prefix}:cluster:groups"

    # -- cache entries ------------------------------------------------------------------

    def values(self, name: str, group: int | None = None) -> str:
        """The head of the value keys of the decorated function ``name``
        (``module.qualname``); its encoded arguments follow. On a cluster, of the
        values in ``group``."""
        return f"{self.head(group)}:c:{name}:"

    def value(self, name: str, args: str) -> str:
        """The value key of ``name`` called with encoded arguments ``args``."""
        if self.groups is None:
            return f"{self.prefix}:c:{name}:{args}"
        body = f"{name}:{args}"
        return f"{group_tag(self.prefix, group_of(body, self.groups))}:c:{body}"

    def explicit(self, key: str) -> str:
        """The key of ``cache.get(key)``/``set(key)`` and of ``key=`` templates."""
        if self.groups is None:
            return self.explicit_prefix + key
        group = group_of(hash_tag(key), self.groups)
        return f"{group_tag(self.prefix, group)}:k:{key}"

    def function_stamp(self, name: str, group: int | None = None) -> str:
        """The version stamp of a decorated function (``invalidate_all`` deletes it);
        on a cluster, ``group``'s copy."""
        return f"{self.head(group)}:s:f:{name}"

    def tag_stamp(self, tag: str, group: int | None = None) -> str:
        """The version stamp of ``tag`` (``invalidate_tags`` deletes it); on a cluster,
        ``group``'s copy."""
        if self.groups is None:
            return self._tag_prefix + tag
        return f"{self.head(group)}:s:t:{tag}"

    def function_stamps(self, name: str) -> list[str]:
        """Every copy of a function's stamp: one on a primary, B on a cluster."""
        if self.groups is None:
            return [self.function_stamp(name)]
        return [self.function_stamp(name, g) for g in range(self.groups)]

    def tag_stamps(self, tag: str) -> list[str]:
        """Every copy of a tag's stamp: one on a primary, B on a cluster."""
        if self.groups is None:
            return [self._tag_prefix + tag]
        return [self.tag_stamp(tag, g) for g in range(self.groups)]

    def lease(self, value_key: str) -> str:
        """The stampede lease of the computation of ``value_key``."""
        return value_key + ":lease"

    def ready(self, value_key: str) -> str:
        """The wake-up list of the callers waiting for ``value_key``."""
        return value_key + ":ready"

    # -- locks --------------------------------------------------------------------------

    def lock(self, name: str) -> LockKeys:
        """The keys of the lock, RW lock or semaphore ``name``."""
        return LockKeys(f"{self.prefix}:l:{{{name}}}")

    # -- rcache-celery ------------------------------------------------------------------

    def unique_guard(self, task: str, digest: str) -> str:
        """A UniqueTask's dedup key (``task`` and ``digest`` without braces)."""
        return f"{self.prefix}:celery:u:{{{task}:{digest}}}"

    def lock_guard(self, name: str) -> str:
        """A LockedTask's lock key (``name`` without braces)."""
        return f"{self.prefix}:celery:l:{{{name}}}"

    def warm_gate(self, name: str) -> str:
        """The gate of a ``warm()`` task's last run (``name`` without braces)."""
        return f"{self.prefix}:celery:w:{{{name}}}"

    def run_marker(self, guard_key: str, task_id: str) -> str:
        """The run state of ``task_id`` under a guard key (same hash slot)."""
        return f"{guard_key}:r:{task_id}"

    # -- tools --------------------------------------------------------------------------

    def probe(self, token: str) -> str:
        """A short-lived key of ``Cache.check()``."""
        return f"{self.prefix}:check:{token}"

    def pattern(self, area: str = "") -> str:
        """A SCAN MATCH pattern for the keys under ``{prefix}:{area}`` (``area`` is
        ``""`` for all, ``"l:"`` for locks, ``"celery:"``...); the prefix is
        glob-escaped, so a prefix ``a*b`` never matches ``axb:...``."""
        return f"{escape_glob(self.prefix)}:{area}*"


# How keys are read back (operators' census, lock listing): the inverse of KeySpace.
# {prefix}:c:{module.qualname}:{args}, args = canonical JSON ("[...]") or "h:<digest>"
ENTRY_KEY = re.compile(r"^c:(?P<fn>.+?):(?:\[.*|h:[0-9a-f]{32})$", re.DOTALL)
# {prefix}:l:{name}[:aux]; tokens and aux names never contain braces
LOCK_KEY = re.compile(
    r"^l:\{(?P<name>.*)\}(?P<aux>|"
    + "|".join(
        re.escape(s) + ("[^{}]*" if s == ":fs:" else "") for s in LockKeys.SUFFIXES
    )
    + ")$",
    re.DOTALL,
)


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


def check_template(
    template: str,
    parameters: Sequence[str],
    *,
    owner: str,
    what: str = "key template",
) -> None:
    """Raise ConfigurationError unless ``template`` can be filled from ``parameters``.

    The one template rule of rcache and its integrations: every field names a
    parameter (``{user_id}``, ``{user.id}``, ``{ids[0]}``), never a position, and a
    field other than the last is followed by a separator (see the module docstring).
    The message names ``owner`` (the function or task) and suggests the closest
    parameter for a typo.

    :param template: the template, e.g. ``"report:{day}"``.
    :param parameters: the parameter names the template may use.
    :param owner: the function or task name, for the message.
    :param what: what the template is, for the message (``"lock_key"``, ``"tag"``).
    """
    try:
        fields = [
            f for _, f, _, _ in string.Formatter().parse(template) if f is not None
        ]
    except ValueError as exc:
        raise ConfigurationError(f"bad {what} {template!r}: {exc}") from None
    params = list(parameters)
    for field in fields:
        head = field.split(".", 1)[0].split("[", 1)[0]
        if head == "" or head.isdigit():
            raise ConfigurationError(
                f"{what} {template!r} must name parameters, like "
                f"'{{{next(iter(params), 'arg')}}}', not positions"
            )
        if head not in params:
            import difflib  # only on this error path

            close = difflib.get_close_matches(head, params, n=1)
            hint = ""
            if close:
                fixed = template.replace("{" + head, "{" + close[0])
                option = f"{what}=" if what.isidentifier() else ""
                hint = f"; did you mean {{{close[0]}}}: {option}{fixed!r}?"
            raise ConfigurationError(
                f"{what} {template!r} names {head!r}, which {owner} does not "
                f"take; its parameters are {params}{hint}"
            )
    Template(template).check(what)


class KeyBuilder:
    """Compiled at decoration time; ``build(args, kwargs)`` runs on every call.

    Integrations use it (through ``rcache.spi``) to bind a function's arguments with
    its defaults (:meth:`bind`) and encode them as rcache does (:meth:`encode_args`).
    """

    #: strs that canonical JSON writes as '"' + s + '"' and that stay within _SAFE:
    #: printable ASCII other than space, '"' and backslash (build()'s fast path)
    _VERBATIM = re.compile(r"[!#-\[\]-~]*\Z")
    #: canonical JSON, built once (json.dumps with these options builds one per call)
    _JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=False)

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        prefix: str | KeySpace,
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

    def rebase(self, prefix: str | KeySpace) -> None:
        """Build keys under ``prefix``, or in a :class:`KeySpace` (a Cache's, with slot
        groups on Redis Cluster); ``Cache.configure`` before first use calls it."""
        keyspace = prefix if isinstance(prefix, KeySpace) else KeySpace(prefix)
        self.keyspace = keyspace
        self.prefix = keyspace.prefix
        self._explicit_prefix = keyspace.explicit_prefix
        if keyspace.groups is None:
            self._key_prefix = keyspace.values(self.name)
            # the per-call methods: the single-primary ones are the class's own
            self.__dict__.pop("build", None)
            self.__dict__.pop("value_key", None)
        else:
            # every key carries its slot group, chosen per call; bound here so that
            # the single-primary calls pay nothing for it
            self.build = self._grouped_build  # type: ignore[method-assign]
            self.value_key = self._grouped_value_key  # type: ignore[method-assign]

    def check_template(self, template: str, what: str = "key template") -> None:
        """Raise ConfigurationError unless ``template`` names only parameters (the
        rule of :func:`check_template`)."""
        check_template(
            template, list(self.signature.parameters), owner=self.name, what=what
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
        """The Redis key of one call."""
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

    def value_key(self, bound: Mapping[str, Any]) -> str:
        """The value key of bound arguments, ignoring ``key=`` (batch entries)."""
        return self._key_prefix + self.encode_args(bound)

    def _grouped_build(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        # build() on Redis Cluster: the same key bodies, each under its slot group
        ks = self.keyspace
        if self._key_fn is not None:
            return ks.explicit(str(self._key_fn(*args, **kwargs)))
        bound = self.bind(args, kwargs)
        if self._template is not None:
            return ks.explicit(self._template.render(bound))
        return ks.value(self.name, self.encode_args(bound))

    def _grouped_value_key(self, bound: Mapping[str, Any]) -> str:
        return self.keyspace.value(self.name, self.encode_args(bound))

    def encode_args(self, bound: Mapping[str, Any]) -> str:
        """The canonical encoding of bound arguments (``[...]`` JSON, or ``h:`` and a
        digest when long), without the ``ignore=`` ones."""
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
