"""Ticket lifecycle (open → in_progress → acceptance_recorded → closed), acceptance → C2 / C2-F, reclassifying,
as pure rules and on a real SQLite store (and PostgreSQL) with the hash-chained audit log.

The tickets are real classifier output: alerts shaped like the simulator's scenarios go through triage and
``plan_tickets`` against the example PCCPs in ``examples/``, and are stored the way ``vigil.persist`` stores them.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from retrain_trigger import lifecycle
from retrain_trigger.lifecycle import TicketLifecycleError, acceptance_criteria
from retrain_trigger.pccp import load_pccp
from retrain_trigger.tickets import TicketDraft, plan_tickets
from retrain_trigger.triage import AcquisitionChange, TriageContext
from vigil import audit, ticket_actions
from vigil.domain import Alert, PccpCategory, Signal, StreamKey
from vigil.settings import EXAMPLES_DIR, load_settings
from vigil.store import TICKET_STATUSES, AlertRow, AuditRow, CaseRow, TicketRow, session_factory, upgrade

CTA = load_pccp(EXAMPLES_DIR / "pccp-cta.yaml")
AKI = load_pccp(EXAMPLES_DIR / "pccp-aki.yaml")
SITES = ["site-a", "site-b", "site-c"]
T0 = datetime(2025, 3, 3, tzinfo=UTC)
PHILIPS = AcquisitionChange("site-b", T0 - timedelta(days=6), "Philips", "IQon Spectral CT")
M2_FAIL_80 = "sensitivity [age_band=80+] vs original"


# --- building a store the way the pipeline fills it ------------------------------------------------------------


def make_alert(aid: str, metric: str, site: str = "all", *, model: str = "cta-stenosis", baseline: float = 0.15,
               current: float = 0.24, change: datetime = T0) -> Alert:
    return Alert(
        id=aid,
        signal=Signal(
            stream=StreamKey(model, "2.1.0" if model == "cta-stenosis" else "1.4.0", metric, site, "all"),
            detector="bernoulli_cusum" if metric != "score_mean" else "ewma",
            detected_at=change + timedelta(days=21),
            change_estimate=change,
            statistic=5.3,
            threshold=4.4,
            baseline=baseline,
            current=current,
            current_ci=(current - 0.03, current + 0.03),
            n_baseline=600,
            n_current=180,
        ),
    )


def scanner_upgrade_draft() -> tuple[TicketDraft, list[Alert]]:
    """Site B's new scanner lowers sensitivity there: one ticket, C2 via M2 (pccp.md §8.7 example 2)."""
    alerts = [
        make_alert("b-fnr", "fnr", "site-b", baseline=0.14, current=0.27),
        make_alert("b-err", "error_rate", "site-b", baseline=0.17, current=0.23, change=T0 + timedelta(days=2)),
        make_alert("all-fnr", "fnr", baseline=0.14, current=0.18, change=T0 + timedelta(days=4)),
    ]
    [draft] = plan_tickets(alerts, TriageContext(SITES, [PHILIPS], 18), CTA, "2.1.0")
    assert (draft.category, draft.matched_mod) == (PccpCategory.C2, "M2")
    return draft, alerts


def aki_population_shift_draft() -> tuple[TicketDraft, list[Alert]]:
    """Score means rise at every site of the AKI model: recalibration, C2 via the De Novo device's M1."""
    alerts = [make_alert(f"{s}-score", "score_mean", s, model="aki-risk", baseline=0.21, current=0.29) for s in SITES]
    [draft] = plan_tickets(alerts, TriageContext(SITES, [], 18), AKI, "1.4.0")
    assert (draft.category, draft.matched_mod) == (PccpCategory.C2, "M1")
    return draft, alerts


def store_ticket(session, draft: TicketDraft, alerts: list[Alert], ticket_id: str) -> TicketRow:
    """Insert the alerts and the ticket as ``vigil.persist`` does (ticket.opened in the audit log)."""
    ticket = TicketRow(
        id=ticket_id, model=draft.model, model_version=draft.model_version, category=draft.category.value,
        safety_overlay=draft.safety_overlay, matched_mod=draft.matched_mod, cause=draft.cause,
        cause_confidence=draft.cause_confidence, remedy=draft.remedy, rationale=[list(r) for r in draft.rationale],
        required_actions=list(draft.required_actions), evidence=draft.evidence,
        created_at=T0 + timedelta(days=25), updated_at=T0 + timedelta(days=25),
    )
    session.add(ticket)
    session.flush()
    for i, a in enumerate(alerts):
        row = AlertRow.from_alert(a)
        row.id = f"A-{int(ticket_id[2:]) * 100 + i + 1:06d}"
        row.last_fired_at = a.signal.detected_at
        row.ticket_id = ticket.id
        session.add(row)
    session.flush()
    audit.record(session, "vigil-pipeline", "ticket.opened", "ticket", ticket.id, {"category": ticket.category})
    return ticket


def case_rows(n_per_site: int = 6) -> list[CaseRow]:
    """Labeled cases of cta-stenosis 2.1.0: half inside the ticket's window (2025-03-03 .. 03-28), three sites."""
    rows = []
    for site in SITES:
        for i in range(n_per_site):
            t = T0 + timedelta(days=-10 + 6 * i, hours=i)
            rows.append(CaseRow(
                model="cta-stenosis", model_version="2.1.0", prediction_id=f"ra-{site}-{i:03d}",
                prediction_version="1", subject=f"subj-secret-{site}-{i}", encounter=f"enc-{site}-{i}", site=site,
                attributes={"sex": "female" if i % 2 else "male", "age_band": "65-79"}, predicted_at=t,
                score=0.1 + 0.13 * i, decision=0.1 + 0.13 * i >= 0.5, label="positive" if i % 3 == 0 else "negative",
                labeled_at=t + timedelta(days=30), outcome_definition="cta-stenosis-ica@1", evidence=[f"Proc/{i}"],
            ))
    return rows


def build_store(url: str, cases: list[CaseRow] | None = None) -> None:
    """Schema by the Alembic migration, then cases, the scanner-upgrade ticket T-000001 and the AKI ticket T-000002."""
    upgrade(url)
    with session_factory(url)() as s, s.begin():
        s.add_all(case_rows() if cases is None else cases)
        store_ticket(s, *scanner_upgrade_draft(), "T-000001")
        store_ticket(s, *aki_population_shift_draft(), "T-000002")


@pytest.fixture
def store(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    build_store(url)
    return url


def m2_results(fail: str | None = None) -> dict:
    """A value for every M2 criterion; ``fail`` marks one criterion failed."""
    out: dict = {k: 0.01 for k in acceptance_criteria(CTA.modification("M2"))}
    out["full-device V&V"] = True
    if fail:
        out[fail] = {"value": -0.08, "passed": False}
    return out


# --- pure rules --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Ticket:
    id: str = "T-000009"
    status: str = "open"
    category: str = "C2"
    matched_mod: str | None = "M2"
    remedy: str = "new_input_source_same_type"
    acceptance: dict | None = None


AT = datetime(2025, 4, 1, tzinfo=UTC)


def test_transitions_follow_the_state_machine_and_errors_name_ticket_state_and_options():
    assert lifecycle.start(Ticket()) == "in_progress"
    assert lifecycle.close(Ticket(status="in_progress"), "pipeline fixed at site-b") == "closed"
    with pytest.raises(TicketLifecycleError) as exc:
        lifecycle.record_acceptance(Ticket(), CTA, passed=True, results=m2_results(), evidence_ref="TR-1", by="e",
                                    at=AT)
    assert str(exc.value) == ("ticket T-000009 is open; it cannot become acceptance_recorded. "
                              "Allowed next: in_progress or closed")
    with pytest.raises(TicketLifecycleError, match=r"T-000009 is closed; it cannot become in_progress\. "
                                                   r"Allowed next: nothing \(closed is final\)"):
        lifecycle.start(Ticket(status="closed"))
    with pytest.raises(TicketLifecycleError, match="T-000009 is in_progress; it cannot become in_progress"):
        lifecycle.start(Ticket(status="in_progress"))
    with pytest.raises(TicketLifecycleError, match="needs a comment"):
        lifecycle.close(Ticket(), "  ")
    passed = Ticket(status="acceptance_recorded", acceptance={"passed": True})
    with pytest.raises(TicketLifecycleError, match="passed acceptance; it can only be closed"):
        lifecycle.start(passed)
    assert lifecycle.start(Ticket(status="acceptance_recorded", acceptance={"passed": False})) == "in_progress"


def test_state_machine_covers_exactly_the_store_vocabulary():
    assert tuple(lifecycle.NEXT_STATES) == TICKET_STATUSES
    assert {t for targets in lifecycle.NEXT_STATES.values() for t in targets} <= set(TICKET_STATUSES)


def test_m2_acceptance_criteria_cover_every_row_subgroup_and_comparator():
    assert acceptance_criteria(CTA.modification("M2")) == [
        "sensitivity equivalence vs original",
        "sensitivity equivalence vs last_modified",
        "specificity equivalence vs original",
        "specificity equivalence vs last_modified",
        "sensitivity [age_band=80+] vs original",
        "sensitivity [age_band=80+] vs last_modified",
        "sensitivity [sex=female] vs original",
        "sensitivity [sex=female] vs last_modified",
        "full-device V&V",
    ]
    m3 = acceptance_criteria(CTA.modification("M3"))
    assert "sensitivity floor vs original" in m3 and "sensitivity trade-off guard vs last_modified" in m3


def test_acceptance_pass_is_c2_and_fail_is_c2f_and_pass_must_be_complete():
    t = Ticket(status="in_progress")
    ok = lifecycle.record_acceptance(t, CTA, passed=True, results=m2_results(), evidence_ref="TR-7", by="eng", at=AT)
    assert (ok.status, ok.category) == ("acceptance_recorded", PccpCategory.C2)
    assert ok.record["passed"] is True and ok.record["failed_criteria"] == []
    assert ok.rationale[0] == "R6" and "§VII.B(3)" in ok.rationale[2]
    bad = lifecycle.record_acceptance(t, CTA, passed=False, results=m2_results(M2_FAIL_80), evidence_ref="TR-8",
                                      by="eng", at=AT)
    assert bad.category == PccpCategory.C2F and bad.record["failed_criteria"] == [M2_FAIL_80]
    assert M2_FAIL_80 in bad.rationale[1] and "C2-F" in bad.rationale[1]
    assert "record the failure; do not implement the modification" in bad.required_actions
    assert not lifecycle.deployable(dataclasses.replace(t, status="acceptance_recorded", category="C2-F",
                                                        acceptance=bad.record))
    assert lifecycle.deployable(dataclasses.replace(t, status="acceptance_recorded", acceptance=ok.record))

    partial = m2_results()
    del partial["sensitivity [sex=female] vs last_modified"]
    with pytest.raises(TicketLifecycleError, match=r"missing: sensitivity \[sex=female\] vs last_modified"):
        lifecycle.record_acceptance(t, CTA, passed=True, results=partial, evidence_ref="TR", by="e", at=AT)
    with pytest.raises(TicketLifecycleError, match="recorded as passed, but these criteria are marked failed"):
        lifecycle.record_acceptance(t, CTA, passed=True, results=m2_results(M2_FAIL_80), evidence_ref="TR",
                                    by="e", at=AT)
    with pytest.raises(TicketLifecycleError, match="a failed result must mark the failed criteria"):
        lifecycle.record_acceptance(t, CTA, passed=False, results=m2_results(), evidence_ref="TR", by="e", at=AT)
    with pytest.raises(TicketLifecycleError, match=r"M2 has no acceptance criteria \['auroc'\]; its criteria are: "
                                                   r"sensitivity equivalence vs original"):
        lifecycle.record_acceptance(t, CTA, passed=False, results={"auroc": 0.8}, evidence_ref="TR", by="e", at=AT)
    with pytest.raises(TicketLifecycleError, match="T-000009 is C5 with no matched PCCP modification"):
        lifecycle.record_acceptance(dataclasses.replace(t, category="C5", matched_mod=None), CTA, passed=True,
                                    results={}, evidence_ref="TR", by="e", at=AT)


# --- on the store ------------------------------------------------------------------------------------------------


def _audit(session, ticket_id: str) -> list[AuditRow]:
    return list(session.scalars(select(AuditRow).where(AuditRow.entity_id == ticket_id).order_by(AuditRow.seq)))


def _run_acceptance_flow(url: str) -> None:
    settings = load_settings(store_url=url)
    Session = session_factory(url)
    with Session() as s, s.begin():
        ticket_actions.start(s, "T-000001", "eng.alice")
    with Session() as s, s.begin():
        row = ticket_actions.record_acceptance(s, settings, "T-000001", "eng.alice", passed=False,
                                               results=m2_results(M2_FAIL_80), evidence_ref="VV-2025-031")
        assert (row.status, row.category) == ("acceptance_recorded", "C2-F")
    with Session() as s:  # read back from the database, not the session's objects
        row = s.get(TicketRow, "T-000001")
        assert (row.status, row.category, row.acceptance["passed"]) == ("acceptance_recorded", "C2-F", False)
        assert not lifecycle.deployable(row)
        assert row.rationale[-1][0] == "R6" and M2_FAIL_80 in row.rationale[-1][1]
        [entry] = [a for a in _audit(s, "T-000001") if a.action == "ticket.acceptance_recorded"]
        assert entry.actor == "eng.alice"
        assert entry.payload["from"] == {"status": "in_progress", "category": "C2"}
        assert entry.payload["to"] == {"status": "acceptance_recorded", "category": "C2-F"}
        assert entry.payload["acceptance"]["failed_criteria"] == [M2_FAIL_80]
        assert entry.payload["deployable"] is False
    with Session() as s, s.begin():  # root cause unrelated to the PCCP (test harness): re-test
        ticket_actions.start(s, "T-000001", "eng.alice")
        ticket_actions.record_acceptance(s, settings, "T-000001", "eng.bob", passed=True, results=m2_results(),
                                         evidence_ref="VV-2025-032")
        ticket_actions.close(s, "T-000001", "ra.carol", "M2 implemented; labeling compatibility list updated")
    with Session() as s:
        row = s.get(TicketRow, "T-000001")
        assert (row.status, row.category) == ("closed", "C2") and lifecycle.deployable(row)
        assert [p["evidence_ref"] for p in row.acceptance["previous"]] == ["VV-2025-031"]
        assert row.evidence["closure"]["comment"].startswith("M2 implemented")
        assert [a.action for a in _audit(s, "T-000001")] == [
            "ticket.opened", "ticket.started", "ticket.acceptance_recorded", "ticket.started",
            "ticket.acceptance_recorded", "ticket.closed"]
        assert audit.verify(s).ok


def test_failed_subgroup_acceptance_turns_c2_into_c2f_then_retest_passes_on_sqlite(store):
    _run_acceptance_flow(store)


@pytest.mark.postgres
def test_acceptance_flow_on_postgres(fresh_postgres_url):
    build_store(fresh_postgres_url)
    _run_acceptance_flow(fresh_postgres_url)


def test_a_failed_action_leaves_no_change_and_no_audit_record(store):
    settings = load_settings(store_url=store)
    with pytest.raises(TicketLifecycleError, match="T-000001 is open; it cannot become acceptance_recorded"):
        with session_factory(store)() as s, s.begin():
            ticket_actions.record_acceptance(s, settings, "T-000001", "eng", passed=True, results=m2_results(),
                                             evidence_ref="TR")
    with pytest.raises(ticket_actions.TicketNotFound, match="no ticket T-000404"):
        with session_factory(store)() as s, s.begin():
            ticket_actions.start(s, "T-000404", "eng")
    with session_factory(store)() as s:
        assert s.get(TicketRow, "T-000001").status == "open"
        assert [a.action for a in _audit(s, "T-000001")] == ["ticket.opened"]


@pytest.mark.parametrize(
    ("remedy", "category", "mod", "finding"),
    [
        # M3 covers re-training but needs data from 3 sites; the scanner ticket's data is site-b only → C4 (R5)
        ("retrain_same_arch_new_data", "C4", "M3",
         "M3 protocol cannot be followed: 1 site(s) of data, protocol needs 3"),
        # no modification allows an architecture change → R7 Q4 → C5, R9 pathway for a 510(k) device
        ("retrain_arch_change", "C5", None, "new Traditional 510(k)"),
        # rolling back restores the cleared specification → C3 (document) + U (806), §8.6
        ("rollback", "C3", None, "cumulative change since 2.0.0"),
        # §8.7 example 5: a new output or claim → C5 via the R3 IFU gate
        ("new_output_or_claim", "C5", None, "a new intended use that is not substantially equivalent"),
    ],
)
def test_reclassify_scanner_ticket_gives_the_category_and_rationale_of_the_new_remedy(store, remedy, category, mod,
                                                                                       finding):
    settings = load_settings(store_url=store)
    with session_factory(store)() as s, s.begin():
        ticket_actions.start(s, "T-000001", "eng.alice")
        ticket_actions.reclassify(s, settings, "T-000001", "eng.alice", remedy)
    with session_factory(store)() as s:
        row = s.get(TicketRow, "T-000001")
        assert (row.remedy, row.category, row.matched_mod, row.status) == (remedy, category, mod, "open")
        assert row.rationale[0][:2] == ["reclassify",
                                        f"remedy changed from new_input_source_same_type to {remedy} by an engineer"]
        assert finding in row.rationale[-1][1]
        assert row.evidence["bundle"]["proposed_remedy"]["type"] == remedy
        [entry] = [a for a in _audit(s, "T-000001") if a.action == "ticket.reclassified"]
        assert entry.payload["from"]["category"] == "C2" and entry.payload["from"]["matched_mod"] == "M2"
        assert entry.payload["to"]["category"] == category and entry.payload["to"]["remedy"] == remedy
        assert entry.payload["status"] == {"from": "in_progress", "to": "open"}
        assert audit.verify(s).ok


def test_reclassify_the_de_novo_aki_ticket(store):
    """A De Novo-granted device is treated as a 510(k) for later changes (R9); a recalibration stays in M1."""
    settings = load_settings(store_url=store)
    with session_factory(store)() as s, s.begin():
        arch = ticket_actions.reclassify(s, settings, "T-000002", "eng.dan", "retrain_arch_change")
        assert (arch.category, arch.matched_mod) == ("C5", None)
        assert "De Novo-granted device, treated as 510(k)" in arch.rationale[-1][1]
        back = ticket_actions.reclassify(s, settings, "T-000002", "eng.dan", "recalibration")
        assert (back.category, back.matched_mod) == ("C2", "M1")
        assert back.rationale[0][1] == "remedy changed from retrain_arch_change to recalibration by an engineer"


def test_reclassify_refuses_unknown_remedies_closed_tickets_and_passed_acceptance(store):
    settings = load_settings(store_url=store)
    with pytest.raises(TicketLifecycleError, match="T-000001: unknown remedy 'retrain_harder'; choose one of: none"):
        with session_factory(store)() as s, s.begin():
            ticket_actions.reclassify(s, settings, "T-000001", "eng", "retrain_harder")
    with session_factory(store)() as s, s.begin():
        ticket_actions.start(s, "T-000001", "eng")
        ticket_actions.record_acceptance(s, settings, "T-000001", "eng", passed=True, results=m2_results(),
                                         evidence_ref="TR-1")
    with pytest.raises(TicketLifecycleError, match="passed acceptance for new_input_source_same_type; close it"):
        with session_factory(store)() as s, s.begin():
            ticket_actions.reclassify(s, settings, "T-000001", "eng", "rollback")
    with session_factory(store)() as s, s.begin():
        ticket_actions.close(s, "T-000002", "ra", "monitoring only")
    with pytest.raises(TicketLifecycleError, match="T-000002 is closed; only open, in_progress, acceptance_recorded"):
        with session_factory(store)() as s, s.begin():
            ticket_actions.reclassify(s, settings, "T-000002", "eng", "recalibration")


def test_acceptance_against_a_changed_pccp_requires_reclassifying_first(store, tmp_path):
    pccp_file = tmp_path / "pccp-cta-1.1.yaml"
    pccp_file.write_text((EXAMPLES_DIR / "pccp-cta.yaml").read_text().replace('version: "1.0"', 'version: "1.1"'))
    config = tmp_path / "vigil.yaml"
    config.write_text((EXAMPLES_DIR / "vigil.yaml").read_text()
                      .replace("pccp: pccp-cta.yaml", f"pccp: {pccp_file}")
                      .replace("conceptmaps/", f"{EXAMPLES_DIR}/conceptmaps/"))
    settings = load_settings(Path(config), store_url=store)
    with session_factory(store)() as s, s.begin():
        ticket_actions.start(s, "T-000001", "eng")
    with pytest.raises(TicketLifecycleError, match="classified against PCCP PCCP-CTA-001 version 1.0, but the "
                                                   "configuration now names PCCP-CTA-001 version 1.1: reclassify"):
        with session_factory(store)() as s, s.begin():
            ticket_actions.record_acceptance(s, settings, "T-000001", "eng", passed=True, results=m2_results(),
                                             evidence_ref="TR")
    with session_factory(store)() as s, s.begin():
        row = ticket_actions.reclassify(s, settings, "T-000001", "eng", "new_input_source_same_type")
        assert row.evidence["identity"]["pccp_version"] == "1.1"
        ticket_actions.start(s, "T-000001", "eng")
        row = ticket_actions.record_acceptance(s, settings, "T-000001", "eng", passed=True, results=m2_results(),
                                               evidence_ref="TR")
        assert row.acceptance["pccp_version"] == "1.1" and row.category == "C2"


@pytest.mark.postgres
def test_two_people_starting_one_ticket_at_once_queue_on_the_row_lock(fresh_postgres_url):
    """The second start waits for the first to commit, then sees in_progress and is refused (no double transition)."""
    import threading

    build_store(fresh_postgres_url)
    Session = session_factory(fresh_postgres_url)
    outcome: dict[str, object] = {}
    first = Session()
    first.begin()
    ticket_actions.start(first, "T-000001", "eng.alice")  # holds the row lock, not yet committed

    def second() -> None:
        with Session() as s, s.begin():
            try:
                ticket_actions.start(s, "T-000001", "eng.bob")
                outcome["result"] = "started"
            except TicketLifecycleError as exc:
                outcome["result"] = str(exc)

    worker = threading.Thread(target=second)
    worker.start()
    worker.join(timeout=0.5)
    assert worker.is_alive(), "the second start should wait for the first transaction's row lock"
    first.commit()
    first.close()
    worker.join(timeout=10)
    assert outcome["result"] == ("ticket T-000001 is in_progress; it cannot become in_progress. "
                                 "Allowed next: acceptance_recorded or closed")
    with Session() as s:
        assert [(a.action, a.actor) for a in _audit(s, "T-000001")] == [
            ("ticket.opened", "vigil-pipeline"), ("ticket.started", "eng.alice")]
