"""`modalign data export`: the feedback the trainer learns from, as a preference dataset in TRL's format.

The generations and feedback topics are read from their beginnings and joined by the trainer's own join
(modalign.trainer.join.FeedbackJoiner): a preference is a pair, an edit is the edited text over the original,
ratings of responses to one prompt become pairs, higher over lower. Each pair is one row of a Parquet file that
`datasets.load_dataset("parquet", data_files=...)` loads and TRL's DPOTrainer trains a vision-language model on
as it is (its DataCollatorForVisionPreference), in TRL's conversational preference format:

  prompt    the conversation the responses answer: [{role, content: [{type: "text", text} | {type: "image"}]}],
            an image placeholder where each image is (TRL fills them from `images`, in order)
  chosen    [{role: "assistant", content: [{type: "text", text}]}]
  rejected  the same
  images    the conversation's images, in order, as the hub's Image feature ({bytes, path}); `datasets` decodes
            them to PIL images
  source    preference, edit or rating: the kind of feedback the pair came from
  margin    for a rating pair the score difference, else 0 (the trainer's Bradley-Terry margin)
  chosen_policy_version, rejected_policy_version
            the version that wrote each response (import:<format> for imported data); empty for an edit's text,
            which its user wrote
  feedback_id, user_id
            the feedback that completed the pair, and who gave it

Feedback the join cannot use is left out and counted: a feedback id seen before (read once, as the trainer
does), a tie (no pair: TRL's format has no ties), a preference of responses to different prompts, an edit
equal to the original, feedback whose generations are not on the topic (expired, or never logged), an image
no longer in the blob store, a spoken question (TRL's preference format has no place for audio).
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from modalign.core.blobs import BlobStore
from modalign.core.kafka import KafkaConfig, read_topic
from modalign.policy import conversation
from modalign.trainer.join import FeedbackJoiner, JoinLimits, PreferencePair
from modalign.v1 import events_pb2

_CONTENT = pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())]))
_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", _CONTENT)]))
# The hub's Image feature is stored as struct<bytes, path>; the "huggingface" schema metadata tells `datasets`
# to decode the column to PIL images (the Sequence form, which datasets 2.x and 3.x read too, and 4.x and later
# still do).
_IMAGES = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
SCHEMA = pa.schema(
    [("prompt", _MESSAGES), ("chosen", _MESSAGES), ("rejected", _MESSAGES), ("images", _IMAGES),
     ("source", pa.string()), ("margin", pa.float64()), ("chosen_policy_version", pa.string()),
     ("rejected_policy_version", pa.string()), ("feedback_id", pa.string()), ("user_id", pa.string())],
    metadata={"huggingface": json.dumps({"info": {"features": {
        "images": {"feature": {"_type": "Image"}, "_type": "Sequence"}}}})},
)
ROWS_PER_GROUP = 256


@dataclass(frozen=True)
class ExportConfig:
    """Where the feedback and its generations are read from."""

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    """The Kafka of the deployment (the services' --kafka.* flags)."""
    blob_dir: Path = Path.home() / ".local" / "share" / "modalign" / "blobs"
    """Content-addressed image store the prompts' images are read from (the services' --blob-dir)."""


@dataclass
class Exported:
    rows: collections.Counter[str] = field(default_factory=collections.Counter)
    """Rows written, by source."""
    left_out: collections.Counter[str] = field(default_factory=collections.Counter)
    """Feedback (or pairs) not exported, by why."""


def joined_pairs(kafka: KafkaConfig) -> tuple[list[PreferencePair], collections.Counter[str]]:
    """Every pair the trainer's join makes of the topics as they are now, and what it left out, by why."""
    generations = read_topic(kafka, "generations", events_pb2.GenerationLogged)
    received = read_topic(kafka, "feedback", events_pb2.FeedbackReceived)
    # Bounds as large as the topics: the trainer forgets to stay small while it runs; an export sees everything.
    limits = JoinLimits(max_generations=max(len(generations), 1), max_waiting=max(len(received), 1),
                        max_rated_prompts=max(len(received), 1))
    joiner = FeedbackJoiner(limits=limits)
    for generation in generations:
        joiner.add_generation(generation)
    pairs: list[PreferencePair] = []
    left_out: collections.Counter[str] = collections.Counter()
    seen: set[str] = set()
    # In the order they were received (read_topic returns them partition by partition): a rating pairs with the
    # ratings before it, so this order names each rating pair by the later of its two feedback, as the trainer does.
    ordered = sorted(received, key=lambda item: (item.received_at.ToNanoseconds(), item.feedback.feedback_id))
    for index, item in enumerate(ordered):
        if item.feedback.feedback_id in seen:
            left_out["duplicate: a feedback id seen before"] += 1
            continue
        seen.add(item.feedback.feedback_id)
        if item.feedback.WhichOneof("kind") == "tie":
            left_out["tie: neither response preferred (the preference format has no ties)"] += 1
            continue
        joined, dead = joiner.add_feedback(item, (-1, index), now=0.0)
        pairs += joined
        left_out.update(letter.reason for letter in dead)
    if joiner.waiting:
        left_out["unjoinable: its generations are not on the topic"] += len(joiner.waiting)
    return pairs, left_out


class Spoken(ValueError):
    """A pair whose conversation has audio: TRL's preference format holds text and images only."""


def row_of(pair: PreferencePair, blobs: BlobStore) -> dict:
    """A pair as one row of the dataset. Raises FileNotFoundError when an image is not in the blob store, Spoken
    when the conversation has audio."""
    asked = conversation.logged(pair.prompt)
    if conversation.audio_keys(asked):
        raise Spoken(pair.feedback_id)
    return {
        "prompt": [{"role": turn.role, "content": [
            {"type": "image", "text": None} if part.kind == "image" else {"type": "text", "text": part.value}
            for part in turn.parts]} for turn in asked],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": pair.chosen.text}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": pair.rejected.text}]}],
        "images": [{"bytes": blobs.get(sha256), "path": None} for sha256 in conversation.image_keys(asked)],
        "source": pair.source,
        "margin": float(pair.margin),
        "chosen_policy_version": pair.chosen.policy_version,
        "rejected_policy_version": pair.rejected.policy_version,
        "feedback_id": pair.feedback_id,
        "user_id": pair.received.feedback.user_id if pair.received is not None else "",
    }


def export(config: ExportConfig, out: Path) -> Exported:
    """Writes the joined pairs to out (a Parquet file; written under a temporary name, then renamed into place)."""
    pairs, left_out = joined_pairs(config.kafka)
    exported = Exported(left_out=left_out)
    blobs = BlobStore(config.blob_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(fd)
    try:
        with pq.ParquetWriter(temporary, SCHEMA) as writer:
            rows: list[dict] = []
            for pair in pairs:
                try:
                    rows.append(row_of(pair, blobs))
                except FileNotFoundError:
                    exported.left_out["an image is no longer in the blob store"] += 1
                    continue
                except Spoken:
                    exported.left_out["spoken: the conversation has audio, which the preference format has no place for"] += 1
                    continue
                exported.rows[pair.source] += 1
                if len(rows) == ROWS_PER_GROUP:
                    writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
                    rows = []
            if rows or not exported.rows:  # an empty dataset still gets its schema
                writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return exported


def summary(out: Path, exported: Exported) -> list[str]:
    total = sum(exported.rows.values())
    kinds = ", ".join(f"{source} {count}" for source, count in sorted(exported.rows.items()))
    lines = [f"wrote {total} preference pairs to {out}" + (f" ({kinds})" if kinds else "")]
    lines += [f"left out {count}: {why}" for why, count in exported.left_out.most_common()]
    return lines
