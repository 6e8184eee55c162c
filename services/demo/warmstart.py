"""The demo's starting policy "v0": the default LLaVA taught the scenes task by supervised fine-tuning.

RLHF improves a policy that already answers; it cannot conjure one from random weights in a demo's
time. v0 is meant to look like an assistant before RLHF: fluent, usually right when decoding
greedily, but a fixed fraction of its training targets are fluent hallucinations (a wrong colour, a
phantom object, a miscount), so answers sampled at temperature 1 often hallucinate. That gap is what
the online loop then closes from user feedback.

Seeing is the hard part for a ~1M-parameter model trained from random init on one core: the language
side is fluent within a minute, grounding is not. So the build has three stages:
1. The vision tower and projector alone learn to classify each quadrant of the image (empty, or the
   colour, shape and size of its object) from the projected image tokens. This is cheap (no text) and
   puts exactly the facts the answers need into the image tokens the language model attends to.
2. The whole LLaVA is fine-tuned on (scene, question, answer) with the loss on the answer tokens:
   first on concise, faithful answers only (grounding), then, at a lower learning rate, on a mix of
   concise and verbose answers of which a fraction are fluent hallucinations (the pre-RLHF habits).
   Mixing the noisy targets in from the start was measured to stall grounding: colour and position
   answers stayed near 60% correct.
3. Yes/no questions ("Is there a red circle in the image?", POPE's kind) at a lower learning rate, with
   the rest of each batch holding the other kinds where stage 2 left them. Stage 2 leaves these at
   chance: "yes" is right half the time for every image and every question, so only the two together
   predict it, and at stage 2's learning rate Adam chases each batch's yes-share instead. Alone and at a
   third of that rate they are learned; see learn_yes_no for why the other kinds are not lost meanwhile.

The result is saved with save_policy, so it stays a plain Hugging Face image-text-to-text model, in a
cache folder named by a hash of the build settings: a second build with the same settings is instant.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, ProcessorMixin

from modalign.demo.scenes import (
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    QUESTION_KINDS,
    SHAPES,
    SIZES,
    STYLES,
    Example,
    QuestionKind,
    Style,
    examples,
    faithfulness,
    hallucinated_answer,
    make_question,
    make_scene,
    rate_by_kind,
    reference_answer,
)
from modalign.policy.model import build_default_policy, format_prompt, load_policy, save_policy

log = logging.getLogger(__name__)

# Bump when the task or the training code changes what a given config builds: old caches go stale.
BUILD_VERSION = 3


@dataclass(frozen=True)
class WarmStartConfig:
    """The build settings. With the seed they determine the weights; their hash names the cache folder."""

    patch_size: int = 16
    """One image token per quadrant, i.e. per object slot (see build_default_policy)."""
    vision_steps: int = 1500
    """Stage 1: quadrant classification, vision tower and projector only. Cheap (seconds per hundred
    steps); at 600 the quadrant head had only just reached 100%, so the SFT started from weaker features."""
    vision_lr: float = 3e-3
    sft_steps: int = 1800
    """Stage 2: fine-tuning steps of the whole model on answers."""
    clean_steps: int = 1400
    """The first clean_steps of stage 2 train on concise, faithful answers only: short sequences with
    every answer token about the image, the cheapest way to teach the language model to read the image
    tokens. The verbose style and the hallucinations come after. Measured: greedy accuracy on position
    questions still climbed from 67% at step 600 to 88% at step 1200; v0's grounding is the floor that
    RLHF's gains flatten against, so it is worth the extra minute."""
    sft_lr: float = 1e-3
    """The learning rate of the clean steps."""
    style_lr: float = 3e-4
    """The learning rate of the steps after clean_steps, decaying linearly to zero. Lower than sft_lr:
    the style is easy to learn, and at sft_lr its targets knocked out some of the grounding."""
    batch_size: int = 32
    question_weights: tuple[float, float, float, float, float] = (1.0, 2.0, 3.0, 1.0, 2.0)
    """Relative frequency of count, colour, position, describe and exists questions in stage 2. Finding
    an object by its colour ("Where is the red shape?") is what the model learns last; an exists question
    binds a colour and a shape like a colour question does."""
    verbose: float = 0.6
    """Fraction of batches (after clean_steps) whose targets are all in the verbose style. A batch is
    all of one style: concise batches are then half as long, and steps on them twice as fast. Above
    one half, v0 opens most answers with "Sure! ...", the chatty habit users' preference for concise
    answers then trains away."""
    noise: float = 0.3
    """Fraction of targets (after clean_steps) that are fluent hallucinations: about half of v0's
    sampled answers then hallucinate, while its concise greedy answers stay mostly grounded."""
    yes_no_steps: int = 1000
    """Stage 3: steps on yes/no questions. Measured: greedy yes/no accuracy left chance after 300-600 steps
    and ended at 76-83% (stage 2 leaves it at 47-57%); the stage adds about two minutes to the build."""
    yes_no_lr: float = 3e-4
    """Stage 3's learning rate, constant, with a fresh AdamW. At 1e-3 the yes/no answers stayed at chance."""
    yes_no_share: float = 0.5
    """The share of each stage-3 batch that is yes/no questions with their concise, faithful answers; the
    rest are stage 2's other kinds, whose loss is the drift from the start of stage 3 (answer_drift)."""


def build_warm_start(cache_dir: str | Path, seed: int = 0, config: WarmStartConfig = WarmStartConfig()) -> Path:
    """The folder of the v0 policy for (seed, config), built (minutes) unless the cache already holds it."""

    def build() -> tuple[PreTrainedModel, ProcessorMixin]:
        torch.manual_seed(seed)  # the vision heads' initialisation; data streams have their own seeds
        model, processor = build_default_policy(seed=seed, patch_size=config.patch_size)
        started = time.monotonic()
        pretrain_vision(model, processor, config, seed)
        log.info("vision pretraining took %.0f s", time.monotonic() - started)
        tokens = _Tokens(processor)
        sft(model, tokens, config, seed)
        learn_yes_no(model, tokens, config, seed)
        log.info("warm start took %.0f s", time.monotonic() - started)
        return model, processor

    return cached_policy(Path(cache_dir) / f"warmstart-{config_hash(seed, config)}", {"seed": seed, **dataclasses.asdict(config)}, build)


def cached_policy(folder: Path, settings: dict, build: Callable[[], tuple[PreTrainedModel, ProcessorMixin]]) -> Path:
    """folder, holding the policy build() makes (in eval mode) and the settings it was built with (warmstart.json),
    unless it already does."""
    if (folder / "config.json").exists():
        return folder
    model, processor = build()
    model.eval()
    # Written under a temporary name and renamed: a crash never leaves a half-written cache entry.
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".warmstart-", dir=folder.parent))
    save_policy(model, processor, staging)
    (staging / "warmstart.json").write_text(json.dumps(settings, indent=2))
    try:
        os.rename(staging, folder)
    except OSError:  # another process built the same config first; theirs is as good as ours
        shutil.rmtree(staging)
    return folder


def config_hash(seed: int, config: Any) -> str:
    """A build's settings (a config dataclass, the seed and BUILD_VERSION) as a short hash: its cache folder's name."""
    settings = json.dumps({"build_version": BUILD_VERSION, "seed": seed, **dataclasses.asdict(config)}, sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


# ---- stage 1: teach the vision side the quadrants ------------------------------------------------

# Per quadrant: is it empty, and if not, the colour, shape and size of its object.
# Also which quadrant it is: the language model must say where an object is, so each image token
# should carry its own place, not only its contents.
QUADRANT_HEADS = {"empty": 2, "colour": len(COLOURS), "shape": len(SHAPES), "size": len(SIZES), "quadrant": len(POSITIONS)}


def quadrant_labels(batch: list[Example]) -> dict[str, torch.Tensor]:
    """Targets of shape (batch, 4 quadrants); -100 where a quadrant is empty (nothing to classify)."""
    labels = {name: torch.full((len(batch), len(POSITIONS)), -100) for name in QUADRANT_HEADS}
    labels["empty"].fill_(1)
    labels["quadrant"][:] = torch.arange(len(POSITIONS))
    for row, example in enumerate(batch):
        for obj in example.scene.objects:
            q = POSITIONS.index(obj.position)
            labels["empty"][row, q] = 0
            labels["colour"][row, q] = COLOURS.index(obj.colour)
            labels["shape"][row, q] = SHAPES.index(obj.shape)
            labels["size"][row, q] = SIZES.index(obj.size)
    return labels


def _quadrant_pool(image_tokens: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, dim) in row-major patch order -> (batch, 4 quadrants, dim), the mean of each
    quadrant's patches (with 16x16 patches each quadrant is one token and this is a reshape)."""
    b, n, d = image_tokens.shape
    side = int(n**0.5)
    grid = image_tokens.view(b, 2, side // 2, 2, side // 2, d)
    return grid.mean(dim=(2, 4)).reshape(b, 4, d)


def pretrain_vision(model: PreTrainedModel, processor: ProcessorMixin, config: WarmStartConfig, seed: int) -> None:
    """Stage 1: train the vision tower and projector to make each quadrant's facts readable from the
    projected image tokens (train_quadrant_heads)."""

    def quadrant_tokens(batch: list[Example]) -> torch.Tensor:
        pixels = processor.image_processor([e.scene.image() for e in batch], return_tensors="pt")["pixel_values"]
        # pooler_output: the projected image tokens, one (16, hidden) tensor per image.
        return _quadrant_pool(torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output))

    parameters = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    train_quadrant_heads(model, parameters, quadrant_tokens, config, seed)


class SharedSettings(Protocol):
    """The settings of stages 1 and 2 that WarmStartConfig and the spoken warm start's config share."""

    @property
    def vision_steps(self) -> int: ...
    @property
    def vision_lr(self) -> float: ...
    @property
    def sft_steps(self) -> int: ...
    @property
    def clean_steps(self) -> int: ...
    @property
    def sft_lr(self) -> float: ...
    @property
    def style_lr(self) -> float: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def question_weights(self) -> tuple[float, float, float, float, float]: ...
    @property
    def verbose(self) -> float: ...
    @property
    def noise(self) -> float: ...


def train_quadrant_heads(model: PreTrainedModel, parameters: list[nn.Parameter],
                         quadrant_tokens: Callable[[list[Example]], torch.Tensor], config: SharedSettings, seed: int) -> None:
    """Train parameters so that each quadrant's facts (QUADRANT_HEADS) can be read off its image token,
    quadrant_tokens(batch) of shape (batch, 4 quadrants, hidden), by small linear heads thrown away afterwards."""
    if config.vision_steps == 0:
        return
    heads = nn.ModuleDict({name: nn.Linear(model.config.text_config.hidden_size, n) for name, n in QUADRANT_HEADS.items()})
    optimizer = torch.optim.AdamW([*parameters, *heads.parameters()], lr=config.vision_lr)
    stream = examples(seed + 1)
    model.train()
    for step in range(config.vision_steps):
        batch = [next(stream) for _ in range(config.batch_size)]
        tokens = quadrant_tokens(batch)
        labels = quadrant_labels(batch)
        logits = {name: head(tokens).flatten(0, 1) for name, head in heads.items()}
        loss = sum(nn.functional.cross_entropy(logits[n], labels[n].flatten(), ignore_index=-100) for n in heads)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == config.vision_steps - 1:
            accuracy = {n: head_accuracy(logits[n], labels[n].flatten()) for n in heads}
            log.info("vision step %d loss %.3f quadrant accuracy %s", step, loss.item(), accuracy)


def head_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    known = labels != -100
    return round((logits.argmax(-1)[known] == labels[known]).float().mean().item(), 3)


# ---- stage 2: supervised fine-tuning on answers --------------------------------------------------


class _Tokens:
    """Token ids of prompts and answers, cached: the task has few distinct questions and answers."""

    def __init__(self, processor: ProcessorMixin) -> None:
        self.processor = processor
        self.eos = processor.tokenizer.eos_token_id
        self.pad = processor.tokenizer.pad_token_id
        self._prompts: dict[str, list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def prompt(self, question: str) -> list[int]:
        if question not in self._prompts:
            # The processor expands the <image> placeholder into as many image tokens as the model uses.
            text = format_prompt(self.processor, question, 1)
            inputs = self.processor(text=[text], images=[Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))])
            self._prompts[question] = list(inputs["input_ids"][0])
        return self._prompts[question]

    def answer(self, text: str) -> list[int]:
        if text not in self._answers:
            self._answers[text] = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos]
        return self._answers[text]


def answer_rows(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """(prompt ids, answer ids) per row as right-padded input ids, attention mask and labels (answer tokens only)."""
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        ids = torch.tensor(prompt + answer)
        input_ids[i, : len(ids)] = ids
        labels[i, len(prompt) : len(ids)] = ids[len(prompt) :]
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def training_batch(batch: list[Example], answers: list[str], tokens: _Tokens) -> dict[str, torch.Tensor]:
    """answer_rows of the typed questions and their answers, plus pixel values."""
    rows = [(tokens.prompt(e.question.text), tokens.answer(a)) for e, a in zip(batch, answers)]
    pixels = tokens.processor.image_processor([e.scene.image() for e in batch], return_tensors="pt")["pixel_values"]
    return {**answer_rows(rows, tokens.pad), "pixel_values": pixels}


def target_answer(example: Example, rng: random.Random, style: Style, noise: float) -> str:
    """The SFT target for one example in the given style: a hallucination with probability `noise`,
    else the grounded reference answer."""
    if rng.random() < noise:
        return hallucinated_answer(example.scene, example.question, style, rng)
    return reference_answer(example.scene, example.question, style)


def weighted_examples(seed: int, weights: tuple[float, ...]) -> Iterator[Example]:
    """Like scenes.examples, with question kinds drawn in the given proportions."""
    rng = random.Random(seed)
    while True:
        scene = make_scene(rng)
        yield Example(scene, make_question(scene, rng, rng.choices(QUESTION_KINDS, weights)[0]))


BatchInputs = Callable[[list[Example], list[str], random.Random], dict[str, torch.Tensor]]
"""The model's inputs (labels included) for examples and their target answers; may draw from the build's rng."""


def fine_tune(model: PreTrainedModel, parameters: list[nn.Parameter], config: SharedSettings, seed: int,
              inputs_of: BatchInputs) -> None:
    """Next-token loss on the answer (and its EOS): clean concise answers for config.clean_steps at sft_lr,
    then verbose and noisy ones at style_lr decaying to zero.

    One optimizer runs through the whole stage: a fresh one met the verbose targets' large first
    gradients with no second-moment estimate and knocked out much of the grounding just learned.
    """
    optimizer = torch.optim.AdamW(parameters, lr=config.sft_lr)
    total, clean_steps = config.sft_steps, config.clean_steps
    style_scale = config.style_lr / config.sft_lr

    def lr_scale(step: int) -> float:
        return 1.0 if step < clean_steps else style_scale * (total - step) / max(1, total - clean_steps)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_scale)
    stream = weighted_examples(seed + 2, config.question_weights)
    rng = random.Random(seed + 3)
    model.train()
    for step in range(total):
        clean = step < clean_steps
        style: Style = "verbose" if not clean and rng.random() < config.verbose else "concise"
        noise = 0.0 if clean else config.noise
        batch = [next(stream) for _ in range(config.batch_size)]
        answers = [target_answer(e, rng, style, noise) for e in batch]
        loss = model(**inputs_of(batch, answers, rng)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            log.info("sft step %d loss %.3f", step, loss.item())


def sft(model: PreTrainedModel, tokens: _Tokens, config: WarmStartConfig, seed: int) -> None:
    """Stage 2 (fine_tune) on typed questions."""
    fine_tune(model, list(model.parameters()), config, seed,
              lambda batch, answers, _rng: training_batch(batch, answers, tokens))


# ---- stage 3: yes/no questions, holding the other kinds ------------------------------------------


def answer_drift(logits: torch.Tensor, start_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(start || model) of the next-token distributions that predict the answer tokens (labels != -100),
    averaged over those tokens: how far the model has moved from the start on these answers."""
    predicts_answer = labels[:, 1:] != -100  # the logits at t predict the token at t + 1
    log_p = nn.functional.log_softmax(logits[:, :-1][predicts_answer], dim=-1)
    log_p_start = nn.functional.log_softmax(start_logits[:, :-1][predicts_answer], dim=-1)
    return nn.functional.kl_div(log_p, log_p_start, log_target=True, reduction="batchmean")


def learn_yes_no(model: PreTrainedModel, tokens: _Tokens, config: WarmStartConfig, seed: int) -> None:
    """Stage 3: next-token loss on yes/no questions' concise, faithful answers, plus the answer_drift from the
    stage's start on stage 2's other kinds (its verbose and noisy targets as the sequences to hold).

    Trained alone, yes/no questions are learned but erase the other kinds for the moment (count and
    describe answers fell to 0%); trained beside those kinds' own targets, they stayed near chance (61-64%
    after 800 steps), the other kinds' gradients drowning theirs. The drift is zero at the start, and so is
    its gradient: the yes/no answers get the whole step until the other kinds begin to move, and only then
    does the drift pull them back. The stage's start is a frozen copy; one extra forward per step.
    """
    if config.yes_no_steps == 0:
        return
    start = copy.deepcopy(model).eval().requires_grad_(False)
    yes_no_rows = round(config.batch_size * config.yes_no_share)
    yes_no = weighted_examples(seed + 4, tuple(float(kind == "exists") for kind in QUESTION_KINDS))
    others = weighted_examples(seed + 6, tuple(0.0 if kind == "exists" else weight
                                               for kind, weight in zip(QUESTION_KINDS, config.question_weights)))
    rng = random.Random(seed + 5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.yes_no_lr)
    model.train()
    for step in range(config.yes_no_steps):
        asked = [next(yes_no) for _ in range(yes_no_rows)]
        loss = model(**training_batch(asked, [reference_answer(e.scene, e.question) for e in asked], tokens)).loss
        held = [next(others) for _ in range(config.batch_size - yes_no_rows)]
        if held:
            style: Style = "verbose" if rng.random() < config.verbose else "concise"
            inputs = training_batch(held, [target_answer(e, rng, style, config.noise) for e in held], tokens)
            labels = inputs.pop("labels")
            with torch.no_grad():
                start_logits = start(**inputs).logits
            loss = loss + answer_drift(model(**inputs).logits, start_logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0:
            log.info("yes/no step %d loss %.3f", step, loss.item())


# ---- measurement ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """Held-out quality of a policy on the scenes task.

    accuracy: per question kind, the fraction of greedy answers the judge calls correct.
    hallucination: the fraction of answers sampled at temperature 1 that the judge calls hallucinated;
    hallucination_by_kind: the same per question kind (which kinds RLHF has left to fix).
    styles: how many sampled answers look verbose ("Sure!...") or concise.
    """

    accuracy: dict[str, float]
    greedy_hallucination: float
    hallucination: float
    hallucination_by_kind: dict[str, float]
    styles: dict[str, int]


PromptInputs = Callable[[list[Example]], Mapping[str, torch.Tensor]]
"""The model inputs of a batch of examples' prompts, left-padded (generate continues from the right edge)."""


def typed_prompts(processor: ProcessorMixin) -> PromptInputs:
    """Each example's question typed after its scene, as the default policy's chat template writes it."""
    def encode(batch: list[Example]) -> Mapping[str, torch.Tensor]:
        return processor(
            text=[format_prompt(processor, e.question.text, 1) for e in batch],
            images=[e.scene.image() for e in batch], return_tensors="pt", padding=True,
        )
    return encode


@torch.no_grad()
def evaluate(model: PreTrainedModel, processor: ProcessorMixin, seed: int = 12345, n: int = 256,
             batch_size: int = 64, max_new_tokens: int = 48, prompts: PromptInputs | None = None) -> Evaluation:
    """Judge greedy and temperature-1 answers on n held-out examples (a seed training never uses), their
    prompts encoded by `prompts` (typed_prompts by default)."""
    encode = prompts if prompts is not None else typed_prompts(processor)
    model.eval()
    stream = examples(seed)
    held_out = [next(stream) for _ in range(n)]
    tokenizer = processor.tokenizer
    # Sample as the serving engine does: never a special token other than EOS.
    suppress = sorted(set(tokenizer.all_special_ids) - {tokenizer.eos_token_id})
    torch.manual_seed(seed)
    greedy_bad = 0
    correct: list[tuple[QuestionKind, bool]] = []  # (kind, judged correct) per greedy answer
    sampled: list[tuple[QuestionKind, bool]] = []  # (kind, hallucinated) per sampled answer
    styles: Counter[str] = Counter()
    for start in range(0, n, batch_size):
        batch = held_out[start : start + batch_size]
        inputs = encode(batch)
        width = inputs["input_ids"].shape[1]
        for do_sample in (False, True):
            output = model.generate(
                **inputs, do_sample=do_sample, temperature=1.0 if do_sample else None, top_p=None, top_k=None,
                max_new_tokens=max_new_tokens, suppress_tokens=suppress,
            )
            texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            for example, text in zip(batch, texts):
                verdict = faithfulness(text, example.scene, example.question)
                if do_sample:
                    sampled.append((example.question.kind, verdict.hallucinated))
                    styles["verbose" if text.startswith("Sure") else "concise"] += 1
                else:
                    greedy_bad += verdict.hallucinated
                    correct.append((example.question.kind, bool(verdict.correct)))
    return Evaluation(
        accuracy=rate_by_kind(correct),
        greedy_hallucination=greedy_bad / n,
        hallucination=sum(flag for _, flag in sampled) / n,
        hallucination_by_kind=rate_by_kind(sampled),
        styles={s: styles[s] for s in STYLES},
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m modalign.demo.warmstart FOLDER...`: the Evaluation of each policy folder, one line each."""
    parser = argparse.ArgumentParser(prog="python -m modalign.demo.warmstart", description=main.__doc__)
    parser.add_argument("folders", nargs="+", type=Path, help="policy checkpoint folders (a warm start, a published version)")
    parser.add_argument("-n", type=int, default=256, help="held-out scenes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as each service runs; results then match from one machine to the next
    for folder in args.folders:
        print(folder, json.dumps(dataclasses.asdict(evaluate(*load_policy(folder), n=args.n))), flush=True)


if __name__ == "__main__":
    main()
