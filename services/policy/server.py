"""The policy service: PolicyService over gRPC and the OpenAI-compatible HTTP API, on one router of versions.

Transport only: what a request goes through (validation, images, routing, sampling, logging) is in
generations.py, the model in model.py, its batched sampling in engine.py and batcher.py, the choice of
version per request in routing.py, the HTTP API in openai_api.py. A candidate is logged to Kafka
(acks=all) before the client sees it, so feedback on any response_id a client holds can always be
joined to its generation.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc
import torch
import uvicorn
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import Gauge, Histogram
from transformers import PreTrainedModel, ProcessorMixin

from modalign.core import auth
from modalign.core.blobs import BlobStore
from modalign.core.grpc_server import access_for, dial
from modalign.core.kafka import decode_record, ensure_topics
from modalign.core.modelstore import base_folder, fetch, fetch_published, folder_digests, read_manifest
from modalign.core.ratelimit import abort_with_retry_info
from modalign.core.service import run_service, serve_grpc
from modalign.core.tls import http_ssl_context
from modalign.core.versions import TopicFollower
from modalign.policy.batcher import DynamicBatcher
from modalign.policy.config import FOLLOW_MODES, PolicyConfig
from modalign.policy.engine import PolicyEngine
from modalign.policy.generations import Generations, Refused, observed
from modalign.policy.model import build_default_policy, load_policy
from modalign.policy.openai_api import RemoteImages, create_app
from modalign.policy.routing import Routes, VersionRouter
from modalign.v1 import events_pb2, feedback_pb2_grpc, policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)

BATCH_ROWS = Histogram(
    "modalign_policy_batch_rows",
    "Sequences (candidates of all requests) decoded together in one batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
VERSION_INFO = Gauge(
    "modalign_policy_version_info", "1 for each policy version this replica serves.", ["policy_version"]
)
TRAFFIC_WEIGHT = Gauge(
    "modalign_policy_traffic_weight_percent",
    "Share of sessions this replica routes to each version it serves (the rollout's weights).",
    ["policy_version"],
)

# Trailing metadata naming the version a request was routed to, on failures as on successes.
VERSION_METADATA = "policy-version"


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """PolicyService over gRPC: Generations in gRPC's messages and status codes."""

    def __init__(self, generations: Generations) -> None:
        self._generations = generations

    def Generate(self, request: policy_pb2.GenerateRequest, context: grpc.ServicerContext) -> policy_pb2.GenerateResponse:
        with refusals(context):
            started = self._generations.start(for_end_user(request, context))
        started.cancel_when_gone(context)
        context.set_trailing_metadata(((VERSION_METADATA, started.version),))
        with refusals(context), observed(started.version):
            generated = self._generations.finish(started, context.is_active)
            return policy_pb2.GenerateResponse(prompt_id=generated.prompt_id, policy_version=generated.version,
                                               candidates=generated.candidates)

    def GenerateStream(
        self, request: policy_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.GenerateStreamChunk]:
        with refusals(context):
            started = self._generations.start(for_end_user(request, context), streamed=True)
        started.cancel_when_gone(context)
        version = started.version
        context.set_trailing_metadata(((VERSION_METADATA, version),))
        with refusals(context), observed(version):
            # Deltas name no response: an id reaches the client only on the final chunks, once the
            # generation is durably logged, so any feedback that names it can be joined.
            for index, text, token_count in self._generations.stream(started):
                yield policy_pb2.GenerateStreamChunk(
                    policy_version=version, candidate_index=index, text_delta=text, token_count=token_count,
                )
            generated = self._generations.finish(started, context.is_active)
            for index, candidate in enumerate(generated.candidates):
                yield policy_pb2.GenerateStreamChunk(
                    prompt_id=generated.prompt_id, policy_version=version, candidate_index=index,
                    response_id=candidate.response_id, token_count=candidate.token_count,
                    finish_reason=candidate.finish_reason,
                )


def for_end_user(request: policy_pb2.GenerateRequest, context: grpc.ServicerContext) -> policy_pb2.GenerateRequest:
    """request, its user_id the end user the caller acts for (modalign.core.auth.end_user)."""
    try:
        request.user_id = auth.end_user(auth.current_principal(), request.user_id)
    except auth.Refused as refusal:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, str(refusal))
    return request


@contextmanager
def refusals(context: grpc.ServicerContext) -> Iterator[None]:
    """A Refused ends the RPC with its status code and message (and when to retry, if it says)."""
    try:
        yield
    except Refused as error:
        if error.retry_after_s:
            abort_with_retry_info(context, error.message, error.retry_after_s)
        context.abort(error.code, error.message)


class PublishedVersions:
    """The versions the trainer published and the routes the replica should serve, from the records of
    the followed topics; loads any of those versions, verified against its manifest first.

    A LoRA adapter version is added to the engine of its base, loaded once: the initial engine when it
    was started from the base's very files (the trainer publishes its starting checkpoint as the base),
    else the base from the model store, shared by every adapter on it while any is served.
    """

    def __init__(self, config: PolicyConfig, initial: PolicyEngine, initial_folder: Path | None = None) -> None:
        """initial_folder: the checkpoint folder the initial engine was loaded from; None: built in code."""
        self._config = config
        self._initial = initial
        self._initial_folder = initial_folder
        self._initial_files: dict[str, str] | None = None
        self._bases: weakref.WeakValueDictionary[str, PolicyEngine] = weakref.WeakValueDictionary()
        self._published: dict[str, events_pb2.PolicyVersionPublished] = {}
        self._rollout_revision = -1
        self._awaiting: Routes | None = None

    def load_engine(self, version: str) -> PolicyEngine:
        if version == self._initial.policy_version:
            return self._initial
        event = self._published.get(version)
        if event is None:
            raise LookupError(f"policy {version} was never published")
        folder = fetch_published(event.uri, self._config.model_store, self._config.s3, event.manifest_sha256)
        base = base_folder(folder)
        if base is None:
            return PolicyEngine(*self._load(folder), policy_version=version)
        engine = self._base_engine(base)
        if version not in engine.versions:  # else still there: it was dropped and routed again before its removal
            engine.add_adapter(version, folder)
        return engine

    def _load(self, folder: Path) -> tuple[PreTrainedModel, ProcessorMixin]:
        return load_policy(folder, device=self._config.device, dtype=getattr(torch, self._config.dtype))

    def _base_engine(self, base: Path) -> PolicyEngine:
        """The engine holding the base in folder base (fetched and verified by the store)."""
        if self._initial_folder is not None and self._initial_files is None:
            self._initial_files = folder_digests(self._initial_folder)
        if read_manifest(base).files == self._initial_files:
            return self._initial
        engine = self._bases.get(base.name)
        if engine is None:
            engine = self._bases[base.name] = PolicyEngine(*self._load(base), policy_version=base.name)
        return engine

    def update(self, records: list[ConsumerRecord]) -> Routes | None:
        """Catalogs every published version in records; returns the routes they call for, if changed."""
        newest_state = newest_version = None
        for record in records:
            if record.topic == self._config.kafka.topic("policy-versions"):
                if (event := decode_record(events_pb2.PolicyVersionPublished, record)) is not None:
                    self._published[event.version] = event
                    newest_version = event.version
            elif (state := decode_record(events_pb2.RolloutState, record)) is not None:
                newest_state = state
        routes = None
        if self._config.follow == "latest" and newest_version is not None:
            routes = Routes(stable=newest_version)
        if self._config.follow == "rollout" and newest_state is not None and newest_state.revision > self._rollout_revision:
            self._rollout_revision = newest_state.revision
            routes = Routes.from_state(newest_state, self._initial.policy_version)
        routes = routes or self._awaiting
        # The two topics are fetched separately, so a state can arrive before the announcement of the
        # version it routes to: hold it until the announcement is read.
        if routes is not None and any(v not in self._published and v != self._initial.policy_version
                                      for v in routes.versions()):
            self._awaiting = routes
            return None
        self._awaiting = None
        return routes


def publish_routes(old: Routes, new: Routes) -> None:
    for version in set(old.versions()) - set(new.versions()):
        VERSION_INFO.remove(version)
        TRAFFIC_WEIGHT.remove(version)
    for version, weight in new.weights().items():
        VERSION_INFO.labels(version).set(1)
        TRAFFIC_WEIGHT.labels(version).set(weight)


SERVICE = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"]
ACCESS = access_for(SERVICE, {auth.CLIENT})


def serve_http(config: PolicyConfig, generations: Generations) -> uvicorn.Server:
    """The OpenAI-compatible HTTP API on config.http_listen, in a thread of its own; set should_exit to stop it."""
    host, _, port = config.http_listen.rpartition(":")
    feedback = None
    if config.feedback_address:
        feedback = feedback_pb2_grpc.FeedbackServiceStub(dial(config.feedback_address, tls=config.feedback_tls))
    remote = RemoteImages(config.http_image_url_prefixes, max_bytes=config.image_max_bytes)
    http_config = uvicorn.Config(
        create_app(generations, config.model_name, auth.Authenticator(config.auth), feedback, remote),
        host=host.strip("[]"), port=int(port), log_level="warning", timeout_graceful_shutdown=5,
    )
    http_config.load()
    if config.tls.enabled:
        # uvicorn reads its certificate once; this context re-reads it when it changes, as gRPC does.
        http_config.ssl = http_ssl_context(config.tls)
    server = uvicorn.Server(http_config)
    thread = threading.Thread(target=server.run, name="openai-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError(f"the HTTP API did not start on {config.http_listen}")
    log.info("OpenAI-compatible HTTP API on %s", config.http_url)
    return server


def serve(config: PolicyConfig) -> None:
    # The model first: a checkpoint that cannot be served is refused before anything else starts.
    folder = None
    if config.model_dir:
        folder = fetch(config.model_dir, config.s3) if "://" in config.model_dir else Path(config.model_dir)
        model, processor = load_policy(folder, device=config.device, dtype=getattr(torch, config.dtype))
    else:
        model, processor = build_default_policy(config.seed)
        model.to(config.device, getattr(torch, config.dtype))
    initial = PolicyEngine(model, processor, policy_version=config.policy_version)
    ensure_topics(config.kafka)
    # Adapters can share the initial engine's weights when it was loaded from a full checkpoint's folder.
    versions = PublishedVersions(config, initial, folder if folder is not None and base_folder(folder) is None else None)
    router = VersionRouter(
        initial, versions.load_engine,
        lambda engine: DynamicBatcher(
            engine, max_batch_rows=config.max_batch_rows, max_batch_tokens=config.max_batch_tokens,
            max_wait_ms=config.max_batch_wait_ms,
            max_pending_rows=config.max_pending_rows, on_batch=BATCH_ROWS.observe,
        ),
        on_routes=publish_routes, head_to_head_percent=config.head_to_head_percent,
    )
    publish_routes(router.routes, router.routes)

    def on_records(records: list[ConsumerRecord]) -> None:
        if (routes := versions.update(records)) is not None:
            router.apply(routes)

    follower = None
    if FOLLOW_MODES[config.follow]:
        # Before serving: a replica that starts mid-rollout routes as the others do from its first request.
        # Only the controller's transactions may route: a rollout state anyone else wrote is ignored.
        follower = TopicFollower(config.kafka, FOLLOW_MODES[config.follow], on_records, transactional=["rollout"])
        follower.start()
    generations = Generations(config, router, processor, BlobStore(config.blob_dir))
    servicer = PolicyServicer(generations)
    log.info("policy service serving %s", router.routes.weights())
    http = serve_http(config, generations) if config.http_listen else None
    try:
        serve_grpc(
            config, lambda server: policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server),
            [SERVICE.full_name], ACCESS,
        )
    finally:
        if follower is not None:
            follower.stop()
        if http is not None:
            http.should_exit = True
        router.close()
        generations.close()


def main(argv: list[str] | None = None) -> None:
    run_service(PolicyConfig, serve, argv)


if __name__ == "__main__":
    main()
