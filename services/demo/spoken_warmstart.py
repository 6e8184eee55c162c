"""A spoken-capable v0: the demo's warm start (warmstart.py) on a tiny Qwen2.5-Omni thinker (policy/omni.py).

Some simulated users ask their question aloud: the request holds the scene and a clip of the question
(speech.synthesise), no text. v0 must then understand a spoken question about as well as a typed one, or the
online loop has nothing to improve on spoken prompts. The recipe is warmstart.py's, with one more stage:
1. vision: the ViT and its merger learn to classify each quadrant (empty, colour, shape, size, which quadrant)
   from the merged image tokens (one per quadrant);
2. audio, the analogue for the ears: the audio encoder and its projection learn to classify, from every audio
   token of a clip, what the question asks (its kind) and which colour, shape and position words it names.
   The encoder attends over the whole clip (one chunk), so every token can carry the whole question, and the
   language model can read a spoken question from any of its tokens about as easily as a typed one;
3. SFT on (scene, question, answer), a share of the questions spoken (image then clip, as the policy's
   shorthand builds a spoken request), clean answers first, then verbose and noisy ones at a lower rate.

The demo's questions have 26 distinct texts, and espeak-ng says a text the same way every time, so the clips
are synthesised once per text and cached. The audio side therefore learns 26 clips, not speech: it is as good
as the demo's users need, and no better.

Measured (2026-12-05, seed 0, 256 held-out scenes, greedy accuracy per kind; sampled hallucination at T=1),
`uv run python -m modalign.demo.spoken_warmstart [--audio-steps 0 | --train-audio-in-sft]`:

| run | build | typed count/colour/position/describe/exists | spoken, same | halluc. typed / spoken |
| --- | --- | --- | --- | --- |
| B audio trained in SFT | 1769 s, loaded machine | 0.94 0.77 0.69 0.96 0.49 | 0.92 0.63 0.74 0.98 0.49 | 49% / 41% |
| C no audio stage | 857 s, half loaded | 1.00 0.73 0.61 0.96 0.43 | 0.98 0.54 0.68 0.98 0.49 | 45% / 43% |
| D audio frozen in SFT (the default) | 489 s, idle | 1.00 0.56 0.65 0.98 0.53 | 1.00 0.60 0.63 0.96 0.43 | 49% / 48% |
| D again, a later session | 799 s, beside seed 1's | 1.00 0.73 0.73 1.00 0.60 | 1.00 0.67 0.76 1.00 0.51 | 48% / 47% |

Spoken questions come out about as well as typed ones (within the spread between runs) when the audio stage
ran. Without it, "What colour is the shape at the top right?" (the position named at the end of the longest
clips) was answered right 16/79 times spoken against 41/79 typed; with it 34/79 (B) and 42/79 (D). The demo
(`modalign demo --spoken-share`) starts from the default build, cached by build_spoken_warm_start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, ProcessorMixin

from modalign.demo import warmstart
from modalign.demo.scenes import (
    COLOURS,
    POSITIONS,
    QUESTION_KINDS,
    SHAPES,
    Example,
)
from modalign.demo.speech import spoken_clip
from modalign.demo.warmstart import (
    Evaluation,
    cached_policy,
    config_hash,
    fine_tune,
    head_accuracy,
    train_quadrant_heads,
    weighted_examples,
)
from modalign.policy.conversation import Conversation, single_question
from modalign.policy.model import format_conversation, load_policy, save_policy
from modalign.policy.omni import MEL_BINS, build_omni_policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpokenWarmStartConfig:
    """The build settings (warmstart.WarmStartConfig's, plus the audio stage and the spoken share)."""

    mel_bins: int = MEL_BINS
    vision_steps: int = 1500
    vision_lr: float = 3e-3
    audio_steps: int = 600
    """Stage 2: question classification from audio tokens, audio encoder only (26 distinct clips)."""
    audio_lr: float = 3e-3
    sft_steps: int = 1800
    clean_steps: int = 1400
    sft_lr: float = 1e-3
    style_lr: float = 3e-4
    batch_size: int = 32
    question_weights: tuple[float, float, float, float, float] = (1.0, 2.0, 3.0, 1.0, 2.0)
    verbose: float = 0.6
    noise: float = 0.3
    spoken: float = 1 / 3
    """Fraction of SFT questions asked aloud."""
    train_audio_in_sft: bool = False
    """Whether SFT trains the audio encoder too. Frozen, the build took 489 s on an idle machine, and spoken
    questions were answered about as well as typed ones (docs/demo.md); trained, a fresh linear probe after SFT
    still read the position a clip names from 98.5% of its audio tokens but its colour from only 82% (100%
    after stage 2), and every SFT step took longer."""
    spoken_batches: bool = True
    """Whether a batch is all spoken or all typed (a spoken batch with probability `spoken`), rather than each
    question spoken with probability `spoken`. A spoken prompt is about twice as long as a typed one (~45
    audio tokens against ~10 text tokens), so a mixed batch is padded to the spoken width: measured at
    ~1.3 s a step against ~0.5 s for a typed batch and ~1.2 s for a spoken one."""


def build_spoken_warm_start(
    cache_dir: str | Path, seed: int = 0, config: SpokenWarmStartConfig = SpokenWarmStartConfig()
) -> Path:
    """The folder of the spoken-capable v0 for (seed, config), built (minutes) unless the cache already holds it."""
    return cached_policy(Path(cache_dir) / f"spoken-warmstart-{config_hash(seed, config)}",
                         {"seed": seed, **dataclasses.asdict(config)}, lambda: train_spoken_warm_start(seed, config)[:2])


def train_spoken_warm_start(
    seed: int = 0, config: SpokenWarmStartConfig = SpokenWarmStartConfig()
) -> tuple[PreTrainedModel, ProcessorMixin, dict[str, float]]:
    """The spoken-capable v0 for (seed, config), and how long each stage took (seconds)."""
    torch.manual_seed(seed)
    model, processor = build_omni_policy(seed=seed, mel_bins=config.mel_bins)
    inputs = Inputs(processor)
    timings: dict[str, float] = {}
    started = time.monotonic()
    pretrain_vision(model, inputs, config, seed)
    timings["vision"] = time.monotonic() - started
    pretrain_audio(model, inputs, config, seed)
    timings["audio"] = time.monotonic() - started - timings["vision"]
    sft(model, inputs, config, seed)
    timings["sft"] = time.monotonic() - started - timings["vision"] - timings["audio"]
    model.eval()
    return model, processor, timings


# ---- inputs --------------------------------------------------------------------------------------


def prompt_conversation(question: str, spoken: bool) -> Conversation:
    """The user turn a question stands for: the image, then the question's clip (spoken) or text (typed)."""
    return single_question("" if spoken else question, [""], [""] if spoken else [])


class Inputs:
    """Model inputs of the scenes task, cached per question: prompts' token ids and clips' mel features."""

    def __init__(self, processor: ProcessorMixin) -> None:
        self.processor = processor
        self.eos = processor.tokenizer.eos_token_id
        self.pad = processor.tokenizer.pad_token_id
        self._prompts: dict[tuple[str, bool], list[int]] = {}
        self._answers: dict[str, list[int]] = {}
        self._features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def clip(self, question: str) -> np.ndarray:
        """The question spoken, decoded as the policy decodes a request's clip."""
        return spoken_clip(question, self.processor.feature_extractor.sampling_rate)

    def features(self, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The clip's (mel bins, frames) log-mel features and (frames,) mask of real frames."""
        if question not in self._features:
            out = self.processor.feature_extractor(
                [self.clip(question)], sampling_rate=self.processor.feature_extractor.sampling_rate,
                return_attention_mask=True, return_tensors="pt",
            )
            self._features[question] = (out["input_features"][0], out["attention_mask"][0])
        return self._features[question]

    def prompt(self, question: str, spoken: bool) -> list[int]:
        key = (question, spoken)
        if key not in self._prompts:
            text = format_conversation(self.processor, prompt_conversation(question, spoken))
            media = {"audio": [self.clip(question)]} if spoken else {}
            ids = self.processor(text=[text], images=[Image.new("RGB", (32, 32))], **media)["input_ids"][0]
            self._prompts[key] = list(ids)
        return self._prompts[key]

    def answer(self, text: str) -> list[int]:
        if text not in self._answers:
            self._answers[text] = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos]
        return self._answers[text]

    def pixels(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        out = self.processor.image_processor([e.scene.image() for e in batch], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def audio(self, questions: list[str]) -> dict[str, torch.Tensor]:
        """The clips of the questions, one row each, as the processor gives them."""
        features = [self.features(q) for q in questions]
        return {
            "input_features": torch.stack([f for f, _ in features]),
            "feature_attention_mask": torch.stack([m for _, m in features]),
        }

    def training_batch(self, batch: list[Example], answers: list[str], spoken: list[bool]) -> dict[str, torch.Tensor]:
        """warmstart.answer_rows of the questions (typed or spoken) and their answers, pixels and clips."""
        rows = [(self.prompt(e.question.text, s), self.answer(a)) for e, a, s in zip(batch, answers, spoken)]
        inputs = {**warmstart.answer_rows(rows, self.pad), **self.pixels(batch)}
        said = [e.question.text for e, s in zip(batch, spoken) if s]
        return {**inputs, **self.audio(said)} if said else inputs


# ---- stage 1: the quadrants, from the merged image tokens ----------------------------------------


def pretrain_vision(model: PreTrainedModel, inputs: Inputs, config: SpokenWarmStartConfig, seed: int) -> None:
    """warmstart.pretrain_vision for the Qwen ViT: merged image tokens are already one per quadrant, in
    reading order (top left, top right, bottom left, bottom right)."""

    def quadrant_tokens(batch: list[Example]) -> torch.Tensor:
        return torch.stack(model.model.get_image_features(**inputs.pixels(batch)).pooler_output)

    train_quadrant_heads(model, list(model.model.visual.parameters()), quadrant_tokens, config, seed)


# ---- stage 2: the question, from the audio tokens ------------------------------------------------

# What a spoken question must make readable: its kind, and the colour, shape and position it names (the
# last class of each: it names none).
_AUDIO_HEADS = {
    "kind": len(QUESTION_KINDS), "colour": len(COLOURS) + 1, "shape": len(SHAPES) + 1, "position": len(POSITIONS) + 1,
}


def question_labels(kind: str, text: str) -> dict[str, int]:
    """The audio heads' targets for one question: its kind and the words it names."""
    lowered = text.lower()
    named = {
        "colour": [c for c in COLOURS if f" {c} " in lowered],
        "shape": [s for s in SHAPES if f" {s}" in lowered],
        "position": [p for p in POSITIONS if p in lowered],
    }
    labels = {"kind": QUESTION_KINDS.index(kind)}
    vocabulary = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS}
    for head, words in named.items():
        labels[head] = vocabulary[head].index(words[0]) if words else len(vocabulary[head])
    return labels


def pretrain_audio(model: PreTrainedModel, inputs: Inputs, config: SpokenWarmStartConfig, seed: int) -> None:
    """Train the audio encoder and its projection so that every audio token of a clip tells, through small
    linear heads (thrown away afterwards), the question's kind and the words it names."""
    if config.audio_steps == 0:
        return
    hidden = model.config.text_config.hidden_size
    heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in _AUDIO_HEADS.items()})
    optimizer = torch.optim.AdamW([*model.model.audio_tower.parameters(), *heads.parameters()], lr=config.audio_lr)
    stream = weighted_examples(seed + 4, config.question_weights)
    model.train()
    for step in range(config.audio_steps):
        questions = [next(stream).question for _ in range(config.batch_size)]
        audio = inputs.audio([q.text for q in questions])
        tokens = model.model.get_audio_features(**audio).last_hidden_state  # (all clips' tokens, hidden)
        lengths = model.model.audio_tower._get_feat_extract_output_lengths(audio["feature_attention_mask"].sum(-1))[1]
        per_token = [question_labels(q.kind, q.text) for q in questions]
        labels = {n: torch.tensor([row[n] for row in per_token]).repeat_interleave(lengths) for n in heads}
        logits = {name: head(tokens) for name, head in heads.items()}
        loss = sum(nn.functional.cross_entropy(logits[n], labels[n]) for n in heads)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == config.audio_steps - 1:
            accuracy = {n: head_accuracy(logits[n], labels[n]) for n in heads}
            log.info("audio step %d loss %.3f token accuracy %s", step, loss.item(), accuracy)


# ---- stage 3: supervised fine-tuning on typed and spoken questions -------------------------------


def sft(model: PreTrainedModel, inputs: Inputs, config: SpokenWarmStartConfig, seed: int) -> None:
    """warmstart.fine_tune, with questions spoken with probability config.spoken (see spoken_batches)."""
    model.model.audio_tower.requires_grad_(config.train_audio_in_sft)

    def inputs_of(batch: list[Example], answers: list[str], rng: random.Random) -> dict[str, torch.Tensor]:
        if config.spoken_batches:
            spoken = [rng.random() < config.spoken] * len(batch)
        else:
            spoken = [rng.random() < config.spoken for _ in batch]
        return inputs.training_batch(batch, answers, spoken)

    fine_tune(model, [p for p in model.parameters() if p.requires_grad], config, seed, inputs_of)
    model.model.audio_tower.requires_grad_(True)


# ---- measurement ---------------------------------------------------------------------------------


def evaluate(model: PreTrainedModel, inputs: Inputs, spoken: bool, seed: int = 12345, n: int = 256,
             batch_size: int = 64, max_new_tokens: int = 48) -> Evaluation:
    """warmstart.evaluate with every question typed, or every question spoken."""
    processor = inputs.processor

    def encode(batch: list[Example]) -> Mapping[str, torch.Tensor]:
        media = {"audio": [inputs.clip(e.question.text) for e in batch]} if spoken else {}
        return processor(
            text=[format_conversation(processor, prompt_conversation(e.question.text, spoken)) for e in batch],
            images=[e.scene.image() for e in batch], return_tensors="pt", padding=True, **media,
        )

    return warmstart.evaluate(model, processor, seed, n, batch_size, max_new_tokens, prompts=encode)


def main(argv: list[str] | None = None) -> None:
    """`python -m modalign.demo.spoken_warmstart [--out FOLDER] [--SETTING VALUE ...]`: build the spoken v0, then
    print its held-out Evaluation for typed and for spoken questions and the build's timings, one JSON line.
    With --evaluate FOLDER: only the evaluations, of a saved policy."""
    parser = argparse.ArgumentParser(prog="python -m modalign.demo.spoken_warmstart", description=main.__doc__)
    parser.add_argument("--out", type=Path, help="save the policy here")
    parser.add_argument("--evaluate", type=Path, help="evaluate this saved policy instead of building one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-n", type=int, default=256, help="held-out scenes")
    for field in dataclasses.fields(SpokenWarmStartConfig):
        if field.type in ("int", "float"):
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=int if field.type == "int" else float)
        elif field.type == "bool":
            parser.add_argument(f"--{field.name.replace('_', '-')}", action=argparse.BooleanOptionalAction)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(SpokenWarmStartConfig)
                 if getattr(args, f.name, None) is not None}
    result: dict[str, object] = {}
    if args.evaluate is not None:
        model, processor = load_policy(args.evaluate)
        result["policy"] = str(args.evaluate)
    else:
        config = SpokenWarmStartConfig(**overrides)
        model, processor, timings = train_spoken_warm_start(args.seed, config)
        if args.out is not None:
            save_policy(model, processor, args.out)
        result["config"] = dataclasses.asdict(config)
        result["build_seconds"] = {k: round(v) for k, v in timings.items()}
    inputs = Inputs(processor)
    started = time.monotonic()
    result["typed"] = dataclasses.asdict(evaluate(model, inputs, spoken=False, n=args.n))
    result["spoken"] = dataclasses.asdict(evaluate(model, inputs, spoken=True, n=args.n))
    result["eval_seconds"] = round(time.monotonic() - started)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
