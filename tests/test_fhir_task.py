"""A stored retraining ticket exported as a FHIR R4 Task validates with fhir.resources and carries the ticket."""

from __future__ import annotations

import pytest
from fhir.resources.R4B.task import Task
from test_ticket_lifecycle import M2_FAIL_80, m2_results
from test_ticket_lifecycle import store as store  # noqa: F401 (fixture)

from retrain_trigger.fhir_task import TaskValidationError, task_status, ticket_to_task, validate_task
from retrain_trigger.manifest import build_manifest
from vigil import ticket_actions
from vigil.settings import load_settings
from vigil.store import TicketRow, session_factory


def _inputs(task: dict, kind: str) -> list:
    return [i for i in task["input"] if i["type"]["coding"][0]["code"] == kind]


def test_open_ticket_exports_as_a_valid_task_proposal(store):
    with session_factory(store)() as s:
        row = s.get(TicketRow, "T-000001")
        task = ticket_to_task(row)
    parsed = Task.model_validate(task)
    assert parsed.id == "T-000001" and parsed.status == "requested" and parsed.intent == "proposal"
    assert task["priority"] == "urgent"  # the scanner ticket carries the U overlay (labeled claim breached)
    assert task["code"]["coding"][0] == {"system": "urn:vigil:pccp-category", "code": "C2",
                                         "display": "WITHIN_PCCP_IMPLEMENT_PER_PROTOCOL"}
    assert "remedy new_input_source_same_type under PCCP modification M2" in task["description"]
    assert task["focus"]["identifier"] == {"system": "urn:vigil:model-version", "value": "cta-stenosis@2.1.0"}
    assert task["for"]["identifier"] == {"system": "http://hl7.org/fhir/NamingSystem/gs1-di",
                                         "value": "00850012345001"}
    assert task["reasonCode"]["coding"][0]["code"] == "acquisition_device"
    notes = [n["text"] for n in task["note"]]
    assert any(n.startswith("R4: remedy new_input_source_same_type matches M2") and "[S3 §V.D" in n for n in notes)
    assert any(n.startswith("R0: ") and "21 CFR 803.50" in n for n in notes)
    assert [i["valueIdentifier"]["value"] for i in _inputs(task, "alert")] == ["A-000101", "A-000102", "A-000103"]
    assert _inputs(task, "pccp")[0]["valueIdentifier"]["value"] == "PCCP-CTA-001|1.0"
    assert _inputs(task, "data-window")[0]["valuePeriod"] == {"start": "2025-03-03T00:00:00+00:00",
                                                              "end": "2025-03-28T00:00:00+00:00"}
    assert any("803.50" in i["valueString"] for i in _inputs(task, "reporting-clock"))
    assert len(_inputs(task, "evidence-sha256")[0]["valueString"]) == 64
    assert task["authoredOn"] == "2025-03-28T00:00:00+00:00"
    assert "output" not in task


def test_task_follows_the_ticket_through_failed_acceptance_manifest_and_closing(store):
    settings = load_settings(store_url=store)
    with session_factory(store)() as s, s.begin():
        ticket_actions.start(s, "T-000001", "eng")
        assert ticket_to_task(s.get(TicketRow, "T-000001"))["status"] == "in-progress"
        row = ticket_actions.record_acceptance(s, settings, "T-000001", "eng", passed=False,
                                               results=m2_results(M2_FAIL_80), evidence_ref="VV-9")
        manifest = build_manifest(s, row)
        ticket_actions.attach_manifest(s, "T-000001", "eng", manifest)
        failed = ticket_to_task(row)
        ticket_actions.close(s, "T-000001", "ra", "not implemented; RCA opened")
        closed = ticket_to_task(row)
    Task.model_validate(failed)
    assert (failed["status"], failed["intent"], failed["code"]["coding"][0]["code"]) == ("failed", "order", "C2-F")
    assert failed["output"][0] == {"type": {"coding": [{"system": "urn:vigil:task-output",
                                                        "code": "acceptance-passed"}],
                                            "text": "acceptance-passed"}, "valueBoolean": False}
    assert M2_FAIL_80 in failed["output"][1]["valueString"] and "VV-9" in failed["output"][1]["valueString"]
    assert _inputs(failed, "dataset-manifest-sha256")[0]["valueString"] == manifest["content_hash"]["sha256"]
    assert closed["status"] == "failed"  # closed without implementing: the task did not succeed


@pytest.mark.parametrize(("status", "category", "expected"), [
    ("open", "C1", "requested"), ("in_progress", "C2", "in-progress"), ("acceptance_recorded", "C2", "in-progress"),
    ("acceptance_recorded", "C2-F", "failed"), ("closed", "C2", "completed"), ("closed", "C1", "completed"),
])
def test_status_mapping(status, category, expected):
    assert task_status(TicketRow(status=status, category=category)) == expected


def test_invalid_tasks_are_refused_with_the_field():
    with pytest.raises(TaskValidationError, match=r"T-1: Task.status 'done' is not in the R4 value set"):
        validate_task({"resourceType": "Task", "status": "done", "intent": "order"}, "T-1")
    with pytest.raises(TaskValidationError, match="T-2: the exported Task is not valid FHIR R4: .*authoredOn"):
        validate_task({"resourceType": "Task", "status": "requested", "intent": "order", "authoredOn": "yesterday"},
                      "T-2")
