"""`modalign demo`: the whole online RLHF loop with simulated users, ending with a report.

1. v0: the warm start (built by modalign.demo.warmstart on first use and cached; with --spoken-share, the one that
   also hears, by modalign.demo.spoken_warmstart), or --policy-model.
2. The broker (started if it is not running; the demo's topics get their own prefix) and every
   service: feedback, policy, reward, trainer (--algorithm: DPO on the users' preferences by default,
   or PPO, A2C, RLOO or GRPO against the reward model learned from them) and the rollout controller, with
   settings that let versions move in minutes rather than hours.
3. Simulated users talk to policy and feedback over gRPC until --minutes pass or --versions versions
   have been promoted; progress is printed as it goes, and every process's resident memory is sampled.
4. Every version is evaluated on held-out scenes and the report is written to --out, with the loop's
   freshness (feedback to a version trained on it serving canary traffic) and memory.

run_loop is steps 2 and 3 alone: `modalign bench` measures freshness and memory with it.
"""

from __future__ import annotations

import shutil
import signal
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from transformers import AutoProcessor

from modalign.core.auth import CLIENT, READER, AuthConfig, ClientAuth
from modalign.core.broker import BrokerConfig
from modalign.core.config import DTYPES, FLATTEN, ConfigError, parse_config, require_one_of
from modalign.core.grpc_server import dial
from modalign.core.kafka import KafkaConfig, read_records, read_topic
from modalign.core.launch import LocalSystem
from modalign.core.modelstore import fetch, open_store
from modalign.core.version_names import STARTING_VERSION
from modalign.core.versions import ACTIVE_PHASES
from modalign.demo.freshness import Freshness, freshness
from modalign.demo.memory import MemorySampler, ResidentMemory, resident_mib, summarise, system_pids
from modalign.demo.report import evaluate_versions, head_to_head, held_out_examples, write_report
from modalign.demo.speech import available_synthesiser
from modalign.demo.spoken_warmstart import build_spoken_warm_start
from modalign.demo.users import SimulatedUsers, Tally, UsersConfig
from modalign.demo.warmstart import build_warm_start
from modalign.policy.families import audio_sampling_rate
from modalign.reward.config import BACKBONES
from modalign.trainer.algorithms import ALGORITHMS
from modalign.up import LocalPorts, local_services, local_tokens
from modalign.v1 import events_pb2, rollout_pb2, rollout_pb2_grpc

DEFAULT_CACHE = Path.home() / ".cache" / "modalign" / "warm-start"

# Settings for versions to move in minutes on a small CPU machine, as dotted config fields by service
# (modalign.core.config.with_overrides): checked against the service's config when the demo builds it.
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "trainer": {"round_max_seconds": 5.0, "min_pairs_to_learn": 16, "rounds_per_version": 2,
                # The users give about 40 feedback a second, five times what the trainer learns from on
                # these two cores: without a bound it fell ever further behind, and a version served a
                # median 78 s after the feedback it learned from (3 minutes in; more later). Passing over
                # what is older keeps each version on feedback about the versions serving now.
                "max_feedback_age_s": 10.0,
                "learner.max_new_tokens": 32, "learner.policy_lr": 1e-4,
                # An SFT term on users' chosen answers: for DPO, RPO's (DPO alone lowered chosen tokens with
                # rejected ones: greedy v10 answered "O." for "One."); for the on-policy algorithms, PPO-ptx's.
                "learner.sft_weight": 1.0,
                # GRPO as Dr. GRPO: a yes/no question's samples differ only by the reward model's noise (it
                # cannot see whether an object is there). Divided by their own spread, that noise steered like
                # signal; divided by the batch's, every step was smaller. Unscaled, GRPO halved hallucination.
                "learner.grpo_scale_rewards": "none",
                # The reward gain is measured on 16 prompts: refuse only a loss that stands out of that noise.
                "gate.reward_gain_z": 1.64},
    "rollout": {"rollout.steps": (50, 100), "rollout.min_step_seconds": 10.0, "rollout.min_samples": 15,
                "rollout.required_metrics": ("rating",), "tick_seconds": 1.0},
}


# Per --algorithm: the trainer's settings that replace DEMO_SETTINGS's. A2C takes one step per batch of
# episodes where PPO, RLOO and GRPO take policy_epochs x (episodes / minibatch_size) = 4: at their learning
# rate it moved a quarter as far, and cut hallucination by a third where they halved it.
DEMO_ALGORITHM: dict[str, dict[str, Any]] = {"a2c": {"learner.policy_lr": 3e-4}}


# With --spoken-share: the trainer's settings that replace DEMO_SETTINGS's (and DEMO_ALGORITHM's) for the spoken v0,
# a Qwen2.5-Omni thinker. With the LLaVA's settings its rounds took ~48 s where the LLaVA's took ~23 on the same
# machine (a spoken prompt is ~45 audio tokens longer), 70% of it training the reward model (py-spy), and it published
# 5 versions in the 9 minutes, which cut spoken questions' hallucination by 41%. One pass over the reward model's
# pairs a round instead of two brought rounds to ~32 s, and twice the learning rate moves each version further:
# 8 versions published (7 promoted), a 56% cut (docs/demo.md has the runs).
DEMO_SPOKEN: dict[str, Any] = {"learner.policy_lr": 2e-4, "learner.reward_epochs": 1}


# With --lora: the trainer's settings that replace DEMO_SETTINGS's (and DEMO_ALGORITHM's). An adapter's update is a low-rank
# slice of a full one, so it takes a larger learning rate to move as far per step.
DEMO_LORA: dict[str, Any] = {"learner.lora_rank": 16, "learner.lora_alpha": 32.0, "learner.policy_lr": 1e-3}


@dataclass(frozen=True)
class DemoConfig:
    """The whole online RLHF loop with simulated users, ending with a report."""

    broker: BrokerConfig = field(default_factory=BrokerConfig, metadata=FLATTEN)
    """The local broker: used if running, else started, and stopped again at the end."""
    out: Path = Path("modalign-demo")
    """Where the report goes; the run's services keep their state in its work/ folder, emptied at the start
    of every run."""
    minutes: float = 9.0
    """Longest the loop runs."""
    versions: int = 20
    """Stop once this many versions were promoted (the on-policy algorithms promote one about every 40 s)."""
    seed: int = 0
    """Seed of the warm start, the trainer and the simulated users."""
    algorithm: str = "dpo"
    """The trainer's policy algorithm: dpo (on the users' pairs), or ppo, a2c, rloo or grpo (against the
    reward model learned from them); one set of trainer settings serves all five, A2C's at a larger learning
    rate (DEMO_ALGORITHM; docs/demo.md has runs)."""
    lora: bool = False
    """Train the policy as a LoRA adapter on its frozen base (DEMO_LORA's rank, alpha and learning rate)
    instead of training every weight."""
    reward_backbone: str = "generative"
    """The reward model's backbone: generative (the default) or clip (a CLIP dual encoder, cheaper; it
    matters to ppo, a2c, rloo and grpo, which optimise against it)."""
    users: int = 4
    """Simulated users sending requests at once."""
    spoken_share: float = 0.0
    """Share of the users' first questions asked aloud, follow-ups staying typed (a WAV of the question spoken by
    espeak-ng, or by a tone synthesiser where it is not installed: services/demo/speech.py). Above 0, v0 is the
    spoken warm start, a Qwen2.5-Omni thinker that hears (built on first use and cached, like the LLaVA's), and the
    report gives hallucination and win rate for spoken questions beside typed ones."""
    policy_model: Path | None = None
    """A Hugging Face image-text-to-text checkpoint folder to start from instead of the warm start (one that
    hears, with --spoken-share)."""
    device: str = "cpu"
    """Torch device of the policy, reward model, trainer and evaluation: cpu, cuda, cuda:1, ..."""
    dtype: str = "float32"
    """Precision of the policy and reward services and of the trainer's forward passes (its weights stay
    float32): float32, bfloat16 or float16."""
    cache_dir: Path = DEFAULT_CACHE
    """Where warm starts are cached."""
    held_out: int = 200
    """Held-out scenes each version is judged on."""
    grpc_base_port: int = 21151
    """policy, feedback, reward REST, reward gRPC, rollout and the policy's HTTP API listen on this port and
    the next five. Below Linux's ephemeral range (32768-60999): a run once failed because one of its own
    Kafka connections had taken 50152, the old default, as its source port."""
    metrics_base_port: int = 9201
    """policy, feedback, trainer and rollout serve /metrics on this port, +1, +3 and +4."""

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError("algorithm", f"unknown {self.algorithm!r}; known: {', '.join(sorted(ALGORITHMS))}")
        require_one_of("dtype", self.dtype, DTYPES)
        require_one_of("reward_backbone", self.reward_backbone, BACKBONES)
        if not 0.0 <= self.spoken_share <= 1.0:
            raise ConfigError("spoken_share", f"{self.spoken_share} is not a share between 0 and 1")
        if self.spoken_share > 0 and self.reward_backbone == "clip":
            raise ConfigError("spoken_share", "spoken questions need the generative reward model: CLIP hears nothing")
        if self.spoken_share > 0 and self.policy_model is not None and audio_sampling_rate(
                AutoProcessor.from_pretrained(self.policy_model)) is None:
            raise ConfigError("policy_model", f"{self.policy_model} hears nothing: --spoken-share needs a model that takes audio")


def service_settings(config: DemoConfig, policy_model: Path) -> dict[str, dict[str, Any]]:
    """DEMO_SETTINGS (with the algorithm's, --spoken-share's and --lora's) with where the demo's models are and the device they run on."""
    return {
        **DEMO_SETTINGS,
        "policy": {"model_dir": str(policy_model), "device": config.device, "dtype": config.dtype},
        "reward": {"device": config.device, "dtype": config.dtype, "backbone": config.reward_backbone},
        "trainer": {**DEMO_SETTINGS["trainer"], "learner.algorithm": config.algorithm, "learner.policy_model_dir": str(policy_model),
                    "learner.seed": config.seed, "learner.device": config.device, "learner.dtype": config.dtype,
                    "learner.reward_backbone": config.reward_backbone, **DEMO_ALGORITHM.get(config.algorithm, {}),
                    **(DEMO_SPOKEN if config.spoken_share > 0 else {}), **(DEMO_LORA if config.lora else {})},
    }


def main(argv: list[str] | None = None) -> int:
    config = parse_config(DemoConfig, argv, prog="modalign demo")
    policy_model, warm_start_seconds = starting_policy(config)
    stopping: list[bool] = []
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    loop = run_loop(config, policy_model, stopping)
    # After the services stopped: the evaluation has the CPU to itself.
    print(f"demo: loop ran {loop.seconds:.0f} s, {loop.promoted} versions promoted; evaluating ...", flush=True)
    report(config, loop, policy_model, warm_start_seconds)
    return 0


def starting_policy(config: DemoConfig) -> tuple[Path, float]:
    """v0's folder, --policy-model or the warm start (built on first use, then cached), and the seconds
    the warm start took (0 for --policy-model)."""
    if config.policy_model is not None:
        return config.policy_model, 0.0
    started = time.monotonic()
    if config.spoken_share > 0:
        print(f"speech: the users' spoken questions are spoken by {available_synthesiser()}", flush=True)
    print(f"warm start: building or loading {'the spoken ' if config.spoken_share > 0 else ''}v0 ...", flush=True)
    build = build_spoken_warm_start if config.spoken_share > 0 else build_warm_start
    policy_model = build(config.cache_dir, seed=config.seed)
    seconds = time.monotonic() - started
    print(f"warm start: {policy_model} ({seconds:.0f} s)", flush=True)
    return policy_model, seconds


@dataclass(frozen=True)
class Loop:
    """One run of the loop: how it went, and what it left on the topics and in the work folder."""

    seconds: float
    """From the users' start to their stop."""
    promoted: int
    tally: Tally
    published: list[events_pb2.PolicyVersionPublished]
    states: list[events_pb2.RolloutState]
    freshness: Freshness
    memory: dict[str, ResidentMemory]
    """Per process of the system (the broker's too), its resident memory at idle and under load."""
    home: Path
    """The services' state: the model store is in its models/ folder."""


def run_loop(config: DemoConfig, policy_model: Path, stopping: list[bool]) -> Loop:
    """The loop from policy_model as v0: the broker (started unless it runs) and every service, the simulated
    users until --minutes pass, --versions versions were promoted or stopping gets an item; then what the
    loop left on the topics is read and everything started here is stopped."""
    kafka = KafkaConfig(bootstrap_servers=config.broker.bootstrap_servers, topic_prefix=f"demo-{uuid.uuid4().hex[:8]}.")
    home = config.out.resolve() / "work"
    # A previous run's trainer checkpoint and model store would be resumed and continued: every run starts
    # from v0 (the report's comparisons assume it).
    shutil.rmtree(home, ignore_errors=True)
    ports = LocalPorts(grpc_base=config.grpc_base_port, metrics_base=config.metrics_base_port)
    tokens = local_tokens(home)
    system = LocalSystem(local_services(kafka, home, ports, AuthConfig(tokens_file=tokens), service_settings(config, policy_model)),
                         home / "logs", config.broker, ready_timeout_s=300)
    users = None
    try:
        system.start()
        pids = system_pids(system, config.broker)
        idle = resident_mib(pids)
        print(f"demo: services up (logs in {home / 'logs'}); users start", flush=True)
        users = SimulatedUsers(UsersConfig(users=config.users, seed=config.seed, spoken_share=config.spoken_share),
                               ports.policy, ports.feedback,
                               http_url=f"http://{ports.policy_http}/v1", token=ClientAuth(tokens, CLIENT).token())
        loop_started = time.monotonic()
        with MemorySampler(pids) as sampler:
            users.start()
            promoted = watch(ports.rollout, ClientAuth(tokens, READER).token(), users, loop_started, config, stopping)
            users.stop()
        loop_seconds = time.monotonic() - loop_started
        published = read_topic(kafka, "policy-versions", events_pb2.PolicyVersionPublished)
        return Loop(seconds=loop_seconds, promoted=promoted, tally=users.tally, published=published,
                    states=read_topic(kafka, "rollout", events_pb2.RolloutState),
                    freshness=loop_freshness(kafka, published), memory=summarise(idle, sampler.samples), home=home)
    finally:
        if users is not None:
            users.stop()
        system.stop()


def loop_freshness(kafka: KafkaConfig, published: list[events_pb2.PolicyVersionPublished]) -> Freshness:
    """The freshness (modalign.demo.freshness) of every feedback record on the loop's topics."""
    return freshness(read_records(kafka, "feedback", events_pb2.FeedbackReceived), published,
                     read_topic(kafka, "generations", events_pb2.GenerationLogged), kafka.topic("feedback"))


def watch(rollout_address: str, token: str, users: SimulatedUsers, started: float, config: DemoConfig,
          stopping: list) -> int:
    """Prints progress every few seconds; returns the number of versions promoted when it stops."""
    seen_revision, stables = 0, {STARTING_VERSION}
    with dial(rollout_address, token) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        while not stopping and time.monotonic() - started < config.minutes * 60 and len(stables) - 1 < config.versions:
            time.sleep(5)
            state = stub.GetState(rollout_pb2.GetStateRequest(), timeout=30)
            stables.add(state.stable_version)  # stable changes only by promotion, at most once per step
            if state.revision != seen_revision:
                seen_revision = state.revision
                print(f"[{time.monotonic() - started:5.0f} s] rollout: {state.reason}", flush=True)
            canary = f", canary {state.canary_version} at {state.canary_weight_percent}%" if state.phase in ACTIVE_PHASES else ""
            tally = users.tally
            print(f"[{time.monotonic() - started:5.0f} s] stable {state.stable_version}{canary};"
                  f" requests {tally.requests} (failed {tally.failed}, {tally.conversations} follow-ups,"
                  f" {tally.http} over HTTP, {tally.spoken} spoken), feedback {dict(tally.feedback)}", flush=True)
    return len(stables) - 1


def report(config: DemoConfig, loop: Loop, policy_model: Path, warm_start_seconds: float) -> None:
    states, tally = loop.states, loop.tally
    promoted = {s.canary_version for s in states if s.phase == events_pb2.ROLLOUT_PHASE_PROMOTED}
    final = states[-1].stable_version if states else STARTING_VERSION
    store = open_store(loop.home / "models")
    versions = [(STARTING_VERSION, policy_model, True, None)] + [
        (e.version, fetch(e.uri), e.version in promoted, store.fetch("reward", e.reward_model_version)) for e in loop.published
    ]
    results = evaluate_versions(versions, held_out_examples(config.held_out), device=config.device,
                                spoken=config.spoken_share > 0)
    timeline = [
        {"time": datetime.fromtimestamp(s.updated_at.seconds, UTC).strftime("%H:%M:%S"),
         "revision": s.revision, "canary": s.canary_version, "stable": s.stable_version,
         "phase": events_pb2.RolloutPhase.Name(s.phase), "weight": s.canary_weight_percent, "reason": s.reason,
         "head_to_head": head_to_head(s.verdicts)}
        for s in states
    ]
    write_report(config.out, results, timeline,
                 {"seconds": loop.seconds, "warm_start_seconds": warm_start_seconds, "final": final, "seed": config.seed,
                  "algorithm": config.algorithm, "requests": tally.requests, "failed_requests": tally.failed,
                  "conversations": tally.conversations, "http_requests": tally.http, "spoken_requests": tally.spoken,
                  "synthesiser": available_synthesiser() if config.spoken_share > 0 else None,
                  "feedback": sum(tally.feedback.values()), "freshness_seconds": asdict(loop.freshness),
                  "memory_mib": {name: asdict(memory) for name, memory in loop.memory.items()}})
    for r in results:
        spoken = "" if r.spoken is None else (
            f"; spoken: hallucination {r.spoken.hallucination_rate:.1%}, win rate vs v0 {r.spoken.win_rate_vs_v0:.1%}")
        print(f"  {r.version}: hallucination {r.hallucination_rate:.1%}, win rate vs v0 {r.win_rate_vs_v0:.1%}{spoken}"
              f" {'(promoted)' if r.promoted else ''}")
    print(f"demo: report in {config.out / 'report.md'} and {config.out / 'report.json'}; final version {final}")
