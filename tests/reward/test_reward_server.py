"""The reward server as a real process, called with tritonclient over REST (here) and gRPC (a child).

kserve is never imported in this process: tritonclient.grpc, which other tests may import, cannot
share a process with it.

One server process serves the whole module (starting one is the slow part): it follows the
policy-versions topic of a real broker, and the hot-loading test comes last in the file because it
changes the version being served; the tests before it score the version of `model_dir`.
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from PIL import Image
from safetensors.torch import load_file, save_file
from tritonclient.utils import InferenceServerException

from modalign.core.auth import AuthConfig, ClientAuth
from modalign.core.blobs import BlobStore
from modalign.core.kafka import KafkaConfig, make_producer, produce_durably
from modalign.core.launch import on_broker
from modalign.core.modelstore import DirectoryStore, Manifest
from modalign.core.processes import free_port
from modalign.core.tls import ClientTls
from modalign.feedback.caps import UserCap
from modalign.policy.conversation import from_chat_messages
from modalign.reward.backbones import build_default_reward_model
from modalign.reward.config import RewardServerConfig
from modalign.reward.model import HEAD_FILE, RewardModel
from modalign.rollout.evidence import EvidenceCollector, RewardScorer
from modalign.v1 import common_pb2, events_pb2, feedback_pb2

from tests.clips import wav
from tests.services import start_service

pytestmark = pytest.mark.integration

MODEL_NAME = "reward"
VERSION = "r7"
PROMPTS = ["What colour is the shape?", "Hello", "How many shapes are there?"]
RESPONSES = ["The shape is red.", "Hello! How can I help you today?", "There are two shapes."]


def _encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


# Rows with 1, 0 and 2 images in a [3, 2] tensor; b"" marks "no image". PNG is lossless, so the
# server decodes exactly the pixels the local model below is given.
RED = Image.new("RGB", (40, 30), "red")
BLUE = Image.new("RGB", (32, 32), "blue")
GREEN = Image.new("RGB", (16, 16), "green")
IMAGES = [[_encoded(RED, "PNG"), b""], [b"", b""], [_encoded(BLUE, "PNG"), _encoded(GREEN, "PNG")]]
DECODED = [[RED], [], [BLUE, GREEN]]
# KServe 0.21 decodes REST BYTES elements as UTF-8, so REST clients send images base64; gRPC sends them raw.
IMAGES_B64 = [[base64.b64encode(image) for image in row] for row in IMAGES]


def _bytes_input(name: str, values: list) -> httpclient.InferInput:
    array = np.array(values, dtype=object)
    infer_input = httpclient.InferInput(name, list(array.shape), "BYTES")
    infer_input.set_data_from_numpy(array)
    return infer_input


def _request(prompts: list[str] = PROMPTS, responses: list[str] = RESPONSES, images: list = IMAGES_B64) -> list:
    return [
        _bytes_input("prompt", [p.encode() for p in prompts]),
        _bytes_input("response", [r.encode() for r in responses]),
        _bytes_input("images", images),
    ]


def _grpc_spec(name: str, values: list) -> dict[str, Any]:
    array = np.array(values, dtype=object)
    encoded = np.vectorize(lambda b: base64.b64encode(b).decode(), otypes=[object])(array)
    return {"name": name, "datatype": "BYTES", "shape": list(array.shape), "data": encoded.tolist()}


def _metric(text: str, name: str, default: float | None = None) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    if match is None and default is not None:
        return default
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> DirectoryStore:
    return DirectoryStore(tmp_path_factory.mktemp("model-store"))


@pytest.fixture(scope="module")
def model_dir(store: DirectoryStore) -> Path:
    """A reward version published to a real model store: the server verifies its manifest and reports its version."""
    store.publish(Manifest(version=VERSION, kind="reward"), build_default_reward_model(seed=3).save)
    return store.folder("reward", VERSION)


@pytest.fixture(scope="module")
def server(
    model_dir: Path, store: DirectoryStore, kafka_config: KafkaConfig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    config = on_broker(RewardServerConfig, kafka_config, auth=AuthConfig(insecure=True), model_dir=model_dir, http_port=free_port(),
                       grpc_port=free_port(), grace_period=1, follow="latest", model_store=str(store.root))
    # Generous: importing torch, transformers and kserve alone takes tens of seconds on a busy 2-core box.
    process = start_service(config, tmp_path_factory.mktemp("logs"), "reward-server", timeout_s=240)
    try:
        yield {"http": f"127.0.0.1:{config.http_port}", "grpc": f"127.0.0.1:{config.grpc_port}"}
    finally:
        process.stop(timeout_s=20)


@pytest.fixture(scope="module")
def http(server: dict[str, str]) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(server["http"])
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_results(server: dict[str, str]) -> list[dict[str, Any]]:
    """Every gRPC call of this module, made by one child process (its imports are the slow part)."""
    calls = [
        {"op": "metadata"},
        {
            "op": "infer",
            "inputs": [
                _grpc_spec("prompt", [p.encode() for p in PROMPTS]),
                _grpc_spec("response", [r.encode() for r in RESPONSES]),
                _grpc_spec("images", IMAGES),
            ],
        },
        {
            "op": "infer",
            "inputs": [
                _grpc_spec("prompt", [p.encode() for p in PROMPTS]),
                _grpc_spec("response", [r.encode() for r in RESPONSES[:2]]),
                _grpc_spec("images", IMAGES),
            ],
        },
    ]
    request = json.dumps({"url": server["grpc"], "model": MODEL_NAME, "calls": calls})
    helper = Path(__file__).with_name("grpc_infer.py")
    completed = subprocess.run(
        [sys.executable, str(helper)], input=request, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(completed.stdout)


def test_rest_and_grpc_return_the_same_scores_as_the_model(
    http: httpclient.InferenceServerClient, grpc_results: list[dict[str, Any]], model_dir: Path
) -> None:
    result = http.infer(MODEL_NAME, _request())
    rest_scores = result.as_numpy("score")
    assert rest_scores.shape == (3,) and rest_scores.dtype == np.float32
    assert np.isfinite(rest_scores).all()
    assert result.get_response()["id"], "a response id is required by tritonclient"

    # The binary output extension (raw FP32 after the JSON) carries the same numbers.
    binary = http.infer(MODEL_NAME, _request(), outputs=[httpclient.InferRequestedOutput("score", binary_data=True)])
    np.testing.assert_array_equal(binary.as_numpy("score"), rest_scores)

    grpc_infer = grpc_results[1]
    assert grpc_infer["ok"], grpc_infer
    np.testing.assert_array_equal(np.array(grpc_infer["score"], dtype=np.float32), rest_scores)

    torch.set_num_threads(1)
    local = RewardModel.load(model_dir).score(PROMPTS, DECODED, RESPONSES)
    np.testing.assert_allclose(rest_scores, local.numpy(), rtol=1e-5, atol=1e-5)


def test_the_rollout_controller_scores_each_versions_served_responses_here(
    http: httpclient.InferenceServerClient, server: dict[str, str], kafka_config: KafkaConfig, tmp_path: Path
) -> None:
    """The controller's evidence: generations read from Kafka, images from the blob store, scored by
    this server over REST, and tallied per version; feedback joined to the version that served it."""
    expected = http.infer(MODEL_NAME, _request()).as_numpy("score")
    blobs = BlobStore(tmp_path / "blobs")
    served_by = ["canary", "stable", "canary"]
    generations, feedback = [], []
    for row, version in enumerate(served_by):
        refs = [common_pb2.ImageRef(sha256=blobs.put(data), mime_type="image/png") for data in IMAGES[row] if data]
        generation = events_pb2.GenerationLogged(
            response_id=f"response-{row}", policy_version=version, prompt_text=PROMPTS[row],
            response_text=RESPONSES[row], images=refs,
        )
        generations.append((generation.response_id, generation))
        rating = events_pb2.FeedbackReceived(feedback=feedback_pb2.Feedback(
            feedback_id=f"rating-{row}", rating=feedback_pb2.Rating(response_id=f"response-{row}", score=row + 2)))
        feedback.append((f"rating-{row}", rating))
    preference = events_pb2.FeedbackReceived(feedback=feedback_pb2.Feedback(
        feedback_id="preference", preference=feedback_pb2.Preference(
            chosen_response_id="response-1", rejected_response_id="response-2")))
    feedback.append(("preference", preference))
    for name, first, second in (("tie", "response-1", "response-2"), ("tie-within-canary", "response-0", "response-2")):
        tie = events_pb2.FeedbackReceived(feedback=feedback_pb2.Feedback(
            feedback_id=name, tie=feedback_pb2.Tie(first_response_id=first, second_response_id=second)))
        feedback.append((name, tie))
    producer = make_producer(kafka_config)
    # Feedback first: the collector must hold it until the generations it refers to arrive.
    produce_durably(producer, kafka_config.topic("feedback"), feedback, 30)
    produce_durably(producer, kafka_config.topic("generations"), generations, 30)
    producer.close()

    collector = EvidenceCollector(kafka_config, RewardScorer(server["http"], MODEL_NAME, blobs, ClientTls(), ClientAuth()), UserCap())
    try:
        collector.reset("canary", "stable", since_ms=0)
        deadline = time.monotonic() + 60
        while sum(m.n for m in collector.evidence.rewards.values()) < 3 and time.monotonic() < deadline:
            collector.catch_up(max_seconds=5)
        evidence = collector.evidence  # a view of everything read so far
    finally:
        collector.close()
    assert evidence.moments("reward", "canary").n == 2 and evidence.moments("reward", "stable").n == 1
    assert evidence.moments("reward", "canary").mean == pytest.approx((expected[0] + expected[2]) / 2, abs=1e-5)
    assert evidence.moments("reward", "stable").mean == pytest.approx(expected[1], abs=1e-5)
    assert evidence.moments("rating", "canary").mean == pytest.approx(3.0)  # scores 2 and 4
    assert evidence.moments("rating", "stable").mean == pytest.approx(3.0)  # score 3
    assert (evidence.canary_wins, evidence.stable_wins) == (0, 1)
    assert evidence.ties == 1  # a tie within one version says nothing about canary vs stable
    assert collector.reward_model_version == VERSION


def test_metadata_describes_the_contract(
    http: httpclient.InferenceServerClient, grpc_results: list[dict[str, Any]]
) -> None:
    for metadata in (http.get_model_metadata(MODEL_NAME), grpc_results[0]):
        inputs = {spec["name"]: (spec["datatype"], [int(d) for d in spec["shape"]]) for spec in metadata["inputs"]}
        assert inputs == {"prompt": ("BYTES", [-1]), "response": ("BYTES", [-1]), "images": ("BYTES", [-1, -1])}
        assert [(o["name"], o["datatype"]) for o in metadata["outputs"]] == [("score", "FP32")]


def test_mismatched_batch_is_refused_naming_the_input(
    http: httpclient.InferenceServerClient, grpc_results: list[dict[str, Any]]
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        http.infer(MODEL_NAME, _request(responses=RESPONSES[:2]))
    assert refused.value.status() == "400"
    assert "'response'" in refused.value.message()

    grpc_refused = grpc_results[2]
    assert not grpc_refused["ok"]
    assert grpc_refused["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "'response'" in grpc_refused["message"]


def _wrong_datatype_request() -> list:
    prompt = httpclient.InferInput("prompt", [3], "FP32")
    prompt.set_data_from_numpy(np.zeros(3, dtype=np.float32))
    return [prompt, *_request()[1:]]


_PNG = _encoded(RED, "PNG")
BAD_REQUESTS = {
    "missing input": (lambda: _request()[:2], "'images'"),
    "wrong datatype": (_wrong_datatype_request, "'prompt'"),
    "not an image": (lambda: _request(images=[[b"not an image", b""]] + IMAGES_B64[1:]), "'images'[0][0]"),
    "truncated png": (
        lambda: _request(images=[[b"", b""], [base64.b64encode(_PNG[: len(_PNG) // 2]), b""], IMAGES_B64[2]]),
        "'images'[1][0]",
    ),
    "forged placeholder": (lambda: _request(responses=["<image>", *RESPONSES[1:]]), "'response'"),
}


# Row 0 as a follow-up: the red image and question, an answer, another question; rows 1 and 2 as single questions.
CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0]}]},
     {"role": "assistant", "content": [{"type": "text", "text": "It is red."}]},
     {"role": "user", "content": [{"type": "text", "text": "Are you sure?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": PROMPTS[1]}]}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": PROMPTS[2]}]}],
]


def _conversation_input(conversations: list) -> httpclient.InferInput:
    return _bytes_input("conversation", [json.dumps(c).encode() for c in conversations])


def test_a_conversation_input_is_scored_as_the_model_scores_the_whole_conversation(
    http: httpclient.InferenceServerClient, model_dir: Path
) -> None:
    served = http.infer(MODEL_NAME, [*_request(), _conversation_input(CONVERSATIONS)]).as_numpy("score")
    torch.set_num_threads(1)
    local = RewardModel.load(model_dir)
    expected = local.score([from_chat_messages(c) for c in CONVERSATIONS], DECODED, RESPONSES).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-6)
    questions = local.score(PROMPTS, DECODED, RESPONSES).numpy()
    assert not np.isclose(served[0], questions[0]) and np.allclose(served[1:], questions[1:], atol=1e-6)


@pytest.mark.parametrize(("conversations", "named"), [
    ([[{"role": "user", "content": [{"type": "text", "text": "no image part"}]}], *CONVERSATIONS[1:]],
     "'conversation'[0] has 0 image parts for the row's 1 images"),
    ([[{"role": "robot", "content": []}], *CONVERSATIONS[1:]], "'conversation'[0] is not a conversation"),
    (CONVERSATIONS[:2], "'conversation' has 2 rows"),
    ([[{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Hm?"}]}],
      *CONVERSATIONS[1:]], "'conversation'[0] has 1 audio parts for the row's 0 audio clips"),
], ids=["image-count", "role", "rows", "audio"])
def test_a_bad_conversation_is_refused_with_400_naming_the_row(
    http: httpclient.InferenceServerClient, conversations: list, named: str
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        http.infer(MODEL_NAME, [*_request(), _conversation_input(conversations)])
    assert refused.value.status() == "400", refused.value.message()
    assert named in refused.value.message(), refused.value.message()


def test_audio_is_refused_by_a_reward_model_that_takes_none(http: httpclient.InferenceServerClient) -> None:
    spoken = [[{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Hm?"}]}],
              *CONVERSATIONS[1:]]
    with pytest.raises(InferenceServerException) as refused:
        http.infer(MODEL_NAME, [*_request(), _conversation_input(spoken),
                                _bytes_input("audio", [[base64.b64encode(wav())], [b""], [b""]])])
    assert refused.value.status() == "400", refused.value.message()
    assert "input 'audio': this reward model takes no audio" in refused.value.message()


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_refused_with_400_naming_the_input(http: httpclient.InferenceServerClient, case: str) -> None:
    build, named = BAD_REQUESTS[case]
    with pytest.raises(InferenceServerException) as refused:
        http.infer(MODEL_NAME, build())
    assert refused.value.status() == "400", refused.value.message()
    assert named in refused.value.message()


def test_metrics_count_scored_responses_and_name_the_version(
    http: httpclient.InferenceServerClient, server: dict[str, str]
) -> None:
    def scrape() -> str:
        with urllib.request.urlopen(f"http://{server['http']}/metrics", timeout=5) as response:
            return response.read().decode()

    before = _metric(scrape(), "modalign_reward_scored_total")
    http.infer(MODEL_NAME, _request())
    after = scrape()
    assert _metric(after, "modalign_reward_scored_total") == before + len(PROMPTS)
    assert _metric(after, f'modalign_reward_model_info{{version="{VERSION}"}}') == 1.0


# --- Hot-loading published versions. Last in the module: it changes the version being served. ---


def _rest_infer(base: str) -> dict[str, Any]:
    """One v2 REST JSON call with urllib: a client of its own, safe on a background thread."""
    body = {
        "inputs": [
            {"name": "prompt", "datatype": "BYTES", "shape": [len(PROMPTS)], "data": PROMPTS},
            {"name": "response", "datatype": "BYTES", "shape": [len(RESPONSES)], "data": RESPONSES},
            {
                "name": "images", "datatype": "BYTES", "shape": [len(IMAGES_B64), len(IMAGES_B64[0])],
                "data": [[image.decode() for image in row] for row in IMAGES_B64],
            },
        ]
    }
    request = urllib.request.Request(
        f"http://{base}/v2/models/{MODEL_NAME}/infer", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


class _Traffic:
    """Scores the fixed rows in a loop on a daemon thread, keeping every answer and every failure."""

    def __init__(self, base: str) -> None:
        self.answers: list[tuple[str, np.ndarray]] = []
        self.failures: list[str] = []
        self._base = base
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reward-traffic", daemon=True)

    def __enter__(self) -> _Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._thread.join(timeout=60)

    def wait_for_more(self, count: int, timeout_s: float = 30) -> None:
        """Returns once `count` more requests have come back, answered or failed."""
        target = len(self.answers) + len(self.failures) + count
        deadline = time.monotonic() + timeout_s
        while len(self.answers) + len(self.failures) < target:
            assert time.monotonic() < deadline, f"the traffic thread made no {count} requests in {timeout_s:.0f}s"
            time.sleep(0.05)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                answer = _rest_infer(self._base)
                self.answers.append((answer["model_version"], np.array(answer["outputs"][0]["data"], dtype=np.float32)))
            except Exception as error:  # noqa: BLE001 - every failure is the finding
                self.failures.append(repr(error))
            self._stopping.wait(0.02)


def _publish_event(kafka_config: KafkaConfig, store: DirectoryStore, policy_version: str, reward_version: str) -> None:
    """What the trainer produces after writing <store>/policy/<policy_version> and <store>/reward/<reward_version>."""
    event = events_pb2.PolicyVersionPublished(
        version=policy_version, parent_version="v0", uri=store.folder("policy", policy_version).resolve().as_uri(),
        algorithm="rloo", reward_model_version=reward_version,
    )
    event.published_at.GetCurrentTime()
    producer = make_producer(kafka_config)
    try:
        produce_durably(producer, kafka_config.topic("policy-versions"), [(policy_version, event)],
                        timeout_s=kafka_config.produce_timeout_s)
    finally:
        producer.close()


def _scrape(base: str) -> str:
    with urllib.request.urlopen(f"http://{base}/metrics", timeout=5) as response:
        return response.read().decode()


def _wait_for_metric(base: str, name: str, value: float, or_series: str = "", timeout_s: float = 60) -> str:
    """The /metrics text once `name` reads `value` (an absent series reads 0), or once `or_series` appears."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = _scrape(base)
        if _metric(text, name, default=0.0) == value or (or_series and or_series in text):
            return text
        assert time.monotonic() < deadline, f"{name} did not reach {value} in {timeout_s:.0f}s"
        time.sleep(0.2)


def test_published_reward_versions_are_hot_loaded_verified_and_without_failed_requests(
    server: dict[str, str], store: DirectoryStore, kafka_config: KafkaConfig
) -> None:
    base = server["http"]
    torch.set_num_threads(1)
    first = _rest_infer(base)
    assert first["model_version"] == VERSION
    before = np.array(first["outputs"][0]["data"], dtype=np.float32)
    failed_before = _metric(_scrape(base), 'modalign_reward_model_loads_total{outcome="failed"}', default=0.0)

    # r8: a reward model with other weights, published as the trainer publishes it.
    new_model = build_default_reward_model(seed=11)
    store.publish(Manifest(version="r8", kind="reward", parent=VERSION), new_model.save)
    expected = RewardModel.load(store.folder("reward", "r8")).score(PROMPTS, DECODED, RESPONSES).numpy()
    # r9: published, then one file rewritten behind the manifest's back. The rewritten head is a
    # valid safetensors file, so only the checksum can keep it out.
    store.publish(Manifest(version="r9", kind="reward", parent="r8"), build_default_reward_model(seed=13).save)
    tampered = store.folder("reward", "r9")
    head = load_file(tampered / HEAD_FILE)
    save_file({name: -tensor for name, tensor in head.items()}, tampered / HEAD_FILE)

    with _Traffic(base) as traffic:
        traffic.wait_for_more(3)  # some answers from r7 first
        _publish_event(kafka_config, store, "v8", "r8")
        _wait_for_metric(base, 'modalign_reward_model_info{version="r8"}', 1.0)
        served_new = _rest_infer(base)

        _publish_event(kafka_config, store, "v9", "r9")
        # Refused (a failed load), or wrongly served: whichever shows first ends the wait.
        metrics = _wait_for_metric(base, 'modalign_reward_model_loads_total{outcome="failed"}', failed_before + 1,
                                   or_series='modalign_reward_model_info{version="r9"}')
        served_after_tamper = _rest_infer(base)
        traffic.wait_for_more(3)  # and some after the refusal

    # The new version serves exactly what that model gives locally.
    assert served_new["model_version"] == "r8"
    scores_new = np.array(served_new["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_allclose(scores_new, expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(scores_new, before, atol=1e-4), "r8 must score differently from r7"

    # The tampered version was refused: r8 keeps serving, with unchanged scores. Requests that arrive
    # together are scored in one batch, and a batch's shape moves float32 rounding by an ulp or so,
    # so "unchanged" is to 1e-6; versions differ by far more (checked above).
    assert served_after_tamper["model_version"] == "r8"
    served_after = np.array(served_after_tamper["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_allclose(served_after, scores_new, rtol=1e-6, atol=1e-6)
    assert 'version="r9"' not in metrics and f'version="{VERSION}"' not in metrics
    assert _metric(metrics, 'modalign_reward_model_info{version="r8"}') == 1.0

    # No request failed across both reloads, and each answer is wholly one version's.
    assert not traffic.failures, traffic.failures[:5]
    versions = [version for version, _ in traffic.answers]
    assert VERSION in versions and "r8" in versions and set(versions) == {VERSION, "r8"}, sorted(set(versions))
    for version, scores in traffic.answers:
        np.testing.assert_allclose(scores, before if version == VERSION else scores_new, rtol=1e-6, atol=1e-6)


def test_a_published_clip_reward_model_replaces_a_generative_one(
    server: dict[str, str], store: DirectoryStore, kafka_config: KafkaConfig
) -> None:
    """The trainer may publish either backbone (--learner.reward-backbone); the folder says which, and the
    service serves whichever it is told to. Runs after the hot-load test, which leaves r8 serving."""
    clip = build_default_reward_model(seed=17, backbone="clip")
    store.publish(Manifest(version="r20", kind="reward", parent="r8"), clip.save)
    _publish_event(kafka_config, store, "v20", "r20")
    _wait_for_metric(server["http"], 'modalign_reward_model_info{version="r20"}', 1.0)
    served = _rest_infer(server["http"])
    assert served["model_version"] == "r20"
    torch.set_num_threads(1)
    expected = clip.score(PROMPTS, DECODED, RESPONSES).numpy()
    np.testing.assert_allclose(np.array(served["outputs"][0]["data"], dtype=np.float32), expected, rtol=1e-6, atol=1e-6)


def test_a_reward_version_announced_outside_the_model_store_is_refused_and_scoring_goes_on(
    server: dict[str, str], store: DirectoryStore, kafka_config: KafkaConfig, tmp_path: Path
) -> None:
    """A valid reward model in another folder, and a path that climbs out of the store: neither is read.
    Runs after the CLIP test, which leaves r20 serving."""
    elsewhere = DirectoryStore(tmp_path / "elsewhere")
    elsewhere.publish(Manifest(version="r30", kind="reward", parent="r20"), build_default_reward_model(seed=19).save)
    refused_before = _metric(_scrape(server["http"]), "modalign_model_versions_refused_total", default=0.0)
    _publish_event(kafka_config, elsewhere, "v30", "r30")
    producer = make_producer(kafka_config)
    try:
        climbing = events_pb2.PolicyVersionPublished(version="v31", uri=f"{store.root.as_uri()}/../elsewhere/policy/v31",
                                                     reward_model_version="r30")
        produce_durably(producer, kafka_config.topic("policy-versions"), [("v31", climbing)], timeout_s=30)
    finally:
        producer.close()
    _wait_for_metric(server["http"], "modalign_model_versions_refused_total", refused_before + 2)
    assert _rest_infer(server["http"])["model_version"] == "r20"


def test_a_bfloat16_server_scores_as_the_model_does_in_bfloat16(model_dir: Path, tmp_path: Path) -> None:
    """--dtype bfloat16 serves the reward model in bfloat16: its scores are the bfloat16 model's, not float32's."""
    config = RewardServerConfig(model_dir=model_dir, auth=AuthConfig(insecure=True), http_port=free_port(),
                                grpc_port=free_port(), grace_period=1,
                                dtype="bfloat16")
    process = start_service(config, tmp_path, "reward-bf16", timeout_s=240)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{config.http_port}")
        served = client.infer(MODEL_NAME, _request()).as_numpy("score")
        client.close()
    finally:
        process.stop(timeout_s=20)
    torch.set_num_threads(1)
    local = RewardModel.load(model_dir).to(torch.bfloat16).score(PROMPTS, DECODED, RESPONSES).float()
    np.testing.assert_allclose(served, local.numpy(), rtol=1e-5, atol=1e-5)
    full_precision = RewardModel.load(model_dir).score(PROMPTS, DECODED, RESPONSES)
    assert not np.allclose(served, full_precision.numpy(), rtol=1e-5, atol=1e-5)  # the precision did change
