"""Training: modalign's trainer against TRL's trainers (trl 1.16), on the same model, data and settings, in
this one process, on the CPU.

Both sides start every pass from the same weights, the built-in ~1M-parameter LLaVA (its seed-0 build,
saved once to a folder both load), with fresh optimiser state. The data is the demo's task
(demo/scenes.py): a 32x32 scene of coloured shapes, a question about it, the grounded answer as the
chosen response and a hallucinated one as the rejected response.

  rm_training_vs_trl: one epoch of Bradley-Terry reward-model training on the same pairs.
    A  TRL's RewardTrainer on a LlamaForSequenceClassification: the LLaVA's text model (its config and
       weights) under a scalar head.
    B  RewardLearning.train (trainer/reward_learning.py) through a Learner: the generative reward model
       on the whole LLaVA.
    RewardTrainer takes a sequence-classification model on text and transformers has no such LLaVA, so
    these pairs carry no image: both sides then run the same text model (B's vision tower sits idle).
    B's reward model also reads the response's log-likelihood off the language-model head
    (reward/model.py), which A's has no counterpart of.
  policy_update_vs_trl.dpo: one epoch of DPO on the same pairs, each with its image.
    A  TRL's DPOTrainer (its vision collator; the reference a frozen copy of the policy, loaded by TRL).
    B  the registered "dpo" algorithm (trainer/algorithms/dpo.py) through the Learner's PolicyContext.
  policy_update_vs_trl.rloo and .grpo: one round: `generations` responses to each prompt (the question
  with its image) sampled at temperature 1, scored by the generative reward model, and one pass of
  policy steps over them.
    A  TRL's RLOOTrainer / GRPOTrainer: transformers' generate, then a reward function that scores with
       a reward model built as B builds its own (so both score with the same model).
    B  the registered "rloo" / "grpo" algorithm (trainer/algorithms/critic_free.py): sampling with the
       policy service's engine, scoring, the update. B keeps the log-probs its engine sampled with as the
       behaviour policy's; A computes them again in a forward pass of its own when a round takes more
       than one step (TRL's design).
  PPO is not compared: trl 1.16 has no PPOTrainer (0.29.1 was the last release with one).

Shared settings: the same batch sizes, learning rate (constant), AdamW (torch's, weight decay 0),
gradients clipped at norm 1, float32; DPO's beta 0.1; for RLOO and GRPO the same KL coefficient to the
reference (0.05, fixed), clip range 0.2 and maximum response length. TRL's own defaults otherwise, but
for gradient checkpointing, which TRL's configs turn on to save memory at the cost of a second forward
pass, and which is off here as modalign has none, and for bf16 autocast, which TRL's configs also turn on
and which is off here as modalign trains in float32 (on a CPU without native bf16 it made TRL's steps ten
times slower). Both sides run at this process's torch thread count.

Timed: the training steps of a pass, not building models, trainers or TRL's tokenised datasets. A step
runs from the end of the one before (or the start of the pass: modalign's call, TRL's on_train_begin)
to the end of its optimiser step, so it includes building its batch; for RLOO and GRPO the first step
also includes the round's generation and scoring, on both sides. B encodes its pairs inside its steps
(its trainer takes pairs, not token ids); A's reward-model dataset is tokenised before the pass.
Reported per side: samples (pairs, or prompts for RLOO and GRPO) per second of the pass, and step times
p50/p99 pooled over repeats; the ratio B/A of throughput per repeat. Repeats are interleaved (A B, then
B A, ...) after an untimed warm-up of each side.
"""

from __future__ import annotations

import copy
import io
import itertools
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import datasets
import torch
import transformers
from PIL import Image
from transformers import LlamaForSequenceClassification, TrainerCallback, TrainingArguments
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer, RLOOConfig, RLOOTrainer

from modalign.bench.common import Comparison, Measured, compared, interleaved
from modalign.core.blobs import BlobStore
from modalign.demo.scenes import examples, hallucinated_answer, reference_answer
from modalign.policy.model import build_default_policy, format_prompt, load_policy, save_policy
from modalign.reward.backbones import AnyRewardModel, new_reward_model
from modalign.trainer.batches import Prompt
from modalign.trainer.join import PreferencePair, Response
from modalign.trainer.learner import Learner, LearnerConfig
from modalign.v1 import common_pb2, events_pb2

SEED = 0
LEARNING_RATE = 3e-4  # LearnerConfig's default policy_lr and reward_lr
DPO_BETA = 0.1
KL_COEF = 0.05
CLIP_RANGE = 0.2
MODEL = "the built-in 1M-parameter LLaVA"

Config = TypeVar("Config", bound=TrainingArguments)


@dataclass(frozen=True)
class Work:
    """How much each comparison does in a pass."""

    rm_pairs: int
    dpo_pairs: int
    batch: int
    """Pairs per reward-model and DPO step; responses per RLOO and GRPO step."""
    prompts: int
    generations: int
    """Responses sampled per prompt."""
    max_new_tokens: int

    @property
    def rollout_steps(self) -> int:
        return self.prompts * self.generations // self.batch


QUICK = Work(rm_pairs=16, dpo_pairs=16, batch=8, prompts=4, generations=2, max_new_tokens=8)
FULL = Work(rm_pairs=256, dpo_pairs=128, batch=16, prompts=16, generations=4, max_new_tokens=24)


@dataclass(frozen=True)
class Judged:
    """A scene, a question about it, and two answers: the grounded one (chosen) and a hallucinated one."""

    image: Image.Image
    question: str
    chosen: str
    rejected: str


def judged(count: int) -> list[Judged]:
    rng = random.Random(SEED)
    return [Judged(e.scene.image(), e.question.text, reference_answer(e.scene, e.question),
                   hallucinated_answer(e.scene, e.question, "concise", rng))
            for e in itertools.islice(examples(SEED), count)]


def stored(image: Image.Image, blobs: BlobStore) -> str:
    """The sha256 of the image, put in blobs as a PNG (as the policy service stores a request's images)."""
    data = io.BytesIO()
    image.save(data, format="PNG")
    return blobs.put(data.getvalue())


def preference_pairs(items: list[Judged], blobs: BlobStore, *, with_images: bool) -> list[PreferencePair]:
    """The pairs as the trainer gets them from the feedback join, responses as text (as `modalign data
    import` logs a dataset's), to be tokenised by the trainer."""
    pairs = []
    for index, item in enumerate(items):
        images = [common_pb2.ImageRef(sha256=stored(item.image, blobs))] if with_images else []
        generation = events_pb2.GenerationLogged(prompt_text=item.question, images=images)
        pairs.append(PreferencePair(f"bench-{index}", "preference", generation,
                                    Response(item.chosen, None, None), Response(item.rejected, None, None)))
    return pairs


# --- timing -----------------------------------------------------------------------------------------------


class StepClock:
    """When a pass started and when each of its optimiser steps ended."""

    def __init__(self) -> None:
        self.started = 0.0
        self.ends: list[float] = []

    def start(self) -> None:
        self.started = time.perf_counter()

    def stepped(self, *_: Any, **__: Any) -> None:
        self.ends.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [end - start for start, end in zip([self.started, *self.ends], self.ends)]


class ClockCallback(TrainerCallback):
    """Drives a StepClock from a Trainer: the pass starts as its training loop does."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_begin(self, *_: Any, **__: Any) -> None:
        self.clock.start()

    def on_step_end(self, *_: Any, **__: Any) -> None:
        self.clock.stepped()


@dataclass(frozen=True)
class Pass:
    step_s: list[float]
    samples: int

    @property
    def per_s(self) -> float:
        return self.samples / sum(self.step_s)


def trl_pass(build: Callable[[list[TrainerCallback]], transformers.Trainer], samples: int) -> Pass:
    """Builds a trainer (untimed) with a clock among its callbacks, and times its training loop."""
    clock = StepClock()
    trainer = build([ClockCallback(clock)])
    trainer.remove_callback(transformers.PrinterCallback)  # it prints the run's summary even with logging off
    trainer.train()
    return Pass(clock.step_times(), samples)


def modalign_pass(optimizer: torch.optim.Optimizer, run: Callable[[], object], samples: int) -> Pass:
    """Times run(), each step ending at an optimizer step."""
    clock = StepClock()
    optimizer.register_step_post_hook(clock.stepped)
    clock.start()
    run()
    return Pass(clock.step_times(), samples)


def compare(trl: Callable[[], Pass], modalign: Callable[[], Pass], repeats: int) -> Comparison:
    """A (TRL) and B (modalign), each call a pass on fresh models (common.interleaved)."""
    return compared(interleaved({"A": trl, "B": modalign}, repeats), rate=lambda one: one.per_s,
                    times=lambda one: one.step_s)


# --- the comparisons --------------------------------------------------------------------------------------


def trl_args(config: type[Config], out: Path, batch: int, **settings: Any) -> Config:
    """A TRL config with the shared settings (module docstring); no evaluation, saving, logging or reports.
    float32 as modalign's side: TRL's configs turn bf16 autocast on by default, which a CPU without native bf16
    emulates at a tenth of the speed."""
    return config(
        output_dir=str(out), use_cpu=True, seed=SEED, per_device_train_batch_size=batch, learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False, eval_strategy="no", save_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, bf16=False, fp16=False, **settings,
    )


def learner(policy_dir: Path, blobs: BlobStore, **settings: Any) -> Learner:
    return Learner(LearnerConfig(policy_model_dir=str(policy_dir), seed=SEED, policy_lr=LEARNING_RATE,
                                 reward_lr=LEARNING_RATE, max_grad_norm=1.0, **settings), blobs)


def text_reward_model(policy_dir: Path) -> LlamaForSequenceClassification:
    """The policy's text model (its config and weights) under a fresh scalar head: what RewardTrainer takes."""
    llava, _ = load_policy(policy_dir)
    config = copy.deepcopy(llava.config.text_config)
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForSequenceClassification(config)
    model.model.load_state_dict(llava.model.language_model.state_dict())
    return model


def reward_training(policy_dir: Path, work: Path, items: list[Judged], batch: int, repeats: int) -> Comparison:
    _, processor = load_policy(policy_dir)
    # The texts modalign's reward model encodes: the chat-formatted prompt, then the response (TRL adds EOS).
    dataset = datasets.Dataset.from_list([{"prompt": format_prompt(processor, item.question, 0),
                                           "chosen": item.chosen, "rejected": item.rejected} for item in items])
    blobs = BlobStore(work / "blobs")
    pairs = preference_pairs(items, blobs, with_images=False)

    def trl() -> Pass:
        return trl_pass(lambda callbacks: RewardTrainer(
            model=text_reward_model(policy_dir), processing_class=processor.tokenizer, train_dataset=dataset,
            args=trl_args(RewardConfig, work / "trl", batch, num_train_epochs=1, max_length=None),
            callbacks=callbacks), len(items))

    def modalign() -> Pass:
        side = learner(policy_dir, blobs, reward_epochs=1, reward_batch_size=batch, reward_replay=0)
        return modalign_pass(side.models.reward_optimizer, lambda: side.reward.train(pairs), len(pairs))

    return compare(trl, modalign, repeats)


def dpo_update(policy_dir: Path, work: Path, items: list[Judged], batch: int, repeats: int) -> Comparison:
    _, processor = load_policy(policy_dir)
    eos = processor.tokenizer.eos_token
    # Text rather than conversational examples: TRL then builds the token sequences modalign does (the
    # chat-formatted prompt with its image, the response, EOS); its vision collator adds no EOS itself.
    dataset = datasets.Dataset.from_list([
        {"images": [item.image], "prompt": format_prompt(processor, item.question, 1), "chosen": item.chosen + eos,
         "rejected": item.rejected + eos} for item in items])
    blobs = BlobStore(work / "blobs")
    pairs = preference_pairs(items, blobs, with_images=True)

    def trl() -> Pass:
        return trl_pass(lambda callbacks: DPOTrainer(
            model=str(policy_dir), processing_class=processor, train_dataset=dataset,
            args=trl_args(DPOConfig, work / "trl", batch, num_train_epochs=1, beta=DPO_BETA, max_length=None),
            callbacks=callbacks), len(items))

    def modalign() -> Pass:
        side = learner(policy_dir, blobs, algorithm="dpo", policy_epochs=1, minibatch_size=batch, dpo_beta=DPO_BETA)
        return modalign_pass(side.models.policy_optimizer,
                             lambda: side.algorithm.update(side.policy_context, pairs, []), len(pairs))

    return compare(trl, modalign, repeats)


def scored_by(reward_model: AnyRewardModel) -> Callable[..., list[float]]:
    """A TRL reward function: reward_model's score of each completion, given its row's question and image."""
    def reward_model_score(completions: list[list[dict[str, str]]], question: list[str], image: list[Image.Image],
                           **_: Any) -> list[float]:
        answers = [completion[0]["content"] for completion in completions]
        return reward_model.score(question, [[one] for one in image], answers).tolist()
    return reward_model_score


TRL_ROLLOUTS: dict[str, tuple[Callable[..., transformers.Trainer], type[TrainingArguments]]] = {
    "rloo": (RLOOTrainer, RLOOConfig), "grpo": (GRPOTrainer, GRPOConfig)}


def rollout_update(algorithm: str, policy_dir: Path, work: Path, items: list[Judged], sizes: Work,
                   repeats: int) -> Comparison:
    trainer_class, config_class = TRL_ROLLOUTS[algorithm]
    _, processor = load_policy(policy_dir)
    # TRL puts the image column's image before the question in the user turn, as Prompt.question does.
    dataset = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": item.question}], "image": item.image, "question": item.question}
        for item in items])
    blobs = BlobStore(work / "blobs")
    prompts = [Prompt.question(item.question, (stored(item.image, blobs),)) for item in items]

    def trl() -> Pass:
        def build(callbacks: list[TrainerCallback]) -> transformers.Trainer:
            scorer, _ = load_policy(policy_dir)
            return trainer_class(
                model=str(policy_dir), processing_class=processor, train_dataset=dataset,
                reward_funcs=scored_by(new_reward_model("generative", scorer, processor, SEED)),
                args=trl_args(config_class, work / "trl", sizes.batch, num_generations=sizes.generations,
                              max_completion_length=sizes.max_new_tokens, temperature=1.0, beta=KL_COEF,
                              epsilon=CLIP_RANGE, num_iterations=1, steps_per_generation=sizes.rollout_steps,
                              max_steps=sizes.rollout_steps),
                callbacks=callbacks)
        return trl_pass(build, len(items))

    def modalign() -> Pass:
        side = learner(policy_dir, blobs, algorithm=algorithm, sample_prompts=len(items),
                       samples_per_prompt=sizes.generations, max_new_tokens=sizes.max_new_tokens,
                       sampling_temperature=1.0, policy_updates_per_round=1, policy_epochs=1, minibatch_size=sizes.batch,
                       kl_coef=KL_COEF, kl_target=0.0, cliprange=CLIP_RANGE)
        return modalign_pass(side.models.policy_optimizer,
                             lambda: side.algorithm.update(side.policy_context, [], prompts), len(items))

    return compare(trl, modalign, repeats)


@contextmanager
def quiet() -> Iterator[None]:
    """Without transformers', TRL's and datasets' progress bars, notices and warnings."""
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars[0]:
            transformers.logging.enable_progress_bar()
        if bars[1]:
            datasets.enable_progress_bars()


def measure_training(quick: bool, repeats: int) -> dict[str, Measured]:
    """Every comparison of the module docstring, `repeats` timed passes per side; quick: a few steps
    each, which shows that they run."""
    sizes = QUICK if quick else FULL
    items = judged(max(sizes.rm_pairs, sizes.dpo_pairs, sizes.prompts))
    with quiet(), tempfile.TemporaryDirectory(prefix="modalign-bench-training-") as folder:
        work = Path(folder)
        policy_dir = work / "policy"
        save_policy(*build_default_policy(SEED), policy_dir)
        measured = {
            "rm_training_vs_trl": Measured(
                f"{sizes.rm_pairs} pairs without images, batch {sizes.batch}, 1 epoch, the text model of {MODEL} "
                "(TRL: as a LlamaForSequenceClassification; modalign: its reward model on the whole LLaVA)", "pairs/s",
                reward_training(policy_dir, work / "rm", items[:sizes.rm_pairs], sizes.batch, repeats)),
            "policy_update_vs_trl.dpo": Measured(
                f"{sizes.dpo_pairs} pairs with an image each, batch {sizes.batch}, 1 epoch, {MODEL}", "pairs/s",
                dpo_update(policy_dir, work / "dpo", items[:sizes.dpo_pairs], sizes.batch, repeats)),
        }
        for algorithm in TRL_ROLLOUTS:
            measured[f"policy_update_vs_trl.{algorithm}"] = Measured(
                f"{sizes.prompts} prompts with an image x {sizes.generations} samples of up to {sizes.max_new_tokens} "
                f"tokens, scored by a reward model, {sizes.rollout_steps} steps of {sizes.batch}, {MODEL}", "prompts/s",
                rollout_update(algorithm, policy_dir, work / algorithm, items[:sizes.prompts], sizes, repeats))
    return measured
