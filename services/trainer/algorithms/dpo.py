"""DPO on logged preference pairs: off-policy, no reward model in the policy update.

The pairs are exactly what users judged: logged responses (their token ids as generated) and edits
(the corrected text, tokenised). Log-probs are at temperature 1, the policy's own distribution,
which is what DPO's implicit reward is defined on. With --learner.sft-weight the loss adds RPO's SFT
term on the chosen responses, so that DPO does not lower the likelihood of what users chose along with
what they rejected.
"""

from __future__ import annotations

import torch

from modalign.trainer.algorithms import register_algorithm
from modalign.trainer.algorithms.context import PolicyContext
from modalign.trainer.batches import Prompt
from modalign.trainer.join import PreferencePair
from modalign.trainer.logprobs import sequence_logprobs
from modalign.trainer.losses import chosen_nll, dpo_loss
from modalign.trainer.metrics import mean


@register_algorithm("dpo")
def dpo(ctx: PolicyContext, pairs: list[PreferencePair], prompts: list[Prompt]) -> dict[str, float]:
    config = ctx.config
    if not pairs:
        return {}
    losses, accuracies, margins = [], [], []
    for _ in range(config.policy_epochs):
        for chunk in ctx.shared_minibatches(pairs, config.minibatch_size, length=ctx.batches.pair_width):
            batch = ctx.batches.of_pairs(chunk)  # the chosen responses' rows, then the rejected ones'
            logps = sequence_logprobs(ctx.batches.logits(ctx.policy, batch), batch.response_ids, batch.response_mask)
            with torch.no_grad():
                ref = sequence_logprobs(ctx.batches.logits(ctx.reference, batch), batch.response_ids,
                                        batch.response_mask)
            n = len(chunk)
            result = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=config.dpo_beta)
            loss = result.losses.mean()
            if config.sft_weight:
                loss = loss + config.sft_weight * chosen_nll(logps[:n], batch.response_mask[:n].sum(-1))
            ctx.step(loss)
            losses.append(loss.item())
            accuracies.append((result.chosen_rewards > result.rejected_rewards).float().mean().item())
            margins.append((result.chosen_rewards - result.rejected_rewards).mean().item())
    return {"dpo_loss": mean(losses), "dpo_reward_accuracy": mean(accuracies), "dpo_reward_margin": mean(margins)}
