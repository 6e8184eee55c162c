"""The InferenceService patch the controller sends for each rollout state (pure logic: no cluster is
reachable from CI, so the Kubernetes API call itself is not exercised here)."""

from __future__ import annotations

from modalign.rollout.kserve import MODEL_DIR_ANNOTATION, VERSION_ANNOTATION, inference_service_patch
from modalign.v1 import events_pb2

PUBLISHED = {"v2": events_pb2.PolicyVersionPublished(version="v2", uri="file:///models/policy/v2")}


def patch_for(**fields) -> dict | None:
    return inference_service_patch(events_pb2.RolloutState(**fields), PUBLISHED)


def predictor(**fields) -> dict:
    return patch_for(**fields)["spec"]["predictor"]


def test_nothing_to_patch_before_the_first_rollout() -> None:
    assert patch_for(stable_version="v0") is None


def test_a_canary_step_names_the_version_and_sets_its_share() -> None:
    step = predictor(stable_version="v0", canary_version="v2", canary_weight_percent=25,
                     phase=events_pb2.ROLLOUT_PHASE_PROGRESSING)
    assert step == {"canaryTrafficPercent": 25, "annotations": {
        VERSION_ANNOTATION: "v2", MODEL_DIR_ANNOTATION: "file:///models/policy/v2"}}


def test_promotion_removes_the_split_and_rollback_sends_everything_to_the_previous_revision() -> None:
    promoted = predictor(stable_version="v2", canary_version="v2", phase=events_pb2.ROLLOUT_PHASE_PROMOTED)
    assert promoted["canaryTrafficPercent"] is None  # JSON null: merge patch deletes the field
    rolled_back = predictor(stable_version="v0", canary_version="v2", phase=events_pb2.ROLLOUT_PHASE_ROLLED_BACK)
    assert rolled_back["canaryTrafficPercent"] == 0
    assert rolled_back["annotations"][VERSION_ANNOTATION] == "v2"  # unchanged: no new revision


def test_pinning_the_initial_version_restores_its_model_folder() -> None:
    state = events_pb2.RolloutState(stable_version="v2", pinned_version="v0", phase=events_pb2.ROLLOUT_PHASE_PROMOTED)
    configured = inference_service_patch(state, PUBLISHED, initial_model_dir="/models/policy/v0")["spec"]["predictor"]
    assert configured == {"canaryTrafficPercent": None,
                          "annotations": {VERSION_ANNOTATION: "v0", MODEL_DIR_ANNOTATION: "/models/policy/v0"}}
    # Without a configured folder the annotation is deleted: the container's empty folder means the default policy.
    assert predictor(**{"stable_version": "v2", "pinned_version": "v0"})["annotations"][MODEL_DIR_ANNOTATION] is None
