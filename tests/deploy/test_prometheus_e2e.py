"""The chart's monitoring against the real thing: running services scraped by a real Prometheus server.

The policy, feedback, reward and trainer services and the rollout controller run as processes on
loopback (on a Kafka broker of this module's own, so the test can stop it), set up as the chart sets them
up: a shared blob store, the reward service following published versions, the trainer on tiny settings,
the controller reading the policy's /metrics and scoring with the reward service. Prometheus scrapes them
under the job names the chart's monitors give them and evaluates the chart's rules. Conditions are
then caused on purpose — a burst of invalid feedback, a candidate the evaluation gate must refuse,
feedback about responses never logged, a published reward model that cannot load, an operator rolling
that version's canary back, a Kafka outage, a service going away — and the alerts must fire. The
rules are loaded as rendered (with the gate alert lowered to one refusal, see E2E_VALUES) except for
their `for:` pending periods, set to 0s so that the test waits seconds, not the 15 minutes an on-call
page waits.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from modalign.core import broker
from modalign.core.auth import AuthConfig
from modalign.core.kafka import KafkaConfig, ensure_topics, make_producer, produce_durably, type_headers
from modalign.core.launch import service_process
from modalign.core.processes import ManagedProcess, free_port, free_run, http_ok
from modalign.feedback.server import content_digest
from modalign.reward.config import RewardServerConfig
from modalign.up import LocalPorts, local_services
from modalign.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2_grpc, rollout_pb2, rollout_pb2_grpc

from tests.conftest import start_broker
from tests.deploy.conftest import RELEASE, REPO, tool
from tests.deploy.monitoring import (
    DASHBOARDS,
    SCRAPE_SERIES,
    dashboard_queries,
    label_values_selected,
    queried_metric_names,
    rule_groups,
    sample_names,
    write_rules_file,
)
from tests.feedback.cases import store_directly, valid_feedback
from tests.services import counter_total
from tests.trainer.scripted_users import prompt

pytestmark = pytest.mark.integration

SCRAPE_INTERVAL_S = 1
PRODUCE_TIMEOUT_S = 2.0
HELDOUT_PERCENT = 50
JOIN_MAX_WAIT_S = 3
# The trainer learns on tiny settings (a round a second, a candidate version after every learning round,
# PPO for the most learning metrics) and its gate refuses every candidate: no reward model reaches 200%
# held-out accuracy.
TRAINER_SETTINGS = {
    "round_max_seconds": 1.0, "min_pairs_to_learn": 1, "rounds_per_version": 1,
    "heldout_percent": HELDOUT_PERCENT, "join.max_wait_s": float(JOIN_MAX_WAIT_S),
    "learner.algorithm": "ppo", "learner.sample_prompts": 2, "learner.samples_per_prompt": 2,
    "learner.max_new_tokens": 4, "learner.policy_updates_per_round": 1, "learner.policy_epochs": 1,
    "learner.reward_epochs": 1, "learner.eval_prompts": 1, "gate.min_heldout_accuracy": 2.0,
}
# One refused candidate is enough to alert here (three by default).
E2E_VALUES = {"monitoring": {"prometheusRule": {"training": {"gateRejections": 1}}}}
# Learning metrics only DPO reports (the trainer here runs PPO): their names are checked in its source.
DPO_ONLY = {"dpo_loss"}
# Reported only for the kinds of feedback held out; the users of this module only compare answers.
OTHER_FEEDBACK_KINDS = {"rm_heldout_accuracy_edit", "rm_heldout_accuracy_rating"}


class Service:
    def __init__(self, process: ManagedProcess, metrics_url: str, address: str | None = None) -> None:
        self.process, self.metrics_url, self.address = process, metrics_url, address


def start_services(kafka: KafkaConfig, work: Path) -> dict[str, Service]:
    """Starts the five services at once (their imports take most of a minute on two cores), configured as
    `modalign up` configures them."""
    ports = LocalPorts(grpc_base=free_run(6), metrics_base=free_run(5))
    configs = local_services(kafka, work, ports, AuthConfig(insecure=True), {
        "feedback": {"kafka.produce_timeout_s": PRODUCE_TIMEOUT_S}, "trainer": TRAINER_SETTINGS,
    })
    services = {}
    for name, config in configs.items():
        process = service_process(config, work / "logs", name)
        if isinstance(config, RewardServerConfig):  # KServe serves its /metrics on the REST port
            services[name] = Service(process, f"{config.url}/metrics")
        else:
            services[name] = Service(process, config.metrics_url(), getattr(config, "address", None))
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

    def wait_firing(self, alertname: str, timeout_s: float = 45.0, **labels: str) -> list[dict]:
        """The firing alerts of that name (those with the given labels), once there is one."""
        deadline = time.monotonic() + timeout_s
        while not (firing := [a for a in self.firing(alertname) if labels.items() <= a.items()]):
            if time.monotonic() > deadline:
                pytest.fail(f"{alertname} {labels} did not fire in {timeout_s:.0f}s; alerts: {self.get('/api/v1/alerts')}")
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
    # The topics exist before any service starts, as in a cluster (KafkaTopics) and under `modalign up`.
    ensure_topics(kafka)
    services = start_services(kafka, work)
    prometheus = None
    try:
        values = work / "e2e-values.yaml"
        values.write_text(yaml.safe_dump(E2E_VALUES))
        rules = write_rules_file(work / "modalign-rules.yaml", without_pending_periods(rule_groups(values)))
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
        yield services, Prometheus(f"http://127.0.0.1:{port}"), kafka
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


def feedback_id(heldout: bool) -> str:
    """A feedback id the trainer puts in the held-out split (or the training split), as its hash decides."""
    while True:
        candidate = f"fb-{uuid.uuid4().hex}"
        if (int(hashlib.sha256(candidate.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT) == heldout:
            return candidate


def scrape(service: Service) -> str:
    with urllib.request.urlopen(service.metrics_url, timeout=5) as response:
        return response.read().decode()


def test_every_metric_the_dashboards_and_rules_query_is_in_the_services_metrics(system) -> None:
    services, _, _ = system
    exported: set[str] = set()
    for service in services.values():
        exported |= sample_names(text_string_to_metric_families(scrape(service)))
    groups = rule_groups()
    recorded = {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}
    queries = [query for dashboard in DASHBOARDS for query in dashboard_queries(dashboard)]
    queries += [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for g in groups for r in g["rules"]]
    missing = {f"{where}: {name}" for where, expr in queries
               for name in queried_metric_names(expr, recorded) - exported - SCRAPE_SERIES}
    assert not missing, "queried but in no service's /metrics:\n" + "\n".join(sorted(missing))


def test_every_service_is_scraped_under_the_job_the_rules_select(system) -> None:
    services, prometheus, _ = system
    deadline = time.monotonic() + 30
    while {t["labels"]["job"]: t["health"] for t in prometheus.get("/api/v1/targets")["activeTargets"]} != {
            f"{RELEASE}-{name}": "up" for name in services}:
        assert time.monotonic() < deadline, prometheus.get("/api/v1/targets")
        time.sleep(0.5)
    rule_health = {rule["name"]: rule["health"] for group in prometheus.get("/api/v1/rules")["groups"] for rule in group["rules"]}
    assert set(rule_health.values()) == {"ok"}, rule_health


def test_a_burst_of_invalid_feedback_fires_the_invalid_ratio_alert_but_not_the_error_rate_one(system) -> None:
    services, prometheus, _ = system
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


def test_a_candidate_the_gate_refuses_fires_the_gate_alert_and_the_trainer_reports_what_the_dashboard_plots(system) -> None:
    """Three users' preferences, two held out: the trainer learns from the other, evaluates a candidate on
    the held-out ones (two, so that the preference shift has a spread), and its gate (asking for an
    impossible accuracy) refuses it."""
    services, prometheus, _ = system
    rng = random.Random(5)
    with grpc.insecure_channel(services["policy"].address) as policy_channel, \
            grpc.insecure_channel(services["feedback"].address) as feedback_channel:
        policy = policy_pb2_grpc.PolicyServiceStub(policy_channel)
        feedback = feedback_pb2_grpc.FeedbackServiceStub(feedback_channel)
        for heldout in (True, True, False):
            request, _ = prompt(rng, n=2, max_new_tokens=4)
            reply = policy.Generate(request, timeout=60)
            said = feedback_pb2.Feedback(feedback_id=feedback_id(heldout), user_id=request.user_id)
            said.client_time.FromSeconds(int(time.time()))
            said.preference.chosen_response_id = reply.candidates[0].response_id
            said.preference.rejected_response_id = reply.candidates[1].response_id
            assert submit(feedback, said) == grpc.StatusCode.OK
    # One alert per failed check: the impossible accuracy always, others (reward, length) as chance has it.
    (alert,) = prometheus.wait_firing("ModalignTrainerGateRejectingVersions", timeout_s=90, check="heldout_accuracy")
    assert (alert["job"], alert["severity"]) == (f"{RELEASE}-trainer", "warning")

    # The learning metrics the training dashboard plots, by name, are ones this trainer reports.
    deadline = time.monotonic() + 30
    while True:
        families = {f.name: f for f in text_string_to_metric_families(scrape(services["trainer"]))}
        reported = {s.labels["name"] for s in families["modalign_trainer_metric"].samples}
        if "rm_heldout_accuracy" in reported or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    plotted = set().union(*(label_values_selected(expr, "modalign_trainer_metric", "name")
                            for dashboard in DASHBOARDS for _, expr in dashboard_queries(dashboard)))
    unreported = plotted - DPO_ONLY - OTHER_FEEDBACK_KINDS - reported
    assert unreported == set(), f"plotted, not reported: {sorted(unreported)}"
    assert OTHER_FEEDBACK_KINDS <= plotted and "rm_heldout_accuracy_preference" in reported
    dpo_source = (REPO / "services" / "trainer" / "algorithms" / "dpo.py").read_text()
    assert all(f'"{name}"' in dpo_source for name in DPO_ONLY)
    versions = {s.labels["outcome"]: s.value for s in families["modalign_trainer_versions"].samples
                if s.name.endswith("_total")}
    assert versions == {"rejected": 1.0}, versions


def served_feedback(services, kind: str) -> feedback_pb2.Feedback:
    """Valid feedback of kind on responses the policy really served its user: the feedback service takes
    no other."""
    with grpc.insecure_channel(services["policy"].address) as channel:
        request, _ = prompt(random.Random(), n=2)
        reply = policy_pb2_grpc.PolicyServiceStub(channel).Generate(request, timeout=60)
    feedback = valid_feedback(kind, response_id=reply.candidates[0].response_id)
    feedback.user_id = request.user_id
    if kind == "preference":
        feedback.preference.rejected_response_id = reply.candidates[1].response_id
    return feedback


def test_feedback_about_responses_never_logged_fires_the_dead_letter_alert(system) -> None:
    """The feedback service refuses such feedback now; one that reaches the topic anyway (its generation
    aged out of retention, or a replica from before the check) is dead-lettered by the trainer."""
    services, prometheus, kafka = system
    with grpc.insecure_channel(services["feedback"].address) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        assert submit(stub, valid_feedback("preference")) == grpc.StatusCode.FAILED_PRECONDITION
    store_directly(kafka, valid_feedback("preference"))
    (alert,) = prometheus.wait_firing("ModalignTrainerDeadLettersHigh", timeout_s=JOIN_MAX_WAIT_S + 30)
    assert (alert["job"], alert["severity"]) == (f"{RELEASE}-trainer", "warning")
    reasons = {sample.labels["reason"] for family in text_string_to_metric_families(scrape(services["trainer"]))
               if family.name == "modalign_trainer_dead_letters" for sample in family.samples}
    assert reasons == {"unjoinable"}


def test_a_published_reward_model_that_cannot_load_fires_the_load_failure_alert(system, tmp_path: Path) -> None:
    """A version event naming a reward model whose files are not in the store: the reward service refuses
    it and keeps serving what it has."""
    services, prometheus, kafka = system
    event = events_pb2.PolicyVersionPublished(
        version="v999", parent_version="v0", uri=(tmp_path / "models" / "policy" / "v999").as_uri(),
        reward_model_version="r999", algorithm="ppo")
    event.published_at.GetCurrentTime()
    producer = make_producer(kafka)
    try:
        produce_durably(producer, kafka.topic("policy-versions"), [("v999", event)], 10)
    finally:
        producer.close(timeout=5)
    (alert,) = prometheus.wait_firing("ModalignRewardModelLoadFailed")
    assert (alert["job"], alert["severity"]) == (f"{RELEASE}-reward", "warning")
    assert http_ok(services["reward"].metrics_url.replace("/metrics", "/v2/health/ready")), "the old model keeps serving"


def test_an_operator_rolling_back_the_canary_fires_the_rollback_alert(system) -> None:
    """The version published above (whose files are missing) became the controller's canary at its first
    step; an operator withdraws it. (It follows the reward model test, whose version it rolls out.)"""
    services, prometheus, _ = system
    with grpc.insecure_channel(services["rollout"].address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        deadline = time.monotonic() + 30
        while (state := stub.GetState(rollout_pb2.GetStateRequest(), timeout=10)).canary_version != "v999":
            assert time.monotonic() < deadline, f"the controller did not start rolling out v999: {state}"
            time.sleep(0.5)
        assert (state.phase, state.canary_weight_percent) == (events_pb2.ROLLOUT_PHASE_PROGRESSING, 5)
        prometheus.wait_value(f'modalign_rollout_canary_weight_percent{{job="{RELEASE}-rollout"}}', 5)
        state = stub.Rollback(rollout_pb2.RolloutCommand(reason="e2e: its files are missing"), timeout=30)
    assert state.phase == events_pb2.ROLLOUT_PHASE_ROLLED_BACK
    (alert,) = prometheus.wait_firing("ModalignRolloutRolledBack")
    assert (alert["job"], alert["cause"], alert["severity"]) == (f"{RELEASE}-rollout", "operator", "warning")
    assert prometheus.firing("ModalignRolloutControllerAbsent") == []


POISON_READERS = {  # who reads which topic all the time, and so must skip its poison
    "feedback": ["feedback"], "policy": ["policy-versions"], "reward": ["policy-versions"],
    "trainer": ["feedback", "generations"], "rollout": ["policy-versions"],
}


def scraped(service: Service, name: str) -> float:
    return counter_total(service.metrics_url, name)


def poison_counts(service: Service, kafka: KafkaConfig) -> dict[str, float]:
    return {sample.labels["topic"].removeprefix(kafka.topic_prefix): sample.value
            for family in text_string_to_metric_families(scrape(service))
            if family.name == "modalign_kafka_poison_records" for sample in family.samples
            if sample.name.endswith("_total")}


def test_poison_records_on_every_topic_are_skipped_and_the_valid_records_after_them_are_processed(system) -> None:
    """Garbage bytes, a record of another type (as modalign writes it, type header and all) and a record
    without a value, on every topic: each reader counts and skips them, keeps serving, and reads on."""
    services, prometheus, kafka = system
    replica_feedback = served_feedback(services, "rating")
    before = {name: poison_counts(services[name], kafka) for name in POISON_READERS}
    ignored_before = {name: scraped(services[name], "modalign_state_records_ignored_total") for name in ("policy", "trainer")}
    producer = make_producer(kafka)
    wrong_type = events_pb2.DeadLetter(reason="not this topic's type")
    try:
        for topic in ("feedback", "generations", "rollout", "policy-versions"):
            for value, headers in ((b"\x0a\xff\xff\xff\xff\x0f", []), (wrong_type.SerializeToString(), type_headers(wrong_type)),
                                   (None, [])):
                producer.send(kafka.topic(topic), key=b"poison", value=value, headers=headers).get(timeout=10)
        # After the poison, valid feedback as another feedback replica would have written it.
        produce_durably(producer, kafka.topic("feedback"), [(replica_feedback.feedback_id, events_pb2.FeedbackReceived(
            feedback=replica_feedback, content_sha256=content_digest(replica_feedback)))], 10)
    finally:
        producer.close(timeout=5)

    deadline = time.monotonic() + 60
    while True:
        counts = {name: poison_counts(services[name], kafka) for name in POISON_READERS}
        skipped = {(name, topic): counts[name].get(topic, 0) - before[name].get(topic, 0)
                   for name, topics in POISON_READERS.items() for topic in topics}
        if all(n >= 3 for n in skipped.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert all(n >= 3 for n in skipped.values()), skipped
    # The policy and the trainer take rollout states only from transactions: they ignore the rollout
    # poison before reading it.
    for name in ("policy", "trainer"):
        while scraped(services[name], "modalign_state_records_ignored_total") < ignored_before[name] + 3:
            assert time.monotonic() < deadline + 30, f"the {name} did not ignore the rollout poison"
            time.sleep(1)
    (alert,) = prometheus.wait_firing("ModalignKafkaPoisonRecords", job=f"{RELEASE}-trainer", topic=kafka.topic("generations"))
    assert alert["severity"] == "warning"

    # The feedback service read on past the poison: it knows the other replica's id, and refuses that id for
    # other content; and every service still answers.
    with grpc.insecure_channel(services["feedback"].address) as channel:
        changed = feedback_pb2.Feedback()
        changed.CopyFrom(replica_feedback)
        changed.rating.score = 1 if replica_feedback.rating.score != 1 else 2
        assert submit(feedback_pb2_grpc.FeedbackServiceStub(channel), changed) == grpc.StatusCode.ALREADY_EXISTS
    with grpc.insecure_channel(services["policy"].address) as channel:
        request, _ = prompt(random.Random(5), n=1)
        assert policy_pb2_grpc.PolicyServiceStub(channel).Generate(request, timeout=60).candidates
    with grpc.insecure_channel(services["rollout"].address) as channel:
        assert rollout_pb2_grpc.RolloutServiceStub(channel).GetState(rollout_pb2.GetStateRequest(), timeout=30).revision
    assert all(service.process.process.poll() is None for service in services.values())


def test_a_kafka_outage_fires_the_feedback_unavailable_and_error_rate_alerts(system, module_broker) -> None:
    services, prometheus, _ = system
    first, *ratings = [served_feedback(services, kind) for kind in ["preference", *["rating"] * 8]]
    with grpc.insecure_channel(services["feedback"].address) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        assert submit(stub, first) == grpc.StatusCode.OK
        broker.stop(module_broker)
        with ThreadPoolExecutor(4) as pool:
            # Two rounds, scraped apart: the first creates the counters, the second moves them.
            for round_number in (1, 2):
                batch = ratings[4 * (round_number - 1):4 * round_number]
                codes = set(pool.map(lambda said: submit(stub, said), batch))
                assert codes == {grpc.StatusCode.UNAVAILABLE}
                prometheus.wait_value(
                    f'sum(modalign_feedback_received_total{{job="{RELEASE}-feedback", outcome="unavailable"}})',
                    4 * round_number)
    (unavailable,) = prometheus.wait_firing("ModalignFeedbackUnavailable")
    assert (unavailable["job"], unavailable["severity"]) == (f"{RELEASE}-feedback", "critical")
    # No ModalignKafkaProduceErrors from the feedback service: before storing an id it has not seen it reads its
    # topic to the end (a retry on another replica must see the first write), and with the broker gone that
    # read fails first, so no write is attempted. FeedbackUnavailable and the error rate are its signals.
    error_rate = prometheus.wait_firing("ModalignGrpcErrorRateHigh")
    assert {(a["job"], a["grpc_service"]) for a in error_rate} == {(f"{RELEASE}-feedback", "modalign.v1.FeedbackService")}


def test_a_service_that_goes_away_fires_service_down(system) -> None:
    services, prometheus, _ = system
    services["reward"].process.stop()
    # (Other services may be down too after the Kafka outage: only the reward service is asserted.)
    (down,) = prometheus.wait_firing("ModalignServiceDown", job=f"{RELEASE}-reward")
    assert down["severity"] == "critical"
