"""Sticky weighted routing between policy versions, and switching routes without failing a request."""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from modalign.core.kafka import KafkaConfig, type_headers
from modalign.policy.batcher import BatcherOverloaded, DynamicBatcher
from modalign.policy.engine import GenerationRequest, PolicyEngine, SamplingParams
from modalign.policy.model import format_prompt
from modalign.policy.routing import BUCKETS, Joined, Routes, VersionRouter, session_bucket
from modalign.policy.server import PolicyConfig, PublishedVersions
from modalign.v1 import events_pb2


def test_a_session_keeps_its_bucket_and_buckets_are_uniform() -> None:
    sessions = [uuid.uuid4().hex for _ in range(20_000)]
    assert all(session_bucket(s) == session_bucket(s) for s in sessions[:100])
    counts = [0] * BUCKETS
    for session in sessions:
        counts[session_bucket(session)] += 1
    expected = len(sessions) / BUCKETS
    chi_square = sum((c - expected) ** 2 / expected for c in counts)
    assert chi_square < 160  # 99 degrees of freedom: P(chi2 > 160) < 1e-4 for a uniform hash


def test_sessions_move_only_from_stable_to_canary_as_the_weight_grows() -> None:
    sessions = [uuid.uuid4().hex for _ in range(2_000)]
    previous = {s: "v1" for s in sessions}
    for weight in (5, 25, 50, 100):
        routes = Routes("v1", "v2", weight)
        now = {s: routes.version_for(session_bucket(s)) for s in sessions}
        assert all(now[s] == "v2" for s in sessions if previous[s] == "v2")
        share = sum(v == "v2" for v in now.values()) / len(sessions)
        assert abs(share - weight / 100) < 0.05
        previous = now


def test_routes_follow_the_rollout_state() -> None:
    progressing = events_pb2.RolloutState(
        stable_version="v1", canary_version="v2", canary_weight_percent=25, phase=events_pb2.ROLLOUT_PHASE_PROGRESSING
    )
    assert Routes.from_state(progressing, "v0") == Routes("v1", "v2", 25)
    paused = events_pb2.RolloutState()
    paused.CopyFrom(progressing)
    paused.phase = events_pb2.ROLLOUT_PHASE_PAUSED
    assert Routes.from_state(paused, "v0") == Routes("v1", "v2", 25)
    rolled_back = events_pb2.RolloutState(stable_version="v1", canary_version="v2", phase=events_pb2.ROLLOUT_PHASE_ROLLED_BACK)
    assert Routes.from_state(rolled_back, "v0") == Routes("v1")
    pinned = events_pb2.RolloutState()
    pinned.CopyFrom(progressing)
    pinned.pinned_version = "v0"
    assert Routes.from_state(pinned, "v0") == Routes("v0")
    assert Routes.from_state(events_pb2.RolloutState(), "v0") == Routes("v0")
    assert Routes("v1", "v2", 25).weights() == {"v1": 75, "v2": 25}


def prompt(processor, text: str, max_new_tokens: int = 3) -> GenerationRequest:
    return GenerationRequest(format_prompt(processor, text, 0), [], SamplingParams(max_new_tokens=max_new_tokens, seed=1))


def make_router(policy, head_to_head_percent: int = 0) -> VersionRouter:
    """A router over copies of one model as v0, v1 and v2 (v9 never loads), with its loads listed."""
    model, processor = policy
    loads: list[str] = []
    variants = {"v1": copy.deepcopy(model), "v2": copy.deepcopy(model)}

    def load_engine(version: str) -> PolicyEngine:
        loads.append(version)
        if version not in variants:
            raise LookupError(f"{version} was never published")
        return PolicyEngine(variants[version], processor, policy_version=version)

    router = VersionRouter(
        PolicyEngine(model, processor, "v0"), load_engine,
        lambda engine: DynamicBatcher(engine, max_batch_rows=8, max_wait_ms=1),
        head_to_head_percent=head_to_head_percent,
    )
    router.loads = loads  # type: ignore[attr-defined]
    return router


@pytest.fixture
def router(policy):
    router = make_router(policy)
    yield router
    router.close()


def test_requests_reach_the_version_of_their_session(router, policy) -> None:
    _, processor = policy
    assert router.apply(Routes("v0", "v1", 50)) == Routes("v0", "v1", 50)
    for session in [uuid.uuid4().hex for _ in range(20)]:
        expected = Routes("v0", "v1", 50).version_for(session_bucket(session))
        version, pending = router.submit(session, prompt(processor, "hi"))
        assert version == expected
        assert pending.result(timeout=60)[0].policy_version == expected


def test_the_canarys_requests_for_several_candidates_are_head_to_head_with_stable(policy) -> None:
    _, processor = policy
    router = make_router(policy, head_to_head_percent=100)
    try:
        router.apply(Routes("v0", "v1", 50))
        sessions = [uuid.uuid4().hex for _ in range(40)]
        canary_sessions = [s for s in sessions if router.routes.version_for(session_bucket(s)) == "v1"]
        stable_sessions = [s for s in sessions if s not in canary_sessions]
        orders = set()
        for session in canary_sessions[:8]:
            streamed: dict[int, str] = {}
            request = prompt(processor, "compare", max_new_tokens=4)
            request.n = 3
            request.on_token = lambda index, _token, text, streamed=streamed: streamed.__setitem__(index, streamed.get(index, "") + text)
            version, pending = router.submit(session, request)
            samples = pending.result(timeout=60)
            versions = [sample.policy_version for sample in samples]
            assert version == "v1" and len(samples) == 3
            assert versions in (["v1", "v1", "v0"], ["v0", "v0", "v1"])  # half (rounded up) from the first drawn
            assert streamed == {index: sample.text for index, sample in enumerate(samples)}
            orders.add(versions[0])
        assert orders == {"v0", "v1"}  # which version comes first is random (8 draws: both with p > 0.99)
        # One candidate cannot be compared; stable's sessions never see the canary.
        single = prompt(processor, "one")
        assert [s.policy_version for s in router.submit(canary_sessions[0], single)[1].result(timeout=60)] == ["v1"]
        for session in stable_sessions[:4]:
            request = prompt(processor, "compare")
            request.n = 2
            assert {s.policy_version for s in router.submit(session, request)[1].result(timeout=60)} == {"v0"}
    finally:
        router.close()


def test_a_head_to_head_request_is_cancelled_only_as_a_whole(policy) -> None:
    model, processor = policy
    engine = PolicyEngine(model, processor, "v0")
    in_flight, release = threading.Event(), threading.Event()
    batcher = DynamicBatcher(engine, max_batch_rows=1, max_wait_ms=1)  # one request at a time
    try:
        held = prompt(processor, "hold", max_new_tokens=1)
        held.on_token = lambda *_: (in_flight.set(), release.wait(30))
        running = batcher.submit(held)
        assert in_flight.wait(30)
        partly_running = Joined([running, batcher.submit(prompt(processor, "queued"))])
        queued = Joined([batcher.submit(prompt(processor, "a")), batcher.submit(prompt(processor, "b"))])
        assert queued.cancel() and queued.cancelled()  # nothing of it had started: taken back whole
        assert not partly_running.cancel()  # one part runs: the request cannot be taken back whole...
        release.set()
        with pytest.raises(CancelledError):  # ...and ends cancelled once that part has run
            partly_running.result(timeout=30)
        assert running.result(timeout=30)
    finally:
        release.set()
        batcher.close()


def test_promotion_reuses_the_canary_and_a_failed_canary_gets_no_traffic(router, policy) -> None:
    router.apply(Routes("v0", "v1", 25))
    router.apply(Routes("v1"))  # promoted: v1 was loaded as the canary, nothing reloads
    assert router.loads == ["v1"]
    assert router.apply(Routes("v1", "v9", 50)) == Routes("v1")  # v9 cannot load: stable takes its share
    assert router.apply(Routes("v9")) == Routes("v1")  # nor can an unloadable stable replace a working one


@contextmanager
def under_load(router: VersionRouter, make_request: Callable[[], GenerationRequest], clients: int = 4
               ) -> Iterator[tuple[list[BaseException], set[str]]]:
    """Clients sending make_request() to the router in a loop, each with a new session, until the block
    ends; yields the failures they met and the versions that answered them."""
    stop = threading.Event()
    failures: list[BaseException] = []
    served: set[str] = set()

    def client() -> None:
        while not stop.is_set():
            try:
                _, pending = router.submit(uuid.uuid4().hex, make_request())
                served.update(sample.policy_version for sample in pending.result(timeout=60))
            except BaseException as error:  # noqa: BLE001 - any failure is the test's finding
                failures.append(error)

    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(client)
        try:
            yield failures, served
        finally:
            stop.set()


def test_no_request_fails_while_routes_change_under_load(router, policy) -> None:
    _, processor = policy
    with under_load(router, lambda: prompt(processor, "load", max_new_tokens=2)) as (failures, served):
        for routes in (Routes("v0", "v1", 50), Routes("v1"), Routes("v1", "v2", 50), Routes("v1"), Routes("v2")):
            router.apply(routes)
            time.sleep(0.3)
    assert not failures
    assert router.routes == Routes("v2") and {"v0", "v1", "v2"} >= served and len(served) >= 2


def test_a_full_queue_refuses_instead_of_growing(policy) -> None:
    model, processor = policy
    batcher = DynamicBatcher(PolicyEngine(model, processor), max_batch_rows=1, max_pending_rows=2, max_wait_ms=1)
    in_flight, release = threading.Event(), threading.Event()
    held = prompt(processor, "hold", max_new_tokens=1)
    held.on_token = lambda *_: (in_flight.set(), release.wait(30))
    first = batcher.submit(held)
    assert in_flight.wait(30)
    batcher.submit(prompt(processor, "queued"))
    batcher.submit(prompt(processor, "queued"))
    with pytest.raises(BatcherOverloaded):
        batcher.submit(prompt(processor, "one too many"))
    release.set()
    first.result(timeout=30)
    batcher.close()


def record(topic: str, message) -> SimpleNamespace:
    """A consumed record of message as modalign writes it."""
    return SimpleNamespace(topic=topic, partition=0, offset=0, value=message.SerializeToString(), headers=type_headers(message))


def test_a_state_waits_for_the_announcement_of_the_version_it_routes_to(policy) -> None:
    config = PolicyConfig(kafka=KafkaConfig(topic_prefix="t."))
    versions = PublishedVersions(config, PolicyEngine(*policy, "v0"))
    state = events_pb2.RolloutState(revision=1, stable_version="v0", canary_version="v1", canary_weight_percent=5,
                                    phase=events_pb2.ROLLOUT_PHASE_PROGRESSING)
    announcement = events_pb2.PolicyVersionPublished(version="v1", uri="file:///models/policy/v1")
    assert versions.update([record("t.rollout", state)]) is None
    routes = versions.update([record("t.policy-versions", announcement)])
    assert routes == Routes("v0", "v1", 5)
    assert versions.update([record("t.rollout", state)]) is None  # not newer
