"""gRPC plumbing every modalign gRPC service shares: TLS, authentication, health checking, reflection
and request metrics; and the one way modalign's own clients dial a service."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from concurrent import futures
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram

from modalign.core.auth import Authenticator, Principal, Refused, acting_as, check
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


def build_server(
    address: str,
    register: Callable[[grpc.Server], None],
    service_names: Iterable[str],
    authenticator: Authenticator,
    access: Access,
    tls: TlsConfig | None = None,
    max_workers: int = 32,
    max_message_bytes: int = 64 * 1024 * 1024,
) -> tuple[grpc.Server, health.HealthServicer, int]:
    """A server (not yet started) with the servicer register adds, guarded by authenticator and access,
    with health and reflection; over TLS when tls is enabled. Returns it, its health servicer (every
    service starts NOT_SERVING until the caller marks it), and the bound port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[MetricsInterceptor(), AuthInterceptor(authenticator, access)],
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
