"""Grafana dashboards as code, their provisioning, docker-compose.yml and the Dockerfile.

No Grafana server runs here (DESIGN.md §Real components): the JSON models are checked for what Grafana relies on,
and every panel, annotation and variable query is run, with Grafana's macros and variables expanded, against a real
PostgreSQL holding the store's tables, the dashboard views and a few seeded rows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import yaml

from dashboards.build import build_dashboards, write_dashboards
from dashboards.datasource import POSTGRES_TYPE, POSTGRES_UID
from vigil.store import upgrade

ROOT = Path(__file__).resolve().parents[1]
BOARDS = build_dashboards()
UIDS = {"vigil-overview", "vigil-performance", "vigil-control-charts", "vigil-feed-health", "vigil-tickets"}
VARIABLE_REF = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def _panels(board: dict) -> list[dict]:
    """Top-level panels and the panels nested in collapsed rows."""
    return [p for top in board["panels"] for p in (top, *top.get("panels", []))]


def _queries(board: dict) -> list[tuple[str, dict]]:
    """(where, query) for every SQL query a dashboard makes: panel targets, annotations, template variables."""
    found = [(f"panel {p['id']} {p['title']!r}", t) for p in _panels(board) for t in p.get("targets", [])]
    found += [(f"annotation {a['name']!r}", a["target"]) for a in board["annotations"]["list"]]
    found += [(f"variable ${v['name']}", {"rawSql": v["query"], "datasource": v["datasource"], "format": "table"})
              for v in board["templating"]["list"]]
    return found


def _variables(board: dict) -> list[str]:
    return [v["name"] for v in board["templating"]["list"]]


ALL_QUERIES = [(uid, where, q) for uid, board in BOARDS.items() for where, q in _queries(board)]
QUERY_IDS = [f"{uid}: {where}" for uid, where, _ in ALL_QUERIES]


# --- the JSON models ----------------------------------------------------------------------------------------------


def test_dashboards_have_stable_unique_uids_and_titles() -> None:
    assert set(BOARDS) == UIDS
    assert all(board["uid"] == uid for uid, board in BOARDS.items())
    titles = [board["title"] for board in BOARDS.values()]
    assert len(set(titles)) == len(titles)


def test_dashboards_declare_schema_version_41() -> None:
    assert {board["schemaVersion"] for board in BOARDS.values()} == {41}


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_panels_have_unique_ids_and_fit_the_24_column_grid_without_overlap(uid: str) -> None:
    panels = _panels(BOARDS[uid])
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) and i > 0 for i in ids)
    boxes = []
    for p in panels:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, f"panel {p['title']!r} ends at column {g['x'] + g['w']}"
        boxes.append((g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"], p["title"]))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], f"{a[4]!r} overlaps {b[4]!r}"


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_every_query_reads_the_vigil_postgres_datasource(uid: str) -> None:
    board = BOARDS[uid]
    data_panels = [p for p in _panels(board) if p["type"] != "row"]
    assert data_panels and all(p.get("targets") for p in data_panels)
    expected = {"type": POSTGRES_TYPE, "uid": POSTGRES_UID}
    assert all(p["datasource"] == expected for p in data_panels)
    for where, query in _queries(board):
        assert query["datasource"] == expected, where
        assert query["rawSql"].strip(), where


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_every_variable_a_query_or_title_uses_is_defined_before_use(uid: str) -> None:
    board = BOARDS[uid]
    defined = _variables(board)
    texts = [(where, q["rawSql"]) for where, q in _queries(board)]
    texts += [(f"title of panel {p['id']}", p["title"]) for p in _panels(board)]
    for where, text in texts:
        used = {a or b for a, b in VARIABLE_REF.findall(text)} - {"__timeFilter", "__timeGroupAlias"}
        assert used <= set(defined), f"{uid} {where} uses undefined {sorted(used - set(defined))}"
    for position, name in enumerate(defined):  # chained variables may only use the ones before them
        query = board["templating"]["list"][position]["query"]
        assert {a or b for a, b in VARIABLE_REF.findall(query)} <= set(defined[:position]), name


def test_stream_dashboards_offer_the_five_stream_variables() -> None:
    for uid in ("vigil-performance", "vigil-control-charts"):
        assert _variables(BOARDS[uid]) == ["model", "model_version", "metric", "site", "subgroup"]


def test_time_series_targets_use_grafana_time_macros() -> None:
    for uid, where, query in ALL_QUERIES:
        if query["format"] == "time_series":
            assert re.search(r"\$__time(Filter|GroupAlias)\(", query["rawSql"]), f"{uid} {where}"


def test_build_is_deterministic_and_writes_one_file_per_uid(tmp_path: Path) -> None:
    first, second = write_dashboards(tmp_path / "a"), write_dashboards(tmp_path / "b")
    assert [p.name for p in first] == sorted(f"{uid}.json" for uid in UIDS)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert {p.stem: json.loads(p.read_text()) for p in first} == build_dashboards()


# --- every query, run against PostgreSQL --------------------------------------------------------------------------

SEED = """
INSERT INTO cases (model, model_version, prediction_id, prediction_version, subject, site, attributes, predicted_at,
                   score, decision, label, labeled_at, evidence) VALUES
 ('cta', '1.0', 'p1', '1', 's1', 'site-a', '{"sex": "female"}', '2025-02-01T10:00Z', 0.9, true, 'positive',
  '2025-02-11T10:00Z', '["Condition/c1"]'),
 ('cta', '1.0', 'p2', '1', 's2', 'site-b', '{"sex": "male"}', '2025-02-02T10:00Z', 0.2, false, 'negative',
  '2025-02-03T10:00Z', '[]'),
 ('cta', '1.0', 'p3', '1', 's3', NULL, '{}', '2025-03-01T10:00Z', 0.4, false, NULL, NULL, '[]');
INSERT INTO stream_state (model, model_version, metric, site, subgroup, detector, status, baseline, baseline_n, n,
                          threshold, arl0, statistic, state, updated_at) VALUES
 ('cta', '1.0', 'fnr', 'all', 'all', 'cusum', 'active', 0.15, 400, 900, 4.1, 36500, 0.8, '{}', '2025-03-01Z'),
 ('cta', '1.0', 'fnr', 'site-a', 'all', 'bernoulli', 'active', 0.15, 200, 450, 3.9, 36500, 1.2, '{}', '2025-03-01Z'),
 ('cta', '1.0', 'fnr', 'site-a', 'all', 'cusum', 'alarmed', 0.15, 200, 450, 4.1, 36500, 5.2, '{}', '2025-03-01Z'),
 ('cta', '1.0', 'fnr', 'site-b', 'age_band=80+', 'cusum', 'insufficient_data', NULL, 12, 12, NULL, NULL, NULL,
  '{}', '2025-03-01Z'),
 ('cta', '1.0', 'unmapped_rate', 'site-a', 'all', 'cusum', 'active', 0.0, 200, 450, 4.1, 36500, 0.0, '{}',
  '2025-03-01Z');
INSERT INTO metric_points (model, model_version, metric, site, subgroup, period_start, n, value, ci_low, ci_high,
                           statistic, threshold) VALUES
 ('cta', '1.0', 'fnr', 'site-a', 'all', '2025-02-01Z', 40, 0.15, 0.06, 0.30, 0.5, 4.1),
 ('cta', '1.0', 'fnr', 'site-a', 'all', '2025-02-02Z', 38, 0.35, 0.21, 0.52, 5.2, 4.1),
 ('cta', '1.0', 'fnr', 'site-a', 'sex=female', '2025-02-02Z', 20, 0.40, 0.19, 0.64, 2.0, 4.1),
 ('cta', '1.0', 'fnr', 'all', 'all', '2025-02-02Z', 90, 0.22, 0.14, 0.32, 0.8, 4.1),
 ('cta', '1.0', 'unmapped_rate', 'site-a', 'all', '2025-02-02Z', 50, 0.10, 0.04, 0.21, 0.0, 4.1),
 ('cta', '1.0', 'unmapped_rate', 'site-a', 'code_system=https://riverside.example.org/fhir/CodeSystem/dx',
  '2025-02-02Z', 30, 0.17, 0.07, 0.33, 0.0, 4.1),
 ('cta', '1.0', 'no_followup_rate', 'site-a', 'all', '2025-02-02Z', 40, 0.05, 0.01, 0.17, 0.0, 4.1),
 ('cta', '1.0', 'auroc', 'site-a', 'all', '2025-01-01Z', 120, 0.86, 0.79, 0.93, NULL, NULL),
 ('cta', '1.0', 'auroc', 'all', 'all', '2025-01-01Z', 300, 0.88, 0.84, 0.92, NULL, NULL),
 ('cta', '1.0', 'oe_ratio', 'site-a', 'all', '2025-01-01Z', 120, 1.10, 0.85, 1.40, NULL, NULL),
 ('cta', '1.0', 'brier', 'site-a', 'all', '2025-01-01Z', 120, 0.14, NULL, NULL, NULL, NULL),
 ('cta', '1.0', 'calibration_slope', 'site-a', 'all', '2025-01-01Z', 120, 0.92, 0.70, 1.14, NULL, NULL),
 ('cta', '1.0', 'calibration_intercept', 'site-a', 'all', '2025-01-01Z', 120, 0.10, -0.15, 0.35, NULL, NULL);
INSERT INTO tickets (id, model, model_version, category, safety_overlay, matched_mod, cause, cause_confidence, remedy,
                     status, rationale, required_actions, evidence, created_at, updated_at) VALUES
 ('T1', 'cta', '1.0', 'C2', false, 'M1', 'site_acquisition_shift', 0.8, 'retrain', 'open', '["in scope"]',
  '["verify"]', '{}', '2025-02-03Z', '2025-02-03Z'),
 ('T2', 'cta', '1.0', 'C5', true, NULL, 'population_shift', 0.6, 'new_submission', 'closed', '[]', '[]', '{}',
  '2025-01-10Z', '2025-01-20Z');
INSERT INTO alerts (id, model, model_version, metric, site, subgroup, detector, state, severity, detected_at,
                    change_estimate, statistic, threshold, baseline, current, ci_low, ci_high, n_baseline,
                    n_current, fire_count, last_fired_at, ticket_id) VALUES
 ('A1', 'cta', '1.0', 'fnr', 'site-a', 'all', 'cusum', 'firing', 'critical', '2025-02-02T12:00Z', '2025-01-28Z',
  5.2, 4.1, 0.15, 0.35, 0.21, 0.52, 200, 38, 1, '2025-02-02T12:00Z', 'T1'),
 ('A2', 'cta', '1.0', 'fnr', 'all', 'all', 'cusum', 'resolved', 'warning', '2025-01-15Z', '2025-01-10Z',
  4.5, 4.1, 0.15, 0.20, 0.16, 0.25, 400, 90, 2, '2025-01-16Z', 'T2');
INSERT INTO dead_letters (source, position, reason, resource_type, resource_id, created_at) VALUES
 ('feed.ndjson', 3, 'RiskAssessment/r7: missing element subject', 'RiskAssessment', 'r7', '2025-02-01Z'),
 ('feed.ndjson', 9, 'Observation (no id): invalid value for effectiveDateTime', 'Observation', NULL, '2025-02-01Z'),
 ('feed.ndjson', 12, 'invalid JSON: Expecting value at line 12 column 1', NULL, NULL, '2025-02-02Z');
INSERT INTO runs (started_at, finished_at, config_hash, code_version, inputs, counts) VALUES
 ('2025-02-01T00:00Z', '2025-02-01T00:02Z', 'abc123', '0.1.0', '[]', '{"accepted": 3}');
"""

FROM, TO = datetime(2025, 1, 1, tzinfo=timezone.utc), datetime(2025, 4, 1, tzinfo=timezone.utc)
VALUES = {"model": "cta", "model_version": "1.0", "metric": "fnr", "site": "site-a", "subgroup": "all"}


def expand(sql: str, values: dict[str, str] = VALUES, span: tuple[datetime, datetime] = (FROM, TO)) -> str:
    """Expand Grafana's PostgreSQL macros and template variables the way Grafana does before it sends the query."""
    between = f"BETWEEN '{span[0]:%Y-%m-%dT%H:%M:%SZ}' AND '{span[1]:%Y-%m-%dT%H:%M:%SZ}'"
    sql = re.sub(r"\$__timeFilter\((\w+)\)", rf"\1 {between}", sql)
    sql = re.sub(r"\$__timeGroupAlias\((\w+),\s*'1d'\)", r'floor(extract(epoch from \1)/86400)*86400 AS "time"', sql)
    sql = VARIABLE_REF.sub(lambda m: values[m.group(1) or m.group(2)], sql)
    assert "$" not in sql, f"unexpanded macro or variable in: {sql}"
    return sql


@pytest.fixture(scope="module")
def dashboard_db(postgres_cluster) -> Iterator[psycopg.Connection]:
    """A database of this module's own: the store's schema and views from the migrations, and seeded rows."""
    postgres_cluster.admin("CREATE DATABASE vigil_dashboards")
    url = postgres_cluster.url("vigil_dashboards")
    upgrade(url)
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(SEED)
        yield conn
    postgres_cluster.admin("DROP DATABASE vigil_dashboards WITH (FORCE)")


def _rows(conn: psycopg.Connection, sql: str) -> tuple[list[str], list[tuple]]:
    with conn.cursor() as cur:
        cur.execute(sql)
        return [c.name for c in cur.description], cur.fetchall()


@pytest.mark.postgres
@pytest.mark.parametrize(("uid", "where", "query"), ALL_QUERIES, ids=QUERY_IDS)
def test_query_runs_on_postgresql_and_returns_rows(dashboard_db: psycopg.Connection, uid: str, where: str,
                                                   query: dict) -> None:
    columns, rows = _rows(dashboard_db, expand(query["rawSql"]))
    assert rows, f"{uid} {where} returned no rows from the seeded store"
    if query["format"] == "time_series":
        assert columns[0] == "time" and all(isinstance(r[0], (datetime, Decimal)) for r in rows)
    if where.startswith("annotation"):
        assert {"time", "timeend", "text", "tags"} <= set(columns)


@pytest.mark.postgres
def test_variable_queries_offer_the_seeded_streams_with_all_first(dashboard_db: psycopg.Connection) -> None:
    variables = {v["name"]: v["query"] for v in BOARDS["vigil-performance"]["templating"]["list"]}
    offered = {name: [r[0] for r in _rows(dashboard_db, expand(sql))[1]] for name, sql in variables.items()}
    assert offered == {"model": ["cta"], "model_version": ["1.0"], "metric": ["fnr", "unmapped_rate"],
                       "site": ["all", "site-a", "site-b"], "subgroup": ["all", "age_band=80+"]}


@pytest.mark.postgres
def test_views_summarise_alerts_streams_dead_letters_and_tickets(dashboard_db: psycopg.Connection) -> None:
    assert _rows(dashboard_db, "SELECT id FROM v_open_alerts")[1] == [("A1",)]
    _, cells = _rows(dashboard_db, "SELECT site, subgroup, value, change, alarmed, insufficient_data, detectors, "
                                   "open_alerts FROM v_stream_cells WHERE metric = 'fnr' ORDER BY site, subgroup")
    assert [(c[0], c[1]) for c in cells] == [("all", "all"), ("site-a", "all"), ("site-b", "age_band=80+")]
    site_a = cells[1]
    assert site_a[2] == 0.35 and site_a[3] == pytest.approx(0.20)  # the newest day, against the baseline
    assert site_a[4:] == (True, False, "bernoulli: active, cusum: alarmed", 1)
    assert cells[2][2:6] == (None, None, False, True)  # no point yet, too few cases
    _, classes = _rows(dashboard_db, "SELECT reason_class FROM v_dead_letters ORDER BY id")
    assert classes == [("missing element subject",), ("invalid value for effectiveDateTime",), ("invalid JSON",)]
    _, tickets = _rows(dashboard_db, "SELECT id, alerts, open_alerts, sites FROM v_tickets ORDER BY id")
    assert tickets == [("T1", 1, 1, "site-a"), ("T2", 1, 0, "all")]


# --- provisioning, docker-compose.yml, Dockerfile ---------------------------------------------------------------

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SECRETS = {"VIGIL_DB_PASSWORD": "db-pw", "VIGIL_GRAFANA_DB_PASSWORD": "ro-pw", "VIGIL_SUBJECT_KEY": "key",
           "GRAFANA_ADMIN_PASSWORD": "admin-pw"}


def _provisioning(kind: str) -> dict:
    return yaml.safe_load((ROOT / "dashboards" / "provisioning" / kind / "vigil.yaml").read_text())


def test_datasource_provisioning_matches_the_dashboards_and_gets_its_secrets_from_grafana_env() -> None:
    (source,) = _provisioning("datasources")["datasources"]
    assert (source["uid"], source["type"]) == (POSTGRES_UID, POSTGRES_TYPE)
    assert source["secureJsonData"]["password"] == "${VIGIL_GRAFANA_DB_PASSWORD}"
    text = (ROOT / "dashboards" / "provisioning" / "datasources" / "vigil.yaml").read_text()
    needed = set(re.findall(r"\$\{(\w+)\}", text))
    assert needed and needed <= set(COMPOSE["services"]["grafana"]["environment"])


def test_dashboard_provider_reads_the_folder_compose_fills_with_built_json() -> None:
    (provider,) = _provisioning("dashboards")["providers"]
    assert provider["type"] == "file" and provider["allowUiUpdates"] is False
    grafana_mounts = dict(v.rsplit(":", 2)[:2] if v.endswith(":ro") else v.split(":", 1)
                          for v in COMPOSE["services"]["grafana"]["volumes"])
    built_volume = next(src for src, dst in grafana_mounts.items() if dst == provider["options"]["path"])
    builder = COMPOSE["services"]["dashboards"]
    assert builder["command"][:2] == ["dashboards", "build"]
    out_dir = builder["command"][builder["command"].index("--out") + 1]
    assert f"{built_volume}:{out_dir}" in builder["volumes"]
    for kind in ("datasources", "dashboards"):
        assert grafana_mounts[f"./dashboards/provisioning/{kind}"] == f"/etc/grafana/provisioning/{kind}"


def test_compose_services_start_in_order_with_health_conditions_and_named_volumes() -> None:
    services = COMPOSE["services"]
    assert {"kafka", "postgres", "grafana", "alertmanager", "vigil-cases", "vigil-monitor", "vigil-api"} <= set(services)
    for stage in ("cases", "monitor"):
        assert services[f"vigil-{stage}"]["command"] == ["run", "--config", "/etc/vigil/vigil.yaml", "--stage", stage]
    assert services["vigil-api"]["command"][0] == "serve"
    assert all(services[s]["build"] == "." for s in ("vigil-cases", "vigil-monitor", "vigil-api", "migrate",
                                                     "dashboards"))
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert rule["condition"] in ("service_healthy", "service_completed_successfully"), name
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}, which has none"
    used = {v.split(":", 1)[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(".")}
    assert used - {"${VIGIL_CONFIG_DIR"} == set(COMPOSE["volumes"])


def test_kafka_has_the_complete_single_node_kraft_configuration() -> None:
    env = COMPOSE["services"]["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    listeners = {item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")}
    assert listeners == {item.split(":")[0] for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")}
    assert {env["KAFKA_INTER_BROKER_LISTENER_NAME"], env["KAFKA_CONTROLLER_LISTENER_NAMES"]} <= listeners
    assert len(env["CLUSTER_ID"]) == 22
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == 1
    assert f"kafka-data:{env['KAFKA_LOG_DIRS']}" in COMPOSE["services"]["kafka"]["volumes"]


def _docker_compose(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


def test_docker_compose_config_accepts_the_file_and_demands_the_secrets() -> None:
    """No Docker engine runs here: Debian's docker-compose validates the file (`make test` installs it)."""
    assert shutil.which("docker-compose"), "docker-compose is missing: run `make test`, which apt-installs it"
    base = {k: v for k, v in os.environ.items() if k not in SECRETS}
    done = _docker_compose(base | SECRETS)
    assert done.returncode == 0, done.stderr
    missing = _docker_compose(base | {k: v for k, v in SECRETS.items() if k != "VIGIL_DB_PASSWORD"})
    assert missing.returncode != 0 and "set VIGIL_DB_PASSWORD" in missing.stderr


def test_dockerfile_installs_every_package_and_runs_as_non_root() -> None:
    lines = [line.split() for line in (ROOT / "Dockerfile").read_text().splitlines() if line and line[0] != "#"]
    assert [words[1] for words in lines if words[0] == "FROM"] == ["python:3.11.7-slim-bookworm"] * 2
    copied = {words[1] for words in lines if words[0] == "COPY" and not words[1].startswith("--")}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.rstrip("*") for p in packages["include"]} <= copied
    users = [words[1] for words in lines if words[0] == "USER"]
    assert users and users[-1] not in ("root", "0")


# --- every query after a real pipeline run (not hand-seeded rows) ---------------------------------------------------

RUN_VALUES = {"model": "cta-stenosis", "model_version": "2.1.0", "metric": "fnr", "site": "site-b", "subgroup": "all"}
RUN_SPAN = (datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 12, 31, tzinfo=timezone.utc))


@pytest.fixture(scope="module")
def run_db(postgres_cluster, tmp_path_factory) -> Iterator[psycopg.Connection]:
    """A PostgreSQL store holding one real run: a scanner upgrade at site-b simulated, ingested, monitored, stored.
    The simulation and pipeline run are computed once per session and shared with test_persist.py."""
    from _shared_fixtures import scanner_upgrade_run

    from vigil.persist import persist

    settings, result, feed = scanner_upgrade_run(tmp_path_factory)
    postgres_cluster.admin("CREATE DATABASE vigil_dashboards_run")
    url = postgres_cluster.url("vigil_dashboards_run")
    settings = settings.model_copy(update={"store_url": url})
    persist(result, settings, [str(feed)], datetime.now(timezone.utc))
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        yield conn
    postgres_cluster.admin("DROP DATABASE vigil_dashboards_run WITH (FORCE)")


@pytest.mark.postgres
def test_every_query_runs_after_a_real_pipeline_run_and_the_alerting_stream_has_data(run_db) -> None:
    empty = []
    for uid, where, query in ALL_QUERIES:
        _, rows = _rows(run_db, expand(query["rawSql"], RUN_VALUES, RUN_SPAN))
        if not rows:
            empty.append(f"{uid} {where}")
    # a scanner upgrade yields points, alerts and a ticket: only dead-letter panels may be empty (the feed is clean)
    assert all("dead" in e.lower() or "rejected" in e.lower() for e in empty), empty
    _, open_alerts = _rows(run_db, "SELECT site FROM v_open_alerts WHERE model = 'cta-stenosis'")
    assert ("site-b",) in open_alerts
