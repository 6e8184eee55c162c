import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from modalign.policy.batcher import BatcherClosed, CallerGone, DynamicBatcher
from modalign.policy.engine import (
    GenerationRequest,
    PolicyEngine,
    Sample,
    SamplingParams,
    draw_tokens,
    mask_unsampleable,
    sampling_logprobs,
)
from modalign.policy.model import format_prompt


@pytest.fixture
def engine(policy) -> PolicyEngine:
    return PolicyEngine(*policy, policy_version="v0")


def request(processor, text: str, images: list[Image.Image], n: int = 1, **params) -> GenerationRequest:
    return GenerationRequest(format_prompt(processor, text, len(images)), images, SamplingParams(**params), n=n)


def full_forward_logits(model, processor, req: GenerationRequest, sample: Sample) -> torch.Tensor:
    """The policy's logits predicting each response token, from one unpadded, uncached forward of prompt +
    response, with the tokens the engine never samples (special tokens but EOS) masked as it masks them."""
    inputs = processor(text=req.prompt_text, images=req.images or None, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == sample.prompt_token_ids
    ids = torch.tensor([sample.prompt_token_ids + sample.token_ids])
    with torch.inference_mode():
        logits = model(input_ids=ids, pixel_values=inputs.get("pixel_values")).logits[0]
    start = len(sample.prompt_token_ids) - 1
    never_sampled = PolicyEngine(model, processor).unsampleable_token_ids
    return mask_unsampleable(logits[start : start + len(sample.token_ids)].float(), never_sampled)


def test_sampling_logprobs_temperature_and_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3)
    logits = probs.log() + 1.7  # any shift: softmax is invariant to it
    temperature = torch.tensor([1.0, 0.0, 2.0])
    top_p = torch.tensor([0.6, 0.6, 1.0])
    out = sampling_logprobs(logits, temperature, top_p)
    # Row 0: the nucleus reaching 0.6 is {0.5, 0.3}, renormalised over 0.8.
    assert torch.allclose(out[0, :2], torch.tensor([0.5 / 0.8, 0.3 / 0.8]).log())
    assert torch.isinf(out[0, 2:]).all()
    # Row 1: greedy ignores top_p and temperature: the plain log_softmax.
    assert torch.allclose(out[1], probs[1].log())
    # Row 2: temperature 2 flattens, nothing truncated.
    assert torch.allclose(out[2], torch.log_softmax(logits[2] / 2, dim=-1))


def test_draw_tokens_follows_the_distribution_and_never_leaves_the_nucleus():
    logprobs = sampling_logprobs(
        torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(20_000, 4), torch.ones(20_000), torch.full((20_000,), 0.6)
    )
    generator = torch.Generator().manual_seed(0)
    uniforms = torch.rand(20_000, generator=generator, dtype=torch.float64)
    tokens = draw_tokens(logprobs, torch.zeros(20_000, dtype=torch.bool), uniforms)
    assert set(tokens.tolist()) == {0, 1}
    assert abs((tokens == 0).double().mean().item() - 0.625) < 0.02
    # Uniforms at the very ends still land on tokens with mass.
    edge = draw_tokens(logprobs[:2], torch.zeros(2, dtype=torch.bool), torch.tensor([0.0, 1.0 - 2**-53]))
    assert edge.tolist() == [0, 1]


def test_logprobs_match_a_full_forward_at_the_sampling_temperature(policy, images, engine):
    model, processor = policy
    requests = [
        request(processor, "What colour is the circle?", images[:1], n=3, temperature=1.0, seed=11, max_new_tokens=12),
        request(processor, "Count the shapes.", images, temperature=0.7, seed=3, max_new_tokens=5),
        request(processor, "Hello there, no image this time.", [], n=2, temperature=1.3, seed=5, max_new_tokens=9),
    ]
    results = engine.generate(requests)
    for req, samples in zip(requests, results):
        assert len(samples) == req.n
        for sample in samples:
            assert len(sample.token_ids) == len(sample.logprobs) <= req.params.max_new_tokens
            stopped = sample.token_ids[-1] == processor.tokenizer.eos_token_id
            assert sample.finish_reason == ("stop" if stopped else "length")
            assert stopped or len(sample.token_ids) == req.params.max_new_tokens
            logits = full_forward_logits(model, processor, req, sample)
            expected = torch.log_softmax(logits / req.params.temperature, dim=-1)
            expected = expected.gather(-1, torch.tensor(sample.token_ids).unsqueeze(-1)).squeeze(-1)
            assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4), (sample.logprobs, expected)


def test_top_p_samples_stay_in_the_nucleus_with_renormalised_logprobs(policy, images, engine):
    model, processor = policy
    top_p, temperature = 0.3, 1.5
    req = request(processor, "Where is it?", images[:1], n=4, temperature=temperature, top_p=top_p, seed=0, max_new_tokens=10)
    for sample in engine.generate([req])[0]:
        logits = full_forward_logits(model, processor, req, sample)
        for step, (token, logprob) in enumerate(zip(sample.token_ids, sample.logprobs)):
            probs = torch.softmax(logits[step] / temperature, dim=-1)
            order = torch.argsort(probs, descending=True, stable=True).tolist()
            nucleus, mass = [], 0.0
            for candidate in order:
                nucleus.append(candidate)
                mass += probs[candidate].item()
                if mass >= top_p:
                    break
            assert token in nucleus
            assert logprob == pytest.approx(torch.log(probs[token] / mass).item(), abs=1e-4)
        assert len(nucleus) < len(order)  # the truncation did remove tokens


def test_greedy_is_argmax_with_untempered_logprobs(policy, images, engine):
    model, processor = policy
    req = request(processor, "Describe the picture.", images, temperature=0.0, top_p=0.5, max_new_tokens=8)
    sample = engine.generate([req])[0][0]
    logits = full_forward_logits(model, processor, req, sample)
    assert sample.token_ids == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).max(-1).values
    assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4)


def test_seeded_samples_do_not_depend_on_batch_companions(policy, images, engine):
    _, processor = policy
    target = request(processor, "Is it red?", images[:1], n=2, temperature=1.0, seed=42, max_new_tokens=10)
    alone = engine.generate([target])[0]
    companions = [
        request(processor, "A much longer prompt about squares, circles and triangles at the top left.", images, n=3,
                temperature=0.9, seed=7, max_new_tokens=3),
        request(processor, "No image.", [], temperature=0.0, max_new_tokens=12),
    ]
    crowded = engine.generate([companions[0], target, companions[1]])[1]
    for a, b in zip(alone, crowded):
        assert a.token_ids == b.token_ids and a.prompt_token_ids == b.prompt_token_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    # Candidate i of seed s is candidate 0 of seed s + i.
    shifted = engine.generate([request(processor, "Is it red?", images[:1], temperature=1.0, seed=43, max_new_tokens=10)])
    assert shifted[0][0].token_ids == alone[1].token_ids
    assert [s.seed for s in alone] == [42, 43]
    # Different seeds give different samples.
    assert alone[0].token_ids != alone[1].token_ids


def test_unseeded_requests_record_the_seed_they_used(policy, images, engine):
    _, processor = policy
    first = engine.generate([request(processor, "Hi", [], n=2, max_new_tokens=6)])[0]
    assert first[1].seed == (first[0].seed + 1) % 2**64
    replay = engine.generate([request(processor, "Hi", [], max_new_tokens=6, seed=first[1].seed)])[0][0]
    assert replay.token_ids == first[1].token_ids


def test_stop_at_eos_and_length(taught_policy, taught_answer):
    model, processor = taught_policy
    engine = PolicyEngine(model, processor, policy_version="v7")
    red = [Image.new("RGB", (32, 32), "red")]
    stopped, cut = engine.generate([
        request(processor, "What colour is it?", red, temperature=0.0, max_new_tokens=20),
        request(processor, "What colour is it?", red, temperature=0.0, max_new_tokens=2),
    ])
    eos = processor.tokenizer.eos_token_id
    assert stopped[0].text == taught_answer
    assert stopped[0].token_ids[-1] == eos and eos not in stopped[0].token_ids[:-1]
    assert stopped[0].finish_reason == "stop" and stopped[0].policy_version == "v7"
    assert len(stopped[0].logprobs) == len(stopped[0].token_ids) < 20
    assert cut[0].finish_reason == "length" and cut[0].token_ids == stopped[0].token_ids[:2]


@pytest.mark.parametrize("stop", [("🙂",), ("d 🙂", "zz"), ("Red",)])
def test_a_stop_text_ends_the_answer_before_it_and_nothing_of_it_is_streamed(taught_policy, taught_answer, stop):
    model, processor = taught_policy
    engine = PolicyEngine(model, processor)
    red = [Image.new("RGB", (32, 32), "red")]
    [[whole]] = engine.generate([request(processor, "What colour is it?", red, temperature=0.0, max_new_tokens=20)])
    streamed: list[str] = []
    cut_request = request(processor, "What colour is it?", red, temperature=0.0, max_new_tokens=20, stop=stop)
    cut_request.on_token = lambda _index, _token, delta: streamed.append(delta)
    [[cut]] = engine.generate([cut_request])
    expected = taught_answer[: min(taught_answer.find(text) for text in stop if text in taught_answer)]
    assert cut.text == expected and cut.finish_reason == "stop"
    assert "".join(streamed) == expected  # what could still become a stop text was held back, then dropped
    # The tokens are the ones the model sampled, up to the one that completed the stop text.
    assert cut.token_ids == whole.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(whole.token_ids)
    assert any(text in engine._decode(cut.token_ids) for text in stop)
    assert not any(text in engine._decode(cut.token_ids[:-1]) for text in stop)


def test_streamed_deltas_concatenate_to_the_text(taught_policy, taught_answer, policy, images):
    red = [Image.new("RGB", (32, 32), "red")]
    for (model, processor), req_images, text, temperature in [
        (taught_policy, red, "What colour is it?", 0.0),  # an emoji split over four byte tokens
        (policy, images, "Anything", 1.0),  # random bytes from an untrained model
    ]:
        engine = PolicyEngine(model, processor)
        streamed: dict[int, list[str]] = {0: [], 1: [], 2: []}
        tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
        finished: dict[int, Sample] = {}

        # The callbacks run inside engine.generate below, within this iteration: B023 does not apply.
        def on_token(index: int, token_id: int, delta: str) -> None:
            tokens[index].append(token_id)  # noqa: B023
            streamed[index].append(delta)  # noqa: B023

        req = request(processor, text, req_images, n=3, temperature=temperature, seed=1, max_new_tokens=24)
        req.on_token = on_token
        req.on_finish = lambda index, sample: finished.setdefault(index, sample)  # noqa: B023
        samples = engine.generate([req])[0]
        for index, sample in enumerate(samples):
            assert "".join(streamed[index]) == sample.text
            assert tokens[index] == sample.token_ids
            assert finished[index] is sample
        if temperature == 0.0:
            # The emoji arrives whole, in one delta, once its last byte is sampled.
            assert samples[0].text == taught_answer
            assert "🙂" in streamed[0] or any("🙂" in delta and "\ufffd" not in delta for delta in streamed[0])
            assert not any("\ufffd" in delta for delta in streamed[0])


def test_a_failing_callback_does_not_disturb_the_batch(policy, images, engine):
    _, processor = policy
    seen = []
    broken = request(processor, "one", images[:1], temperature=1.0, seed=2, max_new_tokens=6)
    broken.on_token = lambda *_: (_ for _ in ()).throw(ConnectionError("client went away"))
    healthy = request(processor, "two", [], n=2, temperature=1.0, seed=3, max_new_tokens=6)
    healthy.on_token = lambda index, token, delta: seen.append(index)
    results = engine.generate([broken, healthy])
    assert len(results[0][0].token_ids) == 6
    assert seen.count(0) == 6 and seen.count(1) == 6


def test_invalid_params_are_rejected(policy, engine):
    _, processor = policy
    for params in [dict(top_p=0.0), dict(temperature=-1.0), dict(max_new_tokens=0)]:
        with pytest.raises(ValueError):
            engine.generate([request(processor, "x", [], **params)])


class CountingEngine(PolicyEngine):
    """A real engine that records the rows of every batch it starts and of every join, and can be told
    to fail a decoding step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []
        self.joins: list[int] = []
        self.fail_next = False

    def start(self, requests, encoded):
        self.batches.append(sum(r.n for r in requests))
        return super().start(requests, encoded)

    def join(self, batch, joining):
        self.joins.append(len(joining.rows))
        super().join(batch, joining)

    def step(self, batch):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        return super().step(batch)


def test_batcher_merges_concurrent_submits_into_one_batch(policy, images):
    model, processor = policy
    engine = CountingEngine(model, processor)
    hook_rows = []
    batcher = DynamicBatcher(engine, max_batch_rows=6, max_wait_ms=10_000, on_batch=hook_rows.append)
    requests = [
        request(processor, f"question {i}", images[: i % 3], n=1 + i % 2, temperature=1.0, seed=i, max_new_tokens=4)
        for i in range(4)
    ]  # 1 + 2 + 1 + 2 = 6 rows: the batch is full, so it must not wait the 10 s
    barrier = threading.Barrier(len(requests))

    def call(req: GenerationRequest) -> list[Sample]:
        barrier.wait()
        return batcher.submit(req).result(timeout=30)

    started = time.monotonic()
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(call, requests))
    assert time.monotonic() - started < 10
    batcher.close()
    assert engine.batches == [6] and hook_rows == [6]
    for req, samples in zip(requests, results):
        assert [s.token_ids for s in samples] == [s.token_ids for s in PolicyEngine(model, processor).generate([req])[0]]


def test_batcher_errors_fail_only_their_callers(policy, images):
    model, processor = policy
    engine = CountingEngine(model, processor)
    batcher = DynamicBatcher(engine, max_batch_rows=8, max_wait_ms=50)
    # A request the processor rejects (two placeholders, one image) fails alone.
    bad = GenerationRequest(format_prompt(processor, "x", 2), images[:1], SamplingParams(max_new_tokens=2))
    good = request(processor, "fine", [], seed=1, max_new_tokens=2)
    bad_future, good_future = batcher.submit(bad), batcher.submit(good)
    assert len(good_future.result(timeout=30)[0].token_ids) == 2
    with pytest.raises(ValueError):
        bad_future.result(timeout=30)
    # A batch that fails fails its callers; the worker survives for the next batch.
    engine.fail_next = True
    with pytest.raises(RuntimeError, match="device lost"):
        batcher.submit(good).result(timeout=30)
    assert batcher.submit(good).result(timeout=30)[0].token_ids == good_future.result()[0].token_ids
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit(good)


def test_close_finishes_queued_work_and_cancelled_requests_are_skipped(policy):
    model, processor = policy
    engine = CountingEngine(model, processor)
    batcher = DynamicBatcher(engine, max_batch_rows=1, max_wait_ms=1)
    release = threading.Event()
    held = request(processor, "hold", [], max_new_tokens=1)
    held.on_token = lambda *_: release.wait(30)
    futures = [batcher.submit(held)] + [batcher.submit(request(processor, f"q{i}", [], max_new_tokens=1)) for i in range(3)]
    assert futures[2].cancel()
    release.set()
    batcher.close(timeout=30)
    assert not batcher._worker.is_alive()
    assert [f.done() for f in futures] == [True] * 4
    assert futures[2].cancelled() and engine.batches == [1, 1, 1]


def test_responses_never_contain_special_tokens_other_than_eos(policy, images, engine):
    # A sampled "<image>" would be read as an image slot by the next forward pass and break it.
    model, processor = policy
    hot = request(processor, "Describe the image.", images[:1], n=8, temperature=2.0, max_new_tokens=48, seed=5)
    never = set(engine.unsampleable_token_ids)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") in never
    assert processor.tokenizer.eos_token_id not in never
    for sample in engine.generate([hot])[0]:
        assert never.isdisjoint(sample.token_ids)


def test_a_request_joins_the_running_batch_and_is_answered_before_it_ends(policy, images):
    model, processor = policy
    engine = CountingEngine(model, processor)
    batcher = DynamicBatcher(engine, max_batch_rows=8, max_wait_ms=1)
    long = request(processor, "a long answer", [], n=2, temperature=1.0, seed=3, max_new_tokens=40)
    later = [request(processor, "a short one", images[:1], n=2, temperature=1.0, seed=4, max_new_tokens=3),
             request(processor, "and greedy", images[:2], temperature=0.0, max_new_tokens=5)]
    long_tokens: list[int] = []
    futures, answered_at = [], []

    def on_token(index: int, token: int, delta: str) -> None:
        long_tokens.append(index)
        if len(long_tokens) == 4:  # the long request is running: the others arrive now
            for r in later:
                futures.append(batcher.submit(r))
                futures[-1].add_done_callback(lambda _: answered_at.append(len(long_tokens)))

    long.on_token = on_token
    long_future = batcher.submit(long)
    results = [long_future.result(timeout=60), *(f.result() for f in futures)]
    batcher.close()
    assert engine.batches == [2, 3] and engine.joins == [3]
    assert len(answered_at) == 2 and max(answered_at) < 2 * 40  # answered before the long request's last token
    # Joined into a batch of other lengths (left-padded caches), each row samples what it samples alone.
    for req, samples in zip([long, *later], results):
        alone = PolicyEngine(model, processor).generate([dataclasses.replace(req, on_token=None)])[0]
        assert [s.token_ids for s in samples] == [s.token_ids for s in alone]
        for sample, single in zip(samples, alone):
            assert sample.logprobs == pytest.approx(single.logprobs, abs=1e-5)


def test_the_cache_bound_holds_a_request_back_and_an_oversized_one_runs_alone(policy):
    model, processor = policy
    engine = CountingEngine(model, processor)
    prompt_tokens = engine.encode(request(processor, "q", [], max_new_tokens=1))["input_ids"].shape[1]
    # Room for one candidate of 20 new tokens: the second request waits for the first to end.
    batcher = DynamicBatcher(engine, max_batch_rows=8, max_wait_ms=1, max_batch_tokens=prompt_tokens + 20)
    behind_a_running_request(batcher, request(processor, "q", [], temperature=1.0, seed=1, max_new_tokens=20), [
        request(processor, "q", [], temperature=1.0, seed=2, max_new_tokens=20),
        request(processor, "q", [], n=3, temperature=1.0, seed=2, max_new_tokens=20)])
    assert engine.batches == [1, 1, 3] and engine.joins == []


def behind_a_running_request(batcher: DynamicBatcher, running: GenerationRequest, later: list[GenerationRequest]) -> None:
    """Submits running, then, once its first token is out, later; waits for every answer and closes the batcher."""
    started = threading.Event()
    running.on_token = lambda *_: started.set()
    futures = [batcher.submit(running)]
    assert started.wait(30)
    futures += [batcher.submit(r) for r in later]
    for future in futures:
        future.result(timeout=60)
    batcher.close()


def test_a_large_request_is_not_overtaken_by_smaller_ones_behind_it(policy):
    model, processor = policy
    engine = CountingEngine(model, processor)
    batcher = DynamicBatcher(engine, max_batch_rows=4, max_wait_ms=1)
    # Four candidates do not fit beside the two running: the large request waits for them, and the
    # small one behind it, which would fit, waits behind it rather than overtake it.
    behind_a_running_request(batcher, request(processor, "q", [], n=2, temperature=1.0, seed=1, max_new_tokens=30), [
        request(processor, "q", [], n=4, max_new_tokens=2), request(processor, "q", [], n=1, max_new_tokens=2)])
    assert engine.batches == [2, 4, 1] and engine.joins == []


def test_a_request_cancelled_while_it_runs_leaves_the_batch_at_the_next_step(policy):
    model, processor = policy
    batcher = DynamicBatcher(PolicyEngine(model, processor), max_batch_rows=8, max_wait_ms=50)
    abandoned = request(processor, "a long answer", [], n=2, temperature=1.0, seed=3, max_new_tokens=40)
    staying = request(processor, "another", [], temperature=1.0, seed=4, max_new_tokens=12)
    steps: list[int] = []

    def on_token(index: int, *_) -> None:
        steps.append(index)
        if len(steps) == 6:  # three steps of its two rows: its caller goes away
            future.cancel()

    abandoned.on_token = on_token
    future, other = batcher.submit(abandoned), batcher.submit(staying)
    with pytest.raises(CallerGone, match="went away"):
        future.result(timeout=30)
    assert len(steps) == 6  # its rows left before the next step
    assert [s.token_ids for s in other.result(timeout=30)] == \
        [s.token_ids for s in PolicyEngine(model, processor).generate([staying])[0]]
    assert not future.cancelled()  # a Future that ran is not "cancelled": it ended with CallerGone
    batcher.close()
