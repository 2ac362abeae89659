"""Griffe extension for the API reference: Sphinx roles in docstrings become links.

rcache's docstrings use reST roles (``:class:`Cache```, ``:meth:`run```) so that they
read well in ``help()``; mkdocstrings renders Markdown and would print them literally.
Each role becomes an optional cross-reference to the public path (``rcache.Cache``,
not ``rcache._cache.Cache``): a link when that object is in the reference, plain code
when it is not (optional references never fail ``mkdocs build --strict``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|exc|mod|data|obj):`(~?)([^`]+)`")


def _public(path: str) -> str:
    """``rcache._cache.Cache.lock`` -> ``rcache.Cache.lock``: every public name is
    re-exported by its package, so private module segments are dropped."""
    parts = path.split(".")
    return ".".join(
        p for p in parts if not (p.startswith("_") and not p.endswith("__"))
    )


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx cross-reference roles once the whole package is loaded."""

    def on_package(
        self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any
    ) -> None:
        def exists(path: str) -> bool:
            try:
                loader.modules_collection.get_member(path)
            except (
                KeyError,
                ValueError,
                griffe.AliasResolutionError,
                griffe.CyclicAliasError,
            ):
                return False
            return True

        def visit(obj: griffe.Object | griffe.Alias) -> None:
            if obj.is_alias:
                return
            if obj.docstring is not None:
                obj.docstring.value = _ROLE.sub(
                    lambda m: rewrite(obj, m), obj.docstring.value
                )
            for member in obj.members.values():
                visit(member)

        def rewrite(obj: griffe.Object, match: re.Match[str]) -> str:
            tilde, target = match.groups()
            target = target.rstrip("()")
            shown = target.rsplit(".", 1)[-1] if tilde else target
            scopes = [obj.path, obj.parent.path if obj.parent else "", pkg.path]
            if obj.parent is not None and obj.parent.parent is not None:
                scopes.insert(2, obj.parent.parent.path)
            for scope in ([""] if "." in target else []) + scopes:
                candidate = f"{scope}.{target}" if scope else target
                if exists(candidate):
                    identifier = _public(candidate)
                    return f'<autoref identifier="{identifier}" optional><code>{shown}</code></autoref>'
            return f"`{shown}`"

        visit(pkg)
