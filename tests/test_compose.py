"""The production deployment: docker-compose.yml, .env.example, deploy/ (vigil.yaml, alertmanager.yml), the Dockerfile
and requirements.lock.

No Docker engine runs here and Docker Hub is unreachable (DESIGN.md §Real components), so no image is built and no
container started. What can run, runs for real: Debian's ``docker-compose config`` resolves the file with
``.env.example``; vigil's own loader reads ``deploy/vigil.yaml`` and builds the pipeline from it; vigil's API app
under uvicorn is probed with the exact healthcheck command of the Compose file, and ``vigil serve`` is started with
the deploy config the way the image installs it; Debian's Alertmanager (``amtool check-config`` and the server
itself) loads ``deploy/alertmanager.yml`` and groups and inhibits real vigil alerts with it.
``tests/test_dashboards.py`` covers Grafana's part of the file and the Kafka KRaft settings.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from alerts.content import AlertFacts, render
from alerts.notifiers import notifier_for
from alerts.routing import AlertmanagerReceiver, RoutingConfig
from vigil.api import create_app
from vigil.pipeline import Pipeline
from vigil.settings import Settings, load_settings
from vigil.store import upgrade

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DEPLOY = ROOT / "deploy"
VIGIL_SERVICES = ("vigil-cases", "vigil-monitor", "vigil-api", "migrate", "dashboards")
STACK = {"kafka", "postgres", "postgres-roles", "migrate", "dashboards", "grafana", "alertmanager", "vigil-cases",
         "vigil-monitor", "vigil-api"}
_VARIABLE = re.compile(r"(?<!\$)\$\{(\w+)")  # ${VAR}, ${VAR:-default}, ${VAR:?error}; not the escaped $${...}


def _compose_variables() -> set[str]:
    return set(_VARIABLE.findall(COMPOSE_FILE.read_text()))


def _env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


def _clean_env() -> dict[str, str]:
    """The caller's environment without any variable the Compose file reads (shell values would override .env)."""
    used = _compose_variables()
    return {k: v for k, v in os.environ.items() if k not in used}


def _docker_compose(*args: str, env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess[str]:
    assert shutil.which("docker-compose"), "docker-compose is missing: run `make test`, which apt-installs it"
    return subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args],
                          capture_output=True, text=True, timeout=60, env=_clean_env(), cwd=ROOT)


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The Compose file as Docker Compose resolves it with .env.example: anchors merged, variables substituted."""
    done = _docker_compose("config")
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.fixture
def no_vigil_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """VIGIL_* variables of the caller would override the file under test."""
    for name in [n for n in os.environ if n.startswith("VIGIL_")]:
        monkeypatch.delenv(name)


# --- docker-compose.yml and .env.example ------------------------------------------------------------------------


def test_compose_config_validates_with_the_example_env_file() -> None:
    done = _docker_compose("config", "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""


def test_env_example_lists_exactly_the_variables_compose_reads() -> None:
    used, listed = _compose_variables(), set(_env_example())
    assert {"VIGIL_DB_PASSWORD", "VIGIL_GRAFANA_DB_PASSWORD", "VIGIL_SUBJECT_KEY", "GRAFANA_ADMIN_PASSWORD"} <= used
    assert used - listed == set(), f"add to .env.example: {sorted(used - listed)}"
    assert listed - used == set(), f"not used by docker-compose.yml, remove from .env.example: {sorted(listed - used)}"


def test_env_example_holds_placeholders_not_secrets(tmp_path: Path) -> None:
    """Required secrets are visibly placeholders; optional ones are empty; compose refuses an env without them."""
    env = _env_example()
    required = {name for name in _compose_variables() if f"${{{name}:?" in COMPOSE_FILE.read_text()}
    assert required == {"VIGIL_DB_PASSWORD", "VIGIL_GRAFANA_DB_PASSWORD", "VIGIL_SUBJECT_KEY",
                        "GRAFANA_ADMIN_PASSWORD"}
    assert all(env[name].startswith("CHANGE-ME") for name in required), {n: env[n] for n in required}
    assert re.fullmatch(r"[\w-]+", env["VIGIL_DB_PASSWORD"]), "it goes into VIGIL_STORE_URL: URL-safe characters only"
    assert {name: env[name] for name in ("VIGIL_SMTP_PASSWORD", "VIGIL_WEBHOOK_SECRET", "VIGIL_CHAT_URL")} == {
        "VIGIL_SMTP_PASSWORD": "", "VIGIL_WEBHOOK_SECRET": "", "VIGIL_CHAT_URL": ""}
    incomplete = tmp_path / "incomplete.env"
    incomplete.write_text("".join(f"{k}={v}\n" for k, v in env.items() if k != "VIGIL_SUBJECT_KEY"))
    refused = _docker_compose("config", "-q", env_file=incomplete)
    assert refused.returncode != 0 and "set VIGIL_SUBJECT_KEY" in refused.stderr


def test_the_stack_has_every_service(resolved: dict) -> None:
    assert STACK <= set(resolved["services"])
    assert {resolved["services"][name]["image"] for name in VIGIL_SERVICES} == {"vigil:local"}


def test_services_wait_for_the_health_or_completion_of_what_they_depend_on(resolved: dict) -> None:
    services = resolved["services"]
    one_shot = {name for name, s in services.items() if s.get("restart") == "no"}
    assert one_shot == {"postgres-roles", "migrate", "dashboards"}
    waits = 0
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            if "healthcheck" in services[dependency]:
                assert rule["condition"] == "service_healthy", f"{name} must wait until {dependency} is healthy"
            else:
                assert dependency in one_shot, f"{name} depends on {dependency}, which has no healthcheck"
                assert rule["condition"] == "service_completed_successfully", (name, dependency)
            waits += 1
    assert waits >= 9
    for stage in ("vigil-cases", "vigil-monitor"):
        assert services[stage]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["vigil-api"]["depends_on"]["alertmanager"]["condition"] == "service_healthy"


def test_vigil_services_read_the_deploy_config_from_the_repository(resolved: dict) -> None:
    for name in ("vigil-cases", "vigil-monitor", "vigil-api"):
        service = resolved["services"][name]
        command = service["command"]
        container_path = command[command.index("--config") + 1]
        mounts = [v.split(":") for v in service["volumes"]]
        (source, target, mode), = [m for m in mounts if container_path.startswith(m[1] + "/")]
        assert (Path(source), target, mode) == (DEPLOY, "/etc/vigil", "ro")
        assert (Path(source) / Path(container_path).relative_to(target)).is_file()
    for stage in ("cases", "monitor"):  # the two stages, each a consumer group of two replicas
        service = resolved["services"][f"vigil-{stage}"]
        assert service["command"] == ["run", "--config", "/etc/vigil/vigil.yaml", "--stage", stage]
        assert service["deploy"]["replicas"] == 2
        # `vigil run` is PID 1: Python ignores SIGTERM there, SIGINT stops it cleanly (KeyboardInterrupt).
        assert service["stop_signal"] == "SIGINT"


def test_alertmanager_service_mounts_deploy_config_and_vigil_reaches_it(resolved: dict, no_vigil_env: None) -> None:
    service = resolved["services"]["alertmanager"]
    config_flag = next(a for a in service["command"] if a.startswith("--config.file="))
    mounted = dict(v.split(":")[1::-1] for v in service["volumes"])
    assert mounted[config_flag.removeprefix("--config.file=")] == str(DEPLOY / "alertmanager.yml")
    (receiver,) = [r for r in load_settings(DEPLOY / "vigil.yaml").routing.receivers if r.kind == "alertmanager"]
    url = urlsplit(str(receiver.url))
    assert url.hostname == "alertmanager" and url.port == 9093
    assert {"published": 9093, "target": url.port} in service["ports"]


# --- deploy/vigil.yaml ------------------------------------------------------------------------------------------


@pytest.fixture
def deployed(no_vigil_env: None) -> Settings:
    return load_settings(DEPLOY / "vigil.yaml")


def test_deploy_config_consumes_the_stack_kafka_and_builds_the_pipeline(deployed: Settings, resolved: dict) -> None:
    (source,) = deployed.sources
    assert source.kind == "kafka"
    assert (source.topics, source.group_id) == (["fhir.predictions", "fhir.outcomes"], "vigil")
    advertised = resolved["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    internal = re.search(r"INTERNAL://([^,]+)", advertised).group(1)
    assert source.bootstrap_servers == [internal] == ["kafka:9092"]
    # the concept map and both PCCPs load: the same construction `vigil run` does at start
    pipeline = Pipeline(deployed)
    assert {model_id: run.pccp.pccp_id for model_id, run in pipeline.result.models.items()} == {
        "cta-stenosis": "PCCP-CTA-001", "aki-risk": "PCCP-AKI-001"}


def test_deploy_config_routes_every_alert_to_alertmanager(deployed: Settings) -> None:
    routing = deployed.routing
    assert [(r.name, r.kind) for r in routing.receivers] == [("alertmanager", "alertmanager")]
    labels = {"model": "aki-risk", "model_version": "1.0", "metric": "fnr", "site": "site-a", "subgroup": "all",
              "detector": "bernoulli_cusum", "severity": "critical", "state": "firing"}
    assert routing.receivers_for(labels) == ["alertmanager"]
    assert deployed.store_url == "sqlite:///vigil.db"  # not in the file: docker-compose.yml sets VIGIL_STORE_URL
    assert "subject_key" not in yaml.safe_load((DEPLOY / "vigil.yaml").read_text())


def _commented_block(text: str, first: str) -> str:
    """The run of comment lines starting at the line whose content is ``first``, uncommented."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"# {first}"))
    indent = lines[start].index("#")
    block = []
    for line in lines[start:]:
        if not line.strip().startswith("#"):
            break
        body = line[indent + 1:]
        block.append(body[1:] if body.startswith(" ") else body)
    return "\n".join(block)


def test_commented_receiver_examples_are_valid_config(deployed: Settings) -> None:
    text = (DEPLOY / "vigil.yaml").read_text()
    receivers = yaml.safe_load(_commented_block(text, "- name: safety-email"))
    routes = yaml.safe_load(_commented_block(text, "routes:"))  # the routes example, then the escalation example
    routing = RoutingConfig(receivers=[r.model_dump(by_alias=True) for r in deployed.routing.receivers] + receivers,
                            routes=routes["routes"], escalation=routes["escalation"], default_receiver="alertmanager")
    assert [r.kind for r in routing.receivers] == ["alertmanager", "email", "webhook", "chat"]
    secrets = {r.password_env if r.kind == "email" else r.secret_env if r.kind == "webhook" else r.url_env
               for r in routing.receivers[1:]}
    assert secrets == {"VIGIL_SMTP_PASSWORD", "VIGIL_WEBHOOK_SECRET", "VIGIL_CHAT_URL"} <= _compose_variables()
    assert routing.receivers_for({"severity": "critical"}) == ["safety-email", "alertmanager"]


def test_deploy_carries_the_example_device_unchanged(deployed: Settings, no_vigil_env: None) -> None:
    """deploy/ copies the example device's files so it is self-contained; the copies must not drift from examples/."""
    example = load_settings(ROOT / "examples" / "vigil.yaml")
    assert [m.model_dump(exclude={"pccp"}) for m in deployed.models] == [
        m.model_dump(exclude={"pccp"}) for m in example.models]
    assert (deployed.subgroups, deployed.monitors, deployed.deid_policy) == (
        example.subgroups, example.monitors, example.deid_policy)
    pairs = list(zip(deployed.concept_maps, example.concept_maps, strict=True))
    pairs += [(d.pccp, e.pccp) for d, e in zip(deployed.models, example.models, strict=True)]
    for copy, original in pairs:
        assert copy.parent.resolve().is_relative_to(DEPLOY) and copy.read_bytes() == original.read_bytes(), copy


# --- vigil-api healthcheck, for real ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _api_on_loopback(store_url: str, settings: Settings) -> Iterator[int]:
    """vigil's real API app under uvicorn in a thread (what `vigil serve` runs), on a free loopback port."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store_url, settings=settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def _healthcheck(resolved: dict, port: int) -> subprocess.CompletedProcess[str]:
    """The vigil-api healthcheck command of the Compose file, run as Docker runs it, with the port substituted."""
    test = resolved["services"]["vigil-api"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and "http://127.0.0.1:8000/healthz" in test[3]
    return subprocess.run([sys.executable, "-c", test[3].replace(":8000/", f":{port}/")], capture_output=True,
                          text=True, timeout=10)


def test_vigil_api_healthcheck_follows_the_store(resolved: dict, deployed: Settings, tmp_path: Path) -> None:
    """Healthy while the API's store answers; unhealthy when the store does not (503) or nothing listens."""
    url = f"sqlite:///{tmp_path / 'vigil.db'}"
    upgrade(url)
    with _api_on_loopback(url, deployed) as port:
        healthy = _healthcheck(resolved, port)
    assert healthy.returncode == 0, healthy.stderr
    refused = _healthcheck(resolved, port)
    assert refused.returncode == 1 and "Connection refused" in refused.stderr
    with _api_on_loopback(f"postgresql+psycopg://vigil:pw@127.0.0.1:{_free_port()}/vigil", deployed) as port:
        no_store = _healthcheck(resolved, port)
    assert no_store.returncode == 1 and "HTTP Error 503" in no_store.stderr


def test_vigil_serve_starts_with_the_deploy_config_as_installed_in_the_image(tmp_path: Path) -> None:
    """`vigil serve --config /etc/vigil/vigil.yaml` as in docker-compose.yml, in a process where, as in the image
    (vigil installed from its wheel), there is no examples/ folder beside the package to fall back on."""
    port = _free_port()
    missing_default = tmp_path / "site-packages" / "examples" / "vigil.yaml"  # where a wheel install would look
    as_in_image = ("from pathlib import Path; import vigil.settings as s; "
                   f"s.DEFAULT_CONFIG = Path({str(missing_default)!r}); from vigil.cli import app; app()")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-c", as_in_image, "serve", "--port", str(port), "--config", str(DEPLOY / "vigil.yaml"),
             "--store", f"sqlite:///{tmp_path / 'vigil.db'}", "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None, f"vigil serve exited: {log.read_text()}"
                assert time.monotonic() < deadline, "vigil serve never answered /healthz"
                time.sleep(0.1)
        finally:
            server.terminate()
            server.wait(10)


# --- deploy/alertmanager.yml, with Debian's Alertmanager ------------------------------------------------------


def _amtool(config: Path) -> subprocess.CompletedProcess[str]:
    assert shutil.which("amtool"), "amtool is missing: apt-get install prometheus-alertmanager (make test does)"
    return subprocess.run(["amtool", "check-config", str(config)], capture_output=True, text=True, timeout=30)


def test_alertmanager_config_passes_amtool_and_a_broken_one_does_not(tmp_path: Path) -> None:
    checked = _amtool(DEPLOY / "alertmanager.yml")
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout, checked.stdout + checked.stderr
    broken = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
    broken["route"]["routes"][0]["receiver"] = "nobody"
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    refused = _amtool(tmp_path / "broken.yml")
    assert refused.returncode != 0 and 'undefined receiver "nobody"' in refused.stdout + refused.stderr


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's prometheus-alertmanager serving deploy/alertmanager.yml on loopback."""
    binary = shutil.which("prometheus-alertmanager")
    assert binary, "prometheus-alertmanager is missing: run `make test`, which apt-installs it"
    root = tmp_path_factory.mktemp("alertmanager")
    url = f"http://127.0.0.1:{_free_port()}"
    with (root / "log").open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={DEPLOY / 'alertmanager.yml'}", f"--web.listen-address={url[7:]}",
             "--cluster.listen-address=", f"--storage.path={root / 'data'}"], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert process.poll() is None and time.monotonic() < deadline, (root / "log").read_text()
                time.sleep(0.1)
            yield url
        finally:
            process.terminate()
            process.wait(10)


def test_alertmanager_groups_vigil_alerts_by_stream_and_critical_inhibits_warning(alertmanager: str,
                                                                                  deployed: Settings) -> None:
    """Two alerts on one stream (different detectors, critical and warning) and one on another site, sent by vigil's
    Alertmanager notifier as configured in deploy/vigil.yaml (URL pointed at the loopback server)."""
    (receiver,) = deployed.routing.receivers
    notifier = notifier_for(AlertmanagerReceiver.model_validate(receiver.model_dump() | {"url": alertmanager}))
    now = datetime.now(UTC).replace(microsecond=0)
    critical = AlertFacts(
        alert_id="A1", model="cta-stenosis", model_version="2.1.0", metric="fnr", site="site-b", subgroup="all",
        detector="bernoulli_cusum", severity="critical", state="firing", detected_at=now - timedelta(hours=1),
        change_estimate=now - timedelta(days=3), baseline=0.15, current=0.31, ci_low=0.24, ci_high=0.39,
        n_baseline=900, n_current=160, statistic=5.2, threshold=4.1)
    warning = replace(critical, alert_id="A2", detector="ewma", severity="warning")
    other_site = replace(critical, alert_id="A3", site="site-a")
    for facts in (critical, warning, other_site):
        payload = render("alertmanager", facts, "firing", deployed.routing.links)
        notifier.send({"alerts": [{**a, "endsAt": (now + timedelta(hours=1)).isoformat()} for a in payload["alerts"]]})
    groups = httpx.get(f"{alertmanager}/api/v2/alerts/groups", timeout=5).json()
    stream = ("model", "model_version", "metric", "site", "subgroup")
    assert all(g["receiver"]["name"] == "vigil-default" and tuple(sorted(g["labels"])) == tuple(sorted(stream))
               for g in groups), groups
    placed = {a["annotations"]["alert_id"]: (g["labels"], a["status"]) for g in groups for a in g["alerts"]}
    assert set(placed) == {"A1", "A2", "A3"}
    assert placed["A1"][0] == placed["A2"][0] == {"model": "cta-stenosis", "model_version": "2.1.0", "metric": "fnr",
                                                  "site": "site-b", "subgroup": "all"}
    assert placed["A3"][0]["site"] == "site-a"
    assert placed["A1"][1]["state"] == placed["A3"][1]["state"] == "active"
    assert placed["A2"][1]["state"] == "suppressed" and placed["A2"][1]["inhibitedBy"]


# --- Dockerfile, .dockerignore and requirements.lock ---------------------------------------------------------


def _dockerfile() -> list[list[str]]:
    return [line.split() for line in (ROOT / "Dockerfile").read_text().splitlines() if line and line[0] != "#"]


def test_dockerfile_pins_the_base_image_by_exact_version_and_installs_from_the_lock() -> None:
    lines = _dockerfile()
    bases = [words[1] for words in lines if words[0] == "FROM"]
    assert len(bases) == 2 and len(set(bases)) == 1
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", bases[0]), bases[0]
    text = (ROOT / "Dockerfile").read_text()
    assert 'pip wheel --wheel-dir /wheels -c requirements.lock ".[postgres]"' in text
    assert "-c /tmp/requirements.lock" in text and "--no-index" in text


def test_dockerignore_keeps_secrets_out_and_what_the_dockerfile_copies_in() -> None:
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert rules[0] == "*"
    kept = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = {src for words in _dockerfile() if words[0] == "COPY" and not words[1].startswith("--")
              for src in words[1:-1]}
    assert copied and copied <= kept, f"add to .dockerignore: {sorted('!' + c for c in copied - kept)}"
    assert not {".env", ".venv", "deploy", "tests"} & kept


def _lock() -> dict[str, tuple[str, str]]:
    lines = [line.strip() for line in (ROOT / "requirements.lock").read_text().splitlines()]
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    return {canonicalize_name(name): (name, version) for name, version in pins}


def test_lock_pins_every_direct_dependency_at_the_pyproject_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = _lock()
    for line in project["dependencies"] + project["optional-dependencies"]["postgres"]:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"pyproject.toml must pin {line} exactly"
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is pinned in pyproject.toml but missing from requirements.lock"
        assert lock[name][1] == spec.version, f"{req.name}: pyproject {spec.version}, requirements.lock {lock[name][1]}"


def _runtime_closure() -> dict[str, str]:
    """Every distribution `vigil[postgres]` needs, transitively, per the installed metadata (markers evaluated here)."""
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [("vigil", frozenset({"postgres"}))]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in done:
            continue
        done.add((canonicalize_name(name), extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            pytest.fail(f"{name} is required by vigil[postgres] but not installed in {sys.prefix}")
        found[canonicalize_name(name)] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append((req.name, frozenset(req.extras)))
    found.pop("vigil")
    return found


def test_lock_is_the_runtime_closure_without_test_only_packages() -> None:
    lock, closure = _lock(), _runtime_closure()
    expected = "\n".join(f"{distribution(n).metadata['Name']}=={v}" for n, v in sorted(closure.items()))
    assert set(lock) == set(closure), f"requirements.lock should list exactly:\n{expected}"
    assert not {"pytest", "hypothesis", "confluent-kafka", "aiosmtpd"} & set(lock)
