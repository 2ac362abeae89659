"""The API reference (docs/, built by ``mkdocs build --strict`` in scripts/check) covers
every public name, and every public name and method has a docstring to show there."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import rcache

ROOT = Path(__file__).resolve().parents[1]

#: Modules whose ``__all__`` is the public API.
PUBLIC_MODULES = (
    "rcache",
    "rcache.django",
    "rcache.metrics",
    "rcache.testing",
    "rcache.spi",
    "rcache.flask",
    "rcache.fastapi",
    "rcache_celery",
)


def _public_names() -> list[tuple[str, str]]:
    return [
        (module, name)
        for module in PUBLIC_MODULES
        for name in importlib.import_module(module).__all__
    ]


PUBLIC = _public_names()

# Implementations of these protocols are documented by the protocol's methods.
_PROTOCOLS = (rcache.MetricsSink, rcache.Serializer)
_PROTOCOL_METHODS = {
    name for proto in _PROTOCOLS for name in vars(proto) if not name.startswith("_")
}


def _own_doc(obj: Any) -> str | None:
    """The object's own docstring: not a dataclass's generated signature."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if inspect.isclass(obj) and doc and doc.startswith(f"{obj.__name__}("):
        return None
    return doc.strip() if doc else None


def _attribute_doc(module_name: str, name: str) -> str | None:
    """The string right after ``name = ...`` in the module that defines it."""
    module = importlib.import_module(module_name)
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    for node in tree.body:  # follow a re-export to the defining module
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and any(alias.name == name for alias in node.names)
        ):
            return _attribute_doc(node.module, name)
    for node, after in zip(tree.body, tree.body[1:], strict=False):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        if (
            any(isinstance(t, ast.Name) and t.id == name for t in targets)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
        ):
            return str(after.value.value).strip() or None
    return None


@pytest.mark.parametrize(("module", "name"), PUBLIC, ids=lambda v: str(v))
def test_public_name_has_a_docstring(module: str, name: str) -> None:
    obj = getattr(importlib.import_module(module), name)
    if inspect.isclass(obj) or inspect.isroutine(obj):
        doc = _own_doc(obj)
    else:  # constants and __version__: an attribute docstring in the source
        doc = _attribute_doc(module, name)
    assert doc, f"{module}.{name} has no docstring"


@pytest.mark.parametrize(
    ("module", "name"),
    [
        (m, n)
        for m, n in PUBLIC
        if inspect.isclass(getattr(importlib.import_module(m), n))
    ],
    ids=lambda v: str(v),
)
def test_public_methods_have_docstrings(module: str, name: str) -> None:
    cls = getattr(importlib.import_module(module), name)
    missing = []
    for attr, value in vars(cls).items():
        if attr.startswith("_") or issubclass(cls, BaseException):
            continue
        func = value.fget if isinstance(value, property) else value
        func = getattr(func, "__func__", func)  # classmethod, staticmethod
        if not (inspect.isroutine(func) or isinstance(value, property)):
            continue
        if attr in _PROTOCOL_METHODS and cls not in _PROTOCOLS:
            continue
        if not inspect.getdoc(func):
            missing.append(attr)
    assert not missing, f"{module}.{name}: no docstring on {missing}"


def _reference_identifiers() -> set[str]:
    found: set[str] = set()
    for page in (ROOT / "docs").rglob("*.md"):
        found.update(re.findall(r"^::: *(\S+)", page.read_text(), flags=re.M))
    return found


def test_every_public_name_is_in_the_reference() -> None:
    rendered = _reference_identifiers()
    missing = [f"{m}.{n}" for m, n in PUBLIC if f"{m}.{n}" not in rendered]
    assert not missing, f"add '::: name' lines under docs/reference/ for {missing}"
    # and nothing private or stale is rendered
    public = {f"{m}.{n}" for m, n in PUBLIC}
    assert rendered <= public, rendered - public


def test_mkdocs_config_builds_strict_with_the_reference_in_its_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^strict: true$", config, flags=re.M)
    pages = {
        p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")
    }
    nav = set(re.findall(r":\s*(\S+\.md)\s*$", config, flags=re.M))
    assert pages == nav, "every page of docs/ is in mkdocs.yml's nav"
    check = (ROOT / "scripts" / "check").read_text()
    assert "mkdocs build --strict" in check
