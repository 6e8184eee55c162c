"""`modalign data import`: a public preference dataset's file, as the events live traffic produces.

Each record becomes what the policy and feedback services would have written had its responses been served and
judged here: one GenerationLogged per response on `generations` (its image stored in the blob store as the
policy stores one: content-addressed, an ImageRef with sha256, MIME type and size; the prompt as a conversation,
its last user turn's text as prompt_text), then one FeedbackReceived per judgement on `feedback` (a preference,
a 1-5 rating per response, or an edit). The trainer joins and learns from them as from users' feedback.

Identity comes from content, so importing a file twice is a no-op: a response's id is a UUID derived from the
format, the prompt (its text and images' sha256s) and the response text, a feedback's id from what it says
("import:<format>:<sha256 prefix>"); feedback ids already on the topic are not written again, nor the
generations only they name. The user is "import:<format>", the policy version "import:<format>".

How the trainer reads an imported generation:
- prompt_token_ids are the exact model input (chat template applied, image placeholders expanded) under the
  policy the trainer starts from (--policy-model-dir, as the trainer's --learner.policy-model-dir; empty: the
  default policy built in code). The trainer re-encodes every prompt from its conversation itself; it reads
  these ids only for their length, to refuse pairs longer than its models' positions.
- response_token_ids and response_logprobs are empty: no policy here sampled these responses. The join reads
  empty ids as text to tokenise, and the trainer tokenises it EOS-terminated with its own tokenizer, as it does
  an edit, so the pairs are right for whatever model it trains; like edits, they are left out of the gate's
  preference-shift measure, which is about responses a policy sampled.

The whole file is read and checked before anything is written: a record without a field its format promises,
or an image the policy would refuse, fails the import naming the record and field (exit status 2), with
nothing on the topics. Records that are well formed but carry nothing to learn are skipped and counted in the
summary: chosen and rejected the same text, a correction equal to the original, no rating a number from 1 to 5
(VLFeedback), a text holding the policy tokenizer's reserved tokens (which the policy refuses in a prompt and the
trainer dead-letters in a response), or a prompt and response too long for the policy's positions.
"""

from __future__ import annotations

import collections
import hashlib
import io
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import timestamp_pb2
from PIL import Image
from transformers import ProcessorMixin

from modalign.core.blobs import BlobStore
from modalign.core.config import require_one_of
from modalign.core.images import FORMAT_BY_MIME, ImageLimits, InvalidImage, decode_image
from modalign.core.kafka import DurableProducer, KafkaConfig, ensure_topics, read_topic
from modalign.data.formats import (
    KINDS,
    VLFEEDBACK_RATINGS,
    Correction,
    InvalidRecord,
    Preference,
    Ratings,
    SourceImage,
    SourceRecord,
    read_records,
)
from modalign.feedback.validation import EARLIEST_CLIENT_TIME_S, MAX_EDIT_BYTES, referenced_responses, validate_feedback
from modalign.policy import conversation
from modalign.policy.families import Family, family_of
from modalign.policy.model import build_default_policy, format_conversation, load_processor
from modalign.trainer.models import reserved_tokens
from modalign.v1 import common_pb2, events_pb2, feedback_pb2

MIME_BY_FORMAT = {image_format: mime for mime, image_format in FORMAT_BY_MIME.items()}

ID_NAMESPACE = uuid.UUID("5d9c1f0e-2b8a-4c55-9a41-6f3e0c7d2b19")
"""The namespace of imported response and prompt ids (UUID version 5): fixed, so that ids derive from content alone."""

IMPORTED_CLIENT_TIME = timestamp_pb2.Timestamp(seconds=EARLIEST_CLIENT_TIME_S)
"""client_time of imported feedback. The files do not say when their annotators judged; a fixed time keeps a
re-imported feedback's content, and so its content_sha256, identical: a true duplicate to everyone who reads it."""

PRODUCE_CHUNK = 500
"""Records sent per durable write: each chunk is acknowledged (acks=all) before the next is sent."""


@dataclass(frozen=True)
class ImportConfig:
    """Where imported events go, and how a file's records are read."""

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    """The Kafka of the deployment the events go to (the services' --kafka.* flags)."""
    blob_dir: Path = Path.home() / ".local" / "share" / "modalign" / "blobs"
    """Content-addressed image store the trainer reads images from (the services' --blob-dir)."""
    image_dir: str = ""
    """Folder that image paths in the file are relative to (VLFeedback's img_path, LLaVA's COCO file names, an
    Image feature's path); empty: the file's own folder."""
    policy_model_dir: str = ""
    """The policy the trainer starts from (its --learner.policy-model-dir): prompts are formatted, checked and
    measured with its processor. Empty: the default policy built in code, as the trainer's default."""
    vlfeedback_rating: str = "mean"
    """VLFeedback: a completion's 1-5 rating is the mean of its three aspects' ratings rounded half up (mean), or one
    aspect's: helpfulness, visual-faithfulness or ethical-considerations."""

    def validate(self) -> None:
        require_one_of("vlfeedback_rating", self.vlfeedback_rating, VLFEEDBACK_RATINGS)


@dataclass(frozen=True)
class PolicyInputs:
    """What the importer formats and measures prompts with: the policy's processor, its model family (how a
    prompt and its images become model input) and its context length."""

    processor: ProcessorMixin
    family: Family
    max_positions: int
    reserved: tuple[str, ...]
    """The tokenizer's special and added tokens: text holding one is refused by the policy (prompts) or
    dead-lettered by the trainer (responses, edits)."""

    @classmethod
    def load(cls, model_dir: str) -> PolicyInputs:
        if model_dir:
            config, processor = load_processor(model_dir)
        else:
            model, processor = build_default_policy()
            config = model.config
        return cls(processor, family_of(config.model_type), config.get_text_config().max_position_embeddings,
                   tuple(reserved_tokens(processor)))

    def prompt_token_ids(self, conversation_: conversation.Conversation, images: list[Image.Image]) -> list[int]:
        """The exact model input, as the policy's engine encodes it."""
        text = format_conversation(self.processor, conversation_)
        return self.family.encode(self.processor, text, images)["input_ids"][0].tolist()

    def response_tokens(self, text: str) -> int:
        """How many tokens the trainer gives a response text: tokenised, then EOS."""
        return len(self.processor.tokenizer(text, add_special_tokens=False).input_ids) + 1


@dataclass
class Plan:
    """What a file becomes, checked whole before anything is written."""

    records: int = 0
    generations: dict[str, events_pb2.GenerationLogged] = field(default_factory=dict)
    """By response_id, in the order first met; a response met again (the same text to the same prompt) is one."""
    feedback: dict[str, events_pb2.FeedbackReceived] = field(default_factory=dict)
    """By feedback_id, in the order first met."""
    imported: set[int] = field(default_factory=set)
    """The numbers of the records imported (not skipped): their images are stored once the whole file passed."""
    skipped: dict[str, list[int]] = field(default_factory=lambda: collections.defaultdict(list))
    """Record numbers left out, by why."""
    unrated: int = 0
    """VLFeedback completions left out because their rating is not a number from 1 to 5."""


@dataclass(frozen=True)
class Written:
    generations: int
    feedback: int
    already_there: int
    """Feedback of the file whose id was already on the topic (an earlier import of it): not written again."""


def import_file(config: ImportConfig, format_name: str, path: Path) -> tuple[Plan, Written]:
    """Checks the whole file, stores its images, then writes its generations, then its feedback, durably.
    Raises InvalidRecord or InvalidFile (nothing written), BrokerUnavailable (retry: the import is idempotent)."""
    image_dir = Path(config.image_dir) if config.image_dir else path.parent
    policy = PolicyInputs.load(config.policy_model_dir)
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    plan = plan_import(read_records(format_name, path, image_dir, config.vlfeedback_rating), format_name, policy, now)
    # A second pass over the file for the images, rather than holding a whole dataset's images in memory.
    blobs = BlobStore(config.blob_dir)
    for record in read_records(format_name, path, image_dir, config.vlfeedback_rating):
        if record.number in plan.imported:
            for image in _images(record):
                blobs.put(image.data)
    return plan, write(plan, config.kafka)


def plan_import(records: Iterator[SourceRecord], format_name: str, policy: PolicyInputs,
                now: timestamp_pb2.Timestamp) -> Plan:
    plan = Plan()
    encoded: dict[str, list[int]] = {}  # prompt ids by conversation key: datasets ask one question many times
    for record in records:
        plan.records += 1
        skipped = _plan_record(record, format_name, policy, now, plan, encoded)
        if skipped:
            plan.skipped[skipped].append(record.number)
    return plan


def _plan_record(record: SourceRecord, format_name: str, policy: PolicyInputs, now: timestamp_pb2.Timestamp,
                 plan: Plan, encoded: dict[str, list[int]]) -> str | None:
    """Adds a record's generations and feedback to plan; returns why it was skipped instead, if it was."""
    refs, decoded = [], []
    for image in _images(record):
        ref, pixels = _checked_image(record.number, image)
        refs.append(ref)
        decoded.append(pixels)
    logged = _logged_turns(record, refs)
    asked = conversation.of_messages(logged)
    judgement = record.judgement
    responses = [response.text for response in record.responses]
    if isinstance(judgement, Ratings):
        plan.unrated += sum(score is None for score in judgement.scores)
        if all(score is None for score in judgement.scores):
            return "no rating is a number from 1 to 5"
    elif isinstance(judgement, Preference):
        if responses[judgement.chosen].strip() == responses[judgement.rejected].strip():
            return "chosen and rejected are the same text"
    else:
        if judgement.corrected.strip() == responses[0].strip():
            return "the correction equals the original response"
        if len(judgement.corrected.encode()) > MAX_EDIT_BYTES:
            return f"the correction is longer than an edit may be ({MAX_EDIT_BYTES} UTF-8 bytes)"
    answers = responses + ([judgement.corrected] if isinstance(judgement, Correction) else [])
    if any(token in text for text in [turn.text for turn in asked] + answers for token in policy.reserved):
        return "a text holds a reserved token of the policy's tokenizer"
    key = conversation.key(asked)
    if key not in encoded:
        encoded[key] = policy.prompt_token_ids(asked, decoded)
    prompt_ids = encoded[key]
    longest = max(policy.response_tokens(text) for text in answers)
    if len(prompt_ids) + longest > policy.max_positions:
        return f"prompt and response are longer than the policy's {policy.max_positions} positions"

    source = f"import:{format_name}"
    prompt_id = str(uuid.uuid5(ID_NAMESPACE, f"{format_name}\n{key}"))
    response_ids = [str(uuid.uuid5(ID_NAMESPACE, f"{format_name}\n{key}\n{text}")) for text in responses]
    judged = [score is not None for score in judgement.scores] if isinstance(judgement, Ratings) else [True] * len(responses)
    for index, (response, response_id) in enumerate(zip(record.responses, response_ids)):
        if not judged[index] or response_id in plan.generations:
            continue
        plan.generations[response_id] = events_pb2.GenerationLogged(
            response_id=response_id, prompt_id=prompt_id, policy_version=source, user_id=source,
            prompt_text=conversation.last_user_text(asked), images=refs, conversation=logged,
            candidate_index=index, num_candidates=len(responses), prompt_token_ids=prompt_ids,
            response_text=response.text,
            # Complete answers: the trainer tokenises them EOS-terminated, as if the model had stopped there.
            finish_reason=common_pb2.FINISH_REASON_STOP, created_at=now,
        )
    reason = f"{format_name} id {record.source_id}" if record.source_id else format_name
    for feedback in _judgements(judgement, response_ids):
        content = feedback.SerializeToString(deterministic=True)
        feedback.feedback_id = f"{source}:{hashlib.sha256(content).hexdigest()[:40]}"
        feedback.user_id = source
        feedback.client_time.CopyFrom(IMPORTED_CLIENT_TIME)
        feedback.reason = reason[:200]
        validate_feedback(feedback, now_s=now.seconds)  # what the feedback service would accept, or a bug here
        if feedback.feedback_id not in plan.feedback:
            plan.feedback[feedback.feedback_id] = events_pb2.FeedbackReceived(
                feedback=feedback, received_at=now,  # content_sha256 as the feedback service computes it
                content_sha256=hashlib.sha256(feedback.SerializeToString(deterministic=True)).hexdigest(),
            )
    plan.imported.add(record.number)
    return None


def _judgements(judgement: Preference | Ratings | Correction, response_ids: Sequence[str]) -> list[feedback_pb2.Feedback]:
    """The feedback a record's judgement is, before its id and user are set (its id derives from this content)."""
    if isinstance(judgement, Preference):
        return [feedback_pb2.Feedback(preference=feedback_pb2.Preference(
            chosen_response_id=response_ids[judgement.chosen], rejected_response_id=response_ids[judgement.rejected]))]
    if isinstance(judgement, Ratings):
        return [feedback_pb2.Feedback(rating=feedback_pb2.Rating(response_id=response_id, score=score))
                for response_id, score in zip(response_ids, judgement.scores) if score is not None]
    return [feedback_pb2.Feedback(edit=feedback_pb2.Edit(response_id=response_ids[0], edited_text=judgement.corrected))]


def _images(record: SourceRecord) -> list[SourceImage]:
    return [part for turn in record.turns for part in turn.parts if isinstance(part, SourceImage)]


def _checked_image(number: int, image: SourceImage) -> tuple[common_pb2.ImageRef, Image.Image]:
    """The image's reference and pixels, if the policy would take it (a PNG, JPEG, WebP or GIF within its limits)."""
    try:
        image_format = Image.open(io.BytesIO(image.data)).format
    except Exception:  # PIL raises many types for data that is no image
        raise InvalidRecord(number, image.field, "not an image PIL can read") from None
    mime = MIME_BY_FORMAT.get(image_format or "")
    if mime is None:
        raise InvalidRecord(number, image.field, f"a {image_format} image; the policy takes "
                                                 f"{', '.join(sorted(FORMAT_BY_MIME.values()))}")
    try:
        pixels = decode_image(image.data, mime, ImageLimits())
    except InvalidImage as error:
        raise InvalidRecord(number, image.field, str(error)) from None
    ref = common_pb2.ImageRef(sha256=hashlib.sha256(image.data).hexdigest(), mime_type=mime,
                              width=pixels.width, height=pixels.height)
    return ref, pixels


def _logged_turns(record: SourceRecord, refs: list[common_pb2.ImageRef]) -> list[common_pb2.LoggedMessage]:
    """The record's prompt as a generation logs a conversation: images by reference, in order."""
    roles = {"user": common_pb2.ROLE_USER, "assistant": common_pb2.ROLE_ASSISTANT}
    remaining = iter(refs)
    return [
        common_pb2.LoggedMessage(role=roles[turn.role], content=[
            common_pb2.LoggedContentPart(text=part) if isinstance(part, str)
            else common_pb2.LoggedContentPart(image=next(remaining))
            for part in turn.parts
        ])
        for turn in record.turns
    ]


def write(plan: Plan, kafka: KafkaConfig) -> Written:
    """Generations first, then feedback (so no feedback is read before what it names), each acknowledged; only
    feedback not yet on the topic, and the generations it names."""
    ensure_topics(kafka)
    there = {received.feedback.feedback_id for received in read_topic(kafka, "feedback", events_pb2.FeedbackReceived)}
    feedback = [(feedback_id, received) for feedback_id, received in plan.feedback.items() if feedback_id not in there]
    named = {response_id for _, received in feedback for response_id in referenced_responses(received.feedback)}
    generations = [(response_id, generation) for response_id, generation in plan.generations.items() if response_id in named]
    producer = DurableProducer(kafka)
    try:
        for topic, records in (("generations", generations), ("feedback", feedback)):
            for start in range(0, len(records), PRODUCE_CHUNK):
                producer.produce(kafka.topic(topic), list(records[start:start + PRODUCE_CHUNK]),
                                 timeout_s=kafka.produce_timeout_s + 2)
    finally:
        producer.close()
    return Written(len(generations), len(feedback), len(plan.feedback) - len(feedback))


def summary(format_name: str, path: Path, plan: Plan, written: Written) -> list[str]:
    """Lines for the operator: what was read, written, already there, and left out and why."""
    kind = KINDS[format_name]
    lines = [f"{format_name} {path}: {plan.records} records, {len(plan.feedback)} {kind} feedback on "
             f"{len(plan.generations)} responses; wrote {written.generations} generations and {written.feedback} "
             f"feedback ({written.already_there} feedback already there)"]
    for why, numbers in plan.skipped.items():
        shown = ", ".join(str(number) for number in numbers[:10]) + (f" and {len(numbers) - 10} more" if len(numbers) > 10 else "")
        lines.append(f"skipped record{'s' if len(numbers) > 1 else ''} {shown}: {why}")
    if plan.unrated:
        lines.append(f"left out {plan.unrated} responses whose rating is not a number from 1 to 5")
    return lines
