"""Driving a KServe InferenceService instead of the policy replicas' own routing.

When the policy runs as a KServe InferenceService (helm: policy.kserve.enabled), KServe's router splits
traffic between the latest revision and the previous rolled-out one by spec.predictor.canaryTrafficPercent,
and each revision serves a single version (its pods run with --follow none). The controller then writes
each RolloutState into the InferenceService as well: the canary's version (and model folder) as predictor
annotations, which the chart passes to the container through the downward API, so a new version makes a
new revision; and the canary's weight as canaryTrafficPercent. Promotion removes canaryTrafficPercent (the
latest revision takes all traffic); a rollback sets it to 0 (the previous revision takes all).

Use it when a cluster already runs policy serving on KServe (scale to zero, KServe's autoscaling and
revision history). Route by the rollout topic (the default) everywhere else: it needs no Kubernetes API
access, switches in well under a second, and keeps sessions sticky, which KServe's random split does not.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from modalign.core.versions import ACTIVE_PHASES
from modalign.v1 import events_pb2

log = logging.getLogger(__name__)

VERSION_ANNOTATION = "modalign.dev/policy-version"
MODEL_DIR_ANNOTATION = "modalign.dev/policy-model-dir"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class KServeConfig:
    """The KServe InferenceService the controller drives, if any."""

    inference_service: str = ""
    """Name of the policy's InferenceService; empty: replicas route by the rollout topic themselves."""
    namespace: str = ""
    """Its namespace; empty: the controller pod's own."""
    api_server: str = "https://kubernetes.default.svc"
    """URL of the Kubernetes API server."""
    token_file: Path = SERVICE_ACCOUNT / "token"
    """Bearer token the controller authenticates with (its service account's, mounted in the pod)."""
    ca_file: Path = SERVICE_ACCOUNT / "ca.crt"
    """CA certificate the API server's TLS certificate is checked against."""
    initial_model_dir: str = ""
    """The model folder of the initial version, as the policy is configured with it (empty: the built-in
    default policy); written back when that version is pinned."""


def inference_service_patch(
    state: events_pb2.RolloutState, published: dict[str, events_pb2.PolicyVersionPublished], initial_model_dir: str = ""
) -> dict | None:
    """The JSON merge patch (RFC 7386) that makes the InferenceService serve as `state` says; None when
    there is nothing to change (no rollout has happened yet)."""
    if state.pinned_version:
        version, percent = state.pinned_version, None
    elif state.phase in ACTIVE_PHASES:
        version, percent = state.canary_version, state.canary_weight_percent
    elif state.phase == events_pb2.ROLLOUT_PHASE_PROMOTED:
        version, percent = state.stable_version, None
    elif state.phase == events_pb2.ROLLOUT_PHASE_ROLLED_BACK:
        version, percent = state.canary_version, 0
    else:
        return None
    # A published version by its URI, which the policy fetches and verifies at start-up (file:// or s3://).
    model_dir = published[version].uri if version in published else initial_model_dir
    # None deletes the annotation: the container then gets an empty folder, the built-in default policy.
    annotations = {VERSION_ANNOTATION: version, MODEL_DIR_ANNOTATION: model_dir or None}
    return {"spec": {"predictor": {"canaryTrafficPercent": percent, "annotations": annotations}}}


class KServeDriver:
    """Patches one InferenceService through the Kubernetes API, with the pod's service account."""

    def __init__(self, config: KServeConfig) -> None:
        namespace = config.namespace or (SERVICE_ACCOUNT / "namespace").read_text().strip()
        self._url = (f"{config.api_server}/apis/serving.kserve.io/v1beta1/namespaces/{namespace}"
                     f"/inferenceservices/{config.inference_service}")
        self._token_file = config.token_file
        self._initial_model_dir = config.initial_model_dir
        self._ssl = ssl.create_default_context(cafile=str(config.ca_file))

    def apply(self, state: events_pb2.RolloutState, published: dict[str, events_pb2.PolicyVersionPublished]) -> None:
        patch = inference_service_patch(state, published, self._initial_model_dir)
        if patch is None:
            return
        request = urllib.request.Request(
            self._url, data=json.dumps(patch).encode(), method="PATCH",
            headers={
                "Content-Type": "application/merge-patch+json",
                # Re-read each time: projected service-account tokens rotate.
                "Authorization": f"Bearer {self._token_file.read_text().strip()}",
            },
        )
        with urllib.request.urlopen(request, context=self._ssl, timeout=10) as response:
            log.info("InferenceService patched (%d): %s", response.status, patch)
