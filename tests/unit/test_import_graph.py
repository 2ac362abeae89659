"""No import cycles in rcache and rcache_celery (a static graph, read with ``ast``).

Every import counts, wherever it is written: at module level, inside a function (a
"lazy" import only hides a cycle until the first call) and under ``TYPE_CHECKING`` (a
cycle the type checker needs is one a reader has to untangle too). ``from pkg import
sub`` of a submodule counts as an import of ``pkg`` as well: the name is read from the
package, whose ``__init__`` imports everything else.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "rcache": ROOT / "rcache",
    "rcache_celery": ROOT / "integrations" / "celery" / "rcache_celery",
}

#: Cycles allowed: none. (Issue 13 took apart the four found when this test was
#: written: _cache/_decorated/_batch, _lock/_renewer, _lock/_admin and rcache_celery's
#: _install/_tasks.) A cycle found must lie inside one of these.
KNOWN_CYCLES: list[frozenset[str]] = []

Edge = tuple[str, str, str]  # (importer, imported, "path:line")


def _modules() -> dict[str, Path]:
    found = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest module of ``name`` that is ours (``a.b.c`` -> ``a.b`` if no c)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _edges(modules: dict[str, Path]) -> Iterator[Edge]:
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_known(alias.name, modules) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    head = package.split(".")[
                        : len(package.split(".")) - node.level + 1
                    ]
                    base = ".".join([*head, base] if base else head)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        targets.append(sub)
                    targets.append(_known(base, modules))
            for target in targets:
                if target is not None and target != module:
                    yield module, target, where


def _cycles(nodes: list[str], edges: list[Edge]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    succ: dict[str, set[str]] = {n: set() for n in nodes}
    for a, b, _ in edges:
        succ[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_every_kind_of_import() -> None:
    modules = _modules()
    assert {"rcache", "rcache._cache", "rcache.spi", "rcache_celery._tasks"} <= set(
        modules
    )
    edges = {(a, b) for a, b, _ in _edges(modules)}
    assert ("rcache", "rcache._cache") in edges  # module level
    assert ("rcache.spi", "rcache._keys") in edges
    # inside a function, and a submodule read through its package
    assert ("rcache_celery._install", "rcache_celery._tasks") in edges


def test_no_import_cycles() -> None:
    modules = _modules()
    edges = list(_edges(modules))
    unexpected = []
    for cycle in _cycles(sorted(modules), edges):
        if any(cycle <= known for known in KNOWN_CYCLES):
            continue
        inside = sorted(f"{a} -> {b} ({w})" for a, b, w in edges if {a, b} <= cycle)
        unexpected.append(
            "cycle " + " / ".join(sorted(cycle)) + ":\n  " + "\n  ".join(inside)
        )
    assert not unexpected, "\n".join(unexpected)
