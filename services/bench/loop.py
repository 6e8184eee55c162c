"""The online loop's freshness and memory, measured on `modalign demo`'s loop (modalign.demo.run.run_loop).

The loop runs with the demo's settings and v0 (the cached warm start), on a broker of its own and a fresh
work folder, both in a temporary directory and gone afterwards, without the demo's held-out evaluation:
- freshness_seconds: from a user's feedback to a version trained on it serving canary traffic
  (modalign.demo.freshness), median and p90 over the feedback a served version covers, and how many
  feedback records none covers (those that came after the last such version);
- memory_mib: per process (every service and the broker), resident memory at idle (services up, no users)
  and the median and max of samples every 5 s under the users' load.
There is no baseline to set beside these: they are reported as measured.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from modalign.core.broker import BrokerConfig
from modalign.core.processes import free_port, free_run
from modalign.demo.run import DemoConfig, Loop, run_loop, starting_policy

FULL_MINUTES = 4.0
"""The full run's loop: about six of the demo trainer's versions (one about every 40 s)."""
QUICK_MINUTES = 3.0
"""The quick run stops at its first promotion, a version that has served; this caps it when none comes."""


def loop_config(work: Path, quick: bool) -> DemoConfig:
    """The demo's defaults with its output, broker and ports its own: free ports, so that it runs beside
    a demo or a `modalign up`; quick, until the first version is promoted."""
    defaults = DemoConfig()
    broker = BrokerConfig(data_dir=work / "kafka", port=free_port(), controller_port=free_port())
    return replace(defaults, out=work / "demo", broker=broker, grpc_base_port=free_run(6), metrics_base_port=free_run(5),
                   minutes=QUICK_MINUTES if quick else FULL_MINUTES, versions=1 if quick else defaults.versions)


def measure_loop(quick: bool) -> dict:
    """Runs the demo's loop for a few minutes (quick: until the first promotion, at most QUICK_MINUTES) and
    returns its freshness_seconds, memory_mib and a description of its traffic (module docstring)."""
    with tempfile.TemporaryDirectory(prefix="modalign-bench-loop-") as work:
        config = loop_config(Path(work), quick)
        policy_model, _ = starting_policy(config)
        loop = run_loop(config, policy_model, stopping=[])
    return {"freshness_seconds": asdict(loop.freshness),
            "memory_mib": {name: asdict(memory) for name, memory in loop.memory.items()},
            "traffic": traffic(config, loop)}


def traffic(config: DemoConfig, loop: Loop) -> str:
    """What the loop carried, in words."""
    return (f"`modalign demo`'s loop ({config.algorithm}, {config.device}), {config.users} simulated users for"
            f" {loop.seconds:.0f} s: {loop.tally.requests} requests, {sum(loop.tally.feedback.values())} feedback,"
            f" {len(loop.published)} versions published, {loop.promoted} promoted")
