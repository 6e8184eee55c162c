"""Properties of modalign's RLHF math that hold whatever TRL does: each would catch a plausible bug."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from modalign.trainer.advantages import (
    ADVANTAGE_ESTIMATORS,
    gae_advantages_and_returns,
    grpo_advantages,
    register_advantage_estimator,
    reward_to_go,
    rloo_advantages,
)
from modalign.trainer.evaluation import preference_shift
from modalign.trainer.gate import GateConfig, gate_failures
from modalign.trainer.kl import KLController, adaptive_kl_coef, kl_k1, kl_k3
from modalign.trainer.logprobs import sequence_logprobs, token_entropy, token_logprobs
from modalign.trainer.losses import (
    a2c_policy_loss,
    a2c_value_loss,
    bradley_terry_loss,
    dpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    preference_accuracy,
)
from modalign.trainer.masked import masked_mean, masked_var, masked_whiten
from modalign.trainer.rewards import kl_penalized_token_rewards, penalize_missing_eos


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def right_padded_mask(lengths: list[int], length: int) -> torch.Tensor:
    return torch.arange(length).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def test_bradley_terry_loss_falls_as_the_chosen_score_rises_and_a_margin_raises_it() -> None:
    rejected = torch.zeros(3)
    losses = [bradley_terry_loss(torch.full((3,), score), rejected).item() for score in (-1.0, 0.0, 1.0, 3.0)]
    assert losses == sorted(losses, reverse=True)
    assert losses[1] == pytest.approx(math.log(2))
    assert bradley_terry_loss(torch.ones(3), rejected, margin=0.5) > bradley_terry_loss(torch.ones(3), rejected)


def test_preference_accuracy_counts_ties_as_wrong() -> None:
    assert preference_accuracy(torch.tensor([1.0, 2.0, 0.0, 5.0]), torch.tensor([0.0, 2.0, 1.0, 4.0])) == 0.5


def test_dpo_at_the_reference_costs_log_2_and_pushes_chosen_up_and_rejected_down() -> None:
    chosen = torch.tensor([-5.0, -9.0], requires_grad=True)
    rejected = torch.tensor([-6.0, -4.0], requires_grad=True)
    result = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.1)
    assert_close(result.losses, torch.full((2,), math.log(2)))
    assert_close(result.chosen_rewards, torch.zeros(2))
    result.losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


@pytest.mark.parametrize("distance", [0.05, 0.8])
def test_kl_estimators_in_expectation_under_the_policy(distance: float) -> None:
    # Expectations are taken exactly, weighting every token of a small vocabulary by its policy probability.
    gen = generator(20)
    policy_logits = torch.randn(6, generator=gen, dtype=torch.float64)
    policy = torch.log_softmax(policy_logits, -1)
    ref = torch.log_softmax(policy_logits + distance * torch.randn(6, generator=gen, dtype=torch.float64), -1)
    weights = policy.exp()
    exact_kl = (weights * (policy - ref)).sum()
    estimates = {"k1": kl_k1(policy, ref), "k3": kl_k3(policy, ref)}
    expectation = {name: (weights * values).sum() for name, values in estimates.items()}
    assert_close(expectation["k1"], exact_kl)  # unbiased
    assert_close(expectation["k3"], exact_kl)  # unbiased
    assert (estimates["k3"] >= 0).all() and (estimates["k1"] < 0).any()
    k1_variance = (weights * (estimates["k1"] - exact_kl) ** 2).sum()
    k3_variance = (weights * (estimates["k3"] - exact_kl) ** 2).sum()
    assert k3_variance < k1_variance  # why k3 is preferred as a per-token penalty
    same = torch.tensor([-1.0, -2.0])
    assert (kl_k1(same, same) == 0).all() and (kl_k3(same, same) == 0).all()


def test_gae_with_lambda_and_gamma_one_is_reward_to_go_minus_value() -> None:
    gen = generator(21)
    mask = right_padded_mask([6, 2, 4], 6)
    rewards = torch.randn(3, 6, generator=gen).masked_fill(~mask, 0)
    values = torch.randn(3, 6, generator=gen)
    advantages, returns = gae_advantages_and_returns(rewards, mask, values, gamma=1.0, lam=1.0)
    rtg = reward_to_go(rewards, mask)
    assert_close(returns, rtg)
    assert_close(advantages, (rtg - values).masked_fill(~mask, 0))


def test_gae_with_lambda_zero_is_the_one_step_td_error() -> None:
    gen = generator(22)
    mask = right_padded_mask([5, 3], 5)
    rewards, values = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    gamma = 0.9
    next_is_valid = torch.cat([mask[:, 1:], torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    next_values = torch.cat([values[:, 1:], torch.zeros(2, 1)], dim=1).masked_fill(~next_is_valid, 0)
    advantages, _ = gae_advantages_and_returns(rewards, mask, values, gamma=gamma, lam=0.0)
    assert_close(advantages, (rewards + gamma * next_values - values).masked_fill(~mask, 0))


def test_gae_skips_masked_positions_inside_and_before_a_response() -> None:
    gen = generator(23)
    rewards, values = torch.randn(1, 5, generator=gen), torch.randn(1, 5, generator=gen)
    keep = [1, 2, 4]  # position 0 is left padding, position 3 a masked-out span (say, tool output)
    mask = torch.zeros(1, 5, dtype=torch.bool)
    mask[0, keep] = True
    advantages, returns = gae_advantages_and_returns(rewards, mask, values, gamma=0.9, lam=0.8)
    compact_advantages, compact_returns = gae_advantages_and_returns(
        rewards[:, keep], torch.ones(1, 3, dtype=torch.bool), values[:, keep], gamma=0.9, lam=0.8
    )
    assert_close(advantages[:, keep], compact_advantages)
    assert_close(returns[:, keep], compact_returns)
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()


def test_masked_statistics_ignore_whatever_the_padding_holds() -> None:
    gen = generator(24)
    mask = right_padded_mask([7, 3, 5], 7)
    values = torch.randn(3, 7, generator=gen)
    poisoned = values.masked_fill(~mask, float("nan"))
    whitened = masked_whiten(poisoned, mask)
    assert_close(whitened[mask], masked_whiten(values, mask)[mask])
    assert masked_mean(whitened, mask).abs() < 1e-6
    assert_close(masked_var(whitened, mask), torch.tensor(1.0))
    assert masked_mean(values, torch.zeros_like(mask)) == 0  # an all-padding batch is not NaN
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(values, right_padded_mask([1, 0, 0], 7))


def test_ppo_policy_loss_on_policy_is_minus_the_mean_advantage_and_clipped_tokens_get_no_gradient() -> None:
    mask = right_padded_mask([4, 2], 4)
    advantages = torch.tensor([[1.0, -2.0, 3.0, 0.5], [2.0, 1.0, 9.0, 9.0]])
    old = torch.full((2, 4), -1.0)
    on_policy = ppo_policy_loss(old.clone(), old, advantages, mask)
    assert_close(on_policy.loss, -masked_mean(advantages, mask))
    assert on_policy.clip_fraction == 0 and on_policy.approx_kl == 0

    # Token 0 moved past the clip range in the direction its positive advantage favours: the clip stops its
    # gradient. Token 1 moved as far in the direction its negative advantage disfavours: the pessimistic max keeps
    # that gradient so the mistake is undone. Token 2 moved a little and still learns.
    logprobs = torch.tensor([[-0.5, -0.5, -0.95, -1.0], [-1.0, -1.0, -1.0, -1.0]], requires_grad=True)
    result = ppo_policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    result.loss.backward()
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 1] != 0 and logprobs.grad[0, 2] != 0
    assert (logprobs.grad[1, 2:] == 0).all()  # padding
    assert result.clip_fraction == pytest.approx(1 / 6)


def test_ppo_value_loss_gives_no_gradient_to_a_value_clipped_away_from_its_rollout_value() -> None:
    mask = torch.ones(1, 2, dtype=torch.bool)
    old_values = torch.zeros(1, 2)
    returns = torch.tensor([[1.0, 0.1]])
    values = torch.tensor([[1.0, 0.15]], requires_grad=True)  # the first moved 1.0 > cliprange_value
    result = ppo_value_loss(values, old_values, returns, mask, cliprange_value=0.2, vf_coef=0.5)
    result.loss.backward()
    assert values.grad[0, 0] == 0 and values.grad[0, 1] != 0
    assert result.clip_fraction == 0.5
    # 0.5 * vf_coef * mean(max squared error): (1 - 0.2)^2 for the clipped value, 0.05^2 for the other.
    assert result.loss.item() == pytest.approx(0.5 * 0.5 * (0.64 + 0.0025) / 2)


def test_a2c_policy_loss_raises_the_log_prob_of_tokens_in_proportion_to_their_advantage() -> None:
    gen = generator(32)
    mask = right_padded_mask([5, 2, 4], 5)
    advantages = torch.randn(3, 5, generator=gen)
    logprobs = (-3 * torch.rand(3, 5, generator=gen)).requires_grad_()
    loss = a2c_policy_loss(logprobs, advantages, mask)
    assert_close(loss, -(advantages * logprobs)[mask].mean())
    loss.backward()
    # A descent step moves each token's log-prob by lr * A / valid tokens: up where A > 0, down where A < 0.
    assert_close(logprobs.grad, -advantages * mask / mask.sum())
    # Advantages that carry a graph (say, from the critic's values) get no gradient from the policy's loss.
    values = torch.zeros(3, 5, requires_grad=True)
    a2c_policy_loss(logprobs.detach().requires_grad_(), advantages - values, mask).backward()
    assert values.grad is None


def test_a2c_value_loss_is_half_the_weighted_squared_error_and_pulls_each_value_toward_its_return() -> None:
    gen = generator(33)
    mask = right_padded_mask([5, 2, 4], 5)
    returns = torch.randn(3, 5, generator=gen)
    values = torch.randn(3, 5, generator=gen).requires_grad_()
    vf_coef = 0.1
    loss = a2c_value_loss(values, returns, mask, vf_coef)
    assert_close(loss, vf_coef * 0.5 * ((values - returns)[mask] ** 2).mean())
    # PPO's value loss with a clip range no value reaches: one convention, so vf_coef weighs the critic alike in both.
    assert_close(loss, ppo_value_loss(values, values.detach(), returns, mask, math.inf, vf_coef).loss)
    loss.backward()
    assert_close(values.grad, vf_coef * (values.detach() - returns) * mask / mask.sum())
    # A small descent step brings every valid value closer to its return and leaves padding alone.
    stepped = values.detach() - values.grad
    assert ((stepped - returns).abs() < (values.detach() - returns).abs())[mask].all()
    assert (values.grad[~mask] == 0).all()


def test_rloo_advantages_sum_to_zero_per_prompt_and_scale_the_deviation_from_the_mean() -> None:
    scores = torch.randn(4, 5, generator=generator(25))
    advantages = rloo_advantages(scores)
    assert_close(advantages.sum(dim=-1), torch.zeros(4))
    assert_close(advantages, 5 / 4 * (scores - scores.mean(dim=-1, keepdim=True)))
    with pytest.raises(ValueError):
        rloo_advantages(torch.ones(3, 1))


def test_grpo_advantages_are_standardised_per_group_and_zero_for_a_tied_group() -> None:
    scores = torch.randn(3, 6, generator=generator(26)) * 4 + 2
    scores[1] = 7.0
    advantages = grpo_advantages(scores)
    assert_close(advantages[[0, 2]].mean(dim=-1), torch.zeros(2), atol=1e-5, rtol=0)
    assert_close(advantages[[0, 2]].std(dim=-1), torch.ones(2), atol=1e-3, rtol=0)
    assert (advantages[1] == 0).all()


def test_token_rewards_put_the_score_on_the_last_response_token() -> None:
    mask = torch.tensor([[True, True, True, False], [False, True, True, True], [True, False, False, False]])
    kl = torch.rand(3, 4, generator=generator(27))
    scores = torch.tensor([1.0, -2.0, 0.5])
    rewards = kl_penalized_token_rewards(scores, kl, mask, kl_coef=0.1)
    assert_close(rewards.sum(dim=-1), scores - 0.1 * (kl * mask).sum(dim=-1))
    score_positions = (rewards + 0.1 * kl * mask).nonzero().tolist()
    assert score_positions == [[0, 2], [1, 3], [2, 0]]
    assert (rewards[~mask] == 0).all()
    with pytest.raises(ValueError, match="at least one valid token"):
        kl_penalized_token_rewards(scores, kl, mask & False, kl_coef=0.1)


def test_missing_eos_penalty_hits_only_truncated_responses() -> None:
    penalised = penalize_missing_eos(torch.tensor([1.0, 1.0, -1.0]), torch.tensor([True, False, False]), 2.0)
    assert_close(penalised, torch.tensor([1.0, -1.0, -3.0]))


def test_registered_estimators_share_one_calling_convention() -> None:
    assert {"gae", "rloo", "grpo"} <= ADVANTAGE_ESTIMATORS.keys()
    prompts, k, length = 2, 3, 4
    gen = generator(28)
    mask = right_padded_mask([4, 1, 3, 2, 4, 3], length)
    token_rewards = torch.randn(prompts * k, length, generator=gen).masked_fill(~mask, 0)
    values = torch.randn(prompts * k, length, generator=gen)
    options_by_name = {"gae": {"values": values}, "rloo": {"samples_per_prompt": k}, "grpo": {"samples_per_prompt": k}}
    for name, options in options_by_name.items():
        advantages, returns = ADVANTAGE_ESTIMATORS[name](token_rewards, mask, **options)
        assert advantages.shape == returns.shape == (prompts * k, length), name
        assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all(), name
    # The critic-free estimators give every token of a response the same advantage and the Monte-Carlo return.
    advantages, returns = ADVANTAGE_ESTIMATORS["rloo"](token_rewards, mask, samples_per_prompt=k)
    sequence_advantages = rloo_advantages((token_rewards * mask).sum(-1).view(prompts, k)).view(-1, 1)
    assert_close(advantages, sequence_advantages * mask)
    assert_close(returns, gae_advantages_and_returns(token_rewards, mask, torch.zeros_like(values), 1.0, 1.0)[1])
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("gae")(gae_advantages_and_returns)


def test_sequence_logprobs_ignore_padding_and_token_logprobs_are_normalised() -> None:
    gen = generator(29)
    logits = torch.randn(2, 5, 11, generator=gen)
    tokens = torch.randint(0, 11, (2, 5), generator=gen)
    mask = right_padded_mask([5, 2], 5)
    changed_padding = tokens.clone()
    changed_padding[1, 2:] = (tokens[1, 2:] + 1) % 11
    assert_close(sequence_logprobs(logits, tokens, mask), sequence_logprobs(logits, changed_padding, mask))
    every_token = torch.arange(11).expand(2, 5, 11).permute(2, 0, 1)
    for temperature in (1.0, 0.5):
        total = torch.stack([token_logprobs(logits, ids, temperature) for ids in every_token]).exp().sum(0)
        assert_close(total, torch.ones(2, 5))
    with pytest.raises(ValueError):
        token_logprobs(logits, tokens, temperature=0.0)


def test_entropy_of_masked_logits_is_that_of_the_tokens_left_and_its_gradient_stays_finite() -> None:
    # The engine and the learner put unsampleable special tokens at -inf; they carry no probability.
    logits = torch.randn(2, 3, 11, generator=generator(31), requires_grad=True)
    masked_out = torch.tensor([0, 4, 7])
    kept = torch.tensor([i for i in range(11) if i not in masked_out.tolist()])
    entropy = token_entropy(logits.index_fill(-1, masked_out, float("-inf")))
    kept_logits = logits.detach()[..., kept]
    assert_close(entropy, -(kept_logits.softmax(-1) * kept_logits.log_softmax(-1)).sum(-1))
    entropy.sum().backward()  # as an entropy bonus in a loss would
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[..., masked_out] == 0).all()


# --- the adaptive KL coefficient (Ziegler et al., 2019) ----------------------------------------------------------


def test_the_kl_coefficient_moves_in_proportion_to_the_error_and_at_most_by_a_fifth_per_horizon() -> None:
    # error = clip(kl / target - 1, -0.2, 0.2); coef *= 1 + error * samples / horizon
    assert adaptive_kl_coef(0.1, kl=5.5, target=5.0, samples=1000, horizon=10000) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert adaptive_kl_coef(0.1, kl=50.0, target=5.0, samples=1000, horizon=10000) == pytest.approx(0.1 * 1.02)
    assert adaptive_kl_coef(0.1, kl=0.0, target=5.0, samples=1000, horizon=10000) == pytest.approx(0.1 * 0.98)
    assert adaptive_kl_coef(0.1, kl=5.0, target=5.0, samples=1000, horizon=10000) == 0.1
    # A batch larger than the horizon moves it by a fifth at most: it never turns negative.
    assert adaptive_kl_coef(0.1, kl=0.0, target=5.0, samples=512, horizon=32) == pytest.approx(0.08)
    assert adaptive_kl_coef(0.1, kl=50.0, target=5.0, samples=512, horizon=32) == pytest.approx(0.12)


def test_the_controller_pulls_a_drifting_policy_back_to_its_kl_target_and_a_fixed_one_stays_put() -> None:
    # A policy whose KL falls as the penalty grows (KL = 0.5 / coef): starting at 0.05 it sits at 10 nats,
    # twice a target of 5; the controller raises the coefficient until the KL is near the target.
    controller = KLController(0.05, target=5.0, horizon=1000)
    for _ in range(400):
        controller.observe(0.5 / controller.coef, samples=64)
    assert 0.5 / controller.coef == pytest.approx(5.0, rel=0.05)
    # Back inside its budget, the coefficient falls again, but never below where it started.
    for _ in range(400):
        controller.observe(0.0, samples=64)
    assert controller.coef == 0.05
    fixed = KLController(0.05)
    fixed.observe(100.0, samples=64)
    assert fixed.coef == 0.05


# --- the gate's reward-hacking check -----------------------------------------------------------------------------


def test_preference_shift_is_the_change_in_the_chosen_over_rejected_log_ratio() -> None:
    published_chosen, published_rejected = torch.tensor([-3.0, -2.0, -4.0]), torch.tensor([-2.0, -5.0, -1.0])
    assert preference_shift(published_chosen, published_rejected, published_chosen, published_rejected) == (0.0, 0.0)
    # The candidate makes every chosen response 1 nat likelier and every rejected one 0.5 nat less likely, plus noise.
    candidate_chosen = published_chosen + torch.tensor([1.0, 1.2, 0.8])
    candidate_rejected = published_rejected - 0.5
    shift, stderr = preference_shift(candidate_chosen, candidate_rejected, published_chosen, published_rejected)
    assert shift == pytest.approx(1.5)
    assert stderr == pytest.approx(torch.tensor([1.5, 1.7, 1.3]).std().item() / math.sqrt(3))


def test_the_gate_refuses_a_reward_gain_that_users_held_out_preferences_contradict() -> None:
    gate = GateConfig()
    hacked = {"reward_gain": 2.0, "preference_shift": -0.6, "preference_shift_stderr": 0.2}
    assert "reward_hacking" in gate_failures(hacked, gate)
    # Within the shift's noise, with no reward gain, or with the check off: no refusal on this count.
    assert "reward_hacking" not in gate_failures(hacked | {"preference_shift_stderr": 0.4}, gate)
    assert "reward_hacking" not in gate_failures(hacked | {"reward_gain": -0.01}, gate)
    assert "reward_hacking" not in gate_failures(hacked, GateConfig(hacking_z=0.0))
    assert "reward_hacking" not in gate_failures({"reward_gain": 2.0, "preference_shift": 0.3,
                                                  "preference_shift_stderr": 0.1}, gate)


def test_the_gate_can_require_a_candidate_not_worse_than_the_serving_version_against_users_edits() -> None:
    worse = {"edit_bleu_gain": -3.0, "edit_rouge_l_gain": -0.02, "edit_references": 40.0}
    assert gate_failures(worse, GateConfig()) == {}  # off by default: with few edits the scores are noisy
    assert list(gate_failures(worse, GateConfig(min_edit_bleu_gain=0.0))) == ["edit_bleu"]
    assert list(gate_failures(worse, GateConfig(min_edit_rouge_l_gain=0.0))) == ["edit_rouge_l"]
    assert gate_failures(worse, GateConfig(min_edit_bleu_gain=-5.0, min_edit_rouge_l_gain=-0.05)) == {}


def test_the_gate_refuses_for_reward_only_when_the_loss_stands_out_of_its_noise() -> None:
    gate = GateConfig(reward_gain_z=1.64)  # min_reward_gain -0.05
    assert "reward" in gate_failures({"reward_gain": -0.6, "reward_gain_stderr": 0.2}, gate)  # -0.27 upper bound
    assert "reward" not in gate_failures({"reward_gain": -0.3, "reward_gain_stderr": 0.2}, gate)  # +0.03: noise
    # Without its standard error, or with z = 0 (the default), the gain itself is held to the floor.
    assert "reward" in gate_failures({"reward_gain": -0.3}, gate)
    assert "reward" in gate_failures({"reward_gain": -0.3, "reward_gain_stderr": 0.2}, GateConfig())
