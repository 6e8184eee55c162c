"""`modalign eval`: a policy version's answers on an evaluation set, scored against references.

    modalign eval --version v7 [--against v6 | --against-model-dir FOLDER] [--dataset PATH] [--out DIR]
    modalign eval --model-dir FOLDER ...

The version comes from the model store (verified, as the policy service loads it) or a checkpoint
folder, and answers through the serving engine (PolicyEngine), greedily by default. It writes
DIR/eval.json and DIR/eval.md with, each with a 95% interval:
  - bleu, rouge_l and exact_match over the items that have reference answers (modalign.evaluation.metrics);
  - pope (accuracy, precision, recall, F1, yes-ratio) over the items labelled yes or no;
  - reward: the mean score of the reward model published with the version (or --reward-version);
  - win_rate: how often that reward model prefers this version's answer to --against's (ties half);
  - compared: with --against, each figure above minus the other version's on the same items (the reward
    model's mean score included), with a paired bootstrap interval, and "worse" where the whole interval
    lies below zero: the test of "not worse than the version it would replace".

An evaluation set is a JSONL or Parquet file, one item per line or row:
    {"question": "What colour is the circle?", "images": ["circle.png"],
     "references": ["Red.", "The circle is red."], "label": "yes" | "no" (optional)}
An image is a path relative to the file, or a data: URL. Without --dataset, a set built from the demo's
scenes (services/demo/scenes.py) is used: questions with their reference answers, and POPE-style "Is
there a ...?" questions, half about an object in the image and half about one that is not.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from modalign.core.config import add_arguments, build_config
from modalign.core.images import InvalidImage, decode_data_url
from modalign.core.modelstore import DEFAULT_MODEL_STORE, S3Config, open_store
from modalign.core.version_names import reward_version_for
from modalign.evaluation.metrics import (
    bleu,
    bleu_score,
    bootstrap,
    exact_match,
    exact_matches,
    mean_interval,
    pope,
    rouge_l,
    rouge_l_scores,
)
from modalign.policy.conversation import Conversation, single_question
from modalign.policy.engine import GenerationRequest, PolicyEngine, Sample, SamplingParams
from modalign.policy.model import format_conversation, load_policy
from modalign.reward.backbones import AnyRewardModel, load_reward_model


@dataclass(frozen=True)
class Prompt:
    """A question and its images: typed, or spoken (its clip at the model's rate, then no text)."""

    question: str
    images: list[Image.Image]
    clip: np.ndarray | None = None

    @property
    def conversation(self) -> Conversation:
        """The one user turn the prompt stands for: its images, then its clip or its text."""
        return single_question(self.question if self.clip is None else "", [""] * len(self.images), [""] * len(self.audio))

    @property
    def audio(self) -> list[np.ndarray]:
        return [] if self.clip is None else [self.clip]


@dataclass(frozen=True)
class EvalItem:
    question: str
    images: list[Image.Image]
    references: tuple[str, ...] = ()
    label: bool | None = None
    """The true answer of a yes/no question; None for other questions."""


class DatasetError(ValueError):
    """An evaluation set that cannot be read; the message names the file, the item and the field."""


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate a policy version on an evaluation set: BLEU, ROUGE-L, POPE, reward-model score and win rate."""

    version: str = ""
    """The policy version to evaluate, from the model store (e.g. v7); with --model-dir, only its name."""
    model_dir: str = ""
    """A checkpoint folder to evaluate instead of a store version."""
    against: str = ""
    """Another store version to compare with: every figure's paired difference, and the win rate by the
    reward model; with --against-model-dir, only its name. Empty: none."""
    against_model_dir: str = ""
    """A checkpoint folder to compare with instead of a store version (a warm start's v0, say)."""
    reward_version: str = ""
    """The reward model (a store version, e.g. r7) that scores answers; empty: the one published with
    --version, if any."""
    model_store: str = DEFAULT_MODEL_STORE
    """The model store the trainer publishes to (a folder or s3://bucket/prefix)."""
    s3: S3Config = field(default_factory=S3Config)
    """How to reach an s3:// model store."""
    dataset: str = ""
    """A JSONL or Parquet evaluation set (see `modalign eval --help`'s description); empty: the built-in
    set of the demo's scenes."""
    builtin_items: int = 200
    """Items of the built-in set: half questions with reference answers, half yes/no questions."""
    out: Path = Path("modalign-eval")
    """Where eval.json and eval.md are written."""
    max_new_tokens: int = 32
    """Tokens per answer at most."""
    temperature: float = 0.0
    """Sampling temperature; 0 decodes greedily, as reference-based metrics are usually reported."""
    seed: int = 0
    """Seed of the built-in set and of sampling."""
    device: str = "cpu"
    """Torch device for the models."""


def builtin_items(n: int, seed: int) -> list[EvalItem]:
    """The demo's scenes: n // 2 questions of the other kinds and n - n // 2 of the "exists" kind ("Is there a
    COLOUR SHAPE in the image?", half about an object in the scene, half about one that is not), each with
    its concise and verbose reference answers, the exists questions also with their yes/no label."""
    from modalign.demo import scenes  # the task's vocabulary and judge; only the built-in set needs them

    rng = random.Random(seed)
    other_kinds = [kind for kind in scenes.QUESTION_KINDS if kind != "exists"]
    items = []
    for index in range(n):
        scene = scenes.make_scene(rng)
        question = scenes.make_question(scene, rng, "exists" if index % 2 else rng.choice(other_kinds))
        references = tuple(scenes.reference_answer(scene, question, style) for style in scenes.STYLES)
        label = question.answer_is_yes
        items.append(EvalItem(question.text, [scene.image()], references, label))
    return items


def load_items(path: Path) -> list[EvalItem]:
    """The items of a JSONL or Parquet evaluation set; DatasetError names what is wrong, and where."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows: list[Any] = pq.read_table(path).to_pylist()
    else:
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DatasetError(f"{path} line {number}: not JSON ({error})") from None
    if not rows:
        raise DatasetError(f"{path}: no items")
    return [_item(row, path, f"{path} item {index}") for index, row in enumerate(rows, start=1)]


def _item(row: Any, path: Path, where: str) -> EvalItem:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: an object with question, images, references and label expected")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: question: a non-empty string required")
    images = row.get("images")
    if not isinstance(images, list) or not images:
        raise DatasetError(f"{where}: images: a list of at least one image required")
    references = row.get("references") or []
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise DatasetError(f"{where}: references: a list of strings required")
    label = row.get("label")
    if label not in (None, "yes", "no"):
        raise DatasetError(f"{where}: label: \"yes\", \"no\" or absent, got {label!r}")
    if not references and label is None:
        raise DatasetError(f"{where}: references or label: an item needs reference answers or a yes/no label")
    return EvalItem(question, [_image(image, path, f"{where}: images[{i}]") for i, image in enumerate(images)],
                    tuple(references), None if label is None else label == "yes")


def _image(reference: Any, path: Path, where: str) -> Image.Image:
    if not isinstance(reference, str):
        raise DatasetError(f"{where}: a path or a data: URL required")
    try:
        if reference.startswith("data:"):
            data, _ = decode_data_url(reference)
        else:
            data = (path.parent / reference).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, InvalidImage, Image.UnidentifiedImageError) as error:
        raise DatasetError(f"{where}: not a readable image ({error})") from None


@torch.no_grad()
def answers_of(engine: PolicyEngine, prompts: list[Prompt], max_new_tokens: int, seed: int,
               temperature: float = 1.0, batch: int = 32) -> list[Sample]:
    """One answer per prompt, through the serving engine; prompt i is sampled with seed + i."""
    requests = [
        GenerationRequest(format_conversation(engine.processor, prompt.conversation), prompt.images,
                          SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + i),
                          audio=prompt.audio)
        for i, prompt in enumerate(prompts)
    ]
    samples = []
    for start in range(0, len(requests), batch):
        samples.extend(candidates[0] for candidates in engine.generate(requests[start:start + batch]))
    return samples


def reward_scores(reward: AnyRewardModel, prompts: list[Prompt], answers: list[str], batch: int = 32) -> torch.Tensor:
    """The reward model's scores [len(answers)] of one answer per prompt."""
    chunks = [(prompts[start:start + batch], answers[start:start + batch]) for start in range(0, len(prompts), batch)]
    return torch.cat([
        reward.score([p.conversation for p in chunk], [p.images for p in chunk], said, [p.audio for p in chunk])
        for chunk, said in chunks
    ]).float()


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Every figure the module docstring lists, as eval.json holds them."""
    items = load_items(Path(config.dataset)) if config.dataset else builtin_items(config.builtin_items, config.seed)
    store = open_store(config.model_store, config.s3)
    folder = checkpoint("--model-dir", config.model_dir) if config.model_dir else store.fetch("policy", config.version)
    name = config.version or folder.name
    prompts = [Prompt(item.question, item.images) for item in items]

    def answers(policy_folder: Path, version: str) -> list[str]:
        engine = PolicyEngine(*load_policy(policy_folder, device=config.device), policy_version=version)
        return [s.text for s in answers_of(engine, prompts, config.max_new_tokens, config.seed, config.temperature)]

    mine = answers(folder, name)
    result: dict[str, Any] = {"version": name, "dataset": config.dataset or f"built-in ({len(items)} demo scenes)",
                              "items": len(items)}
    referenced, labelled = scored_by_kind(items)
    references = [list(items[i].references) for i in referenced]
    if referenced:
        score, interval = bleu([mine[i] for i in referenced], references)
        result["bleu"] = {"score": score, "ci": interval, "items": len(referenced)}
        score, interval = rouge_l([mine[i] for i in referenced], references)
        result["rouge_l"] = {"score": score, "ci": interval, "items": len(referenced)}
        score, interval = exact_match([mine[i] for i in referenced], references)
        result["exact_match"] = {"score": score, "ci": interval, "items": len(referenced)}
    if labelled:
        result["pope"] = pope([mine[i] for i in labelled], [bool(items[i].label) for i in labelled])
    against_name = config.against or (Path(config.against_model_dir).name if config.against_model_dir else "")
    theirs = answers(checkpoint("--against-model-dir", config.against_model_dir) if config.against_model_dir
                     else store.fetch("policy", config.against), against_name) if against_name else None
    reward_version = config.reward_version or _published_reward(store, config.version)
    scores = their_scores = None
    if reward_version:
        reward = load_reward_model(store.fetch("reward", reward_version)).to(config.device)
        scores = reward_scores(reward, prompts, mine)
        mean, interval = mean_interval(scores.tolist(), low=float("-inf"), high=float("inf"))
        result["reward"] = {"model": reward_version, "mean": mean, "ci": interval}
        if theirs is not None:
            their_scores = reward_scores(reward, prompts, theirs)
            wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores.tolist(), their_scores.tolist())]
            rate, interval = mean_interval(wins)
            result["win_rate"] = {"against": against_name, "model": reward_version, "rate": rate, "ci": interval}
    if theirs is not None:
        rewards = (scores.tolist(), their_scores.tolist()) if scores is not None and their_scores is not None else None
        result["compared"] = {"against": against_name,
                              "differences": compare(mine, theirs, items, rewards, seed=config.seed)}
    result["examples"] = [{"question": item.question, "answer": answer, "references": list(item.references)}
                          for item, answer in list(zip(items, mine))[:5]]
    return result


def scored_by_kind(items: list[EvalItem]) -> tuple[list[int], list[int]]:
    """The indices of the items scored against their references (BLEU, ROUGE-L, exact match), and of the
    yes/no items (POPE)."""
    referenced = [i for i, item in enumerate(items) if item.references and item.label is None]
    return referenced, [i for i, item in enumerate(items) if item.label is not None]


def checkpoint(flag: str, folder: str) -> Path:
    """folder, if it holds a checkpoint; else a LookupError naming the flag that gave it."""
    if not (Path(folder) / "config.json").is_file():
        raise LookupError(f"{flag} {folder}: not a checkpoint folder (no config.json)")
    return Path(folder)


def compare(mine: list[str], theirs: list[str], items: list[EvalItem], rewards: tuple[list[float], list[float]] | None,
            seed: int = 0) -> dict[str, dict[str, Any]]:
    """Each figure of one version's answers (mine) minus the same figure of another's (theirs) to the same items,
    with its 95% paired bootstrap interval, and whether the version is worse on it (the whole interval below 0).
    rewards: the reward model's score of each answer of both, if one was given. POPE's yes-ratio is left out:
    it is a bias to read, not a score to raise."""
    referenced, labelled = scored_by_kind(items)

    def per_item(mine_scores: list[float], their_scores: list[float]) -> tuple[int, Callable[[list[int]], float]]:
        """A figure that is a mean over items: the mean of the picked items' differences."""
        return len(mine_scores), lambda picks: sum(mine_scores[i] - their_scores[i] for i in picks) / len(picks)

    def corpus(subset: list[int], figure: Callable[[list[str], list[int]], float]) -> tuple[int, Callable[[list[int]], float]]:
        """figure(answers, items): the figure of the answers to those items (indices into items)."""
        def difference(picks: list[int]) -> float:
            chosen = [subset[i] for i in picks]
            return figure([mine[i] for i in chosen], chosen) - figure([theirs[i] for i in chosen], chosen)
        return len(subset), difference

    figures: dict[str, tuple[int, Callable[[list[int]], float]]] = {}
    if referenced:
        references = [list(items[i].references) for i in referenced]
        figures["bleu"] = corpus(referenced, lambda answers, chosen: bleu_score(answers, [list(items[i].references) for i in chosen]))
        figures["rouge_l"] = per_item(rouge_l_scores([mine[i] for i in referenced], references),
                                      rouge_l_scores([theirs[i] for i in referenced], references))
        figures["exact_match"] = per_item([float(m) for m in exact_matches([mine[i] for i in referenced], references)],
                                          [float(m) for m in exact_matches([theirs[i] for i in referenced], references)])
    if labelled:
        for key in ("accuracy", "precision", "recall", "f1"):
            figures[f"pope_{key}"] = corpus(labelled, lambda answers, chosen, key=key: float(
                pope(answers, [bool(items[i].label) for i in chosen])[key]))
    if rewards is not None:
        figures["reward"] = per_item(*rewards)
    differences = {}
    for name, (n, figure) in figures.items():
        value, interval = bootstrap(figure, n, seed)
        differences[name] = {"difference": value, "ci": interval, "worse": interval[1] < 0}
    return differences


def _published_reward(store, version: str) -> str:
    try:
        candidate = reward_version_for(version)
    except ValueError:  # not a numbered store version (a folder, v0): no reward model was published with it
        return ""
    return candidate if store.lookup("reward", candidate) is not None else ""


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Evaluation of {result['version']}", "", f"{result['items']} items: {result['dataset']}.", "",
             "| metric | value | 95% CI |", "| --- | --- | --- |"]
    for name, label, scale in (("bleu", "BLEU", 1), ("rouge_l", "ROUGE-L", 1), ("exact_match", "exact match", 1)):
        if name in result:
            low, high = result[name]["ci"]
            lines.append(f"| {label} ({result[name]['items']} items) | {result[name]['score'] * scale:.3g} | {low:.3g}-{high:.3g} |")
    if "pope" in result:
        figures = result["pope"]
        low, high = figures["accuracy_ci"]
        lines.append(f"| POPE accuracy ({figures['questions']} yes/no questions) | {figures['accuracy']:.1%} | {low:.1%}-{high:.1%} |")
        lines += [f"| POPE {key} | {figures[key]:.3g} | |" for key in ("precision", "recall", "f1", "yes_ratio")]
    if "reward" in result:
        low, high = result["reward"]["ci"]
        lines.append(f"| mean reward ({result['reward']['model']}) | {result['reward']['mean']:.3f} | {low:.3f}-{high:.3f} |")
    if "win_rate" in result:
        low, high = result["win_rate"]["ci"]
        lines.append(f"| win rate vs {result['win_rate']['against']} (by {result['win_rate']['model']}) |"
                     f" {result['win_rate']['rate']:.1%} | {low:.1%}-{high:.1%} |")
    if "compared" in result:
        lines += ["", f"## Against {result['compared']['against']}", "",
                  "Each figure minus the other version's on the same items, with a paired bootstrap interval.", "",
                  "| figure | difference | 95% CI | |", "| --- | --- | --- | --- |"]
        for name, figure in result["compared"]["differences"].items():
            low, high = figure["ci"]
            lines.append(f"| {name} | {figure['difference']:+.3g} | {low:+.3g} to {high:+.3g} |"
                         f" {'worse' if figure['worse'] else 'not worse'} |")
    lines += ["", "## Sample answers", ""]
    lines += [f"- *{e['question']}* → {e['answer']!r} (reference: {e['references'][0]!r})" if e["references"]
              else f"- *{e['question']}* → {e['answer']!r}" for e in result["examples"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modalign eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, EvalConfig)
    config = build_config(parser, EvalConfig, parser.parse_args(argv))
    if not config.version and not config.model_dir:
        parser.error("--version or --model-dir: say which policy to evaluate")
    try:
        result = evaluate(config)
    except (DatasetError, LookupError) as error:
        parser.error(str(error))
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (config.out / "eval.md").write_text(markdown(result))
    print(markdown(result))
    return 0
