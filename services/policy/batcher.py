"""The dynamic batcher: merges a server's concurrent requests into batches for one PolicyEngine."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from modalign.policy.engine import GenerationRequest, PolicyEngine, Sample

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """submit() after close()."""


class BatcherOverloaded(RuntimeError):
    """submit() while max_pending_rows candidates are already waiting (a server answers RESOURCE_EXHAUSTED)."""


@dataclass
class _Pending:
    request: GenerationRequest
    future: Future[list[Sample]]


class DynamicBatcher:
    """Merges concurrent requests into batches for one PolicyEngine, on one worker thread.

    submit() returns a concurrent.futures.Future at once, so a caller chooses how to wait (with a
    deadline, or cancel() before its batch starts). The worker takes the oldest request, then waits up
    to max_wait_ms for more until max_batch_rows candidates are gathered (a request with more
    candidates than that runs alone), encodes each request (a bad one fails only its own future), and
    runs one generate. If the batch raises, that batch's futures get the exception; the worker goes on.
    One batcher serves one engine: one version, or several on one base (LoRA adapters), mixed in a batch;
    routing.VersionRouter holds one per engine.
    """

    def __init__(
        self,
        engine: PolicyEngine,
        max_batch_rows: int = 32,
        max_wait_ms: float = 5.0,
        max_pending_rows: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be at least 1")
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_pending_rows = max_pending_rows
        self.on_batch = on_batch
        self._engine = engine
        self._queue: deque[_Pending] = deque()
        self._pending_rows = 0
        self._submitted = self._finished = 0  # requests queued so far; requests whose batch has ended
        self._after: list[tuple[int, Callable[[], None]]] = []
        self._closed = False
        self._cond = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="policy-batcher", daemon=True)
        self._worker.start()

    @property
    def engine(self) -> PolicyEngine:
        return self._engine

    def submit(self, request: GenerationRequest) -> Future[list[Sample]]:
        """Queue a request; the future resolves to its n samples, or to the error that stopped them."""
        future: Future[list[Sample]] = Future()
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            if self.max_pending_rows is not None and self._pending_rows + request.n > self.max_pending_rows:
                raise BatcherOverloaded(f"{self._pending_rows} candidates already queued")
            self._queue.append(_Pending(request, future))
            self._submitted += 1
            self._pending_rows += request.n
            self._cond.notify()
        return future

    def after_queued(self, action: Callable[[], None]) -> None:
        """Runs action on the worker once every request queued so far has been answered (a version's
        adapter is removed after its last request, not under it)."""
        with self._cond:
            self._after.append((self._submitted, action))
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, finish the queued ones, and stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join(timeout)

    def _next_batch(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                if self._after:
                    return []  # nothing to generate, but actions waiting for their turn
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait_s
            while not self._closed and self._queued_rows_that_fit() < self.max_batch_rows:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, rows = [], 0
            while self._queue and (not batch or rows + self._queue[0].request.n <= self.max_batch_rows):
                pending = self._queue.popleft()
                rows += pending.request.n
                batch.append(pending)
            self._pending_rows -= rows
            return batch

    def _queued_rows_that_fit(self) -> int:
        rows = 0
        for pending in self._queue:
            if rows and rows + pending.request.n > self.max_batch_rows:
                return self.max_batch_rows  # the next batch is already full
            rows += pending.request.n
        return rows

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run_batch(batch)
            with self._cond:
                self._finished += len(batch)
            self._run_actions()
        self._run_actions(every=True)

    def _run_batch(self, batch: list[_Pending]) -> None:
        engine = self._engine
        # Skip callers that cancelled while queued; the rest can no longer cancel.
        batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
        runnable, encoded = [], []
        for pending in batch:
            try:
                encoded.append(engine.encode(pending.request))
                runnable.append(pending)
            except Exception as error:
                pending.future.set_exception(error)
        if not runnable:
            return
        if self.on_batch is not None:
            try:
                self.on_batch(sum(p.request.n for p in runnable))
            except Exception:
                log.exception("on_batch hook failed")
        try:
            results = engine.generate_encoded([p.request for p in runnable], encoded)
        except Exception as error:
            log.exception("generation batch of %d requests failed", len(runnable))
            for pending in runnable:
                pending.future.set_exception(error)
            return
        for pending, samples in zip(runnable, results):
            pending.future.set_result(samples)

    def _run_actions(self, every: bool = False) -> None:
        """The after_queued actions whose requests have all been answered (every: all of them)."""
        with self._cond:
            due = [action for mark, action in self._after if every or mark <= self._finished]
            self._after = [(mark, action) for mark, action in self._after if not (every or mark <= self._finished)]
        for action in due:
            try:
                action()
            except Exception:
                log.exception("an action after the queued requests failed")
