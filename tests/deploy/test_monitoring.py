"""The chart's alerts and dashboards, checked with promtool. test_prometheus_e2e.py checks them against
the metrics of running services and a running Prometheus."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tests.deploy.conftest import run, tool
from tests.deploy.monitoring import (
    DASHBOARDS,
    alert_names,
    dashboard_queries,
    label_values_selected,
    queried_metric_names,
    rule_groups,
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


def test_dashboards_cover_serving_feedback_training_and_rollout() -> None:
    assert {d.stem for d in DASHBOARDS} == {"serving", "feedback", "training", "rollout"}


def test_rollout_dashboard_shows_traffic_steps_analysis_outcomes_and_the_guards_per_version() -> None:
    (rollout,) = [d for d in DASHBOARDS if d.stem == "rollout"]
    metrics = set().union(*(queried_metric_names(expr) for _, expr in dashboard_queries(rollout)))
    assert {"modalign_policy_requests_total", "modalign_policy_request_seconds_bucket",
            "modalign_policy_traffic_weight_percent", "modalign_rollout_canary_weight_percent",
            "modalign_rollout_step_index", "modalign_rollout_state_info", "modalign_rollout_analysis_statistic",
            "modalign_rollout_analysis_p_value", "modalign_rollout_evidence_samples", "modalign_rollout_head_to_head",
            "modalign_rollout_verdicts_total", "modalign_rollout_promotions_total", "modalign_rollout_rollbacks_total"} <= metrics


def test_training_dashboard_shows_progress_learning_and_versions() -> None:
    (training,) = [d for d in DASHBOARDS if d.stem == "training"]
    queries = [expr for _, expr in dashboard_queries(training)]
    metrics = set().union(*(queried_metric_names(expr) for expr in queries))
    assert {"modalign_trainer_round_seconds_bucket", "modalign_trainer_samples_per_second",
            "modalign_trainer_consumer_lag_records", "modalign_trainer_versions_total",
            "modalign_trainer_gate_rejections_total", "modalign_trainer_dead_letters_total"} <= metrics
    learning = set().union(*(label_values_selected(expr, "modalign_trainer_metric", "name") for expr in queries))
    assert {"rm_loss", "rm_heldout_accuracy", "rm_heldout_accuracy_preference", "rm_heldout_accuracy_edit",
            "rm_heldout_accuracy_rating", "preference_shift", "kl_coef", "policy_loss", "value_loss", "reward_mean", "kl",
            "kl_to_reference",
            "clip_fraction", "entropy"} <= learning


def test_serving_dashboard_shows_what_each_version_generates_and_hears() -> None:
    (serving,) = [d for d in DASHBOARDS if d.stem == "serving"]
    metrics = set().union(*(queried_metric_names(expr) for _, expr in dashboard_queries(serving)))
    assert {"modalign_policy_generated_tokens_total", "modalign_policy_audio_seconds_total",
            "modalign_policy_version_info", "modalign_policy_batch_rows_bucket"} <= metrics
