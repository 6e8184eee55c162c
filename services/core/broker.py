"""A local Apache Kafka 4 broker (KRaft, one node acting as broker and controller).

Its jars come from Maven Central through deploy/kafka/pom.xml; its data lives in a directory that
survives restarts. The process is tracked by PID in that directory, so `stop` and `status` work from any
shell. This is for local runs and tests; clusters use Strimzi or an existing Kafka (see helm/).
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
from dataclasses import dataclass, field
from pathlib import Path

from modalign.core.config import NOT_A_FLAG, add_arguments, build_config
from modalign.core.kafka import KafkaConfig, ensure_topics

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
    # Not flags: MODALIGN_HOST and MODALIGN_LOG_LEVEL are the reward service's and every service's own.
    host: str = field(default="127.0.0.1", metadata=NOT_A_FLAG)
    log_level: str = field(default="WARN", metadata=NOT_A_FLAG)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

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
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@{config.host}:{config.controller_port}",
        f"listeners=PLAINTEXT://{config.host}:{config.port},CONTROLLER://{config.host}:{config.controller_port}",
        f"advertised.listeners=PLAINTEXT://{config.host}:{config.port}",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        f"log.dirs={config.data_dir / 'data'}",
        "num.partitions=1",
        "auto.create.topics.enable=false",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=3",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
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
    lib = jar_dir()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    properties = config.data_dir / "server.properties"
    properties.write_text(_server_properties(config))
    log4j = config.data_dir / "log4j2.properties"
    log4j.write_text(LOG4J2.format(log=config.log_file, level=config.log_level))
    logging_flag = (f"-Dlog4j2.configurationFile={log4j}",)
    if not (config.data_dir / "data" / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
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
    deadline = time.monotonic() + timeout_s
    while not port_open(config.host, config.port):
        if process.poll() is not None:
            raise RuntimeError(f"Kafka exited with {process.returncode}; see {config.log_file}")
        if time.monotonic() > deadline:
            stop(config)
            raise TimeoutError(f"Kafka did not listen on {config.bootstrap_servers} in {timeout_s:.0f}s")
        time.sleep(0.2)
    return process.pid


def stop(config: BrokerConfig, timeout_s: float = 30.0) -> bool:
    """Stops the broker by PID: a clean shutdown first, SIGKILL past timeout_s. False if none ran."""
    pid = running_pid(config)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    config.pid_file.unlink(missing_ok=True)
    return True


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
