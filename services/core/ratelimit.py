"""Per-user rate limits: a token bucket per end user, so one user cannot flood generation or feedback.

A refused call is told when to retry: gRPC's RESOURCE_EXHAUSTED carries a google.rpc.RetryInfo detail
(as Google's APIs send it), HTTP's 429 a Retry-After header.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import Counter

from modalign.core.config import ConfigError

T = TypeVar("T")

LIMITED = Counter(
    "modalign_rate_limited_total",
    "Calls refused because their user was over the per-user rate limit, by API method.",
    ["method"],
)


@dataclass(frozen=True)
class RateLimit:
    """How often one end user may call."""

    per_second: float = 20.0
    """Calls one user may make per second, sustained; 0 turns the limit off."""
    burst: int = 40
    """Calls one user may make at once after a quiet spell (the bucket's size)."""

    def validate(self) -> None:
        if self.per_second < 0:
            raise ConfigError("per_second", f"0 (off) or more, got {self.per_second}")
        if self.per_second and self.burst < 1:
            raise ConfigError("burst", f"at least 1, got {self.burst}")


class PerUserLimiter:
    """A token bucket per user: each holds up to burst calls and refills at per_second. The buckets of
    the max_users users seen longest ago are forgotten first (a forgotten user starts again full), so
    memory stays bounded whatever the number of users."""

    def __init__(self, limit: RateLimit, max_users: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self._max_users = max_users
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # user -> (tokens, at)
        self._lock = threading.Lock()

    def wait_s(self, user: str) -> float:
        """Takes one call from user's bucket and returns 0, or returns how long until it would hold one
        (taking nothing). A call that names no user, or with the limit off, is not limited."""
        rate, burst = self._limit.per_second, float(self._limit.burst)
        if not rate or not user:
            return 0.0
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.pop(user, (burst, now))
            tokens = min(burst, tokens + (now - at) * rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / rate
            self._buckets[user] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > self._max_users:
                self._buckets.popitem(last=False)
            return wait


def limited_message(user: str, wait_s: float) -> str:
    return f"user_id: {user!r} is over its rate limit; retry in {wait_s:.2f} s"


def abort_with_retry_info(context: grpc.ServicerContext, message: str, wait_s: float) -> None:
    """Ends the RPC with RESOURCE_EXHAUSTED and a google.rpc.RetryInfo saying when to try again."""
    seconds = math.ceil(wait_s * 1000) / 1000
    delay = duration_pb2.Duration(seconds=int(seconds), nanos=int(round((seconds - int(seconds)) * 1e9)))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    context.abort_with_status(rpc_status.to_status(
        status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail])))


def retry_delay_s(error: grpc.RpcError) -> float | None:
    """The google.rpc.RetryInfo delay of a refusal (a per-user rate limit), or None if it carries none."""
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


def politely(call: Callable[..., T], request: Any, **options: Any) -> T:
    """call(request, **options), the client's side of the rate limit: each refusal that says when to retry
    is waited out, as a well-behaved client does; any other error is raised."""
    while True:
        try:
            return call(request, **options)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or (delay := retry_delay_s(error)) is None:
                raise
            time.sleep(delay)
