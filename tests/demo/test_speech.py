"""The simulated users' spoken questions: audio the services accept, the same for the same text, from
espeak-ng where it is installed and from the tone synthesiser everywhere."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import soundfile

from modalign.core.audio import decode_audio
from modalign.demo.speech import Synthesiser, available_synthesiser, synthesise

QUESTION = "What colour is the circle in the top left?"
OTHER_QUESTION = "What colour is the square in the top left?"

SYNTHESISERS = [
    "tones",
    pytest.param("espeak-ng", marks=pytest.mark.skipif(
        shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")),
]


@pytest.mark.parametrize("synthesiser", SYNTHESISERS)
def test_a_spoken_question_decodes_as_audio_of_a_plausible_length(synthesiser: Synthesiser) -> None:
    spoken = synthesise(QUESTION, synthesiser=synthesiser)
    assert spoken.synthesiser == synthesiser
    audio = decode_audio(spoken.wav, "audio/wav", 16_000)  # refuses silence, too
    words = len(QUESTION.split())
    assert 0.15 * words < audio.seconds < 0.8 * words


@pytest.mark.parametrize("synthesiser", SYNTHESISERS)
def test_the_same_text_gives_the_same_bytes_and_different_texts_differ(synthesiser: Synthesiser) -> None:
    spoken = synthesise(QUESTION, synthesiser=synthesiser).wav
    assert synthesise(QUESTION, synthesiser=synthesiser).wav == spoken
    assert synthesise(OTHER_QUESTION, synthesiser=synthesiser).wav != spoken


@pytest.mark.parametrize("synthesiser", SYNTHESISERS)
def test_the_wav_is_mono_at_the_rate_asked(synthesiser: Synthesiser) -> None:
    info = soundfile.info(io.BytesIO(synthesise(QUESTION, 24_000, synthesiser).wav))
    assert (info.format, info.samplerate, info.channels) == ("WAV", 24_000, 1)


def test_without_espeak_ng_on_path_the_tones_speak(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert available_synthesiser() == "tones"
    assert synthesise(QUESTION).synthesiser == "tones"


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_with_espeak_ng_on_path_it_speaks() -> None:
    assert available_synthesiser() == "espeak-ng"
    assert synthesise(QUESTION).synthesiser == "espeak-ng"


def test_text_without_words_is_refused() -> None:
    with pytest.raises(ValueError, match="nothing to say"):
        synthesise(" ?! ")
