"""The ``rcache`` command: look at and repair a running rcache deployment.

::

    rcache doctor redis://cache:6379/0      is this Redis fit for rcache?
    rcache stats --prefix shop              what the namespace holds
    rcache locks [--watch]                  held locks, RW locks, semaphores
    rcache locks release NAME --force       take a lock from a stuck holder
    rcache clear --prefix shop [--dry-run]  delete the namespace, in batches
    rcache invalidate-tag TAG               invalidate every entry under a tag
    rcache tasks                            rcache-celery's dedup and lock keys

The URL comes from ``--url``, else ``$RCACHE_URL``, else ``$REDIS_URL``; the prefix
from ``--prefix``, else ``$RCACHE_PREFIX``, else ``rcache``. ``--json`` prints
machine-readable output. Destructive commands ask first unless ``--yes``.

This module imports click; ``import rcache`` never imports it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

import click

from rcache._admin import ClearResult, LockInfo, clear_prefix
from rcache._cache import Cache
from rcache._exceptions import RCacheError
from rcache._version import __version__

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])

_URL_HELP = (
    "Redis URL (default: $RCACHE_URL, then $REDIS_URL, then redis://127.0.0.1:6379/0)"
)


# -- shared plumbing ---------------------------------------------------------------------


def _url_option(f: F, dest: str = "url") -> F:
    return click.option(
        "--url", dest, envvar=["RCACHE_URL", "REDIS_URL"], help=_URL_HELP
    )(f)


def _prefix_option(required: bool = False) -> Callable[[F], F]:
    def deco(f: F) -> F:
        return click.option(
            "--prefix",
            envvar="RCACHE_PREFIX",
            default=None if required else "rcache",
            show_default=not required,
            required=required,
            help="the Cache's prefix: only keys under '<prefix>:' are read or touched",
        )(f)

    return deco


def _json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="print JSON")(f)


def _yes_option(f: F) -> F:
    return click.option(
        "--yes", "-y", is_flag=True, help="do not ask for confirmation"
    )(f)


def _cache(url: str | None, prefix: str) -> Cache:
    try:
        return Cache(url, prefix=prefix, on_backend_error="raise")
    except RCacheError as exc:
        raise click.UsageError(str(exc)) from None


@contextmanager
def _errors(cache: Cache) -> Iterator[None]:
    """Redis errors become one line and exit status 1, not a traceback."""
    try:
        yield
    except RCacheError as exc:
        raise click.ClickException(
            f"{exc} (Redis at {cache._spec.describe()})"
        ) from None
    finally:
        cache.close()


def _plain(value: Any) -> Any:
    """JSON-safe: dataclasses as dicts, infinite leases as null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {
            f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
        }
        if hasattr(value, "pid"):
            out["pid"] = value.pid
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return None
    return value


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(_plain(value), indent=2, sort_keys=True))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], wrap: int = 0) -> str:
    """Aligned columns; ``wrap`` > 0 wraps the last column at that width."""
    if wrap:
        wrapped: list[list[Any]] = []
        for r in rows:
            lines = textwrap.wrap(str(r[-1]), wrap) or [""]
            wrapped.append([*r[:-1], lines[0]])
            wrapped += [[""] * (len(r) - 1) + [line] for line in lines[1:]]
        rows = wrapped
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _secs(v: float) -> str:
    return "no TTL" if math.isinf(v) else f"{v:.1f}s"


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# -- the group ---------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rcache")
def cli() -> None:
    """Inspect and repair rcache's data in Redis: doctor, stats, locks, clear, tags,
    Celery tasks. Every command reads only keys under '<prefix>:'."""


# -- doctor ------------------------------------------------------------------------------


@cli.command(short_help="Check that a Redis suits rcache.")
@click.argument("url", required=False)
@lambda f: _url_option(f, "url_opt")
@_prefix_option()
@_json_option
def doctor(url: str | None, url_opt: str | None, prefix: str, as_json: bool) -> None:
    """Check that the Redis at URL suits rcache: reachability, latency, version and
    mode, eviction policy, persistence, ACL permissions, clock skew.

    Exits 1 if a check fails."""
    from rcache._doctor import run_checks

    cache = _cache(url or url_opt, prefix)
    try:
        checks = run_checks(cache)
    finally:
        cache.close()
    if as_json:
        _emit_json(checks)
    else:
        marks = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "info": "info"}
        click.echo(
            _table(
                ["CHECK", "", "DETAIL"],
                [(c.name, marks[c.status], c.detail) for c in checks],
                wrap=72,
            )
        )
    if any(c.status == "fail" for c in checks):
        sys.exit(1)


# -- stats -------------------------------------------------------------------------------


@cli.command(short_help="Count entries, tags, locks and memory.")
@_url_option
@_prefix_option()
@_json_option
@click.option(
    "--sample", default=200, show_default=True, help="keys measured with MEMORY USAGE"
)
def stats(url: str | None, prefix: str, as_json: bool, sample: int) -> None:
    """Entries per function, tags, locks held and memory under the prefix."""
    cache = _cache(url, prefix)
    with _errors(cache):
        s = cache.stats(sample=sample)
    if as_json:
        _emit_json(s)
        return
    click.echo(
        _table(
            ["", ""],
            [
                ("prefix", f"{s.prefix}:"),
                ("keys", s.keys),
                ("entries", f"{s.entries} ({s.explicit_entries} explicit)"),
                ("tags", s.tags),
                ("computations in flight", s.computations),
                ("locks held", f"{s.locks_held} ({s.lock_keys} lock keys)"),
                ("celery keys", s.celery_keys),
                ("stamps, signals, other", s.other_keys),
                (
                    "memory (estimated)",
                    f"{_size(s.memory_bytes)} from {s.memory_sampled} sampled keys",
                ),
            ],
        ).split("\n", 2)[2]
    )
    if s.functions:
        click.echo()
        click.echo(
            _table(["FUNCTION", "ENTRIES"], [(f.name, f.entries) for f in s.functions])
        )


# -- locks -------------------------------------------------------------------------------


def _lock_rows(locks: list[LockInfo]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for info in locks:
        waiters = (
            str(info.waiters)
            if info.waiters is not None
            # plain locks keep no count, only a marker that outlives each wait by
            # up to ~20 s: "recent" means a waiter announced itself lately
            else ("recent" if info.waiting else "-")
        )
        fence = "-" if info.fence is None else info.fence
        if not info.holders:
            rows.append((info.name, info.kind, "-", "-", "-", "-", fence, waiters))
        for h in info.holders:
            rows.append(
                (
                    info.name,
                    info.kind,
                    h.mode,
                    h.token,
                    h.pid if h.pid is not None else "?",
                    _secs(h.remaining),
                    fence,
                    waiters,
                )
            )
    return rows


_LOCK_HEADERS = ["NAME", "KIND", "MODE", "HOLDER", "PID", "LEFT", "FENCE", "WAITERS"]


@cli.group(
    invoke_without_command=True,
    short_help="List held locks; release one by force.",
)
@_url_option
@_prefix_option()
@_json_option
@click.option("--watch", is_flag=True, help="refresh until Ctrl-C")
@click.option(
    "--interval", default=1.0, show_default=True, help="seconds between refreshes"
)
@click.option("--iterations", type=int, default=None, hidden=True)
@click.pass_context
def locks(
    ctx: click.Context,
    url: str | None,
    prefix: str,
    as_json: bool,
    watch: bool,
    interval: float,
    iterations: int | None,
) -> None:
    """Held locks, fair locks, RW locks and semaphores: holder, lease left, fence,
    waiters."""
    ctx.ensure_object(dict)
    ctx.obj.update(url=url, prefix=prefix, as_json=as_json)
    if ctx.invoked_subcommand is not None:
        return
    cache = _cache(url, prefix)
    n = 0
    with _errors(cache):
        try:
            while True:
                found = cache.locks()
                if as_json:
                    _emit_json(found)
                else:
                    if watch and sys.stdout.isatty():
                        click.clear()
                    if watch:
                        click.echo(time.strftime("%H:%M:%S") + f"  {prefix}:l:*")
                    if found:
                        click.echo(_table(_LOCK_HEADERS, _lock_rows(found)))
                    else:
                        click.echo(f"no lock held under {prefix}:")
                n += 1
                if not watch or (iterations is not None and n >= iterations):
                    break
                time.sleep(interval)
        except KeyboardInterrupt:
            click.echo()


@locks.command("release")
@click.argument("name")
@click.option("--url", "url", default=None, help="as for 'locks'")
@click.option("--prefix", default=None, help="as for 'locks'")
@_json_option
@click.option(
    "--force", is_flag=True, help="required: this takes the lock from a live holder"
)
@_yes_option
@click.pass_context
def locks_release(
    ctx: click.Context,
    name: str,
    url: str | None,
    prefix: str | None,
    as_json: bool,
    force: bool,
    yes: bool,
) -> None:
    """Take lock NAME from its holders: deletes the leases, bumps the fence (the old
    holder's release/extend then fail and fenced writes can be rejected) and wakes a
    waiter."""
    opts = dict(ctx.obj)
    # options may follow the subcommand too: rcache locks release NAME --url ... --force
    opts.update({k: v for k, v in (("url", url), ("prefix", prefix)) if v is not None})
    opts["as_json"] = opts["as_json"] or as_json
    if not force:
        raise click.UsageError(
            "releasing a lock someone holds needs --force: the holder may still be "
            "working, and only a resource that checks fences is protected from it"
        )
    if "{" in name or "}" in name or not name:
        raise click.UsageError(
            f"give the lock's name (as in cache.lock(name)), not a Redis key: {name!r}"
        )
    cache = _cache(opts["url"], opts["prefix"])
    with _errors(cache):
        held = [i for i in cache.locks() if i.name == name]
        if not held:
            click.echo(f"nothing holds {name!r} under {opts['prefix']}: (no change)")
            return
        if not opts["as_json"]:
            click.echo(_table(_LOCK_HEADERS, _lock_rows(held)))
        if not yes:
            click.confirm(f"Force-release {name!r}?", abort=True, err=True)
        results = []
        for info in held:
            if info.kind in ("lock", "fair lock"):
                results.append(cache.lock(name).force_release())
            elif info.kind == "rwlock":
                rw = cache.rwlock(name)
                results.append(rw.write().force_release())
                results.append(rw.read().force_release())
            else:
                results.append(cache.semaphore(name, limit=1).force_release())
    if opts["as_json"]:
        _emit_json(results)
        return
    for r in results:
        if r.released or r.fence is not None:
            fence = "" if r.fence is None else f"; fence now {r.fence}"
            click.echo(
                f"released {r.kind} {r.name!r}: {len(r.released)} holder(s){fence}"
            )


# -- clear -------------------------------------------------------------------------------


class _Interrupt:
    """SIGINT during a clear: finish the batch in flight, then stop and report."""

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.hit:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.hit = True

    def __enter__(self) -> _Interrupt:
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._old)


def _where(prefix: str) -> str:
    return f"under '{prefix}:'" if prefix else "in the whole database"


def _clear_summary(r: ClearResult) -> str:
    if r.dry_run:
        return (
            f"dry run: would delete {r.matched - r.kept} keys {_where(r.prefix)} and "
            f"keep {r.kept} lock/Celery keys ({r.seconds:.3f}s)"
        )
    head = "interrupted" if r.interrupted else "done"
    text = (
        f"{head}: deleted {r.deleted} keys {_where(r.prefix)} in {r.batches} batches "
        f"(longest {r.longest_batch_ms:.2f} ms) in {r.seconds:.3f}s; kept {r.kept} "
        "lock/Celery keys"
    )
    if r.interrupted:
        text += "; the rest is untouched: run the command again to finish"
    return text


@cli.command(short_help="Delete every key under the prefix, in batches.")
@_url_option
@_prefix_option(required=True)
@_json_option
@_yes_option
@click.option("--dry-run", is_flag=True, help="count, delete nothing")
@click.option(
    "--include-locks",
    is_flag=True,
    help="also delete lock keys, fence counters and Celery guards",
)
@click.option("--batch-size", default=500, show_default=True)
@click.option(
    "--allow-empty-prefix",
    is_flag=True,
    help="with --prefix '': delete EVERY key of the database",
)
def clear(
    url: str | None,
    prefix: str,
    as_json: bool,
    yes: bool,
    dry_run: bool,
    include_locks: bool,
    batch_size: int,
    allow_empty_prefix: bool,
) -> None:
    """Delete every key under '<prefix>:' (SCAN + UNLINK in batches, never KEYS).

    Locks, fence counters and Celery guard keys are kept unless --include-locks.
    Ctrl-C stops after the batch in flight and prints what was deleted."""
    if not prefix and not allow_empty_prefix:
        raise click.UsageError(
            "an empty prefix means every key of the database: pass "
            "--allow-empty-prefix if that is what you want"
        )
    cache = _cache(url, prefix or "rcache")
    include = include_locks or not prefix
    with _errors(cache):
        counted = clear_prefix(
            cache._driver,
            prefix,
            dry_run=True,
            include_locks=include,
            batch_size=batch_size,
        )
        if dry_run:
            _emit_json(counted) if as_json else click.echo(_clear_summary(counted))
            return
        total = counted.matched - counted.kept
        if total == 0:
            _emit_json(counted) if as_json else click.echo(
                f"nothing to delete under {prefix}:"
            )
            return
        if not yes:
            click.confirm(
                f"Delete {total} keys {_where(prefix)} at {cache._spec.describe()}?",
                abort=True,
                err=True,
            )
        with (
            _Interrupt() as stop,
            click.progressbar(length=total, label="deleting", file=sys.stderr) as bar,
        ):
            done = 0

            def on_batch(progress: ClearResult) -> bool:
                nonlocal done
                bar.update(progress.deleted - done)
                done = progress.deleted
                return not stop.hit

            try:
                result = clear_prefix(
                    cache._driver,
                    prefix,
                    include_locks=include,
                    batch_size=batch_size,
                    on_batch=on_batch,
                )
            except KeyboardInterrupt:
                # a second Ctrl-C inside a round trip: the batch in flight is unknown
                click.echo(
                    f"\naborted: at least {done} keys were deleted; one batch (at most "
                    f"{batch_size} keys) may or may not have been; run again to finish",
                    err=True,
                )
                sys.exit(130)
    if as_json:
        _emit_json(result)
    else:
        click.echo(_clear_summary(result))
    if result.interrupted:
        sys.exit(130)


# -- tags --------------------------------------------------------------------------------


@cli.command("invalidate-tag", short_help="Invalidate every entry cached under TAG.")
@click.argument("tags", nargs=-1, required=True)
@_url_option
@_prefix_option()
@_json_option
@_yes_option
def invalidate_tag(
    tags: tuple[str, ...], url: str | None, prefix: str, as_json: bool, yes: bool
) -> None:
    """Invalidate every entry computed under TAG (O(1): deletes the tag's stamp)."""
    cache = _cache(url, prefix)
    with _errors(cache):
        if not yes:
            click.confirm(
                f"Invalidate tag(s) {', '.join(map(repr, tags))} under '{prefix}:'?",
                abort=True,
                err=True,
            )
        n = cache.invalidate_tags(*tags)
    if as_json:
        _emit_json({"tags": list(tags), "stamps_deleted": n})
    else:
        click.echo(
            f"invalidated {len(tags)} tag(s); {n} had entries "
            f"({len(tags) - n} had none)"
        )


# -- Celery ------------------------------------------------------------------------------


@cli.command(short_help="List rcache-celery task keys and their owners.")
@_url_option
@_prefix_option()
@_json_option
def tasks(url: str | None, prefix: str, as_json: bool) -> None:
    """rcache-celery's dedup (UniqueTask), lock (LockedTask) and warm keys, with the
    task ids that hold them and their states."""
    try:
        import rcache_celery
    except ImportError:
        raise click.ClickException(
            "rcache tasks needs the Celery integration: pip install rcache-celery"
        ) from None
    cache = _cache(url, prefix)
    with _errors(cache):
        guards = rcache_celery.task_guards(cache)
    if as_json:
        _emit_json(guards)
        return
    if not guards:
        click.echo(f"no task holds a key under {prefix}:celery:")
        return
    click.echo(
        _table(
            ["KIND", "TASK", "NAME", "TASK ID", "STATE", "LEFT"],
            [
                (g.kind, g.task or "-", g.name, g.task_id, g.state, _secs(g.remaining))
                for g in guards
            ],
        )
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``rcache`` console script and ``python -m rcache``."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="rcache")
