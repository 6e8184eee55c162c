"""`modalign bench --quick`: every measurement runs and writes its files (the timings are not checked:
a test machine is too noisy to judge them; docs/benchmarks.md records real runs). It starts its own
broker, services and the demo's loop, so it is an integration test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modalign.bench.run import main

pytestmark = pytest.mark.integration

FLAT = ("serving_vs_hf_generate_poisson_c1", "serving_vs_hf_generate_poisson_c8", "serving_vs_hf_generate_poisson_c32",
        "serving_vs_hf_generate_static", "ingestion_vs_raw_producer", "rm_training_vs_trl", "policy_grpc_vs_in_process",
        "policy_http_vs_in_process", "reward_oip_vs_in_process")
POLICY_UPDATES = ("dpo", "rloo")
SERVICES = ("policy", "feedback", "reward", "trainer", "rollout")


def test_bench_quick_writes_every_ratio_and_its_section(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["--quick", "--out", str(out)]) == 0

    result = json.loads((out / "bench.json").read_text())
    ratios = result["ratios"]
    assert set(FLAT) <= set(ratios) and all(ratios[name] > 0 for name in FLAT)
    assert set(POLICY_UPDATES) <= set(ratios["policy_update_vs_trl"])  # an object keyed by algorithm
    assert all(ratio > 0 for ratio in ratios["policy_update_vs_trl"].values())
    measured = [*FLAT, *(f"policy_update_vs_trl.{name}" for name in ratios["policy_update_vs_trl"])]
    assert set(result["details"]) == set(measured)
    for name in measured:  # both sides measured (serving: each request answered alike, or bench fails)
        detail = result["details"][name]
        assert detail["baseline"]["per_second"] and detail["modalign"]["per_second"] and detail["unit"]
        assert detail["modalign"]["p99_ms"] >= detail["modalign"]["p50_ms"] > 0
    assert "all at once" in result["details"]["serving_vs_hf_generate_static"]["traffic"]  # one static batch
    assert result["command"] == f"modalign bench --quick --out {out}"

    # The loop ran: some feedback reached a version that then served, and every service's memory was sampled.
    assert result["freshness_seconds"] > 0 and result["freshness"]["measured"] > 0
    assert set(SERVICES) <= set(result["memory_mib"])
    assert all(0 < memory["idle"] and 0 < memory["load_median"] <= memory["load_max"]
               for memory in result["memory_mib"].values())

    section = (out / "bench.md").read_text()
    assert result["command"] in section and all(f"| {name} |" in section for name in measured)
    assert "Freshness" in section and all(f"| {name} |" in section for name in SERVICES)
