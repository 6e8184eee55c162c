"""The learner: the models the trainer improves, and one round of learning from preference pairs.

Each round the reward model learns from the new pairs (Bradley-Terry), then the policy is updated by
the configured algorithm (see algorithms/: "ppo", "rloo", "grpo", "dpo"), registered by name. The
reference policy is a frozen copy of the starting policy, for the KL penalty. Dropout stays off
(eval mode) in every model: gradients flow in eval mode, and rollout and training then see the same
network.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import math
import random
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from modalign.core.blobs import BlobStore
from modalign.policy.engine import GenerationRequest, PolicyEngine, Sample, SamplingParams, mask_unsampleable
from modalign.policy.model import build_default_policy, format_prompt, load_policy, save_policy
from modalign.reward.model import RewardModel
from modalign.trainer import distributed
from modalign.trainer.join import PreferencePair
from modalign.trainer.kl import kl_k1
from modalign.trainer.logprobs import token_logprobs
from modalign.trainer.losses import bradley_terry_loss, preference_accuracy
from modalign.trainer.rewards import penalize_missing_eos

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Prompt:
    """A prompt seen in traffic, for on-policy rollouts."""

    text: str
    image_sha256: tuple[str, ...]


@dataclass(frozen=True)
class LearnerConfig:
    """What the trainer learns and how."""

    algorithm: str = "rloo"
    """Policy optimisation: "ppo", "rloo", "grpo" or "dpo"."""
    policy_model_dir: str = ""
    """The starting policy (and the frozen reference); empty builds the default small policy."""
    reward_model_dir: str = ""
    """The starting reward model; empty puts a fresh scalar head on a copy of the starting policy."""
    seed: int = 0
    """Seed of the models' initialisation, of sampling and of batch order."""
    device: str = "cpu"
    """Torch device the models train on: cpu, cuda, cuda:1, ..."""
    reward_lr: float = 3e-4
    """Learning rate of the reward model."""
    reward_epochs: int = 2
    """Passes of the reward model over each round's new pairs."""
    reward_batch_size: int = 16
    """Preference pairs per reward model step."""
    policy_lr: float = 3e-4
    """Learning rate of the policy (and of the value head, for PPO)."""
    kl_coef: float = 0.05
    """Weight of the KL penalty against the reference (in the reward for PPO and RLOO, in the loss for GRPO)."""
    policy_updates_per_round: int = 2
    """On-policy algorithms: rollout batches (each followed by policy_epochs of updates) per learning round."""
    rollout_prompts: int = 8
    """Prompts from traffic sampled per on-policy update."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt (the group of RLOO and GRPO)."""
    rollout_temperature: float = 1.0
    """Sampling temperature of rollouts; the same temperature scores their log-probs in training."""
    max_new_tokens: int = 24
    """Longest rollout and evaluation response, in tokens."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the reward of a rollout that hit max_new_tokens without EOS."""
    policy_epochs: int = 2
    """Optimisation passes over each batch of rollouts (or pairs, for DPO)."""
    minibatch_size: int = 16
    """Rollouts (or pairs) per policy optimisation step."""
    cliprange: float = 0.2
    """PPO, RLOO and GRPO: how far the probability ratio may move from 1 before the surrogate is clipped."""
    cliprange_value: float = 0.2
    """PPO: how far a value estimate may move from the rollout's before its loss is clipped."""
    vf_coef: float = 0.1
    """PPO: weight of the value loss beside the policy loss."""
    gamma: float = 1.0
    """PPO: discount of later tokens' rewards in the advantages."""
    lam: float = 0.95
    """PPO: lambda of generalised advantage estimation."""
    whiten_advantages: bool = True
    """PPO: normalise each batch's advantages to mean 0 and variance 1."""
    dpo_beta: float = 0.1
    """DPO: inverse temperature of the preference loss (how strongly the policy stays near the reference)."""
    eval_prompts: int = 16
    """Prompts sampled (with a fixed seed) to evaluate a candidate version."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm before each step."""


@dataclass
class ResponseBatch:
    """Prompts with responses, right-padded, plus where each response token's logit sits."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    logit_positions: torch.Tensor
    """[batch, response_length]: the position whose logits predict response token j (its index - 1)."""
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    images_per_row: list[int]
    """How many of pixel_values' images belong to each row, in row order."""

    def select(self, rows: list[int]) -> ResponseBatch:
        """The sub-batch of the given rows, with their images."""
        starts = [sum(self.images_per_row[:row]) for row in range(len(self.images_per_row))]
        images = [i for row in rows for i in range(starts[row], starts[row] + self.images_per_row[row])]
        index = torch.tensor(rows, device=self.input_ids.device)
        return ResponseBatch(
            input_ids=self.input_ids[index], attention_mask=self.attention_mask[index],
            pixel_values=self.pixel_values[torch.tensor(images, device=self.input_ids.device)] if images else None,
            logit_positions=self.logit_positions[index], response_ids=self.response_ids[index],
            response_mask=self.response_mask[index], images_per_row=[self.images_per_row[row] for row in rows],
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            inputs["pixel_values"] = self.pixel_values
        return inputs


@dataclass
class Rollouts:
    """Responses sampled from the current policy, with everything an on-policy update needs."""

    prompts: list[Prompt]
    """One per sample: each prompt repeated samples_per_prompt times, consecutively."""
    samples: list[Sample]
    batch: ResponseBatch
    old_logprobs: torch.Tensor
    """[batch, response_length] behaviour log-probs, as sampled."""
    ref_logprobs: torch.Tensor
    scores: torch.Tensor
    """[batch] reward-model scores, minus the missing-EOS penalty."""
    kl: torch.Tensor
    """[batch, response_length] k1 KL estimate to the reference, zero on padding."""


class TokenValues(torch.nn.Module):
    """PPO's critic: a reward model whose scalar head reads every position, not only the last."""

    def __init__(self, model: RewardModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, logit_positions: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """[batch, response_length] values at the positions that precede each response token."""
        hidden = self.model.backbone.base_model(**inputs, use_cache=False).last_hidden_state
        index = logit_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return self.model.head(hidden.gather(1, index).to(self.model.head.weight.dtype)).squeeze(-1).float()


class Learner:
    """The models and one round of learning. Under torchrun (world_size > 1) the trained modules are
    wrapped in DistributedDataParallel: every rank takes the same number of steps on its own shard of
    the (identical, gathered) pairs or on its own rollouts, and the gradients are averaged, so the
    models stay identical on every rank."""

    def __init__(self, config: LearnerConfig, blobs: BlobStore, rank: int = 0, world_size: int = 1) -> None:
        self.config = config
        self.blobs = blobs
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(config.device)
        self.policy, self.processor = self._starting_policy()
        self.reference = copy.deepcopy(self.policy).requires_grad_(False)
        self.published_policy = copy.deepcopy(self.policy).requires_grad_(False)
        if config.reward_model_dir:
            self.reward_model = RewardModel.load(config.reward_model_dir).to(self.device)
        else:
            self.reward_model = RewardModel(copy.deepcopy(self.policy), self.processor, seed=config.seed).to(self.device).eval()
        # PPO's critic starts as a copy of the reward model (its head then reads every position); when the
        # reward model starts untrained, the copy is taken again after its first round of training.
        self.value_model = copy.deepcopy(self.reward_model) if config.algorithm == "ppo" else None
        self.critic_from_trained_reward_model = bool(config.reward_model_dir)
        self.policy_optimizer = torch.optim.AdamW(self.policy.parameters(), lr=config.policy_lr, weight_decay=0.0)
        self.reward_optimizer = torch.optim.AdamW(self.reward_model.parameters(), lr=config.reward_lr, weight_decay=0.0)
        self.value_optimizer = (
            torch.optim.AdamW(self.value_model.parameters(), lr=config.policy_lr, weight_decay=0.0)
            if self.value_model is not None else None
        )
        self.critic = TokenValues(self.value_model) if self.value_model is not None else None
        self.training_policy, self.training_reward_model, self.training_critic = (
            self._data_parallel(module) for module in (self.policy, self.reward_model, self.critic)
        )
        # Draws every rank makes alike (the order of the shared pairs), and draws of this rank's own
        # (its rollouts), re-derived from the shared one each round so that one RNG state is checkpointed.
        self.shared_rng = random.Random(config.seed)
        self.rank_rng = random.Random(f"{config.seed}-{rank}")
        self.unsampleable_token_ids = PolicyEngine(self.policy, self.processor).unsampleable_token_ids
        self._reserved_tokens = sorted({
            token for tokenizer in (self.processor.tokenizer, self.reward_model.processor.tokenizer)
            for token in (*tokenizer.all_special_tokens, *tokenizer.added_tokens_encoder)
        })
        self._max_positions = min(
            self.reward_model.max_positions, self.policy.config.get_text_config().max_position_embeddings
        )
        self._images: OrderedDict[str, Image.Image] = OrderedDict()

    def _data_parallel(self, module: torch.nn.Module | None) -> torch.nn.Module | None:
        if module is None or self.world_size == 1:
            return module
        # Unused parameters: the reward model's backbone keeps an LM head it never calls.
        return torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)

    def shard(self, items: list[T]) -> list[T]:
        """This rank's share of a list every rank holds alike."""
        return items[self.rank::self.world_size]

    def parameter_digest(self) -> str:
        """A short hash of every trained weight: equal on every rank while they stay in step."""
        digest = hashlib.sha256()
        for module in (self.policy, self.reward_model, self.value_model):
            for tensor in (module.state_dict().values() if module is not None else ()):
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def _starting_policy(self) -> tuple[PreTrainedModel, ProcessorMixin]:
        if self.config.policy_model_dir:
            return load_policy(self.config.policy_model_dir, device=self.device)
        model, processor = build_default_policy(self.config.seed)
        return model.to(self.device), processor

    # --- the round ------------------------------------------------------------------------------

    def learn(self, pairs: list[PreferencePair], prompts: list[Prompt]) -> dict[str, float]:
        """One round: the reward model on the pairs, then the policy. Pairs must be usable (see
        unusable_reason) and, under torchrun, the same list on every rank, a multiple of world_size long."""
        from modalign.trainer.algorithms import ALGORITHMS

        self.rank_rng.seed(f"{self.shared_rng.getrandbits(64)}-{self.rank}")
        metrics = self.train_reward_model(pairs)
        if self.value_model is not None and not self.critic_from_trained_reward_model:
            self.value_model.load_state_dict(self.reward_model.state_dict())
            self.value_optimizer.state.clear()
            self.critic_from_trained_reward_model = True
        metrics |= ALGORITHMS[self.config.algorithm](self, pairs, prompts)
        return metrics

    def unusable_reason(self, pair: PreferencePair) -> str | None:
        """Why neither the reward model nor DPO can take this pair, or None when they can.

        An edit is free user text: a reserved token in it ("<image>", "</s>") would be read as a control
        token (the reward model refuses it; the policy would see an image slot without an image), and an
        8 KiB edit can exceed the models' positions. Either would fail the whole round, again on every retry.
        """
        tokenizer = self.processor.tokenizer
        for name, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            forged = [token for token in self._reserved_tokens if token in response.text]
            if forged:
                return f"{name} response contains reserved token(s) {forged}"
            response_length = len(tokenizer(response.text, add_special_tokens=False).input_ids)
            if len(pair.prompt.prompt_token_ids) + response_length + 1 > self._max_positions:
                return f"{name} response is too long for the models' {self._max_positions} positions"
        return None

    def train_reward_model(self, pairs: list[PreferencePair]) -> dict[str, float]:
        if not pairs:
            return {}
        losses, accuracies = [], []
        for _ in range(self.config.reward_epochs):
            for batch in self.shared_minibatches(pairs, self.config.reward_batch_size):
                chosen, rejected = self.pair_rewards(batch, self.training_reward_model)
                margins = torch.tensor([p.margin for p in batch], dtype=chosen.dtype, device=chosen.device)
                loss = bradley_terry_loss(chosen, rejected, margin=margins)
                self.step(loss, (self.reward_model, self.reward_optimizer))
                losses.append(loss.item())
                accuracies.append(preference_accuracy(chosen.detach(), rejected.detach()).item())
        return {"rm_loss": _mean(losses), "rm_train_accuracy": _mean(accuracies)}

    def shared_minibatches(self, items: list[T], size: int) -> list[list[T]]:
        """Minibatches of `size` per rank from a list every rank holds alike, shuffled alike on every rank;
        each rank gets its shard of each, so all ranks take the same number of steps."""
        order = list(range(len(items)))
        self.shared_rng.shuffle(order)
        step = size * self.world_size
        return [self.shard([items[i] for i in order[start:start + step]]) for start in range(0, len(order), step)]

    def pair_rewards(
        self, pairs: list[PreferencePair], model: torch.nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward-model scores of (chosen, rejected) for each pair, in one forward pass of model (by
        default the reward model itself; the data-parallel wrapper when training)."""
        prompts = [p.prompt.prompt_text for p in pairs] * 2
        images = [self.images(p.prompt.images) for p in pairs] * 2
        responses = [p.chosen.text for p in pairs] + [p.rejected.text for p in pairs]
        inputs = self.reward_model.encode(prompts, images, responses).to(self.device)
        rewards = (model or self.reward_model)(**inputs)
        return rewards[: len(pairs)], rewards[len(pairs):]

    @torch.no_grad()
    def score(self, prompts: list[Prompt], samples: list[Sample]) -> torch.Tensor:
        """Reward-model scores [batch] of sampled responses to prompts (one prompt per sample)."""
        inputs = self.reward_model.encode(
            [p.text for p in prompts], [self.prompt_images(p) for p in prompts], [s.text for s in samples]
        ).to(self.device)
        return self.reward_model(**inputs).float()

    # --- rollouts and batches -------------------------------------------------------------------

    def rollout(
        self, prompts: list[Prompt], samples_per_prompt: int, seed: int, model: PreTrainedModel | None = None
    ) -> list[Sample]:
        """Samples samples_per_prompt responses to each prompt, grouped by prompt, with behaviour log-probs."""
        engine = PolicyEngine(model or self.policy, self.processor)
        params = SamplingParams(
            temperature=self.config.rollout_temperature, top_p=1.0, max_new_tokens=self.config.max_new_tokens
        )
        requests = [
            GenerationRequest(
                prompt_text=format_prompt(self.processor, prompt.text, len(prompt.image_sha256)),
                images=self.prompt_images(prompt),
                params=SamplingParams(**{**params.__dict__, "seed": seed + index * samples_per_prompt}),
                n=samples_per_prompt,
            )
            for index, prompt in enumerate(prompts)
        ]
        return [sample for samples in engine.generate(requests) for sample in samples]

    def on_policy_updates(
        self, prompts: list[Prompt], update: Callable[[Rollouts], dict[str, list[float]]]
    ) -> dict[str, float]:
        """Runs policy_updates_per_round times: fresh rollouts, then update(rollouts). Returns mean metrics."""
        history: dict[str, list[float]] = defaultdict(list)
        for _ in range(self.config.policy_updates_per_round):
            rollouts = self.collect_rollouts(prompts)
            # Every rank updates or none does: a rank with no prompts yet (its view of the generations
            # topic lags) must not leave the others waiting in a gradient all-reduce.
            if not all(distributed.all_gather(rollouts is not None)):
                break
            for name, values in (update(rollouts) | rollout_metrics(rollouts)).items():
                history[name] += values
        return summarise(history)

    @torch.no_grad()
    def collect_rollouts(self, prompts: list[Prompt]) -> Rollouts | None:
        """Samples samples_per_prompt responses to rollout_prompts prompts drawn from traffic, and scores them."""
        chosen = self.sample_prompts(prompts, self.config.rollout_prompts)
        if not chosen:
            return None
        k = self.config.samples_per_prompt
        samples = self.rollout(chosen, k, seed=self.rank_rng.getrandbits(31))
        per_sample = [prompt for prompt in chosen for _ in range(k)]
        batch = self.samples_batch(per_sample, samples)
        old_logprobs = self.behaviour_logprobs(samples, like=batch.response_mask)
        ref_logprobs = self.response_logprobs(self.reference, batch)
        has_eos = torch.tensor([s.finish_reason == "stop" for s in samples], device=self.device)
        scores = penalize_missing_eos(self.score(per_sample, samples), has_eos, self.config.missing_eos_penalty)
        kl = kl_k1(old_logprobs, ref_logprobs) * batch.response_mask
        return Rollouts(per_sample, samples, batch, old_logprobs, ref_logprobs, scores, kl)

    def sample_prompts(self, prompts: list[Prompt], count: int, rng: random.Random | None = None) -> list[Prompt]:
        rng = rng or self.rank_rng
        return [rng.choice(prompts) for _ in range(count)] if prompts else []

    def response_batch(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]], images: list[list[Image.Image]]
    ) -> ResponseBatch:
        pad = self.processor.tokenizer.pad_token_id
        rows = len(prompt_ids)
        length = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
        width = max(1, max(len(r) for r in response_ids))
        input_ids = torch.full((rows, length), pad, dtype=torch.long)
        attention_mask = torch.zeros((rows, length), dtype=torch.long)
        logit_positions = torch.zeros((rows, width), dtype=torch.long)
        response = torch.full((rows, width), pad, dtype=torch.long)
        response_mask = torch.zeros((rows, width), dtype=torch.bool)
        for row, (prompt, answer) in enumerate(zip(prompt_ids, response_ids)):
            sequence = list(prompt) + list(answer)
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
            logit_positions[row, : len(answer)] = torch.arange(len(prompt) - 1, len(sequence) - 1)
            response[row, : len(answer)] = torch.tensor(answer, dtype=torch.long)
            response_mask[row, : len(answer)] = True
        flat_images = [image for row_images in images for image in row_images]
        pixel_values = (
            self.processor.image_processor(flat_images, return_tensors="pt")["pixel_values"] if flat_images else None
        )
        return ResponseBatch(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            pixel_values=pixel_values.to(self.device, self.policy.dtype) if pixel_values is not None else None,
            logit_positions=logit_positions.to(self.device), response_ids=response.to(self.device),
            response_mask=response_mask.to(self.device), images_per_row=[len(row_images) for row_images in images],
        )

    def samples_batch(self, prompts: list[Prompt], samples: list[Sample]) -> ResponseBatch:
        return self.response_batch(
            [s.prompt_token_ids for s in samples], [s.token_ids for s in samples], [self.prompt_images(p) for p in prompts]
        )

    def response_logits(self, model: PreTrainedModel, batch: ResponseBatch) -> torch.Tensor:
        """[batch, response_length, vocab] logits that predict each response token."""
        logits = model(**batch.model_inputs(), use_cache=False).logits
        index = batch.logit_positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
        # The same distribution the engine samples from, so importance ratios start at exactly 1.
        return mask_unsampleable(logits.gather(1, index).float(), self.unsampleable_token_ids)

    def behaviour_logprobs(self, samples: list[Sample], like: torch.Tensor) -> torch.Tensor:
        """The rollout's own log-probs [batch, response_length], zero-padded to the shape of `like`."""
        padded = torch.zeros(like.shape, dtype=torch.float32)
        for row, sample in enumerate(samples):
            padded[row, : len(sample.logprobs)] = torch.tensor(sample.logprobs)
        return padded.to(like.device)

    def response_logprobs(self, model: PreTrainedModel, batch: ResponseBatch, temperature: float | None = None) -> torch.Tensor:
        """[batch, response_length] log-probs of the response tokens, at the rollout temperature by default."""
        return self.logprobs_from_logits(self.response_logits(model, batch), batch, temperature)

    def logprobs_from_logits(
        self, logits: torch.Tensor, batch: ResponseBatch, temperature: float | None = None
    ) -> torch.Tensor:
        """Log-probs of batch's response tokens under logits; 0 on padding (whose pad token is -inf)."""
        temperature = self.config.rollout_temperature if temperature is None else temperature
        logprobs = token_logprobs(logits, batch.response_ids, temperature=temperature)
        return torch.where(batch.response_mask, logprobs, 0.0)

    def token_values(self, batch: ResponseBatch) -> torch.Tensor:
        """[batch, response_length] critic values at the positions that precede each response token."""
        return self.training_critic(logit_positions=batch.logit_positions, **batch.model_inputs())

    def step(self, loss: torch.Tensor, *updates: tuple[torch.nn.Module, torch.optim.Optimizer]) -> None:
        """One optimiser step of each (model, optimizer) on loss, gradients clipped per model."""
        for _, optimizer in updates:
            optimizer.zero_grad()
        loss.backward()
        for model, optimizer in updates:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.max_grad_norm)
            optimizer.step()

    def images(self, refs: Any) -> list[Image.Image]:
        return [self._image(ref.sha256) for ref in refs]

    def prompt_images(self, prompt: Prompt) -> list[Image.Image]:
        return [self._image(sha) for sha in prompt.image_sha256]

    def _image(self, sha256: str) -> Image.Image:
        if sha256 not in self._images:
            self._images[sha256] = Image.open(io.BytesIO(self.blobs.get(sha256))).convert("RGB")
            while len(self._images) > 1024:
                self._images.popitem(last=False)
        self._images.move_to_end(sha256)
        return self._images[sha256]

    # --- evaluation, versions, state ------------------------------------------------------------

    @torch.no_grad()
    def heldout_accuracy(self, heldout: list[PreferencePair]) -> dict[str, float]:
        """The reward model's accuracy on held-out pairs: how often it prefers what the user preferred."""
        if not heldout:
            return {}
        chosen, rejected = [], []
        for start in range(0, len(heldout), 64):
            c, r = self.pair_rewards(heldout[start:start + 64])
            chosen.append(c)
            rejected.append(r)
        return {
            "rm_heldout_accuracy": preference_accuracy(torch.cat(chosen), torch.cat(rejected)).item(),
            "rm_heldout_pairs": float(len(heldout)),
        }

    @torch.no_grad()
    def evaluate(self, heldout: list[PreferencePair], prompts: list[Prompt]) -> dict[str, float]:
        """What the gate decides on: held-out RM accuracy, and the candidate's samples against the last
        published version's on the same prompts and seeds (reward, KL to the reference, length)."""
        metrics = self.heldout_accuracy(heldout)
        eval_prompts = self.sample_prompts(prompts, self.config.eval_prompts, random.Random(12345))
        if not eval_prompts:
            return metrics
        candidate = self.rollout(eval_prompts, 1, seed=777)
        published = self.rollout(eval_prompts, 1, seed=777, model=self.published_policy)
        candidate_reward = self.score(eval_prompts, candidate).mean().item()
        published_reward = self.score(eval_prompts, published).mean().item()
        batch = self.samples_batch(eval_prompts, candidate)
        logprobs = self.response_logprobs(self.policy, batch)
        ref_logprobs = self.response_logprobs(self.reference, batch)
        kl = ((logprobs - ref_logprobs) * batch.response_mask).sum(-1).mean().item()
        candidate_length = _mean([len(s.token_ids) for s in candidate])
        published_length = _mean([len(s.token_ids) for s in published])
        metrics |= {
            "reward_mean": candidate_reward,
            "reward_gain": candidate_reward - published_reward,
            "kl_to_reference": kl,
            "response_length_mean": candidate_length,
            "length_ratio": candidate_length / max(published_length, 1.0),
            "eos_rate": _mean([s.finish_reason == "stop" for s in candidate]),
        }
        return metrics

    def accept_candidate(self) -> None:
        """The gate passed: the current policy becomes the baseline of the next evaluation."""
        self.published_policy.load_state_dict(self.policy.state_dict())

    def revert_policy(self) -> None:
        """The gate refused the candidate: continue from the last published policy."""
        self.policy.load_state_dict(self.published_policy.state_dict())
        self.policy_optimizer.state.clear()

    def reset_policy(self, folder: Path | None) -> None:
        """Start again from a published policy (its folder; None: the starting policy, the reference)."""
        weights = (load_policy(folder, device=self.device)[0] if folder is not None else self.reference).state_dict()
        self.policy.load_state_dict(weights)
        self.published_policy.load_state_dict(weights)
        self.policy_optimizer.state.clear()

    def export_policy(self, folder: Path) -> None:
        save_policy(self.policy, self.processor, folder)

    def export_reward(self, folder: Path) -> None:
        self.reward_model.save(folder)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "policy": self.policy.state_dict(),
            "published_policy": self.published_policy.state_dict(),
            "reward_model": self.reward_model.state_dict(),
            "policy_optimizer": self.policy_optimizer.state_dict(),
            "reward_optimizer": self.reward_optimizer.state_dict(),
            "shared_rng": self.shared_rng.getstate(),
        }
        if self.value_model is not None:
            state |= {"value_model": self.value_model.state_dict(), "value_optimizer": self.value_optimizer.state_dict(),
                      "critic_from_trained_reward_model": self.critic_from_trained_reward_model}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.published_policy.load_state_dict(state["published_policy"])
        self.reward_model.load_state_dict(state["reward_model"])
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.reward_optimizer.load_state_dict(state["reward_optimizer"])
        self.shared_rng.setstate(state["shared_rng"])
        if self.value_model is not None:
            self.value_model.load_state_dict(state["value_model"])
            self.value_optimizer.load_state_dict(state["value_optimizer"])
            self.critic_from_trained_reward_model = state["critic_from_trained_reward_model"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarise(history: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each metric recorded over an update's minibatches."""
    return {name: _mean(values) for name, values in history.items() if values}


def rollout_metrics(rollouts: Rollouts) -> dict[str, list[float]]:
    return {
        "reward_mean": [rollouts.scores.mean().item()],
        "kl": [rollouts.kl.sum(-1).mean().item()],
        "response_length_mean": [rollouts.batch.response_mask.sum(-1).float().mean().item()],
    }
