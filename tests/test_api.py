"""The REST API (`vigil serve`) over HTTP against a real SQLite store file: list/filter/show, the ack → resolve
lifecycle with the audit chain verifying afterwards, time-boxed silences, comments, clear 4xx errors, and the access
record of every read. One test repeats the lifecycle on a real PostgreSQL, where the audit log refuses edits.
Ticket actions (start, acceptance → C2 / C2-F, close, reclassify), the FHIR Task export and the dataset manifest run
on real classifier output against the example PCCPs."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.task import Task
from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError
from test_ticket_lifecycle import M2_FAIL_80, build_store, m2_results

from retrain_trigger.manifest import verify_manifest
from vigil import alert_actions, audit, auth, store
from vigil.api import create_app
from vigil.settings import load_settings
from vigil.store import AlertCommentRow, AlertRow, ApiTokenRow, AuditRow, OutboxRow, TicketRow

T0 = datetime(2026, 9, 1, 8, 0, tzinfo=UTC)


def _alert(alert_id: str, **overrides) -> AlertRow:
    values = dict(
        id=alert_id, model="cta-stenosis", model_version="2.1", metric="sensitivity", site="site-a", subgroup="all",
        detector="cusum", state="firing", severity="warning", detected_at=T0, change_estimate=T0 - timedelta(days=9),
        statistic=5.4, threshold=5.0, baseline=0.91, current=0.78, ci_low=0.71, ci_high=0.84, n_baseline=900,
        n_current=140, last_fired_at=T0,
    )
    values.update(overrides)
    return AlertRow(**values)


def seed(url: str) -> dict[str, str]:
    """Six alerts covering every state (one silence still running, one expired), one ticket; tokens per role."""
    store.upgrade(url)
    now = datetime.now(UTC)
    sessions = store.session_factory(url)
    with sessions() as s, s.begin():
        s.add(TicketRow(id="T-000001", model="cta-stenosis", model_version="2.1", category="C2", cause="scanner",
                        cause_confidence=0.8, remedy="retrain", rationale=[["R1", "site-b only", "pccp §8.3"]],
                        required_actions=["run the acceptance protocol"],
                        evidence={"signals": [{"alert_id": "A-000001", "site": "site-a"}]}))
        s.flush()
        s.add_all([
            _alert("A-000001", ticket_id="T-000001"),
            _alert("A-000002", metric="specificity", site="site-b", severity="critical",
                   detected_at=T0 + timedelta(days=1)),
            _alert("A-000003", model="sepsis", state="acknowledged", acked_by="dr.lee", acked_at=T0,
                   detected_at=T0 + timedelta(days=2)),
            _alert("A-000004", state="resolved", resolved_by="dr.lee", resolved_at=T0,
                   detected_at=T0 + timedelta(days=3)),
            _alert("A-000005", state="silenced", silenced_until=now + timedelta(days=2), silenced_by="dr.lee",
                   silence_reason="scanner service", detected_at=T0 + timedelta(days=4)),
            _alert("A-000006", site="site-b", state="silenced", silenced_until=now - timedelta(hours=1),
                   silenced_by="dr.lee", silence_reason="old", detected_at=T0 + timedelta(days=5)),
        ])
        tokens = {role: auth.create_token(s, f"{role}-1", role, actor="test-admin") for role in store.ROLES}
    sessions.kw["bind"].dispose()
    return tokens


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One migrated and seeded store file; each test gets a copy (migrating takes far longer than copying)."""
    path = tmp_path_factory.mktemp("seeded") / "vigil.db"
    tokens = seed(f"sqlite:///{path}")  # its engine is disposed, so the WAL is checkpointed into the file
    return path, tokens


@pytest.fixture
def url(tmp_path, seeded) -> str:
    shutil.copyfile(seeded[0], tmp_path / "vigil.db")
    return f"sqlite:///{tmp_path / 'vigil.db'}"


@pytest.fixture
def tokens(url, seeded) -> dict[str, str]:
    return seeded[1]


@pytest.fixture
def client(url, tokens) -> Iterator[TestClient]:
    with TestClient(create_app(url)) as c:
        yield c


@pytest.fixture
def db(url) -> Iterator:
    sessions = store.session_factory(url)
    yield sessions
    sessions.kw["bind"].dispose()


def h(tokens: dict[str, str], role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens[role]}"}


def ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [a["id"] for a in response.json()["items"]]


def test_list_filters_on_effective_state_and_fields_and_pages(client, tokens):
    get = lambda **params: client.get("/alerts", params=params, headers=h(tokens, "viewer"))  # noqa: E731
    everything = get()
    assert everything.json()["total"] == 6
    assert ids(everything) == ["A-000006", "A-000005", "A-000004", "A-000003", "A-000002", "A-000001"]
    assert ids(get(state="firing")) == ["A-000006", "A-000002", "A-000001"]  # A-000006's silence has ended
    assert ids(get(state="silenced")) == ["A-000005"]
    assert ids(get(state="acknowledged")) == ["A-000003"]
    assert ids(get(site="site-b")) == ["A-000006", "A-000002"]
    assert ids(get(metric="specificity")) == ["A-000002"]
    assert ids(get(model="sepsis")) == ["A-000003"]
    assert ids(get(severity="critical")) == ["A-000002"]
    assert ids(get(state="firing", site="site-a")) == ["A-000001"]
    page = get(limit=2, offset=1)
    assert ids(page) == ["A-000005", "A-000004"] and page.json()["total"] == 6
    by_id = {a["id"]: a for a in everything.json()["items"]}
    assert by_id["A-000006"]["state"] == "firing" and by_id["A-000005"]["state"] == "silenced"
    bad = get(state="asleep")
    assert bad.status_code == 422 and "firing" in bad.text
    assert get(limit=0).status_code == 422


def test_show_gives_evidence_comments_and_the_allowed_actions(client, tokens):
    r = client.get("/alerts/A-000001", headers=h(tokens, "viewer"))
    assert r.status_code == 200
    body = r.json()
    assert (body["model"], body["site"], body["metric"], body["state"], body["ticket_id"]) == (
        "cta-stenosis", "site-a", "sensitivity", "firing", "T-000001")
    assert (body["baseline"], body["current"], body["ci_low"], body["ci_high"], body["n_current"]) == (
        0.91, 0.78, 0.71, 0.84, 140)
    assert body["change_estimate"].startswith("2026-08-23")
    assert body["comments"] == []
    assert body["allowed_actions"] == ["acknowledge", "resolve", "silence", "comment"]
    resolved = client.get("/alerts/A-000004", headers=h(tokens, "viewer")).json()
    assert resolved["allowed_actions"] == ["comment"]


def test_ack_then_resolve_is_recorded_and_the_audit_chain_verifies(client, tokens, db):
    officer = h(tokens, "safety_officer")
    r = client.post("/alerts/A-000001/ack", json={"comment": "site-a scanner swapped on 23 Aug"}, headers=officer)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["from_state"], body["to_state"], body["by"]) == ("firing", "acknowledged", "safety_officer-1")
    assert body["alert"]["acked_by"] == "safety_officer-1"
    assert body["alert"]["ack_comment"] == "site-a scanner swapped on 23 Aug"

    r = client.post("/alerts/A-000001/resolve", headers=officer)  # no body: the comment is optional
    assert r.status_code == 200, r.text
    assert (r.json()["from_state"], r.json()["to_state"]) == ("acknowledged", "resolved")

    again = client.post("/alerts/A-000001/resolve", json={}, headers=officer)
    assert again.status_code == 409
    err = again.json()
    assert "A-000001" in err["detail"] and "resolved" in err["detail"]
    assert err["state"] == "resolved" and err["allowed_actions"] == ["comment"]
    assert err["allowed_from"] == ["firing", "acknowledged", "silenced"]
    assert client.post("/alerts/A-000001/ack", headers=officer).status_code == 409

    with db() as s:
        row = s.get(AlertRow, "A-000001")
        assert (row.state, row.acked_by, row.resolved_by) == ("resolved", "safety_officer-1", "safety_officer-1")
        entries = s.scalars(select(AuditRow).where(AuditRow.entity_id == "A-000001",
                                                   AuditRow.action.like("alert.%")).order_by(AuditRow.seq)).all()
        assert [(e.action, e.actor, e.payload["from"], e.payload["to"]) for e in entries] == [
            ("alert.acknowledged", "safety_officer-1", "firing", "acknowledged"),
            ("alert.resolved", "safety_officer-1", "acknowledged", "resolved"),
        ]
        assert entries[0].payload["comment"] == "site-a scanner swapped on 23 Aug"
        assert entries[0].payload["role"] == "safety_officer"
        result = audit.verify(s)
        assert result.ok and result.checked == s.scalar(select(AuditRow.seq).order_by(AuditRow.seq.desc()))

    verified = client.get("/audit/verify", headers=h(tokens, "admin")).json()
    assert verified["ok"] is True and verified["first_bad_seq"] is None
    with db() as s:  # editing one entry is caught, by number, through the API
        s.execute(text("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 5"))
        s.commit()
    broken = client.get("/audit/verify", headers=h(tokens, "admin")).json()
    assert broken["ok"] is False and broken["first_bad_seq"] == 5 and broken["checked"] == 4
    assert "entry 5 (alert.acknowledged on alert A-000001)" in broken["reason"] and "edited" in broken["reason"]


def test_silence_is_time_boxed_and_counts_as_firing_once_it_ends(client, tokens, db):
    officer = h(tokens, "safety_officer")
    before = datetime.now(UTC)
    r = client.post("/alerts/A-000002/silence", json={"duration": "P1D", "reason": "scanner recalibration"},
                    headers=officer)
    assert r.status_code == 200, r.text
    alert = r.json()["alert"]
    until = datetime.fromisoformat(alert["silenced_until"])
    assert before + timedelta(days=1) <= until <= datetime.now(UTC) + timedelta(days=1)
    assert (alert["state"], alert["silence_reason"], alert["silenced_by"]) == (
        "silenced", "scanner recalibration", "safety_officer-1")

    later = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    r = client.post("/alerts/A-000002/silence", json={"until": later, "reason": "extended"}, headers=officer)
    assert r.status_code == 200 and r.json()["from_state"] == "silenced"  # re-silencing replaces the box

    for body, loc, needle in (
        ({"duration": "P60D", "reason": "x"}, ["body", "duration"], "more than 30 days ahead"),
        ({"until": "2020-01-01T00:00:00Z", "reason": "x"}, ["body", "until"], "not in the future"),
        ({"until": "2030-01-01T00:00:00", "reason": "x"}, ["body", "until"], "timezone"),
        ({"until": later, "duration": "P1D", "reason": "x"}, ["body"], "exactly one"),
        ({"duration": "P1D"}, ["body", "reason"], "required"),
        ({"duration": "P1D", "reason": "   "}, ["body", "reason"], "silence reason for alert A-000002 is empty"),
    ):
        bad = client.post("/alerts/A-000002/silence", json=body, headers=officer)
        assert bad.status_code == 422, (body, bad.text)
        [error] = bad.json()["detail"]
        assert error["loc"] == loc and needle in error["msg"], (body, error)

    with db() as s:  # the clock passes the end of the silence
        s.execute(update(AlertRow).where(AlertRow.id == "A-000002")
                  .values(silenced_until=datetime.now(UTC) - timedelta(minutes=1)))
        s.commit()
    shown = client.get("/alerts/A-000002", headers=officer).json()
    assert shown["state"] == "firing" and "silence" in shown["allowed_actions"]
    assert "A-000002" in ids(client.get("/alerts", params={"state": "firing"}, headers=officer))
    refused = client.post("/alerts/A-000002/unsilence", headers=officer)
    assert refused.status_code == 409 and refused.json()["state"] == "firing"

    r = client.post("/alerts/A-000005/unsilence", headers=officer)
    assert r.status_code == 200 and (r.json()["from_state"], r.json()["to_state"]) == ("silenced", "firing")
    with db() as s, s.begin():
        assert alert_actions.expire_silences(s, now=datetime.now(UTC)) == ["A-000002", "A-000006"]
        assert s.get(AlertRow, "A-000006").state == "firing"
        actions = s.scalars(select(AuditRow.action).where(AuditRow.entity_id == "A-000002")).all()
    assert actions.count("alert.silenced") == 2 and actions[-1] == "alert.silence_expired"


def test_acknowledging_a_silenced_alert_ends_the_silence(client, tokens):
    r = client.post("/alerts/A-000005/ack", json={"comment": "mine"}, headers=h(tokens, "safety_officer"))
    assert r.status_code == 200 and (r.json()["from_state"], r.json()["to_state"]) == ("silenced", "acknowledged")


def test_comments_are_stored_listed_and_allowed_on_resolved_alerts(client, tokens, db):
    officer = h(tokens, "safety_officer")
    r = client.post("/alerts/A-000004/comments", json={"text": "closed after site visit"}, headers=officer)
    assert r.status_code == 201, r.text
    assert (r.json()["author"], r.json()["text"], r.json()["alert_id"]) == (
        "safety_officer-1", "closed after site visit", "A-000004")
    client.post("/alerts/A-000004/comments", json={"text": "second note"}, headers=officer)
    listed = client.get("/alerts/A-000004/comments", headers=h(tokens, "viewer")).json()
    assert [c["text"] for c in listed] == ["closed after site visit", "second note"]
    assert [c["text"] for c in client.get("/alerts/A-000004", headers=officer).json()["comments"]] == [
        "closed after site visit", "second note"]
    for body in ({"text": ""}, {}, {"text": "x", "author": "someone"}, {"text": "x" * 4001}):
        assert client.post("/alerts/A-000004/comments", json=body, headers=officer).status_code == 422, body
    blank = client.post("/alerts/A-000004/comments", json={"text": "   "}, headers=officer)
    assert blank.status_code == 422
    assert blank.json()["detail"] == [{"type": "value_error", "loc": ["body", "text"],
                                       "msg": "comment for alert A-000004 is empty; write what was decided and why"}]
    with db() as s:
        assert s.scalar(select(AlertCommentRow.author).where(AlertCommentRow.alert_id == "A-000004")) == \
            "safety_officer-1"
        assert s.scalars(select(AuditRow.action).where(AuditRow.entity_id == "A-000004",
                                                       AuditRow.action == "alert.commented")).all() == [
            "alert.commented", "alert.commented"]


def test_unknown_ids_are_404_naming_the_id(client, tokens):
    officer = h(tokens, "safety_officer")
    for method, path, body in (("get", "/alerts/A-999999", None), ("get", "/alerts/A-999999/comments", None),
                               ("post", "/alerts/A-999999/ack", {}), ("post", "/alerts/A-999999/resolve", {}),
                               ("post", "/alerts/A-999999/silence", {"duration": "PT1H", "reason": "x"}),
                               ("post", "/alerts/A-999999/unsilence", None),
                               ("post", "/alerts/A-999999/comments", {"text": "x"})):
        r = client.request(method, path, json=body, headers=officer)
        assert r.status_code == 404, (path, r.text)
        assert "A-999999" in r.json()["detail"]
    r = client.get("/tickets/T-999999", headers=officer)
    assert r.status_code == 404 and "T-999999" in r.json()["detail"]


def test_malformed_bodies_are_422_saying_which_field(client, tokens):
    officer = {**h(tokens, "safety_officer"), "Content-Type": "application/json"}
    r = client.post("/alerts/A-000001/ack", content=b'{"comment": ', headers=officer)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    r = client.post("/alerts/A-000001/ack", json={"coment": "typo"}, headers=officer)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "coment"]
    r = client.post("/alerts/A-000001/silence", json={"duration": "a week", "reason": "x"}, headers=officer)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "duration"]
    r = client.post("/alerts/A-000001/comments", json=["not", "an", "object"], headers=officer)
    assert r.status_code == 422
    assert client.get("/alerts/A-000001", headers=officer).json()["state"] == "firing"  # nothing changed


def test_reads_are_access_logged_with_who_what_and_when(client, tokens, db):
    with db() as s:
        last = s.scalar(select(AuditRow.seq).order_by(AuditRow.seq.desc()))
    before = datetime.now(UTC)
    client.get("/alerts/A-000003", headers=h(tokens, "viewer"))
    client.get("/alerts", params={"site": "site-b"}, headers=h(tokens, "engineer"))
    client.get("/alerts/A-000003/comments", headers=h(tokens, "viewer"))
    client.get("/tickets", headers=h(tokens, "viewer"))
    client.get("/tickets/T-000001", headers=h(tokens, "safety_officer"))
    client.get("/alerts/A-999999", headers=h(tokens, "viewer"))  # a 404 reads nothing
    client.get("/healthz")
    with db() as s:
        rows = s.scalars(select(AuditRow).where(AuditRow.seq > last).order_by(AuditRow.seq)).all()
        assert audit.verify(s).ok
    assert [(r.action, r.actor, r.entity, r.entity_id) for r in rows] == [
        ("api.read", "viewer-1", "alert", "A-000003"),
        ("api.read", "engineer-1", "alert", "*"),
        ("api.read", "viewer-1", "alert", "A-000003"),
        ("api.read", "viewer-1", "ticket", "*"),
        ("api.read", "safety_officer-1", "ticket", "T-000001"),
    ]
    assert all(before <= r.at <= datetime.now(UTC) for r in rows)
    assert rows[0].payload["role"] == "viewer" and rows[0].payload["request"] == "GET /alerts/A-000003"
    assert rows[1].payload["ids"] == ["A-000006", "A-000002"] and rows[1].payload["filters"] == {"site": "site-b"}
    assert rows[3].payload["ids"] == ["T-000001"]


def test_tickets_list_and_show_without_identifiers(client, tokens):
    listed = client.get("/tickets", headers=h(tokens, "engineer"))
    assert listed.status_code == 200
    [t] = listed.json()["items"]
    assert (t["id"], t["category"], t["alert_ids"]) == ("T-000001", "C2", ["A-000001"])
    assert "evidence" not in t
    assert client.get("/tickets", params={"category": "C4"}, headers=h(tokens, "engineer")).json()["total"] == 0
    assert client.get("/tickets", params={"category": "C9"}, headers=h(tokens, "engineer")).status_code == 422
    full = client.get("/tickets/T-000001", headers=h(tokens, "engineer")).json()
    assert full["rationale"] == [["R1", "site-b only", "pccp §8.3"]]
    assert full["evidence"]["signals"][0]["alert_id"] == "A-000001"
    for response in (listed, client.get("/alerts", headers=h(tokens, "viewer"))):
        assert "subject" not in response.text and "encounter" not in response.text


def test_authentication_errors_say_what_to_do(client, tokens):
    r = client.get("/alerts")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="vigil"'
    assert "vigil tokens create" in r.json()["detail"]
    r = client.get("/alerts", headers={"Authorization": "Bearer vigil_not-a-real-token"})
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    r = client.get("/alerts", headers={"Authorization": f"Basic {tokens['admin']}"})
    assert r.status_code == 401
    r = client.post("/alerts/A-000001/ack", headers=h(tokens, "engineer"))
    assert r.status_code == 403
    assert "engineer" in r.json()["detail"] and "safety_officer, admin" in r.json()["detail"]
    assert client.get("/healthz").json()["status"] == "ok"


def test_openapi_documents_every_endpoint_with_summary_and_errors(client):
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            assert op.get("summary") and op.get("description"), (method, path)
            if path != "/healthz":
                assert {"401", "403"} <= set(op["responses"]), (method, path)
    assert {"404", "409", "422"} <= set(spec["paths"]["/alerts/{alert_id}/resolve"]["post"]["responses"])


def test_extra_routers_are_mounted_and_can_require_a_permission(url, tokens):
    from fastapi import APIRouter, Depends

    from vigil.api import require
    from vigil.auth import Permission

    extra = APIRouter()

    @extra.get("/extra", summary="probe", description="probe")
    def probe(principal=Depends(require(Permission.MANAGE_TOKENS))) -> dict:
        return {"who": principal.name}

    with TestClient(create_app(url, extra_routers=[extra])) as c:
        assert c.get("/extra", headers=h(tokens, "admin")).json() == {"who": "admin-1"}
        assert c.get("/extra", headers=h(tokens, "viewer")).status_code == 403


@pytest.mark.postgres
def test_lifecycle_on_postgres_where_the_audit_log_refuses_edits(fresh_postgres_url):
    tokens = seed(fresh_postgres_url)
    with TestClient(create_app(fresh_postgres_url)) as c:
        officer = h(tokens, "safety_officer")
        assert c.post("/alerts/A-000001/ack", json={"comment": "on it"}, headers=officer).status_code == 200
        assert c.post("/alerts/A-000001/resolve", headers=officer).status_code == 200
        assert c.post("/alerts/A-000001/resolve", headers=officer).status_code == 409
        assert ids(c.get("/alerts", params={"state": "firing"}, headers=officer)) == ["A-000006", "A-000002"]
        assert c.get("/audit/verify", headers=h(tokens, "admin")).json()["ok"] is True
    sessions = store.session_factory(fresh_postgres_url)
    try:
        with sessions() as s:
            actions = s.scalars(select(AuditRow.action).order_by(AuditRow.seq)).all()
            assert actions[-3:] == ["alert.resolved", "api.read", "api.read"]
            with pytest.raises(DBAPIError, match="append-only"):
                s.execute(text("UPDATE audit_log SET actor = 'x' WHERE action = 'alert.acknowledged'"))
            s.rollback()
            with pytest.raises(DBAPIError, match="append-only"):
                s.execute(text("DELETE FROM audit_log WHERE action = 'api.read'"))
            s.rollback()
            assert audit.verify(s).ok
    finally:
        sessions.kw["bind"].dispose()


def test_tokens_are_stored_only_as_their_sha256(url, tokens, db):
    with db() as s:
        stored = dict(s.execute(select(ApiTokenRow.name, ApiTokenRow.token_hash)).all())
    assert stored["viewer-1"] == hashlib.sha256(tokens["viewer"].encode()).hexdigest()
    database_bytes = b"".join(p.read_bytes() for p in Path(url.removeprefix("sqlite:///")).parent.glob("vigil.db*"))
    assert all(token.encode() not in database_bytes for token in tokens.values())
    assert len({*tokens.values()}) == 4 and all(len(t) > 40 for t in tokens.values())


def test_a_second_authenticator_plugs_in_beside_the_tokens(url, tokens, db):
    """The OIDC seam. No OIDC provider can run here and none is implemented yet, so a stand-in authenticator that
    accepts one fixed credential shows the API consults the sequence in order and records ``via``."""

    class StandIn:
        def authenticate(self, credentials: str) -> auth.Principal | None:
            return auth.Principal("svc-dashboard", "viewer", via="oidc") if credentials == "eyJ.stand-in" else None

    assert isinstance(StandIn(), auth.Authenticator)
    sessions = store.session_factory(url)
    app = create_app(url, authenticators=[auth.TokenAuthenticator(sessions), StandIn()])
    with TestClient(app) as c:
        assert c.get("/alerts/A-000001", headers={"Authorization": "Bearer eyJ.stand-in"}).status_code == 200
        assert c.get("/alerts/A-000001", headers=h(tokens, "viewer")).status_code == 200
        assert c.get("/alerts/A-000001", headers={"Authorization": "Bearer eyJ.other"}).status_code == 401
        assert c.post("/alerts/A-000001/ack", headers={"Authorization": "Bearer eyJ.stand-in"}).status_code == 403
    sessions.kw["bind"].dispose()
    with db() as s:
        reads = s.execute(select(AuditRow.actor, AuditRow.payload).where(AuditRow.action == "api.read")
                          .order_by(AuditRow.seq)).all()
    assert [(actor, payload["via"]) for actor, payload in reads] == [("svc-dashboard", "oidc"), ("viewer-1", "token")]


def test_transition_listeners_write_in_the_same_transaction(url, tokens, db):
    """A notifier's listener enqueues an outbox row with the transition; if it fails, the transition is undone."""

    def enqueue(session, t: alert_actions.Transition) -> None:
        session.add(OutboxRow(receiver="alertmanager", kind="alertmanager", alert_id=t.alert.id, event=t.to_state,
                              dedupe_key=f"{t.alert.id}:{t.action}:{t.at.isoformat()}", payload={"by": t.by}))

    def broken(session, t: alert_actions.Transition) -> None:
        raise RuntimeError("receiver table unavailable")

    officer = h(tokens, "safety_officer")
    with TestClient(create_app(url), raise_server_exceptions=False) as c:
        unsubscribe = alert_actions.subscribe(enqueue)
        try:
            assert c.post("/alerts/A-000001/resolve", headers=officer).status_code == 200
        finally:
            unsubscribe()
        unsubscribe = alert_actions.subscribe(broken)
        try:
            assert c.post("/alerts/A-000002/ack", headers=officer).status_code == 500
        finally:
            unsubscribe()
        assert c.post("/alerts/A-000003/resolve", headers=officer).status_code == 200  # no listener left behind
    with db() as s:
        assert s.execute(select(OutboxRow.alert_id, OutboxRow.event, OutboxRow.payload)).all() == [
            ("A-000001", "resolved", {"by": "safety_officer-1"})]
        assert s.get(AlertRow, "A-000002").state == "firing"
        assert s.scalars(select(AuditRow.action).where(AuditRow.entity_id == "A-000002")).all() == []


# --- ticket actions, FHIR Task and dataset manifest (issue 7, Build §5) ----------------------------------------------
# Real classifier output on a real store: ``test_ticket_lifecycle.build_store`` stores the scanner-upgrade ticket
# T-000001 (C2 via the example CTA PCCP's M2, site-b) and the AKI ticket T-000002, with labeled cases.

@pytest.fixture(scope="module")
def tickets_seeded(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One store with the two classified tickets, their cases and a token per role; each test gets a copy."""
    path = tmp_path_factory.mktemp("tickets") / "tickets.db"
    build_store(f"sqlite:///{path}")
    sessions = store.session_factory(f"sqlite:///{path}")
    with sessions() as s, s.begin():
        tokens = {role: auth.create_token(s, f"{role}-1", role, actor="test-admin") for role in store.ROLES}
    sessions.kw["bind"].dispose()
    with sqlite3.connect(path) as con:  # everything into the main file, so copying it copies the store
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path, tokens


@pytest.fixture
def ticket_env(tmp_path, tickets_seeded) -> Iterator[tuple[TestClient, dict[str, str], object]]:
    shutil.copyfile(tickets_seeded[0], tmp_path / "tickets.db")
    url = f"sqlite:///{tmp_path / 'tickets.db'}"
    sessions = store.session_factory(url)
    with TestClient(create_app(url)) as c:
        yield c, tickets_seeded[1], sessions
    sessions.kw["bind"].dispose()


def test_engineer_runs_a_ticket_through_failed_and_passed_acceptance_to_closed(ticket_env):
    client, tokens, sessions = ticket_env
    eng = h(tokens, "engineer")
    r = client.post("/tickets/T-000001/start", headers=eng)
    assert r.status_code == 200, r.text
    assert (r.json()["from_status"], r.json()["to_status"], r.json()["by"]) == ("open", "in_progress", "engineer-1")

    failed = {"passed": False, "results": m2_results(M2_FAIL_80), "evidence_ref": "VV-2025-031"}
    r = client.post("/tickets/T-000001/acceptance", json=failed, headers=eng)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["from_category"], body["to_category"], body["to_status"]) == ("C2", "C2-F", "acceptance_recorded")
    assert body["ticket"]["deployable"] is False
    assert body["ticket"]["acceptance"]["failed_criteria"] == [M2_FAIL_80]
    assert body["ticket"]["rationale"][-1][0] == "R6" and "C2-F" in body["ticket"]["rationale"][-1][1]

    assert client.post("/tickets/T-000001/start", headers=eng).json()["to_status"] == "in_progress"  # re-test
    passed = {"passed": True, "results": m2_results(), "evidence_ref": "VV-2025-032"}
    r = client.post("/tickets/T-000001/acceptance", json=passed, headers=h(tokens, "admin"))
    assert r.status_code == 200, r.text
    assert (r.json()["to_category"], r.json()["ticket"]["deployable"]) == ("C2", True)

    r = client.post("/tickets/T-000001/close", json={"comment": "M2 implemented; labeling updated"}, headers=eng)
    assert r.status_code == 200 and r.json()["to_status"] == "closed"
    shown = client.get("/tickets/T-000001", headers=h(tokens, "viewer")).json()
    assert (shown["status"], shown["category"], shown["deployable"]) == ("closed", "C2", True)
    assert shown["evidence"]["closure"]["by"] == "engineer-1"

    with sessions() as s:
        entries = s.scalars(select(AuditRow).where(AuditRow.entity_id == "T-000001", AuditRow.action.like("ticket.%"))
                            .order_by(AuditRow.seq)).all()
        assert [(e.action, e.actor) for e in entries] == [
            ("ticket.opened", "vigil-pipeline"), ("ticket.started", "engineer-1"),
            ("ticket.acceptance_recorded", "engineer-1"), ("ticket.started", "engineer-1"),
            ("ticket.acceptance_recorded", "admin-1"), ("ticket.closed", "engineer-1")]
        assert entries[2].payload["role"] == "engineer" and entries[2].payload["via"] == "api/token"
        assert entries[2].payload["to"] == {"status": "acceptance_recorded", "category": "C2-F"}
        assert audit.verify(s).ok


def test_ticket_action_conflicts_are_409_with_the_status_and_what_is_allowed(ticket_env):
    client, tokens, _ = ticket_env
    eng = h(tokens, "engineer")
    passed = {"passed": True, "results": m2_results(), "evidence_ref": "VV-1"}
    r = client.post("/tickets/T-000001/acceptance", json=passed, headers=eng)
    assert r.status_code == 409
    assert r.json() == {
        "detail": "ticket T-000001 is open; it cannot become acceptance_recorded. Allowed next: in_progress or closed",
        "ticket_id": "T-000001", "status": "open", "allowed_next": ["in_progress", "closed"]}
    client.post("/tickets/T-000001/start", headers=eng)
    partial = {**passed, "results": {k: v for k, v in m2_results().items() if k != "full-device V&V"}}
    r = client.post("/tickets/T-000001/acceptance", json=partial, headers=eng)
    assert r.status_code == 409 and "missing: full-device V&V" in r.json()["detail"]
    r = client.post("/tickets/T-000001/acceptance", json={**passed, "results": {"auroc": 0.8}}, headers=eng)
    assert r.status_code == 409 and "M2 has no acceptance criteria ['auroc']" in r.json()["detail"]
    assert client.get("/tickets/T-000001", headers=eng).json()["status"] == "in_progress"  # nothing recorded
    client.post("/tickets/T-000002/close", json={"comment": "monitoring only"}, headers=eng)
    r = client.post("/tickets/T-000002/reclassify", json={"remedy": "recalibration"}, headers=eng)
    assert r.status_code == 409 and r.json()["status"] == "closed" and r.json()["allowed_next"] == []
    assert "only open, in_progress, acceptance_recorded tickets can be reclassified" in r.json()["detail"]


def test_ticket_action_bodies_are_validated_field_by_field(ticket_env):
    client, tokens, _ = ticket_env
    eng = h(tokens, "engineer")
    client.post("/tickets/T-000001/start", headers=eng)
    for path, body, loc in (
        ("acceptance", {"passed": True, "results": m2_results(), "evidence_ref": ""}, ["body", "evidence_ref"]),
        ("acceptance", {"passed": True, "results": {}, "evidence_ref": "VV"}, ["body", "results"]),
        ("acceptance", {"results": m2_results(), "evidence_ref": "VV"}, ["body", "passed"]),
        ("close", {"comment": ""}, ["body", "comment"]),
        ("close", {"comment": "x", "by": "someone-else"}, ["body", "by"]),
        ("reclassify", {"remedy": "retrain_harder"}, ["body", "remedy"]),
    ):
        r = client.post(f"/tickets/T-000001/{path}", json=body, headers=eng)
        assert r.status_code == 422, (path, body, r.text)
        assert r.json()["detail"][0]["loc"][:len(loc)] == loc, (path, r.json())
    assert "retrain_same_arch_new_data" in client.post("/tickets/T-000001/reclassify", json={"remedy": "x"},
                                                       headers=eng).text  # the error lists the remedies
    mixed = {"passed": False, "evidence_ref": "VV-9",
             "results": {M2_FAIL_80: {"value": -0.08, "passed": False}, "full-device V&V": True}}
    r = client.post("/tickets/T-000001/acceptance", json=mixed, headers=eng)
    assert r.status_code == 200, r.text
    results = r.json()["ticket"]["acceptance"]["results"]
    assert results == {M2_FAIL_80: {"value": -0.08, "passed": False},
                       "full-device V&V": {"value": True, "passed": None}}


def test_reclassify_over_http_gives_the_new_remedys_category(ticket_env):
    client, tokens, sessions = ticket_env
    r = client.post("/tickets/T-000001/reclassify", json={"remedy": "retrain_arch_change"},
                    headers=h(tokens, "engineer"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["from_category"], body["to_category"], body["to_status"]) == ("C2", "C5", "open")
    assert body["ticket"]["remedy"] == "retrain_arch_change" and body["ticket"]["matched_mod"] is None
    assert "new Traditional 510(k)" in body["ticket"]["rationale"][-1][1]
    with sessions() as s:
        [entry] = s.scalars(select(AuditRow).where(AuditRow.action == "ticket.reclassified")).all()
    assert (entry.actor, entry.payload["role"], entry.payload["from"]["category"], entry.payload["to"]["category"]) \
        == ("engineer-1", "engineer", "C2", "C5")


def test_an_invalid_pccp_file_is_422_naming_the_file(tmp_path, ticket_env):
    _, tokens, sessions = ticket_env
    broken = tmp_path / "pccp-broken.yaml"
    broken.write_text("pccp:\n  pccp_id: X\n  colour: blue\n")
    settings = load_settings()
    settings.model("cta-stenosis").pccp = broken
    url = str(sessions.kw["bind"].url)
    with TestClient(create_app(url, settings=settings)) as c:
        r = c.post("/tickets/T-000001/reclassify", json={"remedy": "recalibration"}, headers=h(tokens, "engineer"))
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["loc"] == ["pccp"] and str(broken) in error["msg"] and "does not validate" in error["msg"]
    with sessions() as s:
        assert s.get(TicketRow, "T-000001").remedy == "new_input_source_same_type"


def test_fhir_task_export_validates_and_follows_the_ticket(ticket_env):
    client, tokens, sessions = ticket_env
    r = client.get("/tickets/T-000001/fhir-task", headers=h(tokens, "viewer"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    task = Task.model_validate(r.json())
    assert (task.id, task.status, task.intent, task.code.coding[0].code) == ("T-000001", "requested", "proposal", "C2")
    assert task.for_fhir.identifier.value == "00850012345001"  # the device's UDI-DI
    eng = h(tokens, "engineer")
    client.post("/tickets/T-000001/start", headers=eng)
    client.post("/tickets/T-000001/acceptance", headers=eng,
                json={"passed": False, "results": m2_results(M2_FAIL_80), "evidence_ref": "VV-7"})
    failed = client.get("/tickets/T-000001/fhir-task", headers=eng).json()
    assert failed["status"] == "failed" and failed["output"][0]["valueBoolean"] is False
    assert client.get("/tickets/T-999999/fhir-task", headers=eng).status_code == 404
    with sessions() as s:
        reads = s.scalars(select(AuditRow).where(AuditRow.action == "api.read").order_by(AuditRow.seq)).all()
    assert [(e.actor, e.entity_id, e.payload["part"]) for e in reads] == [
        ("viewer-1", "T-000001", "fhir-task"), ("engineer-1", "T-000001", "fhir-task")]


def test_manifest_lists_the_windows_cases_with_a_verifiable_hash_and_no_subjects(ticket_env):
    client, tokens, sessions = ticket_env
    r = client.get("/tickets/T-000001/manifest", headers=h(tokens, "viewer"))
    assert r.status_code == 200, r.text
    manifest = r.json()
    # site-b cases predicted T0 + (6i - 10) days, i = 0..5; the window is T0 .. T0 + 25 days: i = 2..5
    assert manifest["sites"] == ["site-b"] and manifest["case_count"] == 4
    assert [c["prediction_id"] for c in manifest["cases"]] == [f"ra-site-b-{i:03d}" for i in (2, 3, 4, 5)]
    assert "subj-secret" not in r.text and "enc-site" not in r.text
    with sessions() as s:
        assert verify_manifest(s, manifest).ok
        [read] = s.scalars(select(AuditRow).where(AuditRow.action == "api.read")).all()
    assert (read.payload["part"], read.payload["case_count"], read.payload["sha256"]) == (
        "manifest", 4, manifest["content_hash"]["sha256"])
    wider = client.get("/tickets/T-000001/manifest", headers=h(tokens, "viewer"),
                       params={"start": "2025-02-01T00:00:00Z", "end": "2025-04-30T00:00:00Z",
                               "site": ["site-a", "site-b"]}).json()
    assert wider["sites"] == ["site-a", "site-b"] and wider["case_count"] == 12
    naive = client.get("/tickets/T-000001/manifest", headers=h(tokens, "viewer"),
                       params={"start": "2025-02-01T00:00:00", "end": "2025-04-30T00:00:00Z"})
    assert naive.status_code == 422 and naive.json()["detail"][0]["loc"] == ["query", "start"]
    backwards = client.get("/tickets/T-000001/manifest", headers=h(tokens, "viewer"),
                           params={"start": "2025-04-01T00:00:00Z", "end": "2025-03-01T00:00:00Z"})
    assert backwards.status_code == 422 and "before it starts" in backwards.json()["detail"][0]["msg"]


def test_unknown_tickets_are_404_on_every_ticket_endpoint(ticket_env):
    client, tokens, _ = ticket_env
    for method, path, body in (("get", "fhir-task", None), ("get", "manifest", None), ("post", "start", None),
                               ("post", "acceptance", {"passed": True, "results": {"x": 1}, "evidence_ref": "V"}),
                               ("post", "close", {"comment": "x"}), ("post", "reclassify", {"remedy": "rollback"})):
        r = client.request(method, f"/tickets/T-000404/{path}", json=body, headers=h(tokens, "admin"))
        assert r.status_code == 404, (path, r.text)
        assert r.json()["detail"] == "no ticket T-000404 in the store (list them with GET /tickets)"


def test_openapi_documents_the_ticket_actions_errors(client):
    paths = client.get("/openapi.json").json()["paths"]
    for action in ("start", "acceptance", "close", "reclassify"):
        responses = paths[f"/tickets/{{ticket_id}}/{action}"]["post"]["responses"]
        assert {"200", "401", "403", "404", "409"} <= set(responses), action
        assert responses["409"]["content"]["application/json"]["schema"]["$ref"].endswith("TicketConflictOut")
    assert "422" in paths["/tickets/{ticket_id}/acceptance"]["post"]["responses"]
    assert "application/fhir+json" in paths["/tickets/{ticket_id}/fhir-task"]["get"]["responses"]["200"]["content"]
