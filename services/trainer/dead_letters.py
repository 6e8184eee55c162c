"""`modalign dead-letters list|replay`: the feedback the trainer set aside, and putting it back once fixed.

The trainer dead-letters feedback it cannot learn from to the feedback.dlq topic, each with its reason:
  - "unjoinable: ..."  its generation never arrived (the policy could not log it, or it came later
                       than --join.max-wait-s allows);
  - "unusable: ..."    the models cannot take it (an edit longer than their positions, reserved tokens);
  - "malformed: ..."   the record is not a FeedbackReceived (its bytes are kept as they were read).
Once the cause is fixed (the generations were restored, the trainer runs with a longer wait or a model
with more positions), `replay` writes the chosen dead letters' feedback back to the feedback topic,
keyed by feedback id as the feedback service writes it. The trainer forgets the id of feedback it
dead-letters, so a replayed one is read as new; one replayed twice is learned from once (the second
copy is skipped as a duplicate, as any feedback delivered twice is). A malformed letter is replayed
only if its bytes now read as feedback, which they never do unless the reader changed: `list` shows
them, with their source partition and offset, for whoever wrote them.

Replay only writes to the feedback topic of this deployment (--kafka.topic-prefix), whatever a letter
names as its source, so it needs the trainer's Kafka credentials and nothing more.
"""

from __future__ import annotations

import argparse
import collections
from dataclasses import dataclass, field
from datetime import UTC, datetime

from modalign.core.config import ConfigError, add_arguments, build_config
from modalign.core.kafka import DurableProducer, KafkaConfig, PoisonRecord, parse_record, read_topic
from modalign.v1 import events_pb2


@dataclass(frozen=True)
class DeadLettersConfig:
    """Which dead letters to list or replay, and the Kafka they are on."""

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    """The trainer's Kafka (the same --kafka.* flags)."""
    reason: str = ""
    """Only dead letters whose reason starts with this (e.g. "unjoinable", "unusable: edit"); empty: all."""
    since: str = ""
    """Only those dead-lettered at or after this time (ISO 8601, e.g. 2026-12-03T08:00:00Z); empty: no bound."""
    until: str = ""
    """Only those dead-lettered before this time (ISO 8601); empty: no bound."""
    show: int = 20
    """`list` prints this many dead letters (the newest), after the counts by reason."""

    def validate(self) -> None:
        for name in ("since", "until"):
            if getattr(self, name):
                try:
                    _instant(getattr(self, name))
                except ValueError:
                    raise ConfigError(name, f"an ISO 8601 time such as 2026-12-03T08:00:00Z, "
                                            f"got {getattr(self, name)!r}") from None


def _instant(text: str) -> float:
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def selected(letters: list[events_pb2.DeadLetter], config: DeadLettersConfig) -> list[events_pb2.DeadLetter]:
    """The dead letters config picks, in the order they were dead-lettered."""
    since = _instant(config.since) if config.since else float("-inf")
    until = _instant(config.until) if config.until else float("inf")
    return [
        letter for letter in letters
        if letter.reason.startswith(config.reason)
        and since <= letter.dead_lettered_at.ToNanoseconds() / 1e9 < until
    ]


def replayable(letter: events_pb2.DeadLetter) -> events_pb2.FeedbackReceived | None:
    """The feedback a dead letter holds, or None when its bytes are not feedback."""
    try:
        return parse_record(events_pb2.FeedbackReceived, letter.source_value)
    except PoisonRecord:
        return None


def describe(letter: events_pb2.DeadLetter) -> str:
    feedback = replayable(letter)
    what = f"feedback {feedback.feedback.feedback_id}" if feedback is not None else "not feedback"
    when = letter.dead_lettered_at.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")
    return f"{when}  {letter.source_topic}-{letter.source_partition}@{letter.source_offset}  {what}: {letter.reason}"


def list_letters(config: DeadLettersConfig) -> list[str]:
    """Lines to print: counts by kind of reason, then the newest config.show dead letters."""
    letters = selected(read_topic(config.kafka, "feedback.dlq", events_pb2.DeadLetter), config)
    kinds = collections.Counter(letter.reason.split(":")[0] for letter in letters)
    lines = [f"{len(letters)} dead letters" + (f" whose reason starts with {config.reason!r}" if config.reason else "")]
    lines += [f"  {kind}: {count}" for kind, count in kinds.most_common()]
    lines += [describe(letter) for letter in letters[-config.show:]] if config.show > 0 else []
    return lines


def replay(config: DeadLettersConfig) -> tuple[int, int]:
    """Writes the selected dead letters' feedback back to the feedback topic, durably; returns how many
    it wrote and how many it could not (their bytes are not feedback)."""
    letters = selected(read_topic(config.kafka, "feedback.dlq", events_pb2.DeadLetter), config)
    records = [(feedback.feedback.feedback_id, feedback) for letter in letters
               if (feedback := replayable(letter)) is not None]
    if records:
        producer = DurableProducer(config.kafka)
        try:
            producer.produce(config.kafka.topic("feedback"), records, config.kafka.produce_timeout_s)
        finally:
            producer.close()
    return len(records), len(letters) - len(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modalign dead-letters", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["list", "replay"], help="list them, or write them back to the feedback topic")
    add_arguments(parser, DeadLettersConfig)
    args = parser.parse_args(argv)
    config = build_config(parser, DeadLettersConfig, args)
    if args.action == "list":
        print("\n".join(list_letters(config)))
        return 0
    written, not_feedback = replay(config)
    print(f"replayed {written} dead letters to {config.kafka.topic('feedback')}"
          + (f"; {not_feedback} are not feedback and stay where they are" if not_feedback else ""))
    return 0
