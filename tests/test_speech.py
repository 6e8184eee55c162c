"""Spoken questions through the public APIs (issue 18): a real policy service on the audio-capable family (a tiny
Qwen2.5-Omni thinker), over gRPC and over its OpenAI-compatible HTTP API (the official `openai` client), a real
broker, and the real feedback service and trainer learning from answers to spoken questions.

Bad audio (not audio, truncated, too long, at a wrong rate, silent, not what its MIME type says) is refused with
INVALID_ARGUMENT / 400 naming the problem, and nothing is logged for it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import openai
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from modalign.core.audio import decode_audio
from modalign.core.auth import AuthConfig, ClientAuth
from modalign.core.blobs import BlobStore
from modalign.core.kafka import KafkaConfig, read_topic
from modalign.core.launch import on_broker
from modalign.core.processes import ManagedProcess, free_port
from modalign.core.tls import ClientTls
from modalign.feedback.server import FeedbackConfig
from modalign.policy.config import PolicyConfig
from modalign.policy.conversation import from_chat_messages
from modalign.policy.model import load_policy
from modalign.reward.config import RewardServerConfig
from modalign.reward.model import RewardModel
from modalign.rollout.evidence import RewardScorer, ServedResponse
from modalign.trainer.service import is_heldout
from modalign.v1 import common_pb2, events_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2, policy_pb2_grpc

from tests.clips import wav
from tests.families.tiny.qwen_omni import build_qwen2_5_omni
from tests.policy.test_openai_api import data_url
from tests.policy.test_policy_service import png
from tests.services import counter_total, start_grpc_service, start_service
from tests.trainer.test_trainer_crash import trained_through
from tests.trainer.test_trainer_learns import trainer_process

pytestmark = pytest.mark.integration


@dataclass
class Speech:
    """The services under test: the policy (gRPC and HTTP), the feedback service, and where they log."""

    policy: policy_pb2_grpc.PolicyServiceStub
    feedback: feedback_pb2_grpc.FeedbackServiceStub
    openai: openai.OpenAI
    metrics_url: str
    model_dir: Path
    work: Path
    kafka: KafkaConfig

    def logged(self, user_id: str) -> list[events_pb2.GenerationLogged]:
        return [g for g in read_topic(self.kafka, "generations", events_pb2.GenerationLogged) if g.user_id == user_id]


@pytest.fixture(scope="module")
def speech(kafka_config: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Speech]:
    work = tmp_path_factory.mktemp("speech")
    model_dir = work / "qwen2_5_omni"
    build_qwen2_5_omni(model_dir, 0)
    processes: list[ManagedProcess] = []
    try:
        feedback, feedback_address, _ = start_grpc_service(FeedbackConfig, kafka_config, work)
        processes.append(feedback)
        http_listen = f"127.0.0.1:{free_port()}"
        policy, policy_address, metrics_port = start_grpc_service(
            PolicyConfig, kafka_config, work, model_dir=str(model_dir), blob_dir=work / "blobs",
            http_listen=http_listen, feedback_address=feedback_address, max_batch_wait_ms=20.0,
            audio_max_seconds=10.0,
        )
        processes.append(policy)
        with grpc.insecure_channel(policy_address) as policy_channel, grpc.insecure_channel(feedback_address) as fb:
            yield Speech(
                policy_pb2_grpc.PolicyServiceStub(policy_channel), feedback_pb2_grpc.FeedbackServiceStub(fb),
                openai.OpenAI(base_url=f"http://{http_listen}/v1", api_key="unused", max_retries=0, timeout=60),
                f"http://127.0.0.1:{metrics_port}/metrics", model_dir, work, kafka_config,
            )
    finally:
        for process in reversed(processes):
            process.stop()


def spoken_request(user_id: str, audio: bytes, mime_type: str = "audio/wav", n: int = 1,
                   seed: int = 5) -> policy_pb2.GenerateRequest:
    """A question asked aloud about a picture, in the single-question shorthand (no typed text)."""
    return policy_pb2.GenerateRequest(
        images=[common_pb2.Image(data=png(), mime_type="image/png")],
        audio=common_pb2.Audio(data=audio, mime_type=mime_type),
        sampling=common_pb2.SamplingParams(max_new_tokens=6, seed=seed), n=n, user_id=user_id,
    )


def test_a_spoken_question_with_an_image_is_answered_over_grpc_and_logged_by_reference(speech: Speech) -> None:
    clip = wav(seconds=1.5)
    seconds_before = counter_total(speech.metrics_url, "modalign_policy_audio_seconds_total")
    answer = speech.policy.Generate(spoken_request("grpc-speaker", clip, n=2), timeout=60)
    assert len(answer.candidates) == 2 and all(c.token_count > 0 for c in answer.candidates)

    logged = speech.logged("grpc-speaker")
    assert {g.response_id for g in logged} == {c.response_id for c in answer.candidates}
    parts = [part for part in logged[0].conversation[0].content]
    assert [part.WhichOneof("part") for part in parts] == ["image", "audio"]
    audio = parts[1].audio
    assert audio.sha256 == hashlib.sha256(clip).hexdigest() and audio.mime_type == "audio/wav"
    assert audio.seconds == pytest.approx(1.5, abs=0.01)
    assert BlobStore(speech.work / "blobs").get(audio.sha256) == clip
    assert counter_total(speech.metrics_url, "modalign_policy_audio_seconds_total") == pytest.approx(
        seconds_before + 1.5, abs=0.01)


def test_a_spoken_question_is_answered_over_http_by_the_openai_client(speech: Speech) -> None:
    clip = base64.b64encode(wav(seconds=1.0, rate=22_050)).decode()  # resampled to the model's 16 kHz
    reply = speech.openai.chat.completions.create(
        model="modalign", max_tokens=6, seed=3, user="http-speaker",
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url("blue")}},
            {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}},
        ]}],
    )
    assert reply.choices[0].message.content
    logged = speech.logged("http-speaker")
    assert [g.response_id for g in logged] == [reply.choices[0].model_extra["response_id"]]
    assert [p.WhichOneof("part") for p in logged[0].conversation[0].content] == ["image", "audio"]


def silence() -> bytes:
    return wav(amplitude=0.0)


def truncated() -> bytes:
    clip = wav(seconds=1.0)
    return clip[: len(clip) // 2]


# Each bad clip: its bytes, the MIME type it is sent as, and words the refusal must contain.
BAD_AUDIO = {
    "not-audio": (lambda: b"these are not the sounds you are looking for", "audio/wav", "not readable audio"),
    "truncated": (truncated, "audio/wav", "truncated"),
    "too-long": (lambda: wav(seconds=12.0, rate=8_000), "audio/wav", "above the limit of 10"),
    "wrong-rate": (lambda: wav(seconds=1.0, rate=4_000, frequency=100.0), "audio/wav", "wrong rate"),
    "silence": (silence, "audio/wav", "silent"),
    "mislabelled": (lambda: wav(container="FLAC", subtype="PCM_16"), "audio/wav", "but the data is FLAC"),
    "unknown-type": (lambda: wav(), "audio/aiff", "is not one of"),
}


@pytest.mark.parametrize("case", sorted(BAD_AUDIO))
def test_bad_audio_is_refused_naming_the_problem_and_nothing_is_logged(speech: Speech, case: str) -> None:
    make, mime_type, words = BAD_AUDIO[case]
    user = f"bad-{case}"
    with pytest.raises(grpc.RpcError) as refused:
        speech.policy.Generate(spoken_request(user, make(), mime_type), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("audio: ") and words in refused.value.details(), refused.value.details()

    # The same clip over HTTP, where the format says what it is: a 400 naming the part.
    if mime_type == "audio/wav":
        with pytest.raises(openai.BadRequestError) as rejected:
            speech.openai.chat.completions.create(model="modalign", max_tokens=4, user=user, messages=[
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url("red")}},
                    {"type": "input_audio", "input_audio": {"data": base64.b64encode(make()).decode(), "format": "wav"}},
                ]},
            ])
        message = rejected.value.body["message"]
        assert message.startswith("messages[0].content[1].input_audio: ") and words in message, message
    assert speech.logged(user) == []


def test_feedback_on_answers_to_spoken_questions_is_trained_on(speech: Speech) -> None:
    """Preferences between two answers to a spoken question reach the trainer, which trains on them with the clip
    in the prompt (the trainer's policy is the same audio-capable family)."""
    sent = []
    for index in range(6):
        answer = speech.policy.Generate(
            spoken_request("trained-speaker", wav(seconds=0.5 + 0.25 * index, frequency=150.0 + 60 * index), n=2,
                           seed=index), timeout=60)
        chosen, rejected = (c.response_id for c in answer.candidates)
        feedback = feedback_pb2.Feedback(feedback_id=f"spoken-{uuid.uuid4().hex[:8]}", user_id="trained-speaker")
        feedback.client_time.GetCurrentTime()
        feedback.preference.chosen_response_id, feedback.preference.rejected_response_id = chosen, rejected
        assert not speech.feedback.Submit(feedback, timeout=30).duplicate
        sent.append(feedback.feedback_id)

    trainer = trainer_process(speech.kafka, speech.work, {
        "learner.policy_model_dir": str(speech.model_dir), "round_max_feedback": 4, "round_max_seconds": 1.0,
        "min_pairs_to_learn": 2, "rounds_per_version": 100, "learner.algorithm": "dpo", "learner.max_new_tokens": 6,
        "learner.eval_prompts": 2,
    })
    trainer.start()
    try:
        state = trained_through(trainer, speech.work / "trainer", sent)
    finally:
        trainer.stop()
    heldout = {f for f in sent if is_heldout(f, 10)}
    assert set(state.trained_ids) | {pair.feedback_id for pair in state.pending_pairs} == set(sent) - heldout
    assert state.trained_ids, "at least one round trained on the spoken pairs"
    # The pairs hold the spoken question: the clip by reference, as the policy logged it.
    for pair in state.heldout_pairs + state.replay_pairs:
        assert [p.WhichOneof("part") for p in pair.prompt.conversation[0].content] == ["image", "audio"]


# The reward service on the same family: a reward model whose backbone is the tiny thinker scores conversations with
# their clips, as the rollout controller sends them (base64 over REST).
SPOKEN = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Please."}]}]
TYPED = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]


@pytest.fixture(scope="module")
def reward(speech: Speech, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpclient.InferenceServerClient, str, RewardModel]]:
    folder = tmp_path_factory.mktemp("omni-reward")
    model = RewardModel(*load_policy(speech.model_dir), seed=3).eval()
    model.save(folder)
    config = on_broker(RewardServerConfig, speech.kafka, auth=AuthConfig(insecure=True), model_dir=folder,
                       http_port=free_port(), grpc_port=free_port(), grace_period=1, follow="none")
    process = start_service(config, tmp_path_factory.mktemp("reward-logs"), "reward-server", timeout_s=240)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{config.http_port}")
    try:
        yield client, f"127.0.0.1:{config.http_port}", model
    finally:
        client.close()
        process.stop(timeout_s=20)


def infer_inputs(**tensors: list) -> list[httpclient.InferInput]:
    inputs = []
    for name, values in tensors.items():
        array = np.array(values, dtype=object)
        infer_input = httpclient.InferInput(name, list(array.shape), "BYTES")
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def test_the_reward_service_scores_spoken_conversations_as_the_model_does(speech: Speech, reward) -> None:
    client, url, model = reward
    clips = [wav(seconds=1.0, frequency=180.0), wav(seconds=0.6, frequency=700.0)]
    responses = ["It is red.", "It is red.", "Blue."]
    inputs = infer_inputs(
        prompt=[b"Please.", b"Please.", b"What colour is it?"], response=[r.encode() for r in responses],
        images=[[base64.b64encode(png())]] * 3,
        conversation=[json.dumps(c).encode() for c in (SPOKEN, SPOKEN, TYPED)],
        audio=[[base64.b64encode(clips[0])], [base64.b64encode(clips[1])], [b""]],
    )
    served = client.infer("reward", inputs).as_numpy("score")
    image = Image.open(io.BytesIO(png())).convert("RGB")
    audio = [[decode_audio(clip, "audio/wav", 16_000).samples] for clip in clips] + [[]]
    local = model.score([from_chat_messages(c) for c in (SPOKEN, SPOKEN, TYPED)], [[image]] * 3, responses, audio)
    np.testing.assert_allclose(served, local.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.isclose(served[0], served[1]), "the score hears the clip"

    # The rollout controller's scorer sends the clips of the conversations it scores from the blob store.
    blobs = BlobStore(speech.work / "blobs")
    image_sha, clip_shas = blobs.put(png()), [blobs.put(clip) for clip in clips]
    scorer = RewardScorer(url, "reward", blobs, ClientTls(), ClientAuth())
    try:
        scores, _ = scorer.score([
            ServedResponse("v0", "Please.", responses[index], (image_sha,), json.dumps(SPOKEN), (clip_shas[index],))
            for index in range(2)
        ] + [ServedResponse("v0", "What colour is it?", responses[2], (image_sha,), json.dumps(TYPED))])
    finally:
        scorer.close()
    np.testing.assert_allclose(scores, served, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("tensors", "named"), [
    ({"conversation": None, "audio": [[base64.b64encode(wav())]]}, "input 'audio' needs input 'conversation'"),
    ({"audio": [[b""]]}, "'conversation'[0] has 1 audio parts for the row's 0 audio clips"),
    ({"audio": [[base64.b64encode(wav(amplitude=0.0))]]}, "input 'audio'[0][0] is silent"),
    ({"audio": [[b"noise that is not base64 audio!"]]}, "input 'audio'[0][0] is not WAV, MP3, FLAC or Ogg audio"),
], ids=["no-conversation", "count", "silent", "not-audio"])
def test_bad_audio_is_refused_by_the_reward_service_naming_the_input(reward, tensors: dict, named: str) -> None:
    client = reward[0]
    request = {"prompt": [b"Please."], "response": [b"Red."], "images": [[base64.b64encode(png())]],
               "conversation": [json.dumps(SPOKEN).encode()]} | tensors
    with pytest.raises(InferenceServerException) as refused:
        client.infer("reward", infer_inputs(**{name: value for name, value in request.items() if value is not None}))
    assert refused.value.status() == "400", refused.value.message()
    assert named in refused.value.message(), refused.value.message()
