"""The published files of public preference datasets, read into one neutral form: a prompt (turns of text and
images), the responses to it, and what an annotator said about them.

Field names are the datasets' own, from their cards on the Hugging Face hub:
  rlaif-v                 openbmb/RLAIF-V-Dataset: image, question, chosen, rejected (ds_name, origin_dataset,
                          origin_split, idx, image_path): AI feedback, a preference of chosen over rejected.
  rlhf-v                  openbmb/RLHF-V-Dataset: image, text = JSON of {question, chosen, rejected} (idx, ...):
                          a human's segment-level correction (chosen) of a model's answer (rejected): an edit.
  vlfeedback              MMInstruction/VLFeedback: id, prompt, img_path, models, completions = [{model, response,
                          annotations: {Helpfulness, Ethical Considerations, Visual Faithfulness: {Rating,
                          Rationale}}}]: GPT-4V's 1-5 ratings of four models' responses.
  llava-human-preference  zhiqings/LLaVA-Human-Preference-10K (llava_7b_v1_preference.json): id, image,
                          conversations = [{from: human|gpt, value}] whose last gpt turn the two outputs replace,
                          output_1, output_2 = {from, value}, preference = 1 or 2: a human's pairwise choice.

Files are JSON Lines (.jsonl), a JSON array (.json, as LLaVA-Human-Preference-10K is published) or Parquet
(.parquet, as the hub serves the others). An image is what the hub's Image feature stores, {bytes, path}
(bytes base64-encoded in JSON), or a path; paths are relative to the image folder given (VLFeedback's img_path and
LLaVA's COCO file names point into image archives published beside the data).

Nothing here decides what a record is worth to the trainer (importing.py does); a record that does not have
the fields its format promises raises InvalidRecord naming the record (1-based, the line of a JSONL file) and
the field.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

IMAGE_MARKER = "<image>"
"""Where LLaVA-style text puts the image; the importer turns it into an image part at that place."""

VLFEEDBACK_ASPECTS = {
    "helpfulness": "Helpfulness",
    "visual-faithfulness": "Visual Faithfulness",
    "ethical-considerations": "Ethical Considerations",
}
"""VLFeedback's rated aspects, by the name --vlfeedback-rating gives each."""
VLFEEDBACK_RATINGS = ("mean", *VLFEEDBACK_ASPECTS)


class InvalidRecord(ValueError):
    """A record without a field its format promises, or with one of the wrong kind."""

    def __init__(self, number: int, field: str, message: str) -> None:
        super().__init__(f"record {number}: {field}: {message}" if field else f"record {number}: {message}")
        self.number, self.field, self.message = number, field, message


class InvalidFile(ValueError):
    """A file that is not of a kind the importer reads (its suffix, or not JSON where JSON is due)."""


@dataclass(frozen=True)
class SourceImage:
    data: bytes
    field: str
    """The field it came from, to name in an error about it (e.g. "image", "img_path")."""


@dataclass(frozen=True)
class SourceTurn:
    role: Literal["user", "assistant"]
    parts: tuple[str | SourceImage, ...]
    """Text and images in the order the model reads them."""


@dataclass(frozen=True)
class SourceResponse:
    text: str
    field: str
    model: str = ""
    """The model that wrote it, when the dataset says."""


@dataclass(frozen=True)
class Preference:
    chosen: int
    rejected: int
    """Indices into the record's responses."""


@dataclass(frozen=True)
class Ratings:
    scores: tuple[int | None, ...]
    """A 1-5 score per response; None where the dataset's rating is not a number (VLFeedback has some)."""


@dataclass(frozen=True)
class Correction:
    corrected: str
    """What the annotator made of the record's one response."""


Judgement = Preference | Ratings | Correction


@dataclass(frozen=True)
class SourceRecord:
    number: int
    """1-based position in the file (for JSON Lines, its line)."""
    source_id: str
    """The dataset's own id of the record (idx, id), empty when it has none."""
    turns: tuple[SourceTurn, ...]
    """The prompt: user and assistant turns, ending with the user's."""
    responses: tuple[SourceResponse, ...]
    judgement: Judgement


# --- files ---------------------------------------------------------------------------------------------


def read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(record number, row) for every record of a .jsonl, .json (an array) or .parquet file, in order."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    try:
                        yield number, json.loads(line)
                    except json.JSONDecodeError as error:
                        raise InvalidRecord(number, "", f"not JSON: {error}") from None
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise InvalidFile(f"not JSON: {error}") from None
        if not isinstance(rows, list):
            raise InvalidFile(f"a .json file must hold an array of records, not a {type(rows).__name__}")
        yield from enumerate(rows, start=1)
    else:
        raise InvalidFile(f"unknown kind of file {path.name!r}: .jsonl, .json (an array) or .parquet")


def read_records(format_name: str, path: Path, image_dir: Path, vlfeedback_rating: str = "mean") -> Iterator[SourceRecord]:
    """The file's records in the neutral form; InvalidRecord at the first that its format does not allow."""
    parse = FORMATS[format_name]
    for number, row in read_rows(path):
        if not isinstance(row, dict):
            raise InvalidRecord(number, "", f"must be a JSON object, not {type(row).__name__}")
        yield parse(_Row(number, row, image_dir, vlfeedback_rating))


# --- fields --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    number: int
    values: dict[str, Any]
    image_dir: Path
    vlfeedback_rating: str

    def fail(self, field: str, message: str) -> InvalidRecord:
        return InvalidRecord(self.number, field, message)

    def text(self, field: str, values: dict[str, Any] | None = None, name: str | None = None) -> str:
        """A required non-blank string: values[name] (the row's own field by default), named field in errors."""
        value = (self.values if values is None else values).get(name or field)
        if value is None:
            raise self.fail(field, "required")
        if not isinstance(value, str):
            raise self.fail(field, f"must be a string, not {type(value).__name__}")
        if not value.strip():
            raise self.fail(field, "must not be blank")
        return value

    def image(self, field: str, value: Any) -> SourceImage:
        """An image as the hub's Image feature stores it ({bytes, path}; bytes base64 in JSON) or a path."""
        if value is None:
            raise self.fail(field, "required")
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if isinstance(data, str):
                try:
                    return SourceImage(base64.b64decode(data, validate=True), field)
                except binascii.Error:
                    raise self.fail(f"{field}.bytes", "not base64") from None
            if isinstance(data, bytes) and data:
                return SourceImage(data, field)
            if isinstance(path, str) and path:
                return self._image_file(f"{field}.path", path)
            raise self.fail(field, "has neither bytes nor a path")
        if isinstance(value, str) and value:
            return self._image_file(field, value)
        raise self.fail(field, f"must be an image ({{bytes, path}}) or a path, not {type(value).__name__}")

    def _image_file(self, field: str, path: str) -> SourceImage:
        resolved = self.image_dir / path
        try:
            return SourceImage(resolved.read_bytes(), field)
        except OSError as error:
            raise self.fail(field, f"cannot read {resolved}: {error.strerror or error}") from None


def place_images(row: _Row, turns: list[tuple[str, str, str]], images: list[SourceImage]) -> tuple[SourceTurn, ...]:
    """Turns of (role, text, field) with the images placed: where a user text has an "<image>" marker (LLaVA's
    convention, "<image>\\n"), else before the first user turn's text, as a single-question request has them."""
    markers = sum(text.count(IMAGE_MARKER) for _, text, _ in turns)
    if markers and markers != len(images):
        field = next(field for _, text, field in turns if IMAGE_MARKER in text)
        raise row.fail(field, f"{markers} {IMAGE_MARKER} markers for {len(images)} image(s)")
    remaining = list(images)
    result = []
    for index, (role, text, field) in enumerate(turns):
        if role != "user" and IMAGE_MARKER in text:
            raise row.fail(field, f"an {IMAGE_MARKER} marker outside a user turn")
        parts: list[str | SourceImage] = []
        if not markers and index == 0:
            parts += remaining
        for position, piece in enumerate(text.split(IMAGE_MARKER)):
            if position:
                parts.append(remaining.pop(0))
                piece = piece.removeprefix("\n")
            if piece.strip():
                parts.append(piece)
        if not parts:
            raise row.fail(field, "a turn with neither text nor an image")
        result.append(SourceTurn("user" if role == "user" else "assistant", tuple(parts)))
    return tuple(result)


def _source_id(row: _Row, *names: str) -> str:
    return next((str(row.values[name]) for name in names if row.values.get(name) not in (None, "")), "")


# --- the formats ---------------------------------------------------------------------------------------


def rlaif_v(row: _Row) -> SourceRecord:
    question, chosen, rejected = row.text("question"), row.text("chosen"), row.text("rejected")
    # The hub's files hold the image itself; an export without it may still name its file.
    field = "image" if row.values.get("image") is not None or row.values.get("image_path") is None else "image_path"
    image = row.image(field, row.values.get(field))
    return SourceRecord(
        row.number, _source_id(row, "idx"), place_images(row, [("user", question, "question")], [image]),
        (SourceResponse(chosen, "chosen"), SourceResponse(rejected, "rejected")), Preference(chosen=0, rejected=1),
    )


def rlhf_v(row: _Row) -> SourceRecord:
    text = row.text("text")
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise row.fail("text", f"not JSON of question, chosen and rejected: {error}") from None
    if not isinstance(fields, dict):
        raise row.fail("text", f"must be a JSON object of question, chosen and rejected, not {type(fields).__name__}")
    question, corrected, original = (row.text(f"text.{name}", fields, name) for name in ("question", "chosen", "rejected"))
    field = "image" if row.values.get("image") is not None or row.values.get("image_path") is None else "image_path"
    image = row.image(field, row.values.get(field))
    return SourceRecord(
        row.number, _source_id(row, "idx"), place_images(row, [("user", question, "text.question")], [image]),
        (SourceResponse(original, "text.rejected"),), Correction(corrected),
    )


def vlfeedback(row: _Row) -> SourceRecord:
    prompt = row.text("prompt")
    image = row.image("img_path", row.values.get("img_path"))
    completions = row.values.get("completions")
    # Parquet and JSON Lines hold a list of completions; `datasets` hands a sequence of structs over as a
    # struct of lists ({response: [...], annotations: [...]}), which is accepted too.
    if isinstance(completions, dict):
        columns = {key: value for key, value in completions.items() if isinstance(value, list)}
        count = max((len(value) for value in columns.values()), default=0)
        completions = [{key: value[i] if i < len(value) else None for key, value in columns.items()} for i in range(count)]
    if not isinstance(completions, list) or not completions:
        raise row.fail("completions", "required: a non-empty list of {model, response, annotations}")
    responses, scores = [], []
    for index, completion in enumerate(completions):
        where = f"completions[{index}]"
        if not isinstance(completion, dict):
            raise row.fail(where, f"must be an object, not {type(completion).__name__}")
        model = completion.get("model")
        responses.append(SourceResponse(row.text(f"{where}.response", completion, "response"), f"{where}.response",
                                        model if isinstance(model, str) else ""))
        annotations = completion.get("annotations")
        if not isinstance(annotations, dict):
            raise row.fail(f"{where}.annotations", "required: the ratings of Helpfulness, Ethical Considerations and "
                                                   "Visual Faithfulness")
        scores.append(vlfeedback_score(annotations, row.vlfeedback_rating))
    return SourceRecord(
        row.number, _source_id(row, "id"), place_images(row, [("user", prompt, "prompt")], [image]),
        tuple(responses), Ratings(tuple(scores)),
    )


def vlfeedback_score(annotations: dict[str, Any], rating: str) -> int | None:
    """A completion's 1-5 score: the mean of its aspects' ratings (rating "mean"; what VLFeedback's own DPO code ranks
    by) or one aspect's, rounded half up to a whole score; None where a rating used is not a number from 1 to 5
    (VLFeedback's code skips those completions too)."""
    aspects = list(annotations.values()) if rating == "mean" else [annotations.get(VLFEEDBACK_ASPECTS[rating])]
    values = []
    for aspect in aspects:
        try:
            value = float(str(aspect.get("Rating") if isinstance(aspect, dict) else None).strip())
        except ValueError:
            return None
        if not 1 <= value <= 5:
            return None
        values.append(value)
    return math.floor(sum(values) / len(values) + 0.5) if values else None


def llava_human_preference(row: _Row) -> SourceRecord:
    image = row.image("image", row.values.get("image"))
    conversations = row.values.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise row.fail("conversations", "required: a non-empty list of {from, value}")
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt"):
            raise row.fail(f"conversations[{index}].from", "must be human or gpt")
    # LLaVA-RLHF's reward-model code replaces the last gpt turn's value with each output in turn: whatever it holds
    # is not part of the prompt.
    asked = conversations[:-1] if conversations[-1]["from"] == "gpt" else conversations
    if not asked or asked[-1]["from"] != "human":
        raise row.fail("conversations", "must end with the human turn the outputs answer (then a gpt turn they replace)")
    turns = [(turn["from"], row.text(f"conversations[{index}].value", turn, "value"), f"conversations[{index}].value")
             for index, turn in enumerate(asked)]
    outputs = []
    for name in ("output_1", "output_2"):
        output = row.values.get(name)
        if not isinstance(output, dict):
            raise row.fail(name, "required: {from, value}")
        outputs.append(SourceResponse(row.text(f"{name}.value", output, "value"), f"{name}.value"))
    preference = row.values.get("preference")
    if preference not in (1, 2) or isinstance(preference, bool):
        raise row.fail("preference", f"must be 1 or 2 (which output the annotator preferred), not {preference!r}")
    roles = [("user" if role == "human" else "assistant", text, field) for role, text, field in turns]
    return SourceRecord(
        row.number, _source_id(row, "id"), place_images(row, roles, [image]), tuple(outputs),
        Preference(chosen=0, rejected=1) if preference == 1 else Preference(chosen=1, rejected=0),
    )


FORMATS: dict[str, Callable[[_Row], SourceRecord]] = {
    "rlaif-v": rlaif_v,
    "rlhf-v": rlhf_v,
    "vlfeedback": vlfeedback,
    "llava-human-preference": llava_human_preference,
}
"""Each format's reader of one row, by the name `modalign data import` takes."""

KINDS = {"rlaif-v": "preference", "rlhf-v": "edit", "vlfeedback": "rating", "llava-human-preference": "preference"}
"""The kind of feedback each format's records become."""
