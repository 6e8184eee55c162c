"""`modalign soak`: the whole local system under mixed traffic for --minutes while its services are killed and
restarted, then a verdict on what that cost.

1. It starts what `modalign up` starts (modalign.up.local_services in a modalign.core.launch.LocalSystem): a
   broker of its own and every service, on free loopback ports, everything they keep under --out/work. The
   trainer and the rollout controller get the demo's settings (modalign.demo.run.DEMO_SETTINGS), so that
   versions are published and go through the canary within minutes.
2. For --minutes the demo's simulated users (modalign.demo.users) talk to it as clients do: Generate in the
   single-question shorthand and as a conversation (a follow-up question makes it multi-turn),
   GenerateStream, the OpenAI-compatible HTTP API, and feedback (preferences, ratings, edits) on the answers
   they were served, over gRPC Submit or HTTP /v1/feedback. Every call is recorded: its kind, its outcome (a
   gRPC code, an HTTP status, a lost connection) and its latency. Meanwhile a schedule drawn from --seed
   SIGKILLs one of --kill-services at a time and starts it again, waiting until it is ready; and every
   --sample-seconds the resident memory (VmRSS in /proc/PID/status) of every process, the broker's JVM
   included, and the trainer's consumer lag are sampled.
3. The users stop; the soak waits (at most --drain-seconds) until the trainer has consumed the whole feedback
   topic, accounts for every acknowledged feedback, stops everything and writes soak.json, soak.md,
   latency.png, memory.png and lag.png to --out. It exits with 1 when the verdict fails.

Lost feedback. Feedback acknowledged to its client (Submit, or HTTP /v1/feedback, answered OK) must reach the
trainer. What reached it is read from the trainer's committed offsets on the feedback topic: the trainer
commits a partition's offset only after the checkpoint holding everything it consumed below that offset is
written, and a restarted trainer resumes from there (services/trainer/service.py), so the records below the
committed offsets are exactly those it has taken in for good. The soak reads the topic up to those offsets
and collects their feedback ids; an acknowledged id that is not among them is lost: acknowledged but never
stored, or stored but never consumed. The trainer's checkpointed set of consumed ids would tell the same,
but it is bounded (--recent-feedback-ids forgets the oldest) and in a format of the trainer's own; the
committed offsets are Kafka's record of the group's progress, bounded by nothing, that every Kafka tool reads.

The verdict fails on:
- any lost acknowledged feedback;
- any INTERNAL or UNKNOWN gRPC status, and any HTTP 5xx but a 503 during a restart (below);
- a call that found its service unavailable (UNAVAILABLE, HTTP 503, or a connection refused or cut) outside a
  restart of a service the call goes through: the policy for Generate, GenerateStream and chat completions,
  the feedback service for Submit, both for HTTP feedback (the policy forwards it). A restart lasts from the
  kill until --restart-grace-seconds after the service is ready again: gRPC clients reconnect with exponential
  backoff, so callers may take that long to find it back;
- memory growth: any process (one PID) whose highest RSS in the second half of its judged life is above its
  highest in the first half by more than --max-rss-growth-percent. Its judged life starts --rss-warmup-minutes
  after it was ready (loading models, the first batches, the trainer's first rounds and versions take memory
  once) and must span --rss-judged-minutes, else the process is not judged; a leak shows as a rise from one
  half to the next, a one-time allocation in the warm-up does not;
- a service that exited by itself, or was not ready again within --restart-timeout-seconds of its restart;
- a kind of call that never once succeeded (the soak did not exercise it).
Other failed calls (DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, 4xx) are counted and reported.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shlex
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from kafka import KafkaAdminClient, TopicPartition
from kafka.errors import KafkaError

from modalign.core.auth import CLIENT, AuthConfig, ClientAuth
from modalign.core.broker import BrokerConfig, running_pid
from modalign.core.config import ConfigError, parse_config
from modalign.core.kafka import KafkaConfig, decode_record, make_consumer, read_topic
from modalign.core.launch import LocalSystem
from modalign.core.processes import ManagedProcess, free_port, free_run
from modalign.demo.run import DEMO_SETTINGS
from modalign.demo.users import Call, GrpcClient, HttpClient, SimulatedUsers, UsersConfig
from modalign.trainer.service import TrainerConfig
from modalign.up import LocalPorts, local_services, local_tokens
from modalign.v1 import events_pb2

KILLABLE = ("policy", "feedback", "trainer", "rollout")
"""The services the soak may kill; never the broker, on which every acknowledgement rests."""

CALLEES = {
    "Generate": ("policy",),
    "Generate conversation": ("policy",),
    "GenerateStream": ("policy",),
    "HTTP chat completions": ("policy",),
    GrpcClient.SUBMIT: ("feedback",),
    HttpClient.SUBMIT: ("policy", "feedback"),
}
"""The services each kind of call goes through (the policy forwards HTTP feedback to the feedback service)."""

ACKNOWLEDGING_CALLS = (GrpcClient.SUBMIT, HttpClient.SUBMIT)

SERVER_ERRORS = ("INTERNAL", "UNKNOWN")

# A quarter of gRPC questions in the single-question shorthand and a quarter streamed; the rest, HTTP every
# fourth session and follow-ups (multi-turn conversations), are the demo users' own defaults.
TRAFFIC = {"shorthand_share": 0.25, "stream_share": 0.25}


@dataclass(frozen=True)
class SoakConfig:
    """Run the whole local system under mixed traffic while its services are killed and restarted, and judge
    what that cost: lost feedback, server errors, memory growth (exit status 1 when the verdict fails)."""

    out: Path = Path("modalign-soak")
    """Where soak.json, soak.md and the plots go. The system's own data (broker, models, checkpoints, logs) goes
    in its work/ folder, emptied at the start of every run."""
    minutes: float = 30.0
    """How long the traffic and the kills go on, counted from when every service is ready."""
    seed: int = 0
    """Seed of the kill schedule and of the simulated users."""
    users: int = 4
    """Simulated users sending requests at once."""
    think_seconds: float = 2.0
    """How long each user reads an answer before asking again. The default keeps the feedback below what the
    trainer learns from on two CPU cores, so its lag stays bounded; 0 asks at once, and the users outrun it."""
    kill_services: tuple[str, ...] = KILLABLE
    """The services killed (SIGKILL), one at a time, each time one of them at random: any of policy,
    feedback, trainer, rollout; empty for none."""
    kill_interval_min_seconds: float = 60.0
    """Shortest wait before a kill, from the start or from the end of the previous restart."""
    kill_interval_max_seconds: float = 180.0
    """Longest such wait; each is drawn uniformly between the two."""
    restart_timeout_seconds: float = 300.0
    """A killed service not ready again this long after its restart fails the verdict and ends the soak."""
    restart_grace_seconds: float = 30.0
    """How long after a restarted service is ready its callers may still find it unavailable and that counts
    as the restart's doing: gRPC clients reconnect with exponential backoff (1 s, growing 1.6 times an attempt)."""
    sample_seconds: float = 5.0
    """How often the memory of every process and the trainer's consumer lag are sampled."""
    drain_seconds: float = 300.0
    """After the traffic stops, the longest wait for the trainer to consume all feedback before accounting."""
    max_rss_growth_percent: float = 20.0
    """The most a process's highest RSS in the second half of its judged life may exceed that of the first half."""
    rss_warmup_minutes: float = 3.0
    """The first minutes of each process (PID) after it is ready, left out of the memory growth rule: loading
    models, the first batches, the trainer's first learning rounds and versions."""
    rss_judged_minutes: float = 5.0
    """A process is judged on memory growth only when its samples after the warm-up span at least this long."""

    def validate(self) -> None:
        if self.minutes <= 0:
            raise ConfigError("minutes", f"must be positive, got {self.minutes}")
        unknown = set(self.kill_services) - set(KILLABLE)
        if unknown:
            raise ConfigError("kill_services", f"{', '.join(sorted(unknown))}: not one of {', '.join(KILLABLE)}")
        if not 0 < self.kill_interval_min_seconds <= self.kill_interval_max_seconds:
            raise ConfigError("kill_interval_min_seconds", "must be positive and at most --kill-interval-max-seconds")
        if self.sample_seconds <= 0:
            raise ConfigError("sample_seconds", f"must be positive, got {self.sample_seconds}")


# --- what the soak records ---------------------------------------------------------------------------------


@dataclass
class Restart:
    """A service down and started again: killed by the soak, or found exited by itself."""

    service: str
    cause: str
    """"killed", or "exited with CODE" when it ended by itself."""
    down_at: float
    """Unix time of the kill, or when the exit was noticed."""
    ready_at: float | None = None
    """Unix time it was ready again; None if it never was."""


@dataclass(frozen=True)
class MemorySample:
    at: float
    process: str
    pid: int
    rss_mib: float


@dataclass(frozen=True)
class Observed:
    """What one soak saw (times are Unix times)."""

    started: float
    """When the traffic began."""
    traffic_seconds: float
    calls: list[Call]
    restarts: list[Restart]
    restart_failure: str | None
    """Why the soak ended early: a service not ready again in time."""
    memory: list[MemorySample]
    lag: list[tuple[float, int]]
    drained_after: float | None
    """Seconds after the traffic stopped until the trainer had consumed all feedback; None if not in time."""
    reached_trainer: set[str]
    """The feedback ids on the feedback topic below the trainer's committed offsets."""
    records_consumed: int
    published: list[events_pb2.PolicyVersionPublished]
    states: list[events_pb2.RolloutState]


def resident_mib(pid: int) -> float | None:
    """The process's resident set size (VmRSS) in MiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None  # gone, or a zombie (no VmRSS line)


class TrainerProgress:
    """How far the trainer's consumer group is through the feedback topic, by its committed offsets."""

    def __init__(self, kafka: KafkaConfig, group_id: str) -> None:
        self.kafka, self.group_id = kafka, group_id
        self._admin = KafkaAdminClient(**kafka.client_kwargs())
        self._consumer = make_consumer(kafka, group_id=None)
        topic = kafka.topic("feedback")
        self.partitions = [TopicPartition(topic, p) for p in sorted(self._consumer.partitions_for_topic(topic) or [])]

    def close(self) -> None:
        self._consumer.close()
        self._admin.close()

    def committed(self) -> dict[TopicPartition, int]:
        offsets = self._admin.list_group_offsets({self.group_id: self.partitions}).get(self.group_id, {})
        # -1: nothing committed yet, so nothing consumed for good.
        return {tp: max(offsets[tp].offset, 0) if tp in offsets else 0 for tp in self.partitions}

    def lag(self) -> int:
        """Feedback records the trainer has not committed: the topic's end offsets minus the group's."""
        ends, committed = self._consumer.end_offsets(self.partitions), self.committed()
        return sum(ends[tp] - committed[tp] for tp in self.partitions)

    def consumed_feedback_ids(self) -> tuple[set[str], int]:
        """The feedback ids of the records below the committed offsets, and how many records that is."""
        committed = self.committed()
        reader = make_consumer(self.kafka, group_id=None)
        ids: set[str] = set()
        try:
            reader.assign(self.partitions)
            reader.seek_to_beginning(*self.partitions)
            while any(reader.position(tp) < committed[tp] for tp in self.partitions):
                for tp, records in reader.poll(timeout_ms=1000).items():
                    for record in records:
                        received = decode_record(events_pb2.FeedbackReceived, record)
                        if record.offset < committed[tp] and received is not None:
                            ids.add(received.feedback.feedback_id)
        finally:
            reader.close()
        return ids, sum(committed.values())


class Sampler(threading.Thread):
    """Every interval: the RSS of every process of the system and the trainer's consumer lag."""

    def __init__(self, pids: Callable[[], dict[str, int]], progress: TrainerProgress, interval_s: float) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self._pids, self._progress, self._interval_s = pids, progress, interval_s
        self.memory: list[MemorySample] = []
        self.lag: list[tuple[float, int]] = []
        self._stopping = threading.Event()

    def run(self) -> None:
        while True:
            now = time.time()
            for process, pid in self._pids().items():
                if (rss := resident_mib(pid)) is not None:
                    self.memory.append(MemorySample(now, process, pid, rss))
            try:
                self.lag.append((now, self._progress.lag()))
            except KafkaError as error:  # a broker too busy to answer in time: this sample has no lag
                print(f"soak: lag not sampled: {error}", flush=True)
            if self._stopping.wait(self._interval_s):
                return

    def stop(self) -> None:
        self._stopping.set()
        self.join()


class Chaos(threading.Thread):
    """Kills one service at a time at seeded random intervals and starts it again, waiting until it is ready;
    restarts a service found exited by itself too. Every restart is recorded."""

    def __init__(self, system: LocalSystem, config: SoakConfig) -> None:
        super().__init__(name="soak-chaos", daemon=True)
        self._system, self._config = system, config
        self._rng = random.Random(config.seed)
        self.restarts: list[Restart] = []
        self.restarting: str | None = None
        """The service being restarted, if any: its memory is not sampled until it is ready (loading is not
        growth)."""
        self.failure: str | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        config, processes = self._config, {process.name: process for process in self._system.processes}
        next_kill = time.monotonic() + self._pause()
        while not self._stopping.wait(1.0):
            if (exited := self._system.exited()) is not None:
                self._restart(exited, Restart(exited.name, f"exited with {exited.process.returncode}", time.time()))
            elif config.kill_services and time.monotonic() >= next_kill:
                victim = processes[self._rng.choice(sorted(config.kill_services))]
                restart = Restart(victim.name, "killed", time.time())
                victim.kill()
                self._restart(victim, restart)
                next_kill = time.monotonic() + self._pause()
            if self.failure is not None:
                return

    def _pause(self) -> float:
        return self._rng.uniform(self._config.kill_interval_min_seconds, self._config.kill_interval_max_seconds)

    def _restart(self, process: ManagedProcess, restart: Restart) -> None:
        self.restarts.append(restart)
        self.restarting = restart.service
        print(f"soak: {restart.service} {restart.cause}; starting it again", flush=True)
        process.start()
        try:
            process.wait_ready(self._config.restart_timeout_seconds)
        except (RuntimeError, TimeoutError) as error:
            self.failure = f"{restart.service} did not come back after it was {restart.cause}: {error}"
            return
        restart.ready_at = time.time()
        self.restarting = None
        print(f"soak: {restart.service} ready again after {restart.ready_at - restart.down_at:.0f} s", flush=True)

    def stop(self) -> None:
        """Ends the schedule once a restart under way is done: the system is whole when it returns."""
        self._stopping.set()
        self.join()


# --- the run -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    config = parse_config(SoakConfig, arguments, prog="modalign soak")
    report = summarize(config, shlex.join(["modalign", "soak", *arguments]), run_soak(config))
    write_report(config.out, report)
    judged = report["verdict"]
    print(f"soak: {'PASSED' if judged['passed'] else 'FAILED'}; report in {config.out / 'soak.md'}", flush=True)
    for failure in judged["failures"]:
        print(f"  {failure}", flush=True)
    return 0 if judged["passed"] else 1


def run_soak(config: SoakConfig) -> Observed:
    """Starts the system, runs the traffic and the kills, waits for the trainer, accounts, stops the system."""
    home = config.out.resolve() / "work"
    shutil.rmtree(home, ignore_errors=True)  # a previous run's broker data, checkpoints and offsets
    broker = BrokerConfig(data_dir=home / "kafka", port=free_port(), controller_port=free_port())
    kafka = KafkaConfig(bootstrap_servers=broker.bootstrap_servers)
    ports = LocalPorts(grpc_base=free_run(6), metrics_base=free_run(5))
    tokens = local_tokens(home)
    services = local_services(kafka, home, ports, AuthConfig(tokens_file=tokens), DEMO_SETTINGS)
    trainer_config = services["trainer"]
    assert isinstance(trainer_config, TrainerConfig)  # local_services builds it
    system = LocalSystem(services, home / "logs", broker, ready_timeout_s=300)
    stopping = threading.Event()  # Ctrl-C or SIGTERM ends the traffic early; the report is still written
    previous_handlers = {signum: signal.signal(signum, lambda *_: stopping.set())
                         for signum in (signal.SIGINT, signal.SIGTERM)}
    print(f"soak: starting the system (logs in {home / 'logs'})", flush=True)
    try:
        system.start()
        chaos = Chaos(system, config)

        def pids() -> dict[str, int]:
            ready = {p.name: p.pid for p in system.processes
                     if p.process is not None and p.process.poll() is None and p.name != chaos.restarting}
            return ready | ({"broker": pid} if (pid := running_pid(broker)) is not None else {})

        progress = TrainerProgress(kafka, trainer_config.group_id)
        sampler = Sampler(pids, progress, config.sample_seconds)
        calls: list[Call] = []  # appended from the users' threads; list.append is atomic
        users = SimulatedUsers(UsersConfig(users=config.users, seed=config.seed, think_s=config.think_seconds, **TRAFFIC),
                               ports.policy, ports.feedback, http_url=f"http://{ports.policy_http}/v1",
                               token=ClientAuth(tokens, CLIENT).token(), on_call=calls.append)
        started = time.time()
        print(f"soak: {config.users} users for {config.minutes:g} minutes; killing "
              f"{', '.join(config.kill_services) or 'nothing'}", flush=True)
        sampler.start()
        chaos.start()
        users.start()
        while not stopping.is_set() and chaos.failure is None and time.time() - started < config.minutes * 60:
            stopping.wait(min(60.0, config.minutes * 60 - (time.time() - started)))
            progress_line(started, calls, chaos.restarts, sampler)
        chaos.stop()
        users.stop()
        traffic_seconds = time.time() - started
        drained_after = drain(sampler, config.drain_seconds, after=time.time())
        sampler.stop()
        reached_trainer, records_consumed = progress.consumed_feedback_ids()
        progress.close()
        return Observed(started, traffic_seconds, calls, chaos.restarts, chaos.failure, sampler.memory, sampler.lag,
                        drained_after, reached_trainer, records_consumed,
                        published=read_topic(kafka, "policy-versions", events_pb2.PolicyVersionPublished),
                        states=read_topic(kafka, "rollout", events_pb2.RolloutState))
    finally:
        print("soak: stopping the system", flush=True)
        system.stop()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def progress_line(started: float, calls: list[Call], restarts: list[Restart], sampler: Sampler) -> None:
    failed = sum(call.outcome != "OK" for call in calls)
    lag = sampler.lag[-1][1] if sampler.lag else "?"
    print(f"[{time.time() - started:5.0f} s] {len(calls)} calls ({failed} failed), {len(restarts)} restarts, "
          f"trainer lag {lag}", flush=True)


def drain(sampler: Sampler, timeout_s: float, after: float) -> float | None:
    """Seconds until a lag sample taken after `after` was 0 (the trainer consumed all feedback); None if none
    was within timeout_s."""
    while time.time() - after < timeout_s:
        if any(at > after and lag == 0 for at, lag in sampler.lag):
            return time.time() - after
        time.sleep(1.0)
    return None


# --- the report -------------------------------------------------------------------------------------------


def summarize(config: SoakConfig, command: str, seen: Observed) -> dict[str, Any]:
    """Everything soak.json holds, the verdict included; times in seconds since the traffic started."""
    started = seen.started
    windows = restart_windows(seen.restarts, config.restart_grace_seconds, end=started + seen.traffic_seconds)
    acknowledged = {call.feedback_id for call in seen.calls
                    if call.kind in ACKNOWLEDGING_CALLS and call.outcome == "OK"}
    lost = sorted(acknowledged - seen.reached_trainer)
    report = {
        "command": command,
        "config": {name: str(value) if isinstance(value, Path) else value
                   for name, value in dataclasses.asdict(config).items()},
        "traffic_seconds": round(seen.traffic_seconds, 1),
        "calls": call_summary(seen.calls, windows),
        "latency_ms": latency_per_minute(seen.calls, started),
        "memory": memory_summary(seen.memory, started, config),
        "lag": {"samples": [[round(at - started, 1), lag] for at, lag in seen.lag],
                "max": max((lag for _, lag in seen.lag), default=None),
                "drained_after_seconds": None if seen.drained_after is None else round(seen.drained_after, 1)},
        "feedback": {"acknowledged": len(acknowledged), "records_consumed_by_trainer": seen.records_consumed,
                     "acknowledged_reached_trainer": len(acknowledged) - len(lost),
                     "lost": len(lost), "lost_ids": lost},
        "restarts": [{"service": r.service, "cause": r.cause, "at_seconds": round(r.down_at - started, 1),
                      "ready_after_seconds": None if r.ready_at is None else round(r.ready_at - r.down_at, 1)}
                     for r in seen.restarts],
        "versions": {"published": [event.version for event in seen.published],
                     "promoted": canaries_in(seen.states, events_pb2.ROLLOUT_PHASE_PROMOTED),
                     "rolled_back": canaries_in(seen.states, events_pb2.ROLLOUT_PHASE_ROLLED_BACK)},
    }
    report["verdict"] = verdict(report, config, seen.restart_failure)
    return report


def canaries_in(states: list[events_pb2.RolloutState], phase: int) -> list[str]:
    """The canary versions the rollout states show reaching phase."""
    return sorted({state.canary_version for state in states if state.phase == phase})


def restart_windows(restarts: list[Restart], grace_s: float, end: float) -> dict[str, list[tuple[float, float]]]:
    """By service, the spans (Unix times) in which it was down or its callers may not have found it back yet."""
    windows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for restart in restarts:
        back = restart.ready_at + grace_s if restart.ready_at is not None else end
        windows[restart.service].append((restart.down_at, back))
    return windows


def found_unavailable(outcome: str) -> bool:
    """Whether a call's outcome says its service could not be reached: UNAVAILABLE, HTTP 503, or a connection
    refused or cut (an outcome that is neither a gRPC code nor an HTTP status)."""
    return (outcome in ("UNAVAILABLE", "HTTP 503")
            or not (outcome in grpc.StatusCode.__members__ or outcome.startswith("HTTP ")))


def during_restart(call: Call, windows: dict[str, list[tuple[float, float]]]) -> bool:
    """Whether the call overlapped a restart of a service it goes through."""
    ended = call.started + call.seconds
    return any(start <= ended and call.started <= end
               for service in CALLEES[call.kind] for start, end in windows.get(service, ()))


def call_summary(calls: list[Call], windows: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """By kind of call: how many, and each outcome's count split into during a restart of its service and outside."""
    summary: dict[str, Any] = {}
    for kind in CALLEES:
        of_kind = [call for call in calls if call.kind == kind]
        outcomes: dict[str, Counter] = defaultdict(Counter)
        for call in of_kind:
            outcomes[call.outcome]["during_restart" if during_restart(call, windows) else "outside"] += 1
        summary[kind] = {"calls": len(of_kind),
                         "outcomes": {outcome: dict(counts) for outcome, counts in sorted(outcomes.items())}}
    return summary


def latency_per_minute(calls: list[Call], started: float) -> dict[str, list[dict[str, Any]]]:
    """By kind, per minute of the soak: the count, p50 and p99 in milliseconds of the calls that succeeded."""
    by_minute: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for call in calls:
        if call.outcome == "OK":
            by_minute[call.kind][int((call.started - started) // 60)].append(call.seconds * 1000)
    return {kind: [{"minute": minute, "calls": len(ms), "p50": round(float(np.percentile(ms, 50)), 1),
                    "p99": round(float(np.percentile(ms, 99)), 1)} for minute, ms in sorted(by_minute[kind].items())]
            for kind in CALLEES if kind in by_minute}


def rss_growth_percent(samples: list[MemorySample]) -> float:
    """The highest RSS of the second half of one PID's samples (by time) over the highest of the first half, in
    percent above it."""
    middle = (samples[0].at + samples[-1].at) / 2
    first = max(s.rss_mib for s in samples if s.at <= middle)
    second = max(s.rss_mib for s in samples if s.at > middle)
    return (second / first - 1) * 100


def judged_life(life: list[MemorySample], warmup_minutes: float, judged_minutes: float) -> list[MemorySample]:
    """One PID's samples after its warm-up, or none when they span less than judged_minutes."""
    judged = [s for s in life if s.at >= life[0].at + warmup_minutes * 60]
    return judged if judged and judged[-1].at - judged[0].at >= judged_minutes * 60 else []


def memory_summary(samples: list[MemorySample], started: float, config: SoakConfig) -> dict[str, Any]:
    """By process: RSS at the start, at the end, the highest, and the largest growth of the PIDs judged (those
    sampled while ready: a restarting service is not)."""
    summary = {}
    for process in sorted({s.process for s in samples}):
        of_process = [s for s in samples if s.process == process]
        lives = defaultdict(list)
        for sample in of_process:
            lives[sample.pid].append(sample)
        judged = [kept for life in lives.values()
                  if (kept := judged_life(life, config.rss_warmup_minutes, config.rss_judged_minutes))]
        summary[process] = {
            "start_mib": round(of_process[0].rss_mib, 1), "end_mib": round(of_process[-1].rss_mib, 1),
            "max_mib": round(max(s.rss_mib for s in of_process), 1), "pids": len(lives), "pids_judged": len(judged),
            "growth_percent": round(max(rss_growth_percent(life) for life in judged), 1) if judged else None,
            "samples": [[round(s.at - started, 1), s.pid, round(s.rss_mib, 1)] for s in of_process],
        }
    return summary


def verdict(report: dict[str, Any], config: SoakConfig, restart_failure: str | None) -> dict[str, Any]:
    """The rules of the module's docstring, each failure said in words."""
    failures = []
    if report["feedback"]["lost"]:
        failures.append(f"{report['feedback']['lost']} acknowledged feedback never reached the trainer")
    for kind, summary in report["calls"].items():
        for outcome, counts in summary["outcomes"].items():
            total, outside = sum(counts.values()), counts.get("outside", 0)
            if outcome in SERVER_ERRORS or (outcome.startswith("HTTP 5") and outcome != "HTTP 503"):
                failures.append(f"{kind}: {total} {outcome}")
            elif found_unavailable(outcome) and outside:
                failures.append(f"{kind}: {outside} {outcome} outside any restart of {' or '.join(CALLEES[kind])}")
        if not summary["outcomes"].get("OK"):
            failures.append(f"{kind}: no call succeeded")
    for process, memory in report["memory"].items():
        if memory["growth_percent"] is not None and memory["growth_percent"] > config.max_rss_growth_percent:
            failures.append(f"{process}: RSS grew {memory['growth_percent']:.0f}%"
                            f" (bound {config.max_rss_growth_percent:g}%)")
    failures += [f"{r['service']} {r['cause']}" for r in report["restarts"] if r["cause"] != "killed"]
    if restart_failure is not None:
        failures.append(restart_failure.splitlines()[0])
    return {"passed": not failures, "failures": failures}


def write_report(out: Path, report: dict[str, Any]) -> None:
    """soak.json, soak.md and the plots it shows, in out/."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(out, report)
    (out / "soak.md").write_text("\n".join(markdown(report)) + "\n")


def plot(out: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    def shade_restarts(axis: Any) -> None:
        for restart in report["restarts"]:
            back = restart["ready_after_seconds"] or 0
            axis.axvspan(restart["at_seconds"] / 60, (restart["at_seconds"] + back) / 60, color="#dddddd")
            axis.text(restart["at_seconds"] / 60, 1, restart["service"], transform=axis.get_xaxis_transform(),
                      rotation=90, va="top", fontsize=7)

    def save(figure: Any, axis: Any, name: str, ylabel: str) -> None:
        axis.set_xlabel("minutes (shaded: a service down until ready again)")
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the plot, never over it
        figure.tight_layout()
        figure.savefig(out / name, dpi=110)
        plt.close(figure)

    figure, axis = plt.subplots(figsize=(10, 4))
    for index, (kind, minutes) in enumerate(report["latency_ms"].items()):
        colour = f"C{index}"
        axis.plot([m["minute"] + 0.5 for m in minutes], [m["p50"] for m in minutes], color=colour, label=f"{kind} p50")
        axis.plot([m["minute"] + 0.5 for m in minutes], [m["p99"] for m in minutes], color=colour, linestyle="--",
                  label=f"{kind} p99")
    axis.set_yscale("log")
    shade_restarts(axis)
    save(figure, axis, "latency.png", "latency per minute (ms, successful calls)")

    figure, axis = plt.subplots(figsize=(10, 4))
    for process, memory in report["memory"].items():
        axis.plot([t / 60 for t, _, _ in memory["samples"]], [mib for _, _, mib in memory["samples"]], label=process)
    shade_restarts(axis)
    save(figure, axis, "memory.png", "resident memory (MiB)")

    figure, axis = plt.subplots(figsize=(10, 3))
    axis.plot([t / 60 for t, _ in report["lag"]["samples"]], [lag for _, lag in report["lag"]["samples"]], label="lag")
    shade_restarts(axis)
    save(figure, axis, "lag.png", "trainer's feedback lag (records)")


def markdown(report: dict[str, Any]) -> list[str]:
    verdict_, feedback, lag = report["verdict"], report["feedback"], report["lag"]
    lines = [
        "# modalign soak", "",
        f"`{report['command']}`: {report['traffic_seconds'] / 60:.1f} minutes of traffic,"
        f" {len(report['restarts'])} restarts. Verdict: **{'PASSED' if verdict_['passed'] else 'FAILED'}**.", "",
        *[f"- {failure}" for failure in verdict_["failures"]],
        "", "## Calls", "",
        "Failed calls by outcome: during a restart of a service the call goes through (from its kill until the"
        " grace after it was ready again), and outside.", "",
        "| call | calls | OK | failed during a restart | failed outside |", "| --- | --- | --- | --- | --- |",
    ]
    for kind, summary in report["calls"].items():
        outcomes = summary["outcomes"]
        ok = sum(outcomes.get("OK", {}).values())
        failed = {outcome: counts for outcome, counts in outcomes.items() if outcome != "OK"}
        during = ", ".join(f"{o} {c['during_restart']}" for o, c in failed.items() if c.get("during_restart"))
        outside = ", ".join(f"{o} {c['outside']}" for o, c in failed.items() if c.get("outside"))
        lines.append(f"| {kind} | {summary['calls']} | {ok} | {during or '-'} | {outside or '-'} |")
    kinds = list(report["latency_ms"])
    minutes = sorted({m["minute"] for series in report["latency_ms"].values() for m in series})
    by_minute = {kind: {m["minute"]: m for m in series} for kind, series in report["latency_ms"].items()}
    lines += ["", "## Latency", "", "p50 / p99 in milliseconds of the calls that succeeded, per minute.", "",
              "![latency](latency.png)", "",
              "| minute | " + " | ".join(kinds) + " |", "| --- |" + " --- |" * len(kinds)]
    for minute in minutes:
        cells = [f"{m['p50']:.0f} / {m['p99']:.0f}" if (m := by_minute[kind].get(minute)) else "-" for kind in kinds]
        lines.append(f"| {minute} | " + " | ".join(cells) + " |")
    lines += ["", "## Memory", "", "Resident set size (VmRSS) in MiB, sampled while each service was ready. Growth: of"
              " the PIDs judged (after the warm-up, over long enough), the largest rise of the highest RSS in the second"
              " half over the first; - when none was judged.", "",
              "![memory](memory.png)", "",
              "| process | start | end | max | growth | PIDs (judged) |", "| --- | --- | --- | --- | --- | --- |"]
    for process, memory in report["memory"].items():
        growth = "-" if memory["growth_percent"] is None else f"{memory['growth_percent']:+.1f}%"
        lines.append(f"| {process} | {memory['start_mib']:.0f} | {memory['end_mib']:.0f} | {memory['max_mib']:.0f}"
                     f" | {growth} | {memory['pids']} ({memory['pids_judged']}) |")
    drained = lag["drained_after_seconds"]
    lines += ["", "## Trainer's consumer lag and feedback", "", "![lag](lag.png)", "",
              f"Feedback records not yet committed by the trainer's group: at most {lag['max']};"
              + (f" all consumed {drained:.0f} s after the traffic stopped." if drained is not None
                 else " not all consumed when the wait for it ended."), "",
              "| acknowledged feedback | reached the trainer | lost | records the trainer consumed |",
              "| --- | --- | --- | --- |",
              f"| {feedback['acknowledged']} | {feedback['acknowledged_reached_trainer']} | {feedback['lost']}"
              f" | {feedback['records_consumed_by_trainer']} |",
              "", "## Kills and restarts", "", "| at (s) | service | cause | ready again after (s) |",
              "| --- | --- | --- | --- |"]
    for restart in report["restarts"]:
        ready = "never" if restart["ready_after_seconds"] is None else f"{restart['ready_after_seconds']:.0f}"
        lines.append(f"| {restart['at_seconds']:.0f} | {restart['service']} | {restart['cause']} | {ready} |")
    versions = report["versions"]
    lines += ["", "## Rollouts", "",
              f"Published: {', '.join(versions['published']) or 'none'};"
              f" promoted: {', '.join(versions['promoted']) or 'none'};"
              f" rolled back: {', '.join(versions['rolled_back']) or 'none'}."]
    return lines
