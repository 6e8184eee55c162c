"""Feedback from a web front end: chat completions from the policy's OpenAI-compatible API (the official
`openai` client), preferences posted to its /v1/feedback, and the real trainer learning from them as it
learns from gRPC feedback. Real broker, services and trainer process."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import openai
import pytest

from modalign.core.kafka import KafkaConfig
from modalign.core.processes import free_port
from modalign.feedback.server import FeedbackConfig
from modalign.policy.config import PolicyConfig
from modalign.trainer.service import is_heldout

from tests.policy.test_openai_api import data_url
from tests.services import start_grpc_service
from tests.trainer.test_trainer_crash import trained_through
from tests.trainer.test_trainer_learns import trainer_process

pytestmark = pytest.mark.integration

COLOURS = ("red", "blue", "green")


def test_feedback_posted_over_http_is_trained_on(kafka_config: KafkaConfig, tmp_path: Path) -> None:
    feedback, feedback_address, _ = start_grpc_service(FeedbackConfig, kafka_config, tmp_path)
    http_listen = f"127.0.0.1:{free_port()}"
    policy, _, _ = start_grpc_service(PolicyConfig, kafka_config, tmp_path, blob_dir=tmp_path / "blobs",
                                      http_listen=http_listen, feedback_address=feedback_address)
    trainer = trainer_process(kafka_config, tmp_path, {
        "round_max_feedback": 4, "round_max_seconds": 1.0, "min_pairs_to_learn": 2, "rounds_per_version": 100,
        "learner.algorithm": "dpo", "learner.max_new_tokens": 6, "learner.eval_prompts": 2,
    })
    base_url = f"http://{http_listen}/v1"
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    sent = []
    try:
        for index in range(8):
            colour = COLOURS[index % len(COLOURS)]
            messages = [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(colour)}},
                                             {"type": "text", "text": "What colour is the square?"}]},
                {"role": "assistant", "content": "Let me look."},
                {"role": "user", "content": "Well?"},
            ]
            reply = client.chat.completions.create(model="modalign", messages=messages, n=2, max_tokens=6, seed=index,
                                                   user="web-user")
            chosen, rejected = (choice.model_extra["response_id"] for choice in reply.choices)
            said = {"feedback_id": f"web-{index}", "user_id": "web-user", "client_time": "2026-12-02T12:00:00Z",
                    "preference": {"chosen_response_id": chosen, "rejected_response_id": rejected}}
            request = urllib.request.Request(f"{base_url}/feedback", data=json.dumps(said).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                assert json.load(response) == {"feedback_id": f"web-{index}", "duplicate": False}
            sent.append(f"web-{index}")

        trainer.start()
        state = trained_through(trainer, tmp_path / "trainer", sent)
    finally:
        trainer.stop()
        policy.stop()
        feedback.stop()

    heldout = {f for f in sent if is_heldout(f, 10)}
    learned = set(state.trained_ids) | {pair.feedback_id for pair in state.pending_pairs}
    assert learned == set(sent) - heldout, (learned, heldout)
    assert {pair.feedback_id for pair in state.heldout_pairs} == heldout
    # The pairs hold the whole conversation each answer was given in.
    for pair in state.heldout_pairs + state.replay_pairs:
        assert [message.role for message in pair.prompt.conversation] == [2, 3, 2]
