"""The learner: one round of learning from preference pairs, put together from its parts.

Each round the reward model learns from the new pairs (reward_learning.py), then the policy is updated
by the configured algorithm (algorithms/: "ppo", "a2c", "rloo", "grpo", "dpo", registered by name), which
receives a PolicyContext: exactly what it may use. The parts, one idea each:
  models.py          the models, their optimisers and checkpoint state
  batches.py         response batches, the image cache, log-probs
  sampling.py        on-policy sampling: episodes from the current policy
  reward_learning.py the reward model's training and scores
  evaluation.py      the candidate against the published version, for the gate
Under torchrun (world_size > 1) every rank takes the same number of steps on its own shard of the
(identical, gathered) pairs or on its own episodes, and DistributedDataParallel averages the
gradients, so the models stay identical on every rank; or FSDP2 shards them (--learner.sharding
fsdp; models.py says how sampling and evaluation run then).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from modalign.core.blobs import BlobStore
from modalign.core.config import DTYPES, ConfigError, require_one_of
from modalign.policy.engine import PolicyEngine
from modalign.policy.families import audio_sampling_rate
from modalign.reward.config import BACKBONES
from modalign.trainer.advantages import GRPO_REWARD_SCALES
from modalign.trainer.algorithms import ALGORITHMS
from modalign.trainer.algorithms.context import PolicyContext
from modalign.trainer.batches import MediaCache, Prompt, ResponseBatches
from modalign.trainer.distributed import Shards
from modalign.trainer.evaluation import evaluate_candidate
from modalign.trainer.join import PreferencePair
from modalign.trainer.kl import KLController
from modalign.trainer.lora import LoraSettings
from modalign.trainer.models import SHARDINGS, Models, max_positions, reserved_tokens
from modalign.trainer.reward_learning import RewardLearning
from modalign.trainer.sampling import Sampler


@dataclass(frozen=True)
class LearnerConfig:
    """What the trainer learns and how."""

    algorithm: str = "rloo"
    """Policy optimisation: "ppo", "a2c", "rloo", "grpo" or "dpo" (the names registered in trainer/algorithms)."""
    policy_model_dir: str = ""
    """The starting policy (and the frozen reference); empty builds the default small policy."""
    reward_model_dir: str = ""
    """The starting reward model: a saved one, or a fresh head on a checkpoint folder (a CLIP one for the
    clip backbone, an image-text-to-text one for the generative backbone: e.g. a model fine-tuned for
    grounding rather than the policy's style); empty builds a fresh one of --learner.reward-backbone on
    a copy of the starting policy."""
    reward_backbone: str = "generative"
    """The reward model's backbone: "generative" (the policy's kind of VLM reads prompt, images and response
    together; the default) or "clip" (a CLIP dual encoder: cheaper, less exact; see docs/models.md)."""
    seed: int = 0
    """Seed of the models' initialisation, of sampling and of batch order."""
    device: str = "cpu"
    """Torch device the models train on: cpu, cuda, cuda:1, ..."""
    dtype: str = "float32"
    """Precision of the forward passes: float32, or bfloat16 or float16 under autocast. Weights, gradients
    and optimiser state stay float32 (master weights) whatever this is."""
    reward_lr: float = 3e-4
    """Learning rate of the reward model."""
    reward_epochs: int = 2
    """Passes of the reward model over each round's new (and replayed) pairs."""
    reward_batch_size: int = 16
    """Preference pairs per reward model step."""
    reward_replay: int = 256
    """Earlier training pairs replayed beside each round's new ones when the reward model trains, so it
    keeps what it learned from earlier traffic (0: the new pairs only)."""
    reward_row_cache_mib: float = 256.0
    """Memory for the reward model's encoded rows (token ids, pixel values) of the pairs it scored last, so
    that later epochs, replays and held-out checks do not encode them again (0: encode every time)."""
    policy_lr: float = 3e-4
    """Learning rate of the policy (and of the value head, for PPO and A2C)."""
    lora_rank: int = 0
    """Rank of the LoRA adapter (PEFT) the policy trains instead of its weights: the base stays frozen,
    and the reference is the base with the adapter off rather than a second copy. 0: every weight trains."""
    lora_alpha: float = 16.0
    """With lora_rank: LoRA's alpha (the adapter's update is scaled by alpha / rank)."""
    lora_target_modules: tuple[str, ...] = ()
    """With lora_rank: the layers to adapt (PEFT's target_modules: full names, or the last part of one);
    empty: the attention and MLP projections of the text model (q/k/v/o_proj, gate/up/down_proj)."""
    lora_bits: int = 0
    """With lora_rank: 4 holds the frozen base in 4-bit NF4 (QLoRA, bitsandbytes; it runs on CPUs too),
    computing in float32, while the adapters train in float32; 0 keeps it in float32. Needs
    --learner.reward-lora (a 4-bit weight cannot train, so the reward model and the critic must be
    adapters too). Published versions are adapters on the checkpoint's own float32 base."""
    reward_lora: bool = False
    """With lora_rank: the reward model (and PPO's and A2C's critic) are LoRA adapters of their own on the
    policy's base, each with its own head, instead of copies of the model: the trainer holds one copy of
    the model in all, and gradients and optimiser state for adapters and heads only. Its published
    reward models are the base with the adapter merged in. Needs the generative reward backbone and no
    --learner.reward-model-dir (a reward model of its own is a model of its own)."""
    kl_coef: float = 0.05
    """Weight of the KL penalty against the reference (in the reward for PPO, A2C and RLOO, in the loss for
    GRPO); with kl_target, its starting value and its floor."""
    kl_target: float = 3.0
    """On-policy algorithms: KL to the reference (nats per response) that the KL coefficient is adapted
    toward after every batch (Ziegler et al.'s proportional controller), below the gate's --gate.max-kl so
    that a drifting policy is pulled back before the gate must refuse it; 0 keeps kl_coef fixed."""
    kl_horizon: int = 32
    """With kl_target: responses over which the coefficient may move by up to a fifth (as fast as it
    goes: one batch of sample_prompts x samples_per_prompt responses moves it at most that much)."""
    policy_updates_per_round: int = 2
    """On-policy algorithms: batches of episodes (each followed by policy_epochs of updates, or by A2C's one
    step) per learning round."""
    sample_prompts: int = 8
    """On-policy algorithms: prompts from traffic drawn per batch of episodes."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt (the group of RLOO and GRPO)."""
    sampling_temperature: float = 1.0
    """Temperature of on-policy sampling; the same temperature scores their log-probs in training."""
    max_new_tokens: int = 24
    """Longest rollout and evaluation response, in tokens."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the reward of a sampled response that hit max_new_tokens without EOS."""
    policy_epochs: int = 2
    """Optimisation passes over each batch of episodes (or pairs, for DPO); A2C takes one step per batch."""
    minibatch_size: int = 16
    """Rollouts (or pairs) per policy optimisation step; A2C steps on the whole batch of episodes."""
    cliprange: float = 0.2
    """PPO, RLOO and GRPO: how far the probability ratio may move from 1 before the surrogate is clipped."""
    cliprange_value: float = 0.2
    """PPO: how far a value estimate may move from the rollout's before its loss is clipped."""
    vf_coef: float = 0.1
    """PPO and A2C: weight of the value loss beside the policy loss."""
    gamma: float = 1.0
    """PPO and A2C: discount of later tokens' rewards in the advantages."""
    lam: float = 0.95
    """PPO and A2C: lambda of generalised advantage estimation."""
    whiten_advantages: bool = True
    """PPO and A2C: normalise the GAE advantages over each batch's valid tokens (as TRL's PPO does)."""
    dpo_beta: float = 0.1
    """DPO: inverse temperature of the preference loss (how strongly the policy stays near the reference)."""
    grpo_scale_rewards: str = "group"
    """GRPO: what a group's centred scores are divided by: "group" (its own standard deviation: the paper's
    and TRL's default), "batch" (the whole batch's, as Lite PPO and TRL's scale_rewards="batch": a group
    whose samples differ only by the reward model's noise then moves the policy little) or "none" (Dr. GRPO)."""
    sft_weight: float = 0.0
    """Weight of an SFT term (negative log-likelihood per token) on the answers users chose: the chosen
    responses of the round's pairs, an edit's corrected text among them. DPO adds it on each minibatch's
    chosen responses (RPO; TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, this]): DPO alone can
    lower the likelihood of a chosen answer's tokens along with the rejected one's. The on-policy
    algorithms add it to every update step on a minibatch of the round's chosen responses (InstructGPT's
    PPO-ptx, with users' answers for its data): the reward model's gradient comes from a few dozen samples
    a batch, and this one from what users said directly. 0: the algorithm alone."""
    eval_prompts: int = 16
    """Prompts sampled (with a fixed seed) to evaluate a candidate version."""
    eval_heldout_pairs: int = 512
    """The most recent held-out pairs on which a candidate's shift toward users' preferences is measured
    against the published policy (the gate's reward-hacking check)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm before each step."""
    sharding: str = "ddp"
    """Under torchrun: "ddp" (every rank holds every weight, gradients averaged) or "fsdp" (FSDP2: the
    trained models' weights, gradients and optimiser state split across the ranks, for models whose
    training state does not fit one device; full fine-tuning with the generative reward model)."""

    def validate(self) -> None:
        """Run when the config is parsed or built (core/config.py): an unknown algorithm is refused
        then, naming the known ones, not at the first learning round."""
        require_one_of("dtype", self.dtype, DTYPES)
        require_one_of("reward_backbone", self.reward_backbone, BACKBONES)
        if self.lora_rank < 0:
            raise ConfigError("lora_rank", f"must be 0 (no LoRA) or a positive rank, not {self.lora_rank}")
        if self.reward_lora and not (self.lora_rank and self.reward_backbone == "generative" and not self.reward_model_dir):
            raise ConfigError("reward_lora", "makes the reward model an adapter on the LoRA policy's base: it needs "
                                             "--learner.lora-rank, the generative backbone and no --learner.reward-model-dir")
        if self.lora_bits not in (0, 4):
            raise ConfigError("lora_bits", f"must be 0 (a float32 base) or 4 (QLoRA), not {self.lora_bits}")
        if self.lora_bits and not self.reward_lora:
            raise ConfigError("lora_bits", "a 4-bit base trains adapters only: add --learner.reward-lora, so that the "
                                           "reward model and the critic are adapters on it too")
        require_one_of("sharding", self.sharding, SHARDINGS)
        require_one_of("grpo_scale_rewards", self.grpo_scale_rewards, GRPO_REWARD_SCALES)
        if self.sharding == "fsdp" and (self.lora_rank or self.reward_backbone != "generative"):
            raise ConfigError("sharding", "fsdp shards full fine-tuning with the generative reward model; a LoRA "
                                          "adapter or a CLIP reward model is small enough to train with ddp")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError("algorithm", f"unknown {self.algorithm!r}; the known algorithms are "
                                           f"{', '.join(sorted(ALGORITHMS))}")


class Learner:
    """One round of learning, and evaluation, over the models (self.models: accept, revert, reset,
    export the policy; see models.py)."""

    def __init__(self, config: LearnerConfig, blobs: BlobStore, rank: int = 0, world_size: int = 1) -> None:
        self.config = config
        self.algorithm = ALGORITHMS[config.algorithm]
        device = torch.device(config.device)
        self.models = Models(
            policy_model_dir=config.policy_model_dir, reward_model_dir=config.reward_model_dir,
            reward_backbone=config.reward_backbone, seed=config.seed,
            device=device, policy_lr=config.policy_lr, reward_lr=config.reward_lr,
            with_critic=self.algorithm.uses_critic, world_size=world_size,
            lora=LoraSettings(config.lora_rank, config.lora_alpha, config.lora_target_modules, config.lora_bits)
            if config.lora_rank else None,
            reward_lora=config.reward_lora, sharding=config.sharding,
        )
        models = self.models
        self.shards = Shards(config.seed, rank, world_size)
        self.media = MediaCache(
            blobs, audio_sampling_rate(models.processor),
        )
        self.batches = ResponseBatches(
            models.policy, models.processor, self.media, device,
            unsampleable_token_ids=PolicyEngine(models.policy, models.processor).unsampleable_token_ids,
            sampling_temperature=config.sampling_temperature,
        )
        self.reward = RewardLearning(models, self.media, self.shards, epochs=config.reward_epochs,
                                     batch_size=config.reward_batch_size, max_grad_norm=config.max_grad_norm,
                                     row_cache_bytes=int(config.reward_row_cache_mib * 2**20))
        self.sampler = Sampler(
            policy=models.policy, reference=models.reference, processor=models.processor, batches=self.batches,
            score=self.reward.score, shards=self.shards, temperature=config.sampling_temperature,
            max_new_tokens=config.max_new_tokens, prompts_per_batch=config.sample_prompts,
            samples_per_prompt=config.samples_per_prompt, missing_eos_penalty=config.missing_eos_penalty,
            batches_per_round=config.policy_updates_per_round, gathered=models.gathered,
        )
        self.kl = KLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.policy_context = PolicyContext(
            config=config, batches=self.batches, policy=models.training_policy, reference=models.reference,
            rng=self.shards.rank_rng, kl=self.kl, _models=models, _sampler=self.sampler, _shards=self.shards,
        )
        self._reserved_tokens = reserved_tokens(models.processor, models.reward_model.processor)
        self._max_positions = max_positions(models.policy, models.reward_model)

    def learn(
        self, pairs: list[PreferencePair], prompts: list[Prompt], replay: Sequence[PreferencePair] = ()
    ) -> dict[str, float]:
        """One round: the reward model on the pairs and up to reward_replay of the earlier pairs in
        replay, then the policy on the pairs. Pairs must be usable (see unusable_reason) and, under
        torchrun, pairs and replay the same lists on every rank, pairs a multiple of world_size long."""
        self.shards.new_round()
        # Drawn with the shared RNG, so every rank replays the same pairs; whole shards only, as for pairs.
        count = min(self.config.reward_replay, len(replay))
        replayed = self.shards.shared_rng.sample(list(replay), count - count % self.shards.world_size)
        with self.precision():
            metrics = self.reward.train(pairs + replayed)
            self.models.start_critic_from_trained_reward_model()
            return metrics | self.algorithm.update(self.policy_context, pairs, prompts)

    def unusable_reason(self, pair: PreferencePair) -> str | None:
        """Why neither the reward model nor DPO can take this pair, or None when they can.

        An edit is free user text: a reserved token in it ("<image>", "</s>") would be read as a control
        token (the reward model refuses it; the policy would see an image slot without an image), and an
        8 KiB edit can exceed the models' positions. Either would fail the whole round, again on every retry.
        """
        tokenizer = self.models.processor.tokenizer
        for name, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            forged = [token for token in self._reserved_tokens if token in response.text]
            if forged:
                return f"{name} response contains reserved token(s) {forged}"
            response_length = len(tokenizer(response.text, add_special_tokens=False).input_ids)
            if len(pair.prompt.prompt_token_ids) + response_length + 1 > self._max_positions:
                return f"{name} response is too long for the models' {self._max_positions} positions"
        return None

    def heldout_accuracy(self, heldout: list[PreferencePair]) -> dict[str, float]:
        with self.precision(), self.models.gathered():
            return self.reward.heldout_accuracy(heldout)

    def evaluate(self, heldout: list[PreferencePair], prompts: list[Prompt]) -> dict[str, float]:
        """What the gate decides on (see evaluation.py)."""
        with self.precision(), self.models.gathered():
            return evaluate_candidate(self.models, self.sampler, self.reward, self.batches, heldout, prompts,
                                      self.config.eval_prompts, self.config.eval_heldout_pairs)

    def precision(self) -> torch.autocast:
        """Forward passes in the configured dtype (autocast), the weights staying float32; off for float32."""
        dtype = getattr(torch, self.config.dtype)
        return torch.autocast(self.models.device.type, dtype=dtype, enabled=dtype != torch.float32)

    # --- checkpoint state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON-able values only (trainer/checkpoint.py stores them without pickling)."""
        return self.models.state_dict() | {"shared_rng": self.shards.shared_rng.getstate(), "kl_coef": self.kl.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.models.load_state_dict(state)
        self.shards.shared_rng.setstate(state["shared_rng"])
        self.kl.coef = state.get("kl_coef", self.config.kl_coef)  # checkpoints from before the controller lack it
