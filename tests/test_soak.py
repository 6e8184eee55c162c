"""`modalign soak`: its short form end to end (the real system, real kills and restarts), the accounting of lost
feedback against a real broker, and the rules that classify failed calls and judge memory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kafka import OffsetAndMetadata, TopicPartition

from modalign.core.kafka import KafkaConfig, make_consumer, make_producer, produce_durably
from modalign.demo.users import Call
from modalign.soak import (
    CALLEES,
    MemorySample,
    Restart,
    SoakConfig,
    TrainerProgress,
    call_summary,
    during_restart,
    judged_life,
    restart_windows,
    rss_growth_percent,
    verdict,
)
from modalign.v1 import events_pb2, feedback_pb2

from tests.test_up import pid_alive

SOAK_MINUTES = 3


@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_a_short_soak_with_kills_loses_no_acknowledged_feedback_and_serves_no_server_error(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    # Seed 8 kills the policy first, then (if the soak is still on) the trainer: clients see the one, the
    # feedback accounting the other.
    command = [sys.executable, "-c", "from modalign.cli import main; main()", "soak", "--minutes", str(SOAK_MINUTES),
               "--out", str(out), "--seed", "8", "--kill-services", "policy,feedback,trainer",
               "--kill-interval-min-seconds", "40", "--kill-interval-max-seconds", "60",
               "--rss-warmup-minutes", "1", "--rss-judged-minutes", "1.5"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the soak stops early, stopping every process it started
        output, _ = process.communicate(timeout=240)
        pytest.fail(f"the soak did not end in time:\n{output[-3000:]}")

    report = json.loads((out / "soak.json").read_text())
    assert {path.name for path in out.iterdir()} >= {"soak.json", "soak.md", "latency.png", "memory.png", "lag.png"}
    assert all((out / name).stat().st_size > 0 for name in ("soak.md", "latency.png", "memory.png", "lag.png"))
    assert f"`modalign soak --minutes {SOAK_MINUTES} " in (out / "soak.md").read_text()

    kills = [restart for restart in report["restarts"] if restart["cause"] == "killed"]
    assert kills and all(restart["ready_after_seconds"] is not None for restart in kills), report["restarts"]
    assert kills[0]["service"] == "policy"
    # Every kind of call was made and answered, and feedback was acknowledged and reached the trainer, counted from
    # the feedback topic below the trainer's committed offsets.
    assert set(report["calls"]) == set(CALLEES) and all(s["outcomes"].get("OK") for s in report["calls"].values())
    feedback = report["feedback"]
    assert feedback["acknowledged"] > 0 and feedback["lost"] == 0 and feedback["lost_ids"] == []
    assert feedback["records_consumed_by_trainer"] >= feedback["acknowledged"]
    # The policy's kill was seen by its callers, and counted as its doing.
    generate_failures = report["calls"]["Generate conversation"]["outcomes"]
    assert sum(c.get("during_restart", 0) for o, c in generate_failures.items() if o != "OK") > 0, generate_failures
    for kind, summary in report["calls"].items():
        assert not {"INTERNAL", "UNKNOWN"} & set(summary["outcomes"]), (kind, summary)
        assert [o for o in summary["outcomes"] if o.startswith("HTTP 5") and o != "HTTP 503"] == [], (kind, summary)
        assert all(c.get("outside", 0) == 0 for o, c in summary["outcomes"].items() if o in ("UNAVAILABLE", "HTTP 503"))
    # Every process was sampled, the broker's JVM too, and those judged grew less than the bound.
    assert set(report["memory"]) == {"broker", "feedback", "policy", "reward", "rollout", "trainer"}
    assert report["memory"]["broker"]["pids_judged"] == 1
    assert all(m["growth_percent"] is None or m["growth_percent"] <= SoakConfig.max_rss_growth_percent
               for m in report["memory"].values()), report["memory"]
    assert report["lag"]["drained_after_seconds"] is not None and report["lag"]["samples"]

    assert report["verdict"] == {"passed": True, "failures": []}, output[-3000:]
    assert process.returncode == 0, output[-3000:]
    pids = {pid for memory in report["memory"].values() for _, pid, _ in memory["samples"]}
    assert [pid for pid in pids if pid_alive(pid)] == []


def test_lost_feedback_is_what_lies_beyond_the_trainers_committed_offsets(own_kafka_config: KafkaConfig) -> None:
    """Acknowledged feedback counts as reached only below the group's committed offsets: feedback on the topic the
    trainer has not committed is lost, as is feedback never written."""
    topic, group = own_kafka_config.topic("feedback"), f"soak-test-{uuid.uuid4().hex[:8]}"
    written = [f"f-{i}" for i in range(20)]
    producer = make_producer(own_kafka_config)
    produce_durably(producer, topic, [(feedback_id, received(feedback_id)) for feedback_id in written], timeout_s=10)
    producer.close()
    # The group commits the whole of partition 0 and nothing of partition 1, as a trainer that stopped short would.
    committer = make_consumer(own_kafka_config, group_id=group)
    partitions = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    ends = committer.end_offsets(partitions)
    committer.assign(partitions)
    committer.commit({partitions[0]: OffsetAndMetadata(ends[partitions[0]], "", -1)})
    committer.close()

    progress = TrainerProgress(own_kafka_config, group)
    try:
        consumed, records = progress.consumed_feedback_ids()
        assert records == ends[partitions[0]] == len(consumed) and 0 < records < len(written)
        assert progress.lag() == ends[partitions[1]]
    finally:
        progress.close()
    lost = {*written, "f-never-written"} - consumed
    assert consumed < set(written) and "f-never-written" in lost and len(lost) == len(written) - records + 1


def received(feedback_id: str) -> events_pb2.FeedbackReceived:
    return events_pb2.FeedbackReceived(feedback=feedback_pb2.Feedback(
        feedback_id=feedback_id, user_id="u", rating=feedback_pb2.Rating(response_id="r", score=3)))


def test_a_failed_call_is_the_restarts_doing_only_while_a_service_it_goes_through_restarts() -> None:
    windows = restart_windows([Restart("policy", "killed", down_at=100.0, ready_at=140.0)], grace_s=10, end=1000)
    assert during_restart(Call("Generate", "UNAVAILABLE", 120.0, 0.1), windows)
    assert during_restart(Call("HTTP chat completions", "ConnectionRefusedError", 149.0, 0.1), windows)  # in the grace
    assert during_restart(Call("GenerateStream", "UNAVAILABLE", 90.0, 15.0), windows)  # began before the kill
    assert during_restart(Call("HTTP feedback", "HTTP 503", 120.0, 0.1), windows)  # the policy forwards it
    assert not during_restart(Call("Generate", "UNAVAILABLE", 151.0, 0.1), windows)
    assert not during_restart(Call("Submit", "UNAVAILABLE", 120.0, 0.1), windows)  # the feedback service was up


def test_the_verdict_fails_on_lost_feedback_server_errors_unavailability_outside_restarts_and_growth() -> None:
    windows = restart_windows([Restart("policy", "killed", down_at=100.0, ready_at=140.0)], grace_s=10, end=1000)
    calls = [Call(kind, "OK", 10.0, 0.1) for kind in CALLEES] + [
        Call("Generate", "UNAVAILABLE", 120.0, 0.1),  # the policy's restart: expected
        Call("HTTP chat completions", "HTTP 503", 120.0, 0.1),  # the same
        Call("Submit", "UNAVAILABLE", 120.0, 0.1),  # the feedback service was not restarting
        Call("Generate conversation", "INTERNAL", 300.0, 0.1),
        Call("HTTP feedback", "HTTP 500", 120.0, 0.1),  # a 5xx other than 503, restart or not
        Call("GenerateStream", "DEADLINE_EXCEEDED", 300.0, 0.1),  # counted, not judged
    ]
    report = {
        "feedback": {"lost": 2},
        "calls": call_summary(calls, windows),
        "memory": {"broker": {"growth_percent": 5.0}, "trainer": {"growth_percent": 31.0}, "policy": {"growth_percent": None}},
        "restarts": [{"service": "policy", "cause": "killed"}, {"service": "rollout", "cause": "exited with 1"}],
    }
    assert verdict(report, SoakConfig(), None)["failures"] == [
        "2 acknowledged feedback never reached the trainer",
        "Generate conversation: 1 INTERNAL",
        "Submit: 1 UNAVAILABLE outside any restart of feedback",
        "HTTP feedback: 1 HTTP 500",
        "trainer: RSS grew 31% (bound 20%)",
        "rollout exited with 1",
    ]
    report |= {"feedback": {"lost": 0}, "calls": call_summary(calls[:len(CALLEES) + 2], windows),
               "memory": {"broker": {"growth_percent": 5.0}}, "restarts": [{"service": "policy", "cause": "killed"}]}
    assert verdict(report, SoakConfig(), None) == {"passed": True, "failures": []}


def test_memory_growth_is_judged_after_the_warm_up_from_one_half_to_the_next() -> None:
    def life(rss_by_minute: list[float]) -> list[MemorySample]:
        return [MemorySample(minute * 60.0, "trainer", 7, rss) for minute, rss in enumerate(rss_by_minute)]

    loads_then_holds = life([400, 800, 1300, 1310, 1305, 1312, 1308, 1311, 1309, 1310, 1312])
    leaks = life([400, 800, 1000, 1050, 1100, 1150, 1200, 1250, 1300, 1350, 1400])
    judged = judged_life(loads_then_holds, warmup_minutes=3, judged_minutes=5)
    assert [s.at for s in judged] == [minute * 60.0 for minute in range(3, 11)]
    assert rss_growth_percent(judged) < 1
    assert rss_growth_percent(judged_life(leaks, warmup_minutes=3, judged_minutes=5)) > 15
    assert judged_life(loads_then_holds, warmup_minutes=3, judged_minutes=8) == []  # too short a life to judge
