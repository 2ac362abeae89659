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
no`` in a temporary directory and waits (with a deadline) until it answers PING. The binary
is ``executable=``, else ``$RCACHE_REDIS_SERVER`` (how ``scripts/test`` runs the suite on
Redis 8 or Valkey 9), else ``redis-server`` on PATH.

``RedisSentinel`` (a primary, a replica and three sentinels) and ``RedisCluster`` (N
primaries with replicas) are built from the same binary, for failover tests.

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
    "RedisCluster",
    "RedisSentinel",
    "RedisServer",
    "RedisServerNotFoundError",
    "default_executable",
    "free_port",
    "wait_until",
]


class RedisServerNotFoundError(FileNotFoundError):
    """No ``redis-server`` executable on PATH."""


def default_executable() -> str | None:
    """``$RCACHE_REDIS_SERVER`` if set, else ``redis-server`` on PATH, else None."""
    return os.environ.get("RCACHE_REDIS_SERVER") or shutil.which("redis-server")


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
        exe = executable or default_executable()
        if exe is None:
            raise RedisServerNotFoundError(
                "redis-server is not on PATH: run ./scripts/test (it installs it with apt), "
                "or apt-get install redis-server, or set $RCACHE_REDIS_SERVER"
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

    def _command(self, log: Path) -> list[str]:
        return [
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

    def _spawn(self) -> bool:
        cmd = self._command(self._dir / "redis.log")
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


def _cmd(client: Any, *args: Any) -> Any:
    # redis-py types execute_command as untyped; one Any-typed door for mypy --strict
    return client.execute_command(*args)


def _info(client: redis.Redis, section: str) -> dict[str, Any]:
    return dict(client.info(section))


class _SentinelNode(RedisServer):
    """A sentinel process: the same binary in ``--sentinel`` mode, with its own config."""

    def __init__(self, executable: str, monitor: str, primary_port: int) -> None:
        super().__init__(executable=executable)
        self.monitor = monitor
        self.primary_port = primary_port

    def _command(self, log: Path) -> list[str]:
        conf = self._dir / "sentinel.conf"
        # Sentinel rewrites its config file, so it must be a file of its own.
        conf.write_text(
            f"sentinel monitor {self.monitor} 127.0.0.1 {self.primary_port} 2\n"
            f"sentinel down-after-milliseconds {self.monitor} 1000\n"
            f"sentinel failover-timeout {self.monitor} 3000\n"
            f"sentinel parallel-syncs {self.monitor} 1\n"
        )
        return [
            self.executable,
            str(conf),
            "--sentinel",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self._dir),
            "--logfile",
            str(log),
            "--daemonize",
            "no",
        ]


def _sentinel_executable(server: str) -> str:
    # Debian ships redis-sentinel beside redis-server (package redis-sentinel); another
    # server binary (Redis 8, Valkey) runs as a sentinel with --sentinel.
    if os.environ.get("RCACHE_REDIS_SENTINEL"):
        return os.environ["RCACHE_REDIS_SENTINEL"]
    beside = Path(server).resolve().parent / "redis-sentinel"
    if Path(server).name == "redis-server" and beside.exists():
        return str(beside)
    return server


class RedisSentinel:
    """A Sentinel set that a test owns: one primary, one replica, three sentinels.

    ``url`` is the ``redis+sentinel://`` URL ``rcache.Cache`` accepts. ``kill_primary()``
    SIGKILLs the current primary; the sentinels (down-after 1 s) promote the replica in
    about 2 s. Ready in about 2 s::

        with RedisSentinel() as s:
            cache = rcache.Cache(s.url)
            s.kill_primary()
            s.wait_failover()
    """

    def __init__(
        self,
        *,
        service: str = "rcache",
        executable: str | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        exe = executable or default_executable()
        if exe is None:
            raise RedisServerNotFoundError(
                "redis-server is not on PATH: apt-get install redis-server redis-sentinel"
            )
        self.executable = exe
        self.service = service
        self.start_timeout = start_timeout
        self.servers: list[RedisServer] = []
        self.sentinels: list[RedisServer] = []

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL of this set, database 0."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of each sentinel, as ``redis.sentinel.Sentinel`` takes them."""
        return [("127.0.0.1", s.port) for s in self.sentinels]

    def start(self) -> RedisSentinel:
        """Start the primary, the replica and the sentinels; returns once every sentinel
        sees the replica and the other sentinels (so that a failover can be voted)."""
        args = ["--repl-diskless-sync-delay", "0"]
        try:
            primary = RedisServer(executable=self.executable, extra_args=args).start()
            self.servers.append(primary)
            replica_args = [*args, "--replicaof", "127.0.0.1", str(primary.port)]
            self.servers.append(
                RedisServer(executable=self.executable, extra_args=replica_args).start()
            )
            exe = _sentinel_executable(self.executable)
            for _ in range(3):
                node = _SentinelNode(exe, self.service, primary.port)
                self.sentinels.append(node.start())
            wait_until(
                self._ready,
                timeout=self.start_timeout,
                interval=0.02,
                message="the sentinels to see the replica and each other",
            )
        except BaseException:
            self.close()
            raise
        return self

    def _ready(self) -> bool:
        for node in self.sentinels:
            client = node.client(socket_timeout=1)
            try:
                replicas = _cmd(client, "SENTINEL REPLICAS", self.service)
                peers = _cmd(client, "SENTINEL SENTINELS", self.service)
            except redis.RedisError:
                return False
            finally:
                client.close()
            if len(replicas) < 1 or len(peers) < len(self.sentinels) - 1:
                return False
            if any("s_down" in str(r.get("flags", "")) for r in replicas):
                return False
        return True

    def primary_port(self) -> int:
        """The port of the primary the first answering sentinel names."""
        for node in self.sentinels:
            client = node.client(socket_timeout=1)
            try:
                host_port = _cmd(
                    client, "SENTINEL GET-MASTER-ADDR-BY-NAME", self.service
                )
                return int(host_port[1])
            except redis.RedisError:
                continue
            finally:
                client.close()
        raise RuntimeError("no sentinel answers")

    def primary(self) -> RedisServer:
        """The server the sentinels name as primary."""
        port = self.primary_port()
        return next(s for s in self.servers if s.port == port)

    def kill_primary(self) -> RedisServer:
        """SIGKILL the current primary; returns it (it stays down)."""
        server = self.primary()
        server.kill()
        return server

    def wait_failover(self, old_port: int, timeout: float = 10.0) -> RedisServer:
        """Wait until the sentinels name a primary other than ``old_port`` that answers
        as a primary; returns it."""

        def promoted() -> RedisServer | None:
            try:
                port = self.primary_port()
            except RuntimeError:
                return None
            if port == old_port:
                return None
            server = next(s for s in self.servers if s.port == port)
            return server if _role(server) == "master" else None

        result: RedisServer = wait_until(
            promoted, timeout=timeout, interval=0.02, message="a sentinel failover"
        )
        return result

    def close(self) -> None:
        """Stop every process and remove their directories."""
        for node in [*self.sentinels, *self.servers]:
            node.close()
        self.sentinels.clear()
        self.servers.clear()

    def __enter__(self) -> RedisSentinel:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _cluster_port() -> int:
    # The cluster bus listens on port + 10000, which must be a valid, free port too.
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster:
    """A Redis Cluster that a test owns: ``primaries`` primaries, each with ``replicas``
    replicas, slots split evenly. Built with CLUSTER ADDSLOTSRANGE, MEET and REPLICATE
    (no redis-cli), ready in about 2 s (Redis waits CLUSTER_WRITABLE_DELAY, 2 s, before
    a new primary accepts writes). ``node_timeout`` (ms) bounds how fast a SIGKILLed
    primary is replaced (about 2 s with the default 1000)::

        with RedisCluster() as cluster:
            client = cluster.client()
            victim = cluster.kill_primary()
            cluster.wait_promoted(victim)
    """

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 1,
        *,
        executable: str | None = None,
        node_timeout: int = 1000,
        start_timeout: float = 30.0,
    ) -> None:
        if primaries < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one primary")
        self.executable = executable or default_executable()
        self.n_primaries = primaries
        self.n_replicas = replicas
        self.node_timeout = node_timeout
        self.start_timeout = start_timeout
        self.nodes: list[RedisServer] = []
        self._owned: dict[int, int] = {}  # killed port -> one slot it served

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL rcache.Cache accepts (every live node as a seed)."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes if n.running)
        return f"redis+cluster://{hosts}"

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A new redis-py cluster client (short timeouts)."""
        from redis.cluster import ClusterNode
        from redis.cluster import RedisCluster as Client

        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("socket_connect_timeout", 2)
        seeds = [
            ClusterNode("127.0.0.1", n.port)  # type: ignore[no-untyped-call]
            for n in self.nodes
            if n.running
        ]
        return Client(startup_nodes=seeds, **kwargs)

    def start(self) -> RedisCluster:
        """Start the nodes, assign the slots, join them and attach the replicas;
        returns once every node reports cluster_state:ok and every replica is linked."""
        args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self.node_timeout),
            "--repl-diskless-sync-delay",
            "0",
        ]
        total = self.n_primaries * (1 + self.n_replicas)
        try:
            for _ in range(total):
                node = RedisServer(
                    _cluster_port(), executable=self.executable, extra_args=args
                )
                self.nodes.append(node.start())
            self._form()
        except BaseException:
            self.close()
            raise
        return self

    def _form(self) -> None:
        clients = [n.client() for n in self.nodes]
        try:
            ids = [str(_text(_cmd(c, "CLUSTER MYID"))) for c in clients]
            step = 16384 // self.n_primaries
            for i in range(self.n_primaries):
                lo = i * step
                hi = 16383 if i == self.n_primaries - 1 else (i + 1) * step - 1
                _cmd(clients[i], "CLUSTER ADDSLOTSRANGE", lo, hi)
            for c in clients[1:]:
                _cmd(c, "CLUSTER MEET", "127.0.0.1", self.nodes[0].port)

            def all_known() -> bool:
                return all(
                    len(_cmd(c, "CLUSTER NODES")) == len(clients) for c in clients
                )

            wait_until(all_known, timeout=self.start_timeout, message="CLUSTER MEET")
            for r in range(self.n_primaries * self.n_replicas):
                replica = clients[self.n_primaries + r]
                _cmd(replica, "CLUSTER REPLICATE", ids[r % self.n_primaries])

            def healthy() -> bool:
                if not all(_cluster_ok(c) for c in clients):
                    return False
                for c in clients[self.n_primaries :]:
                    if _info(c, "replication").get("master_link_status") != "up":
                        return False
                return True

            wait_until(
                healthy, timeout=self.start_timeout, interval=0.02, message="cluster ok"
            )
        finally:
            for c in clients:
                c.close()

    def primaries(self) -> list[RedisServer]:
        """The live nodes that are primaries now."""
        return [n for n in self.nodes if _role(n) == "master"]

    def replicas(self) -> list[RedisServer]:
        """The live nodes that are replicas now."""
        return [n for n in self.nodes if _role(n) == "slave"]

    def node_for(self, key: str | bytes) -> RedisServer:
        """The live primary serving ``key``'s slot."""
        client = self.client()
        try:
            slot = client.keyslot(key)  # type: ignore[no-untyped-call]
            node = client.nodes_manager.get_node_from_slot(slot)
            return next(n for n in self.nodes if n.port == node.port)
        finally:
            client.close()

    def flush(self) -> None:
        """FLUSHALL on every primary (between tests)."""
        for node in self.primaries():
            client = node.client()
            try:
                client.flushall()
            finally:
                client.close()

    def _slots(self, node: RedisServer) -> list[Any]:
        client = node.client(socket_timeout=1)
        try:
            if not _cluster_ok(client):
                return []
            return list(_cmd(client, "CLUSTER SLOTS"))
        except redis.RedisError:
            return []
        finally:
            client.close()

    def kill_primary(self, node: RedisServer | None = None) -> RedisServer:
        """SIGKILL ``node`` (default: the first primary); returns it."""
        victim = node or self.primaries()[0]
        for shard in self._slots(victim):
            if int(shard[2][1]) == victim.port:
                self._owned[victim.port] = int(shard[0])
        victim.kill()
        return victim

    def wait_promoted(self, killed: RedisServer, timeout: float = 15.0) -> RedisServer:
        """Wait until a replica of ``killed`` (stopped by ``kill_primary``) serves its
        slots and every live node reports cluster_state:ok; returns the new primary."""
        slot = self._owned[killed.port]

        def promoted() -> RedisServer | None:
            owner = None
            for node in self.nodes:
                if not node.running:
                    continue
                shards = self._slots(node)
                if not shards:
                    return None
                for lo, hi, primary, *_ in shards:
                    if int(lo) <= slot <= int(hi):
                        if owner not in (None, int(primary[1])):
                            return None  # the nodes disagree yet
                        owner = int(primary[1])
            if owner is None or owner == killed.port:
                return None
            return next(n for n in self.nodes if n.port == owner)

        result: RedisServer = wait_until(
            promoted, timeout=timeout, interval=0.02, message="a replica promotion"
        )
        return result

    def failover(self, replica: RedisServer, timeout: float = 10.0) -> None:
        """A graceful CLUSTER FAILOVER on ``replica``; waits until it is a primary."""
        client = replica.client()
        try:
            _cmd(client, "CLUSTER FAILOVER")
        finally:
            client.close()
        wait_until(
            lambda: _role(replica) == "master",
            timeout=timeout,
            message="CLUSTER FAILOVER",
        )

    def close(self) -> None:
        """Stop every node and remove their directories."""
        for node in self.nodes:
            node.close()
        self.nodes.clear()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _role(node: RedisServer) -> str | None:
    """``"master"`` or ``"slave"`` (ROLE), or None for a node that does not answer."""
    if not node.running:
        return None
    client = node.client(socket_timeout=1)
    try:
        return str(_text(_cmd(client, "ROLE")[0]))
    except redis.RedisError:
        return None
    finally:
        client.close()


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _cluster_ok(client: redis.Redis) -> bool:
    info = _cmd(client, "CLUSTER INFO")  # parsed into a dict by redis-py
    if isinstance(info, dict):
        return bool(_text(info.get("cluster_state")) == "ok")
    return "cluster_state:ok" in _text(info)
