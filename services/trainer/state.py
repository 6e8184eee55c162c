"""The trainer's state besides the learner's models, and its JSON form for the checkpoint.

Protobuf messages are stored as base64 of their wire bytes, everything else as plain JSON values: the
checkpoint names no Python class, so renaming one never breaks resuming (see checkpoint.py).
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from modalign.core.version_names import STARTING_VERSION
from modalign.policy import conversation
from modalign.trainer.batches import Prompt
from modalign.trainer.join import FeedbackJoiner, JoinLimits, PreferencePair, Response, Waiting
from modalign.v1 import events_pb2


class RecentIds:
    """The most recent `limit` ids added, as an insertion-ordered set: membership, iteration, length."""

    def __init__(self, limit: int, ids: list[str] = ()) -> None:
        self.limit = limit
        self._ids: dict[str, None] = {}
        for feedback_id in ids:
            self.add(feedback_id)

    def add(self, feedback_id: str) -> None:
        self._ids.pop(feedback_id, None)  # seen again: the most recent now
        self._ids[feedback_id] = None
        while len(self._ids) > self.limit:
            del self._ids[next(iter(self._ids))]

    def discard(self, feedback_id: str) -> None:
        self._ids.pop(feedback_id, None)

    def __contains__(self, feedback_id: object) -> bool:
        return feedback_id in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


@dataclass
class PendingVersion:
    """A version that passed the gate and is in the checkpoint, but whose publishing may not have happened."""

    version: str
    parent: str
    eval_metrics: dict[str, float]
    trained_through: list[dict[str, Any]]
    """{"topic", "partition", "offset"} of every partition the version has learned from, up to offset."""
    passed_over: list[dict[str, Any]] = field(default_factory=list)
    """{"topic", "partition", "start", "end"}: feedback read past, not trained on, since the version before."""


DEFAULT_RECENT_IDS = 100_000


@dataclass
class TrainerState:
    """Everything a checkpoint holds besides the learner's models.

    Exactly-once rests on positions, not on ids: every record is consumed once because the positions
    and everything derived from the records before them are checkpointed together, and a restart
    consumes from those positions. The id sets only catch one feedback sent in two records (a producer
    retry after a lost acknowledgement, a client re-submitting): such a duplicate lands on the same
    partition (records are keyed by feedback id) soon after the first, so remembering the most recent
    ids is enough, and the sets stay bounded instead of growing with every round. The window must
    hold far more ids than arrive between a send and its retry (minutes of feedback).
    """

    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    """Next offset to consume, by (topic, partition), for generations and feedback: the source of truth."""
    consumed_ids: RecentIds = field(default_factory=lambda: RecentIds(DEFAULT_RECENT_IDS))
    """The most recent feedback ids consumed, to skip a feedback delivered again in a later record."""
    trained_ids: list[str] = field(default_factory=list)
    """The most recent feedback ids learned from, in order (an audit trail, bounded like consumed_ids)."""
    joiner: FeedbackJoiner = field(default_factory=FeedbackJoiner)
    pending_pairs: list[PreferencePair] = field(default_factory=list)
    heldout_pairs: list[PreferencePair] = field(default_factory=list)
    replay_pairs: list[PreferencePair] = field(default_factory=list)
    """The most recent pairs learned from, for the reward model's replay."""
    prompts: OrderedDict[str, Prompt] = field(default_factory=OrderedDict)
    rounds: int = 0
    learning_rounds: int = 0
    parent_version: str = STARTING_VERSION
    """The version the policy is trained on from (the parent of the next): the last one published, or
    the stable version after the controller rolled that one back."""
    rollout_offset: int = 0
    """Next offset of the rollout topic to read for rollbacks."""
    pending_publish: PendingVersion | None = None
    passed_over: list[dict[str, Any]] = field(default_factory=list)
    """Feedback ranges read past without training on them since the last version ({"topic", "partition",
    "start", "end"}); the next version's PendingVersion takes them."""

    def record_trained(self, feedback_ids: list[str]) -> None:
        self.trained_ids.extend(dict.fromkeys(feedback_ids))
        del self.trained_ids[: -self.consumed_ids.limit]

    def to_json(self) -> dict[str, Any]:
        return {
            "positions": [[topic, partition, offset] for (topic, partition), offset in self.positions.items()],
            "consumed_ids": list(self.consumed_ids),
            "trained_ids": self.trained_ids,
            "joiner": _joiner_to_json(self.joiner),
            "pending_pairs": [_pair_to_json(pair) for pair in self.pending_pairs],
            "heldout_pairs": [_pair_to_json(pair) for pair in self.heldout_pairs],
            "replay_pairs": [_pair_to_json(pair) for pair in self.replay_pairs],
            "prompts": [[key, conversation.to_json(prompt.conversation)] for key, prompt in self.prompts.items()],
            "rounds": self.rounds,
            "learning_rounds": self.learning_rounds,
            "parent_version": self.parent_version,
            "rollout_offset": self.rollout_offset,
            "pending_publish": asdict(self.pending_publish) if self.pending_publish is not None else None,
            "passed_over": self.passed_over,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], join_limits: JoinLimits | None = None,
                  recent_ids: int = DEFAULT_RECENT_IDS) -> TrainerState:
        """The state to_json wrote; the limits are this run's configuration, not the writer's."""
        pending = data["pending_publish"]
        return cls(
            positions={(topic, partition): offset for topic, partition, offset in data["positions"]},
            consumed_ids=RecentIds(recent_ids, data["consumed_ids"]),
            trained_ids=data["trained_ids"][-recent_ids:],
            joiner=_joiner_from_json(data["joiner"], join_limits or JoinLimits()),
            pending_pairs=[_pair_from_json(pair) for pair in data["pending_pairs"]],
            heldout_pairs=[_pair_from_json(pair) for pair in data["heldout_pairs"]],
            replay_pairs=[_pair_from_json(pair) for pair in data.get("replay_pairs", [])],
            prompts=OrderedDict((entry[0], _prompt(entry)) for entry in data["prompts"]),
            rounds=data["rounds"],
            learning_rounds=data["learning_rounds"],
            parent_version=data["parent_version"],
            rollout_offset=data["rollout_offset"],
            pending_publish=PendingVersion(**pending) if pending is not None else None,
            passed_over=data.get("passed_over", []),
        )


def _message(message: Any) -> str:
    return base64.b64encode(message.SerializeToString()).decode("ascii")


def _parse(cls: Any, text: str) -> Any:
    return cls.FromString(base64.b64decode(text))


def _response_to_json(response: Response) -> dict[str, Any]:
    return {"text": response.text, "policy_version": response.policy_version,
            "token_ids": list(response.token_ids) if response.token_ids is not None else None,
            "logprobs": list(response.logprobs) if response.logprobs is not None else None}


def _response_from_json(data: dict[str, Any]) -> Response:
    return Response(
        text=data["text"], policy_version=data["policy_version"],
        token_ids=tuple(data["token_ids"]) if data["token_ids"] is not None else None,
        logprobs=tuple(data["logprobs"]) if data["logprobs"] is not None else None,
    )


def _pair_to_json(pair: PreferencePair) -> dict[str, Any]:
    return {
        "feedback_id": pair.feedback_id, "source": pair.source, "prompt": _message(pair.prompt),
        "chosen": _response_to_json(pair.chosen), "rejected": _response_to_json(pair.rejected), "margin": pair.margin,
        "received": _message(pair.received) if pair.received is not None else None, "position": list(pair.position),
    }


def _pair_from_json(data: dict[str, Any]) -> PreferencePair:
    return PreferencePair(
        feedback_id=data["feedback_id"], source=data["source"],
        prompt=_parse(events_pb2.GenerationLogged, data["prompt"]),
        chosen=_response_from_json(data["chosen"]), rejected=_response_from_json(data["rejected"]),
        margin=data["margin"], position=tuple(data["position"]),
        received=_parse(events_pb2.FeedbackReceived, data["received"]) if data["received"] is not None else None,
    )


def _joiner_to_json(joiner: FeedbackJoiner) -> dict[str, Any]:
    return {
        "generations": [_message(generation) for generation in joiner.generations.values()],
        "waiting": [{"feedback": _message(w.feedback), "position": list(w.position), "since": w.since}
                    for w in joiner.waiting],
        "ratings": {key: [[response_id, score] for response_id, score in ratings]
                    for key, ratings in joiner.ratings.items()},
    }


def _joiner_from_json(data: dict[str, Any], limits: JoinLimits) -> FeedbackJoiner:
    generations = [_parse(events_pb2.GenerationLogged, text) for text in data["generations"]]
    return FeedbackJoiner(
        limits=limits,
        generations=OrderedDict((generation.response_id, generation) for generation in generations),
        waiting=[Waiting(_parse(events_pb2.FeedbackReceived, w["feedback"]), tuple(w["position"]), w["since"])
                 for w in data["waiting"]],
        ratings={key: [(response_id, score) for response_id, score in ratings]
                 for key, ratings in data["ratings"].items()},
    )


def _prompt(entry: list[Any]) -> Prompt:
    """A checkpointed prompt: [key, conversation], or [key, text, image shas] as written before conversations."""
    if len(entry) == 3:
        return Prompt.question(entry[1], tuple(entry[2]))
    return Prompt(conversation.from_json(entry[1]))
