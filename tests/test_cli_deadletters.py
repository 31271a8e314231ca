"""`vigil deadletters list|show|replay` on a real SQLite store filled by `vigil ingest` from a file with bad lines."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from ingest import SubjectKeyer
from vigil.cli import app
from vigil.cli_deadletters import deadletters_app
from vigil.settings import load_settings
from vigil.store import AuditRow, DeadLetterRow, session_factory

runner = CliRunner()

PATIENT_ID, FAMILY, GIVEN = "pt-secret-77", "Oddname", "Zedediah"
BAD_LINES = [
    '{"resourceType": "Organization", "id": "site-x"}',
    '{"resourceType": "Organization", "id": ',
    '{"hello": "not fhir"}',
    json.dumps({"resourceType": "Patient", "id": PATIENT_ID, "name": [{"family": FAMILY, "given": [GIVEN]}],
                "birthDate": "someday"}),
    json.dumps({"resourceType": "Encounter", "id": "enc-1", "status": "finished"}),  # no subject
]
EARLIER = {  # what an earlier decoder rejected and the current one accepts (e.g. after a decoder fix)
    "source": "fhir.r4", "partition": 2, "position": 41, "resource_type": "Organization", "resource_id": "site-z",
    "reason": "Organization/site-z: unsupported element (vigil 0.0.1)",
    "payload": '{"resourceType":"Organization","id":"site-z","name":"Site Z"}',
}


@pytest.fixture
def store(tmp_path) -> tuple[str, str]:
    """(store URL, the broken file's path): `vigil ingest` of the file, plus one Kafka dead letter of an older run."""
    feed = tmp_path / "feed"
    feed.mkdir()
    broken = feed / "Broken.000.ndjson"
    broken.write_text("\n".join(BAD_LINES) + "\n")
    url = f"sqlite:///{tmp_path / 'v.db'}"
    result = runner.invoke(app, ["ingest", str(feed), "--store", url, "--json"])
    assert result.exit_code == 0, result.output
    factory = session_factory(url)
    with factory() as s, s.begin():
        s.add(DeadLetterRow(**EARLIER))
    factory.kw["bind"].dispose()
    return url, str(broken)


def _json(*args: str) -> object:
    result = runner.invoke(deadletters_app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_list_names_where_and_why_and_filters(store):
    url, broken = store
    rows = _json("list", "--store", url, "--json")
    where = {r["where"]: r for r in rows}
    assert set(where) == {f"{broken}:2", f"{broken}:3", f"{broken}:4", f"{broken}:5", "fhir.r4[2]@41"}
    assert where[f"{broken}:2"]["reason"].startswith("invalid JSON")
    assert where[f"{broken}:3"]["reason"] == "not a FHIR resource (no resourceType)"
    assert "invalid birthDate" in where[f"{broken}:4"]["reason"]
    visit = SubjectKeyer(load_settings().subject_key).key("Encounter/enc-1")  # visit numbers are keyed too
    assert where[f"{broken}:5"]["reason"] == f"Encounter/{visit}: missing subject"
    assert [where[w]["has_payload"] for w in (f"{broken}:2", f"{broken}:3", f"{broken}:4")] == [False, False, True]
    assert not any(r["replayed"] for r in rows)

    assert [r["where"] for r in _json("list", "--store", url, "--reason", "INVALID json", "--json")] == [
        f"{broken}:2"]
    assert [r["where"] for r in _json("list", "--store", url, "--source", "fhir.r4", "--json")] == ["fhir.r4[2]@41"]
    assert len(_json("list", "--store", url, "--limit", "2", "--json")) == 2

    table = runner.invoke(deadletters_app, ["list", "--store", url])
    assert table.exit_code == 0 and "5 dead letters" in table.stdout


def test_show_gives_the_payload_without_identifiers(store):
    url, broken = store
    [patient] = [r for r in _json("list", "--store", url, "--json") if r["where"] == f"{broken}:4"]
    shown = _json("show", str(patient["id"]), "--store", url, "--json")
    assert shown["payload"]["resourceType"] == "Patient" and "birthDate" in shown["payload"]
    text = runner.invoke(deadletters_app, ["show", str(patient["id"]), "--store", url]).stdout
    for output in (json.dumps(shown), text):
        for identifier in (PATIENT_ID, FAMILY, GIVEN):
            assert identifier not in output

    missing = runner.invoke(deadletters_app, ["show", "999", "--store", url])
    assert missing.exit_code == 2 and "no dead letter 999" in missing.output


def test_dry_run_reports_what_the_current_decoder_accepts_and_changes_nothing(store):
    url, broken = store
    factory = session_factory(url)
    with factory() as s:
        before = s.execute(select(DeadLetterRow.id, DeadLetterRow.reason, DeadLetterRow.payload)
                           .order_by(DeadLetterRow.id)).all()
        audit_before = s.scalar(select(func.count()).select_from(AuditRow))

    report = _json("replay", "--all", "--dry-run", "--by", "qa.officer", "--store", url, "--json")
    ids = {r["where"]: r["id"] for r in _json("list", "--store", url, "--json")}
    assert report["dry_run"] is True and report["selected"] == 5
    assert [e["id"] for e in report["replayed"]] == [ids["fhir.r4[2]@41"]]
    assert report["replayed"][0]["detail"] == "would enter the pipeline as Organization → SiteInfo"
    assert sorted(e["id"] for e in report["still_rejected"]) == [ids[f"{broken}:4"], ids[f"{broken}:5"]]
    assert sorted(e["id"] for e in report["not_replayable"]) == [ids[f"{broken}:2"], ids[f"{broken}:3"]]
    assert all(e["detail"] for e in report["still_rejected"])
    assert PATIENT_ID not in json.dumps(report) and FAMILY not in json.dumps(report)

    with factory() as s:
        after = s.execute(select(DeadLetterRow.id, DeadLetterRow.reason, DeadLetterRow.payload)
                          .order_by(DeadLetterRow.id)).all()
        assert s.scalar(select(func.count()).select_from(AuditRow)) == audit_before
    assert after == before  # evidence untouched, nothing recorded: a dry run stores nothing

    by_source = _json("replay", "--source", broken, "--dry-run", "--store", url, "--json")
    assert by_source["selected"] == 4 and not by_source["replayed"]
    by_reason = _json("replay", "--reason", "MISSING subject", "--dry-run", "--store", url, "--json")
    assert [e["id"] for e in by_reason["still_rejected"]] == [ids[f"{broken}:5"]]
    factory.kw["bind"].dispose()


def test_replay_into_a_store_without_pipeline_state_is_refused(store):
    """`vigil ingest` keeps no pipeline checkpoint: there is no state to add the dead letters to."""
    url, _ = store
    result = runner.invoke(deadletters_app, ["replay", "--all", "--store", url, "--by", "x"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "no pipeline checkpoint" in text and "--dry-run" in text


def test_replay_needs_a_selection_and_names_unknown_ids(store):
    url, _ = store
    nothing = runner.invoke(deadletters_app, ["replay", "--store", url])
    assert nothing.exit_code == 2 and "--all" in nothing.output
    unknown = runner.invoke(deadletters_app, ["replay", "4242", "--store", url, "--by", "x"])
    assert unknown.exit_code == 1 and "no dead letter 4242" in unknown.output
    strict = runner.invoke(deadletters_app, ["replay", "--all", "--strict", "--store", url])
    assert strict.exit_code == 2 and "--dry-run" in strict.output
    text = runner.invoke(deadletters_app, ["replay", "--all", "--dry-run", "--store", url, "--by", "x"])
    assert text.exit_code == 0 and "1 would be re-injected, 2 still rejected" in " ".join(text.stdout.split())
