"""Malformed Redis URLs fail at construction with what to write (never at first use)."""

from __future__ import annotations

import pytest

import rcache
from rcache import ConfigurationError
from rcache._redis import check_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis:/127.0.0.1:6379", "write 'redis://127.0.0.1:6379'"),
        ("redis:127.0.0.1:6379/0", "write 'redis://127.0.0.1:6379/0'"),
        ("unix:/tmp/redis.sock", "write 'unix:///tmp/redis.sock'"),
        ("unix://tmp/redis.sock", "unix:///path/to/redis.sock"),
        ("http://127.0.0.1:6379", "unknown URL scheme"),
        ("127.0.0.1:6379", "unknown URL scheme"),
        ("redis://127.0.0.1:abc/0", "bad port"),
        ("redis://127.0.0.1:70000/0", "a number from 1 to 65535"),
        ("redis://127.0.0.1:6379/x", "bad database number 'x'"),
        ("redis://127.0.0.1:6379/-1", "bad database number '-1'"),
        ("redis://127.0.0.1:6379/0/1", "bad database number"),
        ("redis://127.0.0.1:6379?db=one", "write ?db=0"),
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
        ("redis://", "no host"),
        ("REDIS://host:6379/0", "write 'redis://host:6379/0'"),
        ("redis://:6379/0", "no host"),
    ],
)
def test_malformed_url_raises_at_construction(url: str, expected: str) -> None:
    with pytest.raises(ConfigurationError, match="write") as info:
        rcache.Cache(url)
    assert expected in str(info.value)
    with pytest.raises(ConfigurationError):
        check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost",
        "rediss://cache.example.com:6380/3",
        "redis://user:pw@host:6379/0?socket_timeout=0.5",
        "unix:///var/run/redis.sock?db=2",
        "memory://",
    ],
)
def test_valid_urls_pass(url: str) -> None:
    assert check_url(url) == url
    if not url.startswith("memory"):
        rcache.Cache(url)  # nothing connects at construction


def test_password_is_never_in_the_message() -> None:
    for url in ("redis:/:s3cret@127.0.0.1:6379", "redis://u:s3cret@h:6379/x"):
        with pytest.raises(ConfigurationError) as info:
            rcache.Cache(url)
        assert "s3cret" not in str(info.value)
        assert "***" in str(info.value)


def test_url_from_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RCACHE_URL", "redis:/127.0.0.1:6379")
    with pytest.raises(ConfigurationError, match=r"redis://127\.0\.0\.1:6379"):
        rcache.Cache()
