"""`vigil deadletters replay` re-injects dead letters into the service's pipeline state once their cause is fixed.

Real SQLite store, the real service (vigil/service.py) and pipeline, the simulator's feed. The feed reaches the
service through ``FeedSource``, a finite in-memory ``Source`` (as in tests/test_service.py; the Kafka, REST and
``$export`` sources have their own tests against real servers).

Story: the config lists one of the two models the feed predicts for, so the other model's RiskAssessments are
dead-lettered ("unknown model") with their redacted payloads. The operator adds the model; the service is run under
the fixed config, but the source no longer holds those RiskAssessments (a webhook, or a topic past its retention);
replaying the dead letters puts them into the pipeline, where each counts exactly once, with the subject pseudonym
and site the original resources had.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
import yaml
from sqlalchemy import func, select
from test_service import FeedSource
from typer.testing import CliRunner

from ingest import SubjectKeyer, redact
from vigil import audit
from vigil.cli_deadletters import deadletters_app
from vigil.pipeline import Pipeline
from vigil.replay import NO_PAYLOAD, REPLAYED, SUMMARY
from vigil.service import Service
from vigil.settings import EXAMPLES_DIR, Settings, load_settings
from vigil.simulator import simulate
from vigil.store import AuditRow, CaseRow, DeadLetterRow, RunRow, StreamStateRow, session_factory

runner = CliRunner()
LATE_MODEL = "cta-stenosis"  # not configured at first


@pytest.fixture(scope="module")
def resources(tmp_path_factory) -> list[dict]:
    """12 days of the stable scenario (both example models), in arrival order."""
    out = tmp_path_factory.mktemp("feed")
    simulate("stable", out, seed=3, days=12, change_day=5, volume=0.08)
    found = [orjson.loads(line) for p in sorted(out.glob("*.ndjson")) for line in p.read_bytes().splitlines()]
    found.sort(key=lambda r: (r.get("meta", {}).get("lastUpdated", ""), r["resourceType"] == "RiskAssessment"))
    return found


def _late(resource: dict) -> bool:
    return resource["resourceType"] == "RiskAssessment" and resource["method"]["coding"][0]["code"] == LATE_MODEL


@pytest.fixture(params=["sqlite", "postgresql"])
def configs(request, tmp_path) -> tuple[str, Path, Path]:
    """(store URL, config without the late model, the fixed config with it): the example config, paths absolute;
    the store is SQLite (the embedded default) or a fresh database of the test PostgreSQL cluster."""
    raw = yaml.safe_load((EXAMPLES_DIR / "vigil.yaml").read_text())
    url = (f"sqlite:///{tmp_path / 'v.db'}" if request.param == "sqlite"
           else request.getfixturevalue("fresh_postgres_url"))
    raw["store_url"] = url
    raw["concept_maps"] = [str(EXAMPLES_DIR / p) for p in raw["concept_maps"]]
    for model in raw["models"]:
        model["pccp"] = str(EXAMPLES_DIR / model["pccp"])
    fixed, before = tmp_path / "fixed.yaml", tmp_path / "before.yaml"
    fixed.write_text(yaml.safe_dump(raw))
    before.write_text(yaml.safe_dump({**raw, "models": [m for m in raw["models"] if m["id"] != LATE_MODEL]}))
    return url, before, fixed


@pytest.fixture(autouse=True)
def decoder_knows_the_models(monkeypatch):
    """The one wiring this feature asks of vigil/pipeline.py (see the report): the pipeline builds its decoder with
    ``models=`` the configured ids, so an unknown model's prediction is dead-lettered with its redacted payload.
    Applied here by wrapping ``Pipeline.__init__``/``bind`` until it lands; a no-op once it has."""
    if Pipeline(Settings()).decoder.models is not None:
        return
    init, bind = Pipeline.__init__, Pipeline.bind

    def wired_init(self, settings):
        init(self, settings)
        self.decoder.models = frozenset(m.id for m in settings.models)

    def wired_bind(self, settings):
        bind(self, settings)
        self.decoder.models = frozenset(m.id for m in settings.models)
        return self

    monkeypatch.setattr(Pipeline, "__init__", wired_init)
    monkeypatch.setattr(Pipeline, "bind", wired_bind)


def _replay(*args: str) -> tuple[int, str]:
    result = runner.invoke(deadletters_app, ["replay", "--by", "qa.officer", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _late_model_count(url: str, model: str = LATE_MODEL) -> int:
    """Predictions of a model the streams have counted (its overall score stream, still in baseline)."""
    factory = session_factory(url)
    try:
        with factory() as s:
            return s.scalar(select(func.coalesce(func.sum(StreamStateRow.baseline_n + StreamStateRow.n), 0)).where(
                StreamStateRow.model == model, StreamStateRow.metric == "score_mean",
                StreamStateRow.site == "all", StreamStateRow.subgroup == "all"))
    finally:
        factory.kw["bind"].dispose()


def test_unknown_model_dead_letters_are_reinjected_once_after_the_config_is_fixed(resources, configs):
    url, before, fixed = configs
    late = [r for r in resources if _late(r)]
    feed = [orjson.dumps(r) for r in resources]
    feed.insert(5, b"{not json")  # a dead letter without a payload
    Service(load_settings(before), [FeedSource(feed)]).run(once=True)

    factory = session_factory(url)
    with factory() as s:
        letters = s.scalars(select(DeadLetterRow).where(DeadLetterRow.reason.contains("unknown model"))
                            .order_by(DeadLetterRow.id)).all()
        evidence = [(d.id, d.reason, d.payload) for d in letters]
        [broken] = s.scalars(select(DeadLetterRow.id).where(DeadLetterRow.reason.startswith("invalid JSON"))).all()
    assert sorted(d.resource_id for d in letters) == sorted(r["id"] for r in late) and len(late) > 50
    assert all(d.payload and "Patient/vigil-key." in d.payload for d in letters)
    raw_subjects = {r["subject"]["reference"] for r in late}
    assert not any(ref in d.payload for d in letters for ref in raw_subjects)  # no raw Patient id kept
    assert _late_model_count(url) == 0

    # the checkpoint was written under the old config: replay says what to do first
    code, output = _replay("--reason", "unknown model", "--config", str(fixed), "--store", url)
    assert code == 1 and "does not fit this config" in output and "vigil run" in output

    # the fixed service restarts from its source, which no longer holds the late model's predictions
    Service(load_settings(fixed), [FeedSource([orjson.dumps(r) for r in resources if not _late(r)])]).run(once=True)
    assert _late_model_count(url) == 0

    code, output = _replay("--reason", "unknown model", "--config", str(fixed), "--store", url, "--json")
    assert code == 0, output
    report = json.loads(output)
    assert sorted(e["id"] for e in report["replayed"]) == [i for i, _, _ in evidence]
    assert report["still_rejected"] == report["not_replayable"] == report["already_replayed"] == []
    assert report["checkpoint"].startswith("restored checkpoint")
    assert _late_model_count(url) == len(late)

    keyer = SubjectKeyer(load_settings(fixed).subject_key)
    with factory() as s:
        cases = s.execute(select(CaseRow.subject, CaseRow.site, CaseRow.attributes)
                          .where(CaseRow.model == LATE_MODEL)).all()
        marks = s.scalars(select(AuditRow.entity_id).where(AuditRow.action == REPLAYED)).all()
        summaries = s.scalars(select(AuditRow).where(AuditRow.action == SUMMARY)).all()
        assert audit.verify(s).ok
        assert [(d.id, d.reason, d.payload) for d in s.scalars(
            select(DeadLetterRow).where(DeadLetterRow.id.in_([i for i, _, _ in evidence]))
            .order_by(DeadLetterRow.id))] == evidence  # the evidence is untouched
    # keyed once: the same pseudonyms (and so the same sites and subgroups) as the original resources would have had
    assert cases and {c.subject for c in cases} <= {keyer.key(ref) for ref in raw_subjects}
    assert {c.site for c in cases} <= {"site-a", "site-b", "site-c"} and all(c.attributes["age_band"] != "unknown"
                                                                           for c in cases)
    assert sorted(map(int, marks)) == [i for i, _, _ in evidence]
    assert [(a.actor, len(a.payload["replayed"])) for a in summaries] == [("qa.officer", len(late))]
    listed = runner.invoke(deadletters_app, ["list", "--store", url, "--reason", "unknown model", "--limit", "1000",
                                             "--json"])
    assert all(r["replayed"] for r in json.loads(listed.stdout))

    # a second replay changes nothing; a restart of the service keeps what the replay added
    code, output = _replay("--all", "--config", str(fixed), "--store", url, "--json")
    again = json.loads(output)
    assert code == 0 and again["replayed"] == []
    assert sorted(e["id"] for e in again["already_replayed"]) == [i for i, _, _ in evidence]
    assert [e["id"] for e in again["not_replayable"]] == [broken]
    assert _late_model_count(url) == len(late)
    Service(load_settings(fixed), [FeedSource([orjson.dumps(r) for r in resources if not _late(r)])]).run(once=True)
    assert _late_model_count(url) == len(late)

    # a dead letter that kept no payload is refused, with the reason
    code, output = _replay(str(broken), "--config", str(fixed), "--store", url)
    assert code == 1 and "not replayable" in output and NO_PAYLOAD[:40] in " ".join(output.split())
    factory.kw["bind"].dispose()


def test_replay_is_refused_while_the_service_has_not_finished(resources, configs):
    url, before, fixed = configs
    bad = next({**r, "id": "bad-score", "prediction": [{"probabilityDecimal": 1.5}]} for r in resources
               if r["resourceType"] == "RiskAssessment")
    Service(load_settings(fixed), [FeedSource([orjson.dumps(r) for r in resources[:200]] + [orjson.dumps(bad)])]
            ).run(once=True)
    factory = session_factory(url)
    with factory() as s, s.begin():
        s.add(RunRow(config_hash="x", code_version="x", inputs=["ehr"]))  # a `vigil run` that is still going
    factory.kw["bind"].dispose()
    code, output = _replay("--all", "--config", str(fixed), "--store", url)
    assert code == 1 and "has not finished" in output and "--force" in output
    code, output = _replay("--all", "--force", "--config", str(fixed), "--store", url, "--json")
    [still] = json.loads(output)["still_rejected"]
    assert code == 0 and still["detail"] == ("RiskAssessment/bad-score: invalid prediction[0].probabilityDecimal 1.5 "
                                             "(must be a number from 0 to 1)")

    # a dead letter of a resource the source re-sent meanwhile (so already counted) is replayed as a duplicate
    counted = next(r for r in resources[:200] if r["resourceType"] == "RiskAssessment")
    model = counted["method"]["coding"][0]["code"]
    before = _late_model_count(url, model)
    factory = session_factory(url)
    with factory() as s, s.begin():
        letter = DeadLetterRow(source="ehr-webhook", position=3, reason=f"RiskAssessment/{counted['id']}: broker "
                               "timeout (forwarded again later)", resource_type="RiskAssessment",
                               resource_id=counted["id"],
                               payload=orjson.dumps(redact(counted, SubjectKeyer(load_settings(fixed).subject_key)))
                               .decode())
        s.add(letter)
        s.flush()
        resent = letter.id
    factory.kw["bind"].dispose()
    code, output = _replay(str(resent), "--force", "--config", str(fixed), "--store", url, "--json")
    report = json.loads(output)
    assert code == 0 and [e["id"] for e in report["replayed"]] == [resent] and report["duplicates"] == 1
    assert _late_model_count(url, model) == before > 0
