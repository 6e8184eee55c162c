"""Dynamic batching for the reward service: the rows of concurrent scoring requests in one forward pass.

A forward pass of 16 rows costs far less than 16 passes of one (on this project's 2-core machine, a
third), and the rollout controller and other callers each send a few rows at a time. The batcher's
worker takes the oldest waiting request and, for up to max_wait_ms, the ones arriving after it while
their rows fit max_batch_rows, scores them together, and gives each caller its own rows' scores with
the version of the model that scored them (one snapshot per pass, so a reload never splits a request).
A row scores as it does alone (tests/families: a batch scores as each row alone). If a merged pass
fails, each request of it is scored alone, so that a bad request fails only its own caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from modalign.reward.contract import ScoreBatch

log = logging.getLogger(__name__)

Score = Callable[[ScoreBatch], tuple[torch.Tensor, str]]
"""Scores a batch's rows with the model being served: (scores [rows], its version)."""


@dataclass
class _Waiting:
    batch: ScoreBatch
    future: Future[tuple[torch.Tensor, str]]


class ScoringBatcher:
    def __init__(self, score: Score, max_batch_rows: int = 64, max_wait_ms: float = 2.0,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be at least 1")
        self._score, self.max_batch_rows, self.max_wait_s, self.on_batch = score, max_batch_rows, max_wait_ms / 1000, on_batch
        self._queue: deque[_Waiting] = deque()
        self._closed = False
        self._cond = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
        self._worker.start()

    def submit(self, batch: ScoreBatch) -> Future[tuple[torch.Tensor, str]]:
        """The request's scores and the version that scored them, once its pass has run."""
        future: Future[tuple[torch.Tensor, str]] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the scoring batcher is closed")
            self._queue.append(_Waiting(batch, future))
            self._cond.notify()
        return future

    def close(self) -> None:
        """Scores what is waiting, then stops."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join()

    def _next(self) -> list[_Waiting] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait_s
            while not self._closed and self._rows(self._queue) < self.max_batch_rows \
                    and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            taken, rows = [], 0
            while self._queue and (not taken or rows + len(self._queue[0].batch.responses) <= self.max_batch_rows):
                waiting = self._queue.popleft()
                rows += len(waiting.batch.responses)
                taken.append(waiting)
            return taken

    @staticmethod
    def _rows(queue: deque[_Waiting]) -> int:
        return sum(len(waiting.batch.responses) for waiting in queue)

    def _run(self) -> None:
        while (taken := self._next()) is not None:
            if len(taken) == 1:
                self._score_alone(taken[0])
                continue
            merged = ScoreBatch([p for w in taken for p in w.batch.prompts], [i for w in taken for i in w.batch.images],
                                [r for w in taken for r in w.batch.responses], [a for w in taken for a in w.batch.audio])
            try:
                scores, version = self._score(merged)
            except Exception:
                log.info("a merged pass of %d requests failed: scoring each alone", len(taken), exc_info=True)
                for waiting in taken:
                    self._score_alone(waiting)
                continue
            self._observe(len(merged.responses))
            start = 0
            for waiting in taken:
                rows = len(waiting.batch.responses)
                waiting.future.set_result((scores[start:start + rows], version))
                start += rows

    def _score_alone(self, waiting: _Waiting) -> None:
        try:
            result = self._score(waiting.batch)
        except Exception as error:
            waiting.future.set_exception(error)
            return
        self._observe(len(waiting.batch.responses))
        waiting.future.set_result(result)

    def _observe(self, rows: int) -> None:
        if self.on_batch is not None:
            self.on_batch(rows)
