"""A local Apache Kafka 4 broker (KRaft, one node acting as broker and controller).

Its jars come from Maven Central through deploy/kafka/pom.xml; its data lives in a directory that
survives restarts. The process is tracked by PID in that directory, so `stop` and `status` work from any
shell. This is for local runs and tests; clusters use Strimzi or an existing Kafka (see helm/).

`Cluster` runs several such nodes as one cluster (each a broker and a voter of the controller quorum,
each with its own data directory and PID file), with Kafka's internal topics replicated across them:
what the durability tests kill a broker of (tests/test_durability_cluster.py).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaAdminClient

from modalign.core.config import NOT_A_FLAG, add_arguments, build_config
from modalign.core.kafka import KafkaConfig, ensure_topics
from modalign.core.processes import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
DEFAULT_HOME = Path(os.environ.get("MODALIGN_HOME", Path.home() / ".local" / "share" / "modalign"))

LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
"""


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how the local broker runs."""

    data_dir: Path = DEFAULT_HOME / "kafka"
    """Broker data, which survives restarts: the log segments, the PID file, the rendered
    server.properties and broker.log."""
    port: int = 9092
    """Client port, bound on 127.0.0.1."""
    controller_port: int = 9093
    """KRaft controller port, bound on 127.0.0.1."""
    heap: str = "512m"
    """JVM -Xmx; the broker is idle most of the time in local runs."""
    # Not flags: MODALIGN_HOST and MODALIGN_LOG_LEVEL are the reward service's and every service's own,
    # and the rest describe a node of a Cluster, which code builds.
    host: str = field(default="127.0.0.1", metadata=NOT_A_FLAG)
    """Address both listeners bind and advertise."""
    log_level: str = field(default="WARN", metadata=NOT_A_FLAG)
    """Level of broker.log (log4j2)."""
    node_id: int = field(default=1, metadata=NOT_A_FLAG)
    """This node's id, as a broker and as a voter of the controller quorum."""
    quorum_voters: str = field(default="", metadata=NOT_A_FLAG)
    """The controller quorum, `id@host:port,...` over every voter's controller listener; empty: this node
    alone."""
    cluster_id: str = field(default="", metadata=NOT_A_FLAG)
    """The id the first start formats the data directory with; empty: a new random one. The nodes of one
    cluster must share it."""
    internal_replication_factor: int = field(default=1, metadata=NOT_A_FLAG)
    """Replicas of Kafka's internal topics: consumer offsets, transaction state, share-group state."""
    internal_min_insync_replicas: int = field(default=1, metadata=NOT_A_FLAG)
    """min.insync.replicas of those internal topics (the brokers' default, which the consumer offsets
    topic takes; the transaction and share-group state logs have settings of their own)."""

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def voters(self) -> str:
        return self.quorum_voters or f"{self.node_id}@{self.host}:{self.controller_port}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"


def jar_dir(pom: Path = POM) -> Path:
    """The classpath of a pom's dependencies (by default the broker's), resolved from Maven Central on
    first use and cached by Maven; the tests' S3 server (deploy/s3proxy) comes the same way."""
    lib = DEFAULT_HOME / f"{pom.parent.name}-lib" / hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    if not (lib / ".complete").exists():
        if shutil.which("mvn") is None:
            raise RuntimeError(f"resolving {pom} needs Maven (mvn) and Java 17+ on PATH")
        lib.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mvn", "-q", "-B", "-Dstyle.color=never", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={lib}"],
            check=True,
        )
        (lib / ".complete").touch()
    return lib


def _java(lib: Path, main_class: str, *args: str, heap: str = "256m", extra: tuple[str, ...] = ()) -> list[str]:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("the local Kafka broker needs Java 17+ on PATH")
    return [java, f"-Xmx{heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true", *extra,
            "-cp", f"{lib}/*", main_class, *args]


def _server_properties(config: BrokerConfig) -> str:
    replication, min_isr = config.internal_replication_factor, config.internal_min_insync_replicas
    return "\n".join([
        "process.roles=broker,controller",
        f"node.id={config.node_id}",
        f"controller.quorum.voters={config.voters}",
        f"listeners=PLAINTEXT://{config.host}:{config.port},CONTROLLER://{config.host}:{config.controller_port}",
        f"advertised.listeners=PLAINTEXT://{config.host}:{config.port}",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        f"log.dirs={config.data_dir / 'data'}",
        "num.partitions=1",
        "auto.create.topics.enable=false",
        *([f"min.insync.replicas={min_isr}"] if min_isr != 1 else []),
        f"offsets.topic.replication.factor={replication}",
        "offsets.topic.num.partitions=3",
        f"transaction.state.log.replication.factor={replication}",
        f"transaction.state.log.min.isr={min_isr}",
        f"share.coordinator.state.topic.replication.factor={replication}",
        f"share.coordinator.state.topic.min.isr={min_isr}",
        # A lone local broker has nobody to wait for before the first group rebalance.
        "group.initial.rebalance.delay.ms=0",
        "log.flush.interval.messages=1",
        "",
    ])


def running_pid(config: BrokerConfig) -> int | None:
    """The broker's PID when its process is alive, else None."""
    try:
        pid = int(config.pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and b"kafka.Kafka" not in cmdline.read_bytes():
        return None  # the PID was reused by an unrelated process
    return pid


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def start(config: BrokerConfig, timeout_s: float = 60.0) -> int:
    """Starts the broker (formatting its storage on first use) and waits until it takes clients.

    Returns its PID. Idempotent: an already running broker is left alone.
    """
    pid = running_pid(config)
    if pid is not None:
        return pid
    process = launch(config)
    _wait_listening(config, process, timeout_s)
    return process.pid


def new_cluster_id() -> str:
    """A random KRaft cluster id (a base64url UUID, as kafka-storage random-uuid makes)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def launch(config: BrokerConfig) -> subprocess.Popen:
    """Starts the broker's process, formatting its storage on first use, and writes its PID file; does
    not wait for it."""
    lib = jar_dir()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    properties = config.data_dir / "server.properties"
    properties.write_text(_server_properties(config))
    log4j = config.data_dir / "log4j2.properties"
    log4j.write_text(LOG4J2.format(log=config.log_file, level=config.log_level))
    logging_flag = (f"-Dlog4j2.configurationFile={log4j}",)
    if not (config.data_dir / "data" / "meta.properties").exists():
        cluster_id = config.cluster_id or new_cluster_id()
        subprocess.run(
            # "--cluster-id=ID" in one argument: an id starting with "-" (1 in 32) would read as a flag.
            _java(lib, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(properties),
                  extra=logging_flag),
            check=True, stdout=subprocess.DEVNULL,
        )
    with open(config.log_file, "ab") as out:
        process = subprocess.Popen(
            _java(lib, "kafka.Kafka", str(properties), heap=config.heap, extra=logging_flag),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    config.pid_file.write_text(str(process.pid))
    return process


def _wait_listening(config: BrokerConfig, process: subprocess.Popen, timeout_s: float) -> None:
    """Waits until the broker's client port takes connections; stops it if it does not in timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not port_open(config.host, config.port):
        if process.poll() is not None:
            raise RuntimeError(f"Kafka exited with {process.returncode}; see {config.log_file}")
        if time.monotonic() > deadline:
            stop(config)
            raise TimeoutError(f"Kafka did not listen on {config.bootstrap_servers} in {timeout_s:.0f}s")
        time.sleep(0.2)


def stop(config: BrokerConfig, timeout_s: float = 30.0) -> bool:
    """Stops the broker by PID: a clean shutdown first, SIGKILL past timeout_s. False if none ran."""
    return stop_all([config], timeout_s) == 1


def stop_all(configs: Sequence[BrokerConfig], timeout_s: float = 30.0) -> int:
    """Stops brokers by PID, all at once (the nodes of one cluster each need the others' quorum for a
    clean shutdown, so one by one the last would wait in vain): SIGTERM, then SIGKILL past timeout_s.
    Returns how many were running."""
    running = [(config, pid) for config in configs if (pid := running_pid(config)) is not None]
    for _, pid in running:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for config, pid in running:
        while _alive(pid):
            if time.monotonic() > deadline:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.1)
        config.pid_file.unlink(missing_ok=True)
    return len(running)


def kill(config: BrokerConfig) -> bool:
    """SIGKILLs the broker by PID, as a crash ends it (no clean shutdown, nothing flushed), and waits
    until it is gone. False if none ran."""
    pid = running_pid(config)
    if pid is None:
        return False
    _signal(pid, signal.SIGKILL)
    while _alive(pid):
        time.sleep(0.05)
    config.pid_file.unlink(missing_ok=True)
    return True


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it ended by itself meanwhile


def _alive(pid: int) -> bool:
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)  # our own child: reap it so it does not linger as a zombie
        if reaped == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass(frozen=True)
class Cluster:
    """Local nodes forming one KRaft cluster, each a broker and a voter of the controller quorum with
    its own data directory and PID file (each a BrokerConfig, started and stopped as above): started
    and stopped together, and one at a time killed or restarted, as a crash and its recovery would."""

    nodes: tuple[BrokerConfig, ...]
    """The nodes, node_id 1, 2, ... in this order."""

    @classmethod
    def on_free_ports(cls, data_dir: Path, size: int = 3, replication_factor: int = 3,
                      min_insync_replicas: int = 2, heap: str = "384m") -> Cluster:
        """size nodes on free loopback ports, node N's data in data_dir/node-N, sharing one new cluster
        id, with Kafka's internal topics replicated replication_factor times (min ISR min_insync_replicas)."""
        ports = [(free_port(), free_port()) for _ in range(size)]
        host = BrokerConfig.host
        voters = ",".join(f"{node_id}@{host}:{controller}" for node_id, (_, controller) in enumerate(ports, start=1))
        cluster_id = new_cluster_id()
        return cls(tuple(
            BrokerConfig(data_dir=data_dir / f"node-{node_id}", port=port, controller_port=controller, heap=heap,
                         node_id=node_id, quorum_voters=voters, cluster_id=cluster_id,
                         internal_replication_factor=replication_factor,
                         internal_min_insync_replicas=min_insync_replicas)
            for node_id, (port, controller) in enumerate(ports, start=1)
        ))

    @property
    def bootstrap_servers(self) -> str:
        """Every node's client address, comma-separated: clients reach the cluster while any one is up."""
        return ",".join(node.bootstrap_servers for node in self.nodes)

    def node(self, node_id: int) -> BrokerConfig:
        (node,) = (node for node in self.nodes if node.node_id == node_id)
        return node

    def start(self, timeout_s: float = 120.0) -> None:
        """Starts every node that is not running, all at once (a node waits for a quorum of the others),
        and waits until each is a registered broker, so a topic can have a replica on every node.
        Stops them all if they do not get there."""
        try:
            launched = [(node, launch(node)) for node in self.nodes if running_pid(node) is None]
            for node, process in launched:
                _wait_listening(node, process, timeout_s)
            self.wait_for_brokers(timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float = 30.0) -> int:
        """Stops every node by PID, all at once; returns how many were running."""
        return stop_all(self.nodes, timeout_s)

    def kill(self, node_id: int) -> bool:
        """SIGKILLs one node by PID, as a crash would; False if it was not running."""
        return kill(self.node(node_id))

    def restart(self, node_id: int, timeout_s: float = 120.0) -> int:
        """Starts one node again on its own data (after kill or stop) and waits until it is a registered
        broker again. Returns its PID."""
        pid = start(self.node(node_id), timeout_s)
        self.wait_for_brokers(timeout_s)
        return pid

    def brokers(self) -> set[int]:
        """The ids of the brokers the cluster has registered and not fenced, as its metadata says."""
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers.split(","), request_timeout_ms=5000)
        try:
            brokers = admin.describe_cluster()["brokers"]
            return {broker["broker_id"] for broker in brokers if not broker.get("is_fenced", False)}
        finally:
            admin.close()

    def wait_for_brokers(self, timeout_s: float = 120.0) -> None:
        """Waits until every node is a registered, unfenced broker."""
        wanted = {node.node_id for node in self.nodes}
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.brokers() == wanted:
                    return
            except Exception:  # no node answers yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"brokers {sorted(wanted)} were not all registered in {timeout_s:.0f}s")
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """`modalign kafka start|stop|status`."""
    parser = argparse.ArgumentParser(prog="modalign kafka", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    add_arguments(parser, BrokerConfig)
    args = parser.parse_args(argv)
    config = build_config(parser, BrokerConfig, args)
    if args.action == "start":
        pid = start(config)
        created = ensure_topics(KafkaConfig(bootstrap_servers=config.bootstrap_servers))
        print(f"kafka running, pid {pid}, bootstrap {config.bootstrap_servers}, data {config.data_dir}")
        for topic in created:
            print(f"created topic {topic}")
    elif args.action == "stop":
        print("kafka stopped" if stop(config) else "kafka was not running")
    else:
        running = running_pid(config)
        print(f"kafka running, pid {running}, bootstrap {config.bootstrap_servers}" if running else "kafka not running")
        return 0 if running else 3  # 3: "not running", as LSB init scripts report it
    return 0
