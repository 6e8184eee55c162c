"""Resident memory of a local system's processes, read from /proc: once at idle, and every few seconds
under load (in a thread of its own while the simulated users run)."""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass
from pathlib import Path

from modalign.core import broker
from modalign.core.launch import LocalSystem
from modalign.core.processes import descendants

MIB = 1024 * 1024


@dataclass(frozen=True)
class ResidentMemory:
    """One process's resident set in MiB: at idle (services up, no users yet), and the median and max of
    the samples taken under load."""

    idle: float
    load_median: float
    load_max: float


def system_pids(system: LocalSystem, broker_config: broker.BrokerConfig | None) -> dict[str, int]:
    """The PID of every started service of system by its name, and the broker's as "broker" when one runs
    (it serves the system whether or not the system started it)."""
    pids = {process.name: process.pid for process in system.processes if process.pid is not None}
    broker_pid = None if broker_config is None else broker.running_pid(broker_config)
    return pids | ({"broker": broker_pid} if broker_pid is not None else {})


def rss_bytes(pid: int) -> int:
    """VmRSS of one process from /proc/PID/status; 0 once it is gone (or for a zombie, which has none)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((line for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return 0 if line is None else int(line.split()[1]) * 1024  # "VmRSS:   123456 kB"


def resident_mib(pids: dict[str, int]) -> dict[str, float]:
    """Per name, the resident memory of the process and of its descendants (a service that runs its work in
    child processes, torchrun's workers say, is charged with them), in MiB."""
    return {name: sum(rss_bytes(p) for p in [pid, *descendants(pid)]) / MIB for name, pid in pids.items()}


class MemorySampler:
    """Samples resident_mib(pids) every every_s seconds between entering and leaving it, in a thread."""

    def __init__(self, pids: dict[str, int], every_s: float = 5.0) -> None:
        self.pids = pids
        self.every_s = every_s
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        # Waits first: a sample taken the moment the users start would be an idle one.
        while not self._stop.wait(self.every_s):
            self.samples.append(resident_mib(self.pids))


def summarise(idle: dict[str, float], samples: list[dict[str, float]]) -> dict[str, ResidentMemory]:
    """Per process sampled at idle, its idle figure and the median and max of its samples under load
    (its idle figure again for both when the load was too short for a sample)."""
    summary = {}
    for name, at_idle in idle.items():
        loaded = [sample[name] for sample in samples] or [at_idle]
        summary[name] = ResidentMemory(round(at_idle, 1), round(statistics.median(loaded), 1), round(max(loaded), 1))
    return summary
