"""The Helm chart, checked with the real helm and validated against Kubernetes' and the CRDs' schemas."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from modalign.core.config import add_arguments
from modalign.core.kafka import TOPICS, KafkaConfig, topic_configs

from tests.deploy.conftest import (
    CHART, EXAMPLES, NAMESPACE, RELEASE, VALUES_FILES, find, load_json, one, render, render_text, run,
    shared_dir, tool, values_id,
)

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with schemas here.
KUBERNETES_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]
WORKLOAD_KINDS = {"Deployment", "InferenceService"}

values_files = pytest.mark.parametrize("values_file", VALUES_FILES, ids=values_id)


def example(name: str) -> Path:
    return EXAMPLES / f"{name}.yaml"


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """The pod spec of every workload by component: a Deployment's template or a KServe predictor."""
    specs = {}
    for doc in docs:
        if doc["kind"] == "Deployment":
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
    crds = shared_dir("schemas", "crds")
    docs = render(values_file)
    assert docs, "the chart rendered nothing"
    for doc in docs:
        label = f"{doc['kind']} {doc['metadata']['name']}"
        group, _, version = doc["apiVersion"].rpartition("/")
        crd_schema = crds / group / f"{doc['kind'].lower()}_{version}.json"
        if crd_schema.exists():
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
    ],
    ids=["string-for-integer", "string-gpu-count", "unknown-kafka-mode", "string-for-boolean", "misspelt-key",
         "s3-without-bucket", "canary-above-100"],
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
    "policy": ("modalign.policy.server", "PolicyConfig"),
    "feedback": ("modalign.feedback.server", "FeedbackConfig"),
    "reward": ("modalign.reward.server", "RewardServerConfig"),
}
def env_of_flags(module: str, config_class: str) -> set[str]:
    import importlib

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
    }))
    docs = render(values_file)
    specs = pod_specs(docs)
    policy_env = container_env(docs, service_container(specs["policy"]))
    assert policy_env["MODALIGN_MAX_BATCH_ROWS"] == "64"
    assert policy_env["MODALIGN_KAFKA_PRODUCE_TIMEOUT_S"] == "2.5"
    assert container_env(docs, service_container(specs["reward"]))["MODALIGN_LIMITS_MAX_BATCH_SIZE"] == "16"


@pytest.mark.parametrize("values_file", [example("strimzi"), example("cpu")], ids=values_id)
def test_strimzi_topics_have_the_settings_the_services_create_locally(values_file: Path) -> None:
    values = yaml.safe_load(values_file.read_text())["kafka"]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["kafka"]
    config = KafkaConfig(
        topic_prefix=values.get("topicPrefix", defaults["topicPrefix"]),
        partitions=values.get("partitions", defaults["partitions"]),
        replication_factor=values.get("replicationFactor", defaults["replicationFactor"]),
        min_insync_replicas=values.get("minInsyncReplicas", defaults["minInsyncReplicas"]),
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


def test_strimzi_clients_reach_the_tls_listener_and_trust_the_cluster_ca() -> None:
    docs = render(example("strimzi"))
    kafka = one(docs, "Kafka", f"{RELEASE}-kafka")
    assert kafka["spec"]["kafka"]["listeners"] == [{"name": "tls", "port": 9093, "type": "internal", "tls": True}]
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
    assert secrets == {"kafka-ca": "kafka-ca", "kafka-client": "kafka-client"}
    assert "password" not in render_text(example("external-kafka-tls")).split("kind: ConfigMap", 1)[1].split("---")[0]


@values_files
def test_gpu_services_get_gpus_on_gpu_nodes_and_the_cuda_image(values_file: Path | None) -> None:
    values = yaml.safe_load(values_file.read_text()) if values_file else {}
    for component, spec in pod_specs(render(values_file)).items():
        container = service_container(spec)
        gpus = (values.get(component, {}).get("gpu") or {"count": 0 if component == "feedback" else 1})["count"]
        requested = container["resources"].get("requests", {}).get("nvidia.com/gpu", 0)
        limited = container["resources"].get("limits", {}).get("nvidia.com/gpu", 0)
        assert requested == limited == gpus, component
        assert (":" in container["image"]) and container["image"].split(":")[0].endswith("-cuda") == (gpus > 0), container["image"]
        tolerates_gpu_taint = any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
        assert tolerates_gpu_taint == (gpus > 0), component


@values_files
def test_pods_run_as_non_root_with_a_read_only_root_filesystem(values_file: Path | None) -> None:
    for component, spec in pod_specs(render(values_file)).items():
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (component, container["name"])
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
        writable = {m["mountPath"] for m in service_container(spec)["volumeMounts"]}
        assert {"/tmp", "/home/modalign/.cache"} <= writable, component


@values_files
def test_grpc_services_are_probed_with_grpc_health_checks_on_their_port(values_file: Path | None) -> None:
    for component, spec in pod_specs(render(values_file)).items():
        container = service_container(spec)
        readiness = container["readinessProbe"]
        if component == "reward":
            assert readiness["httpGet"]["path"] == "/v2/health/ready"
            continue
        service = f"modalign.v1.{component.capitalize()}Service"
        ports = {p["containerPort"] for p in container["ports"]}
        assert readiness["grpc"]["service"] == service and readiness["grpc"]["port"] in ports
        if "startupProbe" in container:
            assert container["startupProbe"]["grpc"] == readiness["grpc"]
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


def test_kserve_example_serves_policy_and_reward_as_inference_services_with_canaries() -> None:
    docs = render(example("gpu-kserve"))
    assert {d["metadata"]["name"] for d in find(docs, "Deployment")} == {f"{RELEASE}-feedback"}
    for component, canary, port in (("policy", 10, {"name": "h2c", "containerPort": 50051, "protocol": "TCP"}),
                                    ("reward", 20, {"name": "http1", "containerPort": 8080, "protocol": "TCP"})):
        predictor = one(docs, "InferenceService", f"{RELEASE}-{component}")["spec"]["predictor"]
        assert predictor["canaryTrafficPercent"] == canary
        container = service_container(predictor)
        assert container["name"] == "kserve-container" and container["ports"] == [port]
        env = container_env(docs, container)
        assert env["STORAGE_URI"] == "s3://ml-models/modalign/current"
        assert env["MODALIGN_MODEL_DIR"] == "/mnt/models"
        assert one(docs, "PodMonitor", f"{RELEASE}-{component}")["spec"]["selector"]["matchLabels"] == {
            "serving.kserve.io/inferenceservice": f"{RELEASE}-{component}"}
    assert one(docs, "ServiceAccount", RELEASE)["secrets"] == [{"name": "modalign-s3"}]


def test_s3_model_store_is_copied_into_plain_deployments_by_the_storage_initializer(tmp_path: Path) -> None:
    values_file = tmp_path / "s3.yaml"
    values_file.write_text(yaml.safe_dump({"modelStore": {"type": "s3", "s3": {
        "bucket": "models", "prefix": "", "endpoint": "http://minio.storage:9000", "secretName": "s3-keys"}}}))
    docs = render(values_file)
    assert not find(docs, "PersistentVolumeClaim", f"{RELEASE}-models")
    spec = pod_specs(docs)["reward"]
    (initializer,) = spec["initContainers"]
    assert initializer["args"] == ["s3://models/current", "/models/current"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in initializer["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-keys", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert (env["S3_ENDPOINT"], env["S3_USE_HTTPS"]) == ("minio.storage:9000", "0")
    assert container_env(docs, service_container(spec))["MODALIGN_MODEL_DIR"] == "/models/current"


def test_dashboards_are_configmaps_for_the_grafana_sidecar() -> None:
    dashboards = {d["metadata"]["name"]: d for d in find(render(), "ConfigMap") if "dashboard" in d["metadata"]["name"]}
    assert set(dashboards) == {f"{RELEASE}-dashboard-serving", f"{RELEASE}-dashboard-feedback"}
    for configmap in dashboards.values():
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((filename, content),) = configmap["data"].items()
        assert filename.endswith(".json")
        assert yaml.safe_load(content)["uid"].startswith("modalign-")


def test_changing_a_setting_rolls_the_pods_that_read_it_and_no_others() -> None:
    def checksums(*extra: str) -> dict[str, str]:
        return {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
                for d in find(render(None, *extra), "Deployment")}

    before = checksums()
    feedback_setting = checksums("--set", "feedback.settings.max-workers=8")
    assert {name for name in before if before[name] != feedback_setting[name]} == {f"{RELEASE}-feedback"}
    kafka_setting = checksums("--set", "kafka.partitions=6")
    assert {name for name in before if before[name] != kafka_setting[name]} == {f"{RELEASE}-policy", f"{RELEASE}-feedback"}
