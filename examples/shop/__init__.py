"""The shop: a Flask app with Celery workers, using rcache for caching, locks,
deduplicated tasks, cache warming, transactions and Prometheus metrics.

Web:    flask --app examples.shop.app run
Worker: celery -A examples.shop.tasks worker --pool=solo --loglevel=info
Beat:   celery -A examples.shop.tasks beat

All three read REDIS_URL (default redis://127.0.0.1:6379/0): Redis is the Celery broker,
the result backend and the cache.
"""
