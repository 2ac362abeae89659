"""Shared helpers of the benchmark scripts (not part of the test suite)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import redis


def commandstats(client: redis.Redis) -> dict[str, int]:
    """Calls per command, as counted by the server (scripts' inner commands included)."""
    info = client.info("commandstats")
    return {
        k.removeprefix("cmdstat_"): int(v["calls"])
        for k, v in info.items()
        # the benchmark's own CONFIG/INFO calls, and connection set-up (HELLO, CLIENT
        # SETINFO, the first PING) that every library pays once per connection
        if not k.removeprefix("cmdstat_").startswith(_SETUP)
    }


_SETUP = ("config", "info", "hello", "client", "ping", "select")


def client_commands(stats: dict[str, int], inner: dict[str, int] | None = None) -> int:
    """Commands sent by clients: every server-counted call minus those run inside scripts."""
    total = sum(stats.values())
    return total - sum((inner or {}).values())


def median_spread(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} (min {min(values):.1f}, max {max(values):.1f})"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = (str(c).ljust(w) for c, w in zip(r, widths, strict=True))
        return "| " + " | ".join(cells) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
