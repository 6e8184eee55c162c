"""What the analysis compares: users' feedback and reward scores per version (from Kafka and the reward
service), and each version's requests, errors and latency (from the policy replicas' /metrics)."""

from __future__ import annotations

import base64
import json
import logging
import math
import socket
import time
import urllib.request
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np
from kafka import TopicPartition
from prometheus_client import Gauge
from prometheus_client.parser import text_string_to_metric_families

from modalign.core.auth import ClientAuth
from modalign.core.blobs import BlobStore
from modalign.core.kafka import KafkaConfig, assign, decode_record, make_consumer
from modalign.core.tls import ClientTls
from modalign.feedback.caps import UserCap, capped
from modalign.policy import conversation
from modalign.rollout.analysis import Evidence, Moments, Traffic
from modalign.v1 import events_pb2

log = logging.getLogger(__name__)

# What a rollout's evidence holds at most (docs/operations.md), the oldest forgotten first:
# feedback whose responses are not (yet) known to come from the canary or stable;
MAX_PENDING_FEEDBACK = 50_000
# the version of each response the canary or stable served, to attribute feedback on it (feedback on a
# response older than this many newer ones stays pending, then is dropped);
MAX_SERVED_RESPONSES = 1_000_000
# users' ratings and preferences (an analysis then rests on the most recent ones);
MAX_VOTES = 500_000
# responses waiting for a reward score (scores are a sample; under heavy traffic the oldest are dropped).
MAX_UNSCORED = 2_000

EVIDENCE_ENTRIES = Gauge("modalign_rollout_evidence_entries",
                         "What the controller holds of the current rollout's evidence, by kind: served responses, "
                         "votes (ratings and preferences), pending feedback, unscored responses.", ["kind"])

VOTES_CAPPED = Gauge("modalign_rollout_evidence_capped",
                     "Ratings and preferences of the current rollout left out because their user gave more than the cap allows.")


@dataclass(frozen=True)
class _Vote:
    """One user's feedback that compares the canary with stable: a rating of one version's response, a
    head-to-head preference (version: the winner's), or a head-to-head tie (metric "tie", no version)."""

    user_id: str
    metric: str
    version: str
    score: float = 0.0


@dataclass(frozen=True)
class ServedResponse:
    """A response a policy version served, kept until the reward service has scored it."""

    version: str
    prompt_text: str
    response_text: str
    image_sha256s: tuple[str, ...]
    conversation: str
    """The whole conversation the response answered, as the reward service's `conversation` input (JSON)."""
    audio_sha256s: tuple[str, ...] = ()
    """The conversation's spoken parts, in order."""


class RewardScorer:
    """Scores responses with the reward service over KServe's Open Inference Protocol v2 (REST)."""

    def __init__(self, url: str, model_name: str, blobs: BlobStore, tls: ClientTls, auth: ClientAuth,
                 timeout_s: float = 30.0) -> None:
        import tritonclient.http as httpclient  # only a controller that scores needs it

        self._http = httpclient
        options = {name: str(path) for name, path in
                   (("ca_certs", tls.ca), ("certfile", tls.cert), ("keyfile", tls.key)) if path is not None}
        self._client = httpclient.InferenceServerClient(
            url=url, connection_timeout=timeout_s, network_timeout=timeout_s, ssl=tls.ca is not None, ssl_options=options,
        )
        self._model_name = model_name
        self._blobs = blobs
        self._auth = auth

    def _blob_rows(self, rows: list[tuple[str, ...]]) -> np.ndarray:
        """A BYTES [rows, most] tensor of blobs, base64 (KServe decodes REST BYTES as UTF-8 text: see the
        reward server), each row padded with empty elements."""
        most = max(len(row) for row in rows)
        return np.array(
            [[base64.b64encode(self._blobs.get(sha)) for sha in row] + [b""] * (most - len(row)) for row in rows],
            dtype=np.object_,
        ).reshape(len(rows), most)

    def score(self, served: list[ServedResponse]) -> tuple[list[float], str]:
        """The scores, and the version of the reward model that gave them."""
        tensors = [
            ("prompt", np.array([s.prompt_text.encode() for s in served], dtype=np.object_)),
            ("response", np.array([s.response_text.encode() for s in served], dtype=np.object_)),
            ("images", self._blob_rows([s.image_sha256s for s in served])),
            ("conversation", np.array([s.conversation.encode() for s in served], dtype=np.object_)),
        ]
        if any(s.audio_sha256s for s in served):
            tensors.append(("audio", self._blob_rows([s.audio_sha256s for s in served])))
        inputs = []
        for name, array in tensors:
            infer_input = self._http.InferInput(name, list(array.shape), "BYTES")
            infer_input.set_data_from_numpy(array)
            inputs.append(infer_input)
        token = self._auth.token()  # read per call: a rotated token is followed
        result = self._client.infer(self._model_name, inputs, headers={"authorization": f"Bearer {token}"} if token else None)
        return [float(score) for score in result.as_numpy("score")], result.get_response().get("model_version", "")

    def close(self) -> None:
        self._client.close()


class EvidenceCollector:
    """Tallies ratings, head-to-head preferences and reward scores of the canary and stable versions.

    reset() starts over for a rollout and re-reads both topics from the rollout's start time, so a
    restarted controller rebuilds exactly the evidence it had. poll() reads what arrived since. Users'
    ratings and preferences count up to each user's cap (modalign.feedback.caps), over the whole rollout.
    """

    def __init__(self, kafka: KafkaConfig, scorer: RewardScorer | None, user_cap: UserCap,
                 reward_batch: int = 32) -> None:
        self._kafka = kafka
        self._scorer = scorer
        self._user_cap = user_cap
        self._reward_batch = reward_batch
        self._consumer = make_consumer(kafka, group_id=None)
        self._partitions = [
            TopicPartition(kafka.topic(name), p)
            for name in ("generations", "feedback")
            for p in sorted(self._consumer.partitions_for_topic(kafka.topic(name)) or [])
        ]
        assign(self._consumer, self._partitions)
        self.canary = self.stable = ""
        self._votes: deque[_Vote] = deque(maxlen=MAX_VOTES)
        self._rewards: dict[str, Moments] = {}
        self._votes_added = 0
        self._tallied: tuple[int, Evidence] | None = None
        """The evidence as last tallied, after how many votes had been added."""
        self._served_by: OrderedDict[str, str] = OrderedDict()
        self._pending: OrderedDict[str, events_pb2.FeedbackReceived] = OrderedDict()
        self._unscored: deque[ServedResponse] = deque(maxlen=MAX_UNSCORED)
        self.reward_model_version: str | None = None
        """The reward model behind evidence.rewards: every score compared comes from one model."""

    def reset(self, canary: str, stable: str, since_ms: int) -> None:
        self.canary, self.stable = canary, stable
        self._votes.clear()
        self._votes_added = 0
        self._rewards.clear()
        self._tallied = None
        self._served_by.clear()
        self._pending.clear()
        self._unscored.clear()
        offsets = self._consumer.offsets_for_times({p: since_ms for p in self._partitions})
        for partition, found in offsets.items():
            if found is None:
                self._consumer.seek_to_end(partition)
            else:
                self._consumer.seek(partition, found.offset)

    @property
    def evidence(self) -> Evidence:
        """Every user's votes up to their cap, and the reward scores, since the rollout began."""
        if self._tallied is None or self._tallied[0] != self._votes_added:
            self._tallied = (self._votes_added, self._tally())
        return self._tallied[1]

    def _tally(self) -> Evidence:
        votes, dropped = capped(self._votes, lambda vote: vote.user_id, self._user_cap)
        VOTES_CAPPED.set(sum(dropped.values()))
        evidence = Evidence(rewards=self._rewards)
        for vote in votes:
            if vote.metric == "rating":
                evidence.moments("rating", vote.version).add(vote.score)
            elif vote.metric == "tie":
                evidence.ties += 1
            elif vote.version == self.canary:
                evidence.canary_wins += 1
            else:
                evidence.stable_wins += 1
        return evidence

    def poll(self, timeout_ms: int = 200) -> None:
        for partition, records in self._consumer.poll(timeout_ms=timeout_ms, max_records=5000).items():
            is_generation = partition.topic == self._kafka.topic("generations")
            for record in records:
                if is_generation:
                    if (generation := decode_record(events_pb2.GenerationLogged, record)) is not None:
                        self._add_generation(generation)
                elif (feedback := decode_record(events_pb2.FeedbackReceived, record)) is not None:
                    self._pending[record.key.decode(errors="replace") if record.key else str(record.offset)] = feedback
        self._resolve_pending()
        self._score_some()
        for kind, entries in (("served", self._served_by), ("votes", self._votes), ("pending", self._pending),
                              ("unscored", self._unscored)):
            EVIDENCE_ENTRIES.labels(kind).set(len(entries))

    def catch_up(self, max_seconds: float) -> bool:
        """Reads for up to max_seconds; True once everything written before the call has been read."""
        ends = self._consumer.end_offsets(self._partitions)
        deadline = time.monotonic() + max_seconds
        while True:
            self.poll()
            if all(self._consumer.position(p) >= ends[p] for p in self._partitions):
                return True
            if time.monotonic() > deadline:
                return False

    def close(self) -> None:
        self._consumer.close()
        if self._scorer is not None:
            self._scorer.close()

    def _add_generation(self, generation: events_pb2.GenerationLogged) -> None:
        if generation.policy_version not in (self.canary, self.stable):
            return
        self._served_by[generation.response_id] = generation.policy_version
        while len(self._served_by) > MAX_SERVED_RESPONSES:
            self._served_by.popitem(last=False)
        if self._scorer is not None:
            asked = conversation.logged(generation)
            self._unscored.append(ServedResponse(
                generation.policy_version, generation.prompt_text, generation.response_text,
                tuple(image.sha256 for image in generation.images), json.dumps(conversation.chat_messages(asked)),
                tuple(conversation.audio_keys(asked)),
            ))

    def _resolve_pending(self) -> None:
        for feedback_id in list(self._pending):
            if self._use(self._pending[feedback_id].feedback):
                del self._pending[feedback_id]
        while len(self._pending) > MAX_PENDING_FEEDBACK:
            self._pending.popitem(last=False)

    def _use(self, feedback) -> bool:
        """Counts one feedback if the versions of its responses are known; False to keep it pending."""
        kind = feedback.WhichOneof("kind")
        if kind == "rating":
            version = self._served_by.get(feedback.rating.response_id)
            if version is None:
                return False
            self._add_vote(_Vote(feedback.user_id, "rating", version, feedback.rating.score))
            return True
        if kind == "preference":
            chosen = self._served_by.get(feedback.preference.chosen_response_id)
            rejected = self._served_by.get(feedback.preference.rejected_response_id)
            if chosen is None or rejected is None:
                return False
            if chosen != rejected:  # a comparison within one version says nothing about canary vs stable
                self._add_vote(_Vote(feedback.user_id, "preference", chosen))
            return True
        if kind == "tie":
            first = self._served_by.get(feedback.tie.first_response_id)
            second = self._served_by.get(feedback.tie.second_response_id)
            if first is None or second is None:
                return False
            if first != second:
                self._add_vote(_Vote(feedback.user_id, "tie", ""))
            return True
        return True  # edits say a response needed fixing, not how two versions compare: not used here

    def _add_vote(self, vote: _Vote) -> None:
        self._votes.append(vote)
        self._votes_added += 1

    def _score_some(self) -> None:
        if self._scorer is None or not self._unscored:
            return
        batch = [self._unscored.popleft() for _ in range(min(self._reward_batch, len(self._unscored)))]
        try:
            scores, model_version = self._scorer.score(batch)
        except Exception as error:
            log.warning("reward service did not score %d responses (%s); they are skipped", len(batch), error)
            return
        if model_version != self.reward_model_version:
            # Scores of two reward models do not compare: start the reward evidence over with the new one.
            if self.reward_model_version is not None:
                log.info("reward model %s replaced %s: reward evidence starts over", model_version,
                         self.reward_model_version)
            self.reward_model_version = model_version
            self._rewards.clear()
        for served, score in zip(batch, scores):
            self._rewards.setdefault(served.version, Moments()).add(score)


SERVER_ERROR_CODES = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS"})


class TrafficScraper:
    """Requests, server errors and latency per version, summed over the policy replicas' /metrics.

    targets are host:port of metrics endpoints; a host with several addresses (a Kubernetes headless
    Service) means every replica behind it. Counts are taken relative to a baseline set by reset();
    a replica whose counters went backwards restarted, and counts from zero.
    """

    def __init__(self, targets: tuple[str, ...], timeout_s: float = 2.0) -> None:
        self._targets = targets
        self._timeout_s = timeout_s
        self._baseline: dict[tuple[str, str, str], float] = {}
        self._last: dict[tuple[str, str, str], float] = {}

    def reset(self) -> None:
        self._baseline = self._scrape()
        self._last = dict(self._baseline)

    def traffic(self, *versions: str) -> dict[str, Traffic]:
        """Each version's traffic since reset(), from one scrape of every replica."""
        current = self._scrape()
        self._last.update(current)
        requests = {v: 0.0 for v in versions}
        errors = {v: 0.0 for v in versions}
        buckets: dict[str, dict[float, float]] = {v: {} for v in versions}
        for (endpoint, name, labels), value in current.items():
            label_map = dict(part.split("=", 1) for part in labels.split(",") if part)
            version = label_map.get("policy_version")
            if version not in requests:
                continue
            base = self._baseline.get((endpoint, name, labels), 0.0)
            delta = value - base if value >= base else value
            if name == "modalign_policy_requests_total":
                requests[version] += delta
                errors[version] += delta if label_map.get("grpc_code") in SERVER_ERROR_CODES else 0.0
            elif name == "modalign_policy_request_seconds_bucket":
                bound = float(label_map["le"])
                buckets[version][bound] = buckets[version].get(bound, 0.0) + delta
        return {
            v: Traffic(int(requests[v]), int(errors[v]), quantile_from_buckets(buckets[v], 0.99)) for v in versions
        }

    def _scrape(self) -> dict[tuple[str, str, str], float]:
        samples = {}
        for endpoint in self._endpoints():
            try:
                with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=self._timeout_s) as response:
                    text = response.read().decode()
            except OSError as error:
                log.warning("could not scrape %s: %s", endpoint, error)
                # A replica that cannot be read keeps its last counts, so it neither adds nor loses traffic.
                samples.update({key: value for key, value in self._last.items() if key[0] == endpoint})
                continue
            for family in text_string_to_metric_families(text):
                if family.name not in ("modalign_policy_requests", "modalign_policy_request_seconds"):
                    continue
                for sample in family.samples:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    samples[(endpoint, sample.name, labels)] = sample.value
        return samples

    def _endpoints(self) -> list[str]:
        endpoints = []
        for target in self._targets:
            host, _, port = target.rpartition(":")
            try:
                addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)})
            except OSError as error:
                log.warning("could not resolve %s: %s", target, error)
                continue
            endpoints.extend(f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses)
        return endpoints


def quantile_from_buckets(buckets: dict[float, float], q: float) -> float:
    """The upper bound of the histogram bucket holding quantile q (conservative, like the bucket's
    edge); 0 without observations, inf when it lies past the largest finite bucket."""
    if not buckets:
        return 0.0
    total = buckets.get(math.inf, max(buckets.values()))
    if total <= 0:
        return 0.0
    for bound in sorted(buckets):
        if buckets[bound] >= q * total:
            return bound
    return math.inf
