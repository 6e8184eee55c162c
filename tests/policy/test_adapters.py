"""LoRA adapter versions served on one base: the same tokens as their merged checkpoints, batches that mix
versions, and canary, promotion and rollback as adapter switches with no failed request.

A real model store in a folder holds the base (the tiny default policy, saved) and adapter versions
made with PEFT; the policy service's own PublishedVersions and VersionRouter load them, fed the
policy-versions records the trainer would write (the Kafka path itself: tests/rollout/test_canary.py).
"""

from __future__ import annotations

import copy
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from modalign.core.kafka import KafkaConfig
from modalign.core.modelstore import MANIFEST, DirectoryStore, Manifest
from modalign.policy.adapters import ADAPTER_FOLDER, WEIGHTS
from modalign.policy.batcher import DynamicBatcher
from modalign.policy.engine import GenerationRequest, PolicyEngine, SamplingParams
from modalign.policy.model import format_prompt, load_policy, save_policy
from modalign.policy.routing import Routes, VersionRouter
from modalign.policy.server import PolicyConfig, PublishedVersions
from modalign.trainer.lora import default_target_modules
from modalign.v1 import events_pb2

from tests.policy.test_routing import record, under_load

QUESTIONS = ("What colour is the square?", "Where is the circle?", "How many shapes are there?", "Hello")


@pytest.fixture(scope="module")
def store(policy, tmp_path_factory: pytest.TempPathFactory) -> DirectoryStore:
    """base-0 (the tiny policy, also saved as start/, the folder a replica starts from), adapters v1-v3 on
    it, and v9, an adapter on another base (another seed's weights, published as base-9)."""
    model, processor = policy
    root = tmp_path_factory.mktemp("adapters")
    save_policy(model, processor, root / "start")
    store = DirectoryStore(root / "store")
    bases = {}
    for name, weights in (("base-0", model), ("base-9", _perturbed(model))):
        save_policy(weights, processor, root / name)
        published = store.publish(Manifest(version=name, kind="policy"),
                                  lambda folder, name=name: shutil.copytree(root / name, folder, dirs_exist_ok=True))
        bases[name] = {"version": name, "manifest_sha256": published.manifest_sha256}
    for version, seed, base in (("v1", 1, "base-0"), ("v2", 2, "base-0"), ("v3", 3, "base-0"), ("v9", 9, "base-9")):
        store.publish(Manifest(version=version, kind="policy", base=bases[base]),
                      lambda folder, seed=seed: _adapter(model, seed).save_pretrained(folder / ADAPTER_FOLDER))
    return store


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return other


def _adapter(model: torch.nn.Module, seed: int):
    """A rank-4 adapter with random weights (PEFT's identity start would serve the base's tokens)."""
    torch.manual_seed(seed)
    base = copy.deepcopy(model)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=default_target_modules(base),
                                           init_lora_weights=False))


def request(processor, question: str, version: str = "", temperature: float = 0.0, n: int = 1) -> GenerationRequest:
    return GenerationRequest(format_prompt(processor, question, 0), [],
                             SamplingParams(temperature=temperature, max_new_tokens=8, seed=7), n=n, version=version)


def token_ids(engine: PolicyEngine, requests: list[GenerationRequest]) -> list[list[list[int]]]:
    return [[sample.token_ids for sample in samples] for samples in engine.generate(requests)]


def test_an_adapter_version_serves_the_tokens_of_its_merged_checkpoint(policy, store: DirectoryStore) -> None:
    model, processor = policy
    shared = PolicyEngine(copy.deepcopy(model), processor, "v0")
    for version in ("v1", "v2"):
        folder = store.fetch("policy", version)
        shared.add_adapter(version, folder)
        merged = PolicyEngine(*load_policy(folder), policy_version=version)
        greedy = [request(processor, q) for q in QUESTIONS]
        assert token_ids(shared, [request(processor, q, version) for q in QUESTIONS]) == token_ids(merged, greedy)
    base = token_ids(PolicyEngine(model, processor, "v0"), [request(processor, q) for q in QUESTIONS])
    assert token_ids(shared, [request(processor, q) for q in QUESTIONS]) == base  # the base's own rows: no adapter
    assert token_ids(shared, [request(processor, q, "v1") for q in QUESTIONS]) != base


def test_a_batch_mixing_versions_gives_each_row_the_tokens_it_gets_alone(policy, store: DirectoryStore) -> None:
    model, processor = policy
    engine = PolicyEngine(copy.deepcopy(model), processor, "v0")
    for version in ("v1", "v2"):
        engine.add_adapter(version, store.fetch("policy", version))
    mixed = [request(processor, q, version, temperature=1.0, n=2)
             for q, version in zip(QUESTIONS * 2, ("v0", "v1", "v2", "v1", "v2", "v0", "v2", "v1"))]
    together = engine.generate(mixed)
    for alone, samples in zip([engine.generate([r])[0] for r in mixed], together):
        assert [s.token_ids for s in samples] == [s.token_ids for s in alone]
        for sample, single in zip(samples, alone):
            assert sample.logprobs == pytest.approx(single.logprobs, abs=1e-5)
    assert [samples[0].policy_version for samples in together] == ["v0", "v1", "v2", "v1", "v2", "v0", "v2", "v1"]
    assert len({tuple(s[0].token_ids) for s in together[:3]}) == 3  # three versions, three answers
    engine.remove_adapter("v1")
    with pytest.raises(ValueError, match="not v1"):
        engine.generate([request(processor, "Hello", "v1")])
    engine.remove_adapter("v2")
    assert not any("lora_" in name for name, _ in engine.model.named_parameters())  # the plain model again


def published_versions(policy, store: DirectoryStore, initial_folder: Path | None):
    """A replica's PublishedVersions and VersionRouter on store, started from initial_folder's model
    (or the built-in one), every version in the store announced."""
    model, processor = policy
    config = PolicyConfig(model_store=str(store.root), kafka=KafkaConfig(topic_prefix="t."))
    initial = PolicyEngine(copy.deepcopy(model), processor, "v0")
    versions = PublishedVersions(config, initial, initial_folder)
    for version in ("v1", "v2", "v3", "v9"):
        published = store.lookup("policy", version)
        versions.update([record("t.policy-versions", events_pb2.PolicyVersionPublished(
            version=version, uri=published.uri, manifest_sha256=published.manifest_sha256))])
    router = VersionRouter(initial, versions.load_engine, lambda engine: DynamicBatcher(engine, max_batch_rows=8, max_wait_ms=1))
    return initial, versions, router


def test_canary_promotion_and_rollback_switch_adapters_on_one_base_with_no_failed_request(
    policy, store: DirectoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, processor = policy
    initial, versions, router = published_versions(policy, store, store.root.parent / "start")
    added: list[str] = []
    add_adapter = PolicyEngine.add_adapter
    monkeypatch.setattr(PolicyEngine, "add_adapter", lambda self, version, folder: (
        added.append(version), add_adapter(self, version, folder))[-1])
    steps = (Routes("v0", "v1", 50), Routes("v1"), Routes("v1", "v2", 50), Routes("v1"),  # v2 rolled back
             Routes("v1", "v3", 50), Routes("v3"), Routes("v1"))  # v3 promoted, then v1 again: the previous stable
    try:
        with under_load(router, lambda: request(processor, "Hello", temperature=1.0, n=2), clients=3) as (failures, served):
            for routes in steps:
                assert router.apply(routes) == routes
                time.sleep(0.3)
        assert not failures
        assert served == {"v0", "v1", "v2", "v3"}
        # Every adapter went onto the replica's own model, the base's files being the ones it started
        # from; each was read once, v1 not again when it became stable again; v2 was removed after its
        # last request, v3 is kept as the previous stable.
        assert added == ["v1", "v2", "v3"] and not versions._bases
        _drain(router)
        assert initial.versions == {"v0", "v1", "v3"}
    finally:
        router.close()


def _drain(router: VersionRouter) -> None:
    """Waits until the actions queued behind requests (adapter removals) have run."""
    done = threading.Event()
    router._batchers[router.routes.stable].after_queued(done.set)
    assert done.wait(30)


def test_adapters_share_a_base_loaded_from_the_store_when_the_replica_started_elsewhere(
    policy, store: DirectoryStore
) -> None:
    initial, versions, router = published_versions(policy, store, None)  # the built-in model: not base-0's files
    try:
        assert router.apply(Routes("v1", "v2", 50)) == Routes("v1", "v2", 50)
        base = versions._bases["base-0"]
        assert base.versions == {"base-0", "v1", "v2"} and initial.versions == {"v0"}
        assert router._batchers["v1"] is router._batchers["v2"]  # one engine, one batcher, mixed batches
    finally:
        router.close()


def test_a_corrupted_adapter_or_one_on_another_base_is_refused_and_the_current_version_keeps_serving(
    policy, store: DirectoryStore, tmp_path: Path
) -> None:
    _, processor = policy
    shutil.copytree(store.root.parent, tmp_path, dirs_exist_ok=True)
    damaged = DirectoryStore(tmp_path / "store")
    weights = damaged.root / "policy" / "v2" / ADAPTER_FOLDER / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    # v3 names base-0 and the sha256 of base-9's manifest: the base it was trained on is not in the store.
    manifest = json.loads((damaged.root / "policy" / "v3" / MANIFEST).read_text())
    manifest["base"]["manifest_sha256"] = damaged.lookup("policy", "base-9").manifest_sha256
    (damaged.root / "policy" / "v3" / MANIFEST).write_text(json.dumps(manifest))
    initial, versions, router = published_versions(policy, damaged, damaged.root.parent / "start")
    try:
        assert router.apply(Routes("v1")) == Routes("v1")
        before = router.submit("s", request(processor, "Hello", n=1))[1].result(timeout=60)
        assert router.apply(Routes("v1", "v2", 100)) == Routes("v1")  # corrupted: no traffic
        assert router.apply(Routes("v3")) == Routes("v1")  # another base: the stable stays
        assert router.apply(Routes("v9")) == Routes("v9")  # on its own base, loaded beside
        assert router.apply(Routes("v1")) == Routes("v1")
        after = router.submit("s", request(processor, "Hello", n=1))[1].result(timeout=60)
        assert [s.token_ids for s in after] == [s.token_ids for s in before] and after[0].policy_version == "v1"
    finally:
        router.close()
