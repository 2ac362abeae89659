"""Polling helpers shared by the rcache-celery tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from rcache.testing import RedisServer, wait_until

HERE = Path(__file__).resolve().parent


def runs(r: redis.Redis, token: str) -> int:
    return int(r.get(f"runs:{token}") or 0)


def eventually(
    predicate: Any, timeout: float = 20.0, message: str = "condition"
) -> Any:
    return wait_until(predicate, timeout=timeout, interval=0.02, message=message)


def stays(predicate: Any, seconds: float) -> bool:
    """True if ``predicate()`` holds at every poll for ``seconds`` (a negative check)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.02)
    return True


def delay_many(token: str, n: int, threads: int) -> list[str]:
    """``n`` concurrent ``unique.delay(token)`` calls from ``threads`` threads (run in a
    spawned process: it builds its own producer from ``$RCC_REDIS``)."""
    from concurrent.futures import ThreadPoolExecutor

    import rcc_app

    task = rcc_app.ns.unique
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: task.delay(token).id, range(n)))


def log_has(worker: Any, text: str, timeout: float = 20.0) -> bool:
    return bool(
        eventually(lambda: text in worker.log_text(), timeout, f"{text!r} in log")
    )


class Worker:
    """A ``celery worker`` (or, with ``command=["beat", ...]``, a beat) subprocess."""

    def __init__(
        self,
        name: str,
        server: RedisServer,
        tmp: Path,
        command: list[str] | None = None,
        **env: str,
    ) -> None:
        self.name = name
        self.log = tmp / f"{name}.log"
        environ = {
            **os.environ,
            "RCC_REDIS": f"redis://127.0.0.1:{server.port}",
            "PYTHONPATH": os.pathsep.join(
                [str(HERE), os.environ.get("PYTHONPATH", "")]
            ),
            **env,
        }
        if "PROMETHEUS_MULTIPROC_DIR" not in env:
            environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.env = env
        command = command or [
            "worker", "-P", "prefork", "-c", "2", "-n", f"{name}@rcc",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        cmd = [
            sys.executable, "-m", "celery", "-A", "rcc_app", *command,
            "--loglevel=info", f"--logfile={self.log}",
        ]  # fmt: skip
        self.err = (tmp / f"{name}.err").open("wb")  # closed in stop()
        self.process = subprocess.Popen(
            cmd,
            env=environ,
            cwd=str(HERE),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.err,
            start_new_session=True,
        )

    @property
    def hostname(self) -> str:
        return f"{self.name}@rcc"

    def wait_ready(self, app: Any, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited; see {self.log}")
            replies = app.control.ping(destination=[self.hostname], timeout=0.5)
            return any(self.hostname in reply for reply in replies)

        wait_until(ready, timeout=timeout, interval=0.1, message=f"worker {self.name}")

    def child_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        if self.process.poll() is None:
            # Warm shutdown of the main process; it stops its own children.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.err.close()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The worker's /metrics (its one exporter), as {(sample, labels): value}."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.env['RCC_METRICS_PORT']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
