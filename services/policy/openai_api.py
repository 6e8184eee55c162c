"""The OpenAI-compatible HTTP API of the policy service: the chat-completions format every client speaks.

    POST /v1/chat/completions   messages (content a string or text, image_url and input_audio parts,
                                images as data: URLs, audio as base64 WAV or MP3), n, temperature,
                                top_p, max_tokens / max_completion_tokens, seed,
                                stop, user, stream (server-sent events, ending with [DONE];
                                stream_options.include_usage); usage with token counts
    GET  /v1/models             the served model, with its stable and canary versions
    POST /v1/feedback           a Feedback (preference, tie, rating or edit) as JSON, forwarded to the
                                FeedbackService (--feedback-address): its validation, idempotency by
                                feedback_id and durable acknowledgement, its status codes as HTTP
    GET  /healthz, /readyz      liveness, and readiness (a version is loaded and serving)

A request becomes a GenerateRequest with a conversation and goes through the same Generations as gRPC:
the same validation and limits, routing, batching, and durable logging before the answer is sent. So
every answer is learnable: each choice carries its `response_id` (and the response its `modalign`
object: `policy_version`, `prompt_id`), `system_fingerprint` and the `X-Modalign-Policy-Version` header
name the version, and feedback names the response_id. Existing clients ignore the extra fields.

Every /v1 call carries `Authorization: Bearer TOKEN` (modalign.core.auth): chat completions and
feedback need the client role, /v1/models the client or reader role; 401 without a valid token, 403 for
a role that may not. A caller that is not a trusted front end acts only as itself: its `user` must be
empty or its own principal. Feedback is forwarded with the caller's token, and the feedback service
checks it again.

Canary stickiness: the X-Session-Id header, else `user`, picks the session (as GenerateRequest.session_id).
Errors use OpenAI's error JSON ({"error": {"message", "type", "param", "code"}}) with the HTTP status of
their kind: 400 for a bad request (the message names the field), 429 at capacity, 503 when the
generation could not be logged, 500 when the model failed; a user past the per-user rate limit gets 429
with Retry-After. Remote image URLs are fetched only under the
prefixes an operator allows (--http-image-url-prefixes, none by default; no redirects followed): a client
sends the image itself, so the policy never reaches out to an address a user chose.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf import json_format
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from modalign.core import auth
from modalign.core.audio import InvalidAudio, decode_input_audio
from modalign.core.images import ImageLimits, InvalidImage, decode_data_url
from modalign.policy.conversation import ROLE_VALUES
from modalign.policy.generations import OPAQUE_ID, Generated, Generations, Refused, Started, observed
from modalign.v1 import common_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2

VERSION_HEADER = "X-Modalign-Policy-Version"
SESSION_HEADER = "X-Session-Id"
# OpenAI's newer name for the system role is "developer".
ROLES = ROLE_VALUES | {"developer": common_pb2.ROLE_SYSTEM}
FINISH_REASONS = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    # As gRPC-gateway maps it: the request cannot apply to the current state (feedback on a response its
    # user was not served).
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
    # What nginx logs for a client that closed its connection before the answer: nobody reads it.
    grpc.StatusCode.CANCELLED: (499, "client_closed_request"),
}


def invalid(message: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, message)


# The service validates a request as a GenerateRequest; its messages name that request's fields, which
# read here as the chat-completions fields they came from.
_FIELD_NAMES = [
    (re.compile(r"^sampling\.temperature"), "temperature"),
    (re.compile(r"^sampling\.top_p"), "top_p"),
    (re.compile(r"^sampling\.max_new_tokens"), "max_tokens"),
    (re.compile(r"^sampling\.stop"), "stop"),
    (re.compile(r"^conversation\[(\d+)\]\.content\[(\d+)\]\.image"), r"messages[\1].content[\2].image_url.url"),
    (re.compile(r"^conversation\[(\d+)\]\.content\[(\d+)\]\.audio"), r"messages[\1].content[\2].input_audio"),
    (re.compile(r"^conversation"), "messages"),
    (re.compile(r"^user_id"), "user"),
    (re.compile(r"^session_id"), SESSION_HEADER),
]


def error_response(error: Refused) -> JSONResponse:
    """OpenAI's error JSON, with the HTTP status of the refusal's kind; a 400 names its field as clients know it."""
    status, kind = HTTP_STATUS.get(error.code, (500, "server_error"))
    message, param = error.message, None
    if status == 400:
        for pattern, name in _FIELD_NAMES:
            message = pattern.sub(name, message, count=1)
        param = message.split(":", 1)[0] if ":" in message else None
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if error.retry_after_s:
        headers = {"Retry-After": str(math.ceil(error.retry_after_s))}
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": error.code.name.lower()}},
                        status_code=status, headers=headers)


def _optional(body: dict, name: str, kind: type[int] | type[float]) -> Any:
    """body[name] as kind, None when absent or null; a value of another type is refused naming the field."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise invalid(f"{name}: must be {'a number' if kind is float else 'an integer'}, got {json.dumps(value)}")
    return kind(value)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect could lead outside the allowed prefixes: refuse it (urllib then raises HTTPError)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass(frozen=True)
class RemoteImages:
    """Which remote image URLs the API fetches: only those under an operator's allowed prefixes (say its
    own image host, https://images.example.com/); none by default, so the policy never reaches out to
    an address a user chose."""

    prefixes: tuple[str, ...] = ()
    max_bytes: int = ImageLimits.max_bytes
    timeout_s: float = 10.0

    def fetch(self, url: str, where: str) -> common_pb2.Image:
        if not any(url.startswith(prefix) for prefix in self.prefixes):
            raise invalid(f"{where}: remote image URLs are not fetched here; send the image inline as a data: URL "
                          "(data:image/png;base64,...)" + (" or from an allowed host" if self.prefixes else ""))
        try:
            with urllib.request.build_opener(_NoRedirects).open(url, timeout=self.timeout_s) as response:
                data = response.read(self.max_bytes + 1)
                mime_type = response.headers.get_content_type()
        except (OSError, ValueError) as error:  # urllib's errors are OSErrors; a malformed URL a ValueError
            raise invalid(f"{where}: could not fetch the image ({error})") from error
        if len(data) > self.max_bytes:
            raise invalid(f"{where}: the image is larger than {self.max_bytes} bytes")
        return common_pb2.Image(data=data, mime_type=mime_type)


def image_part(url: Any, where: str, remote: RemoteImages) -> common_pb2.ContentPart:
    """An image_url part's image: a base64 data: URL, or a URL under an allowed prefix; anything else is
    refused naming why."""
    if not isinstance(url, str):
        raise invalid(f"{where}: must be a string URL")
    if url.startswith(("http://", "https://")):
        return common_pb2.ContentPart(image=remote.fetch(url, where))
    try:
        decoded, mime_type = decode_data_url(url)
    except InvalidImage as error:
        raise invalid(f"{where}: {error}") from error
    return common_pb2.ContentPart(image=common_pb2.Image(data=decoded, mime_type=mime_type))


def audio_part(input_audio: Any, where: str) -> common_pb2.ContentPart:
    """An input_audio part's clip ({"data": base64, "format": "wav" or "mp3"}); the policy decodes and checks
    it as it does a gRPC client's."""
    if not isinstance(input_audio, dict) or not isinstance(input_audio.get("data"), str):
        raise invalid(f"{where}: must be an object with base64 data and a format (wav or mp3)")
    try:
        data, mime_type = decode_input_audio(input_audio["data"], str(input_audio.get("format")))
    except InvalidAudio as error:
        raise invalid(f"{where}: {error}") from error
    return common_pb2.ContentPart(audio=common_pb2.Audio(data=data, mime_type=mime_type))


def conversation_of(messages: Any, remote: RemoteImages) -> list[common_pb2.Message]:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: a non-empty list of messages is required")
    turns = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(f"{where}: must be an object with a role and content")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role: must be one of system, developer, user, assistant; got {json.dumps(role)}")
        content = message.get("content")
        if isinstance(content, str):
            parts = [common_pb2.ContentPart(text=content)]
        elif isinstance(content, list):
            parts = []
            for part_index, part in enumerate(content):
                at = f"{where}.content[{part_index}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(common_pb2.ContentPart(text=part["text"]))
                elif kind == "image_url":
                    image_url = part.get("image_url")
                    parts.append(image_part(image_url.get("url") if isinstance(image_url, dict) else image_url,
                                            f"{at}.image_url.url", remote))
                elif kind == "input_audio":
                    parts.append(audio_part(part.get("input_audio"), f"{at}.input_audio"))
                else:
                    raise invalid(
                        f"{at}: must be a text, image_url or input_audio part, got type {json.dumps(kind)}"
                    )
        else:
            raise invalid(f"{where}.content: must be a string or a list of parts")
        turns.append(common_pb2.Message(role=ROLES[role], content=parts))
    return turns


def generate_request(body: Any, session_header: str | None, remote: RemoteImages = RemoteImages()
                     ) -> policy_pb2.GenerateRequest:
    """A chat-completions body as the GenerateRequest it stands for; Refused naming the field otherwise."""
    if not isinstance(body, dict):
        raise invalid("body: must be a JSON object")
    for unsupported in ("tools", "functions", "response_format", "logit_bias"):
        if body.get(unsupported) not in (None, [], {}):
            raise invalid(f"{unsupported}: not supported by this server")
    # Ranges are the service's (sampling_params): checked there once, for both front doors.
    sampling = common_pb2.SamplingParams()
    if (temperature := _optional(body, "temperature", float)) is not None:
        sampling.temperature = temperature
    if (top_p := _optional(body, "top_p", float)) is not None:
        sampling.top_p = top_p
    max_tokens = _optional(body, "max_completion_tokens", int)
    if (max_tokens := max_tokens if max_tokens is not None else _optional(body, "max_tokens", int)) is not None:
        if not 0 <= max_tokens < 2**32:  # the service's own limit comes next; this only keeps it a uint32
            raise invalid(f"max_tokens: must be a positive 32-bit integer, got {max_tokens}")
        sampling.max_new_tokens = max_tokens
    if (seed := _optional(body, "seed", int)) is not None:
        if not 0 <= seed < 2**64:
            raise invalid(f"seed: must be in [0, 2^64), got {seed}")
        sampling.seed = seed
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(text, str) for text in stops):
        raise invalid(f"stop: must be a string or a list of strings, got {json.dumps(stop)}")
    sampling.stop.extend(stops)
    n = _optional(body, "n", int)
    if n is not None and not 1 <= n < 2**32:
        raise invalid(f"n: must be a positive 32-bit integer, got {n}")
    user = body.get("user") or ""
    if not isinstance(user, str) or not OPAQUE_ID.match(user):
        raise invalid("user: at most 128 characters of [A-Za-z0-9._:@-]")
    session = session_header if session_header is not None else user
    if not OPAQUE_ID.match(session):
        raise invalid(f"{SESSION_HEADER}: at most 128 characters of [A-Za-z0-9._:@-]")
    return policy_pb2.GenerateRequest(conversation=conversation_of(body.get("messages"), remote), sampling=sampling, n=n or 1,
                                      user_id=user, session_id=session)


def completion(generated: Generated, model: str, created: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{generated.prompt_id}", "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": generated.version,
        "choices": [
            {"index": index, "message": {"role": "assistant", "content": candidate.text},
             "finish_reason": FINISH_REASONS[candidate.finish_reason], "logprobs": None,
             "response_id": candidate.response_id}
            for index, candidate in enumerate(generated.candidates)
        ],
        "usage": usage(generated),
        "modalign": {"policy_version": generated.version, "prompt_id": generated.prompt_id},
    }


def usage(generated: Generated) -> dict[str, int]:
    """Prompt tokens once (image placeholders expanded), completion tokens over every choice, EOS included."""
    completion_tokens = sum(candidate.token_count for candidate in generated.candidates)
    return {"prompt_tokens": generated.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": generated.prompt_tokens + completion_tokens}


def feedback_of(body: Any) -> feedback_pb2.Feedback:
    """A Feedback from its JSON form (the proto's field names, as in the gRPC API)."""
    if not isinstance(body, dict):
        raise invalid("body: must be a JSON object")
    try:
        return json_format.ParseDict(body, feedback_pb2.Feedback())
    except json_format.ParseError as error:
        raise invalid(f"body: {error}") from error


def create_app(generations: Generations, model_name: str, authenticator: auth.Authenticator,
               feedback: feedback_pb2_grpc.FeedbackServiceStub | None = None,
               remote: RemoteImages = RemoteImages()) -> FastAPI:
    app = FastAPI(title="modalign policy: OpenAI-compatible chat completions", docs_url=None, redoc_url=None)

    def caller(request: Request, roles: set[str]) -> auth.Principal:
        """The request's principal, if it holds one of roles; Refused (401 or 403) otherwise."""
        try:
            return auth.check(authenticator, roles, f"{request.method} {request.url.path}",
                              request.headers.get("authorization"))
        except auth.Refused as refusal:
            code = grpc.StatusCode.UNAUTHENTICATED if refusal.unauthenticated else grpc.StatusCode.PERMISSION_DENIED
            raise Refused(code, str(refusal)) from None

    def as_end_user(principal: auth.Principal, user_id: str) -> str:
        try:
            return auth.end_user(principal, user_id)
        except auth.Refused as refusal:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, str(refusal)) from None

    @app.exception_handler(Refused)
    def refused(_request: Request, error: Refused) -> JSONResponse:
        return error_response(error)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        routes = generations.router.routes
        return JSONResponse({"status": "ready", "serving": routes.weights()})

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        caller(request, {auth.CLIENT, auth.READER})
        routes = generations.router.routes
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "modalign",
            "modalign": {"stable": routes.stable, "canary": routes.canary or None, "weights": routes.weights()},
        }]}

    @app.post("/v1/feedback")
    async def submit_feedback(request: Request) -> dict[str, Any]:
        principal = caller(request, {auth.CLIENT})
        if feedback is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, "feedback: this server forwards no feedback (no --feedback-address)")
        said = feedback_of(await json_body(request))
        said.user_id = as_end_user(principal, said.user_id)
        credential = request.headers.get("authorization")
        try:
            ack = await run_in_threadpool(feedback.Submit, said, timeout=30,
                                          metadata=[("authorization", credential)] if credential else None)
        except grpc.RpcError as error:
            raise Refused(error.code(), error.details()) from error
        return {"feedback_id": ack.feedback_id, "duplicate": ack.duplicate}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        principal = caller(request, {auth.CLIENT})
        body = await json_body(request)
        # Fetching allowed remote images and generating block: on the thread pool, off the event loop.
        generate = await run_in_threadpool(generate_request, body, request.headers.get(SESSION_HEADER), remote)
        generate.user_id = as_end_user(principal, generate.user_id)
        created = int(time.time())
        streamed = body.get("stream") is True
        started = await run_in_threadpool(generations.start, generate, streamed)
        caller_gone = threading.Event()
        watch = asyncio.create_task(drop_when_gone(request, started, caller_gone))
        if not streamed:
            try:
                with observed(started.version):
                    generated = await run_in_threadpool(generations.finish, started, lambda: not caller_gone.is_set())
            finally:
                watch.cancel()
            return JSONResponse(completion(generated, model_name, created), headers={VERSION_HEADER: generated.version})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = stream_chunks(generations, started, model_name, created, include_usage, caller_gone)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={VERSION_HEADER: started.version},
                                 background=BackgroundTask(watch.cancel))

    return app


async def drop_when_gone(request: Request, started: Started, caller_gone: threading.Event) -> None:
    """Waits for the client to disconnect, then drops its request as gRPC does for a cancelled call
    (Started.cancel_when_gone): taken out of its queue if its batch has not started, and, through
    caller_gone, not logged if it has (nobody can give feedback on an answer never received). Cancelled
    once the answer has been sent."""
    while (await request.receive())["type"] != "http.disconnect":
        pass  # the body was read before generating: nothing else can arrive but the disconnect
    caller_gone.set()
    started.pending.cancel()


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise invalid(f"body: not valid JSON ({error})") from error


def stream_chunks(generations: Generations, started: Started, model: str, created: int, include_usage: bool,
                  caller_gone: threading.Event) -> Iterator[str]:
    """Server-sent events in OpenAI's chunk format: each choice's role, then its text deltas; once the
    generation is durably logged, each choice's finish_reason and response_id; usage if asked; [DONE].
    A failure after the first byte can no longer change the HTTP status: it goes out as an error event.
    A stream whose client went away (caller_gone) is not logged."""

    def event(choices: list[dict], **extra: Any) -> str:
        chunk = {"id": f"chatcmpl-{started.prompt_id}", "object": "chat.completion.chunk", "created": created,
                 "model": model, "system_fingerprint": started.version, "choices": choices, **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    try:
        with observed(started.version):
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(started.n)])
            for index, text, _ in generations.stream(started):
                yield event([{"index": index, "delta": {"content": text}, "finish_reason": None}])
            generated = generations.finish(started, lambda: not caller_gone.is_set())
    except Refused as error:
        yield f"data: {error_response(error).body.decode()}\n\n"
        return
    for index, candidate in enumerate(generated.candidates):
        yield event([{"index": index, "delta": {}, "finish_reason": FINISH_REASONS[candidate.finish_reason],
                      "response_id": candidate.response_id}],
                    modalign={"policy_version": generated.version, "prompt_id": generated.prompt_id})
    if include_usage:
        yield event([], usage=usage(generated))
    yield "data: [DONE]\n\n"
