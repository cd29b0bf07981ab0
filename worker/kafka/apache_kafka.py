"""A real Apache Kafka broker on loopback, without Docker: the JVM broker from Maven Central.

`ApacheKafkaBroker` has the shape of `EmbeddedBroker` (broker.py) but runs Apache Kafka
`KAFKA_VERSION` itself: one combined KRaft node (broker and controller), storage in a temporary
directory removed on `stop()`. Use it where Tansu's gaps matter (see
docs/ARCHITECTURE.md#the-embedded-broker-tansu-and-its-measured-gaps): consumer-group protocols (classic
and KIP-848 `group.protocol=consumer`), transactions, exact offsets. `ApacheKafkaCluster` runs
several such nodes as one cluster (replication, leader failover, kill -9 and restart of a node);
both start each JVM through `KafkaNode`.

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
- `ApacheKafkaCluster` (three such nodes, static quorum, `KafkaNode` per node like the single
  broker): `start()` ~9.5 s with the machine otherwise idle (formats run in parallel; the wait
  includes a replication-3 topic getting all three replicas in sync), 15-39 s while other test
  suites ran beside it; ~3 x 330 MB RSS. After kill -9 of a node, partitions it led get a new
  leader in ~7.5-11 s: the controller fences the node once `broker.session.timeout.ms` (Kafka's
  default, 9 s) has passed, and until then acks=all produces to partitions it followed wait too
  (it is still in their ISR). `restart()` lists the node again ~3-4 s later (up to ~11 s under
  load), back in every ISR well under a second after that.
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
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from worker.kafka.broker import BrokerNotFound, free_port, serve_in_foreground, stop_process, wait_for_port

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient, ClusterMetadata, PartitionMetadata

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


# -- one node ----------------------------------------------------------------------------------------


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


def _free_ports(host: str, count: int, taken: set[int] | None = None) -> list[int]:
    """`count` distinct free ports, none of them in `taken`."""
    avoid = set(taken or ())
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in avoid:
            avoid.add(port)
            ports.append(port)
    return ports


def log4j2_properties(log_file: Path) -> str:
    """WARN and above to `log_file`."""
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


def combined_node_properties(
    node_id: int, host: str, port: int, controller_port: int, data_dir: Path, replication: int, min_isr: int
) -> dict[str, object]:
    """What every node here is: a combined KRaft broker and controller on `host`, PLAINTEXT, its
    internal topics replicated `replication` times. The quorum settings are the caller's."""
    return {
        "process.roles": "broker,controller",
        "node.id": node_id,
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": data_dir,
        "num.partitions": 1,
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": replication,
        "transaction.state.log.replication.factor": replication,
        "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": replication,
        "share.coordinator.state.topic.min.isr": min_isr,
        "group.initial.rebalance.delay.ms": 0,
    }


class KafkaNode:
    """One Apache Kafka JVM on loopback: its ports, its directory (server.properties,
    log4j2.properties, data/), its log file and its process. `ApacheKafkaBroker` runs one,
    `ApacheKafkaCluster` several; the directory is the caller's to create and remove."""

    def __init__(
        self, node_id: int, host: str, port: int, controller_port: int, workdir: Path, log_file: Path, heap: str
    ) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        self.controller_port = controller_port
        self.workdir = workdir
        self.log_file = log_file
        self.heap = heap
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def properties_file(self) -> Path:
        return self.workdir / "server.properties"

    @property
    def log4j2_file(self) -> Path:
        return self.workdir / "log4j2.properties"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def configure(self, properties: dict[str, object]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.properties_file.write_text(_properties(properties))
        self.log4j2_file.write_text(log4j2_properties(self.log_file))

    def java(self, java: str, libs: Path, main: str, *args: str) -> list[str]:
        return [
            java,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            *JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={self.log4j2_file}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def format(self, java: str, libs: Path, cluster: str, deadline: float, *, standalone: bool) -> None:
        """`kafka-storage format` in its own JVM: `--standalone` for a one-node dynamic quorum,
        nothing more for a static one (`controller.quorum.voters` in the properties)."""
        args = ["format", "-t", cluster, "-c", str(self.properties_file)]
        if standalone:
            args.append("--standalone")
        command = self.java(java, libs, "kafka.tools.StorageTool", *args)
        allowed = max(1.0, deadline - time.monotonic())
        try:
            formatted = subprocess.run(command, capture_output=True, text=True, timeout=allowed)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"kafka-storage format of node {self.node_id} did not finish in {allowed:.0f}s") from exc
        if formatted.returncode != 0:
            raise RuntimeError(
                f"kafka-storage format failed (exit {formatted.returncode}):\n"
                f"{(formatted.stdout + formatted.stderr).strip()[-3000:]}"
            )

    def launch(self, java: str, libs: Path) -> subprocess.Popen[bytes]:
        """Start the JVM on the formatted storage (also after a kill: the node rejoins with its data)."""
        if self.alive():
            assert self.process is not None
            raise RuntimeError(f"node {self.node_id} already running (pid {self.process.pid})")
        with open(self.log_file, "ab") as out:
            self.process = subprocess.Popen(
                self.java(java, libs, "kafka.Kafka", str(self.properties_file)),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self.process

    def exited(self) -> RuntimeError:
        assert self.process is not None
        return RuntimeError(
            f"Apache Kafka exited with {self.process.returncode} before answering on {self.address} "
            f"(port in use?); log {self.log_file}:\n{_tail(self.log_file)}"
        )

    def wait_listening(self, deadline: float, timeout: float) -> None:
        """Until the port accepts connections (cheap, and it notices the process dying)."""
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                raise self.exited()
            try:
                wait_for_port(self.host, self.port, min(0.5, max(0.0, deadline - time.monotonic())))
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"Apache Kafka did not listen on {self.address} in {timeout}s; "
                        f"log {self.log_file}:\n{_tail(self.log_file)}"
                    ) from None

    def stop(self, timeout: float) -> None:
        stop_process(self.process, timeout)

    def kill(self) -> None:
        """SIGKILL: no controlled shutdown, nothing flushed."""
        if self.alive():
            assert self.process is not None
            self.process.kill()
        if self.process is not None:
            self.process.wait()


def _admin(bootstrap_servers: str) -> AdminClient:
    from confluent_kafka.admin import AdminClient

    quiet = logging.getLogger(f"{__name__}.admin")  # librdkafka's connection errors while nodes start or die
    quiet.setLevel(logging.CRITICAL)
    return AdminClient({"bootstrap.servers": bootstrap_servers, "logger": quiet})


def _wait_for_metadata(
    admin: AdminClient,
    nodes: list[KafkaNode],
    ready: Callable[[ClusterMetadata], bool],
    deadline: float,
    timeout: float,
    what: str,
) -> ClusterMetadata:
    """Metadata answers until `ready(metadata)`; raises as soon as one of `nodes` has exited."""
    last: Exception | None = None
    while True:
        for node in nodes:
            if node.process is not None and node.process.poll() is not None:
                raise node.exited()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            where = ", ".join(n.address for n in nodes)
            logs = "\n".join(f"log {n.log_file}:\n{_tail(n.log_file)}" for n in nodes)
            raise TimeoutError(f"Apache Kafka on {where} {what} in {timeout}s ({last}); {logs}")
        try:
            metadata = admin.list_topics(timeout=min(2.0, max(0.1, remaining)))
            if ready(metadata):
                return metadata
            last = None
        except Exception as exc:  # KafkaException: not ready yet
            last = exc
        time.sleep(0.05)


# -- the single-node broker ---------------------------------------------------------------------------


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
        return {
            **combined_node_properties(1, self.host, self.port, controller_port, data_dir, replication=1, min_isr=1),
            # The 4.x (KIP-853) form: a dynamic quorum, formatted with --standalone.
            "controller.quorum.bootstrap.servers": f"{self.host}:{controller_port}",
        }

    log4j2_properties = staticmethod(log4j2_properties)

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
        [self.controller_port] = _free_ports(self.host, 1, {self.port})
        log_file = self.log_path or self.workdir / "broker.log"
        node = KafkaNode(1, self.host, self.port, self.controller_port, self.workdir, log_file, self.heap)
        node.configure(self.server_properties(node.data_dir, self.controller_port))
        node.format(java, libs, cluster_id(), deadline, standalone=True)
        self.process = node.launch(java, libs)
        node.wait_listening(deadline, timeout)  # the port first (cheap, and it notices the process dying)
        admin = _admin(self.bootstrap_servers)
        _wait_for_metadata(admin, [node], lambda m: bool(m.brokers), deadline, timeout, "answered no metadata request")
        return self

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


# -- the cluster ------------------------------------------------------------------------------------

READY_TOPIC = "__apache_kafka_cluster_ready"


class ApacheKafkaCluster:
    """`size` combined KRaft nodes (broker and controller each) on loopback, node ids 1..size, a
    static controller quorum (`controller.quorum.voters`), every node formatted with one cluster id.
    New topics get `replication` replicas and need `min_isr` in sync (the broker defaults), and so
    do the internal ones; `extra_properties` go into every node's server.properties last. Storage
    in one temporary directory, removed on `stop()`; logs go to `log_dir/node-<id>.log` if given,
    else into that directory. `start()` leaves one topic of its own, READY_TOPIC, behind.

    For failure tests: `kill(node_id)` is kill -9, `restart(node_id)` starts the node again on its
    ports and storage, so it rejoins the quorum and catches its replicas up. Use as a context
    manager, or start()/stop().
    """

    kind = "apache-kafka-cluster"
    client_workarounds: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        size: int = 3,
        host: str = "127.0.0.1",
        log_dir: Path | None = None,
        heap: str = "256m",
        replication: int | None = None,
        min_isr: int | None = None,
        extra_properties: dict[str, object] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.size = size
        self.host = host
        self.log_dir = log_dir
        self.heap = heap
        self.replication = replication if replication is not None else min(3, size)
        self.min_isr = min_isr if min_isr is not None else max(1, self.replication - 1)
        self.extra_properties = dict(extra_properties or {})
        ports = _free_ports(host, 2 * size)
        self.ports = {node_id: ports[node_id - 1] for node_id in self.node_ids}
        self.controller_ports = {node_id: ports[size + node_id - 1] for node_id in self.node_ids}
        self.workdir: Path | None = None
        self.nodes: dict[int, KafkaNode] = {}
        self._java: str | None = None
        self._libs: Path | None = None
        self._admin: AdminClient | None = None

    @property
    def node_ids(self) -> list[int]:
        return list(range(1, self.size + 1))

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"{self.host}:{self.ports[node_id]}" for node_id in self.node_ids)

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The first node's process (what LoopbackBroker callers look at), or None before start()."""
        node = self.nodes.get(1)
        return node.process if node is not None else None

    def quorum_voters(self) -> str:
        return ",".join(f"{n}@{self.host}:{self.controller_ports[n]}" for n in self.node_ids)

    def server_properties(self, node_id: int, data_dir: Path) -> dict[str, object]:
        port, controller_port = self.ports[node_id], self.controller_ports[node_id]
        return {
            **combined_node_properties(
                node_id, self.host, port, controller_port, data_dir, self.replication, self.min_isr
            ),
            "controller.quorum.voters": self.quorum_voters(),
            "default.replication.factor": self.replication,
            "min.insync.replicas": self.min_isr,
            **self.extra_properties,
        }

    def start(self, timeout: float = 120.0) -> ApacheKafkaCluster:
        """Format every node's storage, start them all, return once metadata lists every broker and a
        topic replicated `replication` times has all its replicas in sync."""
        if any(node.alive() for node in self.nodes.values()):
            raise RuntimeError("cluster already running")
        self._java = find_java()
        self._libs = resolve()
        deadline = time.monotonic() + timeout
        self.workdir = Path(tempfile.mkdtemp(prefix="apache-kafka-cluster-"))
        try:
            return self._start(self._java, self._libs, deadline, timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, java: str, libs: Path, deadline: float, timeout: float) -> ApacheKafkaCluster:
        assert self.workdir is not None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        for node_id in self.node_ids:
            workdir = self.workdir / f"node-{node_id}"
            log_file = (self.log_dir or workdir) / f"node-{node_id}.log"
            node = KafkaNode(
                node_id, self.host, self.ports[node_id], self.controller_ports[node_id], workdir, log_file, self.heap
            )
            node.configure(self.server_properties(node_id, node.data_dir))
            self.nodes[node_id] = node
        shared_id = cluster_id()
        with ThreadPoolExecutor(self.size) as pool:  # one JVM each; they overlap well on 2 CPUs
            for done in [
                pool.submit(node.format, java, libs, shared_id, deadline, standalone=False)
                for node in self.nodes.values()
            ]:
                done.result()
        for node in self.nodes.values():
            node.launch(java, libs)
        for node in self.nodes.values():
            node.wait_listening(deadline, timeout)
        self._admin = _admin(self.bootstrap_servers)
        nodes = list(self.nodes.values())
        wanted = set(self.node_ids)
        listed = f"listed not all of brokers {sorted(wanted)}"
        _wait_for_metadata(self._admin, nodes, lambda m: set(m.brokers) == wanted, deadline, timeout, listed)
        self._check_replication(nodes, deadline, timeout)
        return self

    def _check_replication(self, nodes: list[KafkaNode], deadline: float, timeout: float) -> None:
        """Create a topic replicated `replication` times and wait until all its replicas are in sync."""
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import NewTopic

        assert self._admin is not None
        while True:
            remaining = max(1.0, deadline - time.monotonic())
            future = self._admin.create_topics(
                [NewTopic(READY_TOPIC, 1, self.replication)], operation_timeout=min(10.0, remaining)
            )[READY_TOPIC]
            try:
                future.result(min(15.0, remaining))
                break
            except KafkaException as exc:
                if exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not create {READY_TOPIC} in {timeout}s: {exc}") from None
                time.sleep(0.2)

        def in_sync(metadata: ClusterMetadata) -> bool:
            topic = metadata.topics.get(READY_TOPIC)
            if topic is None or topic.error is not None or 0 not in topic.partitions:
                return False
            partition = topic.partitions[0]
            return partition.leader >= 0 and len(partition.isrs) == self.replication

        _wait_for_metadata(self._admin, nodes, in_sync, deadline, timeout, f"no fully in-sync {READY_TOPIC}")

    # -- failures -----------------------------------------------------------------------------------

    def node(self, node_id: int) -> KafkaNode:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise ValueError(f"no node {node_id}; nodes are {self.node_ids}") from None

    def kill(self, node_id: int) -> None:
        """kill -9 one node (no controlled shutdown); its storage stays for `restart`."""
        self.node(node_id).kill()

    def restart(self, node_id: int, timeout: float = 60.0) -> None:
        """Start a stopped or killed node again on its ports and storage; returns once metadata lists
        it as a broker again (catching its replicas up to the ISR comes after, see `isr_of`)."""
        node = self.node(node_id)
        assert self._java is not None and self._libs is not None, "start() the cluster first"
        deadline = time.monotonic() + timeout
        node.launch(self._java, self._libs)
        node.wait_listening(deadline, timeout)
        _wait_for_metadata(
            self.admin(), [node], lambda m: node_id in m.brokers, deadline, timeout, f"did not list node {node_id}"
        )

    # -- metadata -----------------------------------------------------------------------------------

    def admin(self) -> AdminClient:
        if self._admin is None:
            self._admin = _admin(self.bootstrap_servers)
        return self._admin

    def brokers(self, timeout: float = 10.0) -> list[int]:
        """The broker ids metadata lists now (a killed node drops out once its session expired)."""
        return sorted(self.admin().list_topics(timeout=timeout).brokers)

    def _partition(self, topic: str, partition: int, timeout: float) -> PartitionMetadata:
        metadata = self.admin().list_topics(topic, timeout=timeout)
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or partition not in described.partitions:
            error = described.error if described is not None else "unknown topic"
            raise LookupError(f"no metadata for {topic}[{partition}]: {error}")
        return described.partitions[partition]

    def leader_of(self, topic: str, partition: int = 0, timeout: float = 10.0) -> int:
        """The node id leading `topic[partition]` (-1 while it has none)."""
        return self._partition(topic, partition, timeout).leader

    def isr_of(self, topic: str, partition: int = 0, timeout: float = 10.0) -> list[int]:
        """The node ids in sync for `topic[partition]`."""
        return sorted(self._partition(topic, partition, timeout).isrs)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every node at once (stopped one by one, the last would wait for a quorum that is
        gone), SIGKILL what is left after `timeout`; then remove the storage."""
        for node in self.nodes.values():
            if node.alive():
                assert node.process is not None
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in self.nodes.values():
            node.stop(max(0.1, deadline - time.monotonic()))
        self._admin = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> ApacheKafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
