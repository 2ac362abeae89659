from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from rcache import ConfigurationError
from rcache._keys import KeyBuilder


def kb(fn: Callable[..., Any], **kw: Any) -> KeyBuilder:
    return KeyBuilder(fn, prefix="p", **kw)


def f(a: Any, b: Any = 2, *, c: Any = None) -> None: ...


def test_defaults_and_keywords_bind_to_one_key() -> None:
    k = kb(f)
    key = k.build((1,), {})
    assert (
        key == k.build((1, 2), {}) == k.build((1,), {"b": 2}) == k.build((), {"a": 1})
    )
    assert key == k.build((1,), {"c": None, "b": 2})
    assert key.startswith("p:c:") and key.split(":")[2].endswith("test_keys.f")


def test_types_are_preserved() -> None:
    k = kb(f)
    keys = {
        k.build((1,), {}),
        k.build(("1",), {}),
        k.build((1.0,), {}),
        k.build((True,), {}),
        k.build((None,), {}),
        k.build(([1],), {}),
        k.build(((1,),), {}),
        k.build(({"x": 1},), {}),
        k.build(({1: 1},), {}),
        k.build(({"1": 1},), {}),
    }
    assert len(keys) == 10


def test_space_joined_arguments_do_not_collide() -> None:
    def g(*args: Any) -> None: ...

    k = kb(g)
    assert k.build(("a b",), {}) != k.build(("a", "b"), {})


def test_dict_order_does_not_matter() -> None:
    k = kb(f)
    assert k.build(({"x": 1, "y": 2},), {}) == k.build(({"y": 2, "x": 1},), {})


def test_var_kwargs_are_sorted() -> None:
    def g(**kw: Any) -> None: ...

    k = kb(g)
    assert k.build((), {"a": 1, "b": 2}) == k.build((), {"b": 2, "a": 1})
    assert k.build((), {"a": 1}) != k.build((), {"a": "1"})


def test_long_arguments_are_hashed() -> None:
    k = kb(f)
    key = k.build(("x" * 500,), {})
    assert ":h:" in key and len(key) < 100
    assert key != k.build(("x" * 499 + "y",), {})


def test_qualname_separates_methods() -> None:
    class A:
        def m(self, x: int) -> None: ...

    class B:
        def m(self, x: int) -> None: ...

    assert kb(A.m, ignore=("self",)).build((A(), 1), {}) != kb(
        B.m, ignore=("self",)
    ).build((B(), 1), {})


def test_ignore_skips_arguments() -> None:
    def g(session: object, user_id: int) -> None: ...

    k = kb(g, ignore=("session",))
    assert k.build((object(), 1), {}) == k.build((object(), 1), {})


def test_unsupported_argument_says_what_to_write() -> None:
    def g(conn: object) -> None: ...

    with pytest.raises(ConfigurationError, match=r"ignore=\('conn',\)"):
        kb(g).build((object(),), {})


def test_rcache_key_hook_enums_and_classes() -> None:
    class Color(enum.Enum):
        RED = 1

    class User:
        def __init__(self, uid: int) -> None:
            self.uid = uid

        def __rcache_key__(self) -> int:
            return self.uid

    def g(x: object) -> None: ...

    k = kb(g)
    assert k.build((User(1),), {}) == k.build((User(1),), {})
    assert k.build((User(1),), {}) != k.build((User(2),), {})
    assert k.build((Color.RED,), {}) != k.build((1,), {})
    assert k.build((int,), {}) != k.build((str,), {})
    assert k.build((uuid.UUID(int=1),), {}) != k.build((str(uuid.UUID(int=1)),), {})


def test_template_keys() -> None:
    def g(user_id: int, verbose: bool = False) -> None: ...

    k = kb(g, key="user:{user_id}")
    assert k.build((42,), {}) == "p:k:user:42"
    assert k.build((), {"user_id": 42}) == "p:k:user:42"


@pytest.mark.parametrize(
    "template", ["user:{uid}", "user:{0}", "user:{}", "user:{user_id"]
)
def test_bad_templates_fail_at_decoration(template: str) -> None:
    def g(user_id: int) -> None: ...

    with pytest.raises(ConfigurationError):
        kb(g, key=template)


def test_ignore_must_name_parameters() -> None:
    with pytest.raises(ConfigurationError, match="does not take"):
        kb(f, ignore=("nope",))
    with pytest.raises(ConfigurationError, match="sequence"):
        kb(f, ignore="a")  # type: ignore[arg-type]


def test_callable_key() -> None:
    def g(a: int, b: int) -> None: ...

    k = kb(g, key=lambda a, b: f"sum:{a + b}")
    assert k.build((1, 2), {}) == "p:k:sum:3"


def test_wrong_call_raises_type_error_like_the_function() -> None:
    k = kb(f)
    with pytest.raises(TypeError):
        k.build((), {})
    with pytest.raises(TypeError):
        k.build((1,), {"zzz": 1})
    with pytest.raises(TypeError):
        k.build((1,), {"a": 1})


# -- issue 14 item 10: templates encode fields type-preservingly and delimiter-safely --


def test_template_fields_do_not_collide() -> None:
    def item(a: Any, b: Any) -> None: ...

    k = kb(item, key="item:{a}:{b}")
    assert k.build(("x", "y:z"), {}) != k.build(("x:y", "z"), {})
    assert k.build(("x", "y:z"), {}) == 'p:k:item:x:"y:z"'
    assert k.build(("x:y", "z"), {}) == 'p:k:item:"x:y":z'

    def user(uid: Any) -> None: ...

    u = kb(user, key="user:{uid}")
    keys = [
        u.build((v,), {})
        for v in (1, "1", 1.0, True, None, "", "None", "true", (1,), [1], "a b", -1)
    ]
    assert len(set(keys)) == len(keys)


def test_template_keeps_simple_ints_and_strings_readable() -> None:
    def user(uid: Any) -> None: ...

    u = kb(user, key="user:{uid}")
    assert u.build((42,), {}) == "p:k:user:42"
    assert u.build((-7,), {}) == "p:k:user:-7"
    assert u.build(("alice",), {}) == "p:k:user:alice"
    assert u.build(("bob_2",), {}) == "p:k:user:bob_2"
    assert u.build(("1",), {}) == 'p:k:user:"1"'
    assert u.build(("a@b.c",), {}) == 'p:k:user:"a@b.c"'
    assert u.build((1.5,), {}) == "p:k:user:[1.5]"
    assert u.build((None,), {}) == "p:k:user:[null]"


def test_template_fields_need_a_separator() -> None:
    def g(a: int, b: int) -> None: ...

    # "{a}{b}": (1, 23) and (12, 3) would both give "123"
    for bad in ("{a}{b}", "{a}x{b}", "{a}0{b}", "{a}_{b}"):
        with pytest.raises(ConfigurationError, match="separator"):
            kb(g, key=bad)
    for good in ("{a}:{b}", "{a}-{b}", "{a}.{b}", "{a}/{b}x", "v{a}@{b}"):
        k = kb(g, key=good)
        assert k.build((1, 23), {}) != k.build((12, 3), {})
        assert k.build((1, -2), {}) != k.build((-1, 2), {})


def test_template_attribute_and_format_fields() -> None:
    class U:
        uid = 7

    def g(u: Any, n: int) -> None: ...

    k = kb(g, key="u:{u.uid}:{n:03d}")
    assert k.build((U(), 5), {}) == 'p:k:u:7:"005"'


def test_huge_int_arguments_make_keys() -> None:
    # ints over 4,300 digits raise ValueError from str() and json.dumps (item 9)
    big = 10**5000
    k = kb(f)
    assert k.build((big,), {}) != k.build((big + 1,), {})
    t = kb(f, key="n:{a}")
    assert t.build((big,), {}) != t.build((big + 1,), {})
    assert t.build((big,), {}).startswith('p:k:n:[{"$rc":"int"')
