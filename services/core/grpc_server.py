"""gRPC plumbing every modalign gRPC service shares: health checking, reflection and request metrics."""

from __future__ import annotations

import time
from concurrent import futures
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram

HANDLED = Counter(
    "modalign_grpc_server_handled_total",
    "RPCs completed on the server, by method and gRPC status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
HANDLING_SECONDS = Histogram(
    "modalign_grpc_server_handling_seconds",
    "Time from receiving an RPC to sending its last response.",
    ["grpc_service", "grpc_method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC, streaming ones included, by its final status code."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")

        def record(context: grpc.ServicerContext, started: float, failed: bool) -> None:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            HANDLED.labels(service, method, code.name).inc()
            HANDLING_SECONDS.labels(service, method).observe(time.perf_counter() - started)

        def wrap_unary(behaviour: Callable) -> Callable:
            def run(request_or_iterator, context):
                started, failed = time.perf_counter(), True
                try:
                    response = behaviour(request_or_iterator, context)
                    failed = False
                    return response
                finally:
                    record(context, started, failed)
            return run

        def wrap_stream(behaviour: Callable) -> Callable:
            def run(request_or_iterator, context):
                started, failed = time.perf_counter(), True
                try:
                    yield from behaviour(request_or_iterator, context)
                    failed = False
                finally:
                    record(context, started, failed)
            return run

        if handler.unary_unary:
            return handler._replace(unary_unary=wrap_unary(handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=wrap_unary(handler.stream_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=wrap_stream(handler.unary_stream))
        return handler._replace(stream_stream=wrap_stream(handler.stream_stream))


def build_server(
    address: str,
    register: Callable[[grpc.Server], None],
    service_names: Iterable[str],
    max_workers: int = 32,
    max_message_bytes: int = 64 * 1024 * 1024,
) -> tuple[grpc.Server, health.HealthServicer, int]:
    """A server (not yet started) with the servicer register adds, health and reflection; returns it, its
    health servicer (every service starts NOT_SERVING until the caller marks it), and the bound port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[MetricsInterceptor()],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    register(server)
    names = list(service_names)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind gRPC server to {address}")
    return server, health_servicer, port


def mark_serving(health_servicer: health.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        health_servicer.set(name, status)


def serve_until_signalled(
    server: grpc.Server,
    health_servicer: health.HealthServicer,
    service_names: Iterable[str],
    grace_s: float = 10.0,
) -> None:
    """Starts the server, reports SERVING, and on SIGTERM or SIGINT reports NOT_SERVING and lets
    in-flight RPCs finish for up to grace_s before returning."""
    import signal
    import threading

    names = list(service_names)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server.start()
    mark_serving(health_servicer, names, True)
    stopping.wait()
    mark_serving(health_servicer, names, False)
    server.stop(grace_s).wait()

