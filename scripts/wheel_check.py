#!/usr/bin/env python3
"""Check the built distributions' contents (run by scripts/wheel-smoke).

    python3 scripts/wheel_check.py DIST_DIR

DIST_DIR holds the wheel and sdist of rcache-redis and of rcache-celery (``uv build
--all-packages``). Checked, against this checkout's sources:

- each wheel carries its ``py.typed`` and every ``_scripts/*.lua`` of its package;
- no tests in either wheel; rcache-redis's wheel and sdist hold nothing of
  ``integrations/`` (nor ``rcache_celery``), rcache-celery's wheel does not bundle rcache;
- both carry the MIT license: ``License-Expression: MIT`` and the LICENSE file in the
  wheel's METADATA / ``.dist-info/licenses``, and LICENSE in the sdist;
- one version for both, equal to both ``_version.py``, and rcache-celery requires
  ``rcache-redis==<that version>`` and ``celery[redis]``.

Standard library only, so that it runs before any environment exists.
"""

from __future__ import annotations

import ast
import sys
import tarfile
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    # distribution (normalized for file names) -> (import package, source folder)
    "rcache_redis": ("rcache", ROOT / "rcache"),
    "rcache_celery": (
        "rcache_celery",
        ROOT / "integrations" / "celery" / "rcache_celery",
    ),
}

problems: list[str] = []


def check(ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def source_version(package_dir: Path) -> str:
    tree = ast.parse((package_dir / "_version.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            return str(node.value.value)
    raise SystemExit(f"wheel-check: no __version__ in {package_dir / '_version.py'}")


def expected_files(package: str, package_dir: Path) -> set[str]:
    """py.typed and every Lua script of ``package``, as paths inside a wheel."""
    lua = {
        f"{package}/_scripts/{p.name}" for p in (package_dir / "_scripts").glob("*.lua")
    }
    check(bool(lua), f"no Lua scripts found under {package_dir}/_scripts (checkout?)")
    return {f"{package}/py.typed", *lua}


def check_no_tests(label: str, names: list[str]) -> None:
    tests = [n for n in names if "tests/" in n or Path(n).name.startswith("test_")]
    check(not tests, f"{label} ships tests: {tests[:5]}")


def check_wheel(dist: str, version: str, path: Path) -> Message:
    package, package_dir = PACKAGES[dist]
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        info = f"{dist}-{version}.dist-info"
        metadata = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        licenses = [n for n in names if n.startswith(f"{info}/licenses/")]
        check(
            f"{info}/licenses/LICENSE" in names
            and zf.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes(),
            f"{path.name}: .dist-info/licenses/LICENSE missing or not the repository's "
            f"LICENSE (found {licenses})",
        )
    missing = expected_files(package, package_dir) - set(names)
    check(not missing, f"{path.name} lacks {sorted(missing)}")
    check_no_tests(path.name, names)
    top = {n.split("/", 1)[0] for n in names}
    check(
        top == {package, info},
        f"{path.name}: top-level entries {sorted(top)}, expected only {package}/ and "
        "its .dist-info (no integrations/, no other package bundled)",
    )
    check(
        metadata.get("License-Expression") == "MIT",
        f"{path.name}: METADATA License-Expression is "
        f"{metadata.get('License-Expression')!r}, expected 'MIT'",
    )
    check(
        "LICENSE" in (metadata.get_all("License-File") or []),
        f"{path.name}: METADATA has no License-File: LICENSE",
    )
    check(
        metadata.get("Version") == version,
        f"{path.name}: METADATA Version {metadata.get('Version')!r} != {version!r}",
    )
    urls = metadata.get_all("Project-URL") or []
    check(len(urls) == 5, f"{path.name}: expected 5 Project-URL lines, got {urls}")
    return metadata


def check_sdist(dist: str, version: str, path: Path) -> None:
    package, package_dir = PACKAGES[dist]
    base = f"{dist}-{version}/"
    with tarfile.open(path) as tf:
        names = [m.name.removeprefix(base) for m in tf.getmembers() if m.isfile()]
    missing = {*expected_files(package, package_dir), "LICENSE", "pyproject.toml"}
    missing -= set(names)
    check(not missing, f"{path.name} lacks {sorted(missing)}")
    if dist == "rcache_redis":
        # rcache-celery's sdist keeps its own tests (integrations/celery/tests); the
        # core sdist ships the package and its docs only.
        check_no_tests(path.name, names)
        inside = [
            n for n in names if n.startswith("integrations/") or "rcache_celery" in n
        ]
        check(not inside, f"{path.name} holds integrations/: {inside[:5]}")


def main() -> int:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    dist_dir = Path(sys.argv[1])
    version = source_version(PACKAGES["rcache_redis"][1])
    check(
        source_version(PACKAGES["rcache_celery"][1]) == version,
        "rcache/_version.py and rcache_celery/_version.py differ",
    )
    # uv build also writes a .gitignore there.
    found = sorted(p.name for p in dist_dir.iterdir() if not p.name.startswith("."))
    wanted = sorted(
        f"{d}-{version}{suffix}"
        for d in PACKAGES
        for suffix in ("-py3-none-any.whl", ".tar.gz")
    )
    if found != wanted:
        raise SystemExit(f"wheel-check: {dist_dir} holds {found}, expected {wanted}")
    metadata = {
        dist: check_wheel(
            dist, version, dist_dir / f"{dist}-{version}-py3-none-any.whl"
        )
        for dist in PACKAGES
    }
    for dist in PACKAGES:
        check_sdist(dist, version, dist_dir / f"{dist}-{version}.tar.gz")
    check(metadata["rcache_redis"].get("Name") == "rcache-redis", "wrong Name")
    requires = metadata["rcache_celery"].get_all("Requires-Dist") or []
    check(
        f"rcache-redis=={version}" in requires,
        f"rcache-celery must require rcache-redis=={version}, requires {requires}",
    )
    check(
        any(r.startswith("celery[redis]") for r in requires),
        f"rcache-celery must require celery[redis], requires {requires}",
    )
    if problems:
        print("wheel-check: FAILED", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"wheel-check: {len(found)} distributions of {version} look right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
