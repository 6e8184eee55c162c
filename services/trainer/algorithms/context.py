"""PolicyContext: everything a policy algorithm may use, and nothing else.

The learner builds one and hands it to the algorithm each round. Keeping it narrow keeps the
algorithms readable top to bottom and lets the learner's insides change without touching them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, TypeVar

import torch

from modalign.trainer import distributed
from modalign.trainer.batches import Prompt, ResponseBatch, ResponseBatches
from modalign.trainer.distributed import Shards
from modalign.trainer.join import PreferencePair
from modalign.trainer.kl import KLController
from modalign.trainer.losses import chosen_nll
from modalign.trainer.metrics import History, mean
from modalign.trainer.models import Models, optimizer_step
from modalign.trainer.sampling import Episodes, Sampler

if TYPE_CHECKING:
    from modalign.trainer.learner import LearnerConfig

T = TypeVar("T")


@dataclass(frozen=True)
class PolicyContext:
    config: LearnerConfig
    """The hyper-parameters (--learner.*)."""
    batches: ResponseBatches
    """Builds response batches (of samples, of preference pairs) and reads logits and log-probs off them."""
    policy: torch.nn.Module
    """The policy to run forward passes through when training (the data-parallel wrapper under torchrun)."""
    reference: torch.nn.Module
    """The frozen starting policy."""
    rng: random.Random
    """This rank's RNG, for minibatch order (re-seeded each round from the checkpointed shared RNG)."""
    kl: KLController
    """The KL penalty's coefficient (kl.coef), fixed or adapted to a target after every batch of episodes."""
    _models: Models = field(repr=False)
    _sampler: Sampler = field(repr=False)
    _shards: Shards = field(repr=False)

    def step(self, loss: torch.Tensor, *, critic: bool = False) -> None:
        """One optimiser step of the policy (and the critic) on loss, gradients clipped per model."""
        models = self._models
        updates = [(models.policy, models.policy_optimizer)]
        if critic:
            updates.append((models.value_model, models.value_optimizer))
        optimizer_step(loss, self.config.max_grad_norm, *updates)

    def values(self, batch: ResponseBatch) -> torch.Tensor:
        """[batch, response_length] critic values at the positions that precede each response token
        (through the data-parallel wrapper); only for algorithms registered with uses_critic."""
        critic = self._models.training_critic
        if critic is None:
            raise RuntimeError("this algorithm did not register with uses_critic: the learner built no critic")
        return critic(logit_positions=batch.logit_positions, **batch.inputs)

    def on_policy_updates(self, prompts: list[Prompt], update: Callable[[Episodes], History]) -> dict[str, float]:
        """policy_updates_per_round times: fresh episodes sampled from the policy, then update(episodes),
        which returns its metrics per minibatch. Returns the means, with the episodes' reward, KL and length,
        and the KL coefficient each batch was penalised with."""
        def update_then_adapt_kl(episodes: Episodes) -> History:
            history = update(episodes)
            history["kl_coef"].append(self.kl.coef)
            # Every rank's batch, so that every rank moves the coefficient alike.
            kls = distributed.all_gather(episodes.kl.sum(-1).mean().item())
            self.kl.observe(mean(kls), len(episodes.samples) * len(kls))
            return history

        return self._sampler.on_policy_updates(prompts, update_then_adapt_kl)

    def users_answers_sft(self, pairs: list[PreferencePair], history: History) -> torch.Tensor:
        """--learner.sft-weight times the negative log-likelihood per token of users' chosen answers, on a
        minibatch of the round's pairs drawn by this rank (InstructGPT's PPO-ptx term, its data what users
        chose or wrote), to add to an on-policy step's loss; recorded in history as sft_loss. A zero when
        the weight is 0 or the round has no pairs (every rank holds the same pairs, so all or none compute it)."""
        if not self.config.sft_weight or not pairs:
            return torch.zeros((), device=self._models.device)
        batch = self.batches.of_chosen(self.rng.sample(pairs, min(len(pairs), self.config.minibatch_size)))
        # At temperature 1: the likelihood of the policy's own distribution, as in DPO's SFT term.
        logprobs = self.batches.logprobs(self.policy, batch, temperature=1.0)
        nll = chosen_nll(logprobs.sum(-1), batch.response_mask.sum(-1))
        history["sft_loss"].append(nll.item())
        return self.config.sft_weight * nll

    def shared_minibatches(self, items: list[T], size: int, length: Callable[[T], int] | None = None) -> list[list[T]]:
        """Minibatches of a list every rank holds alike (e.g. the round's pairs): this rank's share of each;
        with length, of items of about one length (Shards.shared_minibatches)."""
        return self._shards.shared_minibatches(items, size, length)
