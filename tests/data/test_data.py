"""`modalign data import|export`: public preference datasets in as the events live traffic makes, the joined
feedback out as a dataset TRL trains on.

Real broker; small files written here in each dataset's published format (the field names of the datasets' cards:
no hub is reachable from here); the trainer's own code in this process; TRL's DPOTrainer on the exported file
with the default policy (a tiny LLaVA built in code).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from modalign import data
from modalign.core.blobs import BlobStore
from modalign.core.kafka import KafkaConfig, read_topic
from modalign.trainer.learner import Learner, LearnerConfig
from modalign.trainer.service import Trainer, TrainerConfig
from modalign.v1 import common_pb2, events_pb2

from tests.feedback.cases import store_directly, valid_feedback

pytestmark = pytest.mark.integration

QUESTION = "What colour is the shape?"


def picture(colour: str, size: tuple[int, int] = (40, 30), kind: str = "PNG") -> bytes:
    encoded = io.BytesIO()
    Image.new("RGB", size, colour).save(encoded, kind)
    return encoded.getvalue()


def run_data(kafka: KafkaConfig, blobs: Path, *args: str) -> int:
    """`modalign data ...` on kafka's topics and the blob store in blobs; its exit status."""
    flags = [f"--kafka.bootstrap-servers={kafka.bootstrap_servers}", f"--kafka.topic-prefix={kafka.topic_prefix}",
             f"--blob-dir={blobs}"]
    try:
        return data.main([*args, *flags])
    except SystemExit as exited:
        return int(exited.code or 0)


def topics(kafka: KafkaConfig) -> tuple[dict[str, events_pb2.GenerationLogged], list[events_pb2.FeedbackReceived]]:
    generations = {g.response_id: g for g in read_topic(kafka, "generations", events_pb2.GenerationLogged)}
    return generations, read_topic(kafka, "feedback", events_pb2.FeedbackReceived)


def import_twice(kafka: KafkaConfig, blobs: Path, capsys: pytest.CaptureFixture[str], *args: str
                 ) -> tuple[dict[str, events_pb2.GenerationLogged], list[events_pb2.FeedbackReceived]]:
    """Imports, then imports the same file again: the second writes nothing, since every feedback id is there."""
    assert run_data(kafka, blobs, "import", *args) == 0
    written = topics(kafka)
    first = capsys.readouterr().out
    assert f"wrote {len(written[0])} generations and {len(written[1])} feedback (0 feedback already there)" in first
    assert run_data(kafka, blobs, "import", *args) == 0
    assert f"wrote 0 generations and 0 feedback ({len(written[1])} feedback already there)" in capsys.readouterr().out
    again = topics(kafka)
    assert (len(again[0]), len(again[1])) == (len(written[0]), len(written[1]))
    return written


def assert_logged_as_the_policy_logs(generation: events_pb2.GenerationLogged, source: str, image: bytes,
                                     blobs: Path, size: tuple[int, int], mime: str = "image/png") -> None:
    """Its image in the blob store by sha256 with its type and size, its prompt tokenised, its response not."""
    [ref] = generation.images
    assert ref == common_pb2.ImageRef(sha256=hashlib.sha256(image).hexdigest(), mime_type=mime,
                                      width=size[0], height=size[1])
    assert BlobStore(blobs).get(ref.sha256) == image
    assert (generation.policy_version, generation.user_id) == (source, source)
    assert len(generation.prompt_token_ids) > 16  # the formatted prompt with its image's 16 placeholder tokens
    assert list(generation.response_token_ids) == [] and list(generation.response_logprobs) == []


def texts(conversation: list[common_pb2.LoggedMessage]) -> list[tuple[int, list[str]]]:
    """(role, parts) with images as "<img>", to compare conversations at a glance."""
    return [(turn.role, [part.text if part.WhichOneof("part") == "text" else "<img>" for part in turn.content])
            for turn in conversation]


# --- the published formats, written small ------------------------------------------------------------------


def write_rlaif_v(path: Path, records: list[tuple[bytes, str, str, str]]) -> Path:
    """RLAIF-V as the hub serves it: Parquet, the image in the hub's Image feature (bytes and path)."""
    rows = [{"ds_name": "RLAIF-V", "image": {"bytes": image, "path": f"{index}.png"}, "question": question,
             "chosen": chosen, "rejected": rejected, "origin_dataset": "VQAv2",
             "origin_split": json.dumps({"model": "OmniLMM-12B", "feedback_model": "OmniLMM-12B", "type": "qa"}),
             "idx": f"rlaif-{index}", "image_path": f"images/{index}.png"}
            for index, (image, question, chosen, rejected) in enumerate(records)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_rlhf_v(path: Path, records: list[tuple[bytes, str, str, str]]) -> Path:
    """RLHF-V as JSON Lines: text is the JSON of question, chosen (the human's correction), rejected (the original)."""
    lines = [json.dumps({"ds_name": "RLHF-V", "image": {"bytes": base64.b64encode(image).decode(), "path": None},
                         "text": json.dumps({"question": question, "chosen": corrected, "rejected": original}),
                         "origin_dataset": "RLHF-V", "origin_split": "{}", "idx": index, "image_path": ""})
             for index, (image, question, corrected, original) in enumerate(records)]
    path.write_text("\n".join(lines) + "\n")
    return path


def vlfeedback_completion(model: str, response: str, ratings: tuple[str, str, str]) -> dict:
    aspects = ("Helpfulness", "Ethical Considerations", "Visual Faithfulness")
    return {"annotations": {aspect: {"Rating": rating, "Rationale": "..."} for aspect, rating in zip(aspects, ratings)},
            "model": model, "response": response}


def write_vlfeedback(path: Path, records: list[tuple[str, str, list[dict]]]) -> Path:
    """VLFeedback as JSON Lines: img_path into the image archive, four models' completions with their ratings."""
    lines = [json.dumps({"id": f"svit-{index}", "prompt": prompt, "models": [c["model"] for c in completions],
                         "completions": completions, "img_path": img_path})
             for index, (img_path, prompt, completions) in enumerate(records)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_llava_human_preference(path: Path, records: list[tuple[str, list[tuple[str, str]], str, str, int]]) -> Path:
    """LLaVA-Human-Preference-10K as published: a JSON array; COCO file names; the last gpt turn is a placeholder
    the two outputs replace; preference 1 or 2."""
    rows = [{"id": f"{index}", "image": image,
             "conversations": [{"from": who, "value": value} for who, value in turns] + [{"from": "gpt", "value": ""}],
             "output_1": {"from": "llava", "value": first}, "output_2": {"from": "llava", "value": second},
             "preference": preference, "hallucination": False}
            for index, (image, turns, first, second, preference) in enumerate(records)]
    path.write_text(json.dumps(rows))
    return path


# --- import, one test per format ---------------------------------------------------------------------------


def test_rlaif_v_preferences_become_generations_and_preferences(
    own_kafka_config: KafkaConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    red, blue = picture("red"), picture("blue", (24, 48), "JPEG")
    path = write_rlaif_v(tmp_path / "rlaif-v.parquet", [
        (red, QUESTION, "It is red.", "It is blue."),
        (blue, "Describe the image.", "A blue square.", "A red circle on a lawn."),
    ])
    blobs = tmp_path / "blobs"
    generations, feedback = import_twice(own_kafka_config, blobs, capsys, "rlaif-v", str(path))

    assert len(generations) == 4
    preferences = {(generations[f.feedback.preference.chosen_response_id].response_text,
                    generations[f.feedback.preference.rejected_response_id].response_text) for f in feedback}
    assert preferences == {("It is red.", "It is blue."), ("A blue square.", "A red circle on a lawn.")}
    for received in feedback:
        assert received.feedback.user_id == "import:rlaif-v"
        assert received.feedback.feedback_id.startswith("import:rlaif-v:")
    by_text = {g.response_text: g for g in generations.values()}
    assert_logged_as_the_policy_logs(by_text["It is red."], "import:rlaif-v", red, blobs, (40, 30))
    assert_logged_as_the_policy_logs(by_text["A blue square."], "import:rlaif-v", blue, blobs, (24, 48), "image/jpeg")
    # The single-question shorthand: one user turn, its image, then its text.
    assert texts(by_text["It is red."].conversation) == [(common_pb2.ROLE_USER, ["<img>", QUESTION])]
    assert by_text["It is red."].prompt_text == QUESTION
    assert by_text["It is red."].prompt_id == by_text["It is blue."].prompt_id != by_text["A blue square."].prompt_id


def test_rlhf_v_corrections_become_edits_of_the_original_answer(
    own_kafka_config: KafkaConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = picture("green")
    path = write_rlhf_v(tmp_path / "rlhf-v.jsonl", [
        (image, "Describe the image in detail.", "A green square fills the picture.",
         "A green square and a cat fill the picture."),
        (image, QUESTION, "It is green.", "It is yellow."),
    ])
    blobs = tmp_path / "blobs"
    generations, feedback = import_twice(own_kafka_config, blobs, capsys, "rlhf-v", str(path))

    # One generation per record, the original answer; the correction is the edit's text.
    assert sorted(g.response_text for g in generations.values()) == [
        "A green square and a cat fill the picture.", "It is yellow."]
    edits = {(generations[f.feedback.edit.response_id].response_text, f.feedback.edit.edited_text) for f in feedback}
    assert edits == {("A green square and a cat fill the picture.", "A green square fills the picture."),
                     ("It is yellow.", "It is green.")}
    assert {f.feedback.user_id for f in feedback} == {"import:rlhf-v"}
    for generation in generations.values():
        assert_logged_as_the_policy_logs(generation, "import:rlhf-v", image, blobs, (40, 30))


def test_vlfeedback_ratings_become_1_to_5_ratings_of_each_response(
    own_kafka_config: KafkaConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "vlfeedback-images"
    (images / "svit").mkdir(parents=True)
    image = picture("purple", kind="JPEG")
    (images / "svit" / "1.jpg").write_bytes(image)
    path = write_vlfeedback(tmp_path / "vlfeedback.jsonl", [("svit/1.jpg", QUESTION, [
        vlfeedback_completion("gpt-4v", "It is purple.", ("5", "5", "4")),        # mean 4.67: 5
        vlfeedback_completion("llava-v1.5-13b", "It is pink.", ("3", "4", "2")),  # mean 3
        vlfeedback_completion("fuyu-8b", "Purple.", ("4", "4", "4")),             # 4
        vlfeedback_completion("idefics-9b", "A shape.", ("2", "N/A", "2")),       # not rated: left out, as VLFeedback's code does
    ])])
    blobs = tmp_path / "blobs"
    generations, feedback = import_twice(own_kafka_config, blobs, capsys, "vlfeedback", str(path),
                                         f"--image-dir={images}")

    scores = {generations[f.feedback.rating.response_id].response_text: f.feedback.rating.score for f in feedback}
    assert scores == {"It is purple.": 5, "It is pink.": 3, "Purple.": 4}
    assert {f.feedback.user_id for f in feedback} == {"import:vlfeedback"}
    for generation in generations.values():
        assert_logged_as_the_policy_logs(generation, "import:vlfeedback", image, blobs, (40, 30), "image/jpeg")
    # One aspect's rating instead of the mean: new judgements get new feedback ids beside the earlier ones (the
    # completion whose Ethical Considerations is N/A has a Visual Faithfulness rating); the same one (Purple.: 4)
    # is already there.
    assert run_data(own_kafka_config, blobs, "import", "vlfeedback", str(path), f"--image-dir={images}",
                    "--vlfeedback-rating=visual-faithfulness") == 0
    generations, feedback = topics(own_kafka_config)
    assert sorted((generations[f.feedback.rating.response_id].response_text, f.feedback.rating.score)
                  for f in feedback) == [("A shape.", 2), ("It is pink.", 2), ("It is pink.", 3),
                                         ("It is purple.", 4), ("It is purple.", 5), ("Purple.", 4)]


def test_llava_human_preferences_keep_their_conversation_and_image_place(
    own_kafka_config: KafkaConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = picture("orange")
    (tmp_path / "COCO_train2014_000000000009.jpg").write_bytes(image)  # a PNG under COCO's name: the bytes decide
    path = write_llava_human_preference(tmp_path / "llava_7b_v1_preference.json", [
        ("COCO_train2014_000000000009.jpg",
         [("human", "<image>\nWhat is in the picture?"), ("gpt", "An orange square."), ("human", "Where is it?")],
         "It is in the middle.", "It is at the top left.", 2),
        ("COCO_train2014_000000000009.jpg", [("human", "Is the square <image> orange?")], "Yes.", "No.", 1),
    ])
    blobs = tmp_path / "blobs"
    # The image folder defaults to the file's own.
    generations, feedback = import_twice(own_kafka_config, blobs, capsys, "llava-human-preference", str(path))

    pairs = {(generations[f.feedback.preference.chosen_response_id].response_text,
              generations[f.feedback.preference.rejected_response_id].response_text) for f in feedback}
    assert pairs == {("It is at the top left.", "It is in the middle."), ("Yes.", "No.")}
    by_text = {g.response_text: g for g in generations.values()}
    # The conversation before the compared outputs, the image where <image> was.
    assert texts(by_text["It is in the middle."].conversation) == [
        (common_pb2.ROLE_USER, ["<img>", "What is in the picture?"]),
        (common_pb2.ROLE_ASSISTANT, ["An orange square."]),
        (common_pb2.ROLE_USER, ["Where is it?"]),
    ]
    assert by_text["It is in the middle."].prompt_text == "Where is it?"
    assert texts(by_text["Yes."].conversation) == [(common_pb2.ROLE_USER, ["Is the square ", "<img>", " orange?"])]
    for generation in generations.values():
        assert_logged_as_the_policy_logs(generation, "import:llava-human-preference", image, blobs, (40, 30))


@pytest.mark.parametrize(("format_name", "suffix", "record", "error"), [
    ("rlaif-v", ".jsonl", {"image": {"bytes": "QUJD", "path": None}, "question": QUESTION, "chosen": "Red."},
     "record 2: rejected: required"),
    ("rlaif-v", ".jsonl", {"image": {"bytes": base64.b64encode(b"not a picture").decode()}, "question": QUESTION,
                           "chosen": "Red.", "rejected": "Blue."},
     "record 2: image: not an image PIL can read"),
    ("vlfeedback", ".jsonl", {"prompt": QUESTION, "img_path": "a.png", "completions": [
        vlfeedback_completion("a", "Red.", ("5", "5", "5")), {"model": "b", "annotations": {}}]},
     "record 2: completions[1].response: required"),
    ("llava-human-preference", ".json", {"image": "a.png", "conversations": [{"from": "human", "value": QUESTION}],
                                         "output_1": {"value": "Red."}, "output_2": {"value": "Blue."}, "preference": 3},
     "record 2: preference: must be 1 or 2"),
], ids=["a field missing", "not an image", "a completion's field missing", "no such preference"])
def test_a_bad_record_refuses_the_whole_file_by_record_and_field(
    own_kafka_config: KafkaConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    format_name: str, suffix: str, record: dict, error: str,
) -> None:
    (tmp_path / "a.png").write_bytes(picture("red"))
    good = {
        "rlaif-v": {"image": {"bytes": base64.b64encode(picture("red")).decode()}, "question": QUESTION,
                    "chosen": "It is red.", "rejected": "It is blue."},
        "vlfeedback": {"prompt": QUESTION, "img_path": "a.png", "completions": [
            vlfeedback_completion("a", "Red.", ("5", "5", "5")), vlfeedback_completion("b", "Blue.", ("1", "2", "1"))]},
        "llava-human-preference": {"image": "a.png", "conversations": [{"from": "human", "value": QUESTION}],
                                   "output_1": {"value": "Red."}, "output_2": {"value": "Blue."}, "preference": 1},
    }[format_name]
    path = tmp_path / f"data{suffix}"
    # The bad record comes second: the good one before it must not be written either.
    path.write_text(json.dumps([good, record]) if suffix == ".json" else f"{json.dumps(good)}\n{json.dumps(record)}\n")
    blobs = tmp_path / "blobs"

    assert run_data(own_kafka_config, blobs, "import", format_name, str(path)) == 2
    assert f"{path}: {error}" in capsys.readouterr().err
    assert topics(own_kafka_config) == ({}, [])
    assert not blobs.exists()  # no image stored either


def test_records_without_a_signal_are_skipped_and_counted(
    own_kafka_config: KafkaConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_rlaif_v(tmp_path / "rlaif-v.parquet", [
        (picture("red"), QUESTION, "It is red.", "It is red. "),        # the same answer twice: nothing to learn
        (picture("red"), QUESTION, "It is red.", "It is </s> blue."),  # a reserved token the trainer would refuse
        (picture("red"), QUESTION, "It is red.", "It is blue."),
    ])
    assert run_data(own_kafka_config, tmp_path / "blobs", "import", "rlaif-v", str(path)) == 0
    out = capsys.readouterr().out
    assert "skipped record 1: chosen and rejected are the same text" in out
    assert "skipped record 2: a text holds a reserved token of the policy's tokenizer" in out
    generations, feedback = topics(own_kafka_config)
    assert (len(generations), len(feedback)) == (2, 1)


# --- the trainer learns from it ----------------------------------------------------------------------------


def import_one_of_each(kafka: KafkaConfig, tmp_path: Path) -> Path:
    """Two RLAIF-V preferences, an RLHF-V edit, a VLFeedback record rated twice and a LLaVA preference in a
    two-turn conversation, on kafka; returns the blob store."""
    blobs = tmp_path / "blobs"
    red, blue = picture("red"), picture("blue")
    files = {
        "rlaif-v": write_rlaif_v(tmp_path / "rlaif-v.parquet", [
            (red, QUESTION, "It is red.", "It is blue."), (blue, QUESTION, "It is blue.", "It is green.")]),
        "rlhf-v": write_rlhf_v(tmp_path / "rlhf-v.jsonl", [(red, "Describe the image.", "A red square.",
                                                             "A red square and a dog.")]),
        "vlfeedback": write_vlfeedback(tmp_path / "vlfeedback.jsonl", [("red.png", QUESTION, [
            vlfeedback_completion("a", "Red.", ("5", "5", "5")), vlfeedback_completion("b", "Grey.", ("2", "3", "1"))])]),
        "llava-human-preference": write_llava_human_preference(tmp_path / "llava.json", [
            ("red.png", [("human", "<image>\nWhat is it?"), ("gpt", "A square."), ("human", "Which colour?")],
             "Red.", "Blue.", 1)]),
    }
    (tmp_path / "red.png").write_bytes(red)
    for format_name, path in files.items():
        assert run_data(kafka, blobs, "import", format_name, str(path)) == 0
    return blobs


def test_the_trainer_joins_and_learns_from_imported_feedback(own_kafka_config: KafkaConfig, tmp_path: Path) -> None:
    blobs = import_one_of_each(own_kafka_config, tmp_path)
    config = TrainerConfig(kafka=own_kafka_config, work_dir=tmp_path / "trainer", model_store=str(tmp_path / "models"),
                           blob_dir=blobs, metrics_port=0, round_max_seconds=1.0, min_pairs_to_learn=5,
                           heldout_percent=0,
                           learner=LearnerConfig(algorithm="dpo", reward_epochs=1, policy_epochs=1))
    trainer = Trainer(config, Learner(config.learner, BlobStore(config.blob_dir)))
    try:
        metrics: dict[str, float] = {}
        for _ in range(5):  # the feedback may take more than one round to arrive
            metrics = trainer.run_round()
            if trainer.state.learning_rounds:
                break
        pairs = trainer.state.replay_pairs  # what was learned from
        assert sorted(pair.source for pair in pairs) == ["edit", "preference", "preference", "preference", "rating"]
        assert math.isfinite(metrics["dpo_loss"]) and math.isfinite(metrics["rm_loss"])
        # Imported responses carry no token ids: the trainer tokenised their text, EOS-terminated, with its own
        # tokenizer, as it does an edit's.
        tokenizer = trainer.learner.models.processor.tokenizer
        for pair in pairs:
            for response in (pair.chosen, pair.rejected):
                assert response.token_ids is None
                assert trainer.learner.batches.token_ids(response) == (
                    tokenizer(response.text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
    finally:
        trainer.close()
    assert read_topic(own_kafka_config, "feedback.dlq", events_pb2.DeadLetter) == []


# --- export ------------------------------------------------------------------------------------------------


def test_export_is_a_trl_preference_dataset_that_dpo_trains_on(
    own_kafka_config: KafkaConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import datasets
    from trl import DPOConfig, DPOTrainer

    from modalign.policy.model import build_default_policy

    blobs = import_one_of_each(own_kafka_config, tmp_path)
    store_directly(own_kafka_config, valid_feedback("tie"))  # a tie makes no pair: left out, and said so
    out = tmp_path / "export" / "pairs.parquet"
    capsys.readouterr()
    assert run_data(own_kafka_config, blobs, "export", str(out)) == 0
    printed = capsys.readouterr().out
    assert "wrote 5 preference pairs" in printed and "left out 1: tie" in printed

    dataset = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert set(dataset.column_names) == {"prompt", "chosen", "rejected", "images", "source", "margin",
                                         "chosen_policy_version", "rejected_policy_version", "feedback_id", "user_id"}
    rows = {(row["chosen"][0]["content"][0]["text"], row["rejected"][0]["content"][0]["text"]): row for row in dataset}
    assert set(rows) == {("It is red.", "It is blue."), ("It is blue.", "It is green."),
                         ("A red square.", "A red square and a dog."), ("Red.", "Grey."), ("Red.", "Blue.")}
    red = rows[("It is red.", "It is blue.")]
    assert red["prompt"] == [{"role": "user", "content": [{"type": "image", "text": None},
                                                          {"type": "text", "text": QUESTION}]}]
    assert red["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "It is red."}]}]
    [image] = red["images"]  # decoded by `datasets` into a PIL image, as TRL's collator wants
    assert isinstance(image, Image.Image) and image.size == (40, 30) and image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert (red["source"], red["chosen_policy_version"], red["rejected_policy_version"], red["user_id"]) == (
        "preference", "import:rlaif-v", "import:rlaif-v", "import:rlaif-v")
    edit = rows[("A red square.", "A red square and a dog.")]
    assert (edit["source"], edit["chosen_policy_version"], edit["rejected_policy_version"]) == ("edit", "", "import:rlhf-v")
    rating = rows[("Red.", "Grey.")]
    assert (rating["source"], rating["margin"]) == ("rating", 3.0)  # 5 over 2 (the mean 2 of 2, 3, 1)
    conversation = rows[("Red.", "Blue.")]["prompt"]
    assert [(turn["role"], [part["type"] for part in turn["content"]]) for turn in conversation] == [
        ("user", ["image", "text"]), ("assistant", ["text"]), ("user", ["text"])]

    # One DPO step of TRL's own trainer on the file as loaded, with the default policy: a LLaVA and its processor.
    model, processor = build_default_policy()
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainer = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), train_dataset=dataset, processing_class=processor,
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=5,
                       learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                       disable_tqdm=True, dataloader_num_workers=0),
    )
    trainer.train()
    [logged, *_] = trainer.state.log_history
    assert math.isfinite(logged["loss"]) and logged["logps/chosen"] < 0 and logged["logps/rejected"] < 0
    assert any(not torch.equal(parameter, before[name]) for name, parameter in model.named_parameters())
