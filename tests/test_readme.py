"""Every ```python block of the READMEs (and docs/index.md) runs as pasted.

Blocks are found by pytest-examples (``find_examples``: file, lines, fence settings) and
each one is run the way a reader runs a pasted snippet: saved to a file and executed by
a fresh ``python`` process (so every block gets a fresh namespace, fresh module state
such as prometheus_client's default registry and Celery's current app, and its threads,
servers and sockets end with it). Before each block the test server is flushed. The
interpreter runs with ``-W error``, so a block that leaves a connection unclosed (an
async client after ``asyncio.run``: end ``main()`` with ``await cache.aclose()``) or
uses a deprecated API fails.

A block that queues Celery tasks carries ``worker="<module>"`` in its fence line: it is
saved as ``<module>.py`` and run, then a real ``celery -A <module> worker`` runs what it
queued, and every task must succeed (:func:`run_queued_tasks`). A block that would need
a web server is written to run to completion without one.

The blocks are written against ``redis://127.0.0.1:6379/0``; :func:`localize` points
that address (any database number) at the session's throwaway ``redis-server``, and the
ports a block serves on (:data:`SERVED_PORTS`) at free ports, so runs never touch a
real Redis or collide with each other. ``$REDIS_URL`` and ``$RCACHE_URL`` point at the
test server too, for ``rcache.Cache()`` without arguments.

Opting a block out takes an explicit marker with a reason in its fence line,
```` ```python test="skip" reason="..." ````; :data:`ALLOWED_SKIPS` must list it too.
To add a document, add it to :data:`DOCS`; :func:`test_every_python_fence_is_collected`
checks that no ``python`` block, nor an untagged one, escapes collection.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pytest_examples import CodeExample, EvalExample, find_examples

from rcache.testing import RedisServer, free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]

#: Markdown files whose Python blocks are run.
DOCS = ("README.md", "integrations/celery/README.md", "docs/index.md")

#: Ports that README blocks serve on (metrics exporters, web apps); each is replaced by a
#: free port, the same one everywhere within a block.
SERVED_PORTS = (5000, 8000, 9100, 9101, 9808)

#: ``"path:first line"`` of blocks allowed to carry ``test="skip"``. Keep it empty.
ALLOWED_SKIPS: frozenset[str] = frozenset()

#: Seconds one block may take; they take well under one each.
BLOCK_TIMEOUT = 60

_REDIS_ADDRESS = re.compile(r"(?:127\.0\.0\.1|localhost):6379\b")
_FENCE = re.compile(r"^ *```(\S*)")


def _examples() -> list[CodeExample]:
    return [ex for doc in DOCS for ex in find_examples(ROOT / doc)]


EXAMPLES = _examples()


def _id(example: CodeExample) -> str:
    return f"{example.path.relative_to(ROOT)}:{example.start_line}"


def localize(source: str, redis_port: int) -> str:
    """The block's source with its Redis address and served ports made local to the test."""
    source = _REDIS_ADDRESS.sub(f"127.0.0.1:{redis_port}", source)
    source = re.sub(r"\b6379\b", str(redis_port), source)  # port=6379, REDIS_PORT=6379
    for port in SERVED_PORTS:
        source = re.sub(rf"(?<![\d.]){port}(?!\d|\.\d)", str(free_port()), source)
    return source


def test_localize_rewrites_every_redis_address_and_served_port() -> None:
    source = (
        'Cache("redis://127.0.0.1:6379/0"); Cache("redis://localhost:6379/1")\n'
        'redis.Redis(host="127.0.0.1", port=6379)\n'
        "start_http_server(9100)  # http://127.0.0.1:9100/metrics; 19100 and 9100.5 stay\n"
    )
    out = localize(source, 40123)
    assert (
        'Cache("redis://127.0.0.1:40123/0"); Cache("redis://127.0.0.1:40123/1")' in out
    )
    assert "port=40123)" in out and "6379" not in out
    assert "(9100)" not in out and ":9100/" not in out
    assert "19100" in out and "9100.5" in out


def _fenced_blocks(doc: str) -> list[tuple[int, str]]:
    """(line, info string) of every opening fence, by a parser independent of the tool's."""
    opening: list[tuple[int, str]] = []
    inside = False
    for number, line in enumerate((ROOT / doc).read_text().splitlines(), start=1):
        match = _FENCE.match(line)
        if match is None:
            continue
        if not inside:
            opening.append((number, match.group(1)))
        inside = not inside
    assert not inside, f"{doc}: a code fence is never closed"
    return opening


@pytest.mark.parametrize("doc", DOCS)
def test_every_python_fence_is_collected(doc: str) -> None:
    fences = _fenced_blocks(doc)
    # An untagged fence could hide Python from collection: every fence names its language.
    untagged = [line for line, info in fences if not info]
    assert not untagged, f"{doc}: fences without a language at lines {untagged}"
    python = [line for line, info in fences if info.lower() in ("python", "py")]
    collected = [ex.start_line for ex in EXAMPLES if ex.path == ROOT / doc]
    assert collected == python
    assert python, f"{doc} has no python block"


def test_skips_are_explicit_listed_and_explained() -> None:
    skipped = {
        _id(ex): ex.prefix_settings()
        for ex in EXAMPLES
        if ex.prefix_settings().get("test") == "skip"
    }
    assert set(skipped) == ALLOWED_SKIPS
    for where, settings in skipped.items():
        assert settings.get("reason"), f'{where}: test="skip" needs reason="..."'


@pytest.mark.parametrize("example", EXAMPLES, ids=_id)
def test_block_runs_as_pasted(
    example: CodeExample, redis_server: RedisServer, redis_url: str, tmp_path: Path
) -> None:
    settings = example.prefix_settings()
    if settings.get("test") == "skip":
        pytest.skip(settings.get("reason", "no reason given"))
    client = redis_server.client()
    client.flushall()
    client.close()
    worker_app = settings.get("worker")  # the module name the text tells readers to use
    script = tmp_path / f"{worker_app or 'block'}.py"
    script.write_text(localize(example.source, redis_server.port))
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_MULTIPROC")
    }
    env.update(REDIS_URL=redis_url, RCACHE_URL=redis_url, PYTHONUNBUFFERED="1")
    try:
        out = subprocess.run(
            [sys.executable, "-W", "error", str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{_id(example)} did not finish in {BLOCK_TIMEOUT} s: {exc.output}")
    assert out.returncode == 0, (
        f"{_id(example)} failed (run as {script}):\n{out.stdout}\n{out.stderr}"
    )
    # An exception in a thread or a __del__ does not change the exit status.
    assert "Traceback" not in out.stderr, out.stderr
    if worker_app:
        run_queued_tasks(worker_app, redis_server, tmp_path, env)


def _queued_task_ids(server: RedisServer) -> list[str]:
    """Ids of the task messages waiting in the default ``celery`` queue of any db."""
    ids = []
    for db in range(16):
        client = server.client(db=db)
        for raw in client.lrange("celery", 0, -1):
            ids.append(json.loads(raw)["headers"]["id"])
        client.close()
    return ids


def _task_states(server: RedisServer, ids: list[str]) -> dict[str, str]:
    """Celery's Redis result backend: ``celery-task-meta-<id>`` in any db."""
    states: dict[str, str] = {}
    for db in range(16):
        client = server.client(db=db)
        for task_id in ids:
            raw = client.get(f"celery-task-meta-{task_id}")
            if raw is not None:
                states[task_id] = json.loads(raw)["status"]
        client.close()
    return states


def run_queued_tasks(
    app: str, server: RedisServer, cwd: Path, env: dict[str, str]
) -> None:
    """Run what the block queued in a real ``celery -A <app> worker``, as the text says,
    and require every task to succeed. The worker starts only after the block ended, so
    the block's own checks (one task for two ``delay()`` calls) are not racing it."""
    ids = _queued_task_ids(server)
    assert ids, f"worker={app!r} but the block queued no task"
    log = cwd / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, "worker", "--pool=solo",
             "--without-gossip", "--without-mingle", "--without-heartbeat",
             "--loglevel=INFO"],
            cwd=cwd,
            env={**env, "PYTHONPATH": str(cwd)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        states = wait_until(
            lambda: (s := _task_states(server, ids)).keys() == set(ids) and s,
            timeout=BLOCK_TIMEOUT,
            interval=0.1,
            message=f"the worker to run {ids}",
        )
    except TimeoutError:
        pytest.fail(f"celery -A {app} worker did not run {ids}:\n{log.read_text()}")
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    assert set(states.values()) == {"SUCCESS"}, f"{states}\n{log.read_text()}"


@pytest.mark.parametrize("example", EXAMPLES, ids=_id)
def test_block_is_formatted_and_lint_clean(
    example: CodeExample, eval_example: EvalExample
) -> None:
    """Blocks read like the project's code: black at 88 columns, double quotes, sorted
    imports, no unused import or undefined name (fix with ``--update-examples``)."""
    eval_example.set_config(
        line_length=88,
        quotes="double",
        target_version="py310",
        isort=True,
        ruff_ignore=["I002"],  # from __future__ import annotations: not in snippets
    )
    if eval_example.update_examples:
        eval_example.format(example)
    else:
        eval_example.lint(example)
