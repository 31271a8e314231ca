"""`vigil tickets ...` on a real SQLite store (typer's CliRunner), and the dataset manifest's content hash."""

from __future__ import annotations

import json
import random
import re
import sqlite3
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.task import Task
from test_ticket_lifecycle import M2_FAIL_80, build_store, case_rows, m2_results
from test_ticket_lifecycle import store as store  # noqa: F401 (fixture)
from typer.testing import CliRunner

from retrain_trigger.manifest import build_manifest, verify_manifest
from vigil.cli_tickets import tickets_app
from vigil.store import CaseRow, TicketRow, session_factory

runner = CliRunner()


def _ok(*args):
    result = runner.invoke(tickets_app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _json(*args):
    return json.loads(_ok(*args, "--json").stdout)


def _fails(code: int, *args) -> str:
    result = runner.invoke(tickets_app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())  # rich boxes and wraps long errors


# --- reading commands keep their behaviour ------------------------------------------------------------------------


def test_list_show_and_their_json(store):
    listed = _json("list", "--store", store)
    assert [(t["id"], t["category"], t["matched_mod"], t["status"]) for t in listed] == [
        ("T-000001", "C2", "M2", "open"), ("T-000002", "C2", "M1", "open")]
    assert listed[0]["alert_ids"] == ["A-000101", "A-000102", "A-000103"]
    assert "evidence" not in listed[0] and listed[0]["deployable"] is False
    assert "2 tickets" in _ok("list", "--store", store).stdout
    assert [t["id"] for t in _json("list", "--store", store, "--category", "C2", "--status", "open")] == [
        "T-000001", "T-000002"]
    shown = _json("show", "T-000002", "--store", store)
    assert shown["rationale"][0][0] == "R0" and shown["evidence"]["identity"]["pccp_id"] == "PCCP-AKI-001"
    text = _ok("show", "T-000001", "--store", store).stdout
    assert "Rule trace" in text and "M2" in text and "deployable: no" in text


def test_missing_store_and_missing_ticket_are_clear_errors(store, tmp_path):
    nowhere = f"sqlite:///{tmp_path / 'nope.db'}"
    for args in (["list"], ["show", "T-000001"], ["start", "T-000001", "--by", "e"]):
        assert "no vigil store" in _fails(2, *args, "--store", nowhere)
    assert not (tmp_path / "nope.db").exists()
    assert "no ticket T-000404" in _fails(2, "show", "T-000404", "--store", store)
    assert "no ticket T-000404" in _fails(2, "start", "T-000404", "--by", "e", "--store", store)


# --- lifecycle commands --------------------------------------------------------------------------------------------


def test_start_accept_failed_close_via_cli(store, tmp_path):
    assert _json("criteria", "T-000001", "--store", store)[-1] == "full-device V&V"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(m2_results(M2_FAIL_80)))
    accept = ["accept", "T-000001", "--by", "eng.alice", "--failed", "--results", bad, "--evidence", "VV-1",
              "--store", store]
    assert "T-000001 is open; it cannot become acceptance_recorded. Allowed next: in_progress or closed" in _fails(
        2, *accept)
    assert _json("start", "T-000001", "--by", "eng.alice", "--store", store)["status"] == "in_progress"
    after = _json(*accept)
    assert (after["status"], after["category"], after["deployable"]) == ("acceptance_recorded", "C2-F", False)
    assert after["acceptance"]["failed_criteria"] == [M2_FAIL_80]
    assert f"failed: {M2_FAIL_80}" in " ".join(_ok("show", "T-000001", "--store", store).stdout.split())
    closed = _json("close", "T-000001", "--by", "ra.carol", "--comment", "not implemented; RCA-12", "--store", store)
    assert (closed["status"], closed["category"], closed["deployable"]) == ("closed", "C2-F", False)
    assert "closed is final" in _fails(2, "start", "T-000001", "--by", "e", "--store", store)
    with sqlite3.connect(store.removeprefix("sqlite:///")) as db:
        actions = [r[0] for r in db.execute("select action from audit_log where entity_id = 'T-000001' order by seq")]
    assert actions == ["ticket.opened", "ticket.started", "ticket.acceptance_recorded", "ticket.closed"]


def test_accept_passed_needs_every_criterion_and_a_readable_results_file(store, tmp_path):
    _ok("start", "T-000001", "--by", "e", "--store", store)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"full-device V&V": True}))
    base = ["accept", "T-000001", "--by", "e", "--passed", "--evidence", "VV-2", "--store", store, "--results"]
    assert "missing: sensitivity equivalence vs original" in _fails(2, *base, partial)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert f"results file {broken} is not valid JSON" in _fails(2, *base, broken)
    full = tmp_path / "full.json"
    full.write_text(json.dumps(m2_results()))
    after = _json(*base, full)
    assert (after["category"], after["deployable"]) == ("C2", True)


def test_reclassify_via_cli(store):
    d = _json("reclassify", "T-000001", "--remedy", "retrain_same_arch_new_data", "--by", "eng.alice",
              "--store", store)
    assert (d["category"], d["matched_mod"], d["remedy"]) == ("C4", "M3", "retrain_same_arch_new_data")
    assert "1 site(s) of data, protocol needs 3" in d["rationale"][-1][1]
    text = _ok("reclassify", "T-000001", "--remedy", "rollback", "--by", "eng.alice", "--store", store).stdout
    assert "remedy rollback → category C3 + U" in " ".join(text.split())
    assert "unknown remedy 'retrain_harder'" in _fails(2, "reclassify", "T-000001", "--remedy", "retrain_harder",
                                                       "--by", "e", "--store", store)


# --- export -----------------------------------------------------------------------------------------------------------


def test_export_json_and_fhir_task(store, tmp_path):
    _ok("export", "--out", tmp_path / "all.json", "--store", store)
    data = json.loads((tmp_path / "all.json").read_text())
    assert [t["id"] for t in data] == ["T-000001", "T-000002"] and "evidence" in data[0]
    _ok("export", "T-000002", "--format", "fhir-task", "--out", tmp_path / "task.json", "--store", store)
    task = Task.model_validate_json((tmp_path / "task.json").read_text())
    assert task.id == "T-000002" and task.code.coding[0].code == "C2"
    assert task.for_fhir.identifier.value == "00850012345101"  # the AKI device's UDI-DI
    out = _ok("export", "--format", "fhir-task", "--out", tmp_path / "bundle.json", "--store", store).stdout
    assert "Wrote 2 FHIR Tasks" in out
    bundle = Bundle.model_validate_json((tmp_path / "bundle.json").read_text())
    assert bundle.type == "collection" and [e.resource.id for e in bundle.entry] == ["T-000001", "T-000002"]
    assert "'csv' is not one of 'json', 'fhir-task'" in _fails(2, "export", "--format", "csv", "--out",
                                                             tmp_path / "x", "--store", store)


# --- dataset manifest ------------------------------------------------------------------------------------------------


def test_manifest_lists_the_window_cases_without_subjects_and_verifies(store, tmp_path):
    out = tmp_path / "manifest.json"
    summary = _json("manifest", "T-000001", "--out", out, "--by", "eng.alice", "--store", store)
    manifest = json.loads(out.read_text())
    # site-b cases predicted 2025-03-05, -11, -17, -23 fall in the window 2025-03-03 .. 2025-03-28
    assert [c["prediction_id"] for c in manifest["cases"]] == [f"ra-site-b-{i:03d}" for i in (2, 3, 4, 5)]
    assert manifest["sites"] == ["site-b"] and manifest["case_count"] == 4 == summary["case_count"]
    assert manifest["outcome_definitions"] == ["cta-stenosis-ica@1"]
    assert manifest["label_counts"] == {"negative": 3, "positive": 1}
    assert manifest["data_window"] == {"start": "2025-03-03T00:00:00+00:00", "end": "2025-03-28T00:00:00+00:00"}
    text = out.read_text()
    assert "subj-secret" not in text and "enc-site" not in text  # neither subject nor encounter pseudonyms
    shown = _json("show", "T-000001", "--store", store)
    assert shown["evidence"]["data_lineage"]["manifests"][0]["sha256"] == summary["sha256"]
    assert "manifest verified" in _ok("verify-manifest", out, "--store", store).stdout

    with sqlite3.connect(store.removeprefix("sqlite:///")) as db:  # a label corrected after the manifest was written
        db.execute("update cases set label = 'positive' where prediction_id = 'ra-site-b-004'")
    check = json.loads(runner.invoke(tickets_app, ["verify-manifest", str(out), "--store", store, "--json"]).stdout)
    assert check["ok"] is False and check["changed"] == ["ra-site-b-004"] and check["missing"] == []
    assert "changed cases (prediction ids): ra-site-b-004" in _fails(1, "verify-manifest", out, "--store", store)
    wider = _json("manifest", "T-000001", "--out", tmp_path / "wide.json", "--start", "2025-02-01", "--end",
                  "2025-03-31T00:00:00+00:00", "--site", "site-a", "--site", "site-b", "--store", store)
    assert wider["case_count"] == 12 and wider["sites"] == ["site-a", "site-b"]  # 6 cases, 02-21..03-23, per site
    assert wider["data_window"]["start"] == "2025-02-01T00:00:00+00:00"


def test_manifest_hash_is_stable_across_rebuilds_and_stores_and_detects_changes(tmp_path):
    first, second = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    build_store(first)
    shuffled = case_rows()
    random.Random(5).shuffle(shuffled)  # other row ids, same content
    build_store(second, shuffled)
    made = datetime(2025, 4, 1, tzinfo=UTC)
    manifests = []
    for url in (first, first, second):
        with session_factory(url)() as s:
            manifests.append(build_manifest(s, s.get(TicketRow, "T-000001"), created_at=made))
    digest = manifests[0]["content_hash"]["sha256"]
    assert manifests[1] == manifests[0]
    assert manifests[2]["content_hash"]["sha256"] == digest
    assert [c["id"] for c in manifests[2]["cases"]] != [c["id"] for c in manifests[0]["cases"]]

    with session_factory(first)() as s, s.begin():
        assert verify_manifest(s, manifests[0]).ok
        s.add(CaseRow(**{**{c: getattr(case_rows()[9], c) for c in ("model", "model_version", "site", "attributes",
                                                                       "score", "decision", "outcome_definition")},
                         "prediction_id": "ra-late", "prediction_version": "1", "subject": "s", "label": "negative",
                         "predicted_at": datetime(2025, 3, 20, tzinfo=UTC),
                         "labeled_at": datetime(2025, 4, 20, tzinfo=UTC)}))
        s.add(CaseRow(**{**{c: getattr(case_rows()[9], c) for c in ("model", "model_version", "site", "attributes",
                                                                       "score", "decision")},
                         "prediction_id": "ra-pending", "prediction_version": "1", "subject": "s", "label": None,
                         "predicted_at": datetime(2025, 3, 21, tzinfo=UTC)}))
    with session_factory(first)() as s:
        check = verify_manifest(s, manifests[0])
        assert check.ok and check.new_in_window == ["ra-late"]  # a late label is reported, not a mismatch
        grown = build_manifest(s, s.get(TicketRow, "T-000001"), created_at=made)
        assert grown["case_count"] == 5 and grown["content_hash"]["sha256"] != digest  # ra-pending has no label yet
    with session_factory(first)() as s, s.begin():
        s.delete(s.scalar(select(CaseRow).where(CaseRow.prediction_id == "ra-site-b-002")))
        s.scalar(select(CaseRow).where(CaseRow.prediction_id == "ra-site-b-003")).score = 0.5
    with session_factory(first)() as s:
        check = verify_manifest(s, manifests[0])
    assert not check.ok and check.missing == ["ra-site-b-002"] and check.changed == ["ra-site-b-003"]
    assert check.actual != digest and f"≠ manifest {digest}" in check.describe()


@pytest.mark.postgres
def test_manifest_hash_is_the_same_on_postgres_and_sqlite(tmp_path, fresh_postgres_url):
    """Floats, JSON and UTC times serialise identically whichever database holds the cases."""
    lite = f"sqlite:///{tmp_path / 'a.db'}"
    build_store(lite)
    build_store(fresh_postgres_url)
    made = datetime(2025, 4, 1, tzinfo=UTC)
    digests = []
    for url in (lite, fresh_postgres_url):
        with session_factory(url)() as s:
            digests.append(build_manifest(s, s.get(TicketRow, "T-000001"), created_at=made)["content_hash"]["sha256"])
    assert digests[0] == digests[1]


def test_a_malformed_pccp_in_the_config_is_refused_with_the_field(store, tmp_path):
    from vigil.settings import EXAMPLES_DIR

    pccp = tmp_path / "pccp-cta.yaml"
    pccp.write_text((EXAMPLES_DIR / "pccp-cta.yaml").read_text().replace("  pccp_id: PCCP-CTA-001\n", ""))
    config = tmp_path / "vigil.yaml"
    config.write_text((EXAMPLES_DIR / "vigil.yaml").read_text().replace("pccp: pccp-cta.yaml", f"pccp: {pccp}")
                      .replace("conceptmaps/", f"{EXAMPLES_DIR}/conceptmaps/"))
    out = _fails(2, "reclassify", "T-000001", "--remedy", "rollback", "--by", "e", "--config", config,
                 "--store", store)
    assert f"PCCP file {pccp} does not validate" in out and "pccp.pccp_id: Field required" in out
    assert _json("show", "T-000001", "--store", store)["category"] == "C2"  # unchanged
