"""The one exception tree of rcache.

Every error rcache raises on purpose derives from :class:`RCacheError`; redis-py errors
are translated in exactly one place (:func:`rcache._redis.map_error`) and never escape
the public API raw::

    RCacheError(Exception)
    ├── ConfigurationError(RCacheError, ValueError)   bad ttl, URL, key template, ...
    ├── BackendError                                  Redis answered with an error
    │   ├── BackendUnavailableError                   refused, reset, timed out, breaker open
    │   └── BackendMisconfiguredError                 wrong password/db, ACL, WRONGTYPE...
    ├── SerializationError                            a value cannot be (de)serialized
    ├── LockError
    │   ├── LockNotAcquiredError(LockError, TimeoutError)
    │   │   └── LockNotReplicatedError                granted, but too few replicas acked
    │   ├── LockNotOwnedError                         release/extend by a non-owner
    │   ├── LockReleaseUnconfirmedError               release sent, its replies lost
    │   └── LockLostError                             the lease is gone while "held"
    └── TransactionError
        └── TransactionConflictError                  WATCH retries exhausted

All exceptions survive ``pickle`` round trips (celery-singleton #55: an exception that
cannot be unpickled kills a Celery worker), so every constructor argument is kept in
``self.args``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BackendError",
    "BackendMisconfiguredError",
    "BackendUnavailableError",
    "ConfigurationError",
    "LockError",
    "LockLostError",
    "LockNotAcquiredError",
    "LockNotOwnedError",
    "LockNotReplicatedError",
    "LockReleaseUnconfirmedError",
    "RCacheError",
    "SerializationError",
    "TransactionConflictError",
    "TransactionError",
]


class RCacheError(Exception):
    """Base class of every error raised by rcache."""


class ConfigurationError(RCacheError, ValueError):
    """A configuration mistake, raised at construction or decoration time."""


class BackendError(RCacheError):
    """Redis answered with an error. The redis-py exception is in ``.original``."""

    def __init__(self, message: str, original: BaseException | None = None) -> None:
        super().__init__(message, original)
        self.message = message
        self.original = original

    def __str__(self) -> str:
        return self.message


class BackendUnavailableError(BackendError):
    """Redis could not be reached (refused, reset, timed out) or the breaker is open."""


class BackendMisconfiguredError(BackendError):
    """Redis refused a command for a reason no retry can fix, only a change of
    configuration: wrong password or user, a database index the server does not have,
    a missing ACL permission, a key of the wrong type under rcache's prefix, a command
    the server does not know, a script it will not load.

    The message says what is wrong and what to change. Unlike
    :class:`BackendUnavailableError`, it does not open the circuit breaker (the server is
    reachable; treating it as an outage would hide the cause), and it is logged at
    ERROR. ``cache.check()`` raises it with the same diagnosis.
    """


class SerializationError(RCacheError):
    """A value could not be serialized or deserialized."""


class LockError(RCacheError):
    """Base class of lock errors. Locks fail closed: they never pretend to hold."""


class LockNotAcquiredError(LockError, TimeoutError):
    """The lock could not be acquired within the timeout."""


class LockNotReplicatedError(LockNotAcquiredError):
    """``min_replicas=`` was set, and Redis granted the lock but fewer replicas than
    ``required`` acknowledged the grant (``WAIT``) within ``replica_timeout``: the
    grant could be lost in a failover, so it was released again and not returned.

    Raised at once, not retried within the acquire's timeout (Redisson's
    ``syncSlaves`` throws likewise): a replica that is down or lagging is an outage to
    report, not contention to wait out.
    """

    def __init__(self, message: str, required: int = 0, acknowledged: int = 0) -> None:
        super().__init__(message, required, acknowledged)
        self.message = message
        self.required = required
        self.acknowledged = acknowledged

    def __str__(self) -> str:
        return self.message


class LockNotOwnedError(LockError):
    """Release or extend by a holder whose lease is gone or was never held."""


class LockReleaseUnconfirmedError(LockError):
    """A release was sent (and retried) but no reply came back.

    Redis most likely deleted the key (the replies were lost, not the command); if it
    did not, the lease ends by its TTL. The lease no longer counts as held, and calling
    ``release()`` again confirms the outcome without raising.
    """


class LockLostError(LockError):
    """The lease was lost (expired, deleted or taken over) while it was believed held."""


class TransactionError(RCacheError):
    """Base class of transaction errors."""


class TransactionConflictError(TransactionError):
    """Optimistic transaction gave up after ``attempts`` WATCH conflicts on ``keys``."""

    def __init__(self, keys: Sequence[str], attempts: int) -> None:
        super().__init__(list(keys), attempts)
        self.keys = list(keys)
        self.attempts = attempts

    def __str__(self) -> str:
        return (
            f"transaction on {self.keys!r} gave up after {self.attempts} attempts: "
            "the watched keys kept changing (raise retries= or reduce contention)"
        )
