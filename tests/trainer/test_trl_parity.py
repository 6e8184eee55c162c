"""modalign's RLHF math against TRL's on identical inputs.

Where the installed TRL (1.16, pinned by uv.lock) has a computation as something callable, the test calls it:
plain functions (selective_log_softmax, entropy_from_logits, nanstd, first_true_indices, truncate_right), and the
loss methods of RewardTrainer, DPOTrainer and GRPOTrainer run on a stand-in `self` whose model hands them
precomputed tensors. Where TRL computes something only inline, inside a method that also generates text (RLOO and
GRPO advantages), the test restates those lines next to a citation of the file, function and line numbers.
PPO is not in trl 1.16 at all: its references restate trl 0.29.1's trl/experimental/ppo/ppo_trainer.py (the last
release that ships PPOTrainer), cited the same way.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.reward_trainer import RewardTrainer
from trl.trainer.utils import entropy_from_logits, nanstd, selective_log_softmax

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    from trl.experimental.utils import first_true_indices, truncate_right

from modalign.trainer.advantages import (
    ADVANTAGE_ESTIMATORS,
    gae_advantages_and_returns,
    grpo_advantages,
    rloo_advantages,
)
from modalign.trainer.kl import kl_k1, kl_k3
from modalign.trainer.logprobs import sequence_logprobs, token_entropy, token_logprobs
from modalign.trainer.losses import (
    a2c_policy_loss,
    bradley_terry_loss,
    chosen_nll,
    dpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    preference_accuracy,
)
from modalign.trainer.masked import masked_mean, masked_whiten
from modalign.trainer.rewards import kl_penalized_token_rewards, penalize_missing_eos

PAD, EOS, VOCAB = 0, 2, 17


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def right_padded_mask(lengths: list[int], length: int) -> torch.Tensor:
    return torch.arange(length).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


# --- a stand-in for a TRL trainer's `self` -------------------------------------------------------------------
# TRL's loss methods read their hyper-parameters from `self` and log through `self.accelerator` and
# `self._metrics`. In one process gather/reduce are the identity, and `model.training = False` selects TRL's
# "eval" branch, which neither counts tokens nor divides the loss by gradient-accumulation steps.


def identity(tensor: torch.Tensor, **_) -> torch.Tensor:
    return tensor


def trl_trainer_stub(**hyperparameters) -> SimpleNamespace:
    return SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather=identity, gather_for_metrics=identity, reduce=identity
        ),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        aux_loss_enabled=False,
        **hyperparameters,
    )


# --- Bradley-Terry reward-model loss: RewardTrainer.compute_loss --------------------------------------------


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_loss_and_accuracy_match_trl_reward_trainer(with_margin: bool) -> None:
    chosen, rejected = torch.randn(2, 16, generator=generator(1))
    rejected[0] = chosen[0]  # a tie, which both must count as a wrong ranking
    margin = torch.rand(16, generator=generator(2)) if with_margin else None

    trainer = trl_trainer_stub(args=SimpleNamespace(center_rewards_coefficient=None))
    outputs = SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))
    inputs = {"attention_mask": torch.ones(32, 5, dtype=torch.long)}
    if with_margin:
        inputs["margin"] = margin
    trl_loss = RewardTrainer.compute_loss(trainer, lambda **_: outputs, inputs)

    assert_close(bradley_terry_loss(chosen, rejected, margin), trl_loss)
    assert preference_accuracy(chosen, rejected).item() == pytest.approx(trainer._metrics["eval"]["accuracy"][0])


# --- DPO: DPOTrainer._compute_loss with precomputed reference log-probs ---------------------------------------


def test_dpo_loss_and_implicit_rewards_match_trl_dpo_trainer() -> None:
    pairs, length, beta = 4, 9, 0.1
    gen = generator(3)
    # Rows [0, pairs) are the chosen responses and [pairs, 2 * pairs) the rejected ones, TRL's batch layout.
    token_ids = torch.randint(3, VOCAB, (2 * pairs, length), generator=gen)
    policy_logits = torch.randn(2 * pairs, length, VOCAB, generator=gen)
    ref_logits = torch.randn(2 * pairs, length, VOCAB, generator=gen)
    # Column 0 is the prompt; completions of different lengths are right-padded.
    completion_mask = right_padded_mask([9, 5, 7, 2, 8, 9, 3, 6], length).long()
    completion_mask[:, 0] = 0
    # Log-prob of token t comes from the logits at t - 1.
    targets, target_mask = token_ids[:, 1:], completion_mask[:, 1:]

    def trl_sequence_logps(logits: torch.Tensor) -> torch.Tensor:
        return (selective_log_softmax(logits[:, :-1], targets) * target_mask).sum(dim=1)

    # TRL's fused LM head returns log-probs that are 0 where labels are -100 (outside the completion).
    trl_token_logps = selective_log_softmax(policy_logits[:, :-1], targets) * target_mask
    ref_logps = trl_sequence_logps(ref_logits)
    trl_losses = []
    trainer = trl_trainer_stub(
        beta=beta,
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        label_smoothing=0.0,
        f_divergence_type="reverse_kl",
        ld_alpha=None,
        precompute_ref_logps=True,
        use_weighting=False,
        args=SimpleNamespace(),
    )
    for pair in range(pairs):  # one pair per call, so TRL's batch mean is that pair's loss
        rows = [pair, pairs + pair]
        outputs = SimpleNamespace(
            log_probs=trl_token_logps[rows],
            entropy=torch.zeros(2, length - 1),
            mean_logits=torch.zeros(2, length - 1),
            is_top1=torch.zeros(2, length - 1, dtype=torch.bool),
        )
        inputs = {
            "input_ids": token_ids[rows],
            "attention_mask": torch.ones(2, length, dtype=torch.long),
            "completion_mask": completion_mask[rows],
            "ref_chosen_logps": ref_logps[pair : pair + 1],
            "ref_rejected_logps": ref_logps[pairs + pair : pairs + pair + 1],
        }
        # The lambda is called inside _compute_loss, within this iteration.
        trl_losses.append(DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, return_outputs=False))  # noqa: B023

    policy_logps = sequence_logprobs(policy_logits[:, :-1], targets, target_mask)
    assert_close(policy_logps, trl_sequence_logps(policy_logits))
    assert_close(sequence_logprobs(ref_logits[:, :-1], targets, target_mask), ref_logps)
    ours = dpo_loss(policy_logps[:pairs], policy_logps[pairs:], ref_logps[:pairs], ref_logps[pairs:], beta)
    assert_close(ours.losses, torch.stack(trl_losses))
    metrics = trainer._metrics["eval"]
    assert_close(ours.chosen_rewards, torch.tensor(metrics["rewards/chosen"]))
    assert_close(ours.rejected_rewards, torch.tensor(metrics["rewards/rejected"]))


# --- log-probs and entropy: TRL's utility functions -----------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_trl_selective_log_softmax(temperature: float) -> None:
    gen = generator(4)
    logits = torch.randn(3, 8, VOCAB, generator=gen)
    token_ids = torch.randint(0, VOCAB, (3, 8), generator=gen)
    assert_close(
        token_logprobs(logits, token_ids, temperature), selective_log_softmax(logits, token_ids, temperature)
    )


def test_token_entropy_matches_trl_entropy_from_logits_and_trl_ppo() -> None:
    logits = torch.randn(3, 8, VOCAB, generator=generator(5)) * 3
    # trl 0.29.1 ppo_trainer.py, PPOTrainer.train, lines 851-852: logsumexp(z) - sum(softmax(z) * z).
    ppo_entropy = torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    assert_close(token_entropy(logits), entropy_from_logits(logits))
    assert_close(token_entropy(logits), ppo_entropy)


# --- PPO references restated from trl 0.29.1, trl/experimental/ppo/ppo_trainer.py -----------------------------

INVALID_LOGPROB = 1.0  # line 81: the log-prob PPOTrainer writes on padding, so policy and reference agree there


def trl_ppo_masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """masked_mean, lines 246-251 (axis=None)."""
    return (values * mask).sum() / mask.sum()


def trl_ppo_masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """masked_var, lines 254-270 (unbiased=True)."""
    mean = trl_ppo_masked_mean(values, mask)
    variance = trl_ppo_masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    return variance * (mask_sum / (mask_sum - 1))


def trl_ppo_masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """masked_whiten, lines 273-279 (shift_mean=True, as PPOTrainer whitens advantages)."""
    mean, variance = trl_ppo_masked_mean(values, mask), trl_ppo_masked_var(values, mask)
    return (values - mean) * torch.rsqrt(variance + 1e-8)


def trl_ppo_rollout(
    postprocessed_responses: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    *,
    kl_estimator: str,
    kl_coef: float,
    missing_eos_penalty: float,
    gamma: float,
    lam: float,
) -> dict[str, torch.Tensor]:
    """PPOTrainer.train between the rollout and the optimisation epochs, lines 723 and 752-795:
    missing-EOS penalty, padding masks, KL-penalised rewards, GAE, advantage whitening. Lines 778-780 (reward
    whitening, off by TRL's default whiten_rewards=False) are left out: modalign does not whiten rewards.
    """
    # line 723 (TRL's first_true_indices is called for real): index of each response's last real token.
    sequence_lengths = first_true_indices(postprocessed_responses == PAD) - 1
    # lines 753-755
    contain_eos_token = torch.any(postprocessed_responses == EOS, dim=-1)
    scores = scores.clone()
    scores[~contain_eos_token] -= missing_eos_penalty
    # lines 759-765; padding_mask_p1 keeps one position past the last token, where the score is placed.
    response_idxs = torch.arange(postprocessed_responses.shape[1]).repeat(postprocessed_responses.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > sequence_lengths_p1.unsqueeze(1)
    values = torch.masked_fill(values, padding_mask_p1, 0)
    # lines 769-775
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    rewards = -kl_coef * kl
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores
    # lines 783-795
    lastgaelam = 0
    advantages_reversed = []
    gen_length = postprocessed_responses.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    whitened_advantages = torch.masked_fill(trl_ppo_masked_whiten(advantages, ~padding_mask), padding_mask, 0)
    return {
        "logprobs": logprobs,
        "ref_logprobs": ref_logprobs,
        "values": values,
        "padding_mask": padding_mask,
        "padding_mask_p1": padding_mask_p1,
        "has_eos": contain_eos_token,
        "rewards": rewards,
        "advantages": advantages,
        "returns": returns,
        "whitened_advantages": whitened_advantages,
    }


def sample_rollout(seed: int) -> dict[str, torch.Tensor]:
    """Eight responses of length 12: EOS early, at the last and next-to-last slots, first, and never."""
    batch, length = 8, 12
    gen = generator(seed)
    responses = torch.randint(3, VOCAB, (batch, length), generator=gen)
    for row, eos_at in enumerate([3, length - 1, None, 0, length - 2, 6, None, 1]):
        if eos_at is not None:
            responses[row, eos_at] = EOS
    logprobs = -3 * torch.rand(batch, length, generator=gen)
    return {
        # TRL's truncate_right pads everything after the first EOS, as PPOTrainer's truncate_response does.
        "postprocessed_responses": truncate_right(responses, [EOS], PAD)[0],
        "logprobs": logprobs,
        "ref_logprobs": logprobs + 0.5 * torch.randn(batch, length, generator=gen),
        "values": torch.randn(batch, length, generator=gen),
        "scores": torch.randn(batch, generator=gen),
    }


@pytest.mark.parametrize(("kl_estimator", "gamma", "lam"), [("k1", 1.0, 0.95), ("k3", 1.0, 0.95), ("k1", 0.9, 0.8)])
def test_ppo_rewards_gae_and_whitening_match_trl_ppo(kl_estimator: str, gamma: float, lam: float) -> None:
    kl_coef, missing_eos_penalty = 0.05, 1.5
    rollout = sample_rollout(seed=6)
    trl = trl_ppo_rollout(
        **rollout,
        kl_estimator=kl_estimator,
        kl_coef=kl_coef,
        missing_eos_penalty=missing_eos_penalty,
        gamma=gamma,
        lam=lam,
    )
    # TRL's response runs one position past the last token (padding_mask_p1) and puts the score at its end, so its
    # mask is ~padding_mask_p1 in our terms. The log-probs and values are TRL's, padding fill included.
    response_mask = ~trl["padding_mask_p1"]
    scores = penalize_missing_eos(rollout["scores"], trl["has_eos"], missing_eos_penalty)
    kl = {"k1": kl_k1, "k3": kl_k3}[kl_estimator](trl["logprobs"], trl["ref_logprobs"])
    rewards = kl_penalized_token_rewards(scores, kl, response_mask, kl_coef)
    advantages, returns = gae_advantages_and_returns(rewards, response_mask, trl["values"], gamma, lam)
    padding = trl["padding_mask"]
    whitened_advantages = masked_whiten(advantages, ~padding).masked_fill(padding, 0)

    assert_close(rewards, trl["rewards"])
    assert_close(advantages, trl["advantages"])
    assert_close(returns, trl["returns"])
    assert_close(whitened_advantages, trl["whitened_advantages"])


def test_masked_whiten_matches_trl_ppo() -> None:
    gen = generator(7)
    values = 3 + 2 * torch.randn(5, 11, generator=gen)
    mask = right_padded_mask([11, 4, 7, 1, 9], 11)
    assert_close(masked_whiten(values, mask), trl_ppo_masked_whiten(values, mask))
    assert_close(masked_mean(values, mask), trl_ppo_masked_mean(values, mask))


def ppo_minibatch(seed: int) -> dict[str, torch.Tensor]:
    """Log-probs of the current and the rollout policy, with padding filled as PPOTrainer fills it."""
    batch, length = 6, 10
    gen = generator(seed)
    padding_mask = ~right_padded_mask([10, 3, 7, 1, 9, 5], length)
    logits = torch.randn(batch, length, VOCAB, generator=gen)
    tokens = torch.randint(0, VOCAB, (batch, length), generator=gen)
    new_logprobs = token_logprobs(logits, tokens)
    # A spread of 0.3 in log-ratio puts many tokens outside the 1 +/- 0.2 clip range.
    old_logprobs = new_logprobs + 0.3 * torch.randn(batch, length, generator=gen)
    return {
        "logits": logits,
        "tokens": tokens,
        "padding_mask": padding_mask,
        "new_logprobs": new_logprobs.masked_fill(padding_mask, INVALID_LOGPROB),
        "old_logprobs": old_logprobs.masked_fill(padding_mask, INVALID_LOGPROB),
        "advantages": torch.randn(batch, length, generator=gen).masked_fill(padding_mask, 0),
    }


def test_ppo_policy_loss_matches_trl_ppo() -> None:
    cliprange = 0.2
    batch = ppo_minibatch(seed=8)
    valid = ~batch["padding_mask"]
    # trl 0.29.1 ppo_trainer.py, PPOTrainer.train, lines 837-842 (loss), 848-850 (clip fraction), 853 (approx KL).
    log_ratio = batch["new_logprobs"] - batch["old_logprobs"]
    ratio = torch.exp(log_ratio)
    pg_losses = -batch["advantages"] * ratio
    pg_losses2 = -batch["advantages"] * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    trl_loss = trl_ppo_masked_mean(torch.max(pg_losses, pg_losses2), valid)
    trl_clipfrac = trl_ppo_masked_mean((pg_losses2 > pg_losses).float(), valid)
    trl_approxkl = 0.5 * (log_ratio**2).mean()

    ours = ppo_policy_loss(batch["new_logprobs"], batch["old_logprobs"], batch["advantages"], valid, cliprange)
    assert_close(ours.loss, trl_loss)
    assert_close(ours.clip_fraction, trl_clipfrac)
    assert 0 < ours.clip_fraction < 1
    # TRL averages the approximate KL over padding too (where its log-ratio is 0); ours over valid tokens only.
    assert_close(ours.approx_kl * valid.float().mean(), trl_approxkl)


def trl_grpo_compute_loss(
    batch: dict[str, torch.Tensor], mask: torch.Tensor, cliprange: float, beta: float, ref_logprobs: torch.Tensor
) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """GRPOTrainer._compute_loss with loss_type="bnpo" and per-token advantages: PPO's clipped surrogate,
    averaged over all valid tokens of the batch, plus beta * k3 when beta != 0."""
    entropies = entropy_from_logits(batch["logits"])
    trainer = trl_trainer_stub(
        _get_per_token_logps_and_entropies=lambda *_, **__: (batch["new_logprobs"], entropies, None),
        loss_type="bnpo",
        epsilon_low=cliprange,
        epsilon_high=cliprange,
        beta=beta,
        importance_sampling_level="token",
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False),
    )
    inputs = {
        "prompt_ids": torch.zeros(mask.size(0), 1, dtype=torch.long),
        "prompt_mask": torch.ones(mask.size(0), 1, dtype=torch.long),
        "completion_ids": batch["tokens"],
        "completion_mask": mask.long(),
        "advantages": batch["advantages"],
        "old_per_token_logps": batch["old_logprobs"],
        "ref_per_token_logps": ref_logprobs,
    }
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["eval"]


def test_ppo_policy_loss_clip_fraction_and_entropy_match_trl_grpo_trainer() -> None:
    cliprange = 0.2
    batch = ppo_minibatch(seed=9)
    valid = ~batch["padding_mask"]
    trl_loss, metrics = trl_grpo_compute_loss(batch, valid, cliprange, beta=0.0, ref_logprobs=batch["old_logprobs"])

    ours = ppo_policy_loss(batch["new_logprobs"], batch["old_logprobs"], batch["advantages"], valid, cliprange)
    assert_close(ours.loss, trl_loss)
    assert ours.clip_fraction.item() == pytest.approx(metrics["clip_ratio/region_mean"][0])
    assert masked_mean(token_entropy(batch["logits"]), valid).item() == pytest.approx(metrics["entropy"][0])


def test_a2c_policy_gradient_equals_the_trl_ppo_and_grpo_gradients_on_policy() -> None:
    """On-policy (old log-probs = the current ones, detached) TRL's ratio is exp(0) = 1 and its clip inactive, so
    the gradient of its clipped surrogate is the plain policy gradient -A * grad log pi that A2C takes."""
    cliprange = 0.2
    batch = ppo_minibatch(seed=16)
    padding = batch["padding_mask"]
    valid = ~padding
    logits = batch["logits"].clone().requires_grad_()
    # The log-probs as PPOTrainer fills them: the constant INVALID_LOGPROB on padding, which carries no gradient.
    new_logprobs = token_logprobs(logits, batch["tokens"]).masked_fill(padding, INVALID_LOGPROB)
    on_policy = batch | {"logits": logits, "new_logprobs": new_logprobs, "old_logprobs": new_logprobs.detach()}

    # trl 0.29.1 ppo_trainer.py, PPOTrainer.train, lines 837-842.
    ratio = torch.exp(on_policy["new_logprobs"] - on_policy["old_logprobs"])
    pg_losses = -batch["advantages"] * ratio
    pg_losses2 = -batch["advantages"] * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    trl_ppo_loss = trl_ppo_masked_mean(torch.max(pg_losses, pg_losses2), valid)
    # The three losses share the graph from logits to log-probs: keep it until the last gradient.
    (trl_ppo_gradient,) = torch.autograd.grad(trl_ppo_loss, logits, retain_graph=True)
    # GRPOTrainer._compute_loss, called for real: the same clipped surrogate over all valid tokens (loss_type="bnpo").
    trl_grpo_loss, metrics = trl_grpo_compute_loss(on_policy, valid, cliprange, beta=0.0, ref_logprobs=new_logprobs)
    (trl_grpo_gradient,) = torch.autograd.grad(trl_grpo_loss, logits, retain_graph=True)
    (a2c_gradient,) = torch.autograd.grad(a2c_policy_loss(new_logprobs, batch["advantages"], valid), logits)

    assert metrics["clip_ratio/region_mean"][0] == 0  # the clip is inactive: the premise of the comparison
    assert a2c_gradient.abs().sum() > 0 and (a2c_gradient[padding] == 0).all()
    assert_close(a2c_gradient, trl_ppo_gradient)
    assert_close(a2c_gradient, trl_grpo_gradient)


def test_ppo_value_loss_matches_trl_ppo() -> None:
    cliprange_value, vf_coef = 0.2, 0.1
    gen = generator(10)
    padding_mask_p1 = ~right_padded_mask([10, 4, 8, 2, 10, 6], 10)
    old_values = torch.randn(6, 10, generator=gen).masked_fill(padding_mask_p1, 0)
    vpred = (old_values + 0.4 * torch.randn(6, 10, generator=gen)).masked_fill(padding_mask_p1, 0)
    returns = old_values + torch.randn(6, 10, generator=gen)
    # trl 0.29.1 ppo_trainer.py, PPOTrainer.train, lines 825-836.
    vpredclipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    trl_vf_loss = 0.5 * trl_ppo_masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1)
    trl_vf_clipfrac = trl_ppo_masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)

    ours = ppo_value_loss(vpred, old_values, returns, ~padding_mask_p1, cliprange_value, vf_coef)
    assert_close(ours.loss, vf_coef * trl_vf_loss)  # PPOTrainer adds vf_coef * vf_loss to the policy loss (line 843)
    assert_close(ours.clip_fraction, trl_vf_clipfrac)
    assert 0 < ours.clip_fraction < 1


# --- KL estimators --------------------------------------------------------------------------------------------


def test_kl_estimators_match_trl() -> None:
    batch = ppo_minibatch(seed=11)
    valid = ~batch["padding_mask"]
    gen = generator(12)
    logprobs = batch["new_logprobs"]
    ref_logprobs = (logprobs + 0.5 * torch.randn(logprobs.shape, generator=gen)).masked_fill(~valid, INVALID_LOGPROB)
    # trl 0.29.1 ppo_trainer.py, PPOTrainer.train, lines 769-770: logr = ref - logp; k1 = -logr; k3 = (e^logr - 1) - logr.
    logr = ref_logprobs - logprobs
    assert_close(kl_k1(logprobs, ref_logprobs), -logr)
    assert_close(kl_k3(logprobs, ref_logprobs), (logr.exp() - 1) - logr)
    # trl 1.16 rloo_trainer.py, RLOOTrainer._generate_and_score_completions, line 1669: per-token KL is k1.
    assert_close(kl_k1(logprobs, ref_logprobs), logprobs - ref_logprobs)
    # GRPOTrainer._compute_loss (real call) adds beta * k3 per token and logs its masked mean as "kl".
    beta = 0.04
    loss_with_kl, metrics = trl_grpo_compute_loss(batch, valid, 0.2, beta, ref_logprobs)
    loss_without_kl, _ = trl_grpo_compute_loss(batch, valid, 0.2, 0.0, ref_logprobs)
    k3_mean = masked_mean(kl_k3(logprobs, ref_logprobs), valid)
    assert k3_mean.item() == pytest.approx(metrics["kl"][0])
    assert_close(loss_with_kl - loss_without_kl, beta * k3_mean)


# --- RLOO and GRPO advantages ---------------------------------------------------------------------------------


def trl_rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """trl 1.16 rloo_trainer.py, RLOOTrainer._generate_and_score_completions, lines 1675-1692 and 1699
    (normalize_advantages=False): leave-one-out baseline over each prompt's num_generations completions."""
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (scorable_counts - 1)).view(-1)
    return torch.nan_to_num(rewards - baselines, nan=0.0)


def trl_grpo_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """trl 1.16 grpo_trainer.py, GRPOTrainer._generate_and_score_completions, lines 2765-2787, with TRL's own
    nanstd: (reward - group mean), divided by (std + 1e-4) of the group or the batch, or not divided ("none")."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards == "group":
        return advantages / (nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations) + 1e-4)
    if scale_rewards == "batch":
        return advantages / (nanstd(rewards).expand_as(rewards) + 1e-4)
    return advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_rloo_and_grpo_advantages_match_trl(scale: str) -> None:
    prompts, k = 5, 4
    scores = torch.randn(prompts * k, generator=generator(13))
    scores[8:12] = 0.5  # a group whose completions all scored the same
    assert_close(rloo_advantages(scores.view(prompts, k)).view(-1), trl_rloo_advantages(scores, k))
    assert_close(grpo_advantages(scores.view(prompts, k), scale=scale).view(-1), trl_grpo_advantages(scores, k, scale))


def test_rloo_estimator_with_kl_in_the_reward_matches_trl_rloo() -> None:
    prompts, k, length, beta = 3, 4, 7, 0.05
    gen = generator(14)
    mask = right_padded_mask(torch.randint(1, length + 1, (prompts * k,), generator=gen).tolist(), length)
    old_logprobs = -2 * torch.rand(prompts * k, length, generator=gen)
    ref_logprobs = old_logprobs + 0.3 * torch.randn(prompts * k, length, generator=gen)
    scores = torch.randn(prompts * k, generator=gen)
    # trl 1.16 rloo_trainer.py, lines 1669-1673: the sequence reward is score - beta * sum of per-token k1.
    trl_rewards = scores - beta * ((old_logprobs - ref_logprobs) * mask).sum(-1)
    trl_advantages = trl_rloo_advantages(trl_rewards, k)

    token_rewards = kl_penalized_token_rewards(scores, kl_k1(old_logprobs, ref_logprobs), mask, kl_coef=beta)
    advantages, _ = ADVANTAGE_ESTIMATORS["rloo"](token_rewards, mask, samples_per_prompt=k)
    assert_close(advantages, (trl_advantages.unsqueeze(1) * mask))


def test_grpo_estimator_matches_trl_grpo() -> None:
    prompts, k, length = 3, 4, 5
    gen = generator(15)
    mask = right_padded_mask(torch.randint(1, length + 1, (prompts * k,), generator=gen).tolist(), length)
    scores = torch.randn(prompts * k, generator=gen)
    token_rewards = kl_penalized_token_rewards(scores, torch.zeros(prompts * k, length), mask, kl_coef=0.0)
    advantages, _ = ADVANTAGE_ESTIMATORS["grpo"](token_rewards, mask, samples_per_prompt=k)
    assert_close(advantages, trl_grpo_advantages(scores, k).unsqueeze(1) * mask)


def test_dpo_with_an_sft_term_matches_trl_dpo_trainer_sigmoid_plus_sft() -> None:
    """RPO: TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, alpha] on one batch of pairs."""
    pairs, length, beta, alpha = 4, 9, 0.1, 0.7
    gen = generator(11)
    token_ids = torch.randint(3, VOCAB, (2 * pairs, length), generator=gen)
    policy_logits = torch.randn(2 * pairs, length, VOCAB, generator=gen)
    completion_mask = right_padded_mask([9, 5, 7, 2, 8, 9, 3, 6], length).long()
    completion_mask[:, 0] = 0
    targets, target_mask = token_ids[:, 1:], completion_mask[:, 1:]
    token_logps = selective_log_softmax(policy_logits[:, :-1], targets) * target_mask
    ref_logps = (selective_log_softmax(torch.randn(2 * pairs, length - 1, VOCAB, generator=gen), targets)
                 * target_mask).sum(dim=1)
    trainer = trl_trainer_stub(
        beta=beta, loss_types=["sigmoid", "sft"], loss_weights=[1.0, alpha], label_smoothing=0.0,
        f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=True, use_weighting=False,
        args=SimpleNamespace(),
    )
    outputs = SimpleNamespace(log_probs=token_logps, entropy=torch.zeros(2 * pairs, length - 1),
                              mean_logits=torch.zeros(2 * pairs, length - 1),
                              is_top1=torch.zeros(2 * pairs, length - 1, dtype=torch.bool))
    inputs = {"input_ids": token_ids, "attention_mask": torch.ones(2 * pairs, length, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_logps[:pairs],
              "ref_rejected_logps": ref_logps[pairs:]}
    trl_loss = DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, return_outputs=False)

    logps = sequence_logprobs(policy_logits[:, :-1], targets, target_mask)
    ours = dpo_loss(logps[:pairs], logps[pairs:], ref_logps[:pairs], ref_logps[pairs:], beta).losses.mean()
    ours = ours + alpha * chosen_nll(logps[:pairs], target_mask[:pairs].sum(-1))
    assert_close(ours, trl_loss)
