"""Simulated users: they ask about scenes through PolicyService and say what they think through
FeedbackService, the public gRPC APIs a real client uses, and nothing else.

Their hidden preference is the demo's ground truth. Faithfulness to the image comes first: a correct
answer beats one that answers nothing false but misses the question, which beats a hallucination.
Only between equally faithful answers does style decide: fewer words win. Users are noisy (each
judgement flips with probability `noise`), so they sometimes disagree with each other and with
themselves, as real raters do.

Every call they make can be observed (`on_call`): what was called, how it ended and how long it took,
which is what the soak (modalign.soak) measures.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
from google.protobuf import json_format

from modalign.core.audio import MIME_BY_INPUT_AUDIO_FORMAT
from modalign.core.grpc_server import dial
from modalign.core.ratelimit import politely
from modalign.demo.scenes import Example, examples, faithfulness, make_question, reference_answer
from modalign.demo.speech import synthesise
from modalign.policy.conversation import ROLES
from modalign.policy.generations import shorthand_conversation
from modalign.v1 import common_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2, policy_pb2_grpc


def faithfulness_rank(answer: str, example: Example) -> int:
    """2: correct; 1: nothing false, but the question is not answered; 0: hallucinated."""
    verdict = faithfulness(answer, example.scene, example.question)
    return 0 if verdict.hallucinated else 2 if verdict.correct else 1


def is_verbose(answer: str, example: Example) -> bool:
    """Wordier than the concise reference answer by half again (the "Sure! In this picture..." style)."""
    concise = reference_answer(example.scene, example.question, "concise")
    return len(answer.split()) > 1.5 * len(concise.split()) + 1


def preference(first: str, second: str, example: Example) -> float:
    """The hidden preference without noise: 1 if first is better, 0 if second is, 0.5 for a tie."""
    def key(answer: str) -> tuple[int, int]:
        return faithfulness_rank(answer, example), -len(answer.split())

    a, b = key(first), key(second)
    return 1.0 if a > b else 0.0 if a < b else 0.5


def rating(answer: str, example: Example) -> int:
    """1-5 by the hidden preference: 5 correct and concise ... 1 hallucinated and verbose."""
    return {2: 4, 1: 3, 0: 1}[faithfulness_rank(answer, example)] + (0 if is_verbose(answer, example) else 1)


@dataclass(frozen=True)
class UsersConfig:
    """The simulated user population."""

    users: int = 4
    """Users sending requests at once (one thread each)."""
    feedback_rate: float = 1.0
    """Share of answers a user gives feedback on."""
    preference_share: float = 0.6
    """Of the feedback: comparisons of the two candidates; the rest split between ratings and edits."""
    edit_share: float = 0.15
    """Of the feedback: corrections of a wrong answer, hallucinated or incomplete (the user writes the concise
    reference)."""
    noise: float = 0.1
    """Chance that a user's comparison is flipped or a rating off by one."""
    session_turns: int = 5
    """Requests per session before a user starts a new one (canary routing is sticky per session)."""
    follow_up_share: float = 0.25
    """Share of answers a user follows with a second question about the same scene: a two-turn
    conversation (the first answer in context), answered and judged like any other request."""
    http_every: int = 4
    """Every n-th session of a user speaks the policy's OpenAI-compatible HTTP API (chat completions,
    then /v1/feedback) instead of gRPC: user u's sessions u, u + n, ..., so HTTP traffic starts at once.
    0, or no HTTP URL given to the users: none."""
    shorthand_share: float = 0.0
    """Share of first questions over gRPC sent in the single-question shorthand (the request's text and
    images) instead of as a conversation of one user turn."""
    spoken_share: float = 0.0
    """Share of first questions asked aloud: the scene and a WAV of the question (speech.synthesise), no
    text. Needs a policy that hears (modalign.demo.spoken_warmstart)."""
    stream_share: float = 0.0
    """Share of gRPC requests sent to GenerateStream (the answer streamed token by token) instead of Generate."""
    think_s: float = 0.0
    """How long a user reads an answer before the next question: 0 asks again at once, the most load the
    users can make."""
    pause_after_failure_s: float = 1.0
    """How long a user waits after a request failed before the next, as a client backs off: while a service
    restarts, calls fail at once, and users who asked again at once would spin."""
    max_new_tokens: int = 32
    seed: int = 0
    """Users draw scenes from seeds 1000 + seed*100 + user: never the held-out evaluation scenes."""


@dataclass
class Tally:
    requests: int = 0
    failed: int = 0
    feedback: Counter = field(default_factory=Counter)
    served: Counter = field(default_factory=Counter)
    conversations: int = 0
    """Requests that were follow-ups: a conversation of two user turns."""
    http: int = 0
    """Requests over the OpenAI-compatible HTTP API (the rest over gRPC)."""
    spoken: int = 0
    """Requests whose question was asked aloud."""


@dataclass(frozen=True)
class Call:
    """One call a user made, as an observer (SimulatedUsers' on_call) sees it."""

    kind: str
    """What was called: Generate (the single-question shorthand), Generate conversation, GenerateStream,
    Submit, HTTP chat completions or HTTP feedback."""
    outcome: str
    """OK, the gRPC status code's name, "HTTP <status>", or the name of the connection error that came
    instead of an answer (ConnectionRefusedError, RemoteDisconnected, ...)."""
    started: float
    """Unix time the call began."""
    seconds: float
    feedback_id: str = ""
    """The feedback a Submit or HTTP feedback call carried."""


INPUT_AUDIO_FORMATS = {mime: audio_format for audio_format, mime in MIME_BY_INPUT_AUDIO_FORMAT.items()}
"""The OpenAI API's input_audio format of a clip, by its MIME type."""

CALL_ERRORS = (grpc.RpcError, OSError, http.client.HTTPException, json.JSONDecodeError)
"""What a call can fail with: a gRPC status, an HTTP error status or a lost connection (urllib's errors are
OSErrors), a response cut short (its server went away mid-answer)."""


def outcome_of(error: BaseException) -> str:
    """A failed call's Call.outcome."""
    if isinstance(error, grpc.RpcError):
        return error.code().name
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    reason = getattr(error, "reason", None)  # urllib wraps what the connection met in a URLError
    return type(reason if isinstance(reason, BaseException) else error).__name__


@dataclass(frozen=True)
class Answer:
    response_id: str
    text: str


@dataclass(frozen=True)
class Reply:
    policy_version: str
    candidates: tuple[Answer, ...]


class GrpcClient:
    """PolicyService and FeedbackService over gRPC."""

    SUBMIT = "Submit"

    def __init__(self, policy: policy_pb2_grpc.PolicyServiceStub, feedback: feedback_pb2_grpc.FeedbackServiceStub) -> None:
        self.policy, self.feedback = policy, feedback

    def generate(self, request: policy_pb2.GenerateRequest) -> Reply:
        reply = politely(self.policy.Generate, request, timeout=120)
        return Reply(reply.policy_version, tuple(Answer(c.response_id, c.text) for c in reply.candidates))

    def generate_stream(self, request: policy_pb2.GenerateRequest) -> Reply:
        """The same answer from GenerateStream: each candidate's text deltas joined, its response_id from its
        last chunk."""
        chunks = politely(lambda r, **options: list(self.policy.GenerateStream(r, **options)), request, timeout=120)
        texts: dict[int, str] = defaultdict(str)
        response_ids: dict[int, str] = {}
        for chunk in chunks:
            texts[chunk.candidate_index] += chunk.text_delta
            if chunk.response_id:
                response_ids[chunk.candidate_index] = chunk.response_id
        version = chunks[0].policy_version if chunks else ""
        return Reply(version, tuple(Answer(response_ids.get(i, ""), texts[i]) for i in sorted(texts)))

    def submit(self, feedback: feedback_pb2.Feedback) -> None:
        politely(self.feedback.Submit, feedback, timeout=60)


class HttpClient:
    """The same calls over the policy's OpenAI-compatible API, as a web front end makes them."""

    SUBMIT = "HTTP feedback"

    def __init__(self, base_url: str, token: str = "") -> None:
        self.base_url = base_url
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}

    def generate(self, request: policy_pb2.GenerateRequest) -> Reply:
        reply = self._post("/chat/completions", {
            "model": "modalign", "messages": [openai_message(turn) for turn in request.conversation],
            "n": request.n, "temperature": request.sampling.temperature, "seed": request.sampling.seed,
            "max_tokens": request.sampling.max_new_tokens, "user": request.user_id,
        }, {"X-Session-Id": request.session_id})
        return Reply(reply["system_fingerprint"], tuple(Answer(c["response_id"], c["message"]["content"])
                                                         for c in reply["choices"]))

    def submit(self, feedback: feedback_pb2.Feedback) -> None:
        self._post("/feedback", json_format.MessageToDict(feedback, preserving_proto_field_name=True), {})

    def _post(self, path: str, body: dict, headers: dict[str, str]) -> dict:
        """The reply's JSON; a 429 that says when to retry (Retry-After) is waited out, as by the gRPC client."""
        request = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", **self._auth, **headers})
        while True:
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    return json.load(response)
            except urllib.error.HTTPError as error:
                if error.code != 429 or not error.headers.get("Retry-After"):
                    raise
                time.sleep(float(error.headers["Retry-After"]))


def openai_message(turn: common_pb2.Message) -> dict:
    content = []
    for part in turn.content:
        kind = part.WhichOneof("part")
        if kind == "image":
            url = f"data:{part.image.mime_type};base64,{base64.b64encode(part.image.data).decode()}"
            content.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "audio":
            content.append({"type": "input_audio", "input_audio": {
                "data": base64.b64encode(part.audio.data).decode(), "format": INPUT_AUDIO_FORMATS[part.audio.mime_type]}})
        else:
            content.append({"type": "text", "text": part.text})
    return {"role": ROLES[turn.role], "content": content}


class SimulatedUsers:
    """Users on threads, each in a loop of Generate (two candidates) then feedback, until stopped; calls
    carry token, the bearer token of a front end acting for its users, when given, and each is reported
    to on_call (from the users' threads) when given."""

    def __init__(self, config: UsersConfig, policy_address: str, feedback_address: str, http_url: str = "",
                 token: str = "", on_call: Callable[[Call], None] | None = None) -> None:
        self.config = config
        self.tally = Tally()
        self._on_call = on_call
        self._addresses = (policy_address, feedback_address)
        self._token = token
        self._http = HttpClient(http_url, token) if http_url else None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(u,), daemon=True) for u in range(config.users)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _run(self, user: int) -> None:
        config = self.config
        rng = random.Random(config.seed * 7919 + user)
        stream = examples(1000 + config.seed * 100 + user)
        user_id = f"demo-user-{user}"
        with dial(self._addresses[0], self._token) as policy_channel, dial(self._addresses[1], self._token) as feedback_channel:
            grpc_client = GrpcClient(policy_pb2_grpc.PolicyServiceStub(policy_channel),
                                     feedback_pb2_grpc.FeedbackServiceStub(feedback_channel))
            session, turns, sessions, client = None, config.session_turns, 0, grpc_client
            while not self._stop.is_set():
                if turns == config.session_turns:
                    session, turns, sessions = uuid.uuid4().hex, 0, sessions + 1
                    over_http = self._http is not None and config.http_every and (sessions - 1 - user) % config.http_every == 0
                    client = self._http if over_http else grpc_client
                turns += 1
                example = next(stream)
                # Drawn only when asked for, so that runs without the shorthand or speech draw the demo's sequence.
                shorthand = client is grpc_client and config.shorthand_share > 0 and rng.random() < config.shorthand_share
                spoken = config.spoken_share > 0 and rng.random() < config.spoken_share
                request = request_for(example, n=2, seed=rng.getrandbits(31), user_id=user_id, session_id=session,
                                      max_new_tokens=config.max_new_tokens, shorthand=shorthand, spoken=spoken)
                reply = self._ask(client, request, example, rng, user_id, follow_up=False, spoken=spoken)
                if reply is None:
                    self._stop.wait(config.pause_after_failure_s)
                elif rng.random() < config.follow_up_share:
                    # The same scene, another question, the first answer in context.
                    follow_up = Example(example.scene, make_question(example.scene, rng))
                    self._ask(client, with_follow_up(request, reply.candidates[0].text, follow_up.question.text),
                              follow_up, rng, user_id, follow_up=True)
                self._stop.wait(config.think_s)

    def _ask(self, client: GrpcClient | HttpClient, request: policy_pb2.GenerateRequest, example: Example,
             rng: random.Random, user_id: str, follow_up: bool, spoken: bool = False) -> Reply | None:
        """One request and the user's feedback on its answers; None when the request failed."""
        kind, generate = "HTTP chat completions", client.generate
        if isinstance(client, GrpcClient):
            streamed = self.config.stream_share > 0 and rng.random() < self.config.stream_share
            kind, generate = ("GenerateStream", client.generate_stream) if streamed else (
                "Generate conversation" if request.conversation else "Generate", client.generate)
        try:
            with self._observed(kind):
                reply = generate(request)
        except CALL_ERRORS:
            with self._lock:
                self.tally.requests += 1
                self.tally.failed += 1
            return None
        with self._lock:
            self.tally.requests += 1
            self.tally.conversations += follow_up
            self.tally.http += isinstance(client, HttpClient)
            self.tally.spoken += spoken
            self.tally.served[reply.policy_version] += 1
        if rng.random() < self.config.feedback_rate:
            for message in self._feedback(reply, example, rng, user_id):
                try:
                    with self._observed(client.SUBMIT, message.feedback_id):
                        client.submit(message)
                except CALL_ERRORS:
                    continue  # the broker was briefly away; a real client would retry
                with self._lock:
                    self.tally.feedback[message.WhichOneof("kind")] += 1
        return reply

    @contextlib.contextmanager
    def _observed(self, kind: str, feedback_id: str = "") -> Iterator[None]:
        """Reports the call made inside to on_call: OK, or how it failed (the error goes on to the caller)."""
        started, clock = time.time(), time.perf_counter()
        try:
            yield
        except CALL_ERRORS as error:
            self._report(Call(kind, outcome_of(error), started, time.perf_counter() - clock, feedback_id))
            raise
        self._report(Call(kind, "OK", started, time.perf_counter() - clock, feedback_id))

    def _report(self, call: Call) -> None:
        if self._on_call is not None:
            self._on_call(call)

    def _feedback(self, reply: Reply, example: Example, rng: random.Random,
                  user_id: str) -> list[feedback_pb2.Feedback]:
        """An edit of a wrong answer (hallucinated, or missing what was asked), a comparison of the two (a
        preference, or a tie when neither is better), or a rating of each."""
        config = self.config
        first, second = reply.candidates[0], reply.candidates[1]

        def message(**kind) -> feedback_pb2.Feedback:
            feedback = feedback_pb2.Feedback(feedback_id=f"demo-{uuid.uuid4().hex}", user_id=user_id, **kind)
            feedback.client_time.FromSeconds(int(time.time()))
            return feedback

        draw = rng.random()
        # The worse of the two, if it is wrong: a hallucination, or an answer that leaves out what was asked.
        worst = min((first, second), key=lambda c: faithfulness_rank(c.text, example))
        if draw < config.edit_share and faithfulness_rank(worst.text, example) < 2:
            fixed = reference_answer(example.scene, example.question)
            return [message(edit=feedback_pb2.Edit(response_id=worst.response_id, edited_text=fixed))]
        verdict = preference(first.text, second.text, example)
        if draw < config.edit_share + config.preference_share:
            if verdict == 0.5:
                return [message(tie=feedback_pb2.Tie(first_response_id=first.response_id,
                                                     second_response_id=second.response_id))]
            if rng.random() < config.noise:
                verdict = 1.0 - verdict
            chosen, rejected = (first, second) if verdict == 1.0 else (second, first)
            return [message(preference=feedback_pb2.Preference(
                chosen_response_id=chosen.response_id, rejected_response_id=rejected.response_id))]
        ratings = []
        for candidate in (first, second):
            score = rating(candidate.text, example)
            if rng.random() < config.noise:
                score = min(5, max(1, score + rng.choice((-1, 1))))
            ratings.append(message(rating=feedback_pb2.Rating(response_id=candidate.response_id, score=score)))
        return ratings


def request_for(example: Example, n: int, seed: int, user_id: str = "", session_id: str = "",
                max_new_tokens: int = 32, temperature: float = 1.0, shorthand: bool = False,
                spoken: bool = False) -> policy_pb2.GenerateRequest:
    """A question about a scene: one user turn, the scene's image, then the question, typed or (spoken) as a WAV
    of it said aloud; in the single-question shorthand (the request's images, audio and text) when shorthand."""
    buffer = io.BytesIO()
    example.scene.image().save(buffer, format="PNG")
    image = common_pb2.Image(data=buffer.getvalue(), mime_type="image/png")
    question = (common_pb2.ContentPart(audio=common_pb2.Audio(data=synthesise(example.question.text).wav, mime_type="audio/wav"))
                if spoken else common_pb2.ContentPart(text=example.question.text))
    request = policy_pb2.GenerateRequest(
        sampling=common_pb2.SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed),
        n=n, user_id=user_id, session_id=session_id,
    )
    if shorthand:
        request.images.append(image)
        if spoken:
            request.audio.CopyFrom(question.audio)
        else:
            request.text = question.text
    else:
        request.conversation.append(common_pb2.Message(role=common_pb2.ROLE_USER, content=[
            common_pb2.ContentPart(image=image), question]))
    return request


def with_follow_up(request: policy_pb2.GenerateRequest, answer: str, question: str) -> policy_pb2.GenerateRequest:
    """The request's conversation (the turn a shorthand request stands for), the answer it got, then the next
    question."""
    follow_up = policy_pb2.GenerateRequest()
    follow_up.CopyFrom(request)
    for asked in ("text", "images", "conversation"):
        follow_up.ClearField(asked)
    follow_up.conversation.extend([
        *shorthand_conversation(request),
        common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=[common_pb2.ContentPart(text=answer)]),
        common_pb2.Message(role=common_pb2.ROLE_USER, content=[common_pb2.ContentPart(text=question)]),
    ])
    return follow_up
