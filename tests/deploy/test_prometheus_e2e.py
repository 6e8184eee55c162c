"""The chart's monitoring against the real thing: running services scraped by a real Prometheus server.

The policy, feedback and reward services run as processes on loopback (on a Kafka broker of this
module's own, so the test can stop it); Prometheus scrapes them under the job names the chart's monitors
give them and evaluates the chart's rules. Conditions are then caused on purpose — a burst of invalid
feedback, a Kafka outage, a service going away — and the alerts must fire. The rules are loaded as
rendered except for their `for:` pending periods, set to 0s so that the test waits seconds, not the
15 minutes an on-call page waits.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from modalign.core import broker
from modalign.core.kafka import KafkaConfig
from modalign.core.processes import ManagedProcess, free_port, grpc_serving, http_ok
from modalign.v1 import feedback_pb2, feedback_pb2_grpc

from tests.conftest import start_broker
from tests.deploy.conftest import RELEASE, tool
from tests.deploy.monitoring import (
    DASHBOARDS, SCRAPE_SERIES, dashboard_queries, queried_metric_names, rule_groups, sample_names, write_rules_file,
)
from tests.feedback.cases import valid_feedback

pytestmark = pytest.mark.integration

SCRAPE_INTERVAL_S = 1
PRODUCE_TIMEOUT_S = 2.0


def kafka_flags(config: KafkaConfig) -> list[str]:
    return ["--kafka.bootstrap-servers", config.bootstrap_servers, "--kafka.topic-prefix", config.topic_prefix,
            "--kafka.partitions", str(config.partitions)]


class Service:
    def __init__(self, process: ManagedProcess, metrics_url: str, address: str | None = None) -> None:
        self.process, self.metrics_url, self.address = process, metrics_url, address


def start_services(kafka: KafkaConfig, log_dir: Path) -> dict[str, Service]:
    """Starts the three services at once (their imports take most of a minute on two cores)."""
    ports = {name: (free_port(), free_port()) for name in ("policy", "feedback", "reward")}
    services = {}
    for name, extra in (("policy", []), ("feedback", ["--kafka.produce-timeout-s", str(PRODUCE_TIMEOUT_S)])):
        grpc_port, metrics_port = ports[name]
        address = f"127.0.0.1:{grpc_port}"
        process = ManagedProcess.python_module(
            name, f"modalign.{name}.server",
            ["--listen", address, "--metrics-port", str(metrics_port), *kafka_flags(kafka), *extra],
            ready=lambda address=address: grpc_serving(address), log_dir=log_dir,
        )
        services[name] = Service(process, f"http://127.0.0.1:{metrics_port}/metrics", address)
    http_port, grpc_port = ports["reward"]
    services["reward"] = Service(
        ManagedProcess.python_module(
            "reward", "modalign.reward.server", ["--http-port", str(http_port), "--grpc-port", str(grpc_port)],
            ready=lambda: http_ok(f"http://127.0.0.1:{http_port}/v2/health/ready"), log_dir=log_dir,
        ),
        f"http://127.0.0.1:{http_port}/metrics",
    )
    for service in services.values():
        service.process.start()
    return services


def prometheus_config(services: dict[str, Service], rules_file: Path) -> dict:
    """Scrape jobs named as the chart's ServiceMonitors name them: the Service, <release>-<service>."""
    return {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "rule_files": [str(rules_file)],
        "scrape_configs": [
            {
                "job_name": f"{RELEASE}-{name}",
                "metrics_path": urllib.parse.urlsplit(service.metrics_url).path,
                "static_configs": [{"targets": [urllib.parse.urlsplit(service.metrics_url).netloc]}],
            }
            for name, service in services.items()
        ],
    }


def without_pending_periods(groups: list[dict]) -> list[dict]:
    return [{**group, "rules": [{**rule, "for": "0s"} if "for" in rule else rule for rule in group["rules"]]}
            for group in groups]


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def firing(self, alertname: str) -> list[dict]:
        return [alert["labels"] for alert in self.get("/api/v1/alerts")["alerts"]
                if alert["labels"]["alertname"] == alertname and alert["state"] == "firing"]

    def wait_firing(self, alertname: str, timeout_s: float = 45.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while not (firing := self.firing(alertname)):
            if time.monotonic() > deadline:
                pytest.fail(f"{alertname} did not fire in {timeout_s:.0f}s; alerts: {self.get('/api/v1/alerts')}")
            time.sleep(0.5)
        return firing

    def wait_value(self, query: str, expected: float, timeout_s: float = 30.0) -> None:
        """Waits until a query's single result equals expected: Prometheus has scraped what came before."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.get("/api/v1/query", query=query)["result"]
            if result and float(result[0]["value"][1]) == expected:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{query} did not reach {expected} in {timeout_s:.0f}s: {result}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[broker.BrokerConfig]:
    """A broker of this module's own, which a test stops to cause an outage."""
    config = start_broker(tmp_path_factory.mktemp("kafka-e2e"))
    yield config
    broker.stop(config)


@pytest.fixture(scope="module")
def system(module_broker: broker.BrokerConfig,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Service], Prometheus]]:
    prometheus_binary = tool("prometheus")
    kafka = KafkaConfig(bootstrap_servers=module_broker.bootstrap_servers, partitions=1)
    work = tmp_path_factory.mktemp("prometheus-e2e")
    services = start_services(kafka, work / "logs")
    prometheus = None
    try:
        rules = write_rules_file(work / "modalign-rules.yaml", without_pending_periods(rule_groups()))
        config = work / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(services, rules)))
        port = free_port()
        prometheus = ManagedProcess(
            "prometheus",
            [prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            ready=lambda: http_ok(f"http://127.0.0.1:{port}/-/ready"), log_path=work / "logs" / "prometheus.log",
        )
        prometheus.start()
        prometheus.wait_ready(30)
        for service in services.values():
            service.process.wait_ready(180)
        yield services, Prometheus(f"http://127.0.0.1:{port}")
    finally:
        processes = [service.process for service in services.values()] + ([prometheus] if prometheus else [])
        with ThreadPoolExecutor(len(processes)) as pool:
            list(pool.map(ManagedProcess.stop, processes))


def invalid_feedback() -> feedback_pb2.Feedback:
    feedback = valid_feedback("rating")
    feedback.rating.score = 99
    return feedback


def submit(stub: feedback_pb2_grpc.FeedbackServiceStub, feedback: feedback_pb2.Feedback) -> grpc.StatusCode:
    try:
        stub.Submit(feedback, timeout=30)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def test_every_metric_the_dashboards_and_rules_query_is_in_the_services_metrics(system) -> None:
    services, _ = system
    exported: set[str] = set()
    for service in services.values():
        with urllib.request.urlopen(service.metrics_url, timeout=5) as response:
            exported |= sample_names(text_string_to_metric_families(response.read().decode()))
    groups = rule_groups()
    recorded = {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}
    queries = [query for dashboard in DASHBOARDS for query in dashboard_queries(dashboard)]
    queries += [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for g in groups for r in g["rules"]]
    missing = {f"{where}: {name}" for where, expr in queries
               for name in queried_metric_names(expr, recorded) - exported - SCRAPE_SERIES}
    assert not missing, "queried but in no service's /metrics:\n" + "\n".join(sorted(missing))


def test_every_service_is_scraped_under_the_job_the_rules_select(system) -> None:
    services, prometheus = system
    deadline = time.monotonic() + 30
    while {t["labels"]["job"]: t["health"] for t in prometheus.get("/api/v1/targets")["activeTargets"]} != {
            f"{RELEASE}-{name}": "up" for name in services}:
        assert time.monotonic() < deadline, prometheus.get("/api/v1/targets")
        time.sleep(0.5)
    rule_health = {rule["name"]: rule["health"] for group in prometheus.get("/api/v1/rules")["groups"] for rule in group["rules"]}
    assert set(rule_health.values()) == {"ok"}, rule_health


def test_a_burst_of_invalid_feedback_fires_the_invalid_ratio_alert_but_not_the_error_rate_one(system) -> None:
    services, prometheus = system
    with grpc.insecure_channel(services["feedback"].address) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        # A counter's first sample is its baseline for rate(): let Prometheus see the first refusal alone.
        assert submit(stub, invalid_feedback()) == grpc.StatusCode.INVALID_ARGUMENT
        prometheus.wait_value(f'sum(modalign_feedback_received_total{{job="{RELEASE}-feedback", outcome="invalid"}})', 1)
        codes = {submit(stub, invalid_feedback()) for _ in range(20)}
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT}
    (alert,) = prometheus.wait_firing("ModalignFeedbackInvalidRatioHigh")
    assert (alert["job"], alert["severity"]) == (f"{RELEASE}-feedback", "warning")
    assert prometheus.firing("ModalignGrpcErrorRateHigh") == [], "a client's bad requests are not server errors"


def test_a_kafka_outage_fires_the_feedback_unavailable_produce_error_and_error_rate_alerts(system, module_broker) -> None:
    services, prometheus = system
    with grpc.insecure_channel(services["feedback"].address) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        assert submit(stub, valid_feedback("preference")) == grpc.StatusCode.OK
        broker.stop(module_broker)
        with ThreadPoolExecutor(4) as pool:
            # Two rounds, scraped apart: the first creates the counters, the second moves them.
            for round_number in (1, 2):
                codes = set(pool.map(lambda _: submit(stub, valid_feedback("rating")), range(4)))
                assert codes == {grpc.StatusCode.UNAVAILABLE}
                prometheus.wait_value(
                    f'sum(modalign_feedback_received_total{{job="{RELEASE}-feedback", outcome="unavailable"}})',
                    4 * round_number)
    (unavailable,) = prometheus.wait_firing("ModalignFeedbackUnavailable")
    assert (unavailable["job"], unavailable["severity"]) == (f"{RELEASE}-feedback", "critical")
    produce_errors = prometheus.wait_firing("ModalignKafkaProduceErrors")
    assert {(a["job"], a["topic"]) for a in produce_errors} == {(f"{RELEASE}-feedback", "modalign.feedback")}
    error_rate = prometheus.wait_firing("ModalignGrpcErrorRateHigh")
    assert {(a["job"], a["grpc_service"]) for a in error_rate} == {(f"{RELEASE}-feedback", "modalign.v1.FeedbackService")}


def test_a_service_that_goes_away_fires_service_down(system) -> None:
    services, prometheus = system
    services["reward"].process.stop()
    (down,) = prometheus.wait_firing("ModalignServiceDown")
    assert (down["job"], down["severity"]) == (f"{RELEASE}-reward", "critical")
