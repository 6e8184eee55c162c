"""The rollout controller: takes each new policy version through the canary steps, then promotes it or
rolls it back. The whole algorithm is RolloutController.tick, read top to bottom.

State: every change is one RolloutState written to the compacted rollout topic in a Kafka transaction
before it counts (and before an operator's command is answered). A (re)started controller reads the
newest state and carries on from its step, whose start time is in the state, so a restart neither
repeats nor skips a step. Evidence is rebuilt from the generations and feedback topics since the
rollout began, so the analysis after a restart sees what it would have seen.

One controller at a time: all controllers of a deployment share one transactional id, and starting
one fences the others, whose next write fails (ProducerFencedError); a fenced controller stops.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from google.protobuf import timestamp_pb2
from kafka import KafkaProducer, TopicPartition
from kafka.errors import KafkaError, ProducerFencedError
from prometheus_client import Counter, Gauge

from modalign.core.config import ConfigError
from modalign.core.kafka import KafkaConfig, assign, decode_record, make_consumer, read_topic, type_headers
from modalign.core.version_names import STARTING_VERSION
from modalign.core.versions import ACTIVE_PHASES
from modalign.rollout.analysis import STATISTICAL_METRICS, analyse, describe, guard_verdicts, has_required_samples
from modalign.rollout.evidence import EvidenceCollector, TrafficScraper
from modalign.v1 import events_pb2

log = logging.getLogger(__name__)

STATE_KEY = b"current"

CANARY_WEIGHT = Gauge("modalign_rollout_canary_weight_percent", "Share of sessions routed to the canary.")
STEP_INDEX = Gauge("modalign_rollout_step_index", "Index of the current canary step (0-based).")
STATE_INFO = Gauge(
    "modalign_rollout_state_info", "1 for the current rollout state.",
    ["stable_version", "canary_version", "phase", "pinned_version"],
)
ANALYSIS_STATISTIC = Gauge(
    "modalign_rollout_analysis_statistic", "Test statistic of the last analysis (z, or canary wins), per metric.",
    ["metric"],
)
ANALYSIS_P_VALUE = Gauge(
    "modalign_rollout_analysis_p_value", "One-sided p-value of 'canary worse' at the last analysis.", ["metric"]
)
EVIDENCE_SAMPLES = Gauge(
    "modalign_rollout_evidence_samples", "Samples gathered since the rollout began, per metric and role.",
    ["metric", "role"],
)
HEAD_TO_HEAD = Gauge(
    "modalign_rollout_head_to_head", "Users' comparisons of a canary answer with a stable one since the rollout "
    "began, by outcome: canary_wins, stable_wins, ties.", ["outcome"],
)
VERDICTS = Counter(
    "modalign_rollout_verdicts_total", "Analysis and guard verdicts, by metric and outcome.", ["metric", "outcome"]
)
PROMOTIONS = Counter("modalign_rollout_promotions_total", "Canaries made stable.")
ROLLBACKS = Counter(
    "modalign_rollout_rollbacks_total", "Canaries withdrawn, by cause: analysis, guard, no_evidence, operator.",
    ["cause"],
)


class Fenced(RuntimeError):
    """Another controller started with the same transactional id; this one must stop acting."""


class RolloutRefused(ValueError):
    """An operator command that does not apply to the current state (gRPC FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class RolloutPolicy:
    """How each new version is rolled out (see modalign.rollout.analysis for the decision rule)."""

    initial_version: str = STARTING_VERSION
    """The stable version before any rollout: the one policy replicas load at start-up (--policy-version)."""
    steps: tuple[int, ...] = (5, 25, 50, 100)
    """The canary's share of sessions, in percent, step by step; promoted after the last step's analysis."""
    min_step_seconds: float = 60.0
    """Each step lasts at least this long, across controller restarts."""
    max_step_seconds: float = 1800.0
    """A step still short of min_samples after this long rolls the canary back (no evidence, no promotion)."""
    min_samples: int = 30
    """Samples per version a metric needs to be tested; sets the power of the analysis."""
    required_metrics: tuple[str, ...] = ("rating", "preference")
    """Metrics (rating, preference, reward) of which a step waits for any one to have min_samples per
    version; every metric that has them is then tested. Name one alone to wait for it."""
    alpha: float = 0.05
    """Chance, over a whole rollout, of rolling back a canary that is not worse (Bonferroni-split over steps
    and metrics)."""
    max_error_rate: float = 0.05
    """Hard guard: a canary with more server errors (INTERNAL, UNKNOWN, DATA_LOSS) than this share of its
    requests is rolled back at once."""
    max_p99_latency_s: float = 10.0
    """Hard guard: a canary whose p99 request latency is above this is rolled back at once."""
    guard_min_requests: int = 20
    """Canary requests (since the rollout or controller start) before the hard guards judge."""

    def validate(self) -> None:
        steps = self.steps
        if not steps or any(not 0 < s <= 100 for s in steps) or list(steps) != sorted(set(steps)):
            raise ConfigError("steps", f"increasing percentages in (0, 100], got {','.join(map(str, steps))}")
        unknown = set(self.required_metrics) - set(STATISTICAL_METRICS)
        if unknown:
            raise ConfigError("required_metrics", f"unknown {sorted(unknown)}; known: {', '.join(STATISTICAL_METRICS)}")
        if not 0 < self.alpha < 1:
            raise ConfigError("alpha", f"in (0, 1), got {self.alpha}")


class StateStore:
    """The rollout topic: the newest state, and transactional writes of new ones."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self._kafka = kafka
        self._topic = kafka.topic("rollout")
        self._producer = KafkaProducer(
            **kafka.client_kwargs(), transactional_id=kafka.topic("rollout-controller"), enable_idempotence=True,
            acks="all",
            max_block_ms=int(kafka.produce_timeout_s * 1000),
        )
        # Fences every other producer with this id and aborts its open transaction, so the read below
        # sees everything a previous controller committed and nothing it can still change.
        self._producer.init_transactions()

    def read(self) -> events_pb2.RolloutState | None:
        states = read_topic(self._kafka, "rollout", events_pb2.RolloutState)
        return states[-1] if states else None

    def write(self, state: events_pb2.RolloutState) -> None:
        """Returns once the state is committed; raises Fenced, or KafkaError with nothing written."""
        try:
            self._producer.begin_transaction()
            self._producer.send(self._topic, key=STATE_KEY, value=state.SerializeToString(), headers=type_headers(state))
            self._producer.commit_transaction()
        except ProducerFencedError as error:
            raise Fenced(str(error)) from error
        except KafkaError:
            try:
                self._producer.abort_transaction()
            except KafkaError:
                log.warning("could not abort the failed transaction", exc_info=True)
            raise

    def close(self) -> None:
        self._producer.close(timeout=5)


class VersionCatalog:
    """Every version published to policy-versions, with its offset: later offsets are newer versions."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self._consumer = make_consumer(kafka, group_id=None)
        self._partition = TopicPartition(kafka.topic("policy-versions"), 0)
        assign(self._consumer, [self._partition])
        self._consumer.seek_to_beginning(self._partition)
        self.published: dict[str, tuple[int, events_pb2.PolicyVersionPublished]] = {}

    def poll(self) -> None:
        end = self._consumer.end_offsets([self._partition])[self._partition]
        while self._consumer.position(self._partition) < end:
            for records in self._consumer.poll(timeout_ms=500).values():
                for record in records:
                    if (event := decode_record(events_pb2.PolicyVersionPublished, record)) is not None:
                        # The first announcement counts: one repeated later (a trainer restarted
                        # after announcing) must not start a second rollout of the version.
                        self.published.setdefault(event.version, (record.offset, event))

    def newest_since(self, offset: int) -> tuple[int, events_pb2.PolicyVersionPublished] | None:
        candidates = [entry for entry in self.published.values() if entry[0] >= offset]
        return max(candidates, key=lambda entry: entry[0]) if candidates else None

    def close(self) -> None:
        self._consumer.close()


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


@dataclass
class RolloutController:
    policy: RolloutPolicy
    store: StateStore
    catalog: VersionCatalog
    evidence: EvidenceCollector
    traffic: TrafficScraper
    on_state: Callable[[events_pb2.RolloutState], None] = lambda state: None
    """Called after each committed change (the KServe driver)."""
    state: events_pb2.RolloutState = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.state = self.store.read() or events_pb2.RolloutState(stable_version=self.policy.initial_version)
        self._gather_from_rollout_start()
        self._publish_metrics()
        log.info("rollout state at start: %s", self.summary())

    # ---- the algorithm -------------------------------------------------------------------------------

    def tick(self) -> None:
        """One round of observing and deciding; called every rollout.tick_seconds."""
        with self._lock:
            self.catalog.poll()
            if self.state.pinned_version:
                return
            if self.state.phase not in ACTIVE_PHASES:
                self._start_newest_version()
                return
            if self._guards_tripped():
                return
            if not self._gather():
                return  # still reading the evidence (after a restart): decide on all of it, not part
            if self.state.phase == events_pb2.ROLLOUT_PHASE_PROGRESSING:
                self._conclude_step_when_due()

    def _start_newest_version(self) -> None:
        newest = self.catalog.newest_since(self.state.policy_versions_offset)
        if newest is None:
            return
        offset, event = newest
        steps = self.policy.steps
        self._commit(
            f"new version {event.version}: step 1/{len(steps)} at {steps[0]}%",
            canary_version=event.version, canary_weight_percent=steps[0], step_index=0,
            phase=events_pb2.ROLLOUT_PHASE_PROGRESSING, policy_versions_offset=offset + 1,
            rollout_started_at=_now(), step_started_at=_now(), verdicts=[],
        )
        self._gather_from_rollout_start()

    def _guards_tripped(self) -> bool:
        canary, stable = self.state.canary_version, self.state.stable_version
        traffic = self.traffic.traffic(canary, stable)
        verdicts = guard_verdicts(
            traffic[canary], traffic[stable], max_error_rate=self.policy.max_error_rate,
            max_p99_latency_s=self.policy.max_p99_latency_s, min_requests=self.policy.guard_min_requests,
        )
        tripped = [v for v in verdicts if v.outcome == "guard"]
        if tripped:
            self._record(verdicts)
            self._rollback("guard", f"rolled back {canary} at once: " + "; ".join(map(describe, tripped)), verdicts)
        return bool(tripped)

    def _conclude_step_when_due(self) -> None:
        policy, state = self.policy, self.state
        elapsed = time.time() - state.step_started_at.ToSeconds()
        canary, stable = state.canary_version, state.stable_version
        enough = has_required_samples(self.evidence.evidence, canary, stable, policy.required_metrics, policy.min_samples)
        if elapsed < policy.min_step_seconds:
            return
        if not enough:
            if elapsed > policy.max_step_seconds:
                verdicts = self._analyse()
                self._rollback("no_evidence", f"rolled back {canary}: step {state.step_index + 1} lacked evidence after"
                               f" {elapsed:.0f}s: " + "; ".join(map(describe, verdicts)), verdicts)
            return
        verdicts = self._analyse()
        self._record(verdicts)
        summary = "; ".join(map(describe, verdicts))
        if any(v.outcome == "worse" for v in verdicts):
            self._rollback("analysis", f"rolled back {canary} at step {state.step_index + 1}: {summary}", verdicts)
        elif state.step_index + 1 < len(policy.steps):
            step = state.step_index + 1
            self._commit(
                f"{canary} step {step + 1}/{len(policy.steps)} at {policy.steps[step]}%: {summary}",
                canary_weight_percent=policy.steps[step], step_index=step, step_started_at=_now(), verdicts=verdicts,
            )
        else:
            self._commit(
                f"promoted {canary} after {len(policy.steps)} steps: {summary}",
                stable_version=canary, canary_weight_percent=0, phase=events_pb2.ROLLOUT_PHASE_PROMOTED,
                verdicts=verdicts,
            )
            PROMOTIONS.inc()

    def _analyse(self) -> list[events_pb2.AnalysisVerdict]:
        return analyse(
            self.evidence.evidence, self.state.canary_version, self.state.stable_version,
            alpha=self.policy.alpha, looks=len(self.policy.steps), min_samples=self.policy.min_samples,
        )

    def _rollback(self, cause: str, reason: str, verdicts: list[events_pb2.AnalysisVerdict], by: str = "") -> None:
        self._commit(reason, by, canary_weight_percent=0, phase=events_pb2.ROLLOUT_PHASE_ROLLED_BACK, verdicts=verdicts)
        ROLLBACKS.labels(cause).inc()

    # ---- operator commands (the RolloutService) ------------------------------------------------------

    def pause(self, reason: str, by: str = "") -> events_pb2.RolloutState:
        with self._lock:
            if self.state.phase != events_pb2.ROLLOUT_PHASE_PROGRESSING:
                raise RolloutRefused(f"no rollout is progressing (phase {self._phase_name()})")
            return self._commit(f"paused by operator: {reason}", by, phase=events_pb2.ROLLOUT_PHASE_PAUSED)

    def resume(self, reason: str, by: str = "") -> events_pb2.RolloutState:
        with self._lock:
            if self.state.phase != events_pb2.ROLLOUT_PHASE_PAUSED:
                raise RolloutRefused(f"no rollout is paused (phase {self._phase_name()})")
            return self._commit(f"resumed by operator: {reason}", by, phase=events_pb2.ROLLOUT_PHASE_PROGRESSING,
                                step_started_at=_now())

    def promote(self, reason: str, by: str = "") -> events_pb2.RolloutState:
        with self._lock:
            self._require_canary()
            PROMOTIONS.inc()
            return self._commit(
                f"promoted {self.state.canary_version} by operator: {reason}", by, stable_version=self.state.canary_version,
                canary_weight_percent=0, phase=events_pb2.ROLLOUT_PHASE_PROMOTED, verdicts=[],
            )

    def rollback(self, reason: str, by: str = "") -> events_pb2.RolloutState:
        with self._lock:
            self._require_canary()
            self._rollback("operator", f"rolled back {self.state.canary_version} by operator: {reason}", [], by)
            return self.state

    def pin(self, version: str, reason: str, by: str = "") -> events_pb2.RolloutState:
        with self._lock:
            if not version:
                return self._commit(f"unpinned by operator: {reason}", by, pinned_version="", step_started_at=_now())
            self.catalog.poll()
            if version != self.policy.initial_version and version not in self.catalog.published:
                raise LookupError(f"version {version!r} was never published")
            return self._commit(f"pinned {version} by operator: {reason}", by, pinned_version=version)

    def _require_canary(self) -> None:
        if self.state.phase not in ACTIVE_PHASES:
            raise RolloutRefused(f"no canary is being rolled out (phase {self._phase_name()})")

    # ---- state, evidence, metrics --------------------------------------------------------------------

    def _commit(self, reason: str, by: str = "", **changes) -> events_pb2.RolloutState:
        """Writes the next state (durably, fenced) and only then makes it the current one; by is the
        principal of the operator command behind it, empty for the controller's own decisions."""
        new = events_pb2.RolloutState()
        new.CopyFrom(self.state)
        verdicts = changes.pop("verdicts", None)
        for name, value in changes.items():
            if isinstance(value, timestamp_pb2.Timestamp):
                getattr(new, name).CopyFrom(value)
            else:
                setattr(new, name, value)
        if verdicts is not None:
            del new.verdicts[:]
            new.verdicts.extend(verdicts)
        new.revision = self.state.revision + 1
        new.reason = reason
        new.changed_by = by
        new.updated_at.CopyFrom(_now())
        self.store.write(new)
        self.state = new
        log.info("rollout revision %d: %s%s", new.revision, reason, f" (command of {by})" if by else "")
        self._publish_metrics()
        self.on_state(new)
        return new

    def _gather_from_rollout_start(self) -> None:
        if self.state.phase in ACTIVE_PHASES:
            self.evidence.reset(
                self.state.canary_version, self.state.stable_version, self.state.rollout_started_at.ToMilliseconds()
            )
            self.traffic.reset()

    def _gather(self, max_seconds: float = 2.0) -> bool:
        """Reads new evidence for up to max_seconds; True once it has read everything written before."""
        if not self.evidence.catch_up(max_seconds):
            return False
        evidence, canary, stable = self.evidence.evidence, self.state.canary_version, self.state.stable_version
        for metric in ("rating", "preference", "reward"):
            canary_n, stable_n = evidence.samples(metric, canary, stable)
            EVIDENCE_SAMPLES.labels(metric, "canary").set(canary_n)
            EVIDENCE_SAMPLES.labels(metric, "stable").set(stable_n)
        for outcome, count in (("canary_wins", evidence.canary_wins), ("stable_wins", evidence.stable_wins),
                               ("ties", evidence.ties)):
            HEAD_TO_HEAD.labels(outcome).set(count)
        return True

    @staticmethod
    def _record(verdicts: list[events_pb2.AnalysisVerdict]) -> None:
        for verdict in verdicts:
            VERDICTS.labels(verdict.metric, verdict.outcome).inc()
            ANALYSIS_STATISTIC.labels(verdict.metric).set(verdict.statistic)
            ANALYSIS_P_VALUE.labels(verdict.metric).set(verdict.p_value)

    def _publish_metrics(self) -> None:
        state = self.state
        CANARY_WEIGHT.set(state.canary_weight_percent if state.phase in ACTIVE_PHASES and not state.pinned_version else 0)
        STEP_INDEX.set(state.step_index)
        STATE_INFO.clear()
        STATE_INFO.labels(state.stable_version, state.canary_version, self._phase_name(), state.pinned_version).set(1)

    def _phase_name(self) -> str:
        return events_pb2.RolloutPhase.Name(self.state.phase).removeprefix("ROLLOUT_PHASE_").lower()

    def summary(self) -> str:
        state = self.state
        return (f"revision {state.revision}, stable {state.stable_version}, canary {state.canary_version or '-'}"
                f" at {state.canary_weight_percent}% ({self._phase_name()}), pinned {state.pinned_version or '-'}")
