"""Conversations: what a request asks, as turns of ordered text, image and audio parts.

One representation serves every part of the loop. The policy service builds it from a request (a
conversation, or the single-question shorthand: one user turn of images then text), logs it with the
generation (images and audio clips by their blob sha256), and the trainer rebuilds it from the log to learn on the full
context; model.format_conversation renders it with the checkpoint's own chat template. Hashable, so a
trainer can key prompts by it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from modalign.v1 import common_pb2, events_pb2

ROLES = {common_pb2.ROLE_SYSTEM: "system", common_pb2.ROLE_USER: "user", common_pb2.ROLE_ASSISTANT: "assistant"}
"""The roles a turn may have, by their value in the protos."""
ROLE_VALUES = {name: value for value, name in ROLES.items()}
"""The protos' value of each role's name."""


@dataclass(frozen=True)
class Part:
    kind: Literal["text", "image", "audio"]
    value: str
    """The text, or the image's or audio clip's key: its sha256 once stored (any placeholder before, e.g. "")."""


@dataclass(frozen=True)
class Turn:
    role: Literal["system", "user", "assistant"]
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        return "".join(part.value for part in self.parts if part.kind == "text")


Conversation = tuple[Turn, ...]


def single_question(text: str, image_keys: Sequence[str], audio_keys: Sequence[str] = ()) -> Conversation:
    """The shorthand every single-question request stands for: one user turn, its images, then its audio clips
    (a spoken question), then its text; a spoken question without text has no text part (as
    generations.shorthand_conversation builds it)."""
    text_part = (Part("text", text),) if text or not audio_keys else ()
    return (Turn("user", (*(Part("image", key) for key in image_keys), *(Part("audio", key) for key in audio_keys),
                          *text_part)),)


def as_conversation(prompt: str | Conversation, num_images: int) -> Conversation:
    """A prompt given as plain text stands for the single-question shorthand with num_images images."""
    return single_question(prompt, [""] * num_images) if isinstance(prompt, str) else prompt


def image_keys(conversation: Conversation) -> list[str]:
    """The keys of the conversation's images, in the order the model sees them."""
    return [part.value for turn in conversation for part in turn.parts if part.kind == "image"]


def audio_keys(conversation: Conversation) -> list[str]:
    """The keys of the conversation's audio clips, in the order the model hears them."""
    return [part.value for turn in conversation for part in turn.parts if part.kind == "audio"]


def last_user_text(conversation: Conversation) -> str:
    """The text of the last user turn: what the response answers."""
    return next((turn.text for turn in reversed(conversation) if turn.role == "user"), "")


def chat_messages(conversation: Conversation) -> list[dict]:
    """The conversation in the messages format of transformers' chat templates."""
    return [
        {"role": turn.role, "content": [{"type": "text", "text": part.value} if part.kind == "text" else {"type": part.kind}
                                        for part in turn.parts]}
        for turn in conversation
    ]


def from_chat_messages(messages: Any) -> Conversation:
    """The inverse of chat_messages (image and audio parts get the key ""); ValueError naming what is malformed."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a non-empty list of messages is required")
    turns = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES.values() or not isinstance(content, list):
            raise ValueError(f"message {index} needs a role ({', '.join(ROLES.values())}) and a list of content parts")
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("image", "audio"):
                parts.append(Part(part["type"], ""))
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(Part("text", part["text"]))
            else:
                raise ValueError(
                    f"message {index}: a part is {{'type': 'text', 'text': ...}}, {{'type': 'image'}} or {{'type': 'audio'}}"
                )
        turns.append(Turn(role, tuple(parts)))
    return tuple(turns)


def logged(generation: events_pb2.GenerationLogged) -> Conversation:
    """The conversation a logged generation answered, images keyed by sha256 (records written before
    conversations were logged hold the single question of prompt_text and images)."""
    if not generation.conversation:
        return single_question(generation.prompt_text, [image.sha256 for image in generation.images])
    return of_messages(generation.conversation)


def of_messages(messages: Sequence[common_pb2.LoggedMessage]) -> Conversation:
    """A conversation from its logged form, images and audio clips keyed by sha256."""
    return tuple(
        Turn(ROLES[message.role], tuple(
            Part("text", part.text) if part.WhichOneof("part") == "text" else Part(kind, getattr(part, kind).sha256)
            for part in message.content for kind in [part.WhichOneof("part")]
        ))
        for message in messages
    )


def to_json(conversation: Conversation) -> list[Any]:
    """[[role, [[kind, value], ...]], ...]: for checkpoints and keys."""
    return [[turn.role, [[part.kind, part.value] for part in turn.parts]] for turn in conversation]


def from_json(data: list[Any]) -> Conversation:
    return tuple(Turn(role, tuple(Part(kind, value) for kind, value in parts)) for role, parts in data)


def key(conversation: Conversation) -> str:
    """A stable identifier of a conversation: the sha256 of its JSON form."""
    return hashlib.sha256(json.dumps(to_json(conversation), ensure_ascii=False).encode()).hexdigest()
