"""rcache: Redis doing real work for Python code.

Cache decorators with expiry for sync and async functions, with explicit behaviour when
Redis is down. Importing rcache has no side effects: no client, connection, thread or
metric exists until you create a :class:`Cache` and use it.

``rcache.metrics`` (Prometheus, extra ``prometheus``) and ``rcache.testing`` (a throwaway
``redis-server`` for tests) are public modules that are not imported here.
"""

from __future__ import annotations

from rcache._admin import (
    CacheStats,
    ClearResult,
    ForceReleaseResult,
    FunctionStats,
    Holder,
    LockInfo,
)
from rcache._cache import Cache
from rcache._config import BreakerPolicy, RetryPolicy, parse_duration
from rcache._exceptions import (
    BackendError,
    BackendMisconfiguredError,
    BackendUnavailableError,
    ConfigurationError,
    LockError,
    LockLostError,
    LockNotAcquiredError,
    LockNotOwnedError,
    LockNotReplicatedError,
    LockReleaseUnconfirmedError,
    RCacheError,
    SerializationError,
    TransactionConflictError,
    TransactionError,
)
from rcache._local import LocalTier
from rcache._lock import FairLock, Lease, Lock, ReadLock, RWLock, Semaphore, WriteLock
from rcache._metrics import InMemoryMetrics, MetricsSink
from rcache._serializers import (
    JsonSerializer,
    MsgpackSerializer,
    PickleSerializer,
    Serializer,
)
from rcache._transaction import Script, TransactionStats
from rcache._types import AsyncCachedFunction, CachedFunction
from rcache._version import __version__

__all__ = [
    "AsyncCachedFunction",
    "BackendError",
    "BackendMisconfiguredError",
    "BackendUnavailableError",
    "BreakerPolicy",
    "Cache",
    "CacheStats",
    "CachedFunction",
    "ClearResult",
    "ConfigurationError",
    "FairLock",
    "ForceReleaseResult",
    "FunctionStats",
    "Holder",
    "InMemoryMetrics",
    "JsonSerializer",
    "Lease",
    "LocalTier",
    "Lock",
    "LockError",
    "LockInfo",
    "LockLostError",
    "LockNotAcquiredError",
    "LockNotOwnedError",
    "LockNotReplicatedError",
    "LockReleaseUnconfirmedError",
    "MetricsSink",
    "MsgpackSerializer",
    "PickleSerializer",
    "RCacheError",
    "RWLock",
    "ReadLock",
    "RetryPolicy",
    "Script",
    "Semaphore",
    "SerializationError",
    "Serializer",
    "TransactionConflictError",
    "TransactionError",
    "TransactionStats",
    "WriteLock",
    "__version__",
    "parse_duration",
]
