"""The authorization matrix: every endpoint × every role × no token × a revoked token × a forged token, each cell's
expected status written out below and checked over HTTP against a real SQLite store.

Refused writes must leave the alert or ticket untouched; allowed writes must change it. A test also fails when an
endpoint is added to the app without a row here. Ticket cells act on real classifier output (the scanner-upgrade
ticket of ``test_ticket_lifecycle``, C2 via the example CTA PCCP's M2), a fresh ticket per cell.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from test_ticket_lifecycle import m2_results, scanner_upgrade_draft, store_ticket

from vigil import auth, store
from vigil.api import create_app
from vigil.store import AlertRow, AuditRow, TicketRow

CALLERS = ("viewer", "safety_officer", "engineer", "admin", "none", "revoked", "forged")

# endpoint (method, path)                      viewer  officer engineer admin  none  revoked forged
MATRIX: dict[tuple[str, str], tuple[int, ...]] = {
    ("GET", "/healthz"):                        (200,   200,    200,     200,   200,  200,    200),
    ("GET", "/alerts"):                         (200,   200,    200,     200,   401,  401,    401),
    ("GET", "/alerts/{alert_id}"):              (200,   200,    200,     200,   401,  401,    401),
    ("GET", "/alerts/{alert_id}/comments"):     (200,   200,    200,     200,   401,  401,    401),
    ("POST", "/alerts/{alert_id}/ack"):         (403,   200,    403,     200,   401,  401,    401),
    ("POST", "/alerts/{alert_id}/resolve"):     (403,   200,    403,     200,   401,  401,    401),
    ("POST", "/alerts/{alert_id}/silence"):     (403,   200,    403,     200,   401,  401,    401),
    ("POST", "/alerts/{alert_id}/unsilence"):   (403,   200,    403,     200,   401,  401,    401),
    ("POST", "/alerts/{alert_id}/comments"):    (403,   201,    403,     201,   401,  401,    401),
    ("GET", "/tickets"):                        (200,   200,    200,     200,   401,  401,    401),
    ("GET", "/tickets/{ticket_id}"):            (200,   200,    200,     200,   401,  401,    401),
    ("GET", "/tickets/{ticket_id}/fhir-task"):  (200,   200,    200,     200,   401,  401,    401),
    ("GET", "/tickets/{ticket_id}/manifest"):   (200,   200,    200,     200,   401,  401,    401),
    ("POST", "/tickets/{ticket_id}/start"):     (403,   403,    200,     200,   401,  401,    401),
    ("POST", "/tickets/{ticket_id}/acceptance"): (403,  403,    200,     200,   401,  401,    401),
    ("POST", "/tickets/{ticket_id}/close"):     (403,   403,    200,     200,   401,  401,    401),
    ("POST", "/tickets/{ticket_id}/reclassify"): (403,  403,    200,     200,   401,  401,    401),
    ("GET", "/audit/verify"):                   (403,   403,    403,     200,   401,  401,    401),
}

BODIES = {
    "/alerts/{alert_id}/ack": {"comment": "seen"},
    "/alerts/{alert_id}/resolve": {"comment": "fixed"},
    "/alerts/{alert_id}/silence": {"duration": "PT6H", "reason": "maintenance"},
    "/alerts/{alert_id}/comments": {"text": "note"},
    "/tickets/{ticket_id}/acceptance": {"passed": True, "results": m2_results(), "evidence_ref": "VV-2025-040"},
    "/tickets/{ticket_id}/close": {"comment": "pipeline fixed at site-b"},
    "/tickets/{ticket_id}/reclassify": {"remedy": "retrain_arch_change"},
}
WRITE_RESULT = {  # what an allowed write leaves on the alert: (state, audit action)
    "/alerts/{alert_id}/ack": ("acknowledged", "alert.acknowledged"),
    "/alerts/{alert_id}/resolve": ("resolved", "alert.resolved"),
    "/alerts/{alert_id}/silence": ("silenced", "alert.silenced"),
    "/alerts/{alert_id}/unsilence": ("firing", "alert.unsilenced"),
    "/alerts/{alert_id}/comments": ("firing", "alert.commented"),
}
TICKET_WRITE_RESULT = {  # what an allowed write leaves on the ticket: (status, category, audit action)
    "/tickets/{ticket_id}/start": ("in_progress", "C2", "ticket.started"),
    "/tickets/{ticket_id}/acceptance": ("acceptance_recorded", "C2", "ticket.acceptance_recorded"),
    "/tickets/{ticket_id}/close": ("closed", "C2", "ticket.closed"),
    "/tickets/{ticket_id}/reclassify": ("open", "C5", "ticket.reclassified"),
}
TICKET_START_STATUS = {"/tickets/{ticket_id}/acceptance": "in_progress"}  # default: open
T0 = datetime(2026, 9, 1, 8, 0, tzinfo=UTC)
_alert_numbers = itertools.count(1)
_ticket_numbers = itertools.count(100)
SCANNER_TICKET = scanner_upgrade_draft()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[tuple[TestClient, dict[str, str], object]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('authz') / 'vigil.db'}"
    store.upgrade(url)
    sessions = store.session_factory(url)
    with sessions() as s, s.begin():
        s.add(TicketRow(id="T-000001", model="m", model_version="1", category="C1", cause="mapping",
                        cause_confidence=0.9, remedy="fix mapping"))
        tokens = {role: auth.create_token(s, f"{role}-1", role, actor="test-admin") for role in store.ROLES}
        tokens["revoked"] = auth.create_token(s, "former-officer", "safety_officer", actor="test-admin")
        auth.revoke_token(s, "former-officer", actor="test-admin")
    tokens["forged"] = "vigil_" + "A" * 43  # well-formed, never issued
    with TestClient(create_app(url)) as client:
        yield client, tokens, sessions
    sessions.kw["bind"].dispose()


def _fresh_alert(sessions, state: str) -> str:
    """A new alert per cell, in a state the action allows, so an allowed call can succeed on its own."""
    alert_id = f"A-M{next(_alert_numbers):05d}"
    extra = {"silenced_until": datetime.now(UTC) + timedelta(days=1), "silenced_by": "x",
             "silence_reason": "x"} if state == "silenced" else {}
    with sessions() as s, s.begin():
        s.add(AlertRow(id=alert_id, model="m", model_version="1", metric="sensitivity", site="site-a",
                       subgroup="all", detector="cusum", state=state, detected_at=T0, change_estimate=T0,
                       statistic=6.0, threshold=5.0, baseline=0.9, current=0.8, ci_low=0.75, ci_high=0.85,
                       n_baseline=500, n_current=100, last_fired_at=T0, **extra))
    return alert_id


def _fresh_ticket(sessions, status: str) -> str:
    """A new classified ticket per cell (C2, M2, with its alerts), in the status the action needs."""
    ticket_id = f"T-{next(_ticket_numbers):06d}"
    with sessions() as s, s.begin():
        store_ticket(s, *SCANNER_TICKET, ticket_id).status = status
    return ticket_id


def test_the_matrix_covers_every_endpoint_of_the_app(env):
    client, _, _ = env
    documented = {(method.upper(), path) for path, operations in client.get("/openapi.json").json()["paths"].items()
                  for method in operations}
    assert documented == set(MATRIX)


@pytest.mark.parametrize(("endpoint", "caller"), [(e, c) for e in MATRIX for c in CALLERS],
                         ids=[f"{m} {p} as {c}" for (m, p) in MATRIX for c in CALLERS])
def test_authorization_matrix(env, endpoint, caller):
    client, tokens, sessions = env
    method, template = endpoint
    expected = MATRIX[endpoint][CALLERS.index(caller)]
    is_write = method == "POST"
    alert_id = _fresh_alert(sessions, "silenced" if template.endswith("unsilence") else "firing")
    start_status = TICKET_START_STATUS.get(template, "open")
    ticket_id = _fresh_ticket(sessions, start_status) if template.startswith("/tickets/{ticket_id}/") else "T-000001"
    path = template.format(alert_id=alert_id, ticket_id=ticket_id)
    headers = {} if caller == "none" else {"Authorization": f"Bearer {tokens[caller]}"}
    with sessions() as s:
        seq_before = s.scalar(select(AuditRow.seq).order_by(AuditRow.seq.desc()))

    r = client.request(method, path, json=BODIES.get(template), headers=headers)

    assert r.status_code == expected, (method, path, caller, r.text)
    if expected == 401:
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    if expected == 403:
        assert "needs one of the roles" in r.json()["detail"]
    with sessions() as s:
        alert = s.get(AlertRow, alert_id)
        ticket = s.get(TicketRow, ticket_id)
        new_actions = s.scalars(select(AuditRow.action).where(AuditRow.seq > seq_before)).all()
    if not is_write:
        assert new_actions == (["api.read"] if expected == 200 and template != "/healthz" else [])
        return
    if template in TICKET_WRITE_RESULT:
        if expected == 200:
            assert (ticket.status, ticket.category, new_actions) == (
                TICKET_WRITE_RESULT[template][:2] + ([TICKET_WRITE_RESULT[template][2]],))
            assert r.json()["by"] == f"{caller}-1"
        else:  # refused: the ticket is untouched and nothing was recorded as done
            assert (ticket.status, ticket.category, new_actions) == (start_status, "C2", [])
        return
    if expected in (200, 201):
        state, action = WRITE_RESULT[template]
        assert alert.state == state
        assert new_actions == [action]
    else:  # refused: the alert is untouched and nothing was recorded as done
        assert alert.state == ("silenced" if template.endswith("unsilence") else "firing")
        assert new_actions == []
