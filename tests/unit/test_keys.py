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
