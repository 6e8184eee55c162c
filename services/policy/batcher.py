"""The dynamic batcher: a server's concurrent requests decoded together by one PolicyEngine, new ones
joining the running batch between its steps (continuous batching)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass

from modalign.policy.engine import GenerationRequest, PolicyEngine, RunningBatch, Sample
from modalign.policy.families import Inputs

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """submit() after close()."""


class BatcherOverloaded(RuntimeError):
    """submit() while max_pending_rows candidates are already waiting (a server answers RESOURCE_EXHAUSTED)."""


class CallerGone(CancelledError):
    """The request was cancelled while its rows were being decoded: they left the batch unfinished."""


class RequestFuture(Future):
    """A request's samples. cancel() while the request waits cancels it, as for any Future; while its
    rows are decoded, it abandons the request: the rows leave the running batch before its next step,
    freeing their places, and the future ends with CallerGone."""

    abandoned = False

    def cancel(self) -> bool:
        if super().cancel():
            return True
        if self.running():
            self.abandoned = True
        return False


@dataclass
class _Pending:
    request: GenerationRequest
    future: RequestFuture
    number: int
    """Its place in the order of submission."""
    encoded: Inputs | None = None

    @property
    def reserved_tokens(self) -> int:
        """Cache positions its candidates may take: the prompt plus max_new_tokens each (once encoded)."""
        assert self.encoded is not None
        return self.request.n * (self.encoded["input_ids"].shape[1] + self.request.params.max_new_tokens)


class DynamicBatcher:
    """Continuous batching of concurrent requests for one PolicyEngine, on one worker thread.

    submit() returns a concurrent.futures.Future at once, so a caller chooses how to wait (with a
    deadline, or cancel() before its request is taken up). The worker keeps one running batch
    (engine.RunningBatch) and, between two of its decoding steps, admits waiting requests: they are
    encoded (a bad one fails only its own future), prefilled together, and join the running rows;
    finished rows leave at every step, and each future resolves as soon as its last candidate ends.
    Admission goes in the order of submission while the candidates fit max_batch_rows and their
    reserved cache positions (prompt plus max_new_tokens, per candidate) fit max_batch_tokens; the
    oldest request that does not fit holds back the ones behind it, so a large request is not starved
    by small ones, and a request larger than either bound runs once nothing else does. With nothing
    running, the worker waits up to max_wait_ms for more requests to start with. Rows the engine cannot
    join to a running batch (families whose caches do not line up) wait for it to end. If a step
    raises, the futures of every running request get the exception; the worker goes on.

    A request cancelled while it runs leaves the batch before the next step (RequestFuture).

    One batcher serves one engine: one version, or several on one base (LoRA adapters), mixed in a
    batch; routing.VersionRouter holds one per engine.
    """

    def __init__(
        self,
        engine: PolicyEngine,
        max_batch_rows: int = 32,
        max_wait_ms: float = 5.0,
        max_pending_rows: int | None = None,
        on_batch: Callable[[int], None] | None = None,
        max_batch_tokens: int | None = None,
    ) -> None:
        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be at least 1")
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_pending_rows = max_pending_rows
        self.on_batch = on_batch
        self._engine = engine
        self._queue: deque[_Pending] = deque()
        self._pending_rows = 0
        self._submitted = 0
        self._open: set[int] = set()
        """Numbers of the requests submitted and not yet answered (queued or running)."""
        self._after: list[tuple[int, Callable[[], None]]] = []
        self._closed = False
        self._cond = threading.Condition()
        # The worker's own: the running batch, and its requests by id(request).
        self._running: RunningBatch | None = None
        self._answering: dict[int, _Pending] = {}
        self._worker = threading.Thread(target=self._run, name="policy-batcher", daemon=True)
        self._worker.start()

    @property
    def engine(self) -> PolicyEngine:
        return self._engine

    def submit(self, request: GenerationRequest) -> Future[list[Sample]]:
        """Queue a request; the future resolves to its n samples, or to the error that stopped them
        (see RequestFuture for cancelling it)."""
        future = RequestFuture()
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            if self.max_pending_rows is not None and self._pending_rows + request.n > self.max_pending_rows:
                raise BatcherOverloaded(f"{self._pending_rows} candidates already queued")
            self._queue.append(_Pending(request, future, self._submitted))
            self._open.add(self._submitted)
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

    # --- the worker -------------------------------------------------------------------------------

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            self._admit(taken)
            if self._running is not None:
                self._step()
            self._run_actions()
        self._run_actions(every=True)

    def _take(self) -> list[_Pending] | None:
        """The oldest waiting requests whose candidates fit beside the running rows (waiting for some
        when nothing runs); None once closed with nothing left."""
        with self._cond:
            if self._running is None:
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
            rows = len(self._running.rows) if self._running is not None else 0
            taken: list[_Pending] = []
            while self._queue and (rows == 0 or rows + self._queue[0].request.n <= self.max_batch_rows):
                pending = self._queue.popleft()
                rows += pending.request.n
                self._pending_rows -= pending.request.n
                taken.append(pending)
            return taken

    def _queued_rows_that_fit(self) -> int:
        rows = 0
        for pending in self._queue:
            if rows and rows + pending.request.n > self.max_batch_rows:
                return self.max_batch_rows  # the next batch is already full
            rows += pending.request.n
        return rows

    def _give_back(self, pendings: list[_Pending]) -> None:
        """Requests taken but not admitted: first in the queue again, in their order."""
        with self._cond:
            for pending in reversed(pendings):
                self._queue.appendleft(pending)
                self._pending_rows += pending.request.n

    def _admit(self, taken: list[_Pending]) -> None:
        """Encodes the taken requests and starts them, or joins them to the running batch, as far as
        they fit; gives back the rest."""
        engine, running = self._engine, self._running
        admitted: list[_Pending] = []
        reserved = sum(pending.reserved_tokens for pending in self._answering.values())
        for index, pending in enumerate(taken):
            if pending.future.abandoned:  # taken before and given back, then cancelled
                pending.future.set_exception(CallerGone("the caller went away before its rows started"))
                self._done(pending)
                continue
            if pending.encoded is None:  # else taken before and given back, already encoded
                if not pending.future.set_running_or_notify_cancel():
                    self._done(pending)  # cancelled while queued
                    continue
                try:
                    pending.encoded = engine.encode(pending.request)
                except Exception as error:
                    pending.future.set_exception(error)
                    self._done(pending)
                    continue
            candidates = admitted + [pending]
            fits = self.max_batch_tokens is None or reserved + pending.reserved_tokens <= self.max_batch_tokens
            if not (fits or (running is None and not admitted)) or not self._can_run_together(candidates):
                self._give_back(taken[index:])
                break
            admitted.append(pending)
            reserved += pending.reserved_tokens
        if not admitted:
            return
        try:
            batch = engine.start([p.request for p in admitted], [p.encoded for p in admitted])  # type: ignore[misc]
        except Exception as error:
            log.exception("prefill of %d requests failed", len(admitted))
            for pending in admitted:
                pending.future.set_exception(error)
                self._done(pending)
            return
        self._answering.update((id(pending.request), pending) for pending in admitted)
        if running is None:
            self._running = batch
        else:
            engine.join(running, batch)
        if self.on_batch is not None:
            try:
                self.on_batch(len(self._running.rows))  # type: ignore[union-attr]
            except Exception:
                log.exception("on_batch hook failed")

    def _can_run_together(self, candidates: list[_Pending]) -> bool:
        encoded = [p.encoded for p in candidates]
        if self._running is None:
            return len(self._engine.family.groups(encoded)) == 1  # type: ignore[arg-type]
        return self._engine.joinable(self._running, encoded)  # type: ignore[arg-type]

    def _step(self) -> None:
        assert self._running is not None
        gone = [pending for pending in self._answering.values() if pending.future.abandoned]
        if gone:
            self._engine.drop(self._running, [pending.request for pending in gone])
            for pending in gone:
                del self._answering[id(pending.request)]
                pending.future.set_exception(CallerGone("the caller went away while its rows were decoded: "
                                                        "they stopped, and nothing was logged"))
                self._done(pending)
            if not self._running.rows:
                self._running = None
                return
        try:
            finished = self._engine.step(self._running)
        except Exception as error:
            log.exception("a decoding step of %d requests failed", len(self._answering))
            for pending in self._answering.values():
                pending.future.set_exception(error)
                self._done(pending)
            self._answering.clear()
            self._running = None
            return
        for request, samples in finished:
            pending = self._answering.pop(id(request))
            pending.future.set_result(samples)
            self._done(pending)
        if not self._running.rows:
            self._running = None

    def _done(self, pending: _Pending) -> None:
        with self._cond:
            self._open.discard(pending.number)

    def _run_actions(self, every: bool = False) -> None:
        """The after_queued actions whose requests have all been answered (every: all of them)."""
        with self._cond:
            oldest_open = min(self._open, default=self._submitted)
            due = [action for mark, action in self._after if every or mark <= oldest_open]
            self._after = [(mark, action) for mark, action in self._after if not (every or mark <= oldest_open)]
        for action in due:
            try:
                action()
            except Exception:
                log.exception("an action after the queued requests failed")
