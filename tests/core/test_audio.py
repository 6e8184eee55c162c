"""Untrusted audio, as clients send it with a spoken question: decoded to mono at the model's rate, or
refused naming why. Every file is made here with soundfile."""

from __future__ import annotations

import base64
import io
import struct

import numpy as np
import numpy.typing as npt
import pytest
import soundfile

from modalign.core.audio import (
    AudioLimits,
    InvalidAudio,
    decode_audio,
    decode_input_audio,
)

MODEL_RATE = 16_000


def tone(frequency: float, seconds: float, rate: int, amplitude: float = 0.3) -> npt.NDArray[np.float64]:
    return amplitude * np.sin(2 * np.pi * frequency * np.arange(round(seconds * rate)) / rate)


def speech_like(seconds: float, rate: int) -> npt.NDArray[np.float64]:
    """Noise whose loudness rises and falls four times a second, as syllables do."""
    frames = round(seconds * rate)
    syllables = 0.5 - 0.5 * np.cos(2 * np.pi * 4 * np.arange(frames) / rate)
    return 0.3 * syllables * np.random.default_rng(0).uniform(-1, 1, frames)


def encode(samples: npt.NDArray[np.float64], rate: int, container: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=container, subtype=subtype)
    return buffer.getvalue()


def peak_frequency(samples: npt.NDArray[np.float32], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def test_a_wav_at_the_models_rate_decodes_to_its_samples() -> None:
    samples = speech_like(1.0, MODEL_RATE)
    audio = decode_audio(encode(samples, MODEL_RATE, subtype="PCM_16"), "audio/wav", MODEL_RATE)
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.sampling_rate == MODEL_RATE and audio.seconds == 1.0
    np.testing.assert_allclose(audio.samples, samples, atol=1 / 2**15)


@pytest.mark.parametrize(("container", "subtype", "mime_type"), [
    ("MP3", None, "audio/mpeg"),
    ("MP3", None, "audio/mp3"),
    ("FLAC", None, "audio/flac"),
    ("OGG", "VORBIS", "audio/ogg"),
    ("WAV", "FLOAT", "audio/x-wav"),
])
def test_compressed_and_float_audio_decodes_to_the_same_tone(container: str, subtype: str | None, mime_type: str) -> None:
    audio = decode_audio(encode(tone(440, 1.0, 44_100), 44_100, container, subtype), mime_type, MODEL_RATE)
    assert len(audio.samples) == MODEL_RATE
    assert peak_frequency(audio.samples, MODEL_RATE) == pytest.approx(440, abs=2)


def test_stereo_is_mixed_down_to_mono_by_averaging_the_channels() -> None:
    left, right = tone(440, 0.5, MODEL_RATE), speech_like(0.5, MODEL_RATE)
    audio = decode_audio(encode(np.stack([left, right], axis=1), MODEL_RATE, subtype="FLOAT"), "audio/wav", MODEL_RATE)
    np.testing.assert_allclose(audio.samples, (left + right) / 2, atol=1e-6)


def test_resampling_a_tone_from_44100_to_16000_keeps_its_frequency_and_duration() -> None:
    audio = decode_audio(encode(tone(440, 2.0, 44_100), 44_100, subtype="PCM_16"), "audio/wav", MODEL_RATE)
    assert audio.sampling_rate == MODEL_RATE
    assert len(audio.samples) == 2 * MODEL_RATE and audio.seconds == 2.0
    assert peak_frequency(audio.samples, MODEL_RATE) == pytest.approx(440, abs=1)


def test_a_wav_streamed_without_a_declared_length_is_accepted() -> None:
    """A WAV written to a pipe declares its sizes as 0xFFFFFFFF; that is not a truncated file."""
    wav = bytearray(encode(tone(440, 1.0, MODEL_RATE), MODEL_RATE, subtype="PCM_16"))
    data_chunk = wav.index(b"data")
    struct.pack_into("<I", wav, 4, 0xFFFF_FFFF)
    struct.pack_into("<I", wav, data_chunk + 4, 0xFFFF_FFFF)
    assert decode_audio(bytes(wav), "audio/wav", MODEL_RATE).seconds == 1.0


def wav(samples: npt.NDArray[np.float64], rate: int = MODEL_RATE) -> bytes:
    return encode(samples, rate, subtype="PCM_16")


def refusal(data: bytes, mime_type: str = "audio/wav", limits: AudioLimits = AudioLimits()) -> str:
    with pytest.raises(InvalidAudio) as refused:
        decode_audio(data, mime_type, MODEL_RATE, limits)
    return str(refused.value)


def test_bytes_that_are_not_audio_are_refused() -> None:
    assert "not readable audio" in refusal(b"<html>this is a web page, not a recording</html>" * 10)


def test_no_bytes_at_all_are_refused() -> None:
    assert "empty" in refusal(b"")


def test_a_wav_without_samples_is_refused() -> None:
    assert "no samples" in refusal(wav(np.zeros(0)))


def test_too_many_bytes_are_refused_before_decoding() -> None:
    """Not even audio: the size alone refuses it."""
    message = refusal(b"\0" * 2001, limits=AudioLimits(max_bytes=2000))
    assert "2001 bytes, above the limit of 2000" in message


def test_an_unsupported_mime_type_is_refused() -> None:
    assert "'audio/aac' is not one of" in refusal(wav(tone(440, 1.0, MODEL_RATE)), "audio/aac")


def test_a_wav_cut_in_half_is_refused_as_truncated() -> None:
    whole = wav(speech_like(1.0, MODEL_RATE))
    assert "truncated" in refusal(whole[: len(whole) // 2])


def test_an_mp3_cut_short_is_refused_as_truncated() -> None:
    whole = encode(speech_like(1.0, 44_100), 44_100, "MP3")
    assert "truncated" in refusal(whole[: len(whole) * 3 // 4], "audio/mpeg")


def test_a_flac_broken_mid_file_is_refused_as_truncated_or_corrupt() -> None:
    whole = encode(speech_like(1.0, MODEL_RATE), MODEL_RATE, "FLAC")
    assert "truncated or corrupt" in refusal(whole[: len(whole) // 2], "audio/flac")


def test_audio_longer_than_the_limit_is_refused_from_its_header_before_decoding() -> None:
    """Half the FLAC is missing, so decoding would fail: the refusal is the header's duration."""
    flac = encode(tone(440, 31.0, 8_000), 8_000, "FLAC")
    assert "31.0 seconds long, above the limit of 30" in refusal(flac[: len(flac) // 2], "audio/flac")


def test_a_sample_rate_below_the_accepted_range_is_refused_as_the_wrong_rate() -> None:
    message = refusal(wav(tone(440, 1.0, 4_000), 4_000))
    assert "wrong rate" in message and "4000 Hz" in message


def test_a_sample_rate_above_the_accepted_range_is_refused_as_the_wrong_rate() -> None:
    limits = AudioLimits(max_sample_rate=48_000)
    assert "wrong rate: 96000 Hz" in refusal(wav(tone(440, 0.1, 96_000), 96_000), limits=limits)


def test_more_channels_than_the_limit_are_refused() -> None:
    assert "9 channels, above the limit of 8" in refusal(wav(np.tile(tone(440, 0.1, MODEL_RATE)[:, None], 9)))


@pytest.mark.parametrize("amplitude", [0.0, 5e-4])
def test_silence_is_refused(amplitude: float) -> None:
    assert "silent" in refusal(encode(tone(440, 1.0, MODEL_RATE, amplitude), MODEL_RATE, subtype="FLOAT"))


def test_a_quiet_voice_above_the_threshold_is_not_silence() -> None:
    assert decode_audio(wav(tone(440, 1.0, MODEL_RATE, 0.01)), "audio/wav", MODEL_RATE).seconds == 1.0


def test_samples_that_are_not_numbers_are_refused() -> None:
    samples = tone(440, 1.0, MODEL_RATE)
    samples[100] = np.nan
    assert "not finite" in refusal(encode(samples, MODEL_RATE, subtype="FLOAT"))


def test_mp3_bytes_sent_as_wav_are_refused_naming_both() -> None:
    message = refusal(encode(speech_like(1.0, 44_100), 44_100, "MP3"), "audio/wav")
    assert "'audio/wav' declares WAV, but the data is MP3" in message


def test_wav_bytes_sent_as_mp3_are_refused_naming_both() -> None:
    assert "declares MP3, but the data is WAV" in refusal(wav(speech_like(1.0, MODEL_RATE)), "audio/mpeg")


@pytest.mark.parametrize(("audio_format", "mime_type"), [("wav", "audio/wav"), ("mp3", "audio/mpeg")])
def test_openai_input_audio_gives_its_bytes_and_mime_type(audio_format: str, mime_type: str) -> None:
    data = encode(speech_like(0.5, MODEL_RATE), MODEL_RATE, audio_format.upper())
    decoded, decoded_mime = decode_input_audio(base64.b64encode(data).decode(), audio_format)
    assert (decoded, decoded_mime) == (data, mime_type)
    assert decode_audio(decoded, decoded_mime, MODEL_RATE).seconds == pytest.approx(0.5, abs=0.01)


def test_openai_input_audio_in_bad_base64_is_refused() -> None:
    with pytest.raises(InvalidAudio, match="not valid base64"):
        decode_input_audio("UklGRg==not base64!", "wav")


def test_openai_input_audio_in_an_unknown_format_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(InvalidAudio, match=r"format 'flac' is not one of \['mp3', 'wav'\]"):
        decode_input_audio(base64.b64encode(b"fLaC").decode(), "flac")


def test_openai_input_audio_too_long_to_fit_the_limit_is_refused_before_decoding_the_base64() -> None:
    """Not even valid base64: its length alone refuses it."""
    with pytest.raises(InvalidAudio, match="more than the 8 that encode the limit of 6 bytes"):
        decode_input_audio("!" * 9, "wav", AudioLimits(max_bytes=6))
