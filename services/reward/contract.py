"""The reward service's request contract on KServe's Open Inference Protocol v2 (REST and gRPC).

Model name configurable (--model-name), default "reward":

    inputs   prompt    BYTES [B]     UTF-8 user prompt, without chat formatting
             response  BYTES [B]     UTF-8 assistant response to score
             images    BYTES [B, K]  encoded images (PNG, JPEG, WEBP or GIF) of each prompt, raw or
                                     base64; an empty element is "no image", so a row holds 0..K
                                     images, in order
             conversation  BYTES [B]  optional: each row's whole conversation, UTF-8 JSON in the chat-template
                                     messages format ([{"role": "user", "content": [{"type": "image"},
                                     {"type": "text", "text": "..."}]}, {"role": "assistant", ...}, ...]),
                                     its image parts in the order of the row's images; the model then reads
                                     it instead of `prompt` (which stays required: the last user text)
             audio     BYTES [B, K]  optional, with `conversation`: encoded audio clips (WAV, MP3, FLAC or
                                     Ogg) of each row, raw or base64, in the order of its conversation's
                                     audio parts; an empty element is "no clip". Only a reward model whose
                                     processor takes audio accepts any (docs/models.md, "Speech")
    output   score     FP32  [B]     scalar reward per row, read at the last response token

Send images base64 over REST: KServe 0.21 turns every REST BYTES element into UTF-8 text while
parsing the request (InferRequest.from_bytes, binary extension included), so raw image bytes fail
there with a 500 before this code runs. gRPC carries raw bytes as they are; base64 works on both.

Bad requests raise kserve.errors.InvalidInput naming the input; KServe 0.21 maps that to HTTP 400
(invalid_input_handler) and gRPC INVALID_ARGUMENT (ExceptionToStatusInterceptor).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferRequest
from PIL import Image

from modalign.core.audio import InvalidAudio, decode_audio
from modalign.core.images import InvalidImage, decode_image
from modalign.policy.conversation import Conversation, audio_keys, from_chat_messages, image_keys
from modalign.reward.config import RequestLimits

INPUTS = [
    {"name": "prompt", "datatype": "BYTES", "shape": [-1]},
    {"name": "response", "datatype": "BYTES", "shape": [-1]},
    {"name": "images", "datatype": "BYTES", "shape": [-1, -1]},
]
OPTIONAL_INPUTS = [
    {"name": "conversation", "datatype": "BYTES", "shape": [-1]},
    {"name": "audio", "datatype": "BYTES", "shape": [-1, -1]},
]
OUTPUTS = [{"name": "score", "datatype": "FP32", "shape": [-1]}]

# Magic numbers of the formats modalign.core.images accepts: the protocol carries no MIME type.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


@dataclass(frozen=True)
class ScoreBatch:
    prompts: list[str | Conversation]
    """Each row's prompt: its conversation when the request gave one, else its text."""
    images: list[list[Image.Image]]
    responses: list[str]
    audio: list[list[np.ndarray]]
    """Each row's audio clips, at the reward model's sampling rate (none for most rows)."""


def _sniff_mime(data: bytes) -> str | None:
    for signature, mime in _SIGNATURES:
        if data.startswith(signature):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _as_bytes(element: Any, name: str) -> bytes:
    """One BYTES element as bytes: bytes over gRPC, text over REST (KServe decodes it as UTF-8)."""
    if isinstance(element, bytes):
        return element
    if isinstance(element, str):
        return element.encode("utf-8")
    raise InvalidInput(f"input '{name}': element of type {type(element).__name__} is not BYTES")


def _image_bytes(data: bytes) -> tuple[bytes, str] | None:
    """The encoded image and its MIME type, sent raw or base64. Raw is tried first, unambiguously:
    base64 of these formats begins "iVBOR", "/9j/", "R0lGOD" or "UklGR", never a raw signature."""
    mime = _sniff_mime(data)
    if mime is not None:
        return data, mime
    try:
        decoded = base64.b64decode(data, validate=True)
    except binascii.Error:
        return None
    mime = _sniff_mime(decoded)
    return (decoded, mime) if mime is not None else None


def _tensor(request: InferRequest, name: str, rank: int) -> np.ndarray:
    tensor = next(infer_input for infer_input in request.inputs if infer_input.name == name)
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input '{name}' must have datatype BYTES, got {tensor.datatype}")
    if len(tensor.shape) != rank:
        raise InvalidInput(f"input '{name}' must have rank {rank}, got shape {list(tensor.shape)}")
    try:
        return tensor.as_numpy()
    except ValueError as error:  # numpy cannot reshape the data to the declared shape
        raise InvalidInput(f"input '{name}': data does not match shape {list(tensor.shape)} ({error})") from error


def _texts(array: np.ndarray, name: str, limits: RequestLimits) -> list[str]:
    texts = []
    for row, element in enumerate(array):
        data = _as_bytes(element, name)
        if len(data) > limits.max_text_bytes:
            raise InvalidInput(
                f"input '{name}'[{row}] is {len(data)} bytes, above the limit of {limits.max_text_bytes}"
            )
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise InvalidInput(f"input '{name}'[{row}] is not valid UTF-8 ({error.reason})") from error
    return texts


def _present(array: np.ndarray, name: str, most: int, what: str) -> list[list[tuple[int, bytes]]]:
    """Each row's non-empty elements of a [B, K] BYTES input, with their columns; counted before any decoding,
    so an oversized row costs nothing."""
    rows = []
    for row, elements in enumerate(array):
        present = [(column, data) for column, data in enumerate(_as_bytes(e, name) for e in elements) if data]
        if len(present) > most:
            raise InvalidInput(f"input '{name}'[{row}] holds {len(present)} {what}, above the limit of {most}")
        rows.append(present)
    return rows


def _images(array: np.ndarray, limits: RequestLimits) -> list[list[Image.Image]]:
    rows = []
    for row, present in enumerate(_present(array, "images", limits.max_images_per_row, "images")):
        images = []
        for column, data in present:
            image = _image_bytes(data)
            if image is None:
                raise InvalidInput(
                    f"input 'images'[{row}][{column}] is not a PNG, JPEG, WEBP or GIF image, raw or base64"
                )
            try:
                images.append(decode_image(*image, limits.image))
            except InvalidImage as error:
                raise InvalidInput(f"input 'images'[{row}][{column}] {error}") from error
        rows.append(images)
    return rows


# The first bytes of the containers modalign.core.audio reads: raw clips are told from base64 by them.
_AUDIO_SIGNATURES = (b"RIFF", b"RIFX", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"fLaC", b"OggS")


def _audio(array: np.ndarray, limits: RequestLimits, sampling_rate: int | None) -> list[list[np.ndarray]]:
    rows: list[list[np.ndarray]] = []
    for row, present in enumerate(_present(array, "audio", limits.max_audio_per_row, "clips")):
        if not present:
            rows.append([])
            continue
        if sampling_rate is None:
            raise InvalidInput("input 'audio': this reward model takes no audio")
        clips = []
        for column, data in present:
            if not data.startswith(_AUDIO_SIGNATURES):
                try:
                    data = base64.b64decode(data, validate=True)
                except binascii.Error:
                    raise InvalidInput(f"input 'audio'[{row}][{column}] is not WAV, MP3, FLAC or Ogg audio, raw or "
                                       "base64") from None
            try:
                clips.append(decode_audio(data, None, sampling_rate, limits.audio).samples)
            except InvalidAudio as error:
                raise InvalidInput(f"input 'audio'[{row}][{column}] {error}") from error
        rows.append(clips)
    return rows


def _conversations(
    array: np.ndarray, images: list[list[Image.Image]], audio: list[list[np.ndarray]], limits: RequestLimits
) -> list[Conversation]:
    conversations = []
    for row, element in enumerate(array):
        where = f"input 'conversation'[{row}]"
        data = _as_bytes(element, "conversation")
        if len(data) > limits.max_conversation_bytes:
            raise InvalidInput(f"{where} is {len(data)} bytes, above the limit of {limits.max_conversation_bytes}")
        try:
            conversation = from_chat_messages(json.loads(data))
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidInput(f"{where} is not a conversation in the chat messages format ({error})") from error
        if len(audio_keys(conversation)) != len(audio[row]):
            raise InvalidInput(f"{where} has {len(audio_keys(conversation))} audio parts for the row's "
                               f"{len(audio[row])} audio clips")
        if len(image_keys(conversation)) != len(images[row]):
            raise InvalidInput(f"{where} has {len(image_keys(conversation))} image parts for the row's "
                               f"{len(images[row])} images")
        conversations.append(conversation)
    return conversations


def parse_request(request: InferRequest, limits: RequestLimits, sampling_rate: int | None = None) -> ScoreBatch:
    """Validates an OIP v2 request against the contract; every refusal names the input at fault. Audio clips
    are decoded at sampling_rate, the reward model's processor's (None: a model that takes no audio)."""
    names = [infer_input.name for infer_input in request.inputs]
    expected = [spec["name"] for spec in INPUTS]
    for name in expected:
        if names.count(name) != 1:
            problem = "missing" if name not in names else "given more than once"
            raise InvalidInput(f"input '{name}' is {problem}; the reward model expects inputs {expected}")
    optional = [spec["name"] for spec in OPTIONAL_INPUTS]
    unexpected = sorted(set(names) - set(expected) - set(optional))
    if unexpected or any(names.count(name) > 1 for name in optional):
        raise InvalidInput(f"unexpected inputs {unexpected or optional}; the reward model expects inputs {expected}"
                           f" and optionally {optional}, each once")

    prompt = _tensor(request, "prompt", rank=1)
    response = _tensor(request, "response", rank=1)
    images = _tensor(request, "images", rank=2)
    batch_size = prompt.shape[0]
    if batch_size == 0:
        raise InvalidInput("input 'prompt' is empty; send at least one row")
    if batch_size > limits.max_batch_size:
        raise InvalidInput(f"input 'prompt' has {batch_size} rows, above the limit of {limits.max_batch_size}")
    for name, array in (("response", response), ("images", images)):
        if array.shape[0] != batch_size:
            raise InvalidInput(f"input '{name}' has {array.shape[0]} rows but input 'prompt' has {batch_size}")
    decoded = _images(images, limits)
    clips: list[list[np.ndarray]] = [[] for _ in range(batch_size)]
    if "audio" in names:
        if "conversation" not in names:
            raise InvalidInput("input 'audio' needs input 'conversation', whose audio parts say where each clip goes")
        audio = _tensor(request, "audio", rank=2)
        if audio.shape[0] != batch_size:
            raise InvalidInput(f"input 'audio' has {audio.shape[0]} rows but input 'prompt' has {batch_size}")
        clips = _audio(audio, limits, sampling_rate)
    prompts: list[str | Conversation] = list(_texts(prompt, "prompt", limits))
    if "conversation" in names:
        conversation = _tensor(request, "conversation", rank=1)
        if conversation.shape[0] != batch_size:
            raise InvalidInput(f"input 'conversation' has {conversation.shape[0]} rows but input 'prompt' has {batch_size}")
        prompts = list(_conversations(conversation, decoded, clips, limits))
    return ScoreBatch(prompts=prompts, images=decoded, responses=_texts(response, "response", limits), audio=clips)
