"""Griffe extension for the API reference: reST in docstrings becomes Markdown.

rcache's docstrings use reST roles (``:class:`Cache```, ``:meth:`run```) so that they
read well in ``help()``; mkdocstrings renders Markdown and would print them literally.
Each role becomes an optional cross-reference to the public path (``rcache.Cache``,
not ``rcache._cache.Cache``): a link when that object is in the reference, plain code
when it is not (optional references never fail ``mkdocs build --strict``). A reST
literal block (``Example::`` and an indented block) becomes a fenced Python block, and
prose after the ``:param:`` fields moves before them.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|exc|mod|data|obj):`(~?)([^`]+)`")


_FIELD = re.compile(
    r"^:(param|parameter|arg|key|keyword|type|raises?|except|exception|returns?|rtype"
    r"|yields?|var|ivar|cvar)\b"
)


def _fields_last(text: str) -> str:
    """Move prose written after the ``:param ...:`` fields before them: the Sphinx
    parser would otherwise fold it into the last field's description."""
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if _FIELD.match(line)), None)
    if start is None:
        return text
    end = start
    while end < len(lines):
        line = lines[end]
        if _FIELD.match(line) or (line[:1].isspace() and line.strip()):
            end += 1
            continue
        nxt = end
        while nxt < len(lines) and not lines[nxt].strip():
            nxt += 1
        if line.strip() or nxt == len(lines) or not _FIELD.match(lines[nxt]):
            break
        end = nxt
    after = lines[end:]
    if not any(line.strip() for line in after):
        return text
    while after and not after[0].strip():
        after.pop(0)
    return "\n".join([*lines[:start], *after, "", *lines[start:end]])


def _literal_blocks(text: str) -> str:
    """reST ``Example::`` + an indented block -> ``Example:`` + a fenced Python block."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        head = line.rstrip()[:-2].rstrip()
        indent = len(line) - len(line.lstrip())
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        block: list[str] = []
        while j < len(lines) and (
            not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent
        ):
            block.append(lines[j])
            j += 1
        while block and not block[-1].strip():
            block.pop()
        if not block:
            out.append(line)
            i += 1
            continue
        if head:
            out.append(head + ":")
        out += ["", "```python", textwrap.dedent("\n".join(block)), "```", ""]
        i = j
    return "\n".join(out)


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
                obj.docstring.value = _literal_blocks(
                    _fields_last(
                        _ROLE.sub(lambda m: rewrite(obj, m), obj.docstring.value)
                    )
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
