"""Benchmark: how close to kafka-python's raw producer a gRPC front of Kafka can get on this machine, by
server and client architecture, before the feedback service's own work (issue 19's 60% target).

Each side B is a minimal server in a process of its own: Submit over gRPC turned into one acks=all
write of the FeedbackReceived the feedback service would write, answered once acknowledged. No
validation, no auth, no metrics, no de-duplication unless the mode says so. Side A is the baseline of
`modalign bench`'s ingestion_vs_raw_producer (bench/ingestion.py): kafka-python's KafkaProducer with
acks=all, the same records, 16 writer threads each waiting for its acknowledgement. The clients of B
are bench/ingestion.py's too, so the ratio B/A is the ceiling the feedback service's ratio cannot pass
with that architecture.

Modes (B):
  sync          grpc.server on a thread pool (as modalign's services), make_producer's
                kafka-python producer, each worker blocked on its write's future
  aio           grpc.aio server, the same producer, the future's callback resolving an asyncio future
                through loop.call_soon_threadsafe (no thread held per write)
  aio-confluent grpc.aio, confluent-kafka's producer (librdkafka, acks=all, idempotent): a native
                producer, needs `pip install confluent-kafka` (not a modalign dependency)
  aio-confluent-catchup  the same, plus the feedback service's de-duplication rule: before storing an
                id not seen, read the topic to its end offsets as of the call (looked up by one
                AdminClient.list_offsets shared by concurrent callers, read by a confluent-kafka
                consumer tailing the topic in a thread)
  aio-aiokafka  grpc.aio and aiokafka's producer on the same event loop (no producer thread);
                needs `pip install aiokafka` (not a modalign dependency)

Run from the repository root (it starts its own broker on free ports and stops it):

    .venv/bin/python benchmarks/ingestion_ceilings.py --modes sync aio --requests 600 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
from kafka import KafkaProducer

from modalign.bench.common import closed_loop, interleaved
from modalign.bench.ingestion import produce_directly, submit_over_grpc
from modalign.core import broker
from modalign.core.kafka import KafkaConfig, ensure_topics, make_producer, type_headers
from modalign.core.processes import free_port
from modalign.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc

MODES = ("sync", "aio", "aio-confluent", "aio-confluent-catchup", "aio-aiokafka")


def event_of(request: feedback_pb2.Feedback) -> events_pb2.FeedbackReceived:
    event = events_pb2.FeedbackReceived(feedback=request)
    event.received_at.GetCurrentTime()
    return event


def answer(request: feedback_pb2.Feedback, duplicate: bool = False) -> feedback_pb2.SubmitResponse:
    return feedback_pb2.SubmitResponse(feedback_id=request.feedback_id, duplicate=duplicate)


def serve_sync(kafka: KafkaConfig, port: int) -> None:
    producer, topic = make_producer(kafka), kafka.topic("feedback")

    class Servicer(feedback_pb2_grpc.FeedbackServiceServicer):
        def Submit(self, request, context):
            event = event_of(request)
            producer.send(topic, key=request.feedback_id.encode(), value=event.SerializeToString(),
                          headers=type_headers(event)).get(10)
            return answer(request)

    server = grpc.server(futures.ThreadPoolExecutor(32), maximum_concurrent_rpcs=128)
    feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


async def serve_aio(servicer: feedback_pb2_grpc.FeedbackServiceServicer, port: int) -> None:
    server = grpc.aio.server()
    feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def aio_kafka_python(kafka: KafkaConfig, port: int) -> None:
    producer, topic = make_producer(kafka), kafka.topic("feedback")

    class Servicer(feedback_pb2_grpc.FeedbackServiceServicer):
        async def Submit(self, request, context):
            loop = asyncio.get_running_loop()
            acknowledged = loop.create_future()

            def resolve(outcome) -> None:
                if not acknowledged.done():
                    if isinstance(outcome, BaseException):
                        acknowledged.set_exception(outcome)
                    else:
                        acknowledged.set_result(outcome)

            event = event_of(request)
            producer.send(topic, key=request.feedback_id.encode(), value=event.SerializeToString(),
                          headers=type_headers(event)).add_both(lambda outcome: loop.call_soon_threadsafe(resolve, outcome))
            await asyncio.wait_for(acknowledged, 10)
            return answer(request)

    await serve_aio(Servicer(), port)


async def aio_confluent(kafka: KafkaConfig, port: int, catch_up: bool) -> None:
    import confluent_kafka
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient, OffsetSpec

    loop, topic = asyncio.get_running_loop(), kafka.topic("feedback")
    common = {"bootstrap.servers": kafka.bootstrap_servers}
    producer = confluent_kafka.Producer({**common, "acks": "all", "enable.idempotence": True, "linger.ms": 2})
    threading.Thread(target=lambda: [producer.poll(0.1) for _ in iter(int, 1)], daemon=True).start()
    stored: dict[str, str] = {}
    positions: dict[int, int] = {}
    read = asyncio.Condition()

    if catch_up:
        admin = AdminClient(common)
        partitions = sorted(admin.list_topics(topic).topics[topic].partitions)
        consumer = confluent_kafka.Consumer({**common, "group.id": f"ceilings-{uuid.uuid4().hex}",
                                             "enable.auto.commit": False, "fetch.wait.max.ms": 100})
        consumer.assign([TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING) for p in partitions])

        async def notify() -> None:
            async with read:
                read.notify_all()

        def tail() -> None:
            while True:
                first = consumer.poll(0.2)
                for message in ([first, *consumer.consume(500, 0)] if first is not None else []):
                    if not message.error():
                        event = events_pb2.FeedbackReceived.FromString(message.value())
                        stored.setdefault(event.feedback.feedback_id, event.content_sha256)
                now = {tp.partition: max(tp.offset, 0) for tp in consumer.position([TopicPartition(topic, p) for p in partitions])}
                positions.update(now)
                asyncio.run_coroutine_threadsafe(notify(), loop)

        threading.Thread(target=tail, daemon=True).start()
        lookups = {"begun": 0, "ended": 0, "running": None, "ends": {}}

        async def end_offsets() -> dict[int, int]:
            """The end offsets as of a lookup begun after this call; concurrent callers share lookups."""
            wanted = lookups["begun"] + 1
            while lookups["ended"] < wanted:
                if lookups["running"] is None:
                    lookups["begun"] += 1
                    number = lookups["begun"]
                    pending = admin.list_offsets({TopicPartition(topic, p): OffsetSpec.latest() for p in partitions})
                    lookups["running"] = asyncio.gather(*(asyncio.wrap_future(f) for f in pending.values()))
                    try:
                        results = await lookups["running"]
                        lookups["ends"] = {tp.partition: r.offset for tp, r in zip(pending, results)}
                    finally:
                        lookups["ended"], lookups["running"] = number, None
                else:
                    await asyncio.wait([lookups["running"]])
                    await asyncio.sleep(0)
            return lookups["ends"]

        async def read_to_end() -> None:
            ends = await end_offsets()
            async with read:
                await read.wait_for(lambda: all(positions.get(p, 0) >= end for p, end in ends.items()))

    class Servicer(feedback_pb2_grpc.FeedbackServiceServicer):
        async def Submit(self, request, context):
            if catch_up and request.feedback_id not in stored:
                await asyncio.wait_for(read_to_end(), 5)
                if request.feedback_id in stored:
                    return answer(request, duplicate=True)
            acknowledged = loop.create_future()

            def delivered(error, message) -> None:
                def resolve() -> None:
                    if not acknowledged.done():
                        if error:
                            acknowledged.set_exception(RuntimeError(str(error)))
                        else:
                            acknowledged.set_result(message.offset())
                loop.call_soon_threadsafe(resolve)

            event = event_of(request)
            producer.produce(topic, key=request.feedback_id.encode(), value=event.SerializeToString(),
                             headers=type_headers(event), on_delivery=delivered)
            await asyncio.wait_for(acknowledged, 10)
            stored.setdefault(request.feedback_id, "")
            return answer(request)

    await serve_aio(Servicer(), port)


async def aio_aiokafka(kafka: KafkaConfig, port: int) -> None:
    import aiokafka

    producer = aiokafka.AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all",
                                         enable_idempotence=True, linger_ms=2)
    await producer.start()
    topic = kafka.topic("feedback")

    class Servicer(feedback_pb2_grpc.FeedbackServiceServicer):
        async def Submit(self, request, context):
            event = event_of(request)
            sent = await producer.send(topic, key=request.feedback_id.encode(), value=event.SerializeToString(),
                                       headers=type_headers(event))
            await asyncio.wait_for(sent, 10)
            return answer(request)

    await serve_aio(Servicer(), port)


def serve(mode: str, bootstrap_servers: str, prefix: str, port: int) -> None:
    kafka = KafkaConfig(bootstrap_servers=bootstrap_servers, topic_prefix=prefix)
    if mode == "sync":
        serve_sync(kafka, port)
    elif mode == "aio":
        asyncio.run(aio_kafka_python(kafka, port))
    elif mode.startswith("aio-confluent"):
        asyncio.run(aio_confluent(kafka, port, catch_up=mode.endswith("catchup")))
    else:
        asyncio.run(aio_aiokafka(kafka, port))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["sync", "aio"])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--serve", nargs=4, metavar=("MODE", "BOOTSTRAP", "PREFIX", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        mode, bootstrap_servers, prefix, port = args.serve
        serve(mode, bootstrap_servers, prefix, int(port))
        return
    work = Path(tempfile.mkdtemp(prefix="ingestion-ceilings-"))
    node = broker.BrokerConfig(data_dir=work / "kafka", port=free_port(), controller_port=free_port())
    broker.start(node)
    try:
        raw = KafkaConfig(bootstrap_servers=node.bootstrap_servers, topic_prefix=f"raw-{uuid.uuid4().hex[:6]}.")
        ensure_topics(raw)
        producer = KafkaProducer(**raw.client_kwargs(), acks="all")
        for mode in args.modes:
            prefix, port = f"{mode}-{uuid.uuid4().hex[:6]}.", free_port()
            ensure_topics(KafkaConfig(bootstrap_servers=node.bootstrap_servers, topic_prefix=prefix))
            server = subprocess.Popen([sys.executable, __file__, "--serve", mode, node.bootstrap_servers, prefix, str(port)])
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=1)
                        break
                    except grpc.FutureTimeoutError:
                        if server.poll() is not None:
                            raise SystemExit(f"the {mode} server exited with {server.returncode}") from None
                time.sleep(2)  # the producer (and the catch-up's consumer) connect on first use or at start
                address = f"127.0.0.1:{port}"
                passes = interleaved({
                    "A": lambda: closed_loop(produce_directly(producer, raw.topic("feedback")), args.requests, args.concurrency),
                    "B": lambda address=address: closed_loop(lambda: None, args.requests, args.concurrency,
                                                             connect=submit_over_grpc(address)),
                }, args.repeats)
            finally:
                server.terminate()
                server.wait()
            ratios = [b.per_s / a.per_s for a, b in zip(passes["A"], passes["B"])]
            print(f"{mode}: B/A median {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}); "
                  f"A {[round(p.per_s) for p in passes['A']]} B {[round(p.per_s) for p in passes['B']]} records/s",
                  flush=True)
        producer.close()
    finally:
        broker.stop(node)


if __name__ == "__main__":
    main()
