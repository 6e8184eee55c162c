"""Resident memory from /proc (modalign.demo.memory)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from modalign.demo.memory import MemorySampler, ResidentMemory, resident_mib, rss_bytes, summarise


def test_a_process_is_charged_with_its_children() -> None:
    # Written bytes, so that every page is resident (a zeroed allocation may not be).
    child = subprocess.Popen([sys.executable, "-c", "import time; b = b'x' * (64 << 20); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while rss_bytes(child.pid) < 64 << 20:
            assert time.monotonic() < deadline, "the child never held its 64 MiB"
            time.sleep(0.1)
        alone = rss_bytes(os.getpid()) / (1 << 20)
        assert resident_mib({"me": os.getpid()})["me"] >= alone + 64
    finally:
        child.kill()
        child.wait()
    assert rss_bytes(child.pid) == 0  # gone


def test_load_figures_are_the_median_and_max_of_the_samples() -> None:
    with MemorySampler({"me": os.getpid()}, every_s=0.05) as sampler:
        time.sleep(0.3)
    assert sampler.samples and all(sample["me"] > 0 for sample in sampler.samples)
    summary = summarise({"a": 100.0, "b": 50.0}, [{"a": 120.0, "b": 50.0}, {"a": 110.0, "b": 70.0}, {"a": 300.04, "b": 60.0}])
    assert summary == {"a": ResidentMemory(100.0, 120.0, 300.0), "b": ResidentMemory(50.0, 60.0, 70.0)}
    assert summarise({"a": 100.0}, []) == {"a": ResidentMemory(100.0, 100.0, 100.0)}
