"""The reward server as a real process, called with tritonclient over REST (here) and gRPC (a child).

kserve is never imported in this process: tritonclient.grpc, which other tests may import, cannot
share a process with it.
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from modalign.core.modelstore import Manifest, ModelStore
from modalign.core.processes import ManagedProcess, free_port, http_ok
from modalign.reward.model import RewardModel, build_default_reward_model

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


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward version published to a real model store: the server verifies its manifest and reports its version."""
    store = ModelStore(tmp_path_factory.mktemp("model-store"))
    folder, _ = store.publish(Manifest(version=VERSION, kind="reward"), build_default_reward_model(seed=3).save)
    return folder


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    http_port, grpc_port = free_port(), free_port()
    base = f"127.0.0.1:{http_port}"
    process = ManagedProcess.python_module(
        "reward-server",
        "modalign.reward.server",
        ["--model-dir", str(model_dir), "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
        ready=lambda: http_ok(f"http://{base}/v2/health/ready"),
        log_dir=tmp_path_factory.mktemp("logs"),
    )
    process.start()
    try:
        # Generous: importing torch, transformers and kserve alone takes tens of seconds on a busy 2-core box.
        process.wait_ready(timeout_s=240)
        yield {"http": base, "grpc": f"127.0.0.1:{grpc_port}"}
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
