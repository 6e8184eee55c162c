"""KServe's ModelServer start-up with the listen host, TLS and authentication as parameters.

kserve 0.21 hard-codes its listen addresses (uvicorn host "0.0.0.0" in protocol/rest/server.py, gRPC
"[::]:port" in protocol/grpc/server.py) and offers no option for them, nor for authentication or gRPC
TLS. BoundModelServer replaces ModelServer.start, a copy of KServe's private start-up for one worker
(kserve==0.21.0 is pinned), so both listeners bind the host given by --host (loopback by default; a pod
passes 0.0.0.0), serve TLS with certificates re-read when they change, and let through only callers
whose role may make the call (modalign.core.auth): scoring needs the client or reader role, loading
and unloading models (KServe's repository extension) the operator role; health, readiness, metadata
and /metrics are open, for probes and scrapers.
"""

from __future__ import annotations

import asyncio
import json
import re
from concurrent import futures
from typing import Any

import grpc
import kserve
import kserve.model_server
from grpc import aio
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING, MAX_GRPC_MESSAGE_LENGTH
from kserve.logging import logger
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest.server import RESTServer

from modalign.core.auth import CLIENT, OPERATOR, READER, Authenticator, Refused, check
from modalign.core.grpc_server import caller, refused_code
from modalign.core.tls import TlsConfig, grpc_server_credentials, http_ssl_context

SCORING, ADMINISTERING = frozenset({CLIENT, READER}), frozenset({OPERATOR})
OPEN_PATHS = re.compile(
    r"^/(metrics|v2|v2/health/(live|ready)|v2/models/[^/]+(/versions/[^/]+)?(/ready)?|v1/models(/[^/:]+)?)?/?$"
)
"""Probes, scrapers and metadata: everything else on REST needs a role."""
SCORING_PATHS = re.compile(r"^/v[12]/models/[^/]+(/versions/[^/]+)?(/infer|:predict)$")
GRPC_SERVICE = "/inference.GRPCInferenceService/"
GRPC_ACCESS = {f"{GRPC_SERVICE}ModelInfer": SCORING, f"{GRPC_SERVICE}RepositoryModelLoad": ADMINISTERING,
               f"{GRPC_SERVICE}RepositoryModelUnload": ADMINISTERING}
"""Methods not named here (liveness, readiness, metadata) are open."""


class RequireRoles:
    """ASGI middleware: a REST call outside OPEN_PATHS needs a credential whose role may make it
    (scoring: client or reader; anything else: operator); 401 or 403 in KServe's error JSON otherwise."""

    def __init__(self, app: Any, authenticator: Authenticator) -> None:
        self._app = app
        self._authenticator = authenticator

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or OPEN_PATHS.match(path):
            return await self._app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        allowed = SCORING if SCORING_PATHS.match(path) else ADMINISTERING
        try:
            check(self._authenticator, allowed, f"{scope['method']} {path}", headers.get("authorization"))
        except Refused as refusal:
            status = 401 if refusal.unauthenticated else 403
            body = json.dumps({"error": str(refusal)}).encode()
            extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), *extra]})
            await send({"type": "http.response.body", "body": body})
            return
        await self._app(scope, receive, send)


class _AuthInterceptor(aio.ServerInterceptor):
    """The asyncio twin of modalign.core.grpc_server.AuthInterceptor, for KServe's aio gRPC server."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        allowed = GRPC_ACCESS.get(method)
        if handler is None or allowed is None or not handler.unary_unary:
            return handler
        behaviour, authenticator = handler.unary_unary, self._authenticator

        async def guarded(request, context):
            try:
                caller(authenticator, allowed, method, context)
            except Refused as refusal:
                await context.abort(refused_code(refusal), str(refusal))
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


class _BoundGRPCServer(GRPCServer):
    """kserve's GRPCServer.start with the listen host, TLS and authentication as parameters."""

    def __init__(self, host: str, tls: TlsConfig, authenticator: Authenticator, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._host = host
        self._tls = tls
        self._authenticator = authenticator

    async def start(self, max_workers: int) -> None:
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), _AuthInterceptor(self._authenticator), ExceptionToStatusInterceptor()),
            options=[
                ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_LENGTH),
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_LENGTH),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self._data_plane, self._model_repository_extension), self._server
        )
        host = f"[{self._host}]" if ":" in self._host else self._host
        if self._tls.enabled:
            self._server.add_secure_port(f"{host}:{self._port}", grpc_server_credentials(self._tls))
        else:
            self._server.add_insecure_port(f"{host}:{self._port}")
        logger.info("gRPC server listening on %s:%d", host, self._port)
        await self._server.start()
        await self._server.wait_for_termination()


class BoundModelServer(kserve.ModelServer):
    """A single-worker kserve.ModelServer whose REST and gRPC listeners bind `host`, over TLS when tls
    is enabled, open to the callers authenticator admits."""

    def __init__(self, host: str, tls: TlsConfig, authenticator: Authenticator, **kwargs: Any) -> None:
        super().__init__(workers=1, **kwargs)
        self.host = host
        self.tls = tls
        self.authenticator = authenticator

    def start(self, models: list[kserve.Model]) -> None:
        # Mirrors ModelServer.start for workers=1 (kserve==0.21.0 is pinned), changing only the hosts.
        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = RESTServer(
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            access_log_format=self.access_log_format,
            workers=1,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
        )
        # uvicorn reads Config.host only when it binds, inside serve(), so setting it here suffices.
        self._rest_server.config.host = self.host
        if self.tls.enabled:
            self._rest_server.config.load()
            self._rest_server.config.ssl = http_ssl_context(self.tls)
        # KServe's app is one module-level FastAPI; its middleware stack is built on the first request.
        kserve.model_server.app.add_middleware(RequireRoles, authenticator=self.authenticator)
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            self._grpc_server = _BoundGRPCServer(
                self.host, self.tls, self.authenticator,
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                kwargs={},
                grace_period=self.grace_period,
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())
