"""KServe's ModelServer start-up with the listen host as a parameter.

kserve 0.21 hard-codes its listen addresses (uvicorn host "0.0.0.0" in protocol/rest/server.py, gRPC
"[::]:port" in protocol/grpc/server.py) and offers no option for them. BoundModelServer replaces
ModelServer.start, a copy of KServe's private start-up for one worker (kserve==0.21.0 is pinned), so
both listeners bind the host given by --host, which defaults to loopback; a pod passes --host 0.0.0.0.
"""

from __future__ import annotations

import asyncio
from concurrent import futures
from typing import Any

import kserve
from grpc import aio
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING, MAX_GRPC_MESSAGE_LENGTH
from kserve.logging import logger
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest.server import RESTServer


class _BoundGRPCServer(GRPCServer):
    """kserve's GRPCServer.start with the listen host as a parameter instead of "[::]"."""

    def __init__(self, host: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._host = host

    async def start(self, max_workers: int) -> None:
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[
                ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_LENGTH),
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_LENGTH),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self._data_plane, self._model_repository_extension), self._server
        )
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._server.add_insecure_port(f"{host}:{self._port}")
        logger.info("gRPC server listening on %s:%d", host, self._port)
        await self._server.start()
        await self._server.wait_for_termination()


class BoundModelServer(kserve.ModelServer):
    """A single-worker kserve.ModelServer whose REST and gRPC listeners bind `host`."""

    def __init__(self, host: str, **kwargs: Any) -> None:
        super().__init__(workers=1, **kwargs)
        self.host = host

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
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            self._grpc_server = _BoundGRPCServer(
                self.host,
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
