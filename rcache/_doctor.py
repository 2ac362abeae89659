"""``rcache doctor``: is this Redis fit for rcache? (checks only; printing is in cli.py)

Each check returns a :class:`Check` (``ok``, ``warn``, ``fail`` or ``info``) with a
sentence an operator can act on. Nothing here writes to Redis: ACL permissions are
asked with ``ACL DRYRUN`` (Redis >= 7), which runs nothing.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from rcache._exceptions import RCacheError
from rcache._flow import Run
from rcache._keys import KeySpace
from rcache._redis import _text

if TYPE_CHECKING:
    from rcache._cache import Cache

__all__ = ["NEEDED_COMMANDS", "Check", "run_checks"]

Status = Literal["ok", "warn", "fail", "info"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


def _needed(prefix: str) -> list[list[str]]:
    """Commands rcache sends (directly or from its Lua scripts), with keys under the
    prefix so that ACL key patterns (``~prefix:*``) are checked too."""
    ks = KeySpace(prefix)
    k = ks.values("doctor") + "[]"  # the value key of a function doctor() of no args
    lk = ks.lock("doctor").base
    return [
        ["PING"],
        ["GET", k],
        ["SET", k, "v", "PX", "1000"],
        ["MGET", k, k],
        ["DEL", k],
        ["UNLINK", k],
        ["EXISTS", k],
        ["PEXPIRE", k, "1000"],
        ["PEXPIREAT", k, "1000"],
        ["PTTL", k],
        ["INCR", lk],
        ["TIME"],
        ["EVALSHA", "0" * 40, "1", lk],
        ["SCRIPT", "LOAD", "return 1"],
        ["LPUSH", lk, "1"],
        ["RPUSH", lk, "1"],
        ["LTRIM", lk, "0", "0"],
        ["BLPOP", lk, "1"],
        ["BLMOVE", lk, lk, "LEFT", "RIGHT", "1"],
        ["ZADD", lk, "1", "m"],
        ["ZREM", lk, "m"],
        ["ZSCORE", lk, "m"],
        ["ZCARD", lk],
        ["ZCOUNT", lk, "0", "1"],
        ["ZRANGE", lk, "0", "-1"],
        ["ZRANGEBYSCORE", lk, "0", "1"],
        ["ZREMRANGEBYSCORE", lk, "0", "1"],
        ["WATCH", k],
        ["MULTI"],
        ["EXEC"],
        ["SCAN", "0"],
        ["MEMORY", "USAGE", k],
    ]


def _label(cmd: list[str]) -> str:
    return " ".join(cmd[:2]) if cmd[0] in ("SCRIPT", "MEMORY") else cmd[0]


NEEDED_COMMANDS = [_label(c) for c in _needed("p")]

_POLICY = {
    "noeviction": (
        "ok",
        "Redis refuses writes when full instead of evicting: lock keys and fence "
        "counters are never evicted (cache writes fail open while memory is full)",
    ),
    "volatile": (
        "warn",
        "keys with a TTL may be evicted under memory pressure: a held lock (a PX "
        "lease) can vanish and a second holder get it; use noeviction, or a separate "
        "Redis/db with noeviction for locks",
    ),
    "allkeys": (
        "warn",
        "any key may be evicted under memory pressure, held locks and fence counters "
        "included (fences can then go backwards); use noeviction, or a separate "
        "Redis/db with noeviction for locks",
    ),
}


def _policy_check(policy: str, maxmemory: int | None) -> Check:
    head = policy.split("-", 1)[0]
    status, meaning = _POLICY.get(head, ("warn", "unknown policy"))
    if maxmemory == 0 and policy != "noeviction":
        status = "info"
        meaning = "maxmemory is 0 (no limit), so nothing is evicted today; " + meaning
    return Check("maxmemory-policy", status, f"{policy}: {meaning}")  # type: ignore[arg-type]


def _command(args: tuple[Any, ...]) -> Any:
    def op(client: Any) -> Any:
        return client.execute_command(*args)

    return op


def _once(cache: Cache, op: Any) -> Any:
    """``op(client)`` once (no retry, no breaker: the doctor reports what it sees)."""
    return cache._driver.execute(Run(op, retry=False))


def _run(cache: Cache, *args: Any) -> Any:
    return _once(cache, _command(args))


def _config(cache: Cache, pattern: str) -> dict[str, str]:
    """CONFIG GET as text (raises RCacheError where CONFIG is refused)."""
    reply = _run(cache, "CONFIG", "GET", pattern)
    if isinstance(reply, dict):
        items = list(reply.items())
    else:  # a flat [name, value, ...] list
        items = list(zip(reply[::2], reply[1::2], strict=True))
    return {_text(k): _text(v) for k, v in items}


def run_checks(cache: Cache, pings: int = 20) -> list[Check]:
    """Every check, in order; stops after reachability if Redis does not answer."""
    checks: list[Check] = []
    t0 = time.perf_counter()
    try:
        _run(cache, "PING")
    except RCacheError as exc:
        return [Check("reachable", "fail", f"{cache._spec.describe()}: {exc}")]
    first = (time.perf_counter() - t0) * 1000
    checks.append(
        Check(
            "reachable",
            "ok",
            f"{cache._spec.describe()} (connect + first PING {first:.1f} ms)",
        )
    )

    samples = []
    for _ in range(pings):
        t = time.perf_counter()
        _run(cache, "PING")
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    med = statistics.median(samples)
    checks.append(
        Check(
            "latency",
            "ok" if med < 5 else "warn",
            f"{pings} PINGs: min {samples[0]:.2f} / median {med:.2f} / max "
            f"{samples[-1]:.2f} ms"
            + ("" if med < 5 else " (a cache hit costs at least one round trip)"),
        )
    )

    info: dict[str, Any] = {}
    try:
        info = _once(cache, lambda c: c.info())
    except RCacheError as exc:
        checks.append(Check("server", "warn", f"INFO refused: {exc}"))
    if info:
        name = "Valkey" if "valkey_version" in info else "Redis"
        version = info.get("valkey_version") or info.get("redis_version", "?")
        mode = info.get("redis_mode") or info.get("server_mode") or "standalone"
        role = info.get("role", "?")
        detail = f"{name} {version}, mode {mode}, role {role}"
        status: Status = "ok"
        if mode == "sentinel":
            masters = _sentinel_masters(cache)
            detail += (
                ": this is a Sentinel, not a data node; point rcache at the primary"
                + (f" ({masters})" if masters else "")
            )
            # nothing else applies to a Sentinel: its other answers would only mislead
            return [*checks, Check("server", "fail", detail)]
        elif mode == "cluster":
            status = "warn"
            detail += (
                ": rcache talks to one node; lock keys are hash-tagged (one slot per "
                "lock) but clear/stats see only this node's keys"
            )
        elif role in ("slave", "replica"):
            status = "fail"
            detail += ": a read-only replica; rcache needs the primary"
        elif tuple(int(x) for x in str(version).split(".")[:2] if x.isdigit()) < (6, 2):
            status = "warn"
            detail += ": rcache needs Redis >= 6.2 (SET ... GET, BLMOVE)"
        checks.append(Check("server", status, detail))

    policy = None
    maxmemory = None
    try:
        reply = _config(cache, "maxmemory*")
        policy = reply.get("maxmemory-policy")
        maxmemory = int(reply.get("maxmemory") or 0)
    except RCacheError:
        if info:
            policy = info.get("maxmemory_policy")
            maxmemory = info.get("maxmemory")
    if policy:
        checks.append(_policy_check(str(policy), maxmemory))
    else:
        checks.append(
            Check("maxmemory-policy", "warn", "unknown (CONFIG GET and INFO refused)")
        )

    if info:
        aof = int(info.get("aof_enabled", 0)) == 1
        fsync = None
        try:
            fsync = _config(cache, "appendfsync").get("appendfsync")
        except RCacheError:
            pass
        if aof and fsync == "always":
            checks.append(
                Check(
                    "persistence",
                    "ok",
                    "AOF, appendfsync always: grants survive a crash",
                )
            )
        elif aof:
            checks.append(
                Check(
                    "persistence",
                    "info",
                    f"AOF, appendfsync {fsync or '?'}: a crash may lose up to ~1 s of "
                    "lock grants and fence increments",
                )
            )
        else:
            saves = ""
            try:
                saves = _config(cache, "save").get("save", "")
            except RCacheError:
                pass
            lost = " since the last snapshot" if saves else ""
            what = f"RDB snapshots only (save {saves!r})" if saves else "none"
            checks.append(
                Check(
                    "persistence",
                    "warn",
                    f"{what}: a restart loses held locks{lost}, so a second "
                    "holder can be granted a lock the first still holds (fences "
                    "still rise: a lost counter restarts from the server clock); "
                    "for locks that guard correctness use AOF (appendfsync always)",
                )
            )

    checks.append(_acl_check(cache))
    checks.append(_clock_check(cache))
    return checks


def _sentinel_masters(cache: Cache) -> str:
    """``name at host:port`` of the primaries a Sentinel monitors ("" if unknown)."""
    try:
        reply = _run(cache, "SENTINEL", "MASTERS")
    except RCacheError:
        return ""
    # redis-py parses the reply into {name: {field: value}}; a raw reply is a list of
    # flat [field, value, ...] lists
    entries = list(reply.values()) if isinstance(reply, dict) else list(reply or [])
    out = []
    for entry in entries:
        if not isinstance(entry, dict):
            entry = dict(zip(entry[::2], entry[1::2], strict=False))
        fields = {_text(k): _text(v) for k, v in entry.items()}
        out.append(f"{fields.get('name')} at {fields.get('ip')}:{fields.get('port')}")
    return ", ".join(out)


def _acl_check(cache: Cache) -> Check:
    try:
        user = _text(_run(cache, "ACL", "WHOAMI"))
    except RCacheError as exc:
        return Check("acl", "info", f"ACL WHOAMI refused ({exc}); permissions unknown")
    denied = []
    try:
        for cmd in _needed(cache.prefix):
            reply = _text(_run(cache, "ACL", "DRYRUN", user, *cmd))
            if reply != "OK":
                denied.append(_label(cmd))
    except RCacheError as exc:
        return Check(
            "acl",
            "info",
            f"user {user!r}; ACL DRYRUN not permitted or not supported ({exc}); "
            "permissions will show at first use",
        )
    if denied:
        return Check(
            "acl",
            "fail",
            f"user {user!r} may not run {', '.join(denied)} on {cache.prefix}:* keys; "
            f"grant them (ACL SETUSER {user} +<command> ~{cache.prefix}:*)",
        )
    return Check(
        "acl",
        "ok",
        f"user {user!r} may run all {len(_needed(cache.prefix))} commands rcache uses "
        f"on {cache.prefix}:* keys",
    )


def _clock_check(cache: Cache) -> Check:
    try:
        t0 = time.time()
        sec, usec = _once(cache, lambda c: c.time())
        t1 = time.time()
    except RCacheError as exc:
        return Check("clock", "info", f"TIME refused ({exc})")
    server = int(sec) + int(usec) / 1e6
    skew = server - (t0 + t1) / 2
    bound = (t1 - t0) / 2
    status: Status = "ok" if abs(skew) < 1 else "warn"
    detail = f"server - client = {skew * 1000:+.1f} ms (±{bound * 1000:.1f} ms)"
    if status == "warn":
        detail += (
            ": lock leases follow the server's clock, but cache freshness compares "
            "the writer's and the reader's clocks; run NTP on clients and server"
        )
    return Check("clock", status, detail)
