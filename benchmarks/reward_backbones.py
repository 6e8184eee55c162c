"""Benchmark: the CLIP reward backbone beside the generative default, on the same pairs of the demo.

Both reward models start from the demo's warm start v0 (the generative one is v0 with a fresh head;
the CLIP one sees with v0's vision tower and reads with a fresh text encoder, see reward/clip.py), and
both learn from the same pairs with the trainer's settings (Bradley-Terry loss, AdamW at
--learner.reward-lr, minibatches of --learner.reward-batch-size, gradients clipped at 1):

- training pairs: for each of --train scenes, two answers v0 samples at temperature 1, ordered by the
  demo users' hidden preference (faithful first, then fewer words), each judgement flipped with the
  users' noise (10%); ties are dropped, as users do not compare two equal answers;
- held-out pairs: the same for --held-out scenes the report uses, judged without noise.

It reports held-out accuracy after every epoch, overall and on the pairs whose two answers differ in
faithfulness (a correct or non-committal answer against a hallucinated one: what a reward model is
for), and the scoring throughput of each (rows per second of score(), batches of 32, both measured in
this run, interleaved) with their ratio.

Run from the repository root (builds the warm start first if the cache does not hold it, ~4 min):

    .venv/bin/python benchmarks/reward_backbones.py --train 1600 --held-out 300 --epochs 4
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import torch

from modalign.demo.report import HELD_OUT_SEED
from modalign.demo.run import DEFAULT_CACHE
from modalign.demo.scenes import Example, examples
from modalign.demo.users import faithfulness_rank, preference
from modalign.demo.warmstart import build_warm_start
from modalign.policy.engine import GenerationRequest, PolicyEngine, SamplingParams
from modalign.policy.model import format_prompt, load_policy
from modalign.reward.backbones import AnyRewardModel, new_reward_model
from modalign.trainer.losses import bradley_terry_loss
from modalign.trainer.models import optimizer_step

TRAIN_SEED = 12345
USER_NOISE = 0.1


@torch.no_grad()
def labelled_pairs(engine: PolicyEngine, scenes: list[Example], noise: float, seed: int) -> list[tuple[Example, str, str]]:
    """(scene, chosen, rejected) from two answers sampled per scene, ties dropped, flipped with `noise`."""
    requests = [GenerationRequest(format_prompt(engine.processor, e.question.text, 1), [e.scene.image()],
                                  SamplingParams(temperature=1.0, max_new_tokens=32, seed=seed + 2 * i), n=2)
                for i, e in enumerate(scenes)]
    answers = [candidates for start in range(0, len(requests), 32) for candidates in engine.generate(requests[start:start + 32])]
    rng = random.Random(seed)
    pairs = []
    for example, (a, b) in zip(scenes, answers):
        verdict = preference(a.text, b.text, example)
        if verdict == 0.5:
            continue
        chosen, rejected = (a.text, b.text) if (verdict == 1.0) != (rng.random() < noise) else (b.text, a.text)
        pairs.append((example, chosen, rejected))
    return pairs


def pair_scores(model: AnyRewardModel, pairs: list[tuple[Example, str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [e.question.text for e, _, _ in pairs] * 2
    images = [[e.scene.image()] for e, _, _ in pairs] * 2
    responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    rewards = model(**model.encode(prompts, images, responses))
    return rewards[: len(pairs)], rewards[len(pairs):]


@torch.no_grad()
def accuracy(model: AnyRewardModel, pairs: list[tuple[Example, str, str]]) -> tuple[float, float]:
    """Held-out accuracy overall and on the pairs that differ in faithfulness."""
    right, differ = [], []
    for start in range(0, len(pairs), 64):
        batch = pairs[start:start + 64]
        chosen, rejected = pair_scores(model, batch)
        right.extend((chosen > rejected).tolist())
        differ.extend(faithfulness_rank(c, e) != faithfulness_rank(r, e) for e, c, r in batch)
    faithful = [ok for ok, d in zip(right, differ) if d]
    return sum(right) / len(right), sum(faithful) / max(len(faithful), 1)


def train(model: AnyRewardModel, pairs, heldout, epochs: int, lr: float, batch_size: int, seed: int) -> list[tuple[float, float]]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    curve = []
    for _ in range(epochs):
        order = pairs[:]
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            chosen, rejected = pair_scores(model, order[start:start + batch_size])
            optimizer_step(bradley_terry_loss(chosen, rejected), 1.0, (model, optimizer))
        curve.append(accuracy(model, heldout))
    return curve


def throughput(models: dict[str, AnyRewardModel], heldout, repeats: int) -> dict[str, float]:
    """Rows scored per second by each model, repeats interleaved (A B, B A, ...); the median."""
    rows = [(e.question.text, [e.scene.image()], c) for e, c, _ in heldout]
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            for start in range(0, len(rows), 32):
                batch = rows[start:start + 32]
                models[name].score(*map(list, zip(*batch)))
            times[name].append(len(rows) / (time.perf_counter() - started))
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=1600, help="scenes whose two sampled answers make the training pairs")
    parser.add_argument("--held-out", type=int, default=300, help="held-out scenes (the demo report's)")
    parser.add_argument("--epochs", type=int, default=4, help="passes over the training pairs")
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate (the trainer's --learner.reward-lr)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step (--learner.reward-batch-size)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved throughput repeats")
    parser.add_argument("--seed", type=int, default=0, help="warm start and heads' seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    policy_folder = build_warm_start(DEFAULT_CACHE, seed=args.seed)
    policy, processor = load_policy(policy_folder)
    engine = PolicyEngine(policy, processor, policy_version="v0")
    stream = examples(TRAIN_SEED)
    train_pairs = labelled_pairs(engine, [next(stream) for _ in range(args.train)], USER_NOISE, TRAIN_SEED)
    stream = examples(HELD_OUT_SEED)
    heldout = labelled_pairs(engine, [next(stream) for _ in range(args.held_out)], 0.0, HELD_OUT_SEED)
    print(f"{len(train_pairs)} training pairs, {len(heldout)} held-out pairs "
          f"({sum(faithfulness_rank(c, e) != faithfulness_rank(r, e) for e, c, r in heldout)} differ in faithfulness)")
    models = {backbone: new_reward_model(backbone, copy.deepcopy(policy), processor, seed=args.seed)
              for backbone in ("generative", "clip")}
    for backbone, model in models.items():
        parameters = sum(p.numel() for p in model.parameters())
        started = time.monotonic()
        curve = train(model, train_pairs, heldout, args.epochs, args.lr, args.batch_size, args.seed)
        print(f"{backbone}: {parameters:,} parameters, trained in {time.monotonic() - started:.0f} s; held-out accuracy "
              "by epoch (all / faithful vs not): " + ", ".join(f"{a:.3f} / {f:.3f}" for a, f in curve), flush=True)
    rates = throughput(models, heldout, args.repeats)
    print("scoring rows/s: " + ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items())
          + f"; clip / generative = {rates['clip'] / rates['generative']:.1f}x")


if __name__ == "__main__":
    main()
