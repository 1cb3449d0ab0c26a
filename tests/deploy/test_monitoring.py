"""deploy/monitoring: the Prometheus alert rules and the Grafana dashboard, checked without promtool or Grafana.

Both files are parsed and held to their formats' shapes, and every expression is linted: brackets balance, every
`platform_*` series is one /metrics serves (the families it declares, read from a real scrape's `# TYPE` lines, with
each type's sample suffixes), and every label an expression matches or groups by is a label of the series it uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.utils import timezone

from config import metrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "monitoring" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana-dashboard.json"
TOKEN = "monitoring-test-token-" + "t" * 20
# Labels Prometheus adds to every scraped series, and the histogram's bucket bound.
TARGET_LABELS = {"job", "instance", "le"}
DURATION = re.compile(r"\d+[smhdw]")
# The alerts the deployment promises (issue: stuck jobs, growing backlog, reconciliation drift, failed Stripe events;
# and a task of beat's schedule that stopped succeeding: a safety net that does not run).
PROMISED_ALERTS = {
    "PlatformJobsStuckDispatched",
    "PlatformBacklogGrowing",
    "PlatformReconciliationDrift",
    "PlatformStripeEventsFailed",
    "PlatformScheduledTaskLate",
}

pytestmark = pytest.mark.django_db


@pytest.fixture
def served(client: Any, settings: Any) -> dict[str, set[str]]:
    """Every series name /metrics serves, with the labels of its family: the `# TYPE` lines of a real scrape (every
    family is declared even before it has a sample), labels from the families the view encodes."""
    settings.METRICS_TOKEN = TOKEN
    answer = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert answer.status_code == 200
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", answer.content.decode(), re.MULTILINE))
    labels = {family.name: set(family._labelnames) for family in metrics.collect(timezone.now()).collect()}  # type: ignore[attr-defined]
    names: dict[str, set[str]] = {}
    for name, kind in types.items():
        # The text format declares a counter as its _total and _created series, a gauge histogram as a histogram
        # (its _bucket series) and its _gcount and _gsum as gauges: the names Prometheus stores.
        family = re.sub(r"_(total|created|gcount|gsum)$", "", name)
        names[f"{name}_bucket" if kind == "histogram" else name] = labels[family]
    assert "platform_jobs_in_flight" in names
    return names


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def lint(expression: str, served: dict[str, set[str]]) -> None:
    """What promtool would refuse that matters here: unbalanced brackets, a series /metrics does not serve, a label
    its series do not have."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for character in re.sub(r'"[^"]*"', '""', expression):
        if character in "([{":
            stack.append(character)
        elif character in pairs:
            assert stack, f"unbalanced: {expression}"
            assert stack.pop() == pairs[character], f"unbalanced: {expression}"
    assert not stack, f"unbalanced: {expression}"
    used = re.findall(r"\b(platform_\w+)", expression)
    assert used, f"no platform series in {expression}"
    labels = set(TARGET_LABELS)
    for name in used:
        assert name in served, f"{name} is not served by /metrics ({expression})"
        labels |= served[name]
    for name, matchers in re.findall(r"\b(platform_\w+)\{([^}]*)\}", expression):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
            assert label in served[name], f"{name} has no label {label}"
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expression):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            assert label in labels, f"{label} is not a label of {used} ({expression})"


def test_alert_rules_have_the_shape_prometheus_loads() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    group_names = [group["name"] for group in document["groups"]]
    assert len(group_names) == len(set(group_names))
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert set(names) >= PROMISED_ALERTS
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
        assert isinstance(rule["expr"], str)
        assert rule["expr"].strip()
        assert "for" not in rule or DURATION.fullmatch(rule["for"])
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"]


def test_every_alert_expression_uses_what_metrics_serves(served: dict[str, set[str]]) -> None:
    for rule in alert_rules():
        lint(rule["expr"], served)
        for text in rule["annotations"].values():
            for query in re.findall(r'query "([^"]+)"', text):
                lint(query, served)


def test_the_dashboard_has_the_shape_grafana_imports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"]
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    [variable] = dashboard["templating"]["list"]
    assert variable["type"] == "datasource"
    assert variable["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24
        assert grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat", "table", "gauge", "bargauge")
        assert panel["datasource"]["uid"] == f"${{{variable['name']}}}"
        assert panel["targets"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))


def test_every_dashboard_expression_uses_what_metrics_serves(served: dict[str, set[str]]) -> None:
    expressions = dashboard_expressions()
    assert expressions
    for _title, expression in expressions:
        lint(expression, served)
    # Every family /metrics serves has a panel.
    families = {name for name in served if not name.endswith(("_created", "_gcount", "_gsum"))}
    shown = {name for _, expression in expressions for name in re.findall(r"\b(platform_\w+)", expression)}
    assert {name.removesuffix("_bucket") for name in families} <= {name.removesuffix("_bucket") for name in shown}


def test_the_lint_refuses_what_it_should(served: dict[str, set[str]]) -> None:
    for wrong in (
        "max(platform_jobs_in_flight",
        "platform_jobs_inflight > 0",
        'platform_jobs{state="RUNNING"} > 0',
        "max by (queue) (platform_jobs_queued)",
    ):
        with pytest.raises(AssertionError):
            lint(wrong, served)
