"""Test helpers: a throwaway ``redis-server`` on a free loopback port.

Public and semver-covered. Tests that need Redis should start their own server so that
they can kill, pause and restart it, and never touch a shared server::

    from rcache.testing import RedisServer

    with RedisServer() as server:
        cache = rcache.Cache(server.url)
        ...
        server.kill()      # SIGKILL: an outage
        server.restart()   # same port, empty dataset

``RedisServer`` runs ``redis-server --port <free> --bind 127.0.0.1 --save '' --appendonly
no`` in a temporary directory and waits (with a deadline) until it answers PING.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

__all__ = ["RedisServer", "RedisServerNotFoundError", "free_port", "wait_until"]


class RedisServerNotFoundError(FileNotFoundError):
    """No ``redis-server`` executable on PATH."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Any,
    timeout: float = 10.0,
    interval: float = 0.005,
    message: str = "condition",
) -> Any:
    """Poll ``predicate()`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def _kill_quietly(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


class RedisServer:
    """A ``redis-server`` child process that a test owns."""

    def __init__(
        self,
        port: int | None = None,
        *,
        executable: str | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 10.0,
    ) -> None:
        exe = executable or shutil.which("redis-server")
        if exe is None:
            raise RedisServerNotFoundError(
                "redis-server is not on PATH: run ./scripts/test (it installs it with apt), "
                "or apt-get install redis-server"
            )
        self.executable = exe
        self.port = port or 0
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="rcache-redis-"))

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new redis-py client for this server (short timeouts)."""
        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("socket_connect_timeout", 2)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING; returns ``self``."""
        fixed = bool(self.port)
        for _ in range(5):
            if not fixed:
                self.port = free_port()
            if self._spawn():
                return self
            if fixed:
                time.sleep(
                    0.05
                )  # same port after a kill: the socket may linger briefly
        raise RuntimeError(f"redis-server did not start; see {self._dir / 'redis.log'}")

    def _spawn(self) -> bool:
        log = self._dir / "redis.log"
        cmd = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._dir),
            "--logfile",
            str(log),
            "--daemonize",
            "no",
            *self.extra_args,
        ]
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # a test that dies before close() must not leave a server behind
        weakref.finalize(self, _kill_quietly, self.process)
        deadline = time.monotonic() + self.start_timeout
        client = self.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False  # exited: port taken, most likely
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return True
                time.sleep(0.01)
        finally:
            client.close()
        self.kill()
        return False

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM; nothing is saved), killing it if it does not go."""
        if not self.running:
            return
        assert self.process is not None
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server: an abrupt outage."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP the server: it stops answering but keeps its sockets."""
        if self.running:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self.running:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGCONT)

    def restart(self) -> RedisServer:
        """Kill and start again on the same port (the dataset is gone)."""
        self.kill()
        return self.start()

    def close(self) -> None:
        """Stop the server and delete its working directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
