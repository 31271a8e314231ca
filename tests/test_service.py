"""`vigil run` as a service: results, offsets and the pipeline checkpoint are stored in one transaction, so a process
that dies at any point and restarts ends with exactly the results of an uninterrupted run.

The feed is the simulator's, replayed as a stream in arrival order (``meta.lastUpdated``) through ``FeedSource``, a
finite in-memory implementation of the ``Source`` interface (the Kafka, REST and ``$export`` sources have their own
tests against real servers). A crash is an exception raised from inside ``poll`` after a random number of batches:
the process state is dropped without a final commit, like a SIGKILL between two commits (a kill inside a commit is a
rolled-back transaction, the same thing).
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import orjson
import pytest
from sqlalchemy import func, select

from ingest import Checkpoint, Message
from vigil import audit
from vigil.domain import Position
from vigil.service import Service
from vigil.settings import load_settings
from vigil.simulator import simulate
from vigil.store import (AlertRow, CaseRow, CheckpointRow, DeadLetterRow, MetricPointRow, RunRow, StreamStateRow,
                         TicketRow, session_factory)

TOPIC = "feed"


class Crash(Exception):
    pass


class FeedSource:
    """A finite stream of FHIR messages with one partition; ``crash_after`` polls raise ``Crash``."""

    def __init__(self, payloads: list[bytes], name: str = "sim", crash_after: int | None = None):
        self.name, self.payloads, self.crash_after = name, payloads, crash_after
        self.next = self.acked = 0
        self.polls = 0

    def resume(self, checkpoint: Checkpoint) -> None:
        self.next = self.acked = checkpoint.offsets.get((TOPIC, 0), 0)

    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        self.polls += 1
        if self.crash_after is not None and self.polls > self.crash_after:
            raise Crash(f"killed after {self.crash_after} polls")
        chunk = self.payloads[self.next:self.next + max_records]
        messages = [Message(Position(TOPIC, self.next + i, 0), p) for i, p in enumerate(chunk)]
        self.next += len(chunk)
        return messages

    @property
    def exhausted(self) -> bool:
        return self.next >= len(self.payloads)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(offsets={(TOPIC, 0): self.next})

    def committed(self) -> None:
        self.acked = self.next

    def close(self) -> None:
        pass


def feed_payloads(scenario: str = "mapping-break", days: int = 30, change_day: int = 12, volume: float = 0.4,
                  seed: int = 5) -> list[bytes]:
    """A simulated feed as one stream in arrival order, with two poison messages in the middle (dead letters)."""
    with tempfile.TemporaryDirectory() as out:
        simulate(scenario, Path(out), seed=seed, days=days, change_day=change_day, volume=volume)
        resources = [orjson.loads(line) for path in sorted(Path(out).glob("*.ndjson"))
                     for line in path.read_bytes().splitlines()]
    resources.sort(key=lambda r: (r.get("meta", {}).get("lastUpdated", ""), r["resourceType"] == "RiskAssessment"))
    payloads = [orjson.dumps(r) for r in resources]
    middle = len(payloads) // 2
    payloads[middle:middle] = [b"{not json", b'{"resourceType": 7}']
    return payloads


@pytest.fixture(scope="module")
def feed() -> list[bytes]:
    """The scanner-upgrade scenario as one stream in arrival order, plus two poison messages in the middle."""
    return feed_payloads("scanner-upgrade", days=110, change_day=50, volume=0.5)


def _outcome(url: str) -> dict:
    factory = session_factory(url)
    with factory() as s:
        alerts = sorted((a.model, a.model_version, a.metric, a.site, a.subgroup, a.detector, a.detected_at,
                         a.change_estimate, a.fire_count, a.state) for a in s.scalars(select(AlertRow)))
        tickets = sorted((t.category, t.cause, t.remedy, tuple(sorted(a.id for a in t.alerts)))
                         for t in s.scalars(select(TicketRow)))
        labels = dict(s.execute(select(CaseRow.label, func.count()).group_by(CaseRow.label)).all())
        cases = s.scalar(select(func.count()).select_from(CaseRow))
        distinct = s.scalar(select(func.count(func.distinct(CaseRow.prediction_id))))
        letters = sorted((d.source, d.position, d.reason) for d in s.scalars(select(DeadLetterRow)))
        points = sorted((p.model, p.metric, p.site, p.subgroup, p.period_start, p.n, round(p.value, 9))
                        for p in s.scalars(select(MetricPointRow)))
        streams = sorted((r.model, r.model_version, r.metric, r.site, r.subgroup, r.status, r.baseline_n, r.n,
                          None if r.statistic is None else round(r.statistic, 9))
                         for r in s.scalars(select(StreamStateRow)))
        chain = audit.verify(s)
    factory.kw["bind"].dispose()
    return {"alerts": alerts, "tickets": tickets, "labels": labels, "cases": cases, "distinct_cases": distinct,
            "dead_letters": letters, "points": points, "streams": streams, "audit_ok": chain.ok}


def _run(url: str, feed: list[bytes], crash_after: int | None = None, batch: int = 4000):
    settings = load_settings(store_url=url)
    source = FeedSource(feed, crash_after=crash_after)
    return Service(settings, [source], commit_every=0.0, max_batch=batch, poll_timeout=0.0).run(once=True), source


@pytest.fixture(scope="module")
def uninterrupted(feed, tmp_path_factory) -> dict:
    url = f"sqlite:///{tmp_path_factory.mktemp('whole') / 'vigil.db'}"
    report, _ = _run(url, feed)
    assert report.commits >= len(feed) // 4000
    return _outcome(url)


def test_a_streamed_feed_is_stored_with_its_alerts_tickets_and_dead_letters(uninterrupted, feed):
    assert uninterrupted["alerts"], "the scanner-upgrade scenario raises alerts"
    assert any(a[2] == "fnr" and a[3] == "site-b" for a in uninterrupted["alerts"])
    assert uninterrupted["tickets"]
    assert uninterrupted["cases"] == uninterrupted["distinct_cases"] > 1000
    assert len(uninterrupted["points"]) > 1000  # daily points stay in the store after the service forgets them
    reasons = [reason for _, _, reason in uninterrupted["dead_letters"]]
    assert any(r.startswith("invalid JSON") for r in reasons) and any("resourceType" in r for r in reasons)
    positions = {pos for _, pos, _ in uninterrupted["dead_letters"]}
    assert len(feed) // 2 in positions  # the poison message is named by its offset
    assert uninterrupted["audit_ok"]


def test_killed_at_random_points_and_restarted_gives_exactly_the_uninterrupted_results(uninterrupted, feed, tmp_path):
    url = f"sqlite:///{tmp_path / 'vigil.db'}"
    rng = random.Random(11)
    crashes = 0
    while True:
        try:
            report, _ = _run(url, feed, crash_after=rng.randint(1, 6))
            break
        except Crash:
            crashes += 1
    assert crashes >= 3, "the test must actually kill the service several times"
    assert report.restored.startswith("restored checkpoint")
    assert _outcome(url) == uninterrupted


def test_a_restart_after_the_end_replays_nothing(feed, tmp_path):
    url = f"sqlite:///{tmp_path / 'vigil.db'}"
    _run(url, feed[:8000])
    before = _outcome(url)
    report, source = _run(url, feed[:8000])
    assert report.messages == 0 and source.next == 8000
    assert _outcome(url) == before


def test_a_checkpoint_from_another_config_is_not_restored_and_the_feed_is_replayed(feed, tmp_path):
    url = f"sqlite:///{tmp_path / 'vigil.db'}"
    _run(url, feed[:5000])
    factory = session_factory(url)
    with factory() as s, s.begin():
        s.get(CheckpointRow, "pipeline").config_hash = "another-config"
    factory.kw["bind"].dispose()
    report, source = _run(url, feed[:5000])
    assert report.restored.startswith("checkpoint 'pipeline' was written by vigil")
    assert report.messages == 5000  # replayed from the start, since the state the offsets belong to is gone


def test_a_tampered_checkpoint_is_refused(feed, tmp_path):
    url = f"sqlite:///{tmp_path / 'vigil.db'}"
    _run(url, feed[:3000])
    factory = session_factory(url)
    with factory() as s, s.begin():
        row = s.get(CheckpointRow, "pipeline")
        row.state = row.state[:-1] + bytes([row.state[-1] ^ 1])
    factory.kw["bind"].dispose()
    with pytest.raises(ValueError, match="bad signature"):
        _run(url, feed[:3000])


def test_each_process_records_one_run_with_its_counts(feed, tmp_path):
    url = f"sqlite:///{tmp_path / 'vigil.db'}"
    _run(url, feed[:6000], batch=1000)
    factory = session_factory(url)
    with factory() as s:
        runs = s.scalars(select(RunRow)).all()
    factory.kw["bind"].dispose()
    assert len(runs) == 1 and runs[0].finished_at is not None
    assert sum(runs[0].counts["accepted"].values()) + sum(runs[0].counts["rejected"].values()) \
        + sum(runs[0].counts["ignored"].values()) >= 5990


def test_vigil_run_consumes_a_configured_export_directory_and_a_restart_reads_nothing_twice(tmp_path, monkeypatch):
    """`vigil run --once` with a bulk-directory source (the Synthea export, real third-party FHIR) goes through the
    service loop: a second run resumes from the stored cursor and reads nothing again."""
    from typer.testing import CliRunner

    from vigil.cli import app

    synthea = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea-bulk-10"
    monkeypatch.setenv("VIGIL_SOURCES", orjson.dumps([{"kind": "bulk-directory", "name": "synthea",
                                                       "path": str(synthea)}]).decode())
    store = f"sqlite:///{tmp_path / 'vigil.db'}"
    first = CliRunner().invoke(app, ["run", "--once", "--json", "--store", store])
    assert first.exit_code == 0, first.output
    report = orjson.loads(first.stdout)
    assert report["messages"] > 7000 and report["restored"].startswith("no checkpoint")
    again = orjson.loads(CliRunner().invoke(app, ["run", "--once", "--json", "--store", store]).stdout)
    assert again["messages"] == 0 and again["restored"].startswith("restored checkpoint")
    factory = session_factory(store)
    with factory() as s:
        letters = s.scalars(select(DeadLetterRow.reason)).all()
        runs = s.scalars(select(RunRow)).all()
    factory.kw["bind"].dispose()
    assert any("log" in r or "resourceType" in r for r in letters)  # log.ndjson is not FHIR
    counts = runs[0].counts
    assert len(runs) == 2 and sum(counts["accepted"].values()) + sum(counts["ignored"].values()) > 7000
    assert counts["accepted"]["Patient"] == 13 and runs[1].counts == counts  # the restart added nothing


def test_json_logs_are_one_object_per_line_and_carry_the_services_messages(tmp_path, monkeypatch):
    """`vigil --log-format json` (env VIGIL_LOG_FORMAT): structured logs for shippers, with the service's messages."""
    import logging

    from typer.testing import CliRunner

    from vigil.cli import app

    synthea = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea-bulk-10"
    monkeypatch.setenv("VIGIL_SOURCES", orjson.dumps([{"kind": "bulk-directory", "name": "synthea",
                                                       "path": str(synthea)}]).decode())
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        out = CliRunner().invoke(app, ["--log-format", "json", "--log-level-root", "info", "run", "--once",
                                       "--json", "--store", f"sqlite:///{tmp_path / 'vigil.db'}"])
    finally:
        root.handlers[:], root.level = saved
    assert out.exit_code == 0, out.output
    lines = [orjson.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert any(line["message"].startswith("vigil run: no checkpoint") and line["level"] == "INFO" for line in lines)
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
