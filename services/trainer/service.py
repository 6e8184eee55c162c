"""The online trainer: Kafka in, preference pairs joined, models learned, versions published.

One round, start to end:
  1. consume generations (all partitions, to join against) and feedback (this member's share of the
     partitions, in the consumer group), skipping feedback ids already consumed;
  2. join feedback into preference pairs; dead-letter what cannot be joined;
  3. learn from the new pairs (reward model, then the policy by the configured algorithm);
  4. when a version is due, run the evaluation gate (gate.py) and mark the version for publishing;
  5. write one atomic checkpoint (checkpoint.py, state.py), then commit the feedback offsets;
  6. publish the marked version (publishing.py: model store, then a PolicyVersionPublished event).
Before each round it reads the rollout topic: when the controller rolls back the version the trainer
is building on, the trainer goes back to the stable version's weights.
A crash anywhere resumes from the checkpoint's positions, so every feedback is learned from exactly
once; a crash between 5 and 6 publishes on restart.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from google.protobuf import timestamp_pb2
from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from modalign.core.blobs import BlobStore
from modalign.core.config import ConfigError, require_one_of
from modalign.core.kafka import (
    ON_GAP,
    DurableProducer,
    PoisonRecord,
    assign,
    count_poison,
    decode_record,
    ensure_topics,
    make_consumer,
    parse_record,
)
from modalign.core.modelstore import DEFAULT_MODEL_STORE, ChecksumMismatch, S3Config, open_store
from modalign.core.service import MeteredConfig, run_service, serve_metrics
from modalign.core.version_names import STARTING_VERSION
from modalign.core.versions import CommittedByTransactions
from modalign.feedback.caps import UserCap, keep_first, kept_counts
from modalign.trainer import distributed
from modalign.trainer.batches import Prompt
from modalign.trainer.checkpoint import (
    load_checkpoint,
    remove_interrupted_writes,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from modalign.trainer.gate import GateConfig, gate_candidate
from modalign.trainer.join import DeadLetter, FeedbackJoiner, JoinLimits, PreferencePair, prompt_key
from modalign.trainer.learner import Learner, LearnerConfig
from modalign.trainer.publishing import Publisher
from modalign.trainer.state import DEFAULT_RECENT_IDS, PendingVersion, RecentIds, TrainerState
from modalign.v1 import events_pb2

log = logging.getLogger(__name__)

Received = tuple[events_pb2.FeedbackReceived, tuple[int, int]]
"""A feedback record read in a round, with its (partition, offset)."""

FEEDBACK_CONSUMED = Counter("modalign_trainer_feedback_consumed_total",
                            "Feedback records consumed, by outcome: new, duplicate, malformed, capped (its user "
                            "gave more in the round than the cap allows), or stale (older than "
                            "--max-feedback-age-s when its round began: passed over, never trained on).", ["outcome"])
PAIRS = Counter("modalign_trainer_pairs_total", "Preference pairs joined, by source and split.", ["source", "split"])
DEAD_LETTERS = Counter("modalign_trainer_dead_letters_total", "Feedback sent to the dead-letter topic, by reason.", ["reason"])
ROUND_SECONDS = Histogram("modalign_trainer_round_seconds", "Wall time of one training round.",
                          buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
SAMPLES_PER_SECOND = Gauge("modalign_trainer_samples_per_second", "Preference pairs learned per second in the last learning round.")
CONSUMER_LAG = Gauge("modalign_trainer_consumer_lag_records", "Feedback records not yet consumed, by partition.", ["partition"])
LEARN_METRIC = Gauge("modalign_trainer_metric", "The last value of each learning and evaluation metric.", ["name"])
ROLLBACKS_FOLLOWED = Counter("modalign_trainer_rollbacks_followed_total",
                             "Rolled-back versions the trainer stopped building on, going back to the stable version.")
STATE_ENTRIES = Gauge(
    "modalign_trainer_state_entries",
    "What the trainer's checkpointed state holds, by kind; each is bounded (docs/operations.md).", ["kind"])
LAST_ROUND = Gauge("modalign_trainer_last_round_timestamp_seconds", "When the last round ended (Unix time).")


@dataclass(frozen=True)
class TrainerConfig(MeteredConfig):
    """The online trainer."""

    command: ClassVar[str] = "trainer"
    metrics_port: int = 9104
    """Port of the Prometheus /metrics endpoint (rank r of a torchrun job uses this + r); 0 disables it."""
    group_id: str = "modalign-trainer"
    """Kafka consumer group; torchrun ranks join the same one and share the feedback partitions."""
    work_dir: Path = Path.home() / ".local" / "share" / "modalign" / "trainer"
    """Holds the checkpoint."""
    model_store: str = DEFAULT_MODEL_STORE
    """Where versions are published: a folder (a shared volume in a cluster) or s3://bucket/prefix."""
    s3: S3Config = field(default_factory=S3Config)
    """How to reach an s3:// model store."""
    blob_dir: Path = Path.home() / ".local" / "share" / "modalign" / "blobs"
    """Content-addressed image store the policy service writes the prompts' images to."""
    round_max_feedback: int = 256
    """Feedback records consumed per round at most."""
    round_max_seconds: float = 5.0
    """A round closes after this long even when little feedback arrived."""
    max_feedback_age_s: float = 0.0
    """Feedback older than this (by its record's time) when a round begins is passed over, never trained on,
    and counted (modalign_trainer_feedback_consumed_total{outcome="stale"}): a trainer slower than its users
    then learns from what they say about the versions serving now, instead of falling ever further behind
    and training each version on older feedback. 0 (the default): all feedback is trained on, however late;
    the consumer lag (modalign_trainer_consumer_lag_records) shows a trainer that cannot keep up."""
    min_pairs_to_learn: int = 16
    """New training pairs needed before a learning step runs; fewer wait for the next round."""
    rounds_per_version: int = 4
    """Learning rounds between two candidate versions."""
    heldout_percent: int = 10
    """Share of feedback (by hash of its id, so stable across restarts) kept out of training for evaluation."""
    max_prompts: int = 4096
    """Distinct recent prompts kept for on-policy sampling."""
    max_heldout_pairs: int = 2048
    """Held-out pairs kept for evaluation, the most recent."""
    heldout_pairs_per_round: int = 256
    """The most recent held-out pairs the reward model's accuracy is reported on after every update."""
    max_replay_pairs: int = 1024
    """Pairs learned from that are kept, the most recent, for the reward model to replay (see
    --learner.reward-replay); they are checkpointed."""
    gate: GateConfig = field(default_factory=GateConfig)
    """The evaluation gate a candidate version must pass to be published."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The models and how they learn."""
    join: JoinLimits = field(default_factory=JoinLimits)
    """Bounds on the feedback waiting to be joined with its generations."""
    user_cap: UserCap = field(default_factory=UserCap)
    """How much of one round's feedback one user may give (docs/security.md)."""
    recent_feedback_ids: int = DEFAULT_RECENT_IDS
    """Feedback ids remembered to skip a feedback delivered twice (see TrainerState); bounds the checkpoint."""
    on_offset_gap: str = "resume"
    """When feedback or generations the trainer was to read next were deleted by retention (it was down
    longer than the topics keep records): resume (log an error, count them in
    modalign_kafka_offset_gap_records_total, go on from the oldest record kept) or stop (exit with that
    error, so an operator decides; restart with resume to go on)."""

    def validate(self) -> None:
        super().validate()
        require_one_of("on_offset_gap", self.on_offset_gap, ON_GAP)
        if self.max_feedback_age_s < 0:
            raise ConfigError("max_feedback_age_s", f"must be 0 (off) or more, not {self.max_feedback_age_s}")


def is_heldout(feedback_id: str, percent: int) -> bool:
    return int(hashlib.sha256(feedback_id.encode()).hexdigest()[:8], 16) % 100 < percent


class Trainer:
    def __init__(self, config: TrainerConfig, learner: Learner, rank: int = 0, world_size: int = 1) -> None:
        self.config = config
        self.learner = learner
        self.rank, self.world_size = rank, world_size
        self.store = open_store(config.model_store, config.s3)
        self.blobs = BlobStore(config.blob_dir)
        self.topics = {name: config.kafka.topic(name)
                       for name in ("generations", "feedback", "feedback.dlq", "policy-versions", "rollout")}
        self.state = TrainerState(consumed_ids=RecentIds(config.recent_feedback_ids),
                                  joiner=FeedbackJoiner(limits=config.join))
        self._restore()
        self.producer = DurableProducer(config.kafka)
        self.publisher = Publisher(self.store, self.producer, config.kafka, config.learner.algorithm)
        # Both resume from the checkpoint's positions: records retention deleted before they were read
        # are a gap the trainer reports (GapAwareConsumer), never a silent jump.
        self.generations = make_consumer(config.kafka, group_id=None, on_gap=config.on_offset_gap)
        partitions = [TopicPartition(self.topics["generations"], p)
                      for p in sorted(self.generations.partitions_for_topic(self.topics["generations"]) or [])]
        assign(self.generations, partitions)
        for tp in partitions:
            self._seek(self.generations, tp)
        # Feedback partitions are split among the ranks statically (partition % world_size == rank)
        # rather than by the group's rebalancing: the ranks of one torch.distributed job must stay in
        # lockstep, which a rebalance in the middle of a round would break. The group still holds the
        # committed offsets, so lag shows in the usual tools.
        self.feedback = make_consumer(config.kafka, group_id=config.group_id, on_gap=config.on_offset_gap,
                                      max_poll_records=config.round_max_feedback)
        feedback_partitions = [
            TopicPartition(self.topics["feedback"], p)
            for p in sorted(self.feedback.partitions_for_topic(self.topics["feedback"]) or [])
            if p % world_size == rank
        ]
        assign(self.feedback, feedback_partitions)
        for tp in feedback_partitions:
            self._seek(self.feedback, tp)
        # The controller writes in transactions; a fenced controller's aborted writes are never followed.
        self.rollout_states = make_consumer(config.kafka, group_id=None, isolation_level="read_committed")
        self.rollout_partition = TopicPartition(self.topics["rollout"], 0)
        assign(self.rollout_states, [self.rollout_partition])
        self.rollout_states.seek(self.rollout_partition, self.state.rollout_offset)
        # Only the controller's transactional writes are followed (docs/security.md).
        self.committed_states = CommittedByTransactions(self.rollout_states)

    def close(self) -> None:
        self.rollout_states.close()
        self.feedback.close()
        self.generations.close()
        self.producer.close()

    def _seek(self, consumer: KafkaConsumer, tp: TopicPartition) -> None:
        """From the checkpoint's position, the source of truth; without a checkpoint, from the group's
        committed offset (e.g. after the work directory was lost), else from the beginning."""
        position = self.state.positions.get((tp.topic, tp.partition))
        if position is None and consumer.config["group_id"] is not None:
            position = consumer.committed(tp)
        if position is None:
            consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, position)

    def _restore(self) -> None:
        if self.rank == 0:
            remove_interrupted_writes(self.config.work_dir)
        checkpoint = load_checkpoint(self.config.work_dir, into=lambda: {"learner": self.learner.state_dict()})
        if checkpoint is None:
            return
        if len(checkpoint["ranks"]) != self.world_size:
            raise RuntimeError(
                f"the checkpoint in {self.config.work_dir} was written by {len(checkpoint['ranks'])} ranks; "
                f"resume it with as many (this job has {self.world_size})"
            )
        self.state = TrainerState.from_json(checkpoint["ranks"][self.rank], self.config.join,
                                            self.config.recent_feedback_ids)
        self.learner.load_state_dict(checkpoint["learner"])
        restore_rng_state(checkpoint["rng"][self.rank])
        log.info("resumed from round %d (%d feedback consumed)", self.state.rounds, len(self.state.consumed_ids))

    # --- one round -------------------------------------------------------------------------------

    def run_round(self) -> dict[str, float]:
        started = time.monotonic()
        if self.state.pending_publish is not None:  # a crash came between checkpoint and publishing
            self._publish(self.state.pending_publish, recovering=True)
        self._follow_rollbacks()
        self._pass_over_stale_feedback()
        consumed = 0
        deadline = started + self.config.round_max_seconds
        received: list[Received] = []
        dead: list[DeadLetter] = []
        while consumed < self.config.round_max_feedback and time.monotonic() < deadline:
            self._consume_generations()
            batches = self.feedback.poll(timeout_ms=200, max_records=self.config.round_max_feedback - consumed)
            for tp, records in batches.items():
                for record in records:
                    consumed += 1
                    self.state.positions[(tp.topic, tp.partition)] = record.offset + 1
                    parsed = self._parse_feedback(record)
                    if isinstance(parsed, DeadLetter):
                        dead.append(parsed)
                    elif parsed is not None:
                        received.append((parsed, (record.partition, record.offset)))
        self._consume_generations()
        new_pairs: list[PreferencePair] = []
        for feedback, position in self._capped(received):
            joined, rejected = self.state.joiner.add_feedback(feedback, position)
            new_pairs += joined
            dead += rejected
        joined, rejected = self.state.joiner.retry_waiting()
        new_pairs += joined
        dead += rejected
        new_pairs, unusable = self._usable(new_pairs)
        self._dead_letter(dead + unusable)
        # Every rank learns from the same global list of pairs, each from its own shard of it.
        self._split([pair for rank_pairs in distributed.all_gather(new_pairs) for pair in rank_pairs])

        metrics: dict[str, float] = {}
        if len(self.state.pending_pairs) >= max(self.config.min_pairs_to_learn, self.world_size):
            metrics |= self._learn()
        self.state.rounds += 1
        self.state.pending_publish = self._maybe_gate(metrics)
        # One checkpoint holds every rank's state, committed by rank 0: a round is in it for all ranks or
        # for none, so no rank can resume ahead of the others. Under FSDP each rank writes its own shards.
        states, rngs = distributed.all_gather(self.state.to_json()), distributed.all_gather(rng_state())
        save_checkpoint(self.config.work_dir, {"ranks": states, "learner": self.learner.state_dict(), "rng": rngs},
                        rank=self.rank)
        distributed.barrier()
        log.info("round %d checkpointed: %d pairs learned so far (rank %d, parameters %s)", self.state.rounds,
                 len(self.state.trained_ids), self.rank, self.learner.models.parameter_digest())
        self._commit()
        log.info("round %d committed", self.state.rounds)
        if self.state.pending_publish is not None:
            self._publish(self.state.pending_publish)
        ROUND_SECONDS.observe(time.monotonic() - started)
        LAST_ROUND.set_to_current_time()
        state = self.state
        for kind, entries in (
            ("generations", state.joiner.generations), ("waiting_feedback", state.joiner.waiting),
            ("rated_prompts", state.joiner.ratings), ("consumed_ids", state.consumed_ids),
            ("trained_ids", state.trained_ids), ("prompts", state.prompts), ("pending_pairs", state.pending_pairs),
            ("heldout_pairs", state.heldout_pairs), ("replay_pairs", state.replay_pairs),
        ):
            STATE_ENTRIES.labels(kind).set(len(entries))
        for name, value in metrics.items():
            LEARN_METRIC.labels(name).set(value)
        return metrics

    def _pass_over_stale_feedback(self) -> None:
        """With --max-feedback-age-s: moves each feedback partition's position past the records older than
        that; the checkpoint and the committed offsets then say they were read, and the next version's event
        names them (passed_over)."""
        if not self.config.max_feedback_age_s:
            return
        partitions = sorted(self.feedback.assignment())
        since_ms = int((time.time() - self.config.max_feedback_age_s) * 1000)
        first_fresh = self.feedback.offsets_for_times({tp: since_ms for tp in partitions})
        # A partition with no record that new is stale to its end; only then is its end looked up.
        all_stale = [tp for tp in partitions if first_fresh.get(tp) is None]
        ends = self.feedback.end_offsets(all_stale) if all_stale else {}
        for tp in partitions:
            found = first_fresh.get(tp)
            target = found.offset if found is not None else ends[tp]
            position = self.feedback.position(tp)
            if position is not None and target > position:
                self.feedback.seek(tp, target)
                self.state.positions[(tp.topic, tp.partition)] = target
                self.state.passed_over.append({"topic": tp.topic, "partition": tp.partition, "start": position,
                                               "end": target})
                FEEDBACK_CONSUMED.labels("stale").inc(target - position)
                log.info("passed over %d feedback records of %s-%d older than %.0f s", target - position, tp.topic,
                         tp.partition, self.config.max_feedback_age_s)

    def _follow_rollbacks(self) -> None:
        """Goes back to the stable version when the controller rolled back the one the policy is built
        on: every later version would inherit what made users rate it worse. Rank 0 reads the topic
        and decides for all, so the ranks' models stay identical."""
        building_on, offset = self.state.parent_version, self.state.rollout_offset
        if self.rank == 0:
            tp = self.rollout_partition
            end = self.rollout_states.end_offsets([tp])[tp]
            if self.rollout_states.position(tp) >= end:
                # A record held since the last round (no commit marker seen after it) is still the last
                # one: no transaction wrote it. This second look decides it.
                self.committed_states.records(tp, [])
            deadline = time.monotonic() + self.config.round_max_seconds
            while self.rollout_states.position(tp) < end and time.monotonic() < deadline:
                polled = self.rollout_states.poll(timeout_ms=200).get(tp, [])
                for record in self.committed_states.records(tp, polled):
                    state = decode_record(events_pb2.RolloutState, record)
                    if state is not None and state.phase == events_pb2.ROLLOUT_PHASE_ROLLED_BACK and state.canary_version == building_on:
                        log.warning("the controller rolled back %s (%s): training goes on from %s",
                                    building_on, state.reason, state.stable_version)
                        ROLLBACKS_FOLLOWED.inc()
                        building_on = state.stable_version
            offset = self.committed_states.resume_offset(tp)
            if building_on not in (self.state.parent_version, STARTING_VERSION) and self.learner.models.adapts_base:
                building_on = self._on_own_base(building_on)
        building_on, self.state.rollout_offset = distributed.all_gather((building_on, offset))[0]
        if building_on == self.state.parent_version:
            return
        try:
            # The starting version need not be in the store: it is the learner's reference.
            folder = None if building_on == STARTING_VERSION else self.store.fetch("policy", building_on)
            self.learner.models.reset_policy(folder)
        except (LookupError, ValueError, ChecksumMismatch) as error:  # not in the store, damaged, or not an adapter of this LoRA base
            log.error("cannot go back to %s (%s); training goes on from %s", building_on, error,
                      self.state.parent_version)
            return
        self.state.parent_version = building_on

    def _on_own_base(self, version: str) -> str:
        """version, if it is an adapter on this LoRA trainer's base (or cannot be read: that is told
        later); else the version the trainer builds on now, with an error logged."""
        refusal = self.publisher.foreign_adapter(version, self.learner.models)
        if refusal is None:
            return version
        log.error("cannot go back to %s: %s; training goes on from %s", version, refusal, self.state.parent_version)
        return self.state.parent_version

    def _consume_generations(self) -> None:
        while batches := self.generations.poll(timeout_ms=50, max_records=1000):
            for tp, records in batches.items():
                for record in records:
                    self.state.positions[(tp.topic, tp.partition)] = record.offset + 1
                    generation = decode_record(events_pb2.GenerationLogged, record)
                    if generation is not None:
                        self.state.joiner.add_generation(generation)
                        self._remember_prompt(generation)

    def _remember_prompt(self, generation: events_pb2.GenerationLogged) -> None:
        key = prompt_key(generation)
        self.state.prompts[key] = Prompt.of(generation)
        self.state.prompts.move_to_end(key)
        while len(self.state.prompts) > self.config.max_prompts:
            self.state.prompts.popitem(last=False)

    def _parse_feedback(self, record) -> events_pb2.FeedbackReceived | DeadLetter | None:
        """The feedback a record holds; a dead letter for a malformed one; None for one seen before."""
        try:
            received = parse_record(events_pb2.FeedbackReceived, record.value, record.headers or ())
        except PoisonRecord as error:
            count_poison(record, error)
            FEEDBACK_CONSUMED.labels("malformed").inc()
            return DeadLetter(events_pb2.FeedbackReceived(), (record.partition, record.offset), f"malformed: {error}",
                              raw=record.value or b"")
        feedback_id = received.feedback.feedback_id
        if feedback_id in self.state.consumed_ids:
            FEEDBACK_CONSUMED.labels("duplicate").inc()
            return None
        self.state.consumed_ids.add(feedback_id)
        return received

    def _capped(self, received: list[Received]) -> list[Received]:
        """The round's feedback with no user beyond their cap (modalign.feedback.caps), over every rank's
        share of the round: the ranks count together, and each takes what earlier ranks left of a
        user's allowance. What is left out is consumed, never joined into pairs."""
        def user_of(item: Received) -> str:
            return item[0].feedback.user_id

        counts = distributed.all_gather(collections.Counter(user_of(item) for item in received))
        allowed = kept_counts(dict(sum(counts, collections.Counter())), self.config.user_cap)
        for earlier in counts[: self.rank]:
            allowed = {user: n - min(n, earlier[user]) for user, n in allowed.items()}
        kept, dropped = keep_first(received, user_of, allowed)
        FEEDBACK_CONSUMED.labels("new").inc(len(kept))
        if dropped:
            FEEDBACK_CONSUMED.labels("capped").inc(sum(dropped.values()))
            log.info("round %d: left out %d feedback beyond their users' caps (most: %s)", self.state.rounds,
                     sum(dropped.values()), ", ".join(f"{user} {n}" for user, n in dropped.most_common(3)))
        return kept

    def _dead_letter(self, dead: list[DeadLetter]) -> None:
        if not dead:
            return
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        records = []
        for letter in dead:
            DEAD_LETTERS.labels(letter.reason.split(":")[0]).inc()
            # Not learned from: a replay of it (modalign dead-letters replay) must read as new.
            self.state.consumed_ids.discard(letter.feedback.feedback.feedback_id)
            value = letter.raw if letter.raw is not None else letter.feedback.SerializeToString()
            records.append((letter.feedback.feedback.feedback_id, events_pb2.DeadLetter(
                source_topic=self.topics["feedback"], source_partition=letter.position[0],
                source_offset=letter.position[1], source_value=value, reason=letter.reason, dead_lettered_at=now,
            )))
        self.producer.produce(self.topics["feedback.dlq"], records, self.config.kafka.produce_timeout_s)

    def _usable(self, pairs: list[PreferencePair]) -> tuple[list[PreferencePair], list[DeadLetter]]:
        """Pairs the models can take, and dead letters for the others (an edit too long, or holding
        reserved tokens): retrying them would fail every round again."""
        usable, dead = [], []
        for pair in pairs:
            reason = self.learner.unusable_reason(pair)
            if reason is None:
                usable.append(pair)
            else:
                dead.append(DeadLetter(pair.received, pair.position, f"unusable: {reason}"))
        return usable, dead

    def _split(self, pairs: list[PreferencePair]) -> None:
        for pair in pairs:
            heldout = is_heldout(pair.feedback_id, self.config.heldout_percent)
            PAIRS.labels(pair.source, "heldout" if heldout else "train").inc()
            (self.state.heldout_pairs if heldout else self.state.pending_pairs).append(pair)
        del self.state.heldout_pairs[: -self.config.max_heldout_pairs]

    def _learn(self) -> dict[str, float]:
        # Whole shards only: the remainder waits for the next round, so every rank takes as many steps.
        usable = len(self.state.pending_pairs) - len(self.state.pending_pairs) % self.world_size
        pairs, self.state.pending_pairs = self.state.pending_pairs[:usable], self.state.pending_pairs[usable:]
        started = time.monotonic()
        metrics = self.learner.learn(pairs, self._prompts(), self.state.replay_pairs)
        self.state.replay_pairs += pairs
        del self.state.replay_pairs[: -self.config.max_replay_pairs]
        # Reported with every update; the gate evaluates on all held-out pairs.
        metrics |= self.learner.heldout_accuracy(self.state.heldout_pairs[-self.config.heldout_pairs_per_round:])
        SAMPLES_PER_SECOND.set(len(pairs) / max(time.monotonic() - started, 1e-9))
        self.state.record_trained([pair.feedback_id for pair in pairs])
        self.state.learning_rounds += 1
        return metrics

    def _prompts(self) -> list[Prompt]:
        return list(self.state.prompts.values())

    def _maybe_gate(self, metrics: dict[str, float]) -> PendingVersion | None:
        """When a version is due: the gate (gate.py); a passed candidate is named and marked for publishing."""
        if not metrics or self.state.learning_rounds % self.config.rounds_per_version != 0:
            return None
        evaluation, passed = gate_candidate(self.learner, self.config.gate, self.state.heldout_pairs, self._prompts())
        metrics |= evaluation
        if not passed:
            return None
        parent = self.state.parent_version
        version = distributed.all_gather(self.publisher.next_version(parent) if self.rank == 0 else None)[0]
        pending = PendingVersion(version, parent, evaluation, self._trained_through(), self.state.passed_over)
        self.state.passed_over = []
        return pending

    def _trained_through(self) -> list[dict]:
        return [{"topic": topic, "partition": partition, "offset": offset}
                for (topic, partition), offset in sorted(self.state.positions.items())]

    def _commit(self) -> None:
        assigned = self.feedback.assignment()
        offsets = {tp: OffsetAndMetadata(self.state.positions[(tp.topic, tp.partition)], "", -1)
                   for tp in assigned if (tp.topic, tp.partition) in self.state.positions}
        if offsets:
            self.feedback.commit(offsets)
        try:
            ends = self.feedback.end_offsets(list(assigned))
            for tp, end in ends.items():
                CONSUMER_LAG.labels(str(tp.partition)).set(end - self.state.positions.get((tp.topic, tp.partition), 0))
        except Exception:
            log.debug("could not read end offsets for the lag metric", exc_info=True)

    def _publish(self, pending: PendingVersion, recovering: bool = False) -> None:
        with self.learner.models.whole_weights():  # sharded (FSDP): every rank gathers, for rank 0 to write
            if self.rank == 0:  # rank 0 writes the store and the event; the others only follow
                self.publisher.publish(pending, self.learner.models, recovering)
        self.state.parent_version = pending.version
        self.state.pending_publish = None


def serve(config: TrainerConfig) -> None:
    rank, world_size = distributed.init_from_environment(config.learner.device)
    if rank == 0:
        ensure_topics(config.kafka)
    distributed.barrier()
    learner = Learner(config.learner, BlobStore(config.blob_dir), rank=rank, world_size=world_size)
    trainer = Trainer(config, learner, rank=rank, world_size=world_size)
    serve_metrics(config, offset=rank)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    log.info("trainer consuming %s as group %s (algorithm %s)", trainer.topics["feedback"], config.group_id,
             config.learner.algorithm)
    try:
        # Ranks stop together, after the same round: one leaving early would strand the others in a collective.
        while not any(distributed.all_gather(stopping.is_set())):
            metrics = trainer.run_round()
            if metrics:
                log.info("round %d: %s", trainer.state.rounds,
                         " ".join(f"{name}={value:.4g}" for name, value in sorted(metrics.items())))
    finally:
        trainer.close()
        distributed.shutdown()


def main(argv: list[str] | None = None) -> None:
    run_service(TrainerConfig, serve, argv)

