"""Test helpers: a throwaway ``redis-server`` on a free loopback port, and a TCP proxy
that injects network faults.

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

``FaultProxy`` sits between a client and a server and breaks the network on demand::

    with RedisServer() as server, FaultProxy("127.0.0.1", server.port) as proxy:
        cache = rcache.Cache(proxy.url)
        proxy.drop_replies(2)  # the next two replies are lost (the commands ran)
        proxy.blackhole()      # a partition: nothing passes, connections stay open
        proxy.cut()            # every connection reset, new ones refused
        proxy.restore()        # back to normal
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

__all__ = [
    "FaultProxy",
    "RedisServer",
    "RedisServerNotFoundError",
    "free_port",
    "wait_until",
]


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


class FaultProxy:
    """A TCP proxy to ``target_host:target_port`` that drops, blackholes or cuts traffic.

    One daemon thread relays every connection (a selector loop), so the proxy costs one
    thread however many clients connect; at most ``max_connections`` are relayed at once
    (more are closed on accept). Faults apply to open connections at once:

    * :meth:`drop_replies`: bytes from the server are discarded (all of them, or the
      next ``count`` reads, which is one reply per command for request/response
      traffic): the commands run, their replies are lost.
    * :meth:`blackhole`: nothing passes either way and new connections are accepted but
      never relayed: a partition, as a client sees it (reads time out).
    * :meth:`cut`: every open connection is reset (RST) and new ones are closed at
      once, until :meth:`restore`.

    Use it as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        target_host: str = "127.0.0.1",
        target_port: int = 6379,
        *,
        port: int = 0,
        max_connections: int = 128,
        connect_timeout: float = 2.0,
    ) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self._mode = "pass"  # pass | drop | blackhole | cut
        self._drop_left: int | None = None
        self._lock = threading.Lock()
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._applied = threading.Event()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._selector = selectors.DefaultSelector()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``: point the client under test here."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def connections(self) -> int:
        """Client connections relayed now."""
        with self._lock:
            return len(self._pairs) // 2

    def start(self) -> FaultProxy:
        """Listen on 127.0.0.1 (``port``, or a free one) and start the relay thread."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.setblocking(False)
        self.port = int(listener.getsockname()[1])
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(
            target=self._run, name=f"rcache-fault-proxy-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    # -- faults ---------------------------------------------------------------------

    def drop_replies(self, count: int | None = None) -> None:
        """Discard server-to-client bytes: all (``None``) or the next ``count`` reads."""
        if count is not None and count < 1:
            raise ValueError("drop_replies(count) takes a count >= 1, or None for all")
        self._set("drop", count)

    def blackhole(self) -> None:
        """Relay nothing, either way, and leave connections open (a partition)."""
        self._set("blackhole", None)

    def cut(self) -> None:
        """Reset every open connection and close new ones until :meth:`restore`."""
        self._set("cut", None)

    def restore(self) -> None:
        """Relay normally again (connections reset by :meth:`cut` stay closed)."""
        self._set("pass", None)

    def _set(self, mode: str, count: int | None) -> None:
        with self._lock:
            self._mode = mode
            self._drop_left = count
            self._applied.clear()
        # The relay thread applies the change (it owns the sockets); wait for it so
        # that the fault is in force when this method returns.
        if self._thread is not None and self._thread.is_alive():
            assert self._wake_w is not None
            self._wake_w.send(b"x")
            self._applied.wait(5)

    # -- relay ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if key.data == "wake":
                    with contextlib.suppress(OSError):
                        sock.recv(4096)
                    self._apply()
                elif key.data == "accept":
                    self._accept()
                else:
                    self._relay(sock, key.data)
        self._close_all()

    def _apply(self) -> None:
        with self._lock:
            mode = self._mode
        if mode == "cut":
            for sock in list(self._pairs):
                self._drop(sock, reset=True)
        self._applied.set()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        with self._lock:
            mode, full = self._mode, len(self._pairs) // 2 >= self.max_connections
        if mode == "cut" or full:
            _reset(client)
            return
        client.setblocking(True)
        client.settimeout(5.0)
        if mode == "blackhole":
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # unconnected
        else:
            try:
                upstream = socket.create_connection(self.target, self.connect_timeout)
            except OSError:
                _reset(client)
                return
            upstream.settimeout(5.0)
        with self._lock:
            self._pairs[client] = upstream
            self._pairs[upstream] = client
        self._selector.register(client, selectors.EVENT_READ, "client")
        if upstream.fileno() >= 0 and mode != "blackhole":
            self._selector.register(upstream, selectors.EVENT_READ, "server")

    def _relay(self, sock: socket.socket, side: str) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(sock, reset=False)
            return
        with self._lock:
            mode = self._mode
            drop = mode == "blackhole" or (side == "server" and mode == "drop")
            if drop and side == "server" and mode == "drop" and self._drop_left:
                self._drop_left -= 1
                if self._drop_left == 0:
                    self._mode, self._drop_left = "pass", None
            peer = self._pairs.get(sock)
        if drop or peer is None:
            return
        try:
            peer.sendall(data)
        except OSError:
            self._drop(sock, reset=False)

    def _drop(self, sock: socket.socket, *, reset: bool) -> None:
        with self._lock:
            peer = self._pairs.pop(sock, None)
            if peer is not None:
                self._pairs.pop(peer, None)
        for each in (sock, peer):
            if each is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(each)
            if reset:
                _reset(each)
            else:
                each.close()

    def _close_all(self) -> None:
        for sock in list(self._pairs):
            self._drop(sock, reset=False)
        for own in (self._listener, self._wake_r, self._wake_w):
            if own is not None:
                own.close()
        self._selector.close()

    def close(self) -> None:
        """Stop relaying and close every socket (joins the relay thread)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            assert self._wake_w is not None
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            thread.join(5)
        else:
            self._selector.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0): a connection reset."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
