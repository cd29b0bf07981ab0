"""A real Apache Kafka broker on loopback, without Docker: the JVM broker from Maven Central.

`ApacheKafkaBroker` has the shape of `EmbeddedBroker` (broker.py) but runs Apache Kafka
`KAFKA_VERSION` itself: one combined KRaft node (broker and controller), storage in a temporary
directory removed on `stop()`. Use it where Tansu's gaps matter (see
docs/ARCHITECTURE.md#the-embedded-broker-tansu-and-its-measured-gaps): consumer-group protocols (classic
and KIP-848 `group.protocol=consumer`), transactions, exact offsets.

What it needs: `java` 17+ (`JAVA_HOME/bin/java`, else `java` on PATH) and, the first time only,
`mvn` with Maven Central reachable. `resolve()` runs

    mvn -q -f apache_kafka_pom.xml -Dkafka.version=KAFKA_VERSION dependency:copy-dependencies ...

into `<repo>/.cache/apache-kafka-<version>/libs` and writes a marker there when it succeeds; later
runs find the marker and never call mvn. `APACHE_KAFKA_LIBS=<dir of jars>` skips Maven altogether.
The pom adds the log4j2 backend kafka_2.13's own pom leaves out; the broker logs at WARN to
`log_path` (stdout, stderr and log4j2's file appender all go there).

`KAFKA_VERSION` is the one place the version is written in Python; the pom takes it as
-Dkafka.version, and docker-compose.yml's `apache/kafka:` tag must match it (its test checks).
4.4.0 is the newest release Maven Central serves here, and it runs on Java 17: every class on its
runtime classpath is Java 17 bytecode (major 61; 4.1.1 to 4.3.1 are the same) and the broker tests
pass on OpenJDK 17.0.15. In 4.x the KIP-848 consumer protocol is on by default, so
`group.coordinator.rebalance.protocols` is not set (4.4 deprecates it and warns when it is).

Measured on the development machine (2 CPUs, OpenJDK 17.0.15, Kafka 4.4.0, heap 256m, G1):
- first `resolve()`, empty Maven repository: ~4.7 s (45 jars, ~43 MB; ~65 MB into ~/.m2 with
  the Maven plugins); with ~/.m2 warm ~2 s; from the cache (marker present): no mvn, < 0.1 ms.
- cold start with cached jars, `start()` until it returns (storage format ~0.8 s in its own JVM,
  then the broker up and answering metadata): median ~3.0 s over 5 runs (2.9-3.6 s).
- RSS: ~325 MB idle after start-up, ~340 MB after 20k small messages; besides the touched part of
  the heap that is metaspace, code cache, thread stacks and G1's own structures.
- Not used, measured for reference: `-XX:TieredStopAtLevel=1` (C1 only) starts ~0.4 s faster at
  ~305 MB; an AppCDS archive (`-XX:ArchiveClassesAtExit` once, then `-XX:SharedArchiveFile`)
  starts in ~1.8 s at ~300 MB; SerialGC instead of G1 saves no memory (~345 MB).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import ClassVar

from worker.kafka.broker import BrokerNotFound, free_port, serve_in_foreground, stop_process, wait_for_port

KAFKA_VERSION = "4.4.0"

POM = Path(__file__).resolve().with_name("apache_kafka_pom.xml")
REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache"
MARKER = ".resolved"
LIBS_ENV = "APACHE_KAFKA_LIBS"
MVN_TIMEOUT = 900.0

# kafka-run-class.sh's defaults, minus the GC logging and JMX.
JVM_OPTIONS: tuple[str, ...] = (
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)

log = logging.getLogger(__name__)


class ApacheKafkaNotFound(BrokerNotFound):
    """`java` or `mvn` is missing, or the broker's jars could not be resolved."""


# -- finding java, resolving the jars ---------------------------------------------------------------


def find_java() -> str:
    """`JAVA_HOME/bin/java`, else `java` on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("java")
    if on_path:
        return on_path
    where = f"JAVA_HOME={java_home!r} has no bin/java and " if java_home else ""
    raise ApacheKafkaNotFound(
        f"no `java`: {where}none on PATH; Apache Kafka {KAFKA_VERSION} needs a Java 17+ runtime (e.g. openjdk-17-jre)"
    )


def libs_dir(version: str = KAFKA_VERSION) -> Path:
    """Where `resolve()` keeps the jars for `version`."""
    return CACHE_DIR / f"apache-kafka-{version}" / "libs"


def _marker_text(version: str) -> str:
    # The pom's digest too: changing it (say, the log4j2 version) resolves again.
    return f"kafka_2.13 {version} pom-sha256 {hashlib.sha256(POM.read_bytes()).hexdigest()}\n"


def _is_resolved(libs: Path, version: str) -> bool:
    try:
        return (libs / MARKER).read_text() == _marker_text(version)
    except OSError:
        return False


def _check_jars(libs: Path, version: str) -> None:
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise ApacheKafkaNotFound(f"{libs} holds no kafka_2.13-*.jar (expected the jars of Apache Kafka {version})")


def resolve(version: str = KAFKA_VERSION, libs: Path | None = None) -> Path:
    """The directory of jars the broker runs from, resolving them with Maven the first time.

    Unless `libs` is given, `APACHE_KAFKA_LIBS` (an existing directory of jars) wins and is used as
    it is. Otherwise `libs` (default `libs_dir(version)`) is used if its marker file is there; if not, mvn copies the
    dependencies of apache_kafka_pom.xml into a fresh directory beside it, which is renamed into place
    with the marker in it only once mvn has succeeded. A lock file serialises concurrent resolves.
    """
    explicit = os.environ.get(LIBS_ENV)
    if explicit and libs is None:
        path = Path(explicit)
        if not path.is_dir():
            raise ApacheKafkaNotFound(f"{LIBS_ENV}={explicit!r} is not a directory")
        _check_jars(path, version)
        return path
    libs = libs if libs is not None else libs_dir(version)
    if _is_resolved(libs, version):
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_resolved(libs, version):  # another process resolved while we waited
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise ApacheKafkaNotFound(
                f"no `mvn` on PATH: Maven is needed once to fetch org.apache.kafka:kafka_2.13:{version} "
                f"into {libs} (or set {LIBS_ENV} to a directory holding the broker's jars)"
            )
        partial = Path(tempfile.mkdtemp(prefix="libs.partial-", dir=libs.parent))
        try:
            command = [
                mvn,
                "-q",
                "-B",
                "-f",
                str(POM),
                f"-Dkafka.version={version}",
                "dependency:copy-dependencies",
                f"-DoutputDirectory={partial}",
            ]
            log.info("resolving Apache Kafka %s with Maven into %s", version, libs)
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=MVN_TIMEOUT, check=False)
            except subprocess.TimeoutExpired as exc:
                raise ApacheKafkaNotFound(f"mvn did not resolve kafka_2.13:{version} in {MVN_TIMEOUT:.0f}s") from exc
            if done.returncode != 0:
                output = (done.stdout + done.stderr).strip()[-3000:]
                raise ApacheKafkaNotFound(
                    f"mvn could not resolve org.apache.kafka:kafka_2.13:{version} (exit {done.returncode}):\n{output}"
                )
            _check_jars(partial, version)
            (partial / MARKER).write_text(_marker_text(version))
            partial.chmod(0o755)  # mkdtemp made it private
            if libs.exists():  # a stale or half-written directory from before: replace it
                shutil.rmtree(libs)
            partial.rename(libs)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return libs


# -- the broker -------------------------------------------------------------------------------------


def cluster_id() -> str:
    """A random cluster id as `kafka-storage.sh random-uuid` prints it: 16 bytes, url-safe base64, no
    padding, never starting with '-' (Kafka's Uuid.randomUuid avoids that, it reads as an option)."""
    while True:
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not value.startswith("-"):
            return value


def _properties(values: dict[str, object]) -> str:
    return "".join(f"{key}={value}\n" for key, value in values.items())


def _tail(path: Path | None, limit: int = 4000) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class ApacheKafkaBroker:
    """A single-node Apache Kafka (KRaft) process on loopback. Use as a context manager, or start()/stop()."""

    kind = "apache-kafka"
    client_workarounds: ClassVar[dict[str, str]] = {}  # clients get the settings users get

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        heap: str = "256m",
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.controller_port: int | None = None
        self.log_path = log_path
        self.heap = heap
        self.workdir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def server_properties(self, data_dir: Path, controller_port: int) -> dict[str, object]:
        controller = f"{self.host}:{controller_port}"
        return {
            "process.roles": "broker,controller",
            "node.id": 1,
            # The 4.x (KIP-853) form: a dynamic quorum, formatted with --standalone.
            "controller.quorum.bootstrap.servers": controller,
            "listeners": f"PLAINTEXT://{self.bootstrap_servers},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{self.bootstrap_servers}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": data_dir,
            "num.partitions": 1,
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
        }

    @staticmethod
    def log4j2_properties(log_file: Path) -> str:
        return _properties(
            {
                "status": "warn",
                "appender.file.type": "File",
                "appender.file.name": "FILE",
                "appender.file.fileName": log_file,
                "appender.file.append": "true",
                "appender.file.layout.type": "PatternLayout",
                "appender.file.layout.pattern": "[%d] %p %m (%c)%n",
                "rootLogger.level": "WARN",
                "rootLogger.appenderRef.file.ref": "FILE",
            }
        )

    def _java(self, java: str, libs: Path, log4j2: Path, main: str, *args: str) -> list[str]:
        return [
            java,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            *JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={log4j2}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def start(self, timeout: float = 60.0) -> ApacheKafkaBroker:
        """Format fresh storage, start the broker, return once it answers a metadata request.

        `timeout` covers formatting and start-up, not a first-time Maven resolve (see `resolve`).
        """
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"broker already running (pid {self.process.pid})")
        java = find_java()
        libs = resolve()
        deadline = time.monotonic() + timeout
        self.workdir = Path(tempfile.mkdtemp(prefix="apache-kafka-"))
        try:
            return self._start(java, libs, deadline, timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, java: str, libs: Path, deadline: float, timeout: float) -> ApacheKafkaBroker:
        assert self.workdir is not None
        log_file = self.log_path or self.workdir / "broker.log"
        self.controller_port = free_port(self.host)
        while self.controller_port == self.port:
            self.controller_port = free_port(self.host)
        properties = self.workdir / "server.properties"
        properties.write_text(_properties(self.server_properties(self.workdir / "data", self.controller_port)))
        log4j2 = self.workdir / "log4j2.properties"
        log4j2.write_text(self.log4j2_properties(log_file))

        format_command = self._java(
            java, libs, log4j2, "kafka.tools.StorageTool", "format", "-t", cluster_id(), "-c", str(properties),
            "--standalone",
        )  # fmt: skip
        try:
            formatted = subprocess.run(
                format_command, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic())
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"kafka-storage format did not finish in {timeout}s") from exc
        if formatted.returncode != 0:
            raise RuntimeError(
                f"kafka-storage format failed (exit {formatted.returncode}):\n"
                f"{(formatted.stdout + formatted.stderr).strip()[-3000:]}"
            )

        with open(log_file, "ab") as out:
            self.process = subprocess.Popen(
                self._java(java, libs, log4j2, "kafka.Kafka", str(properties)),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._wait_ready(deadline, timeout, log_file)
        return self

    def _exited(self, log_file: Path) -> RuntimeError:
        assert self.process is not None
        return RuntimeError(
            f"Apache Kafka exited with {self.process.returncode} before answering on {self.bootstrap_servers} "
            f"(port in use?); log {log_file}:\n{_tail(log_file)}"
        )

    def _wait_ready(self, deadline: float, timeout: float, log_file: Path) -> None:
        """The port first (cheap, and it notices the process dying), then a real metadata answer."""
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                raise self._exited(log_file)
            try:
                wait_for_port(self.host, self.port, min(0.5, max(0.0, deadline - time.monotonic())))
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"Apache Kafka did not listen on {self.bootstrap_servers} in {timeout}s; "
                        f"log {log_file}:\n{_tail(log_file)}"
                    ) from None

        from confluent_kafka.admin import AdminClient

        quiet = logging.getLogger(f"{__name__}.admin")  # librdkafka's connection errors while it starts
        quiet.setLevel(logging.CRITICAL)
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "logger": quiet})
        last: Exception | None = None
        while True:
            if self.process.poll() is not None:
                raise self._exited(log_file)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"Apache Kafka on {self.bootstrap_servers} answered no metadata request in {timeout}s "
                    f"({last}); log {log_file}:\n{_tail(log_file)}"
                )
            try:
                metadata = admin.list_topics(timeout=min(2.0, max(0.1, remaining)))
                if metadata.brokers:
                    return
            except Exception as exc:  # KafkaException: not ready yet
                last = exc
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (Kafka shuts down cleanly), SIGKILL after `timeout`; then remove the storage."""
        stop_process(self.process, timeout)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> ApacheKafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_foreground(port: int, host: str = "127.0.0.1") -> int:
    """`segment-worker broker --apache-kafka`."""
    banner = f"Apache Kafka {KAFKA_VERSION} (single-node KRaft, temporary storage)"
    return serve_in_foreground(ApacheKafkaBroker(port=port, host=host), banner)
