"""contrib/: the Prometheus rules and the Grafana dashboard stay valid and in sync.

- ``promtool check rules`` and ``promtool test rules`` on contrib/prometheus;
- every query of the Grafana dashboard parses (wrapped as recording rules for promtool);
- every ``rcache_*`` metric the rules and dashboard use exists in a real scrape, so a
  renamed metric cannot silently empty a panel or an alert.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rcache.metrics import PrometheusMetrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "contrib" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "contrib" / "prometheus" / "rules_test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "rcache-dashboard.json"

# The panels issue 6 asks for, by title.
REQUIRED_PANELS = {
    "Hit ratio per cache",
    "Load time p95",
    "Backend errors per second",
    "Lock wait p95",
    "Lost locks",
}


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        if os.environ.get("RCACHE_ALLOW_SKIP") == "1":
            pytest.skip("promtool not installed and RCACHE_ALLOW_SKIP=1")
        pytest.fail(
            "promtool is not on PATH: run ./scripts/test (it installs the Debian package "
            "'prometheus') or apt-get install prometheus",
            pytrace=False,
        )
    return exe


def run(*args: str) -> str:
    result = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def exported_names() -> set[str]:
    m = PrometheusMetrics(registry=CollectorRegistry())
    m.register_cache("c")
    m.register_lock("l")
    m.cache_error("c", "get", "ConnectionError")
    names: set[str] = set()
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        names.update(s.name for s in family.samples)
    return names


def test_promtool_check_and_test_rules() -> None:
    assert "SUCCESS" in run("check", "rules", str(RULES))
    assert "SUCCESS" in run("test", "rules", str(RULES_TEST))


def test_dashboard_has_the_panels_and_its_queries_parse(tmp_path: Path) -> None:
    titles = {title for title, _ in dashboard_queries()}
    assert titles >= REQUIRED_PANELS
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(dashboard_queries()):
        concrete = (
            expr.replace("$__rate_interval", "1m")
            .replace("$cache", ".*")
            .replace("$lock", ".*")
        )
        rules.append(f"      - record: dashboard:q{i}")
        rules.append(f"        expr: {json.dumps(concrete)}")
    path = tmp_path / "dashboard_rules.yml"
    path.write_text("\n".join(rules) + "\n")
    assert f"{len(dashboard_queries())} rules found" in run("check", "rules", str(path))


def test_rules_and_dashboard_only_use_exported_metrics() -> None:
    exported = exported_names()
    used = set(re.findall(r"\brcache_[a-z_]+\b", RULES.read_text()))
    for _, expr in dashboard_queries():
        used.update(re.findall(r"\brcache_[a-z_]+\b", expr))
    assert used, "no rcache_* metric found in contrib/"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
