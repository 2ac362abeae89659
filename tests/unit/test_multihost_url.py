"""redis+sentinel:// and redis+cluster:// URLs (pure parsing, no server)."""

from __future__ import annotations

import pytest

import rcache
from rcache._redis import ClientSpec, MultiHostURL, check_url


def test_sentinel_url_names_sentinels_service_db_and_primary_credentials() -> None:
    u = MultiHostURL(
        "redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2,[::1]:26380/mymaster/2"
        "?socket_timeout=0.5"
    )
    assert u.hosts == [("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380)]
    assert u.service == "mymaster"
    assert u.options["db"] == 2
    assert u.options["password"] == "s3cret"
    assert u.options["socket_timeout"] == 0.5


def test_cluster_url_names_seeds_and_has_no_database() -> None:
    u = MultiHostURL("redis+cluster://user:pw@n1:7000,n2:7001,n3")
    assert u.hosts == [("n1", 7000), ("n2", 7001), ("n3", 6379)]
    assert "db" not in u.options
    assert u.options["username"] == "user"
    assert MultiHostURL("redis+cluster://n1:7000/0").hosts == [("n1", 7000)]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h:26379", "names no service"),
        ("redis+sentinel://h:26379/m/x", "bad database"),
        ("redis+sentinel://h:26379/m/0/extra", "names no service"),
        ("redis+cluster://h:7000/1", "only database 0"),
        ("redis+cluster://h:port", "host:port"),
        ("redis+cluster://", "no host"),
        ("redis+cluster://h:7000?socket_timeout=soon", "bad option"),
    ],
)
def test_bad_urls_fail_at_construction_saying_what_to_write(
    url: str, message: str
) -> None:
    with pytest.raises(rcache.ConfigurationError, match=message):
        check_url(url)
    with pytest.raises(rcache.ConfigurationError, match=message):
        rcache.Cache(url)


def test_the_mode_is_explicit_in_the_url() -> None:
    assert ClientSpec("redis+cluster://h:7000").cluster
    assert not ClientSpec("redis+cluster://h:7000").sentinel
    assert ClientSpec("redis+sentinel://h:26379/m").sentinel
    assert not ClientSpec("redis+sentinel://h:26379/m").cluster
    plain = ClientSpec("redis://h:6379/0")
    assert not (plain.cluster or plain.sentinel)


def test_password_is_redacted_in_repr() -> None:
    cache = rcache.Cache("redis+sentinel://:s3cret@h1:26379,h2:26379/m/0")
    assert "s3cret" not in repr(cache)
