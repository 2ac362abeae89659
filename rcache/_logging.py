"""Loggers and a rate limiter for warnings.

Logger names are stable (``rcache.cache``, ``rcache.lock``); messages use %-style
arguments and never carry cached values, keys or arguments (they may hold user data).
An outage must not produce one log line per call (cashews #150): ``RateLimitedLog`` emits
at most one WARNING per interval per topic, and says how many it held back.
"""

from __future__ import annotations

import logging
import threading
import time

cache_log = logging.getLogger("rcache.cache")
lock_log = logging.getLogger("rcache.lock")


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval: float = 30.0) -> None:
        self.logger = logger
        self.interval = interval
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, topic: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, topic, msg, *args)

    def error(self, topic: str, msg: str, *args: object) -> None:
        """Rate-limited like warnings: a misconfiguration fails every call."""
        self.log(logging.ERROR, topic, msg, *args)

    def log(self, level: int, topic: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(topic, 0.0):
                self._held[topic] = self._held.get(topic, 0) + 1
                return
            self._next[topic] = now + self.interval
            held = self._held.pop(topic, 0)
        if held:
            msg += " (%d similar messages suppressed in the last %.0fs)"
            args = (*args, held, self.interval)
        self.logger.log(level, msg, *args)
