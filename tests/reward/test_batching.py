"""The reward service's dynamic batching: concurrent requests share a forward pass of the real (tiny)
reward model, each caller gets its own rows' scores, and a bad request fails only its own caller."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
import torch
from PIL import Image

from modalign.reward.backbones import build_default_reward_model
from modalign.reward.batching import ScoringBatcher
from modalign.reward.contract import ScoreBatch
from modalign.reward.model import UnscorableText


@pytest.fixture(scope="module")
def reward():
    return build_default_reward_model(0, "generative").eval()


def request(rows: int, start: int, response: str = "It is {} red.") -> ScoreBatch:
    image = Image.new("RGB", (32, 32), "red")
    return ScoreBatch(["What colour is the square?"] * rows, [[image]] * rows,
                      [response.format(start + i) for i in range(rows)], [[]] * rows)


class HeldScore:
    """The real model's scores as version r7; the first pass waits for release(), so that the requests
    submitted meanwhile queue up together (held is set once it waits)."""

    def __init__(self, reward) -> None:
        self.reward, self.held, self.released = reward, threading.Event(), threading.Event()

    def __call__(self, batch: ScoreBatch) -> tuple[torch.Tensor, str]:
        self.held.set()
        self.released.wait(30)
        return self.reward.score(batch.prompts, batch.images, batch.responses), "r7"


def queued_behind_a_pass(reward, requests: list[ScoreBatch]) -> tuple[ScoringBatcher, list[int], list[Future]]:
    """A batcher whose first pass (one row) is held until requests are queued behind it; the rows of each
    pass it ran, and the requests' futures."""
    passes: list[int] = []
    score = HeldScore(reward)
    batcher = ScoringBatcher(score, max_batch_rows=16, max_wait_ms=50, on_batch=passes.append)
    first = batcher.submit(request(1, 0))
    assert score.held.wait(30)
    futures = [batcher.submit(r) for r in requests]
    score.released.set()
    first.result(timeout=30)
    return batcher, passes, futures


def test_concurrent_requests_share_a_pass_and_each_gets_its_own_rows_scores(reward) -> None:
    requests = [request(rows, 10 * k) for k, rows in enumerate((3, 1, 4, 2), start=1)]
    batcher, passes, futures = queued_behind_a_pass(reward, requests)
    for r, future in zip(requests, futures):
        scores, version = future.result(timeout=30)
        alone = reward.score(r.prompts, r.images, r.responses)
        torch.testing.assert_close(scores, alone, atol=1e-4, rtol=0)
        assert version == "r7"
    batcher.close()
    assert passes == [1, 10]  # the four waiting requests, 10 rows, in one pass


def test_a_bad_request_fails_only_its_own_caller(reward) -> None:
    # The second has a reserved token: unscorable.
    batcher, passes, (good, bad) = queued_behind_a_pass(reward, [request(2, 0), request(1, 0, response="<image> is {}")])
    assert good.result(timeout=30)[0].shape == (2,)
    with pytest.raises(UnscorableText, match="reserved token"):
        bad.result(timeout=30)
    batcher.close()
    assert passes == [1, 2]  # the merged pass failed; the good request was scored alone
