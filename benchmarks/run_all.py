"""Run every benchmark, print the tables, write docs/benchmarks.md and a chart.

    ./scripts/bench            # = uv run --group bench python benchmarks/run_all.py

Each benchmark script starts its own throwaway redis-server. Scripts are run one after
another as subprocesses (so that one crashing does not hide the others); a script that
fails is reported as failed in the document, never silently left out.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCS = ROOT / "docs"

# (title, script, extra arguments) in the order they appear in the document
SECTIONS = [
    ("Cache", "bench_cache.py", ["--json", str(DOCS / "benchmarks-cache.json")]),
    ("Where a warm hit's microseconds go", "profile_hit.py", []),
    ("Cold-key stampede", "bench_stampede.py", []),
    ("The local tier", "bench_local.py", []),
    ("Locks", "bench_locks.py", []),
    ("Transactions", "bench_transactions.py", []),
    ("Metrics overhead", "bench_metrics.py", []),
    ("Celery", "bench_celery.py", []),
    ("FastAPI: a cached Pydantic-model hit", "bench_frameworks.py", []),
    ("Django cache backends", "bench_django.py", []),
    ("Redis Cluster", "bench_cluster.py", []),
]


def run(script: str, args: list[str]) -> tuple[int, str, float]:
    cmd = [sys.executable, str(HERE / script), *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=HERE)
    out = proc.stdout
    if proc.returncode != 0:
        out += "\n```\n" + proc.stderr[-3000:] + "\n```\n"
    return proc.returncode, out, time.monotonic() - start


def chart(path: Path) -> bool:
    data_file = DOCS / "benchmarks-cache.json"
    if not data_file.exists():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(data_file.read_text())
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key, title in (
        (axes[0], "hits", "Warm hit, sync"),
        (axes[1], "ahits", "Warm hit, async"),
    ):
        rows = data[key]
        names = [r[0] for r in rows][::-1]
        p50 = [float(str(r[1]).split()[0]) for r in rows][::-1]
        colors = ["#d62728" if n.startswith("rcache") else "#7f7f7f" for n in names]
        ax.barh(names, p50, color=colors)
        ax.set_xlabel("median latency per hit, microseconds (lower is better)")
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle("rcache vs peers, same machine, same run (loopback redis-server)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    DOCS.mkdir(exist_ok=True)
    parts = [
        "# Benchmarks\n",
        "Produced by `./scripts/bench` (benchmarks/run_all.py). Every figure is measured in the "
        "same run, on the same machine, against a throwaway loopback redis-server; compare "
        "ratios, not absolute times. Medians over repetitions; spreads where shown.\n",
        f"Machine: {platform.platform()}, Python {platform.python_version()}, "
        f"{__import__('os').cpu_count()} CPUs.\n",
    ]
    failed = []
    for title, script, args in SECTIONS:
        if not (HERE / script).exists():
            parts.append(f"\n## {title}\n\nNot available: `{script}` is missing.\n")
            failed.append(script)
            continue
        code, out, secs = run(script, args)
        print(f"\n## {title} ({script}, {secs:.0f} s)\n{out}", flush=True)
        status = "" if code == 0 else f"\n**FAILED (exit {code})**\n"
        parts.append(
            f"\n## {title}\n\n`benchmarks/{script}`, {secs:.0f} s{status}\n\n{out}\n"
        )
        if code != 0:
            failed.append(script)
    analysis = HERE / "ANALYSIS.md"
    if analysis.exists():
        parts.append("\n" + analysis.read_text())
    (DOCS / "img").mkdir(exist_ok=True)
    if chart(DOCS / "img" / "benchmarks.png"):
        parts.insert(3, "\n![rcache vs peers: warm hits](img/benchmarks.png)\n")
    (DOCS / "benchmarks.md").write_text("".join(parts))
    print(f"\nwrote {DOCS / 'benchmarks.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
