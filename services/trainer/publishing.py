"""Publishing a version that passed the gate: the policy and its reward model into the model store,
then a PolicyVersionPublished event. A LoRA trainer's version is its adapter alone; the base it adapts
is published once, as the full version base-<digest of its files>, and every adapter's manifest names it.

Idempotent, so a trainer that crashed between its checkpoint and the event publishes on restart
without writing anything twice: a version already in the store is not written again (the store
commits a version atomically, by its manifest), and a version already announced on the topic (the
crash came after the event, before the checkpoint that says so) is not announced again.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

from modalign.core.kafka import DurableProducer, KafkaConfig, read_topic
from modalign.core.modelstore import ChecksumMismatch, Manifest, folder_digests, read_manifest
from modalign.core.version_names import next_policy_version, reward_version_for
from modalign.trainer.gate import VERSIONS
from modalign.trainer.models import Models
from modalign.trainer.state import PendingVersion
from modalign.v1 import events_pb2

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, store, producer: DurableProducer, kafka: KafkaConfig, algorithm: str) -> None:
        self.store, self.producer, self.kafka, self.algorithm = store, producer, kafka, algorithm
        self._base: dict[str, str] | None = None

    def next_version(self, parent: str) -> str:
        """The name after every policy version in the store and the parent (which may be rolled back, or
        missing from a store that was emptied)."""
        return next_policy_version(*self.store.versions("policy"), parent)

    def publish(self, pending: PendingVersion, models: Models, recovering: bool = False) -> None:
        """Writes the version and announces it; recovering: after a restart, when it may already have been."""
        version = pending.version
        published = self.store.lookup("policy", version)
        if published is None:  # else a crash came after the version was written, before the event
            manifest = Manifest(version=version, kind="policy", parent=pending.parent, algorithm=self.algorithm,
                                trained_through=pending.trained_through, eval_metrics=pending.eval_metrics,
                                base=self.base(models) if models.adapts_base else {})
            published = self.store.publish(manifest, models.export_policy)
        reward_version = reward_version_for(version)
        if self.store.lookup("reward", reward_version) is None:
            self.store.publish(Manifest(version=reward_version, kind="reward", parent=pending.parent),
                               models.export_reward)
        event = events_pb2.PolicyVersionPublished(
            version=version, parent_version=pending.parent, uri=published.uri,
            manifest_sha256=published.manifest_sha256, algorithm=self.algorithm,
            trained_through=[events_pb2.PartitionOffset(**p) for p in pending.trained_through],
            eval_metrics=pending.eval_metrics, reward_model_version=reward_version,
            passed_over=[events_pb2.OffsetRange(**r) for r in pending.passed_over],
        )
        event.published_at.GetCurrentTime()
        if recovering and any(e.version == version for e in read_topic(self.kafka, "policy-versions",
                                                                        events_pb2.PolicyVersionPublished)):
            log.info("policy %s was announced before the restart: not again", version)
            return
        self.producer.produce(self.kafka.topic("policy-versions"), [(version, event)], self.kafka.produce_timeout_s)
        VERSIONS.labels("published").inc()
        log.info("published policy %s (parent %s): %s", version, pending.parent, pending.eval_metrics)

    def base(self, models: Models) -> dict[str, str]:
        """{"version", "manifest_sha256"} of the base a LoRA trainer's versions adapt; published the first
        time (by this trainer or an earlier one: the name follows from the files)."""
        if self._base is None:
            with tempfile.TemporaryDirectory(prefix="modalign-base-") as staging:
                models.export_base(Path(staging))
                files = "".join(f"{path}\0{sha256}\n" for path, sha256 in folder_digests(staging).items())
                name = f"base-{hashlib.sha256(files.encode()).hexdigest()[:16]}"
                published = self.store.lookup("policy", name)
                if published is None:
                    published = self.store.publish(
                        Manifest(version=name, kind="policy"),
                        lambda folder: shutil.copytree(staging, folder, dirs_exist_ok=True))
                    log.info("published %s, the base of this trainer's LoRA versions", name)
            self._base = {"version": name, "manifest_sha256": published.manifest_sha256}
        return self._base

    def foreign_adapter(self, version: str, models: Models) -> str | None:
        """Why a LoRA trainer must not go back to version (a full checkpoint, or an adapter on another
        base than its own); None when it may, or when version cannot be read (going back says why)."""
        try:
            base = read_manifest(self.store.fetch("policy", version)).base.get("version")
        except (LookupError, ValueError, ChecksumMismatch):
            return None
        own = self.base(models)["version"]
        if base == own:
            return None
        return f"it adapts {base}, not this trainer's base {own}" if base else "it is a full checkpoint, not an adapter"
