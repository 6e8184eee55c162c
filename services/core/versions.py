"""Following the policy-versions topic: the policy and reward services load each version as it is published."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

from kafka import TopicPartition

from modalign.core.kafka import KafkaConfig, make_consumer
from modalign.v1 import events_pb2

log = logging.getLogger(__name__)


def local_path(uri: str) -> Path:
    """The folder a file:// model-store URI names."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        raise ValueError(f"unsupported model store URI {uri!r}: only file:// (a shared volume) is supported")
    return Path(unquote(parsed.path))


class VersionFollower:
    """Tails policy-versions from the beginning on a daemon thread and calls on_version for each event.

    At start-up only the newest version published so far is passed on, so a replica that starts late
    loads one version, not the whole history. on_version runs on the follower's thread; an exception there is logged and the event skipped
    (a version that fails to load must not stop later ones from loading).
    """

    def __init__(self, config: KafkaConfig, on_version: Callable[[events_pb2.PolicyVersionPublished], None]) -> None:
        self._on_version = on_version
        self._consumer = make_consumer(config, group_id=None)
        self._partition = TopicPartition(config.topic("policy-versions"), 0)
        self._consumer.assign([self._partition])
        self._consumer.seek_to_beginning(self._partition)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="version-follower", daemon=True)

    def start(self) -> None:
        """Replays the versions published so far, then follows new ones in the background."""
        end = self._consumer.end_offsets([self._partition])[self._partition]
        newest = None
        while self._consumer.position(self._partition) < end:
            for records in self._consumer.poll(timeout_ms=500).values():
                newest = records[-1].value if records else newest
        if newest is not None:
            self._deliver(newest)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._consumer.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._poll()
            except Exception:
                log.warning("could not poll policy-versions; retrying", exc_info=True)
                self._stopping.wait(1.0)

    def _poll(self) -> None:
        for records in self._consumer.poll(timeout_ms=500).values():
            for record in records:
                self._deliver(record.value)

    def _deliver(self, value: bytes) -> None:
        event = events_pb2.PolicyVersionPublished.FromString(value)
        try:
            self._on_version(event)
        except Exception:
            log.exception("could not load version %s from %s", event.version, event.uri)
