"""The Helm chart, checked with the real helm and validated against Kubernetes' and the CRDs' schemas."""

from __future__ import annotations

import argparse
import base64
import functools
import importlib
import json
import re
import urllib.parse
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from modalign.core.config import add_arguments
from modalign.core.kafka import TOPICS, KafkaConfig, topic_configs

from tests.deploy.conftest import (
    CHART,
    EXAMPLES,
    NAMESPACE,
    RELEASE,
    VALUES_FILES,
    find,
    load_json,
    one,
    render,
    render_text,
    run,
    schema_dir,
    tool,
    values_id,
)

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with schemas here.
KUBERNETES_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]

values_files = pytest.mark.parametrize("values_file", VALUES_FILES, ids=values_id)


def store_type(values_file: Path | None) -> str:
    values = yaml.safe_load(values_file.read_text()) if values_file else {}
    return values.get("modelStore", {}).get("type", "pvc")


def tls_enabled(values_file: Path | None) -> bool:
    values = yaml.safe_load(values_file.read_text()) if values_file else {}
    return values.get("tls", {}).get("enabled", False)


def example(name: str) -> Path:
    return EXAMPLES / f"{name}.yaml"


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """The pod spec of every workload by component: a Deployment's or StatefulSet's template or a KServe predictor."""
    specs = {}
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            specs[doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]] = doc["spec"]["template"]["spec"]
        elif doc["kind"] == "InferenceService":
            specs[doc["metadata"]["labels"]["app.kubernetes.io/component"]] = doc["spec"]["predictor"]
    return specs


def service_container(spec: dict) -> dict:
    (container,) = spec["containers"]
    return container


def container_env(docs: list[dict], container: dict) -> dict[str, dict | str]:
    """Environment of a container: its envFrom ConfigMaps, then its env entries (values or valueFrom)."""
    env: dict[str, dict | str] = {}
    for source in container.get("envFrom", []):
        env |= one(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


@values_files
def test_chart_lints_strictly(values_file: Path | None) -> None:
    argv = [tool("helm"), "lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    result = run(argv + (["--values", str(values_file)] if values_file else []))
    assert result.returncode == 0, result.stdout + result.stderr


@values_files
def test_every_rendered_document_is_valid_against_its_schema(values_file: Path | None) -> None:
    assert_valid(render(values_file))


def assert_valid(docs: list[dict]) -> None:
    """Every document valid against its schema: Kubernetes' own, or a custom resource's vendored one."""
    crds = schema_dir("crds")
    assert docs, "the chart rendered nothing"
    for doc in docs:
        label = f"{doc['kind']} {doc['metadata']['name']}"
        group, _, version = doc["apiVersion"].rpartition("/")
        crd_schema = crds / group / f"{doc['kind'].lower()}_{version}.json"
        # A custom resource (its group is a domain outside Kubernetes') is checked against a vendored schema.
        custom = "." in group and not group.endswith(".k8s.io")
        assert crd_schema.exists() or not custom, f"{label}: no schema at {crd_schema.relative_to(crds)}; vendor it"
        if custom:
            # The CRD schemas use Go regular expressions that check_schema rejects: iter_errors only.
            errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in jsonschema.Draft7Validator(load_json(crd_schema)).iter_errors(doc)]
            assert not errors, f"{label} does not match {crd_schema.name}:\n" + "\n".join(errors)
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", doc["metadata"]["name"]), label
        else:
            for kubernetes in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, kubernetes, strict=True)
                except kubernetes_validate.ValidationError as error:
                    pytest.fail(f"{label} is invalid for Kubernetes {kubernetes}: {error.message} at {list(error.path)}")


@pytest.mark.parametrize(
    ("bad_values", "message"),
    [
        ({"policy": {"replicas": "two"}}, "at '/policy/replicas': got string, want integer"),
        ({"reward": {"gpu": {"count": "1"}}}, "at '/reward/gpu/count': got string, want integer"),
        ({"kafka": {"mode": "kraft"}}, "at '/kafka/mode': value must be one of 'external', 'strimzi'"),
        ({"feedback": {"autoscaling": {"enabled": "yes"}}}, "at '/feedback/autoscaling/enabled': got string, want boolean"),
        ({"polcy": {"replicas": 2}}, "additional properties 'polcy' not allowed"),
        ({"modelStore": {"type": "s3"}}, "at '/modelStore/s3/bucket'"),
        ({"policy": {"kserve": {"enabled": True, "canaryTrafficPercent": 150}}}, "at '/policy/kserve/canaryTrafficPercent'"),
        ({"trainer": {"algorithm": "sac"}}, "at '/trainer/algorithm': value must be one of 'ppo', 'a2c', 'rloo', 'grpo', 'dpo'"),
        ({"trainer": {"persistence": {"size": "lots"}}}, "at '/trainer/persistence/size'"),
        ({"rollout": {"steps": [5, 150]}}, "at '/rollout/steps/1'"),
        ({"rollout": {"requiredMetrics": ["clicks"]}}, "at '/rollout/requiredMetrics/0'"),
        ({"policy": {"follow": "newest"}}, "at '/policy/follow': value must be one of 'rollout', 'latest', 'none'"),
        ({"tls": {"secrets": {"trainer": "trainer-tls"}}}, "additional properties 'trainer' not allowed"),
    ],
    ids=["string-for-integer", "string-gpu-count", "unknown-kafka-mode", "string-for-boolean", "misspelt-key",
         "s3-without-bucket", "canary-above-100", "unknown-algorithm", "bad-volume-size", "step-above-100",
         "unknown-rollout-metric", "unknown-follow-mode", "tls-for-a-service-without-an-api"],
)
def test_values_that_break_the_schema_are_refused_with_the_path_at_fault(tmp_path: Path, bad_values: dict, message: str) -> None:
    values_file = tmp_path / "bad-values.yaml"
    values_file.write_text(yaml.safe_dump(bad_values))
    result = run([tool("helm"), "template", RELEASE, str(CHART), "--values", str(values_file)])
    assert result.returncode != 0, f"helm accepted {bad_values}"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


@values_files
def test_install_notes_render_without_missing_values(values_file: Path | None) -> None:
    argv = [tool("helm"), "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    result = run(argv + (["--values", str(values_file)] if values_file else []))
    assert result.returncode == 0, result.stderr
    notes = result.stdout.partition("NOTES:")[2]
    assert "modalign" in notes and "<no value>" not in notes and "%!" not in notes, notes


# Each service's settings as the chart sets them must be flags of that service's config.
SERVICE_CONFIGS = {
    "policy": ("modalign.policy.config", "PolicyConfig"),
    "feedback": ("modalign.feedback.server", "FeedbackConfig"),
    "reward": ("modalign.reward.config", "RewardServerConfig"),
    "trainer": ("modalign.trainer.service", "TrainerConfig"),
    "rollout": ("modalign.rollout.server", "RolloutConfig"),
}


@functools.cache
def env_of_flags(module: str, config_class: str) -> set[str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser, getattr(importlib.import_module(module), config_class))
    return {"MODALIGN_" + action.dest.replace(".", "_").replace("-", "_").upper()
            for action in parser._actions if action.dest != "help"}


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=values_id)
def test_every_setting_the_chart_gives_a_service_is_one_of_its_flags(values_file: Path | None) -> None:
    docs = render(values_file)
    for component, spec in pod_specs(docs).items():
        known = env_of_flags(*SERVICE_CONFIGS[component])
        given = {name for name in container_env(docs, service_container(spec)) if name.startswith("MODALIGN_")}
        assert given - known == set(), f"{component} has no flags for {sorted(given - known)}"


def test_settings_from_values_become_the_services_environment(tmp_path: Path) -> None:
    values_file = tmp_path / "settings.yaml"
    values_file.write_text(yaml.safe_dump({
        "policy": {"settings": {"max-batch-rows": 64, "kafka.produce-timeout-s": 2.5}},
        "reward": {"settings": {"limits.max-batch-size": 16}},
        "trainer": {"settings": {"gate.min-heldout-accuracy": 0.6, "rounds-per-version": 8}},
    }))
    docs = render(values_file)
    specs = pod_specs(docs)
    policy_env = container_env(docs, service_container(specs["policy"]))
    assert policy_env["MODALIGN_MAX_BATCH_ROWS"] == "64"
    assert policy_env["MODALIGN_KAFKA_PRODUCE_TIMEOUT_S"] == "2.5"
    assert container_env(docs, service_container(specs["reward"]))["MODALIGN_LIMITS_MAX_BATCH_SIZE"] == "16"
    trainer_env = container_env(docs, service_container(specs["trainer"]))
    assert (trainer_env["MODALIGN_GATE_MIN_HELDOUT_ACCURACY"], trainer_env["MODALIGN_ROUNDS_PER_VERSION"]) == ("0.6", "8")


@pytest.mark.parametrize("values_file", [example("strimzi"), example("cpu")], ids=values_id)
def test_strimzi_topics_have_the_settings_the_services_create_locally(values_file: Path) -> None:
    values = yaml.safe_load(values_file.read_text())["kafka"]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["kafka"]
    brokers = values.get("strimzi", {}).get("replicas", defaults["strimzi"]["replicas"])
    replication = values.get("replicationFactor") or min(3, brokers)  # the chart's defaults on Strimzi
    config = KafkaConfig(
        topic_prefix=values.get("topicPrefix", defaults["topicPrefix"]),
        partitions=values.get("partitions", defaults["partitions"]),
        replication_factor=replication,
        min_insync_replicas=values.get("minInsyncReplicas") or max(1, replication - 1),
        retention_days=values.get("retentionDays", defaults["retentionDays"]),
    )
    rendered = {t["spec"]["topicName"]: t["spec"] for t in find(render(values_file), "KafkaTopic")}
    expected = {
        config.topic(spec.name): {
            "topicName": config.topic(spec.name),
            "partitions": config.partitions if spec.partitioned else 1,
            "replicas": config.replication_factor,
            "config": topic_configs(spec, config),
        }
        for spec in TOPICS
    }
    assert rendered == expected


@pytest.mark.parametrize(("kafka", "replication", "min_isr"), [
    ({"mode": "strimzi"}, 3, 2),
    ({"mode": "strimzi", "strimzi": {"replicas": 5}}, 3, 2),
    ({"mode": "strimzi", "strimzi": {"replicas": 1}}, 1, 1),
    ({"mode": "strimzi", "replicationFactor": 5, "minInsyncReplicas": 3, "strimzi": {"replicas": 5}}, 5, 3),
    ({"mode": "external"}, 1, 1),
    ({"mode": "external", "replicationFactor": 3, "minInsyncReplicas": 2}, 3, 2),
], ids=["strimzi", "strimzi-5-brokers", "strimzi-1-broker", "strimzi-set", "external", "external-set"])
def test_on_strimzi_topics_default_to_three_replicas_of_which_two_hold_every_write(
    tmp_path: Path, kafka: dict, replication: int, min_isr: int,
) -> None:
    values_file = tmp_path / "kafka.yaml"
    values_file.write_text(yaml.safe_dump({"kafka": kafka}))
    docs = render(values_file)
    for component, spec in pod_specs(docs).items():
        env = container_env(docs, service_container(spec))
        if "MODALIGN_KAFKA_BOOTSTRAP_SERVERS" in env:
            assert (env["MODALIGN_KAFKA_REPLICATION_FACTOR"], env["MODALIGN_KAFKA_MIN_INSYNC_REPLICAS"]) == (
                str(replication), str(min_isr)), component
    if kafka["mode"] == "strimzi":
        topics = find(docs, "KafkaTopic")
        assert topics and {(t["spec"]["replicas"], t["spec"]["config"]["min.insync.replicas"]) for t in topics} == {
            (replication, str(min_isr))}
        broker_config = one(docs, "Kafka", f"{RELEASE}-kafka")["spec"]["kafka"]["config"]
        assert (broker_config["offsets.topic.replication.factor"], broker_config["transaction.state.log.replication.factor"],
                broker_config["min.insync.replicas"], broker_config["transaction.state.log.min.isr"]) == (
            replication, replication, min_isr, min_isr)


def test_strimzi_clients_reach_the_tls_listener_and_trust_the_cluster_ca() -> None:
    docs = render(example("strimzi"))
    kafka = one(docs, "Kafka", f"{RELEASE}-kafka")
    assert kafka["spec"]["kafka"]["listeners"] == [{"name": "tls", "port": 9093, "type": "internal", "tls": True,
                                                    "authentication": {"type": "tls"}}]
    assert one(docs, "KafkaNodePool", f"{RELEASE}-kafka-pool")["spec"]["roles"] == ["controller", "broker"]
    feedback = service_container(pod_specs(docs)["feedback"])
    env = container_env(docs, feedback)
    assert env["MODALIGN_KAFKA_BOOTSTRAP_SERVERS"] == f"{RELEASE}-kafka-kafka-bootstrap.{NAMESPACE}.svc:9093"
    assert env["MODALIGN_KAFKA_SECURITY_PROTOCOL"] == "SSL"
    volumes = {v["name"]: v for v in pod_specs(docs)["feedback"]["volumes"]}
    assert volumes["kafka-ca"]["secret"]["secretName"] == f"{RELEASE}-kafka-cluster-ca-cert"
    assert Path(env["MODALIGN_KAFKA_SSL_CAFILE"]).parent.as_posix() in {m["mountPath"] for m in feedback["volumeMounts"]}


def test_external_kafka_credentials_come_from_secrets() -> None:
    docs = render(example("external-kafka-tls"))
    spec = pod_specs(docs)["policy"]
    env = container_env(docs, service_container(spec))
    assert env["MODALIGN_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["MODALIGN_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert env["MODALIGN_KAFKA_SASL_PLAIN_PASSWORD"] == {"secretKeyRef": {"name": "kafka-sasl", "key": "password"}}
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert secrets == {"kafka-ca": "kafka-ca", "kafka-client": "kafka-client", "auth": f"{RELEASE}-tokens"}
    assert "password" not in render_text(example("external-kafka-tls")).split("kind: ConfigMap", 1)[1].split("---")[0]


@values_files
def test_gpu_services_get_gpus_on_gpu_nodes_and_the_cuda_image(values_file: Path | None) -> None:
    values = yaml.safe_load(values_file.read_text()) if values_file else {}
    for component, spec in pod_specs(render(values_file)).items():
        container = service_container(spec)
        gpus = (values.get(component, {}).get("gpu") or {"count": 0 if component in ("feedback", "rollout") else 1})["count"]
        requested = container["resources"].get("requests", {}).get("nvidia.com/gpu", 0)
        limited = container["resources"].get("limits", {}).get("nvidia.com/gpu", 0)
        assert requested == limited == gpus, component
        assert (":" in container["image"]) and container["image"].split(":")[0].endswith("-cuda") == (gpus > 0), container["image"]
        tolerates_gpu_taint = any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
        assert tolerates_gpu_taint == (gpus > 0), component


@values_files
def test_pods_run_as_non_root_with_a_read_only_root_filesystem(values_file: Path | None) -> None:
    docs = render(values_file)
    drives_kserve = any(d["metadata"]["name"] == f"{RELEASE}-policy" for d in find(docs, "InferenceService"))
    for component, spec in pod_specs(docs).items():
        assert spec["securityContext"]["runAsNonRoot"] is True
        # Only a rollout controller that patches the policy's InferenceService gets an API token.
        assert spec["automountServiceAccountToken"] is (component == "rollout" and drives_kserve), component
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (component, container["name"])
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
        writable = {m["mountPath"] for m in service_container(spec)["volumeMounts"]}
        assert {"/tmp", "/home/modalign/.cache"} <= writable, component


@pytest.mark.parametrize("values_file", [f for f in VALUES_FILES if not tls_enabled(f)], ids=values_id)
def test_grpc_services_are_probed_with_grpc_health_checks_on_their_port(values_file: Path | None) -> None:
    for component, spec in pod_specs(render(values_file)).items():
        container = service_container(spec)
        readiness = container["readinessProbe"]
        if component == "reward":
            assert readiness["httpGet"]["path"] == "/v2/health/ready"
            continue
        if component == "trainer":
            # Its only server is /metrics, up once the models are loaded and the consumers assigned.
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
            continue
        service = f"modalign.v1.{component.capitalize()}Service"
        ports = {p["containerPort"] for p in container["ports"]}
        assert readiness["grpc"]["service"] == service and readiness["grpc"]["port"] in ports
        if "startupProbe" in container:
            assert container["startupProbe"]["grpc"] == readiness["grpc"]
            if component == "policy":  # one process serves gRPC and HTTP: alive by its HTTP API
                assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
            else:
                assert container["livenessProbe"]["grpc"] == {"port": readiness["grpc"]["port"], "service": ""}


def test_default_install_runs_deployments_with_services_autoscaling_budgets_and_policies() -> None:
    docs = render()
    for component in ("policy", "feedback", "reward"):
        name = f"{RELEASE}-{component}"
        one(docs, "Deployment", name)
        one(docs, "Service", name)
        one(docs, "PodDisruptionBudget", name)
        one(docs, "NetworkPolicy", name)
        one(docs, "ServiceMonitor", name)
        one(docs, "ConfigMap", name)
    assert one(docs, "HorizontalPodAutoscaler", f"{RELEASE}-feedback")["spec"]["scaleTargetRef"]["name"] == f"{RELEASE}-feedback"
    assert "replicas" not in one(docs, "Deployment", f"{RELEASE}-feedback")["spec"], "the HPA owns the replica count"
    assert {c["metadata"]["name"] for c in find(docs, "PersistentVolumeClaim")} == {f"{RELEASE}-models", f"{RELEASE}-blobs"}


def test_trainer_is_one_stateful_pod_with_its_own_checkpoint_volume_scraped_through_a_headless_service() -> None:
    docs = render()
    name = f"{RELEASE}-trainer"
    statefulset = one(docs, "StatefulSet", name)
    assert not find(docs, "Deployment", name) and not find(docs, "PodDisruptionBudget", name)
    assert not find(docs, "HorizontalPodAutoscaler", name)
    assert statefulset["spec"]["replicas"] == 1
    service = one(docs, "Service", name)
    assert statefulset["spec"]["serviceName"] == name and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9104, "targetPort": "metrics", "protocol": "TCP", "appProtocol": "http"}]
    monitor = one(docs, "ServiceMonitor", name)
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    container = service_container(statefulset["spec"]["template"]["spec"])
    env = container_env(docs, container)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]]["mountPath"] == env["MODALIGN_WORK_DIR"]
    assert env["MODALIGN_LEARNER_ALGORITHM"] == "rloo" and env["MODALIGN_LEARNER_DEVICE"] == "cuda"
    assert env["MODALIGN_METRICS_PORT"] == "9104" and env["MODALIGN_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["MODALIGN_LEARNER_POLICY_MODEL_DIR"] == "/models/policy/v0"
    assert env["MODALIGN_LEARNER_REWARD_MODEL_DIR"] == "/models/reward/r0"


@pytest.mark.parametrize(("persistence", "volume"), [
    ({"existingClaim": "my-checkpoints"}, {"name": "work", "persistentVolumeClaim": {"claimName": "my-checkpoints"}}),
    ({"enabled": False}, {"name": "work", "emptyDir": {}}),
], ids=["existing-claim", "no-persistence"])
def test_trainer_work_volume_can_be_an_existing_claim_or_none(tmp_path: Path, persistence: dict, volume: dict) -> None:
    values_file = tmp_path / "trainer.yaml"
    values_file.write_text(yaml.safe_dump({"trainer": {"persistence": persistence}}))
    statefulset = one(render(values_file), "StatefulSet", f"{RELEASE}-trainer")
    assert "volumeClaimTemplates" not in statefulset["spec"]
    assert volume in statefulset["spec"]["template"]["spec"]["volumes"]


@pytest.mark.parametrize("values_file", [f for f in VALUES_FILES if store_type(f) == "pvc"], ids=values_id)
def test_the_model_store_is_one_volume_at_one_path_written_only_by_the_trainer(values_file: Path | None) -> None:
    """Published versions travel as file:// paths, so every pod must see the store at the same path."""
    docs = render(values_file)
    seen = {}
    for component, spec in pod_specs(docs).items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        if "models" not in volumes:
            continue
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == f"{RELEASE}-models", component
        (mount,) = [m for m in service_container(spec)["volumeMounts"] if m["name"] == "models"]
        seen[component] = mount["mountPath"]
        writes = component == "trainer"
        assert mount["readOnly"] is not writes, component
        assert volumes["models"]["persistentVolumeClaim"].get("readOnly", False) is not writes, component
    assert set(seen) == {"policy", "reward", "trainer"}
    assert set(seen.values()) == {"/models"}
    trainer_env = container_env(docs, service_container(pod_specs(docs)["trainer"]))
    assert trainer_env["MODALIGN_MODEL_STORE"] == "/models"


@values_files
def test_policy_and_reward_follow_published_versions_over_kafka(values_file: Path | None) -> None:
    """The policy serves the versions the rollout controller routes to (under a controller-driven
    InferenceService: the one version of its revision); the reward service loads each published one."""
    docs = render(values_file)
    driven = bool(find(docs, "InferenceService", f"{RELEASE}-policy"))
    for component in ("policy", "reward"):
        container = service_container(pod_specs(docs)[component])
        env = container_env(docs, container)
        if component == "policy":
            assert env["MODALIGN_FOLLOW"] == ("none" if driven else "rollout")
        else:
            assert env["MODALIGN_FOLLOW"] == "latest"
        assert "MODALIGN_KAFKA_BOOTSTRAP_SERVERS" in env and "MODALIGN_KAFKA_TOPIC_PREFIX" in env, component


def test_services_that_use_gpus_run_their_models_on_them() -> None:
    docs = render()
    for component in ("policy", "reward"):
        assert container_env(docs, service_container(pod_specs(docs)[component]))["MODALIGN_DEVICE"] == "cuda"
    cpu = render(example("cpu"))
    devices = {"policy": "MODALIGN_DEVICE", "reward": "MODALIGN_DEVICE", "trainer": "MODALIGN_LEARNER_DEVICE"}
    for component, variable in devices.items():
        assert container_env(cpu, service_container(pod_specs(cpu)[component]))[variable] == "cpu", component


STRIMZI_BROKERS = [{"podSelector": {"matchLabels": {"strimzi.io/cluster": f"{RELEASE}-kafka", "strimzi.io/kind": "Kafka"}}}]


@pytest.mark.parametrize(("values_file", "ports", "peers"), [
    (None, [9092], None),
    (example("external-kafka-tls"), [9096], None),
    (example("strimzi"), [9093], STRIMZI_BROKERS),
    (example("cpu"), [9093], STRIMZI_BROKERS),
], ids=["default", "external-kafka-tls", "strimzi", "cpu"])
def test_the_trainer_may_reach_kafka_and_dns_and_nothing_else(values_file: Path | None, ports: list[int],
                                                              peers: list | None) -> None:
    policy = one(render(values_file), "NetworkPolicy", f"{RELEASE}-trainer")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]
    dns, kafka = policy["egress"]
    assert dns == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    assert kafka["ports"] == [{"port": port, "protocol": "TCP"} for port in ports]
    assert kafka.get("to") == peers


def test_kafka_peers_narrow_the_trainers_egress(tmp_path: Path) -> None:
    peers = [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    values_file = tmp_path / "peers.yaml"
    values_file.write_text(yaml.safe_dump({"networkPolicy": {"kafkaPeers": peers, "extraEgress": [
        {"to": [{"ipBlock": {"cidr": "10.30.0.5/32"}}], "ports": [{"port": 4317, "protocol": "TCP"}]}]}}))
    _, kafka, extra = one(render(values_file), "NetworkPolicy", f"{RELEASE}-trainer")["spec"]["egress"]
    assert kafka["to"] == peers and extra["ports"] == [{"port": 4317, "protocol": "TCP"}]


def test_kserve_example_serves_policy_and_reward_as_inference_services_with_canaries() -> None:
    docs = render(example("gpu-kserve"))
    assert {d["metadata"]["name"] for d in find(docs, "Deployment")} == {f"{RELEASE}-feedback", f"{RELEASE}-rollout"}
    # The policy's canary share is the rollout controller's to set: the chart never sends one.
    for component, canary, port in (("policy", None, {"name": "h2c", "containerPort": 50051, "protocol": "TCP"}),
                                    ("reward", 20, {"name": "http1", "containerPort": 8080, "protocol": "TCP"})):
        predictor = one(docs, "InferenceService", f"{RELEASE}-{component}")["spec"]["predictor"]
        assert predictor.get("canaryTrafficPercent") == canary
        container = service_container(predictor)
        assert container["name"] == "kserve-container" and container["ports"] == [port]
        env = container_env(docs, container)
        # The model store is mounted as in every other pod, so the trainer's file:// versions resolve.
        assert "STORAGE_URI" not in env
        # (The policy's comes from its revision's annotations, which start at the starting version.)
        model_dir = env["MODALIGN_MODEL_DIR"] if component == "reward" else predictor["annotations"]["modalign.dev/policy-model-dir"]
        assert model_dir == f"/models/{component}/{'v0' if component == 'policy' else 'r0'}"
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
        assert one(docs, "PodMonitor", f"{RELEASE}-{component}")["spec"]["selector"]["matchLabels"] == {
            "serving.kserve.io/inferenceservice": f"{RELEASE}-{component}"}
    assert one(docs, "StatefulSet", f"{RELEASE}-trainer")


def s3_values(tmp_path: Path, **more: dict) -> Path:
    """An S3 model store serving a fixed version: no trainer, nothing following versions."""
    values_file = tmp_path / "s3.yaml"
    values_file.write_text(yaml.safe_dump({
        "modelStore": {"type": "s3", "s3": {"bucket": "models", "prefix": "", "endpoint": "http://minio.storage:9000",
                                            "allowPlaintext": True, "secretName": "s3-keys"}},
        "trainer": {"enabled": False},
        "policy": {"follow": "none", **more.get("policy", {})},
        "reward": {"followVersions": False, **more.get("reward", {})},
    }))
    return values_file


def test_s3_model_store_is_copied_into_plain_deployments_by_the_storage_initializer(tmp_path: Path) -> None:
    docs = render(s3_values(tmp_path))
    assert not find(docs, "PersistentVolumeClaim", f"{RELEASE}-models")
    spec = pod_specs(docs)["reward"]
    (initializer,) = spec["initContainers"]
    assert initializer["args"] == ["s3://models/reward/r0", "/models/reward/r0"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in initializer["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-keys", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert (env["S3_ENDPOINT"], env["S3_USE_HTTPS"]) == ("minio.storage:9000", "0")
    reward_env = container_env(docs, service_container(spec))
    assert reward_env["MODALIGN_MODEL_DIR"] == "/models/reward/r0" and reward_env["MODALIGN_FOLLOW"] == "none"
    assert "MODALIGN_KAFKA_BOOTSTRAP_SERVERS" not in reward_env, "a reward service that follows nothing needs no Kafka"


def test_s3_model_store_reaches_inference_services_through_kserves_storage_initializer(tmp_path: Path) -> None:
    docs = render(s3_values(tmp_path, policy={"kserve": {"enabled": True}}))
    predictor = one(docs, "InferenceService", f"{RELEASE}-policy")["spec"]["predictor"]
    env = container_env(docs, service_container(predictor))
    # (The rollout controller drives it: the model folder comes from the revision's annotation.)
    assert (env["STORAGE_URI"], predictor["annotations"]["modalign.dev/policy-model-dir"]) == ("s3://models/policy/v0", "/mnt/models")
    assert one(docs, "ServiceAccount", RELEASE)["secrets"] == [{"name": "s3-keys"}]


def s3_keys(secret: str) -> dict[str, dict]:
    """The env entries of an S3 key pair from a Secret, as the chart's values name the keys by default."""
    return {name: {"secretKeyRef": {"name": secret, "key": name}} for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}


# examples/s3.yaml: the trainer writes with one key pair, every other pod reads with a read-only one.
S3_WRITER_KEYS, S3_READER_KEYS = s3_keys("s3-credentials"), s3_keys("s3-reader-credentials")
S3_KEYS = S3_WRITER_KEYS


def s3_key_refs(spec: dict) -> dict[str, set[str]]:
    """The S3 key pair Secrets each container of a pod (storage initializers included) reads, by container."""
    return {container["name"]: {entry["valueFrom"]["secretKeyRef"]["name"] for entry in container.get("env", [])
                                if entry["name"] in S3_KEYS and "valueFrom" in entry}
            for container in spec.get("initContainers", []) + spec["containers"]}


def test_on_s3_the_trainer_publishes_to_the_bucket_and_policy_and_reward_fetch_into_a_cache() -> None:
    docs = render(example("s3"))
    assert not find(docs, "PersistentVolumeClaim", f"{RELEASE}-models")
    specs = pod_specs(docs)
    for component in ("policy", "reward", "trainer"):
        container = service_container(specs[component])
        env = container_env(docs, container)
        keys = S3_WRITER_KEYS if component == "trainer" else S3_READER_KEYS
        assert {name: env[name] for name in S3_KEYS} == keys, component
        assert (env["MODALIGN_S3_ENDPOINT_URL"], env["MODALIGN_S3_REGION"]) == ("http://minio.minio.svc:9000", "us-east-1")
        # The example's MinIO speaks plain HTTP, which the services refuse unless told it was chosen.
        assert env["MODALIGN_S3_ALLOW_PLAINTEXT"] == "true", component
        # The root filesystem is read-only: the cache lives in the pod's writable models emptyDir.
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "models"]
        assert mount["readOnly"] is False and env["MODALIGN_S3_CACHE_DIR"].startswith(mount["mountPath"] + "/"), component
        assert {"name": "models", "emptyDir": {}} in specs[component]["volumes"], component
    for component in ("feedback", "rollout"):
        assert not set(S3_KEYS) & set(container_env(docs, service_container(specs[component]))), component
    trainer_env = container_env(docs, service_container(specs["trainer"]))
    assert trainer_env["MODALIGN_MODEL_STORE"] == "s3://modalign-models/models"
    # It learns from both starting versions, each copied in by a storage initializer.
    assert [i["args"] for i in specs["trainer"]["initContainers"]] == [
        ["s3://modalign-models/models/policy/v0", "/models/policy/v0"],
        ["s3://modalign-models/models/reward/r0", "/models/reward/r0"]]
    assert (trainer_env["MODALIGN_LEARNER_POLICY_MODEL_DIR"], trainer_env["MODALIGN_LEARNER_REWARD_MODEL_DIR"]) == (
        "/models/policy/v0", "/models/reward/r0")
    *_, s3_egress = one(docs, "NetworkPolicy", f"{RELEASE}-trainer")["spec"]["egress"]
    assert s3_egress == {"ports": [{"port": 9000, "protocol": "TCP"}],
                         "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "minio"}}}]}


def test_on_s3_a_controller_driven_policy_inference_service_fetches_the_versions_it_is_given(tmp_path: Path) -> None:
    values_file = tmp_path / "s3-kserve.yaml"
    values_file.write_text(yaml.safe_dump({**yaml.safe_load(example("s3").read_text()), "policy": {"kserve": {"enabled": True}}}))
    docs = render(values_file)
    predictor = one(docs, "InferenceService", f"{RELEASE}-policy")["spec"]["predictor"]
    env = container_env(docs, service_container(predictor))
    # The starting version from KServe's storage initializer; later ones by the s3:// URI the rollout
    # controller writes into the revision's annotation, fetched by the policy itself.
    assert env["STORAGE_URI"] == "s3://modalign-models/models/policy/v0"
    assert {name: env[name] for name in S3_KEYS} == S3_READER_KEYS
    # KServe's storage initializer reads the Secrets listed on the pod's account: the read-only one.
    assert predictor["serviceAccountName"] == RELEASE
    assert one(docs, "ServiceAccount", RELEASE)["secrets"] == [{"name": "s3-reader-credentials"}]
    assert env["MODALIGN_S3_CACHE_DIR"] == "/models/cache" and {"name": "models", "emptyDir": {}} in predictor["volumes"]


@pytest.mark.parametrize(("endpoint", "port"), [("", 443), ("https://s3.example.com", 443),
                                                 ("http://minio:9000", 9000), ("http://ceph.storage/", 80)])
def test_the_trainers_egress_reaches_the_s3_endpoints_port(tmp_path: Path, endpoint: str, port: int) -> None:
    values_file = tmp_path / "s3.yaml"
    values_file.write_text(yaml.safe_dump({"modelStore": {"type": "s3", "s3": {"bucket": "b", "secretName": "s", "endpoint": endpoint,
                                                                              "allowPlaintext": True}}}))
    *_, s3_egress = one(render(values_file), "NetworkPolicy", f"{RELEASE}-trainer")["spec"]["egress"]
    assert s3_egress == {"ports": [{"port": port, "protocol": "TCP"}]}


def test_on_s3_only_the_trainer_holds_the_key_pair_that_writes() -> None:
    docs = render(example("s3"))
    specs = pod_specs(docs)
    for component in ("policy", "reward", "trainer"):
        expected = "s3-credentials" if component == "trainer" else "s3-reader-credentials"
        refs = s3_key_refs(specs[component])
        assert len(refs) > 1 and all(secrets == {expected} for secrets in refs.values()), (component, refs)
    for component in ("feedback", "rollout"):
        assert not any(s3_key_refs(specs[component]).values()), component
    # The trainer runs as an account of its own, so that a workload identity could tell it apart too.
    assert specs["trainer"]["serviceAccountName"] == f"{RELEASE}-trainer"
    assert {spec["serviceAccountName"] for component, spec in specs.items() if component != "trainer"} == {RELEASE}
    assert "secrets" not in one(docs, "ServiceAccount", f"{RELEASE}-trainer")
    assert one(docs, "ServiceAccount", RELEASE)["secrets"] == [{"name": "s3-reader-credentials"}]


def test_on_s3_a_workload_identity_replaces_the_key_pairs(tmp_path: Path) -> None:
    reader, writer = "arn:aws:iam::111122223333:role/modalign-reader", "arn:aws:iam::111122223333:role/modalign-writer"
    values_file = tmp_path / "irsa.yaml"
    values_file.write_text(yaml.safe_dump({
        "modelStore": {"type": "s3", "s3": {"bucket": "models", "region": "eu-west-1"}},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": reader}},
        "trainer": {"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": writer}}},
        "policy": {"kserve": {"enabled": True}},
    }))
    docs = render(values_file)
    assert_valid(docs)
    specs = pod_specs(docs)
    for component, spec in specs.items():
        assert not any(s3_key_refs(spec).values()), component
    readers = one(docs, "ServiceAccount", RELEASE)
    assert readers["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": reader} and "secrets" not in readers
    trainer = one(docs, "ServiceAccount", f"{RELEASE}-trainer")
    assert trainer["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": writer}
    assert specs["trainer"]["serviceAccountName"] == f"{RELEASE}-trainer"
    for component in ("policy", "reward"):  # the policy's InferenceService too: KServe's initializer runs as it
        assert specs[component]["serviceAccountName"] == RELEASE, component


def test_dashboards_are_configmaps_for_the_grafana_sidecar() -> None:
    dashboards = {d["metadata"]["name"]: d for d in find(render(), "ConfigMap") if "dashboard" in d["metadata"]["name"]}
    assert set(dashboards) == {f"{RELEASE}-dashboard-{name}" for name in ("serving", "feedback", "training", "rollout")}
    for configmap in dashboards.values():
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((filename, content),) = configmap["data"].items()
        assert filename.endswith(".json")
        assert yaml.safe_load(content)["uid"].startswith("modalign-")


def test_changing_a_setting_rolls_the_pods_that_read_it_and_no_others() -> None:
    def checksums(*extra: str) -> dict[str, str]:
        docs = render(None, *extra)
        return {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
                for d in find(docs, "Deployment") + find(docs, "StatefulSet")}

    before = checksums()
    assert len(before) == 5
    feedback_setting = checksums("--set", "feedback.settings.grpc\\.max-workers=8")
    assert {name for name in before if before[name] != feedback_setting[name]} == {f"{RELEASE}-feedback"}
    trainer_setting = checksums("--set", "trainer.algorithm=grpo")
    assert {name for name in before if before[name] != trainer_setting[name]} == {f"{RELEASE}-trainer"}
    kafka_setting = checksums("--set", "kafka.partitions=6")
    assert {name for name in before if before[name] != kafka_setting[name]} == {
        f"{RELEASE}-{component}" for component in ("policy", "feedback", "reward", "trainer", "rollout")}
    # A reward service that follows no versions reads no Kafka settings: a Kafka change leaves it alone.
    unfollowing = checksums("--set", "reward.followVersions=false")
    unfollowing_kafka_setting = checksums("--set", "reward.followVersions=false", "--set", "kafka.partitions=6")
    assert unfollowing[f"{RELEASE}-reward"] == unfollowing_kafka_setting[f"{RELEASE}-reward"]


def test_rollout_controller_is_one_pod_replaced_by_recreate_and_reads_every_policy_replicas_metrics() -> None:
    docs = render()
    name = f"{RELEASE}-rollout"
    deployment = one(docs, "Deployment", name)
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert not find(docs, "HorizontalPodAutoscaler", name) and not find(docs, "PodDisruptionBudget", name)
    service = one(docs, "Service", name)
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("grpc", 50055), ("metrics", 9105)]
    assert one(docs, "ServiceMonitor", name)["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    env = container_env(docs, service_container(deployment["spec"]["template"]["spec"]))
    assert env["MODALIGN_ROLLOUT_STEPS"] == "5,25,50,100" and env["MODALIGN_ROLLOUT_REQUIRED_METRICS"] == "rating,preference"
    assert env["MODALIGN_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["MODALIGN_REWARD_URL"] == f"{RELEASE}-reward.{NAMESPACE}.svc:8080"
    assert "MODALIGN_KSERVE_INFERENCE_SERVICE" not in env
    # The policy replicas, found by a headless Service, as many as run; one the policy's monitor does not select.
    host, _, port = env["MODALIGN_POLICY_METRICS"].rpartition(":")
    metrics = one(docs, "Service", host.split(".")[0])
    assert metrics["spec"]["clusterIP"] == "None" and host == f"{metrics['metadata']['name']}.{NAMESPACE}.svc"
    assert metrics["spec"]["selector"] == one(docs, "Service", f"{RELEASE}-policy")["spec"]["selector"]
    assert [p["targetPort"] for p in metrics["spec"]["ports"]] == [int(port)] == [9101]
    policy_monitor = one(docs, "ServiceMonitor", f"{RELEASE}-policy")["spec"]["selector"]["matchLabels"]
    assert not policy_monitor.items() <= metrics["metadata"]["labels"].items()
    # The policy and the controller name the starting version alike.
    policy_env = container_env(docs, service_container(pod_specs(docs)["policy"]))
    assert policy_env["MODALIGN_POLICY_VERSION"] == env["MODALIGN_ROLLOUT_INITIAL_VERSION"] == "v0"
    assert not find(docs, "Role") and not find(docs, "ServiceAccount", name), "no API access without KServe"


def test_without_the_rollout_controller_nothing_of_it_renders(tmp_path: Path) -> None:
    values_file = tmp_path / "no-rollout.yaml"
    values_file.write_text(yaml.safe_dump({"rollout": {"enabled": False}, "policy": {"follow": "latest"}}))
    docs = render(values_file)
    assert not [d for d in docs if "rollout" in d["metadata"]["name"] or "policy-metrics" in d["metadata"]["name"]]
    assert "modalign.rollout" not in {g["name"] for g in one(docs, "PrometheusRule", RELEASE)["spec"]["groups"]}
    assert container_env(docs, service_container(pod_specs(docs)["policy"]))["MODALIGN_FOLLOW"] == "latest"


def test_rollout_controller_drives_the_policy_inference_service_with_its_own_narrow_account() -> None:
    docs = render(example("gpu-kserve"))
    policy = one(docs, "InferenceService", f"{RELEASE}-policy")["spec"]["predictor"]
    assert "canaryTrafficPercent" not in policy
    assert policy["annotations"]["modalign.dev/policy-version"] == "v0"
    container = service_container(policy)
    env = {e["name"]: e for e in container["env"]}
    for variable, annotation in (("MODALIGN_POLICY_VERSION", "modalign.dev/policy-version"),
                                 ("MODALIGN_MODEL_DIR", "modalign.dev/policy-model-dir")):
        assert env[variable]["valueFrom"] == {"fieldRef": {"fieldPath": f"metadata.annotations['{annotation}']"}}
    assert container_env(docs, container)["MODALIGN_FOLLOW"] == "none"
    name = f"{RELEASE}-rollout"
    spec = one(docs, "Deployment", name)["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == name and spec["automountServiceAccountToken"] is True
    controller_env = container_env(docs, service_container(spec))
    assert controller_env["MODALIGN_KSERVE_INFERENCE_SERVICE"] == f"{RELEASE}-policy"
    assert controller_env["MODALIGN_KSERVE_NAMESPACE"] == NAMESPACE
    assert controller_env["MODALIGN_REWARD_URL"] == f"{RELEASE}-reward-predictor.{NAMESPACE}.svc:80"
    assert one(docs, "Role", name)["rules"] == [{"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
                                                "resourceNames": [f"{RELEASE}-policy"], "verbs": ["get", "patch"]}]
    binding = one(docs, "RoleBinding", name)
    assert binding["roleRef"]["name"] == name
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]
    one(docs, "ServiceAccount", name)
    # Its replicas' /metrics, found through the headless Service whichever runs them.
    assert one(docs, "Service", f"{RELEASE}-policy-metrics")["spec"]["selector"][
        "app.kubernetes.io/component"] == "policy"


@pytest.mark.parametrize(("values", "message"), [
    ({"policy": {"kserve": {"enabled": True, "canaryTrafficPercent": 10}}},
     "the rollout controller sets the canaryTrafficPercent of the policy's InferenceService"),
    ({"rollout": {"steps": [50, 25, 100]}}, "rollout.steps must increase, step by step, got [50,25,100]"),
    ({"rollout": {"requiredMetrics": ["rating", "reward"], "scoreWithReward": False}},
     "rollout.requiredMetrics names reward, which needs the reward service"),
    ({"auth": {"insecure": True, "tokensSecret": "ours"}}, "auth.insecure turns authentication off"),
    ({"modelStore": {"type": "s3", "s3": {"bucket": "b", "endpoint": "http://minio:9000"}}},
     "modelStore.s3.endpoint http://minio:9000 is plaintext HTTP"),
    ({"tls": {"enabled": True}}, "tls.enabled: the policy service has no certificate"),
    ({"tls": {"enabled": True, "secrets": {"policy": "p", "feedback": "f", "rollout": "r"}}},
     "tls.enabled: the reward service has no certificate"),
    ({"tls": {"mutual": True, "secretName": "modalign-tls"}}, "tls.mutual asks every caller for a certificate over TLS"),
    ({"tls": {"enabled": True, "certManager": {"enabled": True}}}, "name the Issuer or ClusterIssuer"),
    ({"tls": {"enabled": True, "secretName": "modalign-tls", "certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}},
     "unset tls.secretName and tls.secrets, or tls.certManager.enabled"),
    ({"tls": {"enabled": True, "secretName": "modalign-tls"}, "reward": {"kserve": {"enabled": True}}},
     "tls.enabled cannot be combined with reward.kserve.enabled"),
    ({"tls": {"enabled": True, "mutual": True, "secretName": "modalign-tls"}},
     "Prometheus needs a client certificate to scrape the reward service's /metrics"),
    ({"kafka": {"mode": "strimzi", "minInsyncReplicas": 4}}, "kafka.minInsyncReplicas 4 is more than kafka.replicationFactor 3"),
    ({"kafka": {"mode": "strimzi", "replicationFactor": 3, "strimzi": {"replicas": 1}}},
     "kafka.replicationFactor 3 is more than the 1 brokers of kafka.strimzi.replicas"),
], ids=["canary-share-set-by-hand", "decreasing-steps", "reward-metric-without-scoring", "insecure-with-tokens",
        "plaintext-s3", "tls-without-certificates", "tls-without-one-certificate", "mutual-without-tls",
        "cert-manager-without-issuer", "cert-manager-and-secrets", "tls-with-kserve", "mutual-scrape-without-certificate",
        "min-isr-above-replicas", "more-replicas-than-brokers"])
def test_settings_that_cannot_work_are_refused(tmp_path: Path, values: dict, message: str) -> None:
    values_file = tmp_path / "settings.yaml"
    values_file.write_text(yaml.safe_dump(values))
    result = run([tool("helm"), "template", RELEASE, str(CHART), "--values", str(values_file)])
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


ROLLOUT_PEER = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "modalign", "app.kubernetes.io/instance": RELEASE,
                                                "app.kubernetes.io/component": "rollout"}}}


def test_the_rollout_controller_reaches_kafka_the_policy_metrics_and_the_reward_service_and_nothing_else(tmp_path: Path) -> None:
    clients = [{"namespaceSelector": {"matchLabels": {"modalign.dev/client": "true"}}}]
    scrapers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    operators = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ml-platform"}}}]
    values_file = tmp_path / "peers.yaml"
    values_file.write_text(yaml.safe_dump({"networkPolicy": {"clients": clients, "scrapers": scrapers, "operators": operators}}))
    docs = render(values_file)
    controller = one(docs, "NetworkPolicy", f"{RELEASE}-rollout")["spec"]
    assert controller["policyTypes"] == ["Ingress", "Egress"]
    assert controller["ingress"] == [{"ports": [{"port": "grpc", "protocol": "TCP"}], "from": operators},
                                     {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": scrapers}]
    dns, kafka, policy_metrics, reward = controller["egress"]
    assert dns["ports"][0]["port"] == 53 and kafka["ports"] == [{"port": 9092, "protocol": "TCP"}]
    assert policy_metrics["ports"] == [{"port": 9101, "protocol": "TCP"}]
    assert policy_metrics["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "policy"
    assert reward["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert reward["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "reward"
    # ... and what it reaches lets it in, though it is neither a client nor a scraper.
    policy_ingress = one(docs, "NetworkPolicy", f"{RELEASE}-policy")["spec"]["ingress"]
    assert policy_ingress[1] == {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": scrapers + [ROLLOUT_PEER]}
    assert ROLLOUT_PEER not in policy_ingress[0]["from"], "the controller does not call the policy's API"
    (reward_ingress,) = one(docs, "NetworkPolicy", f"{RELEASE}-reward")["spec"]["ingress"]
    assert reward_ingress["from"] == clients + scrapers + [ROLLOUT_PEER]


def test_the_policys_openai_api_has_its_port_service_and_clients_and_forwards_feedback(tmp_path: Path) -> None:
    clients = [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]
    values_file = tmp_path / "clients.yaml"
    values_file.write_text(yaml.safe_dump({"networkPolicy": {"clients": clients}}))
    docs = render(values_file)
    service = one(docs, "Service", f"{RELEASE}-policy")["spec"]
    assert {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"} in service["ports"]
    [container] = one(docs, "Deployment", f"{RELEASE}-policy")["spec"]["template"]["spec"]["containers"]
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    settings = one(docs, "ConfigMap", f"{RELEASE}-policy")["data"]
    assert settings["MODALIGN_HTTP_LISTEN"] == "0.0.0.0:8000"
    assert settings["MODALIGN_FEEDBACK_ADDRESS"] == f"{RELEASE}-feedback:50052"
    # Only clients reach the API; the feedback service lets the policy pods in, which forward /v1/feedback.
    api = one(docs, "NetworkPolicy", f"{RELEASE}-policy")["spec"]["ingress"][0]
    assert api == {"ports": [{"port": "grpc", "protocol": "TCP"}, {"port": "http", "protocol": "TCP"}], "from": clients}
    feedback = one(docs, "NetworkPolicy", f"{RELEASE}-feedback")["spec"]["ingress"][0]
    assert feedback["from"][:1] == clients
    assert feedback["from"][1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "policy"


AUTHENTICATING = ("policy", "feedback", "reward", "rollout")


@values_files
def test_every_api_service_requires_tokens_from_a_secret_it_mounts_and_none_runs_open(values_file: Path | None) -> None:
    docs = render(values_file)
    for component, spec in pod_specs(docs).items():
        env = container_env(docs, service_container(spec))
        assert "MODALIGN_AUTH_INSECURE" not in env, component
        if component not in AUTHENTICATING:
            continue
        assert env["MODALIGN_AUTH_TOKENS_FILE"] == "/etc/modalign/auth/tokens.json", component
        [volume] = [v for v in spec["volumes"] if v["name"] == "auth"]
        assert volume["secret"]["secretName"] == f"{RELEASE}-tokens", component
        mount = next(m for m in service_container(spec)["volumeMounts"] if m["name"] == "auth")
        assert mount == {"name": "auth", "mountPath": "/etc/modalign/auth", "readOnly": True}  # no subPath: edits arrive
    [secret] = find(docs, "Secret", f"{RELEASE}-tokens")
    tokens = json.loads(base64.b64decode(secret["data"]["tokens.json"]))
    assert sorted(tokens) == ["client", "operator", "reader"] and len({*tokens.values()}) == 3
    assert all(len(token) >= 32 for token in tokens.values())
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    rollout = container_env(docs, service_container(pod_specs(docs)["rollout"]))
    if "MODALIGN_REWARD_URL" in rollout:  # the controller scores with the reader token of the same file
        assert rollout["MODALIGN_REWARD_AUTH_TOKENS_FILE"] == "/etc/modalign/auth/tokens.json"


def test_tokens_and_a_jwt_key_can_come_from_the_operators_secrets(tmp_path: Path) -> None:
    values_file = tmp_path / "auth.yaml"
    values_file.write_text(yaml.safe_dump({"auth": {"tokensSecret": "our-tokens", "frontEnds": ["web", "client"],
                                                    "jwt": {"publicKeySecret": "idp-key", "issuer": "https://idp"}}}))
    docs = render(values_file)
    assert find(docs, "Secret", f"{RELEASE}-tokens") == []
    for component in AUTHENTICATING:
        spec = pod_specs(docs)[component]
        env = container_env(docs, service_container(spec))
        assert env["MODALIGN_AUTH_JWT_PUBLIC_KEY"] == "/etc/modalign/jwt/public.pem"
        assert (env["MODALIGN_AUTH_JWT_ISSUER"], env["MODALIGN_AUTH_FRONT_ENDS"]) == ("https://idp", "web,client")
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        assert secrets["auth"] == "our-tokens" and secrets["jwt"] == "idp-key"


def test_authentication_is_off_only_when_asked_and_then_nothing_pretends_otherwise(tmp_path: Path) -> None:
    values_file = tmp_path / "insecure.yaml"
    values_file.write_text(yaml.safe_dump({"auth": {"insecure": True}}))
    docs = render(values_file)
    assert find(docs, "Secret", f"{RELEASE}-tokens") == []
    for component in AUTHENTICATING:
        spec = pod_specs(docs)[component]
        assert container_env(docs, service_container(spec))["MODALIGN_AUTH_INSECURE"] == "true"
        assert "auth" not in {v["name"] for v in spec["volumes"]}


def test_with_strimzi_each_service_is_a_kafka_user_allowed_exactly_its_own_writes() -> None:
    docs = render(example("strimzi"))
    kafka = one(docs, "Kafka", f"{RELEASE}-kafka")["spec"]["kafka"]
    assert kafka["authorization"] == {"type": "simple"}
    assert [listener["authentication"] for listener in kafka["listeners"]] == [{"type": "tls"}]
    prefix = "modalign."
    writers: dict[str, set[str]] = {}
    transactional: dict[str, set[str]] = {}
    users = find(docs, "KafkaUser")
    assert {u["metadata"]["labels"]["app.kubernetes.io/component"] for u in users} == \
        {"policy", "feedback", "reward", "trainer", "rollout"}
    for user in users:
        component = user["metadata"]["labels"]["app.kubernetes.io/component"]
        assert user["spec"]["authentication"] == {"type": "tls"}
        for acl in user["spec"]["authorization"]["acls"]:
            resource, operations = acl["resource"], set(acl["operations"])
            assert acl.get("type", "allow") == "allow" and "All" not in operations
            if resource["patternType"] == "prefix":  # the one broad grant: seeing that the topics exist
                assert (resource["name"], operations) == (prefix, {"Describe", "DescribeConfigs"})
            elif resource["type"] == "topic" and "Write" in operations:
                writers.setdefault(resource["name"].removeprefix(prefix), set()).add(component)
            elif resource["type"] == "transactionalId":
                transactional.setdefault(resource["name"], set()).add(component)
    assert writers == {"policy-versions": {"trainer"}, "rollout": {"rollout"}, "feedback": {"feedback"},
                       "generations": {"policy"}, "feedback.dlq": {"trainer"}}
    assert transactional == {f"{prefix}rollout-controller": {"rollout"}}
    # Each pod connects with its own user's certificate.
    for component, spec in pod_specs(docs).items():
        client = [v for v in spec["volumes"] if v["name"] == "kafka-client"]
        assert client and client[0]["secret"]["secretName"] == f"{RELEASE}-{component}", component


@pytest.mark.parametrize("values_file", [None, example("s3")], ids=["default", "s3"])
def test_every_service_may_reach_only_what_it_talks_to(values_file: Path | None) -> None:
    docs = render(values_file)
    endpoint = (yaml.safe_load(values_file.read_text())["modelStore"]["s3"].get("endpoint") if values_file else None)
    on_s3, s3_port = values_file is not None, urllib.parse.urlparse(endpoint or "https://s3").port or 443
    for component in ("policy", "feedback", "reward", "trainer", "rollout"):
        policy = one(docs, "NetworkPolicy", f"{RELEASE}-{component}")["spec"]
        assert policy["policyTypes"] == ["Ingress", "Egress"], component
        ports = {port["port"] for rule in policy["egress"] for port in rule["ports"]}
        expected = {53}
        if component != "reward":  # the reward service uses Kafka only to follow versions
            expected.add(9092)
        if component == "policy":
            expected.add(50052)  # the feedback service, for /v1/feedback
        if component == "rollout":
            expected |= {9101, 8080}  # policy /metrics, reward REST
        if on_s3 and component in ("policy", "reward", "trainer"):
            expected.add(s3_port)
        if component == "reward" and "MODALIGN_KAFKA_BOOTSTRAP_SERVERS" in container_env(
                docs, service_container(pod_specs(docs)["reward"])):
            expected.add(9092)
        assert ports == expected, component
    to_feedback = [rule for rule in one(docs, "NetworkPolicy", f"{RELEASE}-policy")["spec"]["egress"]
                   if rule["ports"] == [{"port": 50052, "protocol": "TCP"}]]
    assert to_feedback[0]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "feedback"


def test_the_rollout_service_is_closed_to_the_network_unless_operators_are_listed() -> None:
    ingress = one(render(), "NetworkPolicy", f"{RELEASE}-rollout")["spec"]["ingress"]
    assert ingress == [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]  # /metrics only; no grpc from anyone


TLS_SERVICES = ("policy", "feedback", "reward", "rollout")


def test_with_tls_every_api_serves_the_certificate_it_mounts_and_callers_verify_it(tmp_path: Path) -> None:
    values_file = tmp_path / "tls.yaml"
    values_file.write_text(yaml.safe_dump({"tls": {"enabled": True, "secretName": "modalign-tls",
                                                   "secrets": {"reward": "reward-tls"}}}))
    docs = render(values_file)
    assert_valid(docs)
    specs = pod_specs(docs)
    for component in TLS_SERVICES:
        container = service_container(specs[component])
        env = container_env(docs, container)
        assert {"name": "tls", "mountPath": "/etc/modalign/tls", "readOnly": True} in container["volumeMounts"], component
        [volume] = [v for v in specs[component]["volumes"] if v["name"] == "tls"]
        assert volume["secret"] == {"secretName": "reward-tls" if component == "reward" else "modalign-tls",
                                    "defaultMode": 0o440}, component
        assert (env["MODALIGN_TLS_CERT"], env["MODALIGN_TLS_KEY"]) == ("/etc/modalign/tls/tls.crt", "/etc/modalign/tls/tls.key")
        assert "MODALIGN_TLS_CLIENT_CA" not in env, component
        # The flags exist: a misspelt one would stop the service at start.
        known = env_of_flags(*SERVICE_CONFIGS[component])
        assert {name for name in env if name.startswith("MODALIGN_")} <= known, component
    trainer = specs["trainer"]
    assert "tls" not in {v["name"] for v in trainer["volumes"]}
    assert not {name for name in container_env(docs, service_container(trainer)) if "TLS" in name}
    # The callers verify the services they call against the CA, and present no certificate of their own.
    policy_env = container_env(docs, service_container(specs["policy"]))
    rollout_env = container_env(docs, service_container(specs["rollout"]))
    assert policy_env["MODALIGN_FEEDBACK_TLS_CA"] == rollout_env["MODALIGN_REWARD_TLS_CA"] == "/etc/modalign/tls/ca.crt"
    assert "MODALIGN_FEEDBACK_TLS_CERT" not in policy_env and "MODALIGN_REWARD_TLS_CERT" not in rollout_env
    # Kubelet's gRPC probes speak no TLS: TCP connects on gRPC ports, HTTPS GETs on HTTP ones.
    probes = {component: {kind: service_container(specs[component])[kind]
                          for kind in ("startupProbe", "livenessProbe", "readinessProbe")} for component in specs}
    assert probes["policy"]["startupProbe"]["tcpSocket"] == probes["policy"]["readinessProbe"]["tcpSocket"] == {"port": "grpc"}
    assert probes["policy"]["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": "HTTPS"}
    for component in ("feedback", "rollout"):
        assert all(probe["tcpSocket"] == {"port": "grpc"} for probe in probes[component].values()), component
    assert probes["reward"]["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http", "scheme": "HTTPS"}
    assert probes["reward"]["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert probes["trainer"]["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}  # plain /metrics
    # /metrics stays plain on its own ports; the reward service's shares its REST port, so it is scraped over HTTPS.
    reward_scrape = one(docs, "ServiceMonitor", f"{RELEASE}-reward")["spec"]["endpoints"][0]
    assert reward_scrape["scheme"] == "https"
    assert reward_scrape["tlsConfig"] == {"ca": {"secret": {"name": "reward-tls", "key": "ca.crt"}},
                                          "serverName": f"{RELEASE}-reward.{NAMESPACE}.svc"}
    for component in ("policy", "feedback", "trainer", "rollout"):
        assert "scheme" not in one(docs, "ServiceMonitor", f"{RELEASE}-{component}")["spec"]["endpoints"][0], component
    assert not find(docs, "Certificate")


def test_mutual_tls_with_cert_manager_issues_a_certificate_per_service_for_the_names_it_is_called_by() -> None:
    docs = render(example("tls-cert-manager"))
    specs = pod_specs(docs)
    certificates = {c["metadata"]["name"]: c["spec"] for c in find(docs, "Certificate")}
    for component in TLS_SERVICES:
        container = service_container(specs[component])
        env = container_env(docs, container)
        [volume] = [v for v in specs[component]["volumes"] if v["name"] == "tls"]
        certificate = certificates[volume["secret"]["secretName"]]
        assert certificate["secretName"] == volume["secret"]["secretName"]
        assert certificate["issuerRef"] == {"name": "modalign-ca", "kind": "Issuer", "group": "cert-manager.io"}
        assert certificate["commonName"] == f"{RELEASE}-{component}"
        assert {"server auth", "client auth"} <= set(certificate["usages"])
        # Every caller must present a certificate from the CA, so kubelet's probes can only connect.
        assert env["MODALIGN_TLS_CLIENT_CA"] == "/etc/modalign/tls/ca.crt", component
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert set(container[kind]) & {"grpc", "httpGet", "tcpSocket"} == {"tcpSocket"}, (component, kind)
    # The names the callers dial are in the certificates they verify, and the callers present their own.
    policy_env = container_env(docs, service_container(specs["policy"]))
    rollout_env = container_env(docs, service_container(specs["rollout"]))
    feedback_host = policy_env["MODALIGN_FEEDBACK_ADDRESS"].rpartition(":")[0]
    reward_host = rollout_env["MODALIGN_REWARD_URL"].rpartition(":")[0]
    assert feedback_host in certificates[f"{RELEASE}-feedback-tls"]["dnsNames"]
    assert reward_host in certificates[f"{RELEASE}-reward-tls"]["dnsNames"]
    for env, prefix in ((policy_env, "MODALIGN_FEEDBACK_TLS"), (rollout_env, "MODALIGN_REWARD_TLS")):
        assert (env[f"{prefix}_CERT"], env[f"{prefix}_KEY"]) == ("/etc/modalign/tls/tls.crt", "/etc/modalign/tls/tls.key")
    # Prometheus scrapes the reward service's /metrics with a client certificate of its own.
    metrics_client = certificates.pop(f"{RELEASE}-metrics-client-tls")
    assert metrics_client["usages"] == ["digital signature", "client auth"] and "dnsNames" not in metrics_client
    tls_config = one(docs, "ServiceMonitor", f"{RELEASE}-reward")["spec"]["endpoints"][0]["tlsConfig"]
    assert tls_config["cert"] == {"secret": {"name": f"{RELEASE}-metrics-client-tls", "key": "tls.crt"}}
    assert tls_config["keySecret"] == {"name": f"{RELEASE}-metrics-client-tls", "key": "tls.key"}
    assert set(certificates) == {f"{RELEASE}-{component}-tls" for component in TLS_SERVICES}
