"""Rows of `modalign data export`, as pure logic: what a pair becomes, and the pairs the format has no place for."""

from __future__ import annotations

from pathlib import Path

import pytest

from modalign.core.blobs import BlobStore
from modalign.data.exporting import Spoken, row_of
from modalign.trainer.join import PreferencePair, Response
from modalign.v1 import common_pb2, events_pb2

from tests.clips import wav
from tests.policy.test_policy_service import png


def pair(parts: list[common_pb2.LoggedContentPart]) -> PreferencePair:
    generation = events_pb2.GenerationLogged(
        prompt_text="What colour is it?",
        conversation=[common_pb2.LoggedMessage(role=common_pb2.ROLE_USER, content=parts)],
    )
    return PreferencePair("fb-1", "preference", generation, Response("Red.", None, None, "v1"),
                          Response("Blue.", None, None, "v0"))


def test_a_pair_becomes_a_row_with_its_image_in_place(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    image = png()
    row = row_of(pair([common_pb2.LoggedContentPart(image=common_pb2.ImageRef(sha256=blobs.put(image))),
                       common_pb2.LoggedContentPart(text="What colour is it?")]), blobs)
    assert row["prompt"] == [{"role": "user", "content": [{"type": "image", "text": None},
                                                          {"type": "text", "text": "What colour is it?"}]}]
    assert row["images"] == [{"bytes": image, "path": None}]


def test_a_spoken_question_is_left_out_rather_than_written_as_text(tmp_path: Path) -> None:
    """TRL's preference format holds text and images: a clip's sha256 must never be exported as the user's words."""
    blobs = BlobStore(tmp_path)
    spoken = pair([common_pb2.LoggedContentPart(image=common_pb2.ImageRef(sha256=blobs.put(png()))),
                   common_pb2.LoggedContentPart(audio=common_pb2.AudioRef(sha256=blobs.put(wav()), seconds=1.0))])
    with pytest.raises(Spoken):
        row_of(spoken, blobs)
