"""The chart's alerts and dashboards, checked with promtool and against the metrics the services define."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import run, tool
from tests.deploy.monitoring import (
    DASHBOARDS, SCRAPE_SERIES, alert_names, dashboard_queries, queried_metric_names, rule_groups, sample_names,
    write_rules_file,
)

ALERT_TESTS = Path(__file__).with_name("alerts.test.yaml")


def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    rules = write_rules_file(tmp_path / "modalign-rules.yaml", rule_groups())
    result = run([tool("promtool"), "check", "rules", str(rules)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_unit_tests_pass_in_promtool(tmp_path: Path) -> None:
    write_rules_file(tmp_path / "modalign-rules.yaml", rule_groups())
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    result = run([tool("promtool"), "test", "rules", ALERT_TESTS.name], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_in_which_it_fires() -> None:
    cases = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    assert fired == alert_names(rule_groups())


def test_extra_rule_groups_from_values_are_added(tmp_path: Path) -> None:
    values = tmp_path / "extra-rules.yaml"
    extra = {"name": "team.slo", "rules": [{"record": "team:up:sum", "expr": "sum(up)"}]}
    values.write_text(yaml.safe_dump({"monitoring": {"prometheusRule": {"additionalGroups": [extra]}}}))
    assert rule_groups(values)[-1] == extra


def test_every_dashboard_query_parses_in_promtool(tmp_path: Path) -> None:
    """promtool has no query parser of its own on the command line: each query becomes a recording
    rule, and check rules parses every rule's expression with Prometheus' parser."""
    queries = [query for dashboard in DASHBOARDS for query in dashboard_queries(dashboard)]
    assert queries
    rules = [{"record": f"dashboard:query_{index}", "expr": expr} for index, (_, expr) in enumerate(queries)]
    rules_file = write_rules_file(tmp_path / "dashboard-queries.yaml", [{"name": "dashboards", "rules": rules}])
    result = run([tool("promtool"), "check", "rules", str(rules_file)])
    assert result.returncode == 0, result.stdout + result.stderr + "\n".join(f"{i}: {w}" for i, (w, _) in enumerate(queries))


def test_dashboards_cover_serving_and_feedback() -> None:
    assert {d.stem for d in DASHBOARDS} == {"serving", "feedback"}


@pytest.fixture(scope="module")
def defined_metrics() -> set[str]:
    """Series names the services register with prometheus_client (the registry /metrics serves)."""
    import prometheus_client

    import modalign.feedback.server  # noqa: F401
    import modalign.policy.server  # noqa: F401
    import modalign.reward.server  # noqa: F401

    return sample_names(prometheus_client.REGISTRY.collect())


def test_dashboards_and_alerts_query_only_metrics_the_services_define(defined_metrics: set[str]) -> None:
    groups = rule_groups()
    recorded = {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}
    queries = [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for g in groups for r in g["rules"]]
    queries += [query for dashboard in DASHBOARDS for query in dashboard_queries(dashboard)]
    unknown = {
        f"{where}: {name}"
        for where, expr in queries
        for name in queried_metric_names(expr, recorded) - defined_metrics - SCRAPE_SERIES
    }
    assert not unknown, "queries of metrics no service defines:\n" + "\n".join(sorted(unknown))
