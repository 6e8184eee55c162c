"""`modalign bench --quick`: every measurement runs and writes its files (the timings are not checked:
a test machine is too noisy to judge them; docs/benchmarks.md records real runs). It starts its own
broker and feedback service, so it is an integration test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modalign.bench.run import NOT_MEASURED, main

pytestmark = pytest.mark.integration

SERVING = ("serving_vs_hf_generate_poisson_c32", "serving_vs_hf_generate_static")
MEASURED = (*SERVING, "ingestion_vs_raw_producer")


def test_bench_quick_writes_every_ratio_and_its_section(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["--quick", "--out", str(out)]) == 0

    result = json.loads((out / "bench.json").read_text())
    assert set(result["ratios"]) == set(MEASURED)
    assert all(ratio > 0 for ratio in result["ratios"].values())
    for name in MEASURED:  # both sides measured (serving: each request answered alike, or bench fails)
        detail = result["details"][name]
        assert detail["baseline"]["per_second"] and detail["modalign"]["per_second"] and detail["unit"]
        assert detail["modalign"]["p99_ms"] >= detail["modalign"]["p50_ms"] > 0
    assert "all at once" in result["details"]["serving_vs_hf_generate_static"]["traffic"]  # one static batch
    assert set(result["not_measured"]) == set(NOT_MEASURED)
    assert result["command"] == f"modalign bench --quick --out {out}"

    section = (out / "bench.md").read_text()
    assert result["command"] in section and all(f"| {name} |" in section for name in MEASURED)
