"""Joining feedback to the generations it refers to, turning it into preference pairs.

Pure logic, no Kafka: the trainer feeds it records and checkpoints its state. How each kind of
feedback becomes training signal:
- a preference is a pair (chosen over rejected); both responses must answer the same prompt (text
  and images), or the pair means nothing and goes to the dead-letter topic;
- an edit is a pair of the edited text over the original response;
- a rating becomes pairs with earlier ratings of other responses to the same prompt, higher over
  lower, with the score difference as a margin. Pairs rather than a regression on raw scores:
  users' rating scales differ (one user's 3 is another's 4) while their orderings agree, and pairs
  keep a single Bradley-Terry objective for all three kinds. Equal scores give no pair.
Feedback whose generation has not arrived yet waits, within bounds; past them it is dead-lettered.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from modalign.feedback.validation import referenced_responses
from modalign.policy import conversation
from modalign.v1 import events_pb2


@dataclass(frozen=True)
class Response:
    text: str
    token_ids: tuple[int, ...] | None
    """The response's token ids as logged; None for text no policy here sampled (an edit, a response imported
    from a public dataset), which the trainer tokenises."""
    logprobs: tuple[float, ...] | None
    """Behaviour log-probabilities of token_ids, when the response was sampled by a policy."""
    policy_version: str = ""


@dataclass(frozen=True)
class PreferencePair:
    feedback_id: str
    """The feedback that completed this pair."""
    source: str
    """"preference", "edit" or "rating"."""
    prompt: events_pb2.GenerationLogged
    """The generation the pair answers: its prompt_text, images and prompt_token_ids are the context."""
    chosen: Response
    rejected: Response
    margin: float = 0.0
    """How strongly chosen beats rejected: the rating difference for rating pairs, else 0."""
    received: events_pb2.FeedbackReceived | None = None
    """The feedback record itself, to dead-letter the pair if the models cannot take it."""
    position: tuple[int, int] = (-1, -1)
    """(partition, offset) of that record."""


@dataclass(frozen=True)
class DeadLetter:
    feedback: events_pb2.FeedbackReceived
    position: tuple[int, int]
    """(partition, offset) of the feedback record."""
    reason: str
    raw: bytes | None = None
    """The record's bytes when they could not be parsed into `feedback`."""


@dataclass
class Waiting:
    feedback: events_pb2.FeedbackReceived
    position: tuple[int, int]
    since: float


def prompt_key(generation: events_pb2.GenerationLogged) -> str:
    """Identifies a prompt by what the user asked: the whole conversation, images by sha256, in order."""
    return conversation.key(conversation.logged(generation))


def response_of(generation: events_pb2.GenerationLogged) -> Response:
    """A logged generation's response. One with no token ids was not sampled here (`modalign data import` logs a
    public dataset's responses so; a sampled one has at least one token): its text is tokenised by the trainer."""
    return Response(
        text=generation.response_text,
        token_ids=tuple(generation.response_token_ids) or None,
        logprobs=tuple(generation.response_logprobs) or None,
        policy_version=generation.policy_version,
    )


@dataclass
class JoinLimits:
    max_generations: int = 200_000
    """Generations kept for joining; the oldest are forgotten first."""
    max_waiting: int = 10_000
    """Feedback waiting for its generation; past this the oldest waiting one is dead-lettered."""
    max_wait_s: float = 600.0
    """How long feedback may wait for its generation before it is dead-lettered."""
    max_ratings_per_prompt: int = 64
    """Ratings kept per prompt to pair against one another; the oldest are forgotten first."""
    max_rated_prompts: int = 100_000
    """Prompts whose ratings are kept; the prompt rated longest ago is forgotten first."""


@dataclass
class FeedbackJoiner:
    limits: JoinLimits = field(default_factory=JoinLimits)
    generations: OrderedDict[str, events_pb2.GenerationLogged] = field(default_factory=OrderedDict)
    waiting: list[Waiting] = field(default_factory=list)
    ratings: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    """Per prompt key, the (response_id, score) of ratings seen so far."""

    def add_generation(self, generation: events_pb2.GenerationLogged) -> None:
        self.generations[generation.response_id] = generation
        self.generations.move_to_end(generation.response_id)
        while len(self.generations) > self.limits.max_generations:
            self.generations.popitem(last=False)

    def add_feedback(
        self, feedback: events_pb2.FeedbackReceived, position: tuple[int, int], now: float | None = None
    ) -> tuple[list[PreferencePair], list[DeadLetter]]:
        """Joins one feedback if its generations are known; otherwise it waits."""
        now = time.time() if now is None else now
        if not referenced_responses(feedback.feedback):
            return [], [DeadLetter(feedback, position, "malformed: feedback of no known kind")]
        if all(rid in self.generations for rid in referenced_responses(feedback.feedback)):
            return self._join(feedback, position)
        self.waiting.append(Waiting(feedback, position, now))
        dead = []
        while len(self.waiting) > self.limits.max_waiting:
            oldest = self.waiting.pop(0)
            dead.append(DeadLetter(oldest.feedback, oldest.position, "unjoinable: the waiting buffer overflowed"))
        return [], dead

    def retry_waiting(self, now: float | None = None) -> tuple[list[PreferencePair], list[DeadLetter]]:
        """Joins waiting feedback whose generations arrived; dead-letters what waited too long."""
        now = time.time() if now is None else now
        pairs, dead, still_waiting = [], [], []
        for entry in self.waiting:
            missing = [rid for rid in referenced_responses(entry.feedback.feedback) if rid not in self.generations]
            if not missing:
                joined, rejected = self._join(entry.feedback, entry.position)
                pairs += joined
                dead += rejected
            elif now - entry.since > self.limits.max_wait_s:
                dead.append(DeadLetter(
                    entry.feedback, entry.position,
                    f"unjoinable: response {missing[0]} not logged within {self.limits.max_wait_s:.0f}s",
                ))
            else:
                still_waiting.append(entry)
        self.waiting = still_waiting
        return pairs, dead

    def _join(
        self, received: events_pb2.FeedbackReceived, position: tuple[int, int]
    ) -> tuple[list[PreferencePair], list[DeadLetter]]:
        feedback = received.feedback
        kind = feedback.WhichOneof("kind")
        if kind == "preference":
            chosen = self.generations[feedback.preference.chosen_response_id]
            rejected = self.generations[feedback.preference.rejected_response_id]
            if prompt_key(chosen) != prompt_key(rejected):
                return [], [DeadLetter(received, position, "mismatched: the two responses answer different prompts")]
            return [PreferencePair(feedback.feedback_id, kind, chosen, response_of(chosen), response_of(rejected),
                                   received=received, position=position)], []
        if kind == "tie":  # neither response is better: no pair, as two equal ratings make none
            return [], []
        if kind == "edit":
            original = self.generations[feedback.edit.response_id]
            if feedback.edit.edited_text.strip() == original.response_text.strip():
                return [], [DeadLetter(received, position, "no signal: the edit equals the original response")]
            edited = Response(text=feedback.edit.edited_text, token_ids=None, logprobs=None)
            return [PreferencePair(feedback.feedback_id, kind, original, edited, response_of(original),
                                   received=received, position=position)], []
        rated = self.generations[feedback.rating.response_id]
        key, score = prompt_key(rated), feedback.rating.score
        pairs = []
        for other_id, other_score in self.ratings.get(key, []):
            other = self.generations.get(other_id)
            if other is None or other_id == rated.response_id or other_score == score:
                continue
            high, low = (rated, other) if score > other_score else (other, rated)
            pairs.append(PreferencePair(
                feedback.feedback_id, kind, rated, response_of(high), response_of(low), margin=abs(score - other_score),
                received=received, position=position,
            ))
        history = self.ratings.pop(key, [])  # re-inserted: the most recently rated prompt comes last
        history.append((rated.response_id, score))
        del history[: -self.limits.max_ratings_per_prompt]
        self.ratings[key] = history
        while len(self.ratings) > self.limits.max_rated_prompts:
            del self.ratings[next(iter(self.ratings))]
        return pairs, []
