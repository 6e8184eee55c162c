"""A real S3-compatible server for the tests: s3proxy (Apache jclouds' filesystem blob store) on loopback.

Its jars come from Maven Central through deploy/s3proxy/pom.xml, like the local Kafka broker's. The
server checks AWS signatures against one access key pair, so the clients under test authenticate as
they would against S3.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from modalign.core.broker import REPO_ROOT, jar_dir, port_open
from modalign.core.processes import free_port

POM = REPO_ROOT / "deploy" / "s3proxy" / "pom.xml"

LOGBACK = """\
<configuration>
  <appender name="file" class="ch.qos.logback.core.FileAppender">
    <file>{log}</file>
    <encoder><pattern>%d %level %logger - %msg%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="file"/></root>
</configuration>
"""


@dataclass
class S3Server:
    """A running s3proxy, its endpoint and the key pair it accepts."""

    process: subprocess.Popen
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    log_file: Path

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stops it by its PID: SIGTERM, SIGKILL past timeout_s."""
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start(data_dir: Path, timeout_s: float = 60.0) -> S3Server:
    """Starts s3proxy on a free loopback port, storing objects under data_dir; returns once it listens."""
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("the tests' S3 server (s3proxy) needs Java 17+ on PATH")
    lib = jar_dir(POM)
    (data_dir / "objects").mkdir(parents=True, exist_ok=True)
    port = free_port()
    endpoint_url, access_key_id, secret_access_key = f"http://127.0.0.1:{port}", "modalign-test", "modalign-test-secret"
    properties = data_dir / "s3proxy.properties"
    properties.write_text("\n".join([
        f"s3proxy.endpoint={endpoint_url}",
        "s3proxy.authorization=aws-v2-or-v4",
        f"s3proxy.identity={access_key_id}",
        f"s3proxy.credential={secret_access_key}",
        "jclouds.provider=filesystem",
        f"jclouds.filesystem.basedir={data_dir / 'objects'}",
        "",
    ]))
    logback = data_dir / "logback.xml"
    logback.write_text(LOGBACK.format(log=data_dir / "s3proxy.log"))
    with open(data_dir / "s3proxy.out", "ab") as out:
        process = subprocess.Popen(
            [java, "-Xmx256m", f"-Dlogback.configurationFile={logback}", "-cp", f"{lib}/*",
             "org.gaul.s3proxy.Main", "--properties", str(properties)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    server = S3Server(process, endpoint_url, access_key_id, secret_access_key, log_file=data_dir / "s3proxy.log")
    deadline = time.monotonic() + timeout_s
    while not port_open("127.0.0.1", port):
        if process.poll() is not None:
            raise RuntimeError(f"s3proxy exited with {process.returncode}; see {data_dir / 's3proxy.out'}")
        if time.monotonic() > deadline:
            server.stop()
            raise TimeoutError(f"s3proxy did not listen on {endpoint_url} in {timeout_s:.0f}s")
        time.sleep(0.1)
    return server
