"""What the gate decides on: the candidate policy measured against the last published one.

Both sample once per prompt, on the same prompts (drawn with a fixed seed) and the same sampling
seeds, so the comparison carries as little sampling noise as the prompts allow. The reward model's
accuracy on held-out pairs says whether its scores can be trusted at all.

The reward model is what on-policy training optimises, so a gain by its measure can be reward
hacking: the policy found what the model over-rates (length, a phrase) rather than what users want.
The check that does not use the reward model is the users' own held-out judgements: whether the
candidate, compared with the published policy, moved probability toward the sampled responses users
chose and away from those they rejected (preference_shift). A candidate whose reward rises while that
shift is negative beyond its noise is refused by the gate (gate.py).

Users' edits are reference answers for their prompts: BLEU and ROUGE-L of both versions' answers to the
held-out edited prompts, against the edits, give a reference-based score per version, which the gate
can require not to fall (--gate.min-edit-bleu-gain, --gate.min-edit-rouge-l-gain).
"""

from __future__ import annotations

import math
import random

import torch

from modalign.evaluation.metrics import bleu_score, rouge_l
from modalign.trainer.batches import Prompt, ResponseBatches
from modalign.trainer.join import PreferencePair
from modalign.trainer.logprobs import sequence_logprobs
from modalign.trainer.metrics import mean
from modalign.trainer.models import Models
from modalign.trainer.reward_learning import RewardLearning
from modalign.trainer.sampling import Sampler, draw_prompts

PROMPT_SEED = 12345
SAMPLING_SEED = 777


def preference_shift(
    candidate_chosen: torch.Tensor, candidate_rejected: torch.Tensor,
    published_chosen: torch.Tensor, published_rejected: torch.Tensor,
) -> tuple[float, float]:
    """How far a candidate moved toward users' preferences, from sequence log-probs [pairs] of each
    pair's chosen and rejected response under the candidate and the published policy.

    Per pair: (log pi_c(chosen) - log pi_p(chosen)) - (log pi_c(rejected) - log pi_p(rejected)), the
    change in how much more likely the chosen response is than the rejected one (DPO's implicit reward
    margin, with the published policy as reference). Returns its mean (nats; 0 for an unchanged policy)
    and the standard error of that mean (at least two pairs).
    """
    shifts = (candidate_chosen - published_chosen) - (candidate_rejected - published_rejected)
    n = shifts.numel()
    if n < 2:
        raise ValueError(f"a preference shift needs at least two pairs, got {n}")
    return shifts.mean().item(), shifts.std().item() / math.sqrt(n)


@torch.no_grad()
def heldout_preference_shift(
    models: Models, batches: ResponseBatches, heldout: list[PreferencePair], batch_size: int = 32
) -> dict[str, float]:
    """preference_shift of the current policy against the published one on the held-out pairs whose
    responses were both sampled from a policy (preferences, ratings). Edits are left out: an edit is
    the user's own text, whose likelihood falls as any policy sharpens on its own phrasing, which would
    read as a move against users. None is measured with fewer than two pairs: a spread needs two."""
    heldout = [pair for pair in heldout if pair.chosen.token_ids is not None and pair.rejected.token_ids is not None]
    if len(heldout) < 2:
        return {}
    # Per policy: the chosen responses' sequence log-probs, and the rejected ones'.
    logps: dict[torch.nn.Module, tuple[list[torch.Tensor], list[torch.Tensor]]] = {
        models.policy: ([], []), models.published_policy: ([], [])}
    for start in range(0, len(heldout), batch_size):
        pairs = heldout[start:start + batch_size]
        batch = batches.of_pairs(pairs)  # the chosen responses' rows, then the rejected ones'
        for model, (chosen, rejected) in logps.items():
            sequences = sequence_logprobs(batches.logits(model, batch), batch.response_ids, batch.response_mask)
            chosen.append(sequences[:len(pairs)])
            rejected.append(sequences[len(pairs):])
    (candidate_chosen, candidate_rejected), (published_chosen, published_rejected) = (
        (torch.cat(chosen), torch.cat(rejected)) for chosen, rejected in logps.values())
    shift, stderr = preference_shift(candidate_chosen, candidate_rejected, published_chosen, published_rejected)
    return {"preference_shift": shift, "preference_shift_stderr": stderr, "preference_shift_pairs": float(len(heldout))}


@torch.no_grad()
def heldout_edit_overlap(models: Models, sampler: Sampler, heldout: list[PreferencePair], n: int) -> dict[str, float]:
    """BLEU and ROUGE-L of the candidate's and the published version's answers to the prompts of the
    most recent n held-out edits, against the edits: a user's edit is a reference answer for its prompt,
    so this is a live reference-based score per version. Empty without held-out edits."""
    edits = [pair for pair in heldout if pair.source == "edit"][-n:]
    if not edits:
        return {}
    prompts, references = [Prompt.of(pair.prompt) for pair in edits], [[pair.chosen.text] for pair in edits]
    candidate = [s.text for s in sampler.sample(prompts, 1, seed=SAMPLING_SEED)]
    published = [s.text for s in sampler.sample(prompts, 1, seed=SAMPLING_SEED, model=models.published_policy)]
    metrics = {"edit_references": float(len(edits))}
    for name, score in (("edit_bleu", bleu_score), ("edit_rouge_l", lambda a, r: rouge_l(a, r)[0])):
        metrics[name] = score(candidate, references)
        metrics[f"{name}_gain"] = metrics[name] - score(published, references)
    return metrics


@torch.no_grad()
def evaluate_candidate(
    models: Models, sampler: Sampler, reward: RewardLearning, batches: ResponseBatches,
    heldout: list[PreferencePair], prompts: list[Prompt], eval_prompts: int, shift_pairs: int,
) -> dict[str, float]:
    """Held-out RM accuracy; the preference shift on the most recent shift_pairs held-out pairs; BLEU and
    ROUGE-L against the most recent eval_prompts held-out edits, and their gains; and
    the candidate's samples against the published version's: reward, its gain (paired by prompt, with its
    standard error), KL to the reference
    (nats per response), length, its ratio, and how often EOS was reached."""
    metrics = (reward.heldout_accuracy(heldout) | heldout_preference_shift(models, batches, heldout[-shift_pairs:])
               | heldout_edit_overlap(models, sampler, heldout, eval_prompts))
    chosen = draw_prompts(prompts, eval_prompts, random.Random(PROMPT_SEED))
    if not chosen:
        return metrics
    candidate = sampler.sample(chosen, 1, seed=SAMPLING_SEED)
    published = sampler.sample(chosen, 1, seed=SAMPLING_SEED, model=models.published_policy)
    candidate_rewards, published_rewards = reward.score(chosen, candidate), reward.score(chosen, published)
    # Paired by prompt: its standard error is what tells a worse candidate from an unlucky draw of few prompts.
    gains = candidate_rewards - published_rewards
    gain_stderr = (gains.std() / math.sqrt(len(gains))).item() if len(gains) > 1 else 0.0
    batch = batches.of_samples(chosen, candidate)
    logprobs = batches.logprobs(models.policy, batch)
    ref_logprobs = batches.logprobs(models.reference, batch)
    kl = ((logprobs - ref_logprobs) * batch.response_mask).sum(-1).mean().item()
    candidate_length = mean(len(s.token_ids) for s in candidate)
    published_length = mean(len(s.token_ids) for s in published)
    return metrics | {
        "reward_mean": candidate_rewards.mean().item(),
        "reward_gain": gains.mean().item(),
        "reward_gain_stderr": gain_stderr,
        "kl_to_reference": kl,
        "response_length_mean": candidate_length,
        "length_ratio": candidate_length / max(published_length, 1.0),
        "eos_rate": mean(s.finish_reason == "stop" for s in candidate),
    }
