"""Benchmark: what keeping the reward model's encoded rows (trainer/reward_learning.py, RewardLearning.rows) saves the
trainer's rounds.

Two learners with the trainer's defaults (DPO, the built-in LLaVA as policy and reward backbone, reward
epochs 2, up to 256 replayed pairs), built alike from seed 0, go through the same rounds:

  A  baseline: --learner.reward-row-cache-mib 0, every row encoded each time it is scored (before this change).
  B  the default, 256 MiB: a row already encoded is taken as kept.

A round is what the trainer does with a round's feedback: Learner.learn on its new pairs (the reward model's
epochs over them and the replayed ones, then DPO's update of the policy) and the reward model's accuracy on the
last 64 held-out pairs. Each pair asks about a 32x32 scene of its own (a PNG in a blob store, as the trainer
reads them: one shape of one colour) and prefers the answer that names that colour. Rounds alternate which side goes first, and
both sides must report the same metrics every round (keeping rows changes nothing learned), or the script fails.
Reported: seconds per round per side (median and range over the rounds after the first, whose rows no side has
seen), and A/B per round: how many times faster B trains.

Run from the repository root:

    .venv/bin/python benchmarks/reward_rows.py --rounds 8 --pairs 32
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from modalign.bench.serving import COLOURS
from modalign.core.blobs import BlobStore
from modalign.policy.model import IMAGE_SIZE
from modalign.trainer.batches import Prompt
from modalign.trainer.join import PreferencePair, Response
from modalign.trainer.learner import Learner, LearnerConfig
from modalign.v1 import common_pb2, events_pb2

HELD_OUT_PER_ROUND = 64


def make_pairs(learner: Learner, blobs: BlobStore, rng: random.Random, count: int, tag: str) -> list[PreferencePair]:
    pairs = []
    for index in range(count):
        colour = rng.choice(COLOURS)
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), rng.choice(("white", "gray")))
        x, y = rng.randint(0, IMAGE_SIZE - 12), rng.randint(0, IMAGE_SIZE - 12)
        ImageDraw.Draw(image).ellipse((x, y, x + 12, y + 12), fill=colour)
        data = io.BytesIO()
        image.save(data, "PNG")
        prompt = Prompt.question("What colour is the shape?", (blobs.put(data.getvalue()),))
        generation = events_pb2.GenerationLogged(
            prompt_text=prompt.text, images=[common_pb2.ImageRef(sha256=sha) for sha in prompt.image_sha256],
            prompt_token_ids=learner.batches.encode_prompt(prompt)["input_ids"][0].tolist())
        other = rng.choice([c for c in COLOURS if c != colour])
        pairs.append(PreferencePair(f"{tag}-{index}", "preference", generation,
                                    Response(f"It is {colour}.", None, None), Response(f"It is {other}.", None, None)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="rounds per side (the first is not counted)")
    parser.add_argument("--pairs", type=int, default=32, help="new training pairs per round")
    parser.add_argument("--held-out", type=int, default=8, help="new held-out pairs per round")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="reward-rows-") as folder:
        blobs = BlobStore(Path(folder))
        sides = {}
        for name, cache_mib in (("A", 0.0), ("B", LearnerConfig.reward_row_cache_mib)):
            torch.manual_seed(0)
            sides[name] = Learner(LearnerConfig(algorithm="dpo", reward_row_cache_mib=cache_mib, seed=0), blobs)
        rng = random.Random(0)
        trained: list[PreferencePair] = []
        heldout: list[PreferencePair] = []
        seconds: dict[str, list[float]] = {"A": [], "B": []}
        for number in range(args.rounds):
            pairs = make_pairs(sides["A"], blobs, rng, args.pairs, f"t{number}")
            heldout += make_pairs(sides["A"], blobs, rng, args.held_out, f"h{number}")
            metrics = {}
            for name in ("A", "B") if number % 2 == 0 else ("B", "A"):
                learner = sides[name]
                started = time.perf_counter()
                metrics[name] = learner.learn(pairs, [], replay=trained) | learner.heldout_accuracy(heldout[-HELD_OUT_PER_ROUND:])
                seconds[name].append(time.perf_counter() - started)
            if metrics["A"] != metrics["B"]:
                raise SystemExit(f"round {number}: the sides learned differently: {metrics}")
            trained += pairs
            print(f"round {number}: A {seconds['A'][-1]:.2f} s, B {seconds['B'][-1]:.2f} s, "
                  f"rm_heldout_accuracy {metrics['A'].get('rm_heldout_accuracy', 0):.3f}", flush=True)

    counted = {name: values[1:] for name, values in seconds.items()}
    for name, values in counted.items():
        print(f"{name}: {statistics.median(values):.2f} s per round ({min(values):.2f}-{max(values):.2f})")
    ratios = [a / b for a, b in zip(counted["A"], counted["B"])]
    print(f"A/B: median {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) over {len(ratios)} rounds")


if __name__ == "__main__":
    main()
