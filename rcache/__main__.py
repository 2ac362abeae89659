"""``python -m rcache``: the ``rcache`` command (see :mod:`rcache.cli`)."""

from __future__ import annotations

from rcache.cli import main

if __name__ == "__main__":
    main()
