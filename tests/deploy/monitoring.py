"""What the chart asks of Prometheus: its rules, its dashboards' queries, and the metric names they read."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import promql_parser
import yaml

from tests.deploy.conftest import CHART, one, render

DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
# Series Prometheus makes itself for every scrape target, not exported by any service.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling",
                 "scrape_series_added"}
# What Grafana puts in place of its built-in interval variables; the chart's dashboards define the rest.
GRAFANA_INTERVALS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\)$")


def rule_groups(values_file: Path | None = None) -> list[dict]:
    """spec.groups of the rendered PrometheusRule: a Prometheus rules file's groups, as promtool reads them."""
    return one(render(values_file), "PrometheusRule", "modalign")["spec"]["groups"]


def write_rules_file(path: Path, groups: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def alert_names(groups: list[dict]) -> set[str]:
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def dashboard_queries(dashboard_file: Path) -> list[tuple[str, str]]:
    """(where, PromQL) of every query a dashboard makes: panel targets and templating variables, with
    Grafana's variables replaced by what Grafana would send."""
    dashboard = json.loads(dashboard_file.read_text())
    variables = {f"${v['name']}": ".*" for v in dashboard["templating"]["list"] if v["type"] == "query"}
    queries = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.match(variable["query"]["query"])
            assert match, f"{dashboard_file.name}: variable {variable['name']} is not a label_values() query"
            if match["selector"]:
                queries.append((f"{dashboard_file.name} variable {variable['name']}", match["selector"]))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in sorted({**GRAFANA_INTERVALS, **variables}.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{dashboard_file.name} panel {panel['title']!r}: unknown variable in {expr}"
            queries.append((f"{dashboard_file.name} panel {panel['title']!r} {target['refId']}", expr))
    return queries


def queried_metric_names(expr: str, recorded: Iterable[str] = ()) -> set[str]:
    """Names of the series an expression selects, less the ones recording rules make."""
    names: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name or next(m.value for m in node.matchers.matchers if m.name == "__name__")
            names.add(name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names - set(recorded)


def label_values_selected(expr: str, metric: str, label: str) -> set[str]:
    """The values of label that expr selects series of metric by: an equality matcher's value, or each
    alternative of a regex matcher written as a|b|c."""
    values: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name == metric:
            for matcher in node.matchers.matchers:
                if matcher.name == label and matcher.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.Re):
                    values.update(matcher.value.split("|") if matcher.op == promql_parser.MatchOp.Re else [matcher.value])

    promql_parser.walk(promql_parser.parse(expr), visit)
    return values


def sample_names(families) -> set[str]:
    """Every series name a set of prometheus_client metric families can expose, children or not."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    return {family.name + suffix for family in families for suffix in suffixes.get(family.type, ("",))}
