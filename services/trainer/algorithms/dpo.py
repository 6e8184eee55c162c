"""DPO on logged preference pairs: off-policy, no reward model in the policy update.

The pairs are exactly what users judged: logged responses (their token ids as generated) and edits
(the corrected text, tokenised here). Log-probs are at temperature 1, the policy's own distribution,
which is what DPO's implicit reward is defined on.
"""

from __future__ import annotations

import torch

from modalign.trainer.algorithms import register_algorithm
from modalign.trainer.join import PreferencePair, Response
from modalign.trainer.learner import Learner, Prompt
from modalign.trainer.losses import dpo_loss


def response_token_ids(learner: Learner, response: Response) -> list[int]:
    if response.token_ids is not None:
        return list(response.token_ids)
    tokenizer = learner.processor.tokenizer
    return tokenizer(response.text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


@register_algorithm("dpo")
def dpo(learner: Learner, pairs: list[PreferencePair], prompts: list[Prompt]) -> dict[str, float]:
    config = learner.config
    if not pairs:
        return {}
    losses, accuracies, margins = [], [], []
    for _ in range(config.policy_epochs):
        for chunk in learner.shared_minibatches(pairs, config.minibatch_size):
            prompt_ids = [list(p.prompt.prompt_token_ids) for p in chunk] * 2
            answers = [response_token_ids(learner, p.chosen) for p in chunk] + [
                response_token_ids(learner, p.rejected) for p in chunk
            ]
            images = [learner.images(p.prompt.images) for p in chunk] * 2
            batch = learner.response_batch(prompt_ids, answers, images)
            logps = learner.response_logprobs(learner.training_policy, batch, temperature=1.0).sum(-1)
            with torch.no_grad():
                ref = learner.response_logprobs(learner.reference, batch, temperature=1.0).sum(-1)
            n = len(chunk)
            result = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=config.dpo_beta)
            loss = result.losses.mean()
            learner.step(loss, (learner.policy, learner.policy_optimizer))
            losses.append(loss.item())
            accuracies.append((result.chosen_rewards > result.rejected_rewards).float().mean().item())
            margins.append((result.chosen_rewards - result.rejected_rewards).mean().item())
    return {
        "dpo_loss": sum(losses) / len(losses),
        "dpo_reward_accuracy": sum(accuracies) / len(accuracies),
        "dpo_reward_margin": sum(margins) / len(margins),
    }
