"""Shared helpers of the benchmark scripts (not part of the test suite)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import redis


def load_note() -> str:
    """The machine's load, to print beside timings: on a busy machine (load above the
    CPU count) absolute times and ratios move, bytecode counts do not."""
    import os

    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average: unknown"
    cpus = os.cpu_count() or 1
    busy = " (busy: figures spread more than usual)" if one > cpus else ""
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {cpus} CPUs{busy}"


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


class RoundTrips:
    """Counts client round trips of sync redis-py clients (every send of a command or a
    pipeline is one), by wrapping ``send_packed_command`` while the block runs."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> RoundTrips:
        import redis.connection

        cls = redis.connection.AbstractConnection
        self._cls, self._orig = cls, cls.send_packed_command
        counter = self

        def send(conn: object, command: object, check_health: bool = True) -> None:
            counter.count += 1
            counter._orig(conn, command, check_health)  # type: ignore[arg-type]

        cls.send_packed_command = send  # type: ignore[method-assign, assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        self._cls.send_packed_command = self._orig  # type: ignore[method-assign]
