#!/usr/bin/env python3
"""Render docs/img/dashboard.png: the Grafana dashboard's panels, from a real run.

    .venv/bin/python scripts/render_dashboard.py [--seconds 90] [--out docs/img/dashboard.png]

What it does, with nothing faked:

1. starts a throwaway redis-server (``rcache.testing.RedisServer``) for the caches and a
   second one that it kills and restarts mid-run (an outage: errors, breaker open, closed);
2. runs cache traffic from threads through ``@cache.cached`` functions with
   ``metrics=PrometheusMetrics(...)``, and lock traffic against the same Redis;
3. serves ``/metrics`` with ``rcache.metrics.start_http_server`` and runs a real
   ``prometheus`` server (Debian package ``prometheus``, which also provides promtool)
   scraping it every second;
4. evaluates every query of ``contrib/grafana/rcache-dashboard.json`` with Prometheus's
   ``query_range`` API (``$__rate_interval`` = 10s, ``$cache``/``$lock`` = all) and plots
   the panels with matplotlib in the dashboard's layout order.

Locks are rcache's own (``cache.lock``): contended ``orders.sync`` locks, and a
``nightly.report`` lock whose holder twice stalls past ``max_hold`` so that its lease
runs out (renewal lost, release not owned): the "Lost locks" panel.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402

import rcache  # noqa: E402
from rcache import BreakerPolicy, RetryPolicy  # noqa: E402
from rcache.metrics import PrometheusMetrics, start_http_server  # noqa: E402
from rcache.testing import RedisServer, free_port, wait_until  # noqa: E402

DASHBOARD = ROOT / "contrib" / "grafana" / "rcache-dashboard.json"
RATE_INTERVAL = "10s"


def zipf_key(rng: random.Random, n: int) -> int:
    return min(int(rng.paretovariate(1.2)), n)


def run_traffic(
    seconds: float, url: str, flaky: RedisServer, metrics: PrometheusMetrics
) -> None:
    stop = threading.Event()
    t0 = time.monotonic()

    def elapsed() -> float:
        return (time.monotonic() - t0) / seconds  # 0..1 over the run

    # Created first: until Cache passes its name to breaker_state (see the report of
    # issue 6), a shared sink labels breaker changes with the first registered cache.
    sessions = rcache.Cache(
        flaky.url,
        prefix="demo",
        name="sessions",
        metrics=metrics,
        retry=RetryPolicy(attempts=1),
        breaker=BreakerPolicy(failures=3, reset_after=2),
        redis_options={"socket_connect_timeout": 0.2, "socket_timeout": 0.2},
    )
    shop = rcache.Cache(url, prefix="demo", name="shop", metrics=metrics)

    @shop.cached(ttl=15, name="catalog.product")
    def product(pid: int) -> dict[str, int]:
        time.sleep(0.0004)
        return {"id": pid}

    @shop.cached(ttl=120, name="users.profile")
    def profile(uid: int) -> dict[str, int]:
        time.sleep(0.002)
        return {"id": uid}

    @shop.cached(ttl=6, name="reports.daily")
    def report(day: int) -> int:
        time.sleep(random.uniform(0.02, 0.08))
        return day

    @sessions.cached(ttl=30, name="sessions.get")
    def session(sid: int) -> int:
        time.sleep(0.0005)
        return sid

    def loop(
        body: Callable[[random.Random], object], pause: float
    ) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random()
            while not stop.is_set():
                body(rng)
                time.sleep(pause * rng.uniform(0.5, 1.5))

        return run

    stalls = (0.3, 0.7)  # fractions of the run where the nightly holder stalls

    def order_worker(rng: random.Random) -> None:
        lock = shop.lock("orders.sync", ttl=2)
        # Mostly waiting callers; some do not wait. Holds grow over the run.
        if lock.acquire(timeout=0 if rng.random() < 0.15 else 1.5):
            time.sleep(rng.uniform(0.02, 0.08 + 0.25 * elapsed()))
            lock.release()

    def nightly_worker(rng: random.Random) -> None:
        # Renewed every ttl/3 inside `with`, but never past max_hold: a holder that
        # stalls longer loses the lease, and the release finds it gone.
        lock = shop.lock(
            "nightly.report", ttl=0.6, max_hold=0.7, raise_on_not_owned=False
        )
        with lock:
            stall = any(abs(elapsed() - s) < 0.02 for s in stalls)
            time.sleep(2.0 if stall else rng.uniform(0.1, 0.4))

    threads = [
        threading.Thread(target=loop(lambda r: product(zipf_key(r, 300)), 0.004)),
        threading.Thread(target=loop(lambda r: product(zipf_key(r, 300)), 0.004)),
        threading.Thread(target=loop(lambda r: profile(r.randrange(1500)), 0.006)),
        threading.Thread(target=loop(lambda r: report(r.randrange(12)), 0.05)),
        threading.Thread(target=loop(lambda r: session(r.randrange(50)), 0.01)),
        threading.Thread(
            target=loop(lambda r: shop.get(f"flag:{r.randrange(5)}"), 0.05)
        ),
        threading.Thread(
            target=loop(lambda r: shop.set(f"flag:{r.randrange(5)}", 1, ttl=3), 0.5)
        ),
        threading.Thread(target=loop(order_worker, 0.05)),
        threading.Thread(target=loop(order_worker, 0.05)),
        threading.Thread(target=loop(order_worker, 0.05)),
        threading.Thread(target=loop(nightly_worker, 0.1)),
    ]
    for t in threads:
        t.daemon = True
        t.start()
    outage = (0.45 * seconds, 0.65 * seconds)
    time.sleep(outage[0])
    print(
        f"render: killing the sessions redis-server at t={outage[0]:.0f}s", flush=True
    )
    flaky.kill()
    time.sleep(outage[1] - outage[0])
    print(f"render: restarting it at t={outage[1]:.0f}s", flush=True)
    flaky.restart()
    time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
    stop.set()
    for t in threads:
        t.join(10)
    shop.close()
    sessions.close()


def start_prometheus(
    target_port: int, workdir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("prometheus")
    if exe is None:
        raise SystemExit(
            "render: the prometheus server is not on PATH: apt-get install prometheus "
            "(the Debian package that also provides promtool)"
        )
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: rcache\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "prometheus.log").open("wb"),
    )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (workdir / "prometheus.log").read_text()
        try:
            with urllib.request.urlopen(base + "/-/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    wait_until(ready, timeout=30, interval=0.1, message="prometheus to be ready")
    return proc, base


def query_range(base: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": "1s"}
    )
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=30) as r:
        body = json.load(r)
    if body["status"] != "success":
        raise SystemExit(f"render: query failed: {expr}: {body}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out.strip() or "value"


Series = tuple[str, list[float], list[float], bool]  # legend, times, values, dashed


def plot(
    panels: list[dict[str, Any]],
    data: list[list[Series]],
    start: float,
    out: Path,
    subtitle: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    bg, panel_bg, fg, grid = "#111217", "#181b1f", "#ccccdc", "#2c3235"
    colors = [
        "#73bf69",
        "#f2cc0c",
        "#5794f2",
        "#ff9830",
        "#f2495c",
        "#b877d9",
        "#8ab8ff",
        "#96d98d",
        "#fade2a",
        "#ffa6b0",
    ]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(18, 4.6 * rows), facecolor=bg)
    fig.suptitle(
        "rcache dashboard (contrib/grafana/rcache-dashboard.json)",
        color=fg,
        fontsize=17,
        x=0.01,
        ha="left",
        y=0.995,
    )
    fig.text(
        0.01,
        0.978,
        subtitle,
        color="#8e8e8e",
        fontsize=10.5,
        ha="left",
        va="top",
        wrap=True,
    )
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, panel, series in zip(axes.flat, panels, data, strict=False):
        ax.set_facecolor(panel_bg)
        for spine in ax.spines.values():
            spine.set_color(grid)
        ax.tick_params(colors=fg, labelsize=9)
        ax.grid(True, color=grid, linewidth=0.6)
        ax.set_title(panel["title"], color=fg, fontsize=12.5, loc="left", pad=6)
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        stacked = (
            panel["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
        )
        if not series:
            ax.text(
                0.5,
                0.5,
                "no data",
                color="#8e8e8e",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        if len(series) > 4:
            # Readability: a legend of a dozen flat zero lines hides the ones that move.
            series = [s for s in series if any(y != 0 for y in s[2])]
        log = defaults_of(panel).get("custom", {}).get("scaleDistribution", {})
        log_scale = log.get("type") == "log"
        base: dict[float, float] = {}
        for i, (name, xs, ys, dashed) in enumerate(sorted(series, key=lambda s: s[0])):
            if log_scale:  # Grafana leaves out values a log axis cannot show
                ys = [y if y > 0 else float("nan") for y in ys]
            color = colors[i % len(colors)]
            rel = [x - start for x in xs]
            if stacked:
                lows = [base.get(x, 0.0) for x in xs]
                highs = [lo + y for lo, y in zip(lows, ys, strict=True)]
                ax.fill_between(rel, lows, highs, color=color, alpha=0.35, linewidth=0)
                ax.plot(rel, highs, color=color, linewidth=1.4, label=name)
                base.update(zip(xs, highs, strict=True))
            else:
                ax.plot(
                    rel,
                    ys,
                    color=color,
                    linewidth=1.6,
                    label=name,
                    linestyle="--" if dashed else "-",
                )
        defaults = defaults_of(panel)
        if log_scale:
            ax.set_yscale("log")
        if "min" in defaults:
            ax.set_ylim(bottom=defaults["min"])
        if "max" in defaults:
            ax.set_ylim(top=defaults["max"] * (1.05 if unit == "percentunit" else 1.1))
        if unit == "percentunit":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        elif unit == "s":
            ax.yaxis.set_major_formatter(FuncFormatter(_fmt_seconds))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        elif unit in ("ops", "reqps"):
            ax.set_ylabel("per second", color="#8e8e8e", fontsize=9)
        if panel["title"] == "Circuit breaker state":
            ax.set_yticks([0, 1, 2], ["closed", "open", "half-open"])
        ax.xaxis.set_major_formatter(
            FuncFormatter(lambda v, _: f"{int(v) // 60}:{int(v) % 60:02d}")
        )
        if series:
            leg = ax.legend(
                loc="upper left",
                bbox_to_anchor=(0, -0.09),
                fontsize=8.5,
                frameon=False,
                ncol=2,
                labelcolor=fg,
            )
            leg.set_zorder(5)
    fig.subplots_adjust(
        left=0.045, right=0.99, top=0.925, bottom=0.05, hspace=0.62, wspace=0.2
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=bg)
    print(f"render: wrote {out}", flush=True)


def defaults_of(panel: dict[str, Any]) -> dict[str, Any]:
    defaults: dict[str, Any] = panel["fieldConfig"]["defaults"]
    return defaults


def _fmt_seconds(v: float, _: Any) -> str:
    if v == 0:
        return "0"
    if v < 0.001:
        return f"{v * 1e6:.0f} µs"
    if v < 1:
        return f"{v * 1000:.0f} ms"
    return f"{v:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png"
    )
    args = parser.parse_args()
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]

    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    with (
        tempfile.TemporaryDirectory(prefix="rcache-render-") as tmp,
        RedisServer() as main_redis,
        RedisServer() as flaky,
        start_http_server(0, registry=registry) as exporter,
    ):
        prom, base = start_prometheus(exporter.port, Path(tmp))
        try:
            start = time.time()
            print(
                f"render: {args.seconds:.0f}s of traffic; prometheus at {base}",
                flush=True,
            )
            run_traffic(args.seconds, main_redis.url, flaky, metrics)
            end = time.time()
            time.sleep(2.5)  # two more scrapes so the last second is in the TSDB
            data = []
            for panel in panels:
                series = []
                for target in panel["targets"]:
                    expr = (
                        target["expr"]
                        .replace("$__rate_interval", RATE_INTERVAL)
                        .replace("$cache", ".*")
                        .replace("$lock", ".*")
                    )
                    for s in query_range(base, expr, start, end):
                        xs = [float(t) for t, _ in s["values"]]
                        ys = [float(v) for _, v in s["values"]]
                        name = legend(target["legendFormat"], s["metric"])
                        series.append((name, xs, ys, target["refId"] != "A"))
                data.append(series)
        finally:
            prom.terminate()
            prom.wait(timeout=30)
    subtitle = (
        f"A real {args.seconds:.0f} s run of scripts/render_dashboard.py: threads calling "
        "@cache.cached functions and taking locks against redis-server, the 'sessions'\n"
        "server killed from 45% to 65% of the run, scraped every 1 s by Prometheus, "
        f"rate interval {RATE_INTERVAL}.\nx axis: minutes:seconds since the start. "
        "Panels with more than four series hide the all-zero ones."
    )
    plot(panels, data, start, args.out, subtitle)


if __name__ == "__main__":
    main()
