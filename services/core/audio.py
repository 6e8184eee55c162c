"""Decoding untrusted audio: what the header says is checked before any sample is decoded.

libsndfile (through soundfile) reads the containers; soxr resamples to the rate the model's feature
extractor expects. Every refusal is an InvalidAudio whose message names the problem for the client.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import soundfile
import soxr

CONTAINER_BY_MIME = {
    "audio/wav": "WAV",
    "audio/x-wav": "WAV",
    "audio/wave": "WAV",
    "audio/mpeg": "MP3",
    "audio/mp3": "MP3",
    "audio/flac": "FLAC",
    "audio/ogg": "OGG",
}
"""The MIME types accepted, and the container (as libsndfile names it) each one declares."""

MIME_BY_INPUT_AUDIO_FORMAT = {"wav": "audio/wav", "mp3": "audio/mpeg"}
"""The formats of the OpenAI API's `input_audio` content part ({"data": base64, "format": ...})."""

_BLOCK_FRAMES = 65_536
"""Frames decoded at a time: each block is mixed down to mono at once, so however many channels a file
has, only one block of them is held in memory."""

_STREAMED_WAV_SIZE = 0xFFFF_FFFF
"""The data chunk size a WAV written to a pipe declares when its length was unknown while writing."""


@dataclass(frozen=True)
class AudioLimits:
    max_bytes: int = 10 * 1024 * 1024
    """Largest encoded audio accepted, checked before anything is decoded."""
    max_seconds: float = 30.0
    """Longest audio accepted. The header's duration is checked before decoding, which is what stops a
    few KB of compressed silence from decoding to gigabytes."""
    min_sample_rate: int = 8_000
    """Lowest sample rate accepted: below telephone quality, speech is no longer intelligible."""
    max_sample_rate: int = 192_000
    """Highest sample rate accepted; with max_seconds it bounds the samples a decode can produce."""
    max_channels: int = 8
    """Most channels accepted (7.1 surround); bounds the work of mixing down to mono."""
    silence_peak: float = 1e-3
    """Audio whose loudest sample (full scale is 1.0) is below this is refused as silent: about -60 dBFS,
    quieter than any recording of someone speaking."""


class InvalidAudio(ValueError):
    """The audio cannot be accepted; the message says why, for the client."""


@dataclass(frozen=True, eq=False)
class Audio:
    """Decoded audio as the model's feature extractor takes it."""

    samples: npt.NDArray[np.float32] = field(repr=False)
    """Mono, one dimension, full scale 1.0."""
    sampling_rate: int
    """Samples per second."""

    @property
    def seconds(self) -> float:
        """How long the audio lasts: what the services count as audio seconds served."""
        return len(self.samples) / self.sampling_rate


def decode_input_audio(data_b64: str, audio_format: str, limits: AudioLimits = AudioLimits()) -> tuple[bytes, str]:
    """The bytes and MIME type of the OpenAI API's input_audio ({"data": base64, "format": "wav"|"mp3"}),
    or InvalidAudio naming what is wrong with it. Base64 longer than max_bytes can encode is refused before
    it is decoded."""
    mime_type = MIME_BY_INPUT_AUDIO_FORMAT.get(audio_format)
    if mime_type is None:
        raise InvalidAudio(f"format {audio_format!r} is not one of {sorted(MIME_BY_INPUT_AUDIO_FORMAT)}")
    max_encoded = 4 * math.ceil(limits.max_bytes / 3)
    if len(data_b64) > max_encoded:
        raise InvalidAudio(
            f"is {len(data_b64)} characters of base64, more than the {max_encoded} that encode the limit of "
            f"{limits.max_bytes} bytes"
        )
    try:
        decoded = base64.b64decode(data_b64, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidAudio(f"the data is not valid base64 ({error})") from error
    return decoded, mime_type


def decode_audio(
    data: bytes, mime_type: str | None, sampling_rate: int, limits: AudioLimits = AudioLimits()
) -> Audio:
    """The audio as mono float32 samples at `sampling_rate`, or InvalidAudio naming the problem. mime_type
    None takes whatever container the data holds: audio read back from the blob store, whose MIME type was
    checked when a client sent it."""
    if not data:
        raise InvalidAudio("is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidAudio(f"is {len(data)} bytes, above the limit of {limits.max_bytes}")
    container = None if mime_type is None else CONTAINER_BY_MIME.get(mime_type)
    if mime_type is not None and container is None:
        raise InvalidAudio(f"mime_type {mime_type!r} is not one of {sorted(CONTAINER_BY_MIME)}")
    try:
        file = soundfile.SoundFile(io.BytesIO(data))
    except soundfile.LibsndfileError as error:
        raise InvalidAudio(f"is not readable audio ({error.error_string})") from error
    with file:
        _check_header(file, data, mime_type, container, limits)
        try:
            samples = _decode_mono(file)
        except soundfile.LibsndfileError as error:
            raise InvalidAudio(
                f"is truncated or corrupt: decoding failed partway through ({error.error_string})"
            ) from error
        declared_frames = file.frames
        source_rate = file.samplerate
    if len(samples) < declared_frames:
        raise InvalidAudio(
            f"is truncated: its header declares {declared_frames} frames, only {len(samples)} could be decoded"
        )
    if not np.isfinite(samples).all():
        raise InvalidAudio("has samples that are not finite numbers (NaN or infinity)")
    peak = float(np.abs(samples).max())
    if peak < limits.silence_peak:
        raise InvalidAudio(f"is silent: its loudest sample is {peak:.2g} of full scale, below {limits.silence_peak:g}")
    if source_rate != sampling_rate:
        samples = soxr.resample(samples, source_rate, sampling_rate).astype(np.float32, copy=False)
    return Audio(samples=samples, sampling_rate=sampling_rate)


def _check_header(
    file: soundfile.SoundFile, data: bytes, mime_type: str | None, container: str | None, limits: AudioLimits
) -> None:
    """Refuses, from the header alone, audio that is not what its MIME type says, or too long, or at a rate
    or with channels outside the limits, or empty, or a WAV cut short."""
    found = "WAV" if file.format == "WAVEX" else file.format  # WAVEX: WAV with the extensible format header
    if container is not None and found != container:
        raise InvalidAudio(f"mime_type {mime_type!r} declares {container}, but the data is {found}")
    if not limits.min_sample_rate <= file.samplerate <= limits.max_sample_rate:
        raise InvalidAudio(
            f"has the wrong rate: {file.samplerate} Hz is outside the accepted "
            f"{limits.min_sample_rate}..{limits.max_sample_rate} Hz"
        )
    if file.channels > limits.max_channels:
        raise InvalidAudio(f"has {file.channels} channels, above the limit of {limits.max_channels}")
    seconds = file.frames / file.samplerate
    if seconds > limits.max_seconds:
        raise InvalidAudio(f"is {seconds:.1f} seconds long, above the limit of {limits.max_seconds:g}")
    if file.frames == 0:
        # An Ogg stream cut short can look the same: its length is read from its last page.
        raise InvalidAudio("is empty: no samples were found in it (or it was cut short before its last page)")
    if found == "WAV":
        missing = _missing_wav_bytes(data)
        if missing:
            raise InvalidAudio(f"is truncated: its header declares {missing} more bytes of samples than it holds")


def _missing_wav_bytes(data: bytes) -> int:
    """How many bytes of samples a RIFF WAV's data chunk declares beyond the end of the data. libsndfile
    quietly shortens a WAV to what is there, so a WAV cut short is only found from its chunk sizes."""
    size_format = ">I" if data.startswith(b"RIFX") else "<I"  # RIFX: the big-endian variant
    offset = 12  # past "RIFF", the RIFF size and "WAVE"
    while offset + 8 <= len(data):
        chunk_id = data[offset:offset + 4]
        (size,) = struct.unpack_from(size_format, data, offset + 4)
        if chunk_id == b"data":
            if size == _STREAMED_WAV_SIZE:
                return 0
            return max(0, size - (len(data) - offset - 8))
        offset += 8 + size + size % 2  # chunks are padded to an even size
    return 0


def _decode_mono(file: soundfile.SoundFile) -> npt.NDArray[np.float32]:
    """Every frame the decoder gives, channels averaged; fewer than file.frames when it runs out early."""
    blocks = []
    while len(block := file.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)):
        blocks.append(block.mean(axis=1, dtype=np.float32))
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
