"""Spoken questions for the simulated users: text to WAV, the same bytes for the same text.

espeak-ng speaks when its binary is on PATH (a fixed voice and speed, so its output is deterministic).
Without it, a tone synthesiser stands in: each word becomes a few vowel-like harmonic tones whose pitch
and formants come from the word's letters, with pauses between words. That is not speech a model can
understand, but it is audio with the shape of speech, different for every text, so the whole spoken
path can run on machines that lack espeak-ng; each clip says which synthesiser spoke it.
"""

from __future__ import annotations

import functools
import io
import re
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import soundfile
import soxr

from modalign.core.audio import decode_audio

Synthesiser = Literal["espeak-ng", "tones"]

ESPEAK_VOICE = "en-us"
ESPEAK_WORDS_PER_MINUTE = 160
"""espeak-ng's default speed (175) is brisk; 160 is an unhurried reading pace."""

LETTER_SECONDS = 0.06
"""The tone synthesiser's length of a letter: about a word of five letters in a third of a second."""
PAUSE_SECONDS = 0.08
"""Silence between two words."""
VOWEL_FORMANTS = {"a": (730, 1090), "e": (530, 1840), "i": (270, 2290), "o": (570, 840), "u": (300, 870)}
"""The first two formants (Hz) of the English vowels (Peterson & Barney, men's voices)."""
PEAK = 0.5
"""Loudest sample of the output, of full scale: well clear of clipping, well above silence."""


@dataclass(frozen=True)
class Spoken:
    wav: bytes
    """Mono 16-bit PCM WAV."""
    synthesiser: Synthesiser
    """Which synthesiser spoke it."""


def available_synthesiser() -> Synthesiser:
    """The synthesiser synthesise uses by default: espeak-ng where its binary is on PATH, else tones."""
    return "espeak-ng" if shutil.which("espeak-ng") else "tones"


def synthesise(text: str, sampling_rate: int = 16_000, synthesiser: Synthesiser | None = None) -> Spoken:
    """`text` spoken as a WAV at `sampling_rate`, by `synthesiser` (by default the available one)."""
    if not re.search(r"\w", text):
        raise ValueError(f"there is nothing to say in {text!r}")
    return _synthesise(text, sampling_rate, synthesiser or available_synthesiser())


@functools.lru_cache(maxsize=1024)
def _synthesise(text: str, sampling_rate: int, synthesiser: Synthesiser) -> Spoken:
    """Cached: the demo's users ask a few dozen distinct questions thousands of times."""
    samples = _espeak(text, sampling_rate) if synthesiser == "espeak-ng" else _tones(text, sampling_rate)
    samples = samples * (PEAK / np.abs(samples).max())
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sampling_rate, format="WAV", subtype="PCM_16")
    return Spoken(wav=buffer.getvalue(), synthesiser=synthesiser)


def spoken_clip(text: str, sampling_rate: int) -> npt.NDArray[np.float32]:
    """`text` spoken (by the available synthesiser) and decoded at `sampling_rate` as the policy decodes a
    request's clip: the model input a spoken question becomes. Cached, so shared: callers do not modify it."""
    return _decoded(synthesise(text, sampling_rate).wav, sampling_rate)


@functools.lru_cache(maxsize=1024)
def _decoded(wav: bytes, sampling_rate: int) -> npt.NDArray[np.float32]:
    return decode_audio(wav, "audio/wav", sampling_rate).samples


def _espeak(text: str, sampling_rate: int) -> npt.NDArray[np.float64]:
    """espeak-ng's speech, resampled from its own rate (22050 Hz). It writes a file rather than stdout
    because a WAV on stdout cannot go back to fill in its length, and declares a wrong one. The text goes
    in on stdin so that none of it is read as an option."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spoken.wav"
        subprocess.run(
            ["espeak-ng", "-v", ESPEAK_VOICE, "-s", str(ESPEAK_WORDS_PER_MINUTE), "-b", "1", "-w", str(path), "--stdin"],
            input=text.encode(), check=True, capture_output=True, timeout=60,
        )
        samples, rate = soundfile.read(path, dtype="float64")
    return samples if rate == sampling_rate else soxr.resample(samples, rate, sampling_rate)


def _tones(text: str, sampling_rate: int) -> npt.NDArray[np.float64]:
    """Each word as one vowel-like tone per letter, separated by pauses. The word's checksum sets its
    pitch; each letter sets its formants (the vowels their own, the consonants ones derived from their
    code), so different texts sound different and the same text the same everywhere."""
    pause = np.zeros(round(PAUSE_SECONDS * sampling_rate))
    pieces: list[npt.NDArray[np.float64]] = []
    for word in re.findall(r"\w+", text.lower()):
        pitch = 95.0 + zlib.crc32(word.encode()) % 80  # a man's speaking voice, 95..175 Hz
        for position, letter in enumerate(word):
            falling = pitch * (1 - 0.1 * position / len(word))  # pitch falls through a word, as in speech
            pieces.append(_vowel(falling, _formants(letter), sampling_rate))
        pieces.append(pause)
    return np.concatenate(pieces[:-1])


def _formants(letter: str) -> tuple[float, float]:
    if letter in VOWEL_FORMANTS:
        return VOWEL_FORMANTS[letter]
    code = ord(letter)
    return 250.0 + code % 7 * 90, 900.0 + code * 37 % 13 * 120


def _vowel(pitch: float, formants: tuple[float, float], sampling_rate: int) -> npt.NDArray[np.float64]:
    """One letter's tone: the harmonics of `pitch` below 4 kHz, each as loud as it is near a formant,
    faded in and out so that letters join without clicks."""
    time = np.arange(round(LETTER_SECONDS * sampling_rate)) / sampling_rate
    harmonics = pitch * np.arange(1, int(min(4000, sampling_rate / 2) // pitch) + 1)
    loudness = np.exp(-(((harmonics[:, None] - np.array(formants)) / 150) ** 2)).sum(axis=1) + 0.02
    tone = (loudness[:, None] * np.sin(2 * np.pi * harmonics[:, None] * time)).sum(axis=0)
    return tone * np.sin(np.pi * time / LETTER_SECONDS) ** 2
