"""Which policy version serves a request: stable and canary side by side, sticky per session.

A session's bucket is a hash of its session_id, the same on every replica, and a bucket below the
canary's weight goes to the canary. So a session stays on its version while the weights hold, every
replica agrees on it without talking to the others, and as the weight grows sessions only move from
stable to canary, never back and forth.

Head-to-head (interleaving): a share of the canary's requests that ask for several candidates get half
of them from stable, so a user who prefers one answer to the other compares the two versions directly.

LoRA adapter versions on one base share one engine and its batcher (engine.py): a canary, a promotion
and a rollback among them are pointer switches, and the previous stable adapter stays loaded, unrouted,
so that going back to it is one too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, TypeVar

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


C = TypeVar("C", bound=Callable)


class Joined(Future):
    """The samples of one request split over several batchers, in order: done once every part is,
    failed if any part failed, cancelled only as a whole (cancel() cancels every part; it succeeds when
    none had started, else the request ends cancelled once the running parts finish)."""

    def __init__(self, parts: list[Future[list[Sample]]]) -> None:
        super().__init__()
        self._parts = parts
        self._lock = threading.Lock()
        for part in parts:
            part.add_done_callback(self._part_done)

    def cancel(self) -> bool:
        for part in self._parts:
            part.cancel()
        return self.cancelled()

    def _part_done(self, _: Future) -> None:
        with self._lock:  # the parts finish on their batchers' threads, maybe at once
            if self.done() or not all(part.done() for part in self._parts):
                return
            if any(part.cancelled() for part in self._parts):
                super().cancel()
            elif failed := next((part.exception() for part in self._parts if part.exception()), None):
                self.set_exception(failed)
            else:
                self.set_result([sample for part in self._parts for sample in part.result()])


def _shifted(callback: C | None, offset: int) -> C | None:
    """A per-candidate callback (index first) for a part whose candidates start at index offset."""
    if callback is None or offset == 0:
        return callback
    return lambda index, *rest: callback(index + offset, *rest)  # type: ignore[return-value]


class VersionRouter:
    """One DynamicBatcher per engine, an engine per full version or per base of adapter versions;
    routes each request to its session's version.

    apply() loads any version it lacks before switching, so requests keep flowing on the old routes
    meanwhile; a version promoted from canary to stable keeps its batcher (nothing reloads). Batchers
    no longer routed to finish their queued requests and stop; an adapter no longer routed (but the
    previous stable's) is removed from its engine once its queued requests are answered. A canary that
    fails to load gets no traffic (its share goes to stable); a stable that fails to load leaves the
    routes as they were. load_engine(version) returns an engine that serves version: a new one, or one
    already held that it added the version's adapter to.
    """

    def __init__(
        self,
        initial: PolicyEngine,
        load_engine: Callable[[str], PolicyEngine],
        make_batcher: Callable[[PolicyEngine], DynamicBatcher],
        on_routes: Callable[[Routes, Routes], None] = lambda old, new: None,
        head_to_head_percent: int = 0,
    ) -> None:
        self._load_engine = load_engine
        self._head_to_head_percent = head_to_head_percent
        self._make_batcher = make_batcher
        self._on_routes = on_routes
        self._routes = Routes(stable=initial.policy_version)
        self._batchers = {initial.policy_version: make_batcher(initial)}
        """The batcher of each version loaded: routed, or the previous stable adapter."""
        self._previous_stable = ""
        self._removals: dict[str, object] = {}
        """Adapters due to be removed once their queued requests are answered, each with its token: a
        version routed again before then cancels its removal."""
        self._lock = threading.Lock()
        self._apply_lock = threading.Lock()

    @property
    def routes(self) -> Routes:
        return self._routes

    def submit(self, session_id: str, request: GenerationRequest) -> tuple[str, Future[list[Sample]]]:
        """Queues the request on its session's version; returns that version and the samples' future.
        A head-to-head request is queued on both versions; its samples name each one's own version."""
        bucket = session_bucket(session_id)
        # Under the lock so that apply() cannot close the chosen batcher between choice and submit.
        with self._lock:
            routes = self._routes
            version = routes.version_for(bucket)
            if version == routes.canary and request.n >= 2 and random.randrange(100) < self._head_to_head_percent:
                return version, self._head_to_head(request, routes)
            return version, self._batchers[version].submit(dataclasses.replace(request, version=version))

    def _head_to_head(self, request: GenerationRequest, routes: Routes) -> Joined:
        """Half the candidates (rounded up) from one of canary and stable, drawn at random so that
        neither always comes first, the rest from the other."""
        first, second = random.sample([routes.canary, routes.stable], 2)
        split = (request.n + 1) // 2
        parts: list[Future[list[Sample]]] = []
        try:
            for version, offset, n in ((first, 0, split), (second, split, request.n - split)):
                parts.append(self._batchers[version].submit(dataclasses.replace(
                    request, n=n, version=version, on_token=_shifted(request.on_token, offset),
                    on_finish=_shifted(request.on_finish, offset))))
        except Exception:
            for part in parts:
                part.cancel()
            raise
        return Joined(parts)

    def apply(self, wanted: Routes) -> Routes:
        """Serves `wanted` once every version in it is loaded; returns the routes now in force."""
        with self._apply_lock:
            loaded: dict[str, DynamicBatcher] = {}
            for version in wanted.versions():
                with self._lock:
                    self._removals.pop(version, None)
                if version in self._batchers:
                    continue
                try:
                    loaded[version] = self._batcher_of(self._load_engine(version), loaded)
                except Exception:
                    log.exception("could not load policy %s", version)
            available = self._batchers.keys() | loaded.keys()
            if wanted.stable not in available:
                self._release(loaded, keep=self._batchers)
                return self._routes
            if wanted.canary and wanted.canary not in available:
                wanted = Routes(stable=wanted.stable)
            with self._lock:
                old = self._routes
                self._batchers.update(loaded)
                self._routes = wanted
                if old.stable != wanted.stable:
                    self._previous_stable = old.stable
                kept = {v: b for v, b in self._batchers.items() if v in wanted.versions()}
                previous = self._batchers.get(self._previous_stable)
                if previous is not None and previous.engine.policy_version != self._previous_stable \
                        and previous in kept.values():  # an adapter on a base still served: kept, cheap
                    kept[self._previous_stable] = previous
                dropped = {v: b for v, b in self._batchers.items() if v not in kept}
                self._batchers = kept
            self._release(dropped, keep=kept)
            if old != wanted:
                log.info("routes: %s", wanted.weights())
                self._on_routes(old, wanted)
            return wanted

    def _batcher_of(self, engine: PolicyEngine, loaded: dict[str, DynamicBatcher]) -> DynamicBatcher:
        """The batcher of engine: the one it has already (it serves another version), or a new one."""
        for batcher in [*self._batchers.values(), *loaded.values()]:
            if batcher.engine is engine:
                return batcher
        return self._make_batcher(engine)

    def _release(self, dropped: dict[str, DynamicBatcher], keep: dict[str, DynamicBatcher]) -> None:
        """Stops serving the dropped versions: a batcher no kept version uses finishes its queued
        requests and stops; an adapter on a batcher still in use is removed after its queued requests."""
        still_used = {id(b) for b in keep.values()}
        closing = {id(b): b for b in dropped.values() if id(b) not in still_used}
        for batcher in closing.values():
            threading.Thread(target=batcher.close, name="batcher-drain", daemon=True).start()
        for version, batcher in dropped.items():
            if id(batcher) in still_used and batcher.engine.policy_version != version:
                token = object()
                with self._lock:
                    self._removals[version] = token
                batcher.after_queued(lambda version=version, token=token, engine=batcher.engine:
                                     self._remove_adapter(engine, version, token))

    def _remove_adapter(self, engine: PolicyEngine, version: str, token: object) -> None:
        with self._lock:  # so that apply() cannot route to version again meanwhile
            if self._removals.get(version) is token:
                del self._removals[version]
                engine.remove_adapter(version)
                log.info("policy %s: adapter removed", version)

    def close(self) -> None:
        with self._lock:
            batchers = {id(b): b for b in self._batchers.values()}
        for batcher in batchers.values():
            batcher.close()
