"""README's main command, `modalign demo`, end to end and sized for CI: the real broker, every
service, simulated users, the report. The quality targets need the full defaults (minutes of
training, measured in docs/demo.md); this checks that the loop runs, stops everything it started,
and writes a report with what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modalign.core.broker import BrokerConfig
from modalign.core.processes import free_run
from modalign.demo.report import held_out_examples
from modalign.demo.speech import available_synthesiser
from modalign.policy.model import build_default_policy, save_policy

from tests.families.tiny import TINY_CHECKPOINTS

pytestmark = pytest.mark.integration


def run_demo(kafka_broker: BrokerConfig, model: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-c", "from modalign.cli import main; main()", "demo",
        "--policy-model", str(model), "--out", str(out), "--held-out", "16", "--users", "2",
        "--device", "cpu",  # passed on to every service: a flag one of them does not know fails its start
        "--data-dir", str(kafka_broker.data_dir), "--port", str(kafka_broker.port),
        "--controller-port", str(kafka_broker.controller_port),
        "--grpc-base-port", str(free_run(6)), "--metrics-base-port", str(free_run(5)), *flags,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "users start" in completed.stdout and "requests" in completed.stdout
    return completed


def test_demo_runs_the_loop_and_writes_its_report(kafka_broker: BrokerConfig, tmp_path: Path) -> None:
    model = tmp_path / "v0"
    save_policy(*build_default_policy(seed=0), model)
    out = tmp_path / "report"
    run_demo(kafka_broker, model, out, "--minutes", "1")

    report = json.loads((out / "report.json").read_text())
    assert report["warm_start_seconds"] == 0 and 55 <= report["seconds"] <= 300
    names = [v["version"] for v in report["versions"]]
    assert names[0] == "v0" and report["final"] in names
    for version in report["versions"]:
        assert set(version) >= {"version", "mean_reward", "win_rate_vs_v0", "win_rate_ci", "hallucination_rate",
                                "kl", "promoted"}
        low, high = version["win_rate_ci"]
        assert 0 <= low <= version["win_rate_vs_v0"] <= high <= 1
        assert 0 <= version["hallucination_rate"] <= 1 and version["samples"] == 16
        assert version["hallucination_by_kind"].keys() == {e.question.kind for e in held_out_examples(16)}
        assert version["size_bytes"] > 1_000_000  # the whole model, its processor files and manifest
        # Two of the 16 held-out questions ask whether an object is there: POPE's figures are over them.
        assert version["pope"]["questions"] == 2 and 0 <= version["pope"]["accuracy"] <= 1, version["pope"]
    assert report["versions"][0]["win_rate_vs_v0"] == 0.5  # v0 against itself: every scene a tie
    # Both front doors and conversations carried traffic, and nothing failed.
    assert report["conversations"] > 0 and 0 < report["http_requests"] < report["requests"], report
    assert report["failed_requests"] == 0 and report["feedback"] > 0
    freshness = report["freshness_seconds"]
    assert set(freshness) == {"median", "p90", "measured", "left_out", "passed_over"} and freshness["measured"] + freshness["left_out"] > 0
    # Every service, and the broker the fixture runs, sampled at idle and under load.
    memory = report["memory_mib"]
    assert set(memory) == {"feedback", "policy", "reward", "trainer", "rollout", "broker"}, memory
    assert all(0 < m["idle"] and 0 < m["load_median"] <= m["load_max"] for m in memory.values()), memory
    assert (out / "versions.png").stat().st_size > 0
    markdown = (out / "report.md").read_text()
    assert "## How these were measured" in markdown and "Freshness:" in markdown and "Resident memory" in markdown


@pytest.mark.parametrize(("family", "flags"), [("qwen2_5_omni", ("--spoken-share", "0.5")), ("idefics", ("--lora",))],
                         ids=["qwen2_5_omni-spoken", "idefics-lora"])
def test_the_whole_loop_runs_on_another_model_family(
    kafka_broker: BrokerConfig, tmp_path: Path, family: str, flags: tuple[str, ...]
) -> None:
    """Qwen2.5-Omni's thinker (3-D rope, dynamic resolution, audio) with half the questions asked aloud, and Idefics
    (Flamingo's gated cross-attention) as v0: versions are published, rolled out behind the canary and promoted, and
    no user request fails. Learning at this size is not the point. Idefics trains a LoRA adapter: its decoder holds
    its vision tower, which the adapter must leave out."""
    model = tmp_path / family
    TINY_CHECKPOINTS[family](model, 0)
    out = tmp_path / "report"
    completed = run_demo(kafka_broker, model, out, "--minutes", "4", "--versions", "1", *flags)

    report = json.loads((out / "report.json").read_text())
    assert [v["version"] for v in report["versions"]][:2] == ["v0", "v1"]
    # A version promoted: v1, or a later one where users rated v1 worse (at this size, learning is noise) and the
    # controller rolled it back.
    promoted = [entry for entry in report["timeline"] if entry["phase"] == "ROLLOUT_PHASE_PROMOTED"]
    assert promoted, report["timeline"]
    # Users compared the canary's answers with stable's directly (head-to-head answers in the canary's sessions).
    compared = promoted[0]["head_to_head"]
    assert compared is not None and compared["canary_wins"] + compared["stable_wins"] + compared["ties"] > 0, promoted[0]
    progress = [line for line in completed.stdout.splitlines() if "requests" in line and "failed" in line]
    assert progress and all("(failed 0," in line for line in progress), progress[-1:]
    assert report["failed_requests"] == 0 and report["conversations"] > 0 and report["http_requests"] > 0
    # The promoted version served canary traffic, and it was trained on feedback: that feedback's freshness was measured.
    assert report["freshness_seconds"]["measured"] > 0 and report["freshness_seconds"]["median"] > 0
    spoken = [version["spoken"] for version in report["versions"]]
    if "--spoken-share" in flags:
        # Spoken questions were served over both front doors without a failure, and the report judged every
        # version on the held-out questions asked aloud.
        assert 0 < report["spoken_requests"] < report["requests"] and report["synthesiser"] == available_synthesiser(), report
        assert all(s is not None and s["samples"] == 16 for s in spoken), spoken
        assert spoken[0]["win_rate_vs_v0"] == 0.5 and "spoken: hallucination rate" in (out / "report.md").read_text()
    else:
        assert report["spoken_requests"] == 0 and report["synthesiser"] is None and spoken == [None] * len(spoken)
    v1 = out / "work" / "models" / "policy" / "v1"
    assert (v1 / "adapter" / "adapter_config.json").exists() == ("--lora" in flags)
