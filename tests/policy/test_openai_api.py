"""The policy service's OpenAI-compatible HTTP API, driven by the official `openai` package against a real
service process with a real Kafka broker: what a team's existing clients would do."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from PIL import Image

from modalign.core.kafka import KafkaConfig, read_topic
from modalign.core.processes import free_port
from modalign.core.tls import TlsConfig
from modalign.feedback.server import FeedbackConfig, content_digest
from modalign.policy import conversation
from modalign.policy.config import PolicyConfig
from modalign.policy.model import build_processor, format_conversation
from modalign.v1 import events_pb2, feedback_pb2, policy_pb2_grpc

from tests.certificates import CertificateAuthority
from tests.policy.test_policy_service import conversation_request, png
from tests.services import start_grpc_service

pytestmark = pytest.mark.integration


def data_url(colour: str) -> str:
    return "data:image/png;base64," + base64.b64encode(png(colour=colour)).decode()


# The conversation of tests/policy/test_policy_service.py's conversation_request, in OpenAI's format.
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("red")}},
                                 {"type": "text", "text": "What colour is the square?"}]},
    {"role": "assistant", "content": "It is red."},
    {"role": "user", "content": [{"type": "text", "text": "And here?"},
                                 {"type": "image_url", "image_url": {"url": data_url("blue")}}]},
]


class Served:
    def __init__(self, client: openai.OpenAI, base_url: str, grpc_address: str, kafka: KafkaConfig) -> None:
        self.client, self.base_url, self.grpc_address, self.kafka = client, base_url, grpc_address, kafka

    def logged(self, prompt_id: str) -> list[events_pb2.GenerationLogged]:
        generations = read_topic(self.kafka, "generations", events_pb2.GenerationLogged)
        return sorted((g for g in generations if g.prompt_id == prompt_id), key=lambda g: g.candidate_index)


class ImageHost(http.server.BaseHTTPRequestHandler):
    """An operator's image host on loopback: /allowed/red.png, a redirect from /allowed/elsewhere to an image
    outside the allowed prefix, and that image at /other/red.png."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path in ("/allowed/red.png", "/other/red.png"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png(colour="red"))
        elif self.path == "/allowed/elsewhere":
            self.send_response(302)
            self.send_header("Location", "/other/red.png")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHost)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def served(kafka_config: KafkaConfig, tmp_path_factory: pytest.TempPathFactory, image_host: str) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("policy-http")
    feedback, feedback_address, _ = start_grpc_service(FeedbackConfig, kafka_config, work)
    http_listen = f"127.0.0.1:{free_port()}"
    try:
        process, address, _ = start_grpc_service(PolicyConfig, kafka_config, work, blob_dir=work / "blobs",
                                                 http_listen=http_listen, max_batch_wait_ms=20.0,
                                                 feedback_address=feedback_address,
                                                 http_image_url_prefixes=(f"{image_host}/allowed/",))
        base_url = f"http://{http_listen}/v1"
        try:
            yield Served(openai.OpenAI(base_url=base_url, api_key="not-checked", max_retries=0, timeout=60), base_url,
                         address, kafka_config)
        finally:
            process.stop()
    finally:
        feedback.stop()


def post(url: str, body: object) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_feedback_on_a_choice_is_stored_as_grpc_feedback_is_idempotently_and_validated(served: Served) -> None:
    reply = served.client.chat.completions.create(model="modalign", messages=MESSAGES, n=2, max_tokens=6, user="u-7")
    chosen, rejected = (choice.model_extra["response_id"] for choice in reply.choices)
    said = {"feedback_id": "http-1", "user_id": "u-7", "client_time": "2026-12-02T12:00:00Z",
            "preference": {"chosen_response_id": chosen, "rejected_response_id": rejected}}
    assert post(served.base_url + "/feedback", said) == (200, {"feedback_id": "http-1", "duplicate": False})
    assert post(served.base_url + "/feedback", said) == (200, {"feedback_id": "http-1", "duplicate": True})
    [stored] = [r for r in read_topic(served.kafka, "feedback", events_pb2.FeedbackReceived)
                if r.feedback.feedback_id == "http-1"]
    expected = feedback_pb2.Feedback(feedback_id="http-1", user_id="u-7", preference=feedback_pb2.Preference(
        chosen_response_id=chosen, rejected_response_id=rejected))
    expected.client_time.FromJsonString("2026-12-02T12:00:00Z")
    assert stored.feedback == expected and stored.content_sha256 == content_digest(expected)

    status, body = post(served.base_url + "/feedback", {**said, "preference": {"chosen_response_id": rejected,
                                                                               "rejected_response_id": chosen}})
    assert status == 409 and "feedback_id" in body["error"]["message"]
    status, body = post(served.base_url + "/feedback", {"feedback_id": "http-2", "user_id": "u-7",
                                                         "client_time": "2026-12-02T12:00:00Z",
                                                         "rating": {"response_id": chosen, "score": 9}})
    assert status == 400 and body["error"]["message"].startswith("rating.score"), body
    status, body = post(served.base_url + "/feedback", {"feedback_id": "http-3", "stars": 5})
    assert status == 400 and body["error"]["message"].startswith("body:"), body


def test_a_conversation_with_images_in_two_turns_is_answered_as_over_grpc_and_logged(served: Served) -> None:
    reply = served.client.chat.completions.create(model="modalign", messages=MESSAGES, seed=7, max_tokens=12)
    [choice] = reply.choices
    with grpc.insecure_channel(served.grpc_address) as channel:
        expected = policy_pb2_grpc.PolicyServiceStub(channel).Generate(conversation_request(), timeout=60)
    assert choice.message.role == "assistant" and choice.message.content == expected.candidates[0].text
    assert choice.finish_reason in ("stop", "length")
    assert reply.system_fingerprint == "v0" and reply.model == "modalign"
    assert reply.model_extra["modalign"]["policy_version"] == "v0"
    [generation] = served.logged(reply.id.removeprefix("chatcmpl-"))
    assert choice.model_extra["response_id"] == generation.response_id  # the extension field that feedback names
    assert generation.response_text == choice.message.content and generation.user_id == ""
    red, blue = (hashlib.sha256(png(colour=colour)).hexdigest() for colour in ("red", "blue"))
    assert conversation.image_keys(conversation.logged(generation)) == [red, blue]
    assert [turn.role for turn in conversation.logged(generation)] == ["system", "user", "assistant", "user"]


def test_usage_counts_the_tokens_the_model_read_and_wrote(served: Served) -> None:
    reply = served.client.chat.completions.create(model="modalign", messages=MESSAGES, seed=3, max_tokens=8, n=2)
    generations = served.logged(reply.id.removeprefix("chatcmpl-"))
    assert len(reply.choices) == len(generations) == 2
    assert [c.model_extra["response_id"] for c in reply.choices] == [g.response_id for g in generations]
    processor = build_processor()
    formatted = format_conversation(processor, conversation.logged(generations[0]))
    images = [Image.open(io.BytesIO(png(colour=colour))).convert("RGB") for colour in ("red", "blue")]
    prompt_tokens = processor(text=[formatted], images=images, return_tensors="pt")["input_ids"].shape[1]
    assert reply.usage.prompt_tokens == prompt_tokens == len(generations[0].prompt_token_ids)
    assert reply.usage.completion_tokens == sum(len(g.response_token_ids) for g in generations)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_deltas_add_up_to_the_answer_the_same_seed_gets_unstreamed(served: Served) -> None:
    kwargs = {"model": "modalign", "messages": MESSAGES, "seed": 11, "max_tokens": 12, "n": 2, "temperature": 1.0}
    whole = served.client.chat.completions.create(**kwargs)
    chunks = list(served.client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts, finals = ["", ""], {}
    for chunk in chunks[:-1]:
        assert chunk.id == chunks[0].id and chunk.system_fingerprint == "v0"
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finals[choice.index] = (choice.finish_reason, choice.model_extra["response_id"])
    assert texts == [choice.message.content for choice in whole.choices]
    assert [finals[i][0] for i in (0, 1)] == [choice.finish_reason for choice in whole.choices]
    logged = {g.response_id: g for g in served.logged(chunks[0].id.removeprefix("chatcmpl-"))}
    assert {finals[0][1], finals[1][1]} == logged.keys()  # named once logged, as every response_id is
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_version_header_and_session_stickiness_and_models(served: Served) -> None:
    raw = served.client.chat.completions.with_raw_response.create(
        model="modalign", messages=MESSAGES, max_tokens=4, extra_headers={"X-Session-Id": "session-9"})
    assert raw.headers["x-modalign-policy-version"] == "v0"
    [model] = served.client.models.list().data
    assert model.id == "modalign" and model.model_extra["modalign"]["stable"] == "v0"
    for path in ("healthz", "readyz"):
        with urllib.request.urlopen(served.base_url.removesuffix("/v1") + "/" + path, timeout=10) as response:
            assert response.status == 200


def test_a_stop_text_cuts_the_answer_streamed_or_not(served: Served) -> None:
    kwargs = {"model": "modalign", "messages": MESSAGES, "seed": 5, "max_tokens": 24, "temperature": 1.0}
    whole = served.client.chat.completions.create(**kwargs).choices[0].message.content
    assert len(whole) > 6, whole
    stop = whole[3:5]
    expected = whole[: whole.find(stop)]
    cut = served.client.chat.completions.create(**kwargs, stop=[stop, "never in there: \u2603"])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    streamed = served.client.chat.completions.create(**kwargs, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_remote_images_are_fetched_only_under_an_allowed_prefix_and_never_through_a_redirect(
    served: Served, image_host: str
) -> None:
    def ask(url: str):
        return served.client.chat.completions.create(model="modalign", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour is it?"}]}])

    reply = ask(f"{image_host}/allowed/red.png")
    [generation] = served.logged(reply.id.removeprefix("chatcmpl-"))
    assert [image.sha256 for image in generation.images] == [hashlib.sha256(png(colour="red")).hexdigest()]
    for url, problem in ((f"{image_host}/other/red.png", "not fetched"), (f"{image_host}/allowed/elsewhere", "could not fetch"),
                         (f"{image_host}/allowed/missing.png", "could not fetch")):
        with pytest.raises(openai.BadRequestError) as raised:
            ask(url)
        assert raised.value.body["param"] == "messages[0].content[0].image_url.url", raised.value.body
        assert problem in raised.value.body["message"], raised.value.body


def over_long() -> list[dict]:
    return MESSAGES + [{"role": "assistant", "content": "red " * 2000}, {"role": "user", "content": "And?"}] * 4


def image_at(url: str):
    """Replaces the first user turn's image by one at url."""
    return lambda messages: messages[1]["content"].__setitem__(0, {"type": "image_url", "image_url": {"url": url}})


BAD = [
    ("bad-image", image_at("data:image/png;base64,bm90IGFuIGltYWdl"), {}, "messages[1].content[0].image_url.url"),
    ("remote-image", image_at("https://example.com/a.png"), {}, "messages[1].content[0].image_url.url"),
    ("over-long", None, {"messages": over_long()}, "messages"),
    ("unknown-role", lambda m: m[2].__setitem__("role", "tool"), {}, "messages[2].role"),
    ("temperature", None, {"temperature": 3.0}, "temperature"),
    ("top-p", None, {"top_p": 0.0}, "top_p"),
    ("max-tokens", None, {"max_tokens": 0}, "max_tokens"),
    ("n", None, {"n": 0}, "n"),
    ("huge-n", None, {"n": 2**40}, "n"),
    ("huge-max-tokens", None, {"max_tokens": 2**40}, "max_tokens"),
    ("text-as-temperature", None, {"temperature": "hot"}, "temperature"),
    ("too-many-n", None, {"n": 9}, "n"),
    ("too-many-stops", None, {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("long-stop", None, {"stop": "x" * 65}, "stop[0]"),
    ("stop-not-text", None, {"stop": 7}, "stop"),
]


@pytest.mark.parametrize(("mutate", "extra", "field"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_requests_get_openai_errors_naming_the_problem(served: Served, mutate, extra, field: str) -> None:
    messages = json.loads(json.dumps(MESSAGES))
    if mutate is not None:
        mutate(messages)
    with pytest.raises(openai.BadRequestError) as raised:
        served.client.chat.completions.create(**{"model": "modalign", "messages": messages, "max_tokens": 8, **extra})
    assert raised.value.status_code == 400
    error = raised.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == field, error
    assert error["message"].startswith(field + ":"), error["message"]


def test_a_body_that_is_not_json_is_a_400_not_a_500(served: Served) -> None:
    request = urllib.request.Request(served.base_url + "/chat/completions", data=b"{not json", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code == 400
    assert json.loads(raised.value.read())["error"]["message"].startswith("body:")


def test_the_http_api_is_off_unless_asked_for() -> None:
    assert PolicyConfig().http_listen == "" and PolicyConfig().http_url == ""
    assert PolicyConfig(http_listen="0.0.0.0:8000").http_url == "http://127.0.0.1:8000/v1"
    assert PolicyConfig(http_listen="127.0.0.1:8443", tls=TlsConfig(cert=Path("c"), key=Path("k"))).http_url \
        == "https://127.0.0.1:8443/v1"


def test_with_a_certificate_the_api_speaks_https_only(kafka_config: KafkaConfig, tmp_path: Path) -> None:
    authority = CertificateAuthority(tmp_path / "tls")
    server = authority.server()
    port = free_port()
    process, _, _ = start_grpc_service(PolicyConfig, kafka_config, tmp_path, blob_dir=tmp_path / "blobs",
                                       http_listen=f"127.0.0.1:{port}", tls=TlsConfig(cert=server.cert, key=server.key))
    try:
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               http_client=httpx.Client(verify=str(authority.cert), timeout=60))
        reply = client.chat.completions.create(model="modalign", messages=MESSAGES, max_tokens=4)
        assert reply.choices[0].model_extra["response_id"]
        with pytest.raises(openai.APIConnectionError):  # the certificate is not one the default store trusts
            openai.OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key="unused", max_retries=0).models.list()
        with pytest.raises(OSError):  # and plain HTTP gets no answer
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10)
    finally:
        process.stop()
