"""Slot groups (_slots): the pure rules, checked against Redis Cluster's own hashing."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from redis.crc import key_slot

from rcache._exceptions import ConfigurationError
from rcache._slots import (
    DEFAULT_GROUPS,
    check_groups,
    check_prefix,
    group_of,
    group_tag,
)

_ALPHABET = "ab{}:[]\"' .é\\/0"


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, n)))


def test_every_key_of_an_entry_hashes_to_its_groups_slot_whatever_the_names() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        prefix = "".join(rng.choice("abc.:-_") for _ in range(rng.randint(1, 6)))
        fn, args, tag = _text(rng, 12), _text(rng, 20), _text(rng, 10)
        body = f"{fn}:[{args}]"
        base = group_tag(prefix, group_of(body, DEFAULT_GROUPS))
        keys = [
            f"{base}:c:{body}",
            f"{base}:c:{body}:lease",
            f"{base}:c:{body}:ready",
            f"{base}:s:f:{fn}",
            f"{base}:s:t:{tag}",
            f"{base}:k:{args}",
        ]
        slots = {key_slot(k.encode("utf-8", "surrogatepass")) for k in keys}
        assert len(slots) == 1, keys


def test_groups_spread_entries_and_are_stable_across_processes() -> None:
    bodies = [f"app.get_user:[{i}]" for i in range(20_000)]
    counts = [0] * DEFAULT_GROUPS
    for b in bodies:
        counts[group_of(b, DEFAULT_GROUPS)] += 1
    assert min(counts) > 0.5 * len(bodies) / DEFAULT_GROUPS
    # another interpreter (another hash seed) puts them in the same groups
    code = (
        "from rcache._slots import group_of;"
        "print([group_of(f'app.get_user:[{i}]', 256) for i in range(50)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "99"},
    ).stdout
    assert out.strip() == str([group_of(b, DEFAULT_GROUPS) for b in bodies[:50]])


@pytest.mark.parametrize("bad", [0, -1, 16385, 2.0, "256", True, None])
def test_a_bad_group_count_says_what_to_write(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="slot_groups=256"):
        check_groups(bad)


def test_a_prefix_with_braces_is_refused_on_a_cluster() -> None:
    assert check_prefix("shop") == "shop"
    with pytest.raises(ConfigurationError, match="braces"):
        check_prefix("sh{op}")
