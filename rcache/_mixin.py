"""What the lock mixin may use of ``Cache``.

``Cache`` takes its lock methods from ``LockMixin`` (``_lock.py``); this base declares,
for the type checker, the attributes that mixin reads. (Transactions and the admin
operations are plain ``Cache`` methods over flows.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rcache._config import RetryPolicy
    from rcache._flow import AsyncDriver, SyncDriver
    from rcache._keys import KeySpace
    from rcache._metrics import MetricsSink
    from rcache._redis import AsyncRedis, ClientSpec, SyncRedis
    from rcache._serializers import Serializer


class CacheBase:
    prefix: str
    keyspace: KeySpace
    name: str
    retry: RetryPolicy
    serializer: Serializer
    metrics: MetricsSink
    _spec: ClientSpec
    _sync: SyncRedis
    _async: AsyncRedis
    _driver: SyncDriver
    _adriver: AsyncDriver
