"""Typed values: the return annotation of a cached function decides what comes back."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import subprocess
import sys
from typing import Any, ClassVar, NamedTuple, TypedDict

import msgspec
import pydantic
import pytest
import redis

import rcache
from rcache import ConfigurationError, SerializationError
from rcache._typed import LazyTyped


@dataclasses.dataclass
class Address:
    city: str
    zip: str


@dataclasses.dataclass
class Person:
    id: int
    name: str
    born: dt.date
    address: Address
    tags: tuple[str, ...] = ()


class User(pydantic.BaseModel):
    id: int
    email: str
    joined: dt.datetime
    roles: list[str] = []


class Point(NamedTuple):
    x: int
    y: int


class Movie(TypedDict):
    title: str
    year: int


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Item(msgspec.Struct):
    sku: str
    qty: int


late = rcache.Cache(prefix="typedlate")  # configured by the test that uses it


@dataclasses.dataclass
class Shelf:
    label: str
    finds: ClassVar[int] = 0

    @late.cached(ttl=60, ignore=("self",))
    def find(self, label: str) -> Shelf:  # Shelf does not exist yet when decorated
        type(self).finds += 1
        return Shelf(label)


JOINED = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)


def _person(i: int) -> Person:
    return Person(i, f"p{i}", dt.date(1990, 1, i), Address("Oslo", "0150"), ("a",))


def test_dataclass_round_trips_as_its_type(cache: rcache.Cache) -> None:
    calls: list[int] = []

    @cache.cached(ttl=60)
    def get_person(i: int) -> Person:
        calls.append(i)
        return _person(i)

    first = get_person(1)
    second = get_person(1)
    assert calls == [1]  # the second call was a hit
    assert type(second) is Person and type(second.address) is Address
    assert second == first == _person(1)


def test_pydantic_model_round_trips_as_its_type(cache: rcache.Cache) -> None:
    calls: list[int] = []

    @cache.cached(ttl=60)
    def get_user(i: int) -> User:
        calls.append(i)
        return User(id=i, email=f"u{i}@example.com", joined=JOINED, roles=["admin"])

    assert get_user(2) == get_user(2)
    hit = get_user(2)
    assert calls == [2]
    assert type(hit) is User
    assert hit.joined == JOINED and hit.joined.tzinfo is not None


async def test_pydantic_model_and_dataclass_round_trip_async(
    cache: rcache.Cache,
) -> None:
    calls: list[str] = []

    @cache.cached(ttl=60)
    async def get_user(i: int) -> User:
        calls.append("user")
        return User(id=i, email="a@example.com", joined=JOINED)

    @cache.cached(ttl=60)
    async def get_person(i: int) -> Person:
        calls.append("person")
        return _person(i)

    assert await get_user(3) == await get_user(3)
    assert type(await get_user(3)) is User
    assert await get_person(4) == _person(4)
    hit = await get_person(4)
    assert type(hit) is Person and type(hit.address) is Address
    assert calls == ["user", "person"]


def test_containers_of_typed_values(cache: rcache.Cache) -> None:
    calls: list[str] = []

    @cache.cached(ttl=60)
    def users() -> list[User]:
        calls.append("list")
        return [User(id=i, email="x@example.com", joined=JOINED) for i in range(3)]

    @cache.cached(ttl=60)
    def by_name() -> dict[str, Person]:
        calls.append("dict")
        return {"a": _person(1), "b": _person(2)}

    @cache.cached(ttl=60)
    def maybe(i: int) -> User | None:
        calls.append(f"maybe{i}")
        return None if i == 0 else User(id=i, email="m@example.com", joined=JOINED)

    for _ in range(2):
        got = users()
        assert [type(u) for u in got] == [User, User, User]
        assert [u.id for u in got] == [0, 1, 2]
        named = by_name()
        assert named == {"a": _person(1), "b": _person(2)}
        assert all(type(p) is Person for p in named.values())
        assert maybe(0) is None
        assert type(maybe(5)) is User
    assert calls == ["list", "dict", "maybe0", "maybe5"]


def test_namedtuple_typeddict_enum_struct(cache: rcache.Cache) -> None:
    calls: list[str] = []

    @cache.cached(ttl=60)
    def point() -> Point:
        calls.append("point")
        return Point(1, 2)

    @cache.cached(ttl=60)
    def movie() -> Movie:
        calls.append("movie")
        return {"title": "Alien", "year": 1979}

    @cache.cached(ttl=60)
    def color() -> Color:
        calls.append("color")
        return Color.BLUE

    @cache.cached(ttl=60)
    def items() -> list[Item]:
        calls.append("items")
        return [Item("a", 1)]

    for _ in range(2):
        p = point()
        assert type(p) is Point and p == (1, 2)
        assert movie() == {"title": "Alien", "year": 1979}
        assert color() is Color.BLUE
        assert items() == [Item("a", 1)]
    assert calls == ["point", "movie", "color", "items"]


def test_msgpack_serializer_keeps_types_too(redis_url: str) -> None:
    cache = rcache.Cache(redis_url, prefix="typedmp", serializer="msgpack")

    @cache.cached(ttl=60)
    def get(i: int) -> list[Person]:
        return [_person(i)]

    assert get(1) == get(1) == [_person(1)]
    assert type(get(1)[0]) is Person
    cache.close()


def test_plain_annotations_keep_the_untyped_path(cache: rcache.Cache) -> None:
    @cache.cached(ttl=60)
    def plain(i: int) -> dict[str, Any]:
        return {"at": dt.date(2024, 1, 2), "t": (1, 2)}

    @cache.cached(ttl=60)
    def bare(i):  # type: ignore[no-untyped-def]
        return {"t": (1, 2)}

    assert plain._spec.typed is None  # type: ignore[attr-defined]
    assert bare._spec.typed is None  # type: ignore[attr-defined]
    plain(1)
    assert plain(1) == {"at": dt.date(2024, 1, 2), "t": (1, 2)}  # tagged JSON
    bare(1)
    assert bare(1) == {"t": (1, 2)}


def test_stored_as_plain_json(cache: rcache.Cache, redis_client: redis.Redis) -> None:
    @cache.cached(ttl=60)
    def get_user() -> User:
        return User(id=1, email="j@example.com", joined=JOINED)

    get_user()
    raw = redis_client.get(get_user.key_for())
    assert raw is not None and raw.endswith(
        b'{"id":1,"email":"j@example.com","joined":"2024-05-06T07:08:09Z","roles":[]}'
    )
    assert b"pickle" not in raw and b"\x80" not in raw


def test_entry_that_no_longer_validates_is_a_miss(
    cache: rcache.Cache, redis_client: redis.Redis
) -> None:
    calls: list[int] = []

    @cache.cached(ttl=60, name="typed.changed")
    def old() -> dict[str, Any]:
        return {"id": "not a number"}

    @cache.cached(ttl=60, name="typed.changed")
    def new() -> User:
        calls.append(1)
        return User(id=1, email="n@example.com", joined=JOINED)

    old()  # an entry written before the annotation changed
    assert type(new()) is User
    assert calls == [1]
    m = cache.metrics
    assert isinstance(m, rcache.InMemoryMetrics)
    assert m.count("cache_errors", "typed.changed", "decode", "UndecodableError") == 1


def test_wrong_return_value_is_a_serialization_error(cache: rcache.Cache) -> None:
    @cache.cached(ttl=60)
    def lies() -> User:
        return "not a user"  # type: ignore[return-value]

    with pytest.raises(SerializationError, match="lies"):
        lies()


def test_method_returning_its_own_class_resolves_at_first_call(
    redis_url: str,
) -> None:
    late.configure(url=redis_url, force=True)
    assert isinstance(Shelf.__dict__["find"]._spec.typed, LazyTyped)
    first = Shelf("x").find("b")
    assert type(first) is Shelf and first.label == "b"
    assert Shelf("y").find("b") == first
    assert Shelf.finds == 1
    late.close()


def test_local_classes_resolve_from_the_decorating_frame(cache: rcache.Cache) -> None:
    @dataclasses.dataclass
    class Local:
        n: int

    @cache.cached(ttl=60)
    def get() -> Local:
        return Local(1)

    assert get() == get() == Local(1)
    assert type(get()) is Local


def test_undecodable_annotation_fails_at_decoration(cache: rcache.Cache) -> None:
    class Opaque:
        pass

    with pytest.raises(ConfigurationError, match=r"Opaque.*dataclass.*Pydantic"):

        @cache.cached(ttl=60)
        def bad() -> Opaque:
            return Opaque()

    with pytest.raises(ConfigurationError, match="list"):

        @cache.cached(ttl=60)
        def bad_list() -> list[Opaque]:
            return []

    @cache.cached(ttl=60)
    def unresolved() -> Missing:  # type: ignore[name-defined]  # noqa: F821
        return None

    with pytest.raises(ConfigurationError, match=r"Missing.*TYPE_CHECKING"):
        unresolved()  # a name that may be defined later is resolved at first call


def test_pickle_serializer_is_not_wrapped(redis_url: str) -> None:
    class Opaque:
        pass

    cache = rcache.Cache(redis_url, serializer=rcache.PickleSerializer(secret="s" * 32))

    @cache.cached(ttl=60)
    def fine() -> Opaque:  # pickle stores any class: no decoration-time error
        return Opaque()

    @cache.cached(ttl=60)
    def person() -> Person:
        return _person(2)

    assert person() == person() == _person(2)
    cache.close()


def test_import_rcache_imports_no_typed_library_or_framework() -> None:
    code = (
        "import sys, rcache\n"
        "c = rcache.Cache('memory://')\n"
        "@c.cached(ttl=5)\n"
        "def f(x: int) -> dict: return {}\n"
        "heavy = {'pydantic', 'msgspec', 'flask', 'fastapi', 'starlette', 'django',"
        " 'prometheus_client'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
