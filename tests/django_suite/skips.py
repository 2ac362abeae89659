"""Django's generic cache tests (``BaseCacheTests``) that do not apply to rcache's backend.

Every other test of the family must pass; ``tests/integration/test_django_suite.py``
checks that the tests skipped in a run are exactly these, so a new Django test that does
not apply shows up as a failure to be listed here with its reason.

Not run at all: the tests that ``RedisCacheTests`` adds to the family
(``test_incr_write_connection``, ``test_cache_client_class``,
``test_get_backend_timeout_method``, ``test_get_connection_pool_index``,
``test_get_connection_pool``, ``test_get_client``, ``test_serializer_dumps``,
``test_redis_pool_options``): they inspect ``django.core.cache.backends.redis``'s own
client class, connection pools and serializer, which this backend does not use (the last
also passes redis-py settings at the top of OPTIONS, where this backend takes them under
``OPTIONS["redis_options"]``).
"""

from __future__ import annotations

#: Skipped under every serializer.
ALWAYS = {
    "test_cull": (
        "culling (OPTIONS MAX_ENTRIES/CULL_FREQUENCY) is a local-store feature: Redis "
        "evicts by its maxmemory-policy; the backend refuses these options, and the "
        "'cull' caches are left out as Django's own RedisCacheTests does"
    ),
    "test_zero_cull": "culling: as test_cull",
    "test_cull_delete_when_store_empty": "culling: as test_cull",
}

#: Skipped only under the default JSON serializer (they pass with "pickle").
JSON = {
    "test_data_types": (
        "stores a function and a class, which JSON cannot carry; they round-trip with "
        'OPTIONS={"serializer": "pickle"} (signed)'
    ),
    "test_cache_read_for_model_instance": (
        "stores a model instance: not JSON; passes under the signed pickle serializer"
    ),
    "test_cache_write_for_model_instance_with_deferred": (
        "stores a queryset: not JSON; passes under the signed pickle serializer"
    ),
    "test_cache_read_for_model_instance_with_deferred": (
        "stores a queryset: not JSON; passes under the signed pickle serializer"
    ),
    "test_cache_write_unpicklable_object": (
        "the cache middleware stores HttpResponse objects: not JSON; the middleware "
        "needs the signed pickle serializer"
    ),
    "test_add_fail_on_pickleerror": (
        "expects pickle.PickleError for an unpicklable value; JSON refuses every "
        "non-JSON value with rcache.SerializationError before any pickling"
    ),
    "test_set_fail_on_pickleerror": "as test_add_fail_on_pickleerror",
}


#: Skipped when the suite is driven through the async methods under "pickle".
ASYNC_PICKLE = {
    "test_cache_write_for_model_instance_with_deferred": (
        "pickling a lazy queryset runs its query; the native aset() pickles on the event "
        "loop, where Django refuses queries (SynchronousOnlyOperation). Django's default "
        "aset() runs set() in a thread; rcache's async methods never use threads (evaluate "
        "the queryset first, list(qs), or call set() from sync code)"
    ),
    "test_cache_read_for_model_instance_with_deferred": (
        "as test_cache_write_for_model_instance_with_deferred"
    ),
}


def for_run(serializer: str, mode: str = "sync") -> dict[str, str]:
    """The skip list of a run under ``serializer`` ("json" or "pickle") and ``mode``
    ("sync", or "async": the suite driven through the ``a``-methods)."""
    skips = {**ALWAYS, **(JSON if serializer == "json" else {})}
    if mode == "async" and serializer == "pickle":
        skips.update(ASYNC_PICKLE)
    return skips
