"""The two distributions of one commit install together (issue 12).

rcache-redis (import ``rcache``) and rcache-celery are released at the same version and
rcache-celery pins rcache-redis to exactly that version. The old pin ``rcache>=0.1,<0.2``
could never be met by the local ``0.1.0.dev0`` (a pre-release sorts before 0.1), so
``pip install ./integrations/celery`` failed; these tests keep the files agreeing.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pytest itself depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
CELERY = ROOT / "integrations" / "celery"


def pyproject(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((folder / "pyproject.toml").read_text())
    return data


def version_of(path: Path) -> str:
    """``__version__`` from a _version.py, read without importing (no stale install)."""
    for node in ast.parse(path.read_text()).body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
            and isinstance(node.value, ast.Constant)
        ):
            return str(node.value.value)
    raise AssertionError(f"no __version__ = '...' in {path}")


def celery_requirements() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in pyproject(CELERY)["project"]["dependencies"]]
    return {r.name: r for r in reqs}


def test_distribution_names() -> None:
    # "rcache" on PyPI is an unrelated project with the same import name.
    assert pyproject(ROOT)["project"]["name"] == "rcache-redis"
    assert pyproject(CELERY)["project"]["name"] == "rcache-celery"
    assert "rcache" not in celery_requirements()


def test_both_versions_and_the_pin_agree() -> None:
    core = version_of(ROOT / "rcache" / "_version.py")
    celery = version_of(CELERY / "rcache_celery" / "_version.py")
    assert core == celery, "release rcache-redis and rcache-celery at one version"
    pin = celery_requirements()["rcache-redis"]
    assert str(pin.specifier) == f"=={core}", (
        f"integrations/celery/pyproject.toml must pin rcache-redis=={core}, "
        f"found {pin.specifier}"
    )
    # The pin must admit its own version, pre-releases included (0.1.0.dev0).
    assert pin.specifier.contains(Version(core), prereleases=True)
    assert pin.specifier.contains(Version(core))


def test_celery_depends_on_celery_with_the_redis_transport() -> None:
    celery = celery_requirements()["celery"]
    assert "redis" in celery.extras


def test_license_is_shipped_by_both() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert (CELERY / "LICENSE").read_text() == text
    for folder in (ROOT, CELERY):
        project = pyproject(folder)["project"]
        assert project["license"] == "MIT"
        assert project["license-files"] == ["LICENSE"]


def test_project_urls_are_consistent() -> None:
    core = pyproject(ROOT)["project"]["urls"]
    celery = pyproject(CELERY)["project"]["urls"]
    names = {"Homepage", "Documentation", "Changelog", "Source", "Issues"}
    assert set(core) == set(celery) == names
    for name in ("Homepage", "Changelog", "Issues"):
        assert core[name] == celery[name]
    assert all(
        url.startswith(core["Homepage"]) for url in [*core.values(), *celery.values()]
    )
