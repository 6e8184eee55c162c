"""The evaluation gate: a candidate version is published only if its evaluation passes every check.

Rank 0's evaluation decides for all ranks: their prompt pools may differ in order, and a candidate
accepted on one rank but reverted on another would split the models. A passed candidate becomes the
baseline of the next evaluation; a refused one is reverted, training going on from the last
published policy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from prometheus_client import Counter

from modalign.trainer import distributed
from modalign.trainer.batches import Prompt
from modalign.trainer.join import PreferencePair
from modalign.trainer.learner import Learner

log = logging.getLogger(__name__)

VERSIONS = Counter("modalign_trainer_versions_total", "Policy versions by gate outcome (published, rejected).", ["outcome"])
GATE_REJECTIONS = Counter("modalign_trainer_gate_rejections_total", "Versions the evaluation gate refused, by check.", ["check"])


@dataclass(frozen=True)
class GateConfig:
    """Thresholds a version must meet to be published."""

    min_heldout_accuracy: float = 0.5
    """Held-out preference accuracy of the reward model at least this (0.5 is chance)."""
    max_kl: float = 5.0
    """KL to the reference policy at most this many nats per response."""
    min_reward_gain: float = -0.05
    """Mean reward of the candidate's held-out samples minus the current version's, at least this."""
    reward_gain_z: float = 0.0
    """Refuse for reward only when the gain is below min_reward_gain by more than this many standard errors
    (1.64: one-sided 95%). The gain is measured on a few prompts (--learner.eval-prompts), one sample each,
    and refusing on its noise throws good candidates away: the demo's DPO runs use 1.64. 0 holds the gain
    itself to min_reward_gain, which keeps an algorithm that optimises the reward model from accepting a
    step that lowered it."""
    max_mean_length_ratio: float = 3.0
    """The candidate's mean response length at most this multiple of the current version's."""
    min_edit_bleu_gain: float = -math.inf
    """BLEU of the candidate's answers to held-out edited prompts, against the edits, minus the serving
    version's, at least this (0: not worse than the serving version); -inf turns it off. Noisy with few
    edits: evaluation metric edit_references says how many."""
    min_edit_rouge_l_gain: float = -math.inf
    """The same for ROUGE-L (0-1)."""
    hacking_z: float = 2.0
    """Reward-hacking check: refuse a candidate whose reward gain is positive while users' held-out
    preferences moved against it (preference_shift) by more than this many standard errors; 0 turns it off."""


def gate_failures(evaluation: dict[str, float], gate: GateConfig) -> dict[str, str]:
    """The evaluation gate: each failed check by name, with why. Empty means publish."""
    failures = {}
    non_finite = [name for name, value in evaluation.items() if not math.isfinite(value)]
    if non_finite:
        failures["finite"] = f"non-finite metrics {non_finite}"
    if evaluation.get("rm_heldout_accuracy", 1.0) < gate.min_heldout_accuracy:
        failures["heldout_accuracy"] = f"rm_heldout_accuracy {evaluation['rm_heldout_accuracy']:.3f} < {gate.min_heldout_accuracy}"
    if evaluation.get("kl_to_reference", 0.0) > gate.max_kl:
        failures["kl"] = f"kl_to_reference {evaluation['kl_to_reference']:.3f} > {gate.max_kl}"
    gain, gain_stderr = evaluation.get("reward_gain", 0.0), evaluation.get("reward_gain_stderr", 0.0)
    if gain + gate.reward_gain_z * gain_stderr < gate.min_reward_gain:
        failures["reward"] = f"reward_gain {gain:.3f} +- {gain_stderr:.3f} < {gate.min_reward_gain}"
    if evaluation.get("length_ratio", 1.0) > gate.max_mean_length_ratio:
        failures["length"] = f"length_ratio {evaluation['length_ratio']:.2f} > {gate.max_mean_length_ratio}"
    for metric, floor in (("edit_bleu", gate.min_edit_bleu_gain), ("edit_rouge_l", gate.min_edit_rouge_l_gain)):
        if evaluation.get(f"{metric}_gain", 0.0) < floor:
            failures[metric] = f"{metric}_gain {evaluation[f'{metric}_gain']:.3f} < {floor}: worse against users' edits"
    shift = evaluation.get("preference_shift", 0.0)
    stderr = evaluation.get("preference_shift_stderr", math.inf)
    if gate.hacking_z > 0 and gain > 0 and shift + gate.hacking_z * stderr < 0:
        failures["reward_hacking"] = (
            f"reward_gain {gain:.3f} > 0 while users' held-out preferences moved against the candidate:"
            f" preference_shift {shift:.3f} +- {stderr:.3f} nats")
    return failures


def gate_candidate(
    learner: Learner, gate: GateConfig, heldout: list[PreferencePair], prompts: list[Prompt]
) -> tuple[dict[str, float], bool]:
    """Evaluates the current policy (rank 0's evaluation for all ranks), accepts or reverts it, and
    returns (the evaluation, whether it passed)."""
    evaluation = distributed.all_gather(learner.evaluate(heldout, prompts))[0]
    failed = gate_failures(evaluation, gate)
    if failed:
        for check in failed:
            GATE_REJECTIONS.labels(check).inc()
        VERSIONS.labels("rejected").inc()
        log.warning("candidate rejected by the gate: %s", "; ".join(failed.values()))
        learner.models.revert_policy()
        return evaluation, False
    learner.models.accept_candidate()
    return evaluation, True
