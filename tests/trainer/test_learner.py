"""Unit tests of the learner and the registered policy algorithms, on the real (tiny) default models, no Kafka.

Every test seeds Python's and torch's RNGs and uses the default ~1M-parameter LLaVA, so runs are deterministic on
one machine; the thresholds leave wide margins so that another CPU's rounding cannot flip them.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from modalign.core.blobs import BlobStore
from modalign.core.config import ConfigError, parse_config, with_overrides
from modalign.policy.conversation import Part, Turn
from modalign.policy.engine import Sample
from modalign.reward.backbones import load_reward_model
from modalign.reward.clip import ClipRewardModel
from modalign.reward.model import EncodedRow, RewardModel
from modalign.trainer.algorithms import ALGORITHMS
from modalign.trainer.algorithms.a2c import a2c_update
from modalign.trainer.algorithms.critic_free import critic_free_update
from modalign.trainer.algorithms.ppo import critic_advantages, ppo_update
from modalign.trainer.batches import Prompt, RecentlyUsed
from modalign.trainer.checkpoint import load_checkpoint, save_checkpoint
from modalign.trainer.evaluation import heldout_preference_shift
from modalign.trainer.gate import GateConfig, gate_candidate, gate_failures
from modalign.trainer.join import PreferencePair, Response
from modalign.trainer.learner import Learner
from modalign.trainer.logprobs import sequence_logprobs
from modalign.trainer.masked import masked_mean
from modalign.trainer.service import TrainerConfig

from tests.trainer.learning import (
    differing,
    logged,
    logged_generation,
    make_learner,
    parameters,
    seed_everything,
    traffic_pairs,
)

# --- (a) every algorithm: one round trains, the reference stays put ----------------------------------------------


@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "ppo", "a2c", "dpo"])
def test_one_round_of_each_algorithm_trains_the_policy_and_leaves_the_reference_frozen(
    blobs: BlobStore, prompts: list[Prompt], algorithm: str
) -> None:
    seed_everything(0)
    learner = make_learner(blobs, algorithm=algorithm)
    pairs = traffic_pairs(learner, prompts)
    models = learner.models
    policy, reference, reward = parameters(models.policy), parameters(models.reference), parameters(models.reward_model)
    value = parameters(models.value_model) if models.value_model is not None else None

    metrics = learner.learn(pairs, prompts)

    expected = {"rm_loss", "rm_train_accuracy"} | (
        {"dpo_loss", "dpo_reward_accuracy", "dpo_reward_margin"} if algorithm == "dpo"
        else {"policy_loss", "approx_kl", "entropy", "reward_mean", "kl", "response_length_mean"}
    ) | ({"clip_fraction"} if algorithm in ("rloo", "grpo", "ppo") else set())  # A2C has no ratio to clip
    assert expected <= metrics.keys()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert differing(parameters(models.policy), policy)
    assert all(torch.isfinite(p).all() for p in models.policy.parameters())
    assert differing(parameters(models.reward_model), reward)
    assert not differing(parameters(models.reference), reference)
    assert not any(p.requires_grad for p in models.reference.parameters())
    if algorithm in ("ppo", "a2c"):
        assert "value_loss" in metrics
        assert differing(parameters(models.value_model), value)
    else:
        assert models.value_model is None  # only an algorithm registered with uses_critic gets a critic


def test_pairs_the_models_cannot_take_are_reported_with_a_reason(blobs: BlobStore, prompts: list[Prompt]) -> None:
    learner = make_learner(blobs, algorithm="dpo")
    generation = logged_generation(learner, prompts[1])
    plain = Response("A red square.", None, None)
    assert learner.unusable_reason(PreferencePair("ok", "edit", generation, plain, plain)) is None
    forged = PreferencePair("f", "edit", generation, Response("see <image>", None, None), plain)
    assert "reserved" in learner.unusable_reason(forged)
    huge = PreferencePair("h", "edit", generation, Response("x" * 8192, None, None), plain)  # 8 KiB: the edit limit
    assert "too long" in learner.unusable_reason(huge)


# --- (b) importance ratios start at exactly 1 --------------------------------------------------------------------


def test_recomputed_logprobs_equal_the_behaviour_logprobs_so_ppo_ratios_start_at_one(
    blobs: BlobStore, prompts: list[Prompt]
) -> None:
    # Temperature 0.7: recomputation must use the sampling temperature, and the masked special tokens, to match.
    learner = make_learner(blobs, algorithm="ppo", sampling_temperature=0.7, max_new_tokens=12, minibatch_size=8)
    seed_everything(4)  # a seed whose episodes include early EOS: rows of different lengths, right-padded
    episodes = learner.sampler.collect_episodes(prompts)
    finish = [s.finish_reason for s in episodes.samples]
    assert "stop" in finish and "length" in finish, finish

    mask = episodes.batch.response_mask
    with torch.no_grad():
        recomputed = learner.batches.logprobs(learner.models.policy, episodes.batch)
        at_temperature_one = learner.batches.logprobs(learner.models.policy, episodes.batch, temperature=1.0)
    torch.testing.assert_close(recomputed, episodes.old_logprobs, atol=2e-5, rtol=0)
    assert (recomputed[~mask] == 0).all() and (episodes.old_logprobs[~mask] == 0).all()
    assert (at_temperature_one - episodes.old_logprobs).abs().max() > 0.1  # the check can tell temperatures apart
    # The starting policy is the reference: the episodes' KL to it is zero up to rounding.
    assert episodes.kl.abs().max() < 2e-5

    # The first minibatch of an update sees ratio 1 on every token: nothing clipped, no movement.
    context = learner.policy_context
    history = ppo_update(context, episodes, [])
    assert history["clip_fraction"][0] == 0.0
    assert history["approx_kl"][0] < 1e-9
    history = critic_free_update(context, learner.sampler.collect_episodes(prompts), [], "rloo", kl_in_loss=False)
    assert history["clip_fraction"][0] == 0.0
    assert history["approx_kl"][0] < 1e-9


def test_a2c_takes_one_step_per_batch_of_episodes_and_moves_its_critic_toward_the_returns(
    blobs: BlobStore, prompts: list[Prompt]
) -> None:
    """A2C's gradient has no ratio, so it is right only for the policy that sampled the episodes: a second step on
    the same batch would be off-policy. Epochs and minibatches that would give PPO four steps here change nothing."""
    seed_everything(0)
    # A step small enough to be first-order: at the default 3e-4, Adam's first step (3e-4 on every weight, whatever
    # the gradient's size) overshoots the returns on this tiny critic, PPO's first step alike.
    learner = make_learner(blobs, algorithm="a2c", policy_epochs=2, minibatch_size=8, policy_lr=1e-5)
    context, models = learner.policy_context, learner.models
    episodes = learner.sampler.collect_episodes(prompts)
    assert len(episodes.samples) == 16
    mask = episodes.batch.response_mask
    _, _, returns = critic_advantages(context, episodes)

    def critic_error() -> float:
        with torch.no_grad():
            return masked_mean((context.values(episodes.batch) - returns) ** 2, mask).item()

    error_before = critic_error()
    history = a2c_update(context, episodes, [])

    for optimizer in (models.policy_optimizer, models.value_optimizer):
        assert optimizer.state and {state["step"].item() for state in optimizer.state.values()} == {1}
    assert critic_error() < error_before
    assert history["approx_kl"] == [pytest.approx(0.0, abs=1e-9)]  # the learner's log-probs are the sampler's


def test_a_later_turns_response_is_learned_on_the_whole_conversation(blobs: BlobStore, images: dict[str, str]) -> None:
    """Feedback on a follow-up's answer: the trainer joins it to the logged conversation, and its log-probs
    and rewards are those of the whole conversation, not of the last question alone."""
    seed_everything(0)
    learner = make_learner(blobs, algorithm="ppo", sampling_temperature=1.0, max_new_tokens=10)
    asked = Prompt((
        Turn("user", (Part("image", images["red"]), Part("text", "What colour is the square?"))),
        Turn("assistant", (Part("text", "It is red."),)),
        Turn("user", (Part("text", "And this one?"), Part("image", images["blue"]))),
    ))
    [sample] = learner.sampler.sample([asked], 1, seed=3)
    generation = logged_generation(learner, asked)
    assert Prompt.of(generation) == asked
    pair = PreferencePair("c1", "preference", generation, logged(sample), Response("It is green.", None, None))
    alone = Prompt.question("And this one?", (images["blue"],))
    with torch.no_grad():
        batch = learner.batches.of_pairs([pair])
        logprobs = learner.batches.logprobs(learner.models.policy, batch)[0, : len(sample.token_ids)]
        question_only = learner.batches.logprobs(learner.models.policy, learner.batches.build([alone], [sample.token_ids]))[0]
        rewards = learner.reward.pair_rewards([pair])
        rewards_alone = learner.models.reward_model.score(["And this one?"] * 2, [learner.media.of_prompt(alone).images] * 2,
                                                          [sample.text, "It is green."])
    torch.testing.assert_close(logprobs, torch.tensor(sample.logprobs), atol=2e-5, rtol=0)  # the behaviour policy's
    assert (question_only[: len(sample.token_ids)] - logprobs).abs().max() > 1e-3  # earlier turns matter
    assert not torch.allclose(torch.cat(rewards), rewards_alone)
    assert learner.unusable_reason(pair) is None


# --- (c) the reward model learns a separable preference -----------------------------------------------------------


def colour_pairs(learner: Learner, prompt: Prompt, combos: list[tuple[str, str]], tag: str) -> list[PreferencePair]:
    """Pairs that differ only in the colour word: the one that says "red" is preferred over any other colour."""
    rng = random.Random(tag)
    generation = logged_generation(learner, prompt)
    others = ["blue", "green", "yellow", "purple", "orange", "black", "white"]
    return [
        PreferencePair(
            f"{tag}{i}", "preference", generation,
            Response(f"I see a red {shape} at the {position}.", None, None),
            Response(f"I see a {rng.choice(others)} {shape} at the {position}.", None, None),
        )
        for i, (shape, position) in enumerate(combos)
    ]


def test_the_reward_model_learns_a_preference_for_red_and_generalises_to_held_out_pairs(
    blobs: BlobStore, prompts: list[Prompt]
) -> None:
    seed_everything(0)
    learner = make_learner(blobs, algorithm="dpo", reward_epochs=2, reward_batch_size=16)
    shapes = ["circle", "square", "triangle", "star", "rectangle", "dot", "line", "shape"]
    positions = ["left", "right", "top", "bottom", "center", "top left", "top right", "bottom left", "bottom right"]
    combos = list(itertools.product(shapes, positions))
    random.Random(1).shuffle(combos)
    train = colour_pairs(learner, prompts[1], combos[:16], "t")
    heldout = colour_pairs(learner, prompts[1], combos[16:32], "h")  # shape-position combinations never trained on

    def heldout_margin() -> float:
        with torch.no_grad():
            chosen, rejected = learner.reward.pair_rewards(heldout)
        return (chosen - rejected).mean().item()

    before = learner.evaluate(heldout, [])
    margin_before = heldout_margin()
    for _ in range(3):
        metrics = learner.learn(train, [])
    after = learner.evaluate(heldout, [])

    assert before["rm_heldout_pairs"] == after["rm_heldout_pairs"] == 16
    assert before["rm_heldout_accuracy"] <= 0.75  # the fresh head has not got it by chance
    assert after["rm_heldout_accuracy"] >= 0.9
    assert heldout_margin() > margin_before + 0.5
    # DPO on the same pairs moved the policy's implicit reward the same way.
    assert metrics["dpo_reward_accuracy"] == 1.0 and metrics["dpo_reward_margin"] > 0


def count_calls(target: object, method: str) -> list[tuple]:
    """The arguments of every later call of target.method, in order."""
    calls: list[tuple] = []
    original = getattr(target, method)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    setattr(target, method, counted)
    return calls


def test_kept_reward_rows_train_the_reward_model_exactly_as_encoding_them_anew(
    blobs: BlobStore, prompts: list[Prompt]
) -> None:
    """Epochs, replays and held-out checks score the same pairs again: the kept rows spare their encoding and
    change nothing the reward model learns."""
    shapes, positions = ["circle", "square", "star", "dot"], ["left", "right", "top", "bottom"]
    combos = list(itertools.product(shapes, positions))
    runs = {}
    for cache_mib in (0.0, 256.0):
        seed_everything(0)
        learner = make_learner(blobs, algorithm="dpo", reward_epochs=2, reward_batch_size=8, reward_row_cache_mib=cache_mib)
        encoded = count_calls(learner.models.reward_model, "encode_row")
        train = [colour_pairs(learner, prompt, combos[:8], f"t{i}") for i, prompt in enumerate(prompts[1:3])]
        heldout = colour_pairs(learner, prompts[1], combos[8:], "h")
        metrics = [learner.reward.train(train[0]), learner.heldout_accuracy(heldout),
                   learner.reward.train(train[1] + train[0][:4]), learner.heldout_accuracy(heldout)]
        runs[cache_mib] = metrics, parameters(learner.models.reward_model), len(encoded)

    (plain, plain_weights, plain_encoded), (kept, kept_weights, kept_encoded) = runs[0.0], runs[256.0]
    assert kept == plain and differing(kept_weights, plain_weights) == []
    # Anew: 2 rows per pair, once per round (for all its epochs) and per held-out check. Kept: each distinct
    # row once (8 + 8 training pairs, 8 held-out pairs), with its first encoding.
    assert plain_encoded == 2 * (8 + 8 + 12 + 8)
    assert kept_encoded == 2 * (8 + 8 + 8)


def test_encoded_rows_forget_the_least_recently_used_past_their_bytes() -> None:
    def row(values: int) -> EncodedRow:
        return EncodedRow({"input_ids": torch.zeros(values, dtype=torch.int64)})  # 8 bytes a value

    rows: RecentlyUsed[tuple[Prompt, str], EncodedRow] = RecentlyUsed(80, lambda row: row.nbytes)
    encoded = []

    def get(key: str, values: int = 4) -> EncodedRow:
        return rows.get((Prompt.question(key), ""), lambda: encoded.append(key) or row(values))

    for key in ("a", "b"):
        get(key)
    get("a")  # used: b is now the least recent
    get("c", values=3)  # 88 bytes: b goes
    assert len(rows) == 2
    get("a")
    get("b")
    assert encoded == ["a", "b", "c", "b"]
    get("huge", values=11)  # larger than the whole budget: returned, and kept by nothing
    assert len(rows) == 0 and get("huge", values=11).inputs["input_ids"].numel() == 11


@pytest.mark.parametrize("algorithm", ["dpo", "ppo", "grpo", "a2c"])
def test_an_sft_weight_raises_the_likelihood_of_users_chosen_answers_more(
    blobs: BlobStore, prompts: list[Prompt], algorithm: str
) -> None:
    """RPO's term for DPO; PPO-ptx's for the on-policy algorithms, which otherwise never see the pairs' answers."""
    def chosen_logprob_gain(sft_weight: float) -> float:
        seed_everything(0)
        learner = make_learner(blobs, algorithm=algorithm, sft_weight=sft_weight, policy_epochs=3)
        pairs = traffic_pairs(learner, prompts)
        batch = learner.batches.of_chosen(pairs)

        def chosen() -> float:
            with torch.no_grad():
                logits = learner.batches.logits(learner.models.policy, batch)
                return sequence_logprobs(logits, batch.response_ids, batch.response_mask).sum().item()

        before = chosen()
        metrics = learner.learn(pairs, prompts)
        assert ("sft_loss" in metrics) == (algorithm != "dpo" and sft_weight > 0)  # DPO's is inside dpo_loss
        return chosen() - before

    assert chosen_logprob_gain(5.0) > chosen_logprob_gain(0.0) + 1.0


# --- (d) on-policy algorithms raise the reward they are given -----------------------------------------------------


@pytest.mark.parametrize("algorithm", ["rloo", "ppo", "a2c"])
def test_an_on_policy_algorithm_raises_the_expected_reward_of_its_samples(
    blobs: BlobStore, prompts: list[Prompt], algorithm: str
) -> None:
    """A fixed reward: 1 when a response starts with an even token id, else 0. Its expectation under the policy
    is computed exactly (the first token's probability mass on even ids, averaged over the prompts), so the
    check has no sampling noise; a sign error anywhere in advantages, ratios or losses would lower it."""
    seed_everything(0)
    # Twelve policy steps each: two epochs over six batches, or A2C's one step on each of twelve batches.
    batches = {"policy_updates_per_round": 2} if algorithm == "a2c" else {}
    learner = make_learner(
        blobs, algorithm=algorithm, max_new_tokens=2, policy_lr=1e-2, policy_epochs=2, missing_eos_penalty=0.0,
        **batches,
    )
    rewarded = torch.zeros(learner.models.policy.config.get_text_config().vocab_size, dtype=torch.bool)
    rewarded[0::2] = True
    learner.sampler.score = lambda prompts_, samples: torch.tensor([float(rewarded[s.token_ids[0]]) for s in samples])
    first_token = learner.batches.build(prompts, [[0]] * len(prompts))

    def expected_reward() -> float:
        with torch.no_grad():
            probs = learner.batches.logits(learner.models.policy, first_token)[:, 0].softmax(-1)
        return probs[:, rewarded].sum(-1).mean().item()

    before = expected_reward()
    for _ in range(6):
        metrics = learner.learn([], prompts)
    after = expected_reward()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert 0.4 < before < 0.6
    assert after > before + 0.15, (before, after)


# --- (e) a learner's state round-trips exactly -------------------------------------------------------------------


def test_a_learner_restored_from_its_checkpoint_continues_identically(
    blobs: BlobStore, prompts: list[Prompt], tmp_path
) -> None:
    seed_everything(0)
    original = make_learner(blobs, algorithm="ppo")
    pairs = traffic_pairs(original, prompts)
    original.learn(pairs, prompts)
    save_checkpoint(tmp_path, {"learner": original.state_dict()})  # safetensors and JSON, as the trainer writes it

    restored = make_learner(blobs, algorithm="ppo")
    restored.load_state_dict(load_checkpoint(tmp_path)["learner"])
    for name in ("policy", "published_policy", "reference", "reward_model", "value_model"):
        ours, theirs = getattr(restored.models, name), getattr(original.models, name)
        assert not differing(parameters(ours), parameters(theirs)), name
    assert restored.shards.shared_rng.getstate() == original.shards.shared_rng.getstate()

    a, b = original.sampler.sample(prompts, 2, seed=5), restored.sampler.sample(prompts, 2, seed=5)
    assert [(s.token_ids, s.logprobs) for s in a] == [(s.token_ids, s.logprobs) for s in b]
    # The optimisers' state came along too: one more identical round gives identical weights.
    for learner in (original, restored):
        seed_everything(1)
        learner.learn(pairs, prompts)
    for name in ("policy", "reward_model", "value_model"):
        ours, theirs = getattr(restored.models, name), getattr(original.models, name)
        assert not differing(parameters(ours), parameters(theirs)), name


# --- (f) a refused candidate is rolled back -----------------------------------------------------------------------


def test_revert_policy_restores_the_last_accepted_policy(blobs: BlobStore, prompts: list[Prompt]) -> None:
    seed_everything(0)
    learner = make_learner(blobs, algorithm="dpo")
    pairs = traffic_pairs(learner, prompts)
    models = learner.models
    learner.learn(pairs, prompts)
    models.accept_candidate()
    accepted = parameters(models.policy)
    learner.learn(pairs, prompts)
    assert differing(parameters(models.policy), accepted)
    assert not differing(parameters(models.published_policy), accepted)

    models.revert_policy()
    assert not differing(parameters(models.policy), accepted)
    assert not models.policy_optimizer.state  # Adam's moments belonged to the refused trajectory
    sample = learner.sampler.sample
    ours, published = sample(prompts, 2, seed=3), sample(prompts, 2, seed=3, model=models.published_policy)
    assert [s.token_ids for s in ours] == [s.token_ids for s in published]
    # Training continues from the reverted weights.
    learner.learn(pairs, prompts)
    assert differing(parameters(models.policy), accepted)


def test_the_ppo_critic_starts_from_the_trained_reward_model_not_the_fresh_one(
    blobs: BlobStore, prompts: list[Prompt]
) -> None:
    seed_everything(0)
    learner = make_learner(blobs, algorithm="ppo", policy_updates_per_round=0)
    fresh_critic = parameters(learner.models.value_model)
    learner.learn(traffic_pairs(learner, prompts), prompts)
    assert differing(parameters(learner.models.value_model), fresh_critic)
    assert not differing(parameters(learner.models.value_model), parameters(learner.models.reward_model))


@pytest.mark.parametrize("algorithm", ["ppo", "dpo"])
def test_a_clip_reward_model_learns_beside_the_policy_and_exports_as_one(
    blobs: BlobStore, prompts: list[Prompt], algorithm: str, tmp_path
) -> None:
    """--learner.reward-backbone clip: the round trains the CLIP reward model (PPO's critic, which reads every
    position, is a generative one on the policy that never copies it), and the export loads as CLIP."""
    seed_everything(0)
    learner = make_learner(blobs, algorithm=algorithm, reward_backbone="clip")
    models = learner.models
    assert isinstance(models.reward_model, ClipRewardModel)
    reward = parameters(models.reward_model)
    value = parameters(models.value_model) if models.value_model is not None else None
    metrics = learner.learn(traffic_pairs(learner, prompts), prompts)
    assert {"rm_loss", "rm_train_accuracy"} <= metrics.keys()
    assert differing(parameters(models.reward_model), reward)
    if algorithm == "ppo":
        assert isinstance(models.value_model, RewardModel) and models.value_model.likelihood_weights is None
        assert differing(parameters(models.value_model), value) and "value_loss" in metrics
    models.export_reward(tmp_path / "r1")
    exported = load_reward_model(tmp_path / "r1")
    assert isinstance(exported, ClipRewardModel)
    pairs = traffic_pairs(learner, prompts)[:2]
    with torch.no_grad():
        torch.testing.assert_close(*(learner.reward.pair_rewards(pairs, model) for model in (models.reward_model, exported)))


def test_an_unknown_reward_backbone_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"one of generative, clip, got 'vit'"):
        with_overrides(TrainerConfig(), {"learner.reward_backbone": "vit"})


def test_grpos_reward_scale_reaches_its_update_and_an_unknown_one_is_refused(
    blobs: BlobStore, prompts: list[Prompt]
) -> None:
    def trained(scale: str) -> dict[str, torch.Tensor]:
        seed_everything(0)
        learner = make_learner(blobs, algorithm="grpo", grpo_scale_rewards=scale)
        learner.learn(traffic_pairs(learner, prompts), prompts)
        return parameters(learner.models.policy)

    group = trained("group")
    assert not differing(group, trained("group"))  # the same seed and scale: the same steps
    assert differing(group, trained("batch"))
    with pytest.raises(ConfigError, match=r"one of group, batch, none, got 'prompt'"):
        with_overrides(TrainerConfig(), {"learner.grpo_scale_rewards": "prompt"})


def test_a2c_is_registered_with_a_critic_and_chosen_by_its_flag() -> None:
    assert ALGORITHMS["a2c"].uses_critic
    assert parse_config(TrainerConfig, ["--learner.algorithm", "a2c"]).learner.algorithm == "a2c"


def test_an_unknown_algorithm_is_refused_when_the_config_is_parsed_naming_the_known_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ConfigError, match=r"unknown 'ppo2'.*a2c, dpo, grpo, ppo, rloo") as refused:
        with_overrides(TrainerConfig(), {"learner.algorithm": "ppo2"})
    assert refused.value.field == "learner.algorithm"
    with pytest.raises(SystemExit) as exited:
        parse_config(TrainerConfig, ["--learner.algorithm", "ppo2"])
    assert exited.value.code == 2 and "--learner.algorithm" in capsys.readouterr().err


def test_bfloat16_forward_passes_train_float32_master_weights(blobs: BlobStore, prompts: list[Prompt], tmp_path) -> None:
    """--learner.dtype bfloat16: forward passes under autocast, weights and optimiser state stay float32, and a
    round still trains both the reward model and the policy; an unknown precision is refused naming the known."""
    seed_everything(0)
    learner = make_learner(blobs, algorithm="rloo", dtype="bfloat16")
    policy, reward = parameters(learner.models.policy), parameters(learner.models.reward_model)
    metrics = learner.learn(traffic_pairs(learner, prompts), prompts)
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values()), metrics
    assert differing(policy, parameters(learner.models.policy)) and differing(reward, parameters(learner.models.reward_model))
    for model in (learner.models.policy, learner.models.reward_model):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    batch = learner.batches.of_samples(prompts[:1], learner.sampler.sample(prompts[:1], 1, seed=0))
    with learner.precision():
        logits = learner.models.policy(**batch.inputs).logits
    assert logits.dtype == torch.bfloat16  # the forward pass did run in bfloat16
    with pytest.raises(ConfigError, match=r"one of float32, bfloat16, float16, got 'float8'"):
        with_overrides(TrainerConfig(), {"learner.dtype": "float8"})


def test_held_out_accuracy_is_reported_per_feedback_kind(blobs: BlobStore, prompts: list[Prompt]) -> None:
    seed_everything(0)
    learner = make_learner(blobs, algorithm="dpo")
    pairs = traffic_pairs(learner, prompts)  # preferences and edits, alternating
    with torch.no_grad():
        chosen, rejected = learner.reward.pair_rewards(pairs)
    right = (chosen > rejected).tolist()

    metrics = learner.heldout_accuracy(pairs)

    for kind in ("preference", "edit"):
        of_kind = [r for r, pair in zip(right, pairs) if pair.source == kind]
        assert metrics[f"rm_heldout_accuracy_{kind}"] == pytest.approx(sum(of_kind) / len(of_kind))
    assert metrics["rm_heldout_accuracy"] == pytest.approx(sum(right) / len(right))
    assert "rm_heldout_accuracy_rating" not in metrics  # no rating pairs were held out


def test_the_preference_shift_is_measured_on_sampled_pairs_not_edits(blobs: BlobStore, prompts: list[Prompt]) -> None:
    seed_everything(0)
    learner = make_learner(blobs, algorithm="dpo")
    pairs = traffic_pairs(learner, prompts)  # a preference and an edit per prompt
    metrics = heldout_preference_shift(learner.models, learner.batches, pairs)
    assert metrics["preference_shift_pairs"] == sum(pair.source == "preference" for pair in pairs) == len(prompts)
    assert metrics["preference_shift"] == 0.0  # the policy has not moved from the published one


def test_the_reward_model_replays_earlier_pairs_beside_the_new_ones(blobs: BlobStore, prompts: list[Prompt]) -> None:
    seed_everything(0)
    learner = make_learner(blobs, algorithm="dpo", reward_replay=3)
    earlier, new = traffic_pairs(learner, prompts[:2]), traffic_pairs(learner, prompts[2:])
    trained_on = []
    train = learner.reward.train
    learner.reward.train = lambda pairs: trained_on.append(pairs) or train(pairs)

    learner.learn(new, prompts, replay=earlier)
    learner.learn(new, prompts)

    first, second = trained_on
    assert first[:len(new)] == new and len(first) == len(new) + 3
    assert all(pair in earlier for pair in first[len(new):]) and len(set(map(id, first[len(new):]))) == 3
    assert second == new


# --- (g) the gate catches a policy gaming a flawed reward model --------------------------------------------------


def tic_share(sample: Sample) -> float:
    """Share of a response's tokens that are a verbal tic: here, any token of even id."""
    return sum(token % 2 == 0 for token in sample.token_ids) / max(len(sample.token_ids), 1)


def users_dislike_the_tic(learner: Learner, prompts: list[Prompt], per_prompt: int = 6) -> list[PreferencePair]:
    """Held-out judgements of users who dislike the tic: per prompt, of some samples, the one with the
    least of it over the one with the most."""
    samples = learner.sampler.sample(prompts * 10, per_prompt, seed=11)
    pairs = []
    for i, prompt in enumerate(prompts * 10):
        group = sorted(samples[i * per_prompt:(i + 1) * per_prompt], key=tic_share)
        pairs.append(PreferencePair(f"h{i}", "preference", logged_generation(learner, prompt),
                                    logged(group[0]), logged(group[-1])))
    return pairs


@pytest.mark.parametrize("reward_model", ["flawed", "sound"])
def test_the_gate_refuses_a_candidate_that_games_a_reward_model_users_disagree_with(
    blobs: BlobStore, prompts: list[Prompt], reward_model: str
) -> None:
    """A deliberately flawed reward model that rewards a verbal tic users dislike: RLOO raises its
    reward, while users' held-out preferences say the candidate got worse, so the gate refuses it and
    the policy goes back. The control: a reward model that agrees with the users is not refused."""
    seed_everything(0)
    learner = make_learner(blobs, algorithm="rloo", policy_lr=1e-2, missing_eos_penalty=0.0, eval_prompts=16)
    sign = 1.0 if reward_model == "flawed" else -1.0
    # What training optimises, and the gate's measure of reward.
    learner.sampler.score = learner.reward.score = lambda prompts_, samples: torch.tensor(  # noqa: E731
        [sign * tic_share(s) for s in samples])
    heldout = users_dislike_the_tic(learner, prompts)
    published = parameters(learner.models.published_policy)
    for _ in range(8):
        learner.learn([], prompts)
    # Only the reward-hacking check can refuse (the real reward model beside the flawed one is untrained).
    lenient = GateConfig(min_heldout_accuracy=0.0, max_kl=1e9, max_mean_length_ratio=1e9)

    evaluation, passed = gate_candidate(learner, lenient, heldout, prompts)

    assert evaluation["reward_gain"] > 0, evaluation  # by the reward model's measure, training worked either way
    if reward_model == "flawed":
        assert evaluation["preference_shift"] < 0, evaluation
        assert list(gate_failures(evaluation, lenient)) == ["reward_hacking"], {
            name: evaluation[name] for name in ("reward_gain", "preference_shift", "preference_shift_stderr")}
        assert not passed and not differing(parameters(learner.models.policy), published), "refused and reverted"
    else:
        assert evaluation["preference_shift"] > 0, evaluation
        assert gate_failures(evaluation, lenient) == {} and passed


def test_the_evaluation_scores_both_versions_against_held_out_edits(blobs: BlobStore, prompts: list[Prompt]) -> None:
    """A user's edit is a reference answer for its prompt: the evaluation reports BLEU and ROUGE-L of the
    candidate's answers to edited prompts and their gains over the published version's."""
    learner = make_learner(blobs, eval_prompts=4)
    heldout = traffic_pairs(learner, prompts)  # a preference and an edit per prompt
    evaluation = learner.evaluate(heldout, prompts)
    assert evaluation["edit_references"] == 4  # the most recent eval_prompts edits
    assert 0 <= evaluation["edit_bleu"] <= 100 and 0 <= evaluation["edit_rouge_l"] <= 1
    # The candidate is the published policy until it learns: the same answers, no gain either way.
    assert evaluation["edit_bleu_gain"] == 0 and evaluation["edit_rouge_l_gain"] == 0
    torch.manual_seed(0)
    with torch.no_grad():  # a different candidate answers differently, and its scores show it
        for parameter in learner.models.policy.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    moved = learner.evaluate(heldout, prompts)
    assert moved["edit_bleu"] != evaluation["edit_bleu"] or moved["edit_rouge_l"] != evaluation["edit_rouge_l"]
    assert "edit_references" not in learner.evaluate([p for p in heldout if p.source != "edit"], prompts)
