"""``python -m rcache``: the ``rcache`` command (see ``rcache/_cli.py``)."""

from __future__ import annotations

from rcache._cli import main

if __name__ == "__main__":
    main()
