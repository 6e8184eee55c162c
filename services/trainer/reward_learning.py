"""The reward model: trained on every round's preference pairs (Bradley-Terry), and used to score responses.

Every rank holds the same pairs and trains on its shard of each minibatch, through the data-parallel
wrapper, so the reward model stays identical on every rank. Margins (from ratings) ask the chosen
response to win by that much.

The same pairs are scored round after round (each round's epochs, the replayed pairs, the held-out pairs
measured every round), so their encoded rows are kept (RewardLearning.rows) rather than encoded again:
benchmarks/reward_rows.py measures what that saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modalign.policy.engine import Sample
from modalign.reward.model import EncodedRow
from modalign.trainer.batches import MediaCache, Prompt, RecentlyUsed
from modalign.trainer.distributed import Shards
from modalign.trainer.join import PreferencePair
from modalign.trainer.losses import bradley_terry_loss, preference_accuracy
from modalign.trainer.metrics import mean
from modalign.trainer.models import Models, optimizer_step


@dataclass(frozen=True)
class EncodedPair:
    """A preference pair with its chosen and rejected rows as the reward model encodes them."""

    pair: PreferencePair
    chosen: EncodedRow
    rejected: EncodedRow

    @property
    def width(self) -> int:
        """Tokens of its longer row: the width it pads a minibatch to."""
        return max(self.chosen.length, self.rejected.length)


class RewardLearning:
    def __init__(self, models: Models, media: MediaCache, shards: Shards, *, epochs: int, batch_size: int,
                 max_grad_norm: float, row_cache_bytes: int) -> None:
        self.models, self.media, self.shards = models, media, shards
        self.epochs, self.batch_size, self.max_grad_norm = epochs, batch_size, max_grad_norm
        # Kept within row_cache_bytes: with a small model, encoding a row (tokenising it, processing its images)
        # costs about half as much as scoring it.
        self.rows: RecentlyUsed[tuple[Prompt, str], EncodedRow] = RecentlyUsed(row_cache_bytes, lambda row: row.nbytes)

    def train(self, pairs: list[PreferencePair]) -> dict[str, float]:
        """`epochs` passes over the pairs, each row encoded once, in minibatches of pairs of about one width
        (Shards.shared_minibatches); every rank takes as many steps."""
        if not pairs:
            return {}
        models = self.models
        encoded = self.encode(pairs)
        losses, accuracies = [], []
        for _ in range(self.epochs):
            for batch in self.shards.shared_minibatches(encoded, self.batch_size, length=lambda one: one.width):
                chosen, rejected = self.rewards(batch, models.training_reward_model)
                margins = torch.tensor([one.pair.margin for one in batch], dtype=chosen.dtype, device=chosen.device)
                loss = bradley_terry_loss(chosen, rejected, margin=margins)
                optimizer_step(loss, self.max_grad_norm, (models.reward_model, models.reward_optimizer))
                losses.append(loss.item())
                accuracies.append(preference_accuracy(chosen.detach(), rejected.detach()).item())
        return {"rm_loss": mean(losses), "rm_train_accuracy": mean(accuracies)}

    def encode(self, pairs: list[PreferencePair]) -> list[EncodedPair]:
        """The pairs' rows (kept ones taken as kept); errors name chosen rows 0 to n - 1, rejected n to 2n - 1."""
        reward_model = self.models.reward_model

        def row(number: int, prompt: Prompt, response: str) -> EncodedRow:
            def encode() -> EncodedRow:
                media = self.media.of_prompt(prompt)
                return reward_model.encode_row(number, prompt.conversation, media.images, response, media.audio)
            return self.rows.get((prompt, response), encode)

        prompts = [Prompt.of(pair.prompt) for pair in pairs]
        return [EncodedPair(pair, row(i, prompt, pair.chosen.text), row(len(pairs) + i, prompt, pair.rejected.text))
                for i, (pair, prompt) in enumerate(zip(pairs, prompts))]

    def rewards(self, encoded: list[EncodedPair], model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward-model scores of (chosen, rejected) for each pair, in one forward pass of model (by
        default the reward model itself; the data-parallel wrapper when training)."""
        reward_model = self.models.reward_model
        rows = [one.chosen for one in encoded] + [one.rejected for one in encoded]
        rewards = (model or reward_model)(**reward_model.collate(rows).to(self.models.device))
        return rewards[: len(encoded)], rewards[len(encoded):]

    def pair_rewards(
        self, pairs: list[PreferencePair], model: torch.nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """rewards() of the pairs, encoded."""
        return self.rewards(self.encode(pairs), model)

    @torch.no_grad()
    def score(self, prompts: list[Prompt], samples: list[Sample]) -> torch.Tensor:
        """Reward-model scores [batch] of sampled responses to prompts (one prompt per sample)."""
        reward_model = self.models.reward_model
        media = [self.media.of_prompt(p) for p in prompts]
        inputs = reward_model.encode(
            [p.conversation for p in prompts], [m.images for m in media], [s.text for s in samples],
            audio_per_sample=[m.audio for m in media],
        ).to(self.models.device)
        return reward_model(**inputs).float()

    @torch.no_grad()
    def heldout_accuracy(self, heldout: list[PreferencePair]) -> dict[str, float]:
        """The reward model's accuracy on held-out pairs: how often it prefers what the user preferred,
        over all of them and per feedback kind (rm_heldout_accuracy_preference, _edit, _rating). Users'
        own judgements are noisy, so a perfect model scores below 1: their noise sets the ceiling."""
        if not heldout:
            return {}
        chosen, rejected = [], []
        for start in range(0, len(heldout), 64):
            c, r = self.pair_rewards(heldout[start:start + 64])
            chosen.append(c)
            rejected.append(r)
        right = torch.cat(chosen) > torch.cat(rejected)
        metrics = {"rm_heldout_accuracy": right.float().mean().item(), "rm_heldout_pairs": float(len(heldout))}
        for source in sorted({pair.source for pair in heldout}):
            rows = torch.tensor([pair.source == source for pair in heldout], device=right.device)
            metrics[f"rm_heldout_accuracy_{source}"] = right[rows].float().mean().item()
        return metrics
