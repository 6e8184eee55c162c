"""Each door, tried against running services: TLS and mutual TLS (and a certificate renewed while they
run), bearer tokens and JWTs on gRPC and HTTP, roles, refusals that never reach Kafka, and feedback
only from the user a response was served to, at most as fast as the per-user rate limit; published
versions only from the model store. Rollout
commands by role: tests/test_up.py."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import jwt
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kserve.protocol.grpc import grpc_predict_v2_pb2 as inference
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as inference_grpc
from prometheus_client import REGISTRY
from tritonclient.utils import InferenceServerException

from modalign.core.auth import AuthConfig, ClientAuth
from modalign.core.blobs import BlobStore
from modalign.core.grpc_server import dial
from modalign.core.kafka import KafkaConfig, make_producer, produce_durably, read_topic
from modalign.core.modelstore import DirectoryStore, Manifest, Published
from modalign.core.processes import ManagedProcess, free_port
from modalign.core.ratelimit import RateLimit, retry_delay_s
from modalign.core.tls import ClientTls, TlsConfig
from modalign.feedback.caps import UserCap
from modalign.feedback.server import FeedbackConfig
from modalign.policy.config import PolicyConfig
from modalign.policy.conversation import chat_messages, single_question
from modalign.policy.model import save_policy
from modalign.reward.config import RewardServerConfig
from modalign.rollout.analysis import analyse
from modalign.rollout.controller import STATE_KEY, StateStore
from modalign.rollout.evidence import EvidenceCollector, RewardScorer, ServedResponse
from modalign.trainer.batches import Prompt
from modalign.trainer.learner import Learner
from modalign.trainer.service import Trainer, TrainerConfig
from modalign.v1 import common_pb2, events_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2, policy_pb2_grpc

from tests.certificates import CertificateAuthority, Issued
from tests.policy.test_policy_service import png
from tests.rollout.users import announce, policy_with_eos_logit, publish
from tests.services import counter_total, start_grpc_service, start_service
from tests.trainer.learning import logged_generation

pytestmark = pytest.mark.integration

TOKENS = {"client": "client-" + "c" * 32, "operator": "operator-" + "o" * 32, "reader": "reader-" + "r" * 32}


@dataclass
class Secured:
    """A feedback service behind mutual TLS and a policy whose HTTP API speaks HTTPS, sharing tokens,
    a JWT key and a CA."""

    authority: CertificateAuthority
    server: Issued
    web: Issued
    jwt_key: ec.EllipticCurvePrivateKey
    feedback: str
    feedback_metrics: int
    policy: str
    policy_http: str
    policy_metrics: int
    kafka: KafkaConfig

    def user_token(self, user: str, roles: tuple[str, ...] = ("client",)) -> str:
        claims = {"sub": user, "roles": list(roles), "aud": "modalign", "exp": int(time.time()) + 300}
        return jwt.encode(claims, self.jwt_key, algorithm="ES256")

    def feedback_channel(self, token: str = "", certificate: Issued | None = None) -> grpc.Channel:
        if certificate is None:
            return dial(self.feedback, token, ClientTls(self.authority.cert))
        return dial(self.feedback, token, ClientTls(self.authority.cert, certificate.cert, certificate.key))


@pytest.fixture(scope="module")
def secured(kafka_config: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    work = tmp_path_factory.mktemp("security")
    authority = CertificateAuthority(work / "tls")
    server, web, policy_client = authority.server(), authority.client("web"), authority.client("policy")
    tokens = work / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    jwt_key = ec.generate_private_key(ec.SECP256R1())
    jwt_public = work / "jwt.pem"
    jwt_public.write_bytes(jwt_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    auth = AuthConfig(tokens_file=tokens, jwt_public_key=jwt_public, certificate_roles=("web:client", "policy:client"),
                      front_ends=("client", "web"))
    processes: list[ManagedProcess] = []
    try:
        feedback, feedback_address, feedback_metrics = start_grpc_service(
            FeedbackConfig, kafka_config, work, auth=auth,
            tls=TlsConfig(cert=server.cert, key=server.key, client_ca=authority.cert))
        processes.append(feedback)
        http_port = free_port()
        policy, policy_address, policy_metrics = start_grpc_service(
            PolicyConfig, kafka_config, work, auth=auth, blob_dir=work / "blobs", follow="none",
            http_listen=f"127.0.0.1:{http_port}", feedback_address=feedback_address,
            feedback_tls=ClientTls(authority.cert, policy_client.cert, policy_client.key),
            tls=TlsConfig(cert=server.cert, key=server.key))
        processes.append(policy)
        yield Secured(authority, server, web, jwt_key, feedback_address, feedback_metrics, policy_address,
                      f"https://127.0.0.1:{http_port}/v1", policy_metrics, kafka_config)
    finally:
        for process in processes:
            process.stop()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()


def question(user_id: str = "") -> policy_pb2.GenerateRequest:
    return policy_pb2.GenerateRequest(text="What colour is the square?", n=2, user_id=user_id,
                                      images=[common_pb2.Image(data=png(), mime_type="image/png")],
                                      sampling=common_pb2.SamplingParams(max_new_tokens=4))


def generate(secured: Secured, token: str, user_id: str = "") -> policy_pb2.GenerateResponse:
    with dial(secured.policy, token, ClientTls(secured.authority.cert)) as channel:
        return policy_pb2_grpc.PolicyServiceStub(channel).Generate(question(user_id), timeout=60)


def served_version(address: str) -> str:
    """The version a plaintext, unauthenticated policy at address answers with."""
    with dial(address) as channel:
        return policy_pb2_grpc.PolicyServiceStub(channel).Generate(question("u"), timeout=60).policy_version


def rating(user_id: str, response_id: str, score: int = 5) -> feedback_pb2.Feedback:
    feedback = feedback_pb2.Feedback(feedback_id=f"sec-{uuid.uuid4().hex}", user_id=user_id,
                                     rating=feedback_pb2.Rating(response_id=response_id, score=score))
    feedback.client_time.GetCurrentTime()
    return feedback


def submit(channel: grpc.Channel, feedback: feedback_pb2.Feedback) -> feedback_pb2.SubmitResponse:
    return feedback_pb2_grpc.FeedbackServiceStub(channel).Submit(feedback, timeout=30)


def served_certificate_serial(address: str, authority: CertificateAuthority, client: Issued | None = None) -> int:
    """The serial number of the certificate a new TLS connection to address is shown."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(authority.cert))
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as connection:
        return x509.load_der_x509_certificate(connection.getpeercert(binary_form=True)).serial_number


def metric(port: int, name: str, **labels: str) -> float:
    return counter_total(f"http://127.0.0.1:{port}/metrics", name, **labels)


def test_mutual_tls_admits_only_certificates_of_its_ca_and_roles(secured: Secured, tmp_path: Path) -> None:
    feedback = rating("u", str(uuid.uuid4()))
    with grpc.insecure_channel(secured.feedback) as plaintext:
        assert code_of(lambda: submit(plaintext, feedback)) == grpc.StatusCode.UNAVAILABLE
    with secured.feedback_channel(TOKENS["client"]) as no_certificate:  # a valid token is not enough
        assert code_of(lambda: submit(no_certificate, feedback)) == grpc.StatusCode.UNAVAILABLE
    foreign = CertificateAuthority(tmp_path / "foreign", name="someone else's CA").client("web")
    with secured.feedback_channel(certificate=foreign) as impostor:
        assert code_of(lambda: submit(impostor, feedback)) == grpc.StatusCode.UNAVAILABLE
    with secured.feedback_channel(certificate=secured.authority.client("stranger")) as stranger:
        assert code_of(lambda: submit(stranger, feedback)) == grpc.StatusCode.PERMISSION_DENIED
    with secured.feedback_channel(certificate=secured.web) as web:  # past the doors, on to the author check
        assert code_of(lambda: submit(web, feedback)) == grpc.StatusCode.FAILED_PRECONDITION


def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart_or_a_dropped_one(secured: Secured) -> None:
    reply = generate(secured, TOKENS["client"], "renewal-user")
    with secured.feedback_channel(certificate=secured.web) as open_channel:
        assert not submit(open_channel, rating("renewal-user", reply.candidates[0].response_id)).duplicate
        assert served_certificate_serial(secured.feedback, secured.authority, secured.web) == secured.server.serial
        assert served_certificate_serial(secured.policy_http.removeprefix("https://").removesuffix("/v1"),
                                         secured.authority) == secured.server.serial
        renewed = secured.authority.server()  # the same files, rewritten as a certificate manager renews them
        assert renewed.serial != secured.server.serial
        assert served_certificate_serial(secured.feedback, secured.authority, secured.web) == renewed.serial
        assert served_certificate_serial(secured.policy, secured.authority) == renewed.serial
        assert served_certificate_serial(secured.policy_http.removeprefix("https://").removesuffix("/v1"),
                                         secured.authority) == renewed.serial
        assert not submit(open_channel, rating("renewal-user", reply.candidates[1].response_id)).duplicate
    secured.server = renewed


def test_grpc_calls_need_a_token_of_a_role_that_may_make_them(secured: Secured) -> None:
    assert code_of(lambda: generate(secured, "")) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: generate(secured, "x" * 40)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: generate(secured, TOKENS["reader"])) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: generate(secured, secured.user_token("mallory", roles=("reader",)))) \
        == grpc.StatusCode.PERMISSION_DENIED
    assert metric(secured.policy_metrics, "modalign_auth_refused_total", method="/modalign.v1.PolicyService/Generate",
                  reason="unauthenticated") >= 2
    assert metric(secured.policy_metrics, "modalign_auth_refused_total", method="/modalign.v1.PolicyService/Generate",
                  reason="permission_denied") >= 2
    assert len(generate(secured, TOKENS["client"], "front-end-user").candidates) == 2


def test_an_end_user_acts_only_as_itself_and_its_responses_are_logged_as_its_own(secured: Secured) -> None:
    alice = secured.user_token("alice")
    assert code_of(lambda: generate(secured, alice, "bob")) == grpc.StatusCode.PERMISSION_DENIED
    reply = generate(secured, alice)
    logged = {g.response_id: g.user_id for g in read_topic(secured.kafka, "generations", events_pb2.GenerationLogged)}
    assert {logged[c.response_id] for c in reply.candidates} == {"alice"}
    with secured.feedback_channel(alice, certificate=secured.web) as channel:  # the token names the principal
        assert code_of(lambda: submit(channel, rating("bob", reply.candidates[0].response_id))) \
            == grpc.StatusCode.PERMISSION_DENIED
        assert not submit(channel, rating("", reply.candidates[0].response_id)).duplicate


def test_feedback_on_a_response_served_to_someone_else_or_never_served_is_refused_and_never_stored(
        secured: Secured) -> None:
    served_to_a = generate(secured, TOKENS["client"], "user-a")
    refused = [rating("user-b", served_to_a.candidates[0].response_id),
               rating("user-a", str(uuid.uuid4()))]  # never served
    with secured.feedback_channel(TOKENS["client"], certificate=secured.web) as channel:
        for feedback in refused:
            assert code_of(lambda feedback=feedback: submit(channel, feedback)) == grpc.StatusCode.FAILED_PRECONDITION
        accepted = rating("user-a", served_to_a.candidates[0].response_id)
        assert not submit(channel, accepted).duplicate
    stored = {e.feedback.feedback_id for e in read_topic(secured.kafka, "feedback", events_pb2.FeedbackReceived)}
    assert accepted.feedback_id in stored
    assert not stored & {f.feedback_id for f in refused}


def test_the_http_api_needs_a_token_and_forwards_feedback_under_it(secured: Secured) -> None:
    def client(token: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=secured.policy_http, api_key=token, max_retries=0,
                             http_client=httpx.Client(verify=str(secured.authority.cert), timeout=60))

    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png()).decode()}},
        {"type": "text", "text": "What colour is the square?"}]}]
    with pytest.raises(openai.AuthenticationError):
        client("not-a-token-of-this-system").chat.completions.create(model="modalign", messages=messages, max_tokens=4)
    with pytest.raises(openai.PermissionDeniedError):
        client(TOKENS["reader"]).chat.completions.create(model="modalign", messages=messages, max_tokens=4)
    assert [m.id for m in client(TOKENS["reader"]).models.list()] == ["modalign"]
    carol = client(secured.user_token("carol"))
    reply = carol.chat.completions.create(model="modalign", messages=messages, max_tokens=4)
    response_id = reply.choices[0].model_extra["response_id"]

    def post_feedback(token: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"{secured.policy_http}/feedback", data=json.dumps(body).encode(), headers={
            "Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})})
        context = ssl.create_default_context(cafile=str(secured.authority.cert))
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    body = {"feedback_id": f"http-{uuid.uuid4().hex}", "client_time": "2026-12-01T00:00:00Z",
            "rating": {"response_id": response_id, "score": 5}}
    status, answer = post_feedback("", body)
    assert status == 401 and answer["error"]["type"] == "authentication_error"
    status, answer = post_feedback(secured.user_token("dave"), body)  # dave was not served carol's response
    assert status == 400 and "served to another user" in answer["error"]["message"], answer
    status, answer = post_feedback(secured.user_token("carol"), body)
    assert status == 200 and answer == {"feedback_id": body["feedback_id"], "duplicate": False}
    with urllib.request.urlopen(urllib.request.Request(secured.policy_http.removesuffix("/v1") + "/healthz"),
                                context=ssl.create_default_context(cafile=str(secured.authority.cert))) as health:
        assert health.status == 200  # probes need no token


def test_a_version_announced_outside_the_model_store_is_refused_and_the_policy_keeps_serving(
        kafka_config: KafkaConfig, tmp_path: Path) -> None:
    store, elsewhere = DirectoryStore(tmp_path / "models"), DirectoryStore(tmp_path / "elsewhere")
    process, address, metrics_port = start_grpc_service(
        PolicyConfig, kafka_config, tmp_path, follow="latest", blob_dir=tmp_path / "blobs", model_store=str(store.root))
    try:

        publish(kafka_config, elsewhere, "v5", eos_logit=3.0)  # a valid version, in the wrong place
        published = store.publish(Manifest(version="v6", kind="policy", parent="test"),
                                  lambda staging: save_policy(*policy_with_eos_logit(3.0), staging))
        traversal = Published(uri=f"{store.root.as_uri()}/../elsewhere/policy/v5", manifest_sha256="")
        announce(kafka_config, "v5b", traversal)
        deadline = time.monotonic() + 60
        while metric(metrics_port, "modalign_model_versions_refused_total") < 2:
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(0.5)
        assert served_version(address) == "v0"
        announce(kafka_config, "v6", published)  # the store's own versions still load
        while served_version(address) != "v6":
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(0.5)
    finally:
        process.stop()


def test_one_user_flooding_generate_or_feedback_is_held_to_its_rate_and_told_when_to_retry(
        kafka_config: KafkaConfig, tmp_path: Path) -> None:
    slow = RateLimit(per_second=0.05, burst=2)
    processes = []
    try:
        feedback, feedback_address, _ = start_grpc_service(FeedbackConfig, kafka_config, tmp_path, "flood-feedback",
                                                            user_rate_limit=slow)
        processes.append(feedback)
        http_port = free_port()
        policy, policy_address, _ = start_grpc_service(
            PolicyConfig, kafka_config, tmp_path, "flood-policy", blob_dir=tmp_path / "blobs", follow="none",
            user_rate_limit=slow, http_listen=f"127.0.0.1:{http_port}")
        processes.append(policy)
        with dial(policy_address) as policy_channel, dial(feedback_address) as feedback_channel:
            stub = policy_pb2_grpc.PolicyServiceStub(policy_channel)
            replies = [stub.Generate(question("flood"), timeout=60) for _ in range(2)]
            with pytest.raises(grpc.RpcError) as over:
                stub.Generate(question("flood"), timeout=60)
            assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in over.value.details()
            assert 1 < retry_delay_s(over.value) <= 20
            assert len(stub.Generate(question("someone-else"), timeout=60).candidates) == 2

            body = json.dumps({"model": "modalign", "user": "flood", "max_tokens": 4, "messages": [
                {"role": "user", "content": "Hello?"}]}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as http_over:
                urllib.request.urlopen(request, timeout=60)
            assert http_over.value.code == 429 and 1 < int(http_over.value.headers["Retry-After"]) <= 20

            ratings = [rating("flood", candidate.response_id) for reply in replies for candidate in reply.candidates]
            assert [submit(feedback_channel, said).duplicate for said in ratings[:2]] == [False, False]
            with pytest.raises(grpc.RpcError) as too_much:
                submit(feedback_channel, ratings[2])
            assert too_much.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_delay_s(too_much.value) > 1
        stored = {e.feedback.feedback_id for e in read_topic(kafka_config, "feedback", events_pb2.FeedbackReceived)}
        assert {r.feedback_id for r in ratings[:2]} <= stored and ratings[2].feedback_id not in stored
    finally:
        for process in processes:
            process.stop()


def test_a_rollout_state_written_outside_the_controllers_transactions_is_ignored(
        kafka_config: KafkaConfig, tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "models")
    process, address, metrics_port = start_grpc_service(
        PolicyConfig, kafka_config, tmp_path, follow="rollout", blob_dir=tmp_path / "blobs", model_store=str(store.root))
    try:

        publish(kafka_config, store, "v7", eos_logit=3.0)
        forged = events_pb2.RolloutState(revision=1000, stable_version="v7", reason="anyone with write access")
        producer = make_producer(kafka_config)
        try:  # acknowledged by the broker, committed as far as a read_committed reader goes, but no transaction's
            produce_durably(producer, kafka_config.topic("rollout"), [(STATE_KEY.decode(), forged)], timeout_s=30)
        finally:
            producer.close()
        deadline = time.monotonic() + 60
        while metric(metrics_port, "modalign_state_records_ignored_total") < 1:
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(0.5)
        assert served_version(address) == "v0"
        controller = StateStore(kafka_config)  # the controller's own writer, in its transactions
        try:
            controller.write(events_pb2.RolloutState(revision=1001, stable_version="v7", reason="the controller's"))
        finally:
            controller.close()
        while served_version(address) != "v7":
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(0.5)
    finally:
        process.stop()


def test_the_reward_service_scores_only_for_a_role_that_may_over_tls(secured: Secured, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    blobs = BlobStore(tmp_path / "blobs")
    image = blobs.put(png())
    config = RewardServerConfig(auth=AuthConfig(tokens_file=tokens), tls=TlsConfig(cert=secured.server.cert, key=secured.server.key),
                                http_port=free_port(), grpc_port=free_port(), grace_period=1)
    process = start_service(config, tmp_path, "secured-reward", timeout_s=240)
    try:
        base = f"https://127.0.0.1:{config.http_port}"
        context = ssl.create_default_context(cafile=str(secured.authority.cert))
        body = json.dumps({"inputs": [
            {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["What colour is the square?"]},
            {"name": "response", "datatype": "BYTES", "shape": [1], "data": ["It is red."]},
            {"name": "images", "datatype": "BYTES", "shape": [1, 1], "data": [[base64.b64encode(png()).decode()]]},
        ]}).encode()

        def call(path: str, token: str = "", data: bytes | None = None) -> int:
            headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
            try:
                with urllib.request.urlopen(urllib.request.Request(base + path, data=data, headers=headers),
                                            timeout=60, context=context) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                return error.code

        infer = "/v2/models/reward/infer"
        assert call(infer, data=body) == 401
        assert call(infer, "x" * 40, data=body) == 401
        assert call(infer, TOKENS["operator"], data=body) == 403
        assert call("/v2/repository/models/reward/unload", TOKENS["client"], data=b"{}") == 403
        assert call(infer, TOKENS["reader"], data=body) == call(infer, TOKENS["client"], data=body) == 200
        assert call("/v2/health/ready") == 200 and call("/metrics") == 200  # probes and scrapers need no token
        with pytest.raises(OSError):  # and plain HTTP gets no answer
            urllib.request.urlopen(f"http://127.0.0.1:{config.http_port}/v2/health/ready", timeout=10)

        # gRPC with KServe's own stubs (tritonclient.grpc cannot share a process with kserve's protos).
        def tensor(name: str, shape: list[int], *values: bytes) -> inference.ModelInferRequest.InferInputTensor:
            return inference.ModelInferRequest.InferInputTensor(
                name=name, datatype="BYTES", shape=shape, contents=inference.InferTensorContents(bytes_contents=values))

        request = inference.ModelInferRequest(model_name="reward", inputs=[
            tensor("prompt", [1], b"What colour?"), tensor("response", [1], b"Red."), tensor("images", [1, 1], png())])
        tls = ClientTls(secured.authority.cert)
        for token, code in (("", grpc.StatusCode.UNAUTHENTICATED), (TOKENS["operator"], grpc.StatusCode.PERMISSION_DENIED)):
            with dial(f"127.0.0.1:{config.grpc_port}", token, tls) as channel:
                stub = inference_grpc.GRPCInferenceServiceStub(channel)
                assert stub.ServerLive(inference.ServerLiveRequest(), timeout=30).live  # open to all
                assert code_of(lambda stub=stub: stub.ModelInfer(request, timeout=60)) == code
        with dial(f"127.0.0.1:{config.grpc_port}", TOKENS["reader"], tls) as channel:
            reply = inference_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
            assert [output.name for output in reply.outputs] == ["score"]

        # The rollout controller's own client: TLS against the CA, the reader token from the tokens file.
        scorer = RewardScorer(f"127.0.0.1:{config.http_port}", "reward", blobs, ClientTls(secured.authority.cert),
                              ClientAuth(tokens, "reader"))
        asked = json.dumps(chat_messages(single_question("What colour is the square?", [image])))
        served = ServedResponse("v0", "What colour is the square?", "It is red.", (image,), asked)
        scores, _ = scorer.score([served])
        assert len(scores) == 1
        with pytest.raises(InferenceServerException):
            RewardScorer(f"127.0.0.1:{config.http_port}", "reward", blobs, ClientTls(secured.authority.cert),
                         ClientAuth()).score([served])
    finally:
        process.stop()


FLOOD = 300


def served(kafka: KafkaConfig, generations: list[events_pb2.GenerationLogged],
           ratings: list[tuple[str, str, int]]) -> None:
    """Writes what the policy logs for the generations, then what the feedback service logs for the
    (user, response_id, score) ratings."""
    producer = make_producer(kafka)
    try:
        produce_durably(producer, kafka.topic("generations"), [(g.response_id, g) for g in generations], timeout_s=30)
        feedback = [events_pb2.FeedbackReceived(feedback=feedback_pb2.Feedback(
            feedback_id=uuid.uuid4().hex, user_id=user, rating=feedback_pb2.Rating(response_id=response, score=score)))
            for user, response, score in ratings]
        produce_durably(producer, kafka.topic("feedback"), [(f.feedback.feedback_id, f) for f in feedback], timeout_s=30)
    finally:
        producer.close()


def test_a_flood_of_five_star_ratings_moves_a_canary_analysis_no_further_than_its_users_cap(
        own_kafka_config: KafkaConfig) -> None:
    kafka_config = own_kafka_config
    # 40 users rate 3 responses each of stable v1 (about 3.5) and of canary v2 (about 2.5): v2 is worse.
    # One more user gives the canary five stars 300 times, which alone would carry it past stable.
    generations, ratings = [], []
    for user in [f"user-{i}" for i in range(40)] + ["flood"] * (FLOOD // 6):
        for version, scores in (("v1", (3, 4, 4) if user != "flood" else ()), ("v2", (2, 3, 2) if user != "flood" else (5,) * 6)):
            for score in scores:
                generation = events_pb2.GenerationLogged(response_id=uuid.uuid4().hex, user_id=user, policy_version=version)
                generations.append(generation)
                ratings.append((user, generation.response_id, score))
    served(kafka_config, generations, ratings)

    def verdict(cap: UserCap) -> tuple[events_pb2.AnalysisVerdict, float]:
        collector = EvidenceCollector(kafka_config, None, cap)
        try:
            collector.reset("v2", "v1", since_ms=0)
            assert collector.catch_up(60)
            rating, = (v for v in analyse(collector.evidence, "v2", "v1", alpha=0.05, looks=3, min_samples=20)
                       if v.metric == "rating")
            return rating, REGISTRY.get_sample_value("modalign_rollout_evidence_capped") or 0.0
        finally:
            collector.close()

    capped_verdict, left_out = verdict(UserCap())
    assert REGISTRY.get_sample_value("modalign_rollout_evidence_entries", {"kind": "votes"}) == 240 + FLOOD
    # The flood keeps 26 of its 300: 10% of all ratings kept (26 of 266), more than 4x the median
    # user's 6 (24) or min_items (8).
    assert capped_verdict.canary_samples == 120 + 26 and left_out == FLOOD - 26
    assert capped_verdict.outcome == "worse"
    uncapped_verdict, left_out = verdict(UserCap(max_share=1.0))
    assert uncapped_verdict.canary_samples == 120 + FLOOD and left_out == 0
    assert uncapped_verdict.outcome == "not_worse"  # what the cap prevented


def test_a_flood_of_five_star_ratings_adds_no_more_to_a_training_round_than_its_users_cap(
        own_kafka_config: KafkaConfig, tmp_path: Path) -> None:
    kafka_config = own_kafka_config

    def trainer(cap: UserCap) -> Trainer:
        config = TrainerConfig(
            kafka=kafka_config, work_dir=tmp_path / uuid.uuid4().hex, model_store=str(tmp_path / "models"),
            blob_dir=tmp_path / "blobs", metrics_port=0, group_id=uuid.uuid4().hex, user_cap=cap,
            round_max_feedback=40 + FLOOD, round_max_seconds=120, min_pairs_to_learn=10**6)  # join, do not learn
        return Trainer(config, Learner(config.learner, BlobStore(config.blob_dir)))

    def one_round(trainer: Trainer) -> tuple[set[str], float]:
        """The flood's answers in any pair of the round (to train on or held out), and how much of its
        feedback the round left out."""
        before = REGISTRY.get_sample_value("modalign_trainer_feedback_consumed_total", {"outcome": "capped"}) or 0.0
        try:
            trainer.run_round()
            pairs = trainer.state.pending_pairs + trainer.state.heldout_pairs
        finally:
            trainer.close()
        flood_answers = {r.text for pair in pairs for r in (pair.chosen, pair.rejected) if r.text.startswith("blue")}
        after = REGISTRY.get_sample_value("modalign_trainer_feedback_consumed_total", {"outcome": "capped"}) or 0.0
        return flood_answers, after - before

    capped_trainer = trainer(UserCap())
    # One question, answered 340 times: 40 users rate one answer each 1 to 4; one user rates 300 answers
    # of its own five stars (each would pair with every lower rating of the question the trainer keeps).
    question = logged_generation(capped_trainer.learner, Prompt.question("What colour is the square?"))
    tokenizer = capped_trainer.learner.models.processor.tokenizer
    generations, ratings = [], []
    for index, user in enumerate([f"user-{i}" for i in range(40)] + ["flood"] * FLOOD):
        generation = events_pb2.GenerationLogged()
        generation.CopyFrom(question)
        generation.response_id, generation.user_id, generation.policy_version = uuid.uuid4().hex, user, "v0"
        generation.response_text = f"blue {index}" if user == "flood" else "red"
        generation.response_token_ids[:] = tokenizer(generation.response_text, add_special_tokens=False).input_ids
        generations.append(generation)
        ratings.append((user, generation.response_id, 5 if user == "flood" else 1 + index % 4))
    served(kafka_config, generations, ratings)

    # The flood keeps 8 ratings (min_items: 10% of the 40 others, or 4x their median of 1, is less), and
    # only those 8 of its answers reach any pair.
    flood_answers, left_out = one_round(capped_trainer)
    assert len(flood_answers) == 8 and left_out == FLOOD - 8
    for kind in ("consumed_ids", "generations"):  # what the round holds is measured (docs/operations.md)
        assert REGISTRY.get_sample_value("modalign_trainer_state_entries", {"kind": kind}) == 40 + FLOOD
    flood_answers, left_out = one_round(trainer(UserCap(max_share=1.0)))
    # What the cap prevented: most of the flood's answers in pairs (each one rated after some lower rating).
    assert len(flood_answers) > FLOOD // 3 and left_out == 0
