"""The two-stage deployment (DESIGN.md §The flow) gives exactly the embedded default's results.

Two levels:
- in process, without a broker: the feed is routed by patient over several stage-1 pipelines (``mode="cases"``)
  whose observations reach per-model stage-2 pipelines (``mode="monitor"``) in random batch sizes and random
  interleavings — the results equal the embedded pipeline's, field by field (the canonical order of
  ``vigil.observations`` is what makes that true);
- as processes: ``vigil run --stage cases`` ×2 and ``--stage monitor`` ×2 against librdkafka's mock cluster (a real
  Kafka-protocol server, ``tests/kafka_mock.py``) and the test PostgreSQL, one stage-1 process SIGKILLed mid-run and
  started again — the store ends with exactly what the embedded run stores.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
import yaml
from kafka_mock import quick_mock_cluster  # noqa: F401  (fixture)
from sqlalchemy import func, select

from vigil.keyed_feed import in_arrival_order, partition_for, route
from vigil.observations import Observation, Sequencer, decode_record, encode_batch
from vigil.persist import persist
from vigil.pipeline import Pipeline
from vigil.settings import DEFAULT_CONFIG, load_settings
from vigil.simulator import simulate
from vigil.offsets import offset_key
from vigil.store import AlertRow, CaseRow, CheckpointRow, DeadLetterRow, MetricPointRow, SourceOffsetRow, \
    StreamStateRow, TicketRow, session_factory, upgrade

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 12  # the mock keeps ~5 MB per partition: the feed must fit whole


@pytest.fixture(scope="module")
def resources(tmp_path_factory) -> list[dict]:
    """The scanner-upgrade scenario (alerts and a ticket) as one stream in arrival order."""
    out = tmp_path_factory.mktemp("feed")
    simulate("scanner-upgrade", out, seed=5, days=90, change_day=30, volume=0.4)
    # in arrival order, ending with the feed clock of the last instant on every partition
    return in_arrival_order(orjson.loads(line) for path in sorted(out.glob("*.ndjson"))
                            for line in path.read_bytes().splitlines())


@pytest.fixture(scope="module")
def feed_file(resources, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("whole") / "feed.ndjson"
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in resources) + b"\n")
    return path


@pytest.fixture(scope="module")
def embedded(feed_file):
    return Pipeline(load_settings()).run_paths([feed_file])


def _digest(results) -> dict:
    """What a run decided, independent of how it was split: alerts, tickets, labels, every stream's state."""
    alerts, tickets, cases, streams, points = [], [], {}, {}, {}
    for r in results:
        alerts += [(a.signal.stream, a.signal.detector, a.signal.detected_at, a.signal.change_estimate, a.fire_count,
                    a.state.value, a.resolved_at) for a in r.alerts.alerts]
        by_id = {a.id: a.signal.stream for a in r.alerts.alerts}
        tickets += [(t.model, t.category, t.cause, tuple(sorted(str(by_id[i]) for i in t.alert_ids)))
                    for t in r.tickets]
        for run in r.models.values():
            cases.update({rid: (c.label, c.labeled_at) for rid, c in run.cases.items()})
            for monitor in run.monitors.values():
                for key, s in monitor.streams.items():
                    streams[key] = (s.status, s.b_n, s.alarms, s.corrections,
                                    None if s.detector is None else round(s.detector.statistic, 12))
                    points.update({(key, day): (p.n, round(p.total, 9)) for day, p in s.points.items()})
    return {"alerts": sorted(alerts, key=str), "tickets": sorted(tickets, key=str), "cases": cases,
            "streams": streams, "points": points}


def _staged_in_process(resources: list[dict], partitions: int, rng: random.Random, cases_partitions: int):
    """Stage 1 per patient partition, stage 2 per cases partition (models hashed onto them, as the stage runner
    does: several models may share one), batches and interleavings at random."""
    settings = load_settings()
    by_partition: dict[int, list[bytes]] = defaultdict(list)
    for p, payload in route(resources, partitions):
        by_partition[p].append(payload)
    from ingest import load_messages
    from ingest.sources import Message
    from vigil.domain import Position

    stage1 = {p: Pipeline(settings, mode="cases") for p in by_partition}
    stage2 = {p: Pipeline(settings, mode="monitor") for p in range(cases_partitions)}
    destination = {m.id: partition_for(m.id, cases_partitions) for m in settings.models}
    upstream = [f"fhir:{p}" for p in sorted(stage1)]
    cursors = dict.fromkeys(stage1, 0)
    wire: list[tuple[str, bytes]] = []  # (model or "*", record) in flight to stage 2
    while any(cursors[p] < len(by_partition[p]) for p in stage1):
        p = rng.choice([q for q in stage1 if cursors[q] < len(by_partition[q])])
        n = rng.randint(1, 4000)
        chunk = by_partition[p][cursors[p]:cursors[p] + n]
        messages = [Message(Position("fhir", cursors[p] + i, p), payload) for i, payload in enumerate(chunk)]
        cursors[p] += len(chunk)
        stage = stage1[p]
        stage.ingest(load_messages(messages, stage.decoder))
        rows_by_destination = defaultdict(list)
        for seq, obs in stage.take_outbox():
            rows_by_destination[destination[obs.model]].append((seq, obs))
        for d, rows in rows_by_destination.items():
            wire.append((d, encode_batch(f"fhir:{p}", rows)))
        if rng.random() < 0.3:  # a replay after a crash re-sends what was sent: stage 2 drops it
            wire += wire[-len(rows_by_destination):] if rows_by_destination else []
        for d in stage2:
            wire.append((d, orjson.dumps({"source": f"fhir:{p}", "watermark": stage.watermark_micros,
                                          "upstream": upstream})))
        while wire and rng.random() < 0.7:  # deliver some of what is in flight, in order per stage-2 partition
            d, record = wire.pop(0)
            _deliver(stage2[d], record)
    for d, record in wire:
        _deliver(stage2[d], record)
    for d in stage2:
        for p in stage1:
            stage2[d].receive(f"fhir:{p}", [], None, upstream, end=True)
    return list(stage1.values()), list(stage2.values())


def _deliver(stage, record: bytes) -> None:
    r = decode_record(record)
    if "obs" in r:
        stage.receive(r["source"], r["obs"], None, [])
    else:
        stage.receive(r["source"], [], r["watermark"], r["upstream"])


def _combined(stage1, stage2) -> dict:
    cases = _digest([s.result for s in stage1])["cases"]
    d = _digest([s.result for s in stage2])
    d["cases"] = cases
    return d


@pytest.mark.parametrize("partitions,cases_partitions,seed", [(3, 1, 1), (5, 5, 2)])  # models share one; split
def test_split_over_partitions_in_any_interleaving_gives_the_embedded_results(resources, embedded, partitions,
                                                                            cases_partitions, seed):
    want = _digest([embedded])
    assert want["alerts"] and want["tickets"], "the scenario must raise alerts and a ticket for this to mean much"
    stage1, stage2 = _staged_in_process(resources, partitions, random.Random(seed), cases_partitions)
    got = _combined(stage1, stage2)
    assert got["cases"] == want["cases"]
    assert got["streams"] == want["streams"]
    assert got["points"] == want["points"]
    assert got["alerts"] == want["alerts"]
    assert got["tickets"] == want["tickets"]
    assert sum(s.streams.sequencer.duplicates for s in stage2) > 0  # the re-sent batches were dropped


def test_the_sequencer_applies_in_key_order_once_every_upstream_has_passed():
    def obs(at: int, tag: str) -> Observation:
        return Observation((at, 1, tag), "fact", "m", "", "s", ["all"], datetime(2026, 1, 1, tzinfo=UTC))

    seq = Sequencer()
    seq.push("a", [(0, obs(10, "a0")), (1, obs(20, "a1"))])
    assert seq.ready() == []  # nobody said who is upstream
    seq.progress("a", 20, ["a", "b"])
    assert seq.ready() == []  # b has not reported
    seq.push("b", [(0, obs(15, "b0"))])
    seq.progress("b", 18, ["a", "b"])
    assert [o.key[2] for o in seq.ready()] == ["a0", "b0"]  # below min(20, 18); a1 (at 20) waits
    seq.push("a", [(1, obs(20, "a1")), (2, obs(30, "a2"))])  # a1 again: a replay after a crash
    assert seq.duplicates == 1
    seq.progress("b", None, ["a", "b"], end=True)
    assert [o.key[2] for o in seq.ready()] == ["a1"]
    assert [o.key[2] for o in seq.ready(flush=True)] == ["a2"]
    assert not seq.finished
    seq.progress("a", None, ["a", "b"], end=True)
    assert seq.finished


def test_a_malformed_cases_record_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="not a vigil cases-topic record"):
        decode_record(b"[1, 2]")
    with pytest.raises(ValueError, match="unknown observation kind"):
        decode_record(orjson.dumps({"source": "x", "obs": [[0, [0], "guess", "m", "", "s", [], 0, 0, 0, 0, 0, 0, 0,
                                                                  None]]}))


def test_resources_are_keyed_by_patient_and_reference_data_goes_everywhere():
    pat = {"resourceType": "Patient", "id": "p1"}
    obs = {"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p1"}}
    dev = {"resourceType": "Device", "id": "d1"}
    routed = list(route([pat, obs, dev], 4))
    assert routed[0][0] == routed[1][0] == partition_for("p1", 4)
    assert sorted(p for p, _ in routed[2:]) == [0, 1, 2, 3]


# --- processes against the mock cluster ------------------------------------------------------------------------------


def _outcome(url: str) -> dict:
    """What the store holds: alerts, tickets, case labels, dead-letter reasons, stream states and daily points."""
    factory = session_factory(url)
    with factory() as s:
        alerts = sorted((a.model, a.model_version, a.metric, a.site, a.subgroup, a.detector, a.detected_at,
                         a.change_estimate, a.fire_count, a.state) for a in s.scalars(select(AlertRow)))
        tickets = sorted((t.category, t.cause, t.remedy, len(t.alerts)) for t in s.scalars(select(TicketRow)))
        cases = sorted((c.prediction_id, c.label) for c in s.scalars(select(CaseRow)))
        letters = sorted(d.reason for d in s.scalars(select(DeadLetterRow)))
        points = sorted((p.model, p.metric, p.site, p.subgroup, p.period_start, p.n, round(p.value, 9))
                        for p in s.scalars(select(MetricPointRow)))
        streams = sorted((r.model, r.model_version, r.metric, r.site, r.subgroup, r.status, r.baseline_n, r.n,
                          None if r.statistic is None else round(r.statistic, 9))
                         for r in s.scalars(select(StreamStateRow)))
        checkpoints = s.scalar(select(func.count()).select_from(CheckpointRow))
    factory.kw["bind"].dispose()
    return {"alerts": alerts, "tickets": tickets, "cases": cases, "dead_letters": letters, "points": points,
            "streams": streams, "checkpoints": checkpoints}


def _config(tmp_path: Path, bootstrap: str, url: str) -> Path:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    base = DEFAULT_CONFIG.resolve().parent
    raw["concept_maps"] = [str((base / p).resolve()) for p in raw.get("concept_maps", [])]
    for m in raw.get("models", []):
        if m.get("pccp"):
            m["pccp"] = str((base / m["pccp"]).resolve())
    raw["store_url"] = url
    raw["sources"] = [{"kind": "kafka", "name": "fhir", "bootstrap_servers": bootstrap, "topics": ["fhir"],
                       "group_id": "vigil-cases", "api_version": "2.3", "idle_timeout_s": 2.0,
                       "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "max_poll_records": 500}]
    path = tmp_path / "vigil.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _start(config: Path, stage: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "stage_process.py"), "run", "--config", str(config),
                             "--stage", stage, "--once", "--commit-every", "0.5", "--json"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "VIGIL_LOG_LEVEL": "INFO"})


def _stored_offsets(url: str) -> int:
    """How many FHIR messages stage 1 has stored results for (the sum of its partitions' stored offsets)."""
    factory = session_factory(url)
    with factory() as s:
        n = s.scalar(select(func.coalesce(func.sum(SourceOffsetRow.offset), 0))
                     .where(SourceOffsetRow.source == offset_key("fhir", "fhir")))
    factory.kw["bind"].dispose()
    return n


def test_two_processes_per_stage_one_killed_mid_run_end_with_the_single_process_results(
        resources, embedded, quick_mock_cluster, fresh_postgres_url, tmp_path):
    reference_url = f"sqlite:///{tmp_path / 'embedded.db'}"
    persist(embedded, load_settings(store_url=reference_url), ["feed"], datetime.now(UTC))
    want = _outcome(reference_url)
    assert want["alerts"] and want["tickets"]

    upgrade(fresh_postgres_url)  # once, as `vigil db upgrade` before a deployment starts its processes
    quick_mock_cluster.create_topic("fhir", PARTITIONS)
    records = list(route(resources, PARTITIONS))
    quick_mock_cluster.produce("fhir", records)
    config = _config(tmp_path, quick_mock_cluster.bootstrap, fresh_postgres_url)
    logs = {name: tmp_path / f"{name}.log" for name in ("c1", "c2", "m1", "m2")}
    procs = {"c1": _start(config, "cases", logs["c1"]), "c2": _start(config, "cases", logs["c2"]),
             "m1": _start(config, "monitor", logs["m1"]), "m2": _start(config, "monitor", logs["m2"])}
    total = len(records)
    deadline = time.monotonic() + 300
    while _stored_offsets(fresh_postgres_url) < total // 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    procs["c1"].send_signal(signal.SIGKILL)  # mid-run: a quarter or more of the feed stored, not all of it
    procs["c1"].wait()
    killed_at = _stored_offsets(fresh_postgres_url)
    procs["c1"] = _start(config, "cases", logs["c1"])
    for name, proc in procs.items():
        try:
            assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, logs[name].read_text()[-3000:]
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            pytest.fail(f"{name} did not finish: {logs[name].read_text()[-3000:]}")
    got = _outcome(fresh_postgres_url)
    assert total // 4 <= killed_at < total, "the kill must land mid-run"
    for part in ("cases", "dead_letters", "streams", "points", "alerts", "tickets"):
        assert got[part] == want[part], part
    assert got["checkpoints"] == PARTITIONS + 4  # one per partition of each stage: fhir ×12, vigil.cases ×4


def test_vigil_publish_lays_a_feed_out_by_patient_on_the_broker(quick_mock_cluster, tmp_path):
    """`vigil publish` against the mock cluster: each patient's resources in the patient's partition, reference
    data and the closing feed clock in every partition, in arrival order."""
    from kafka import KafkaConsumer, TopicPartition
    from typer.testing import CliRunner

    from vigil.cli import app

    feed = [{"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p1"},
             "meta": {"lastUpdated": "2026-01-02T00:00:00Z"}},
            {"resourceType": "Patient", "id": "p1", "meta": {"lastUpdated": "2026-01-01T00:00:00Z"}},
            {"resourceType": "Device", "id": "d1", "meta": {"lastUpdated": "2026-01-03T00:00:00Z"}}]
    (tmp_path / "feed.ndjson").write_bytes(b"\n".join(orjson.dumps(r) for r in feed))
    quick_mock_cluster.create_topic("fhir.in", 3)
    result = CliRunner().invoke(app, ["publish", str(tmp_path), "--bootstrap", quick_mock_cluster.bootstrap,
                                      "--topic", "fhir.in", "--json"])
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.output) == {"topic": "fhir.in", "resources": 3, "records": 2 + 3 + 3}
    consumer = KafkaConsumer(bootstrap_servers=quick_mock_cluster.bootstrap, api_version=(2, 3),
                             enable_auto_commit=False, group_id=None, consumer_timeout_ms=3000)
    partitions = [TopicPartition("fhir.in", p) for p in range(3)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    got: dict[int, list[str]] = defaultdict(list)
    for record in consumer:
        r = orjson.loads(record.value)
        got[record.partition].append(r.get("id") or r["parameter"][0]["name"])
    consumer.close()
    home = partition_for("p1", 3)
    assert got[home] == ["d1", "p1", "o1", "vigil-feed-clock"]
    assert all(got[p] == ["d1", "vigil-feed-clock"] for p in range(3) if p != home)
