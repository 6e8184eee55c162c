"""gRPC plumbing every modalign gRPC service shares: TLS, authentication, health checking, reflection
and request metrics; and the one way modalign's own clients dial a service."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, Histogram

from modalign.core.auth import Authenticator, Principal, Refused, acting_as, check
from modalign.core.config import ConfigError
from modalign.core.tls import ClientTls, TlsConfig, grpc_server_credentials

log = logging.getLogger(__name__)

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
IN_FLIGHT = Gauge(
    "modalign_grpc_server_in_flight",
    "RPCs being served now, by service: against --grpc.max-workers, how busy the server is. (A call refused "
    "for --grpc.max-concurrent-rpcs never reaches a handler and is counted by its client only.)",
    ["grpc_service"],
)


def rewrapped(handler: grpc.RpcMethodHandler, wrap_unary: Callable, wrap_stream: Callable) -> grpc.RpcMethodHandler:
    """handler with its behaviour wrapped: by wrap_unary where it answers once, wrap_stream where it streams."""
    if handler.unary_unary:
        return handler._replace(unary_unary=wrap_unary(handler.unary_unary))
    if handler.stream_unary:
        return handler._replace(stream_unary=wrap_unary(handler.stream_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=wrap_stream(handler.unary_stream))
    return handler._replace(stream_stream=wrap_stream(handler.stream_stream))


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

        in_flight = IN_FLIGHT.labels(service)

        def wrap_unary(behaviour: Callable) -> Callable:
            def run(request_or_iterator, context):
                started, failed = time.perf_counter(), True
                in_flight.inc()
                try:
                    response = behaviour(request_or_iterator, context)
                    failed = False
                    return response
                finally:
                    in_flight.dec()
                    record(context, started, failed)
            return run

        def wrap_stream(behaviour: Callable) -> Callable:
            def run(request_or_iterator, context):
                started, failed = time.perf_counter(), True
                in_flight.inc()
                try:
                    yield from behaviour(request_or_iterator, context)
                    failed = False
                finally:
                    in_flight.dec()
                    record(context, started, failed)
            return run

        return rewrapped(handler, wrap_unary, wrap_stream)


Access = Mapping[str, Collection[str]]
"""The roles that may call each method, by its full name ("/modalign.v1.RolloutService/Pin")."""

def access_for(service, roles: Collection[str], **per_method: Collection[str]) -> Access:
    """Access to every method of service (a ServiceDescriptor): roles, or per_method's for the methods it names."""
    unknown = set(per_method) - set(service.methods_by_name)
    if unknown:
        raise ValueError(f"{service.full_name} has no method {', '.join(sorted(unknown))}")
    return {f"/{service.full_name}/{name}": frozenset(per_method.get(name, roles)) for name in service.methods_by_name}


PUBLIC_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")
"""Open to every caller: probes (a kubelet sends no token) and schema discovery, which steer nothing."""


def caller(authenticator: Authenticator, allowed: Collection[str], method: str, context) -> Principal:
    """The principal of a gRPC call (its bearer token, else its verified client certificate), if it may
    call method; raises Refused otherwise. context: a sync or an asyncio ServicerContext."""
    metadata = dict(context.invocation_metadata() or ())
    names = context.auth_context().get("x509_common_name") or [None]
    certificate = names[0].decode() if isinstance(names[0], bytes) else None
    return check(authenticator, allowed, method, metadata.get("authorization"), certificate)


def refused_code(refusal: Refused) -> grpc.StatusCode:
    return grpc.StatusCode.UNAUTHENTICATED if refusal.unauthenticated else grpc.StatusCode.PERMISSION_DENIED


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses a call without a credential (UNAUTHENTICATED) or whose principal holds none of its method's
    roles (PERMISSION_DENIED) before the service sees it, and runs the service as that principal
    (modalign.core.auth.current_principal). A method missing from access is refused to everyone."""

    def __init__(self, authenticator: Authenticator, access: Access) -> None:
        self._authenticator = authenticator
        self._access = access

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.lstrip("/").rpartition("/")[0] in PUBLIC_SERVICES:
            return handler
        allowed = self._access.get(method, ())
        authenticator = self._authenticator

        def admit(context: grpc.ServicerContext):
            try:
                return acting_as(caller(authenticator, allowed, method, context))
            except Refused as refusal:
                context.abort(refused_code(refusal), str(refusal))

        def wrap_unary(behaviour: Callable) -> Callable:
            def run(request_or_iterator, context):
                admit(context)
                return behaviour(request_or_iterator, context)
            return run

        def wrap_stream(behaviour: Callable) -> Callable:
            def run(request_or_iterator, context):
                admit(context)
                yield from behaviour(request_or_iterator, context)
            return run

        return rewrapped(handler, wrap_unary, wrap_stream)


@dataclass(frozen=True)
class GrpcLimits:
    """What a gRPC server takes on at once, and for how long: past a bound a caller is refused at once
    (RESOURCE_EXHAUSTED), never left waiting in an unbounded queue."""

    max_workers: int = 32
    """Threads serving RPCs: the most RPCs running at once."""
    max_concurrent_rpcs: int = 64
    """RPCs running or waiting for a thread at once; past it a call gets RESOURCE_EXHAUSTED at once."""
    max_message_mib: float = 1.0
    """Largest request or response message, MiB; a larger request is refused with RESOURCE_EXHAUSTED
    before it is read."""
    keepalive_seconds: float = 60.0
    """Idle connections are pinged this often, so a client that vanished is noticed and its calls end."""
    max_connection_age_seconds: float = 900.0
    """A connection is closed (gracefully: calls on it finish) after this long, so clients reconnect and
    load spreads to replicas started since."""
    max_connection_age_grace_seconds: float = 60.0
    """How long calls on a connection closed for its age may still run."""

    def validate(self) -> None:
        if self.max_workers < 1:
            raise ConfigError("max_workers", f"must be at least 1, not {self.max_workers}")
        if self.max_concurrent_rpcs < self.max_workers:
            raise ConfigError("max_concurrent_rpcs",
                              f"{self.max_concurrent_rpcs} is below max_workers {self.max_workers}: threads would stay idle")
        if self.max_message_mib <= 0:
            raise ConfigError("max_message_mib", f"must be positive, not {self.max_message_mib}")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mib * 1024 * 1024)

    def server_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.max_connection_age_ms", int(self.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(self.max_connection_age_grace_seconds * 1000)),
            # Clients may ping idle connections as often as every 10 s (gRPC's default refuses any ping
            # more often than 5 min without calls, and closes the connection of a client that does).
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]


def build_server(
    address: str,
    register: Callable[[grpc.Server], None],
    service_names: Iterable[str],
    authenticator: Authenticator,
    access: Access,
    tls: TlsConfig | None = None,
    limits: GrpcLimits = GrpcLimits(),
) -> tuple[grpc.Server, health.HealthServicer, int]:
    """A server (not yet started) with the servicer register adds, guarded by authenticator and access,
    with health and reflection, within limits; over TLS when tls is enabled. Returns it, its health
    servicer (every service starts NOT_SERVING until the caller marks it), and the bound port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.max_workers),
        interceptors=[MetricsInterceptor(), AuthInterceptor(authenticator, access)],
        options=limits.server_options(),
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
    )
    register(server)
    names = list(service_names)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if tls is not None and tls.enabled:
        port = server.add_secure_port(address, grpc_server_credentials(tls))
    else:
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



class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer TOKEN` to every call (over plaintext too, which gRPC's own call
    credentials refuse: the local system may run without TLS)."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        # grpc hands interceptors its own namedtuple of call details.
        return details._replace(metadata=[*(details.metadata or []), self._metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


def dial(address: str, token: str = "", tls: ClientTls | None = None) -> grpc.Channel:
    """A channel to a modalign service: over TLS as tls says (plaintext without it), every call
    carrying token when given."""
    credentials = tls.credentials() if tls is not None else None
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    return grpc.intercept_channel(channel, _Bearer(token)) if token else channel
