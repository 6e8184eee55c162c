"""Which policy version serves a request: stable and canary side by side, sticky per session.

A session's bucket is a hash of its session_id, the same on every replica, and a bucket below the
canary's weight goes to the canary. So a session stays on its version while the weights hold, every
replica agrees on it without talking to the others, and as the weight grows sessions only move from
stable to canary, never back and forth.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from modalign.core.versions import ACTIVE_PHASES
from modalign.policy.batcher import DynamicBatcher
from modalign.policy.engine import GenerationRequest, PolicyEngine, Sample
from modalign.v1 import events_pb2

log = logging.getLogger(__name__)

BUCKETS = 100


def session_bucket(session_id: str) -> int:
    """The session's bucket, 0 to 99; a request without a session gets a random one."""
    if not session_id:
        return random.randrange(BUCKETS)
    return int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Routes:
    """The versions served and the canary's share of sessions."""

    stable: str
    canary: str = ""
    canary_weight_percent: int = 0

    @classmethod
    def from_state(cls, state: events_pb2.RolloutState, default_stable: str) -> Routes:
        if state.pinned_version:
            return cls(stable=state.pinned_version)
        stable = state.stable_version or default_stable
        if state.canary_version and state.phase in ACTIVE_PHASES:
            return cls(stable, state.canary_version, min(state.canary_weight_percent, 100))
        return cls(stable)

    def version_for(self, bucket: int) -> str:
        return self.canary if self.canary and bucket < self.canary_weight_percent else self.stable

    def versions(self) -> list[str]:
        return [self.stable, self.canary] if self.canary else [self.stable]

    def weights(self) -> dict[str, int]:
        if not self.canary:
            return {self.stable: 100}
        return {self.stable: 100 - self.canary_weight_percent, self.canary: self.canary_weight_percent}


class VersionRouter:
    """One DynamicBatcher per version served; routes each request to one of them by its session.

    apply() loads any version it lacks before switching, so requests keep flowing on the old routes
    meanwhile; a version promoted from canary to stable keeps its batcher (nothing reloads). Batchers
    no longer routed to finish their queued requests and stop. A canary that fails to load gets no
    traffic (its share goes to stable); a stable that fails to load leaves the routes as they were.
    """

    def __init__(
        self,
        initial: PolicyEngine,
        load_engine: Callable[[str], PolicyEngine],
        make_batcher: Callable[[PolicyEngine], DynamicBatcher],
        on_routes: Callable[[Routes, Routes], None] = lambda old, new: None,
    ) -> None:
        self._load_engine = load_engine
        self._make_batcher = make_batcher
        self._on_routes = on_routes
        self._routes = Routes(stable=initial.policy_version)
        self._batchers = {initial.policy_version: make_batcher(initial)}
        self._lock = threading.Lock()
        self._apply_lock = threading.Lock()

    @property
    def routes(self) -> Routes:
        return self._routes

    def submit(self, session_id: str, request: GenerationRequest) -> tuple[str, Future[list[Sample]]]:
        """Queues the request on its session's version; returns that version and the samples' future."""
        bucket = session_bucket(session_id)
        # Under the lock so that apply() cannot close the chosen batcher between choice and submit.
        with self._lock:
            version = self._routes.version_for(bucket)
            return version, self._batchers[version].submit(request)

    def apply(self, wanted: Routes) -> Routes:
        """Serves `wanted` once every version in it is loaded; returns the routes now in force."""
        with self._apply_lock:
            loaded = {}
            for version in wanted.versions():
                if version in self._batchers:
                    continue
                try:
                    loaded[version] = self._make_batcher(self._load_engine(version))
                except Exception:
                    log.exception("could not load policy %s", version)
            available = self._batchers.keys() | loaded.keys()
            if wanted.stable not in available:
                for batcher in loaded.values():
                    batcher.close()
                return self._routes
            if wanted.canary and wanted.canary not in available:
                wanted = Routes(stable=wanted.stable)
            with self._lock:
                old = self._routes
                self._batchers.update(loaded)
                self._routes = wanted
                dropped = [self._batchers.pop(v) for v in list(self._batchers) if v not in wanted.versions()]
            for batcher in dropped:
                threading.Thread(target=batcher.close, name="batcher-drain", daemon=True).start()
            if old != wanted:
                log.info("routes: %s", wanted.weights())
                self._on_routes(old, wanted)
            return wanted

    def close(self) -> None:
        with self._lock:
            batchers = list(self._batchers.values())
        for batcher in batchers:
            batcher.close()
