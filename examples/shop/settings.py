"""Configuration from the environment (read once, at import, by the example app)."""

from __future__ import annotations

import os

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
#: seconds a product page stays fresh; the slow query it hides takes SLOW_QUERY seconds
PRODUCT_TTL = float(os.environ.get("SHOP_PRODUCT_TTL", "60"))
SLOW_QUERY = float(os.environ.get("SHOP_SLOW_QUERY", "0.3"))
REPORT_SECONDS = float(os.environ.get("SHOP_REPORT_SECONDS", "1.0"))
WARM_EVERY = float(os.environ.get("SHOP_WARM_EVERY", "45"))
