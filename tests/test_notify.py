"""Notification delivery end to end against real receivers on loopback: an SMTP server (aiosmtpd), HTTP webhook and
chat receivers (http.server; chat through apprise's ``json://`` plugin), the outbox on a real SQLite store.

Covers: content without identifiers, the HMAC signature (and refusal of tampered or replayed requests), a receiver
outage with backoff and exactly-once delivery after it, per-alert event order, idempotent enqueueing, silences,
escalation, crash recovery through the claim lease, and two concurrent workers on SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from alerts.notifiers import SignatureError, sign, verify_signature
from alerts.routing import RoutingConfig
from vigil import audit, notify, store
from vigil.store import AlertRow, AuditRow, CaseRow, OutboxRow, TicketRow

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SECRET = "webhook-test-secret-7d1e"
SUBJECT_KEY = "c0ffee00deadbeef4b1d" * 3  # a pseudonymous subject key stored with a case of the alerted stream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'vigil.db'}"
    store.upgrade(url)
    factory = store.session_factory(url)
    yield factory
    factory.kw["bind"].dispose()


def add_alert(sessions: sessionmaker[Session], *, detected_at: datetime = T0, ticket: bool = True,
              **overrides: object) -> AlertRow:
    """An alert as the pipeline stores it, plus one case of the same stream carrying a subject key."""
    with sessions.begin() as s:
        ticket_id = None
        if ticket:
            ticket_id = store.next_id(s, TicketRow, "T")
            s.add(TicketRow(id=ticket_id, model="cta-stenosis", model_version="2.1.0", category="C2",
                            cause="scanner change", cause_confidence=0.8, remedy="recalibrate"))
        if s.scalar(select(CaseRow.id).where(CaseRow.prediction_id == "pred-991")) is None:
            s.add(CaseRow(model="cta-stenosis", model_version="2.1.0", prediction_id="pred-991",
                          prediction_version="1",
                          subject=SUBJECT_KEY[:64], encounter="enc-5521", site="hillcrest",
                          attributes={"sex": "female"}, predicted_at=T0 - timedelta(days=3), score=0.2,
                          decision=False, label="positive"))
        values = dict(
            id=store.next_id(s, AlertRow, "A"), model="cta-stenosis", model_version="2.1.0", metric="fnr",
            site="hillcrest", subgroup="sex=female", detector="bernoulli_cusum", state="firing", severity="critical",
            detected_at=detected_at, change_estimate=datetime(2026, 11, 2, 8, 0, tzinfo=UTC), statistic=5.31,
            threshold=4.12, baseline=0.152, current=0.314, ci_low=0.251, ci_high=0.384, n_baseline=1840,
            n_current=212, fire_count=1, last_fired_at=detected_at, ticket_id=ticket_id,
        )
        values.update(overrides)
        row = AlertRow(**values)
        s.add(row)
    return row


def routing(**receivers_and_more: object) -> RoutingConfig:
    return RoutingConfig.model_validate({
        "links": {"grafana_url": "https://grafana.example", "vigil_url": "https://vigil.example/api"},
        "delivery": {"backoff": "PT10S", "max_backoff": "PT40S"},
        **receivers_and_more,
    })


# --- a real HTTP receiver on loopback --------------------------------------------------------------------------------


@dataclass
class Receiver:
    """Records what a webhook/chat endpoint accepted; with ``secret`` it verifies the signature itself (RFC 2104)."""

    secret: str | None = None
    accepted: list[dict] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    raw: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, body: bytes, headers: dict[str, str]) -> str | None:
        if self.secret is None:
            return None
        timestamp, signature = headers.get("X-Vigil-Timestamp", ""), headers.get("X-Vigil-Signature", "")
        expected = "sha256=" + hmac.new(self.secret.encode(), timestamp.encode() + b"." + body,
                                        hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            return "bad signature"
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > 300:
            return "stale timestamp"
        return None

    def start(self, port: int = 0) -> str:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k: v for k, v in self.headers.items()}
                problem = receiver.check(body, headers)
                with receiver.lock:
                    if problem:
                        receiver.rejected.append(problem)
                    else:
                        receiver.accepted.append(json.loads(body))
                        receiver.raw.append((body, headers))
                self.send_response(401 if problem else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Receiver]:
    receiver = Receiver(secret=SECRET)
    yield receiver
    receiver.stop()


def webhook_routing(url: str, **more: object) -> RoutingConfig:
    return routing(receivers=[{"name": "eqms", "kind": "webhook", "url": url, "secret_env": "VIGIL_TEST_HOOK_SECRET",
                               "timeout_seconds": 2}], default_receiver="eqms", **more)


# --- email ---------------------------------------------------------------------------------------------------------


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 (aiosmtpd's hook name)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def test_email_reaches_a_real_smtp_server_with_the_facts_and_no_identifier(
        sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"smtp-pass-123", handled=False)

    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, authenticator=authenticator,
                            auth_require_tls=False)
    controller.start()
    monkeypatch.setenv("VIGIL_TEST_SMTP_PASSWORD", "smtp-pass-123")
    try:
        cfg = routing(receivers=[{"name": "safety", "kind": "email", "smtp_host": "127.0.0.1", "smtp_port": port,
                                  "starttls": False, "username": "vigil", "password_env": "VIGIL_TEST_SMTP_PASSWORD",
                                  "from": "vigil@hospital.example", "to": ["safety@hospital.example", "qa@x.example"],
                                  "timeout_seconds": 5}],
                      default_receiver="safety")
        alert = add_alert(sessions)
        with sessions.begin() as s:
            assert notify.enqueue(s, s.get(AlertRow, alert.id), "firing", cfg, now=T0) == ["safety"]
        report = notify.deliver_due(sessions, cfg, T0)
    finally:
        controller.stop()

    assert (report.delivered, report.failed) == (1, 0), report.errors
    assert logins == [(b"vigil", b"smtp-pass-123")]
    [(mail_from, rcpt, content)] = inbox.messages
    assert mail_from == "vigil@hospital.example" and rcpt == ["safety@hospital.example", "qa@x.example"]
    msg = message_from_bytes(content, policy=policy.default)
    subject = msg["Subject"]
    assert subject == "[vigil critical] FIRING: fnr of cta-stenosis 2.1.0 at site hillcrest, subgroup sex=female"
    text = msg.get_body(("plain",)).get_content()
    html_part = msg.get_body(("html",)).get_content()
    for body in (text, html_part):
        assert "0.314 (95% CI 0.251-0.384, n=212)" in body
        assert "0.152 (n=1,840)" in body
        assert "2026-11-02 08:00 UTC (estimated change time" in body
        assert "bernoulli_cusum" in body and "hillcrest" in body and "sex=female" in body
        assert "https://grafana.example/d/vigil-control-charts?var-model=cta-stenosis" in body
        assert "var-site=hillcrest&amp;var-subgroup=sex%3Dfemale" in body or \
            "var-site=hillcrest&var-subgroup=sex%3Dfemale" in body
        assert f"https://vigil.example/api/tickets/{alert.ticket_id}" in body
        for identifier in (SUBJECT_KEY[:64], SUBJECT_KEY[:16], "enc-5521", "pred-991"):
            assert identifier not in body and identifier not in subject
    with sessions() as s:
        row = s.scalars(select(OutboxRow)).one()
        assert row.delivered_at == T0 and row.attempts == 1 and row.last_error is None
        [entry] = s.scalars(select(AuditRow).where(AuditRow.action == "notification.delivered")).all()
        assert (entry.entity_id, entry.payload["receiver"], entry.payload["event"]) == (alert.id, "safety", "firing")
        assert audit.verify(s).ok


def test_wrong_smtp_password_is_a_clear_retryable_failure(
        sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    controller = Controller(Inbox(), hostname="127.0.0.1", port=port, auth_require_tls=False,
                            authenticator=lambda *a: AuthResult(success=False, handled=False))
    controller.start()
    monkeypatch.setenv("VIGIL_TEST_SMTP_PASSWORD", "wrong")
    try:
        cfg = routing(receivers=[{"name": "safety", "kind": "email", "smtp_host": "127.0.0.1", "smtp_port": port,
                                  "starttls": False, "username": "vigil", "password_env": "VIGIL_TEST_SMTP_PASSWORD",
                                  "from": "vigil@hospital.example", "to": ["safety@hospital.example"]}],
                      default_receiver="safety")
        alert = add_alert(sessions)
        with sessions.begin() as s:
            notify.enqueue(s, s.get(AlertRow, alert.id), "firing", cfg, now=T0)
        report = notify.deliver_due(sessions, cfg, T0)
    finally:
        controller.stop()
    assert (report.delivered, report.failed) == (0, 1)
    assert f"email receiver 'safety' via SMTP 127.0.0.1:{port}: login as 'vigil' refused (535)" in report.errors[0]
    assert "$VIGIL_TEST_SMTP_PASSWORD" in report.errors[0] and "wrong" not in report.errors[0]


def test_email_uses_starttls_and_verifies_the_relay_certificate(
        sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """A relay that requires STARTTLS (RFC 3207) with a self-signed certificate: trusted via ca_file it delivers;
    with only the system CAs the certificate is refused and nothing is sent in clear."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make the relay's test certificate: apt-get install openssl",
                    pytrace=False)
    cert, key = tmp_path / "relay.pem", tmp_path / "relay.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=relay",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True)
    controller.start()
    base = {"name": "safety", "kind": "email", "smtp_host": "127.0.0.1", "smtp_port": port, "starttls": True,
            "from": "vigil@hospital.example", "to": ["safety@hospital.example"], "timeout_seconds": 5}
    try:
        alert = add_alert(sessions)
        untrusted = routing(receivers=[base], default_receiver="safety")
        with sessions.begin() as s:
            notify.enqueue(s, s.get(AlertRow, alert.id), "firing", untrusted, now=T0)
        refused = notify.deliver_due(sessions, untrusted, T0)
        assert refused.failed == 1 and "CERTIFICATE_VERIFY_FAILED" in refused.errors[0]
        assert inbox.messages == []
        trusted = routing(receivers=[{**base, "ca_file": str(cert)}], default_receiver="safety")
        assert notify.deliver_due(sessions, trusted, T0 + timedelta(seconds=10)).delivered == 1
    finally:
        controller.stop()
    [(_, _, content)] = inbox.messages
    assert "fnr of cta-stenosis" in message_from_bytes(content, policy=policy.default)["Subject"]


# --- webhook and chat ----------------------------------------------------------------------------------------------


def test_webhook_is_signed_verified_and_tampering_or_replay_is_rejected(
        sessions: sessionmaker[Session], webhook: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIGIL_TEST_HOOK_SECRET", SECRET)
    cfg = webhook_routing(webhook.start())
    alert = add_alert(sessions)
    with sessions.begin() as s:
        notify.enqueue(s, s.get(AlertRow, alert.id), "firing", cfg, now=T0)
    assert notify.deliver_due(sessions, cfg, T0).delivered == 1

    [body] = webhook.accepted
    assert body["event"] == "firing" and body["version"] == "1"
    assert body["alert"]["site"] == "hillcrest" and body["alert"]["metric"] == "fnr"
    assert body["alert"]["current"] == {"value": 0.314, "n": 212, "ci": [0.251, 0.384], "ci_level": 0.95}
    assert body["alert"]["change_estimate"] == "2026-11-02T08:00:00Z"
    assert body["links"]["ticket"] == f"https://vigil.example/api/tickets/{alert.ticket_id}"
    raw, headers = webhook.raw[0]
    assert headers["X-Vigil-Delivery"] == f"eqms:{alert.id}:firing:1"
    assert SUBJECT_KEY[:16] not in raw.decode() and "enc-5521" not in raw.decode()

    url = f"http://127.0.0.1:{webhook.server.server_address[1]}/hook"
    forwarded = {k: headers[k] for k in ("Content-Type", "X-Vigil-Timestamp", "X-Vigil-Signature")}
    tampered = raw.replace(b'"severity":"critical"', b'"severity":"warning"')
    assert tampered != raw
    assert httpx.post(url, content=tampered, headers=forwarded).status_code == 401
    old = str(int(time.time()) - 3600)
    replayed = {**forwarded, "X-Vigil-Timestamp": old, "X-Vigil-Signature": sign(SECRET, old, raw)}
    assert httpx.post(url, content=raw, headers=replayed).status_code == 401
    assert httpx.post(url, content=raw, headers=forwarded).status_code == 204  # the genuine request still verifies
    assert webhook.rejected == ["bad signature", "stale timestamp"]


def test_verify_signature_helper_for_receivers() -> None:
    body, now = b'{"event":"firing"}', 1_800_000_000
    good = sign(SECRET, str(now), body)
    verify_signature(SECRET, body, str(now), good, now=now + 10)
    with pytest.raises(SignatureError, match="does not match the body"):
        verify_signature(SECRET, body + b" ", str(now), good, now=now)
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature("other-secret", body, str(now), good, now=now)
    with pytest.raises(SignatureError, match="replay"):
        verify_signature(SECRET, body, str(now), good, now=now + 301)
    with pytest.raises(SignatureError, match="missing"):
        verify_signature(SECRET, body, None, good)


def test_missing_webhook_secret_is_reported_by_variable_name(
        sessions: sessionmaker[Session], webhook: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIGIL_TEST_HOOK_SECRET", raising=False)
    cfg = webhook_routing(webhook.start())
    alert = add_alert(sessions)
    with sessions.begin() as s:
        notify.enqueue(s, s.get(AlertRow, alert.id), "firing", cfg, now=T0)
    report = notify.deliver_due(sessions, cfg, T0)
    assert report.failed == 1 and webhook.accepted == []
    assert "environment variable VIGIL_TEST_HOOK_SECRET is not set" in report.errors[0]


def test_chat_goes_through_apprise_to_a_real_http_endpoint(sessions: sessionmaker[Session]) -> None:
    chat = Receiver()
    url = chat.start().replace("http://", "json://")
    try:
        cfg = routing(receivers=[{"name": "hillcrest-chat", "kind": "chat", "url": url, "timeout_seconds": 3}],
                      routes=[{"matchers": ['site="hillcrest"'], "receiver": "hillcrest-chat"}])
        alert = add_alert(sessions)
        other = add_alert(sessions, site="st-marys", ticket=False)
        with sessions.begin() as s:
            assert notify.enqueue(s, s.get(AlertRow, alert.id), "firing", cfg, now=T0) == ["hillcrest-chat"]
            assert notify.enqueue(s, s.get(AlertRow, other.id), "firing", cfg, now=T0) == []  # no route, no default
        assert notify.deliver_due(sessions, cfg, T0).delivered == 1
    finally:
        chat.stop()
    [message] = chat.accepted
    assert message["title"].startswith("[vigil critical] FIRING: fnr of cta-stenosis 2.1.0 at site hillcrest")
    assert "fnr 0.314 (95% CI 0.251-0.384, n=212) vs baseline 0.152 (n=1,840)" in message["message"]
    assert "https://grafana.example/d/vigil-control-charts?" in message["message"]


def test_chat_receiver_down_is_a_retryable_failure(sessions: sessionmaker[Session]) -> None:
    cfg = routing(receivers=[{"name": "chat", "kind": "chat", "url": f"json://127.0.0.1:{free_port()}/x",
                              "timeout_seconds": 2}], default_receiver="chat")
    alert = add_alert(sessions)
    with sessions.begin() as s:
        notify.enqueue(s, s.get(AlertRow, alert.id), "firing", cfg, now=T0)
    report = notify.deliver_due(sessions, cfg, T0)
    assert report.failed == 1 and report.errors[0].startswith("chat receiver 'chat' (JSON): not delivered")


# --- outage, backoff, order, exactly once ----------------------------------------------------------------------------


def test_receiver_outage_backs_off_then_delivers_each_event_once_in_order(
        sessions: sessionmaker[Session], webhook: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIGIL_TEST_HOOK_SECRET", SECRET)
    port = free_port()  # nothing listens here yet: the receiver is down
    cfg = webhook_routing(f"http://127.0.0.1:{port}/hook")
    alert = add_alert(sessions)
    with sessions.begin() as s:
        notify.enqueue(s, s.get(AlertRow, alert.id), "firing", cfg, now=T0)

    first = notify.deliver_due(sessions, cfg, T0)
    assert (first.delivered, first.failed) == (0, 1)
    assert f"webhook receiver 'eqms' at http://127.0.0.1:{port}/hook: ConnectError" in first.errors[0]
    assert "the outbox will retry" in first.errors[0]

    def row_state() -> tuple[int, datetime, datetime | None]:
        with sessions() as s:
            row = s.scalars(select(OutboxRow).where(OutboxRow.event == "firing")).one()
            return row.attempts, row.next_attempt_at, row.delivered_at

    assert row_state() == (1, T0 + timedelta(seconds=10), None)
    assert notify.deliver_due(sessions, cfg, T0 + timedelta(seconds=9)).failed == 0  # not due yet: no attempt
    assert notify.deliver_due(sessions, cfg, T0 + timedelta(seconds=10)).failed == 1
    assert row_state() == (2, T0 + timedelta(seconds=30), None)  # 10 s, then 20 s
    # the safety officer acknowledges meanwhile: queued behind the undelivered "firing"
    with sessions.begin() as s:
        row = s.get(AlertRow, alert.id)
        row.state, row.acked_by, row.acked_at = "acknowledged", "dr.safety", T0 + timedelta(seconds=15)
        notify.enqueue(s, row, "acknowledged", cfg, now=T0 + timedelta(seconds=15))
    assert notify.deliver_due(sessions, cfg, T0 + timedelta(seconds=20)).failed == 0  # ack waits for firing

    assert notify.deliver_due(sessions, cfg, T0 + timedelta(seconds=30)).failed == 1
    assert notify.deliver_due(sessions, cfg, T0 + timedelta(seconds=70)).failed == 1
    assert row_state() == (4, T0 + timedelta(seconds=110), None)  # 40 s: the cap

    webhook.start(port)  # the receiver is back
    report = notify.deliver_due(sessions, cfg, T0 + timedelta(seconds=110))
    assert (report.delivered, report.failed) == (2, 0)
    assert notify.deliver_due(sessions, cfg, T0 + timedelta(hours=1)).delivered == 0
    assert [b["event"] for b in webhook.accepted] == ["firing", "acknowledged"]
    assert webhook.accepted[1]["alert"]["acknowledged"]["by"] == "dr.safety"
    assert row_state() == (5, T0 + timedelta(seconds=110), T0 + timedelta(seconds=110))
    with sessions() as s:
        delivered = s.scalars(select(AuditRow).where(AuditRow.action == "notification.delivered")).all()
        assert [(e.payload["event"], e.payload["attempts"]) for e in delivered] == [("firing", 5), ("acknowledged", 1)]


def test_crash_after_claim_is_redelivered_after_the_lease(
        sessions: sessionmaker[Session], webhook: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that claimed a row and died before marking it: nothing is lost, the row is retried after the lease."""
    monkeypatch.setenv("VIGIL_TEST_HOOK_SECRET", SECRET)
    cfg = webhook_routing(webhook.start())
    alert = add_alert(sessions)
    with sessions.begin() as s:
        notify.enqueue(s, s.get(AlertRow, alert.id), "firing", cfg, now=T0)
    assert len(notify._claim(sessions, cfg, T0)) == 1  # claimed, then the worker "crashes"
    assert notify.deliver_due(sessions, cfg, T0 + timedelta(seconds=60)).delivered == 0  # still leased
    assert notify.deliver_due(sessions, cfg, T0 + cfg.delivery.lease).delivered == 1
    assert len(webhook.accepted) == 1


def test_enqueue_is_idempotent_and_silences_hold_back_firing(sessions: sessionmaker[Session]) -> None:
    cfg = routing(receivers=[{"name": "am", "kind": "alertmanager", "url": "http://127.0.0.1:9"},
                             {"name": "eqms", "kind": "webhook", "url": "http://127.0.0.1:9/h", "secret_env": "X"}],
                  routes=[{"receiver": "am", "continue": True}, {"matchers": ['severity="critical"'],
                                                                  "receiver": "eqms"}])
    loud = add_alert(sessions)
    quiet = add_alert(sessions, state="silenced", silenced_until=T0 + timedelta(hours=4), silenced_by="dr.safety",
                      silence_reason="site maintenance")
    unsilenced = add_alert(sessions, silenced_until=T0 + timedelta(hours=4))  # state firing: the silence was ended
    with sessions.begin() as s:
        assert notify.enqueue(s, s.get(AlertRow, loud.id), "firing", cfg, now=T0) == ["am", "eqms"]
        assert notify.enqueue(s, s.get(AlertRow, loud.id), "firing", cfg, now=T0) == []  # replay: nothing new
        assert notify.enqueue(s, s.get(AlertRow, quiet.id), "firing", cfg, now=T0) == []
        assert notify.enqueue(s, s.get(AlertRow, unsilenced.id), "firing", cfg, now=T0) == ["am", "eqms"]
        assert notify.enqueue(s, s.get(AlertRow, quiet.id), "firing", cfg, now=T0 + timedelta(hours=5)) == [
            "am", "eqms"]  # the silence has expired
        refired = s.get(AlertRow, loud.id)
        refired.fire_count = 2
        assert notify.enqueue(s, refired, "firing", cfg, now=T0) == ["am", "eqms"]  # a re-fire is news
    with sessions() as s:
        keys = sorted(s.scalars(select(OutboxRow.dedupe_key).where(OutboxRow.receiver == "eqms")).all())
        assert keys == sorted([f"{loud.id}:firing:1", f"{loud.id}:firing:2", f"{quiet.id}:firing:1",
                               f"{unsilenced.id}:firing:1"])
        payload = s.scalars(select(OutboxRow.payload).where(OutboxRow.receiver == "eqms")).first()
        assert SUBJECT_KEY[:16] not in json.dumps(payload)


def test_unacknowledged_alert_escalates_once_after_the_delay(
        sessions: sessionmaker[Session], webhook: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIGIL_TEST_HOOK_SECRET", SECRET)
    cfg = routing(receivers=[
        {"name": "am", "kind": "alertmanager", "url": "http://127.0.0.1:9"},
        {"name": "director", "kind": "webhook", "url": webhook.start(), "secret_env": "VIGIL_TEST_HOOK_SECRET"}],
        default_receiver="am", escalation={"after": "PT30M", "receiver": "director",
                                           "matchers": ['severity="critical"']})
    waiting = add_alert(sessions)
    acked = add_alert(sessions, state="acknowledged", acked_by="dr.safety", acked_at=T0 + timedelta(minutes=5))
    mild = add_alert(sessions, severity="warning")
    muted = add_alert(sessions, state="silenced", silenced_until=T0 + timedelta(hours=2))
    assert notify.escalate_due(sessions, cfg, T0 + timedelta(minutes=29)) == 0
    assert notify.escalate_due(sessions, cfg, T0 + timedelta(minutes=31)) == 1
    assert notify.escalate_due(sessions, cfg, T0 + timedelta(minutes=45)) == 0  # once
    with sessions() as s:
        assert s.get(AlertRow, waiting.id).escalated_at == T0 + timedelta(minutes=31)
        assert s.get(AlertRow, acked.id).escalated_at is None and s.get(AlertRow, mild.id).escalated_at is None
        assert s.get(AlertRow, muted.id).escalated_at is None
        [(receiver, event)] = s.execute(select(OutboxRow.receiver, OutboxRow.event)).all()
        assert (receiver, event) == ("director", "escalation")
        [entry] = s.scalars(select(AuditRow).where(AuditRow.action == "alert.escalated")).all()
        assert entry.entity_id == waiting.id and entry.payload["unacknowledged_for"] == "0:31:00"
    assert notify.deliver_due(sessions, cfg, T0 + timedelta(minutes=31)).delivered == 1
    # the silence ends unacknowledged: the alert is firing again and long overdue
    assert notify.escalate_due(sessions, cfg, T0 + timedelta(hours=2, minutes=1)) == 1
    assert notify.deliver_due(sessions, cfg, T0 + timedelta(hours=2, minutes=1)).delivered == 1
    assert [(b["event"], b["alert"]["id"]) for b in webhook.accepted] == [("escalation", waiting.id),
                                                                         ("escalation", muted.id)]


# --- two workers ---------------------------------------------------------------------------------------------------


def _two_workers_deliver_each_row_once(sessions: sessionmaker[Session], webhook: Receiver,
                                       alerts: int = 8) -> None:
    cfg = webhook_routing(webhook.start(), delivery={"batch": 3})
    ids = [add_alert(sessions, ticket=False).id for _ in range(alerts)]
    with sessions.begin() as s:
        for alert_id in ids:
            notify.enqueue(s, s.get(AlertRow, alert_id), "firing", cfg, now=T0)
    barrier = threading.Barrier(2)
    reports: list[notify.DeliveryReport] = []

    def worker() -> None:
        barrier.wait()
        reports.append(notify.deliver_due(sessions, cfg, T0))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(r.delivered for r in reports) == alerts and sum(r.failed for r in reports) == 0
    assert sorted(b["alert"]["id"] for b in webhook.accepted) == sorted(ids)  # each exactly once
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(OutboxRow).where(OutboxRow.delivered_at.is_(None))) == 0
        assert audit.verify(s).ok


def test_two_workers_on_sqlite_deliver_each_row_once(
        sessions: sessionmaker[Session], webhook: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIGIL_TEST_HOOK_SECRET", SECRET)
    _two_workers_deliver_each_row_once(sessions, webhook)


@pytest.mark.postgres
def test_two_workers_on_postgresql_skip_locked_deliver_each_row_once(
        fresh_postgres_url: str, webhook: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIGIL_TEST_HOOK_SECRET", SECRET)
    store.upgrade(fresh_postgres_url)
    factory = store.session_factory(fresh_postgres_url)
    try:
        _two_workers_deliver_each_row_once(factory, webhook)
    finally:
        factory.kw["bind"].dispose()


def test_scheduler_delivers_in_the_background(
        sessions: sessionmaker[Session], webhook: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIGIL_TEST_HOOK_SECRET", SECRET)
    cfg = webhook_routing(webhook.start())
    alert = add_alert(sessions, detected_at=datetime.now(UTC))
    with sessions.begin() as s:
        notify.enqueue(s, s.get(AlertRow, alert.id), "firing", cfg)
    scheduler = notify.start_scheduler(sessions, cfg, interval_seconds=0.2)
    try:
        deadline = time.monotonic() + 10
        while not webhook.accepted and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a few more ticks: nothing is sent twice
    finally:
        scheduler.shutdown(wait=True)
    assert [b["event"] for b in webhook.accepted] == ["firing"]


def test_resolution_reaches_whoever_was_told_it_fired(sessions: sessionmaker[Session]) -> None:
    """A route that selects on ``state="firing"`` must not swallow the resolution of what it sent."""
    cfg = routing(receivers=[{"name": "am", "kind": "alertmanager", "url": "http://127.0.0.1:9"},
                             {"name": "audit-hook", "kind": "webhook", "url": "http://127.0.0.1:9/h",
                              "secret_env": "X"}],
                  routes=[{"matchers": ['state="firing"'], "receiver": "am"}], default_receiver="audit-hook")
    alert = add_alert(sessions)
    with sessions.begin() as s:
        row = s.get(AlertRow, alert.id)
        assert notify.enqueue(s, row, "firing", cfg, now=T0) == ["am"]
        row.state, row.resolved_at = "resolved", T0 + timedelta(hours=2)
        assert notify.enqueue(s, row, "resolved", cfg, now=T0 + timedelta(hours=2)) == ["audit-hook", "am"]
        am = s.scalars(select(OutboxRow).where(OutboxRow.receiver == "am", OutboxRow.event == "resolved")).one()
        assert am.payload["alerts"][0]["endsAt"] == "2026-11-29T14:00:00Z"


def test_resend_covers_open_unmuted_alerts_and_old_resends_are_pruned(sessions: sessionmaker[Session]) -> None:
    cfg = routing(receivers=[{"name": "am", "kind": "alertmanager", "url": "http://127.0.0.1:9"},
                             {"name": "eqms", "kind": "webhook", "url": "http://127.0.0.1:9/h", "secret_env": "X"}],
                  routes=[{"receiver": "am", "continue": True}, {"receiver": "eqms"}], resend_interval="PT1M")
    firing = add_alert(sessions)
    acked = add_alert(sessions, state="acknowledged", acked_by="dr.safety", acked_at=T0)
    add_alert(sessions, state="silenced", silenced_until=T0 + timedelta(hours=1))
    add_alert(sessions, state="resolved", resolved_at=T0)
    assert notify.resend_due(sessions, cfg, T0 + timedelta(seconds=59)) == 0
    assert notify.resend_due(sessions, cfg, T0 + timedelta(minutes=1)) == 2
    assert notify.resend_due(sessions, cfg, T0 + timedelta(minutes=1, seconds=59)) == 0
    assert notify.resend_due(sessions, cfg, T0 + timedelta(minutes=2)) == 2
    with sessions.begin() as s:
        rows = s.scalars(select(OutboxRow).order_by(OutboxRow.id)).all()
        assert [(r.receiver, r.dedupe_key) for r in rows] == [
            ("am", f"{firing.id}:resend:1:1"), ("am", f"{acked.id}:resend:1:1"),
            ("am", f"{firing.id}:resend:1:2"), ("am", f"{acked.id}:resend:1:2")]  # Alertmanager only
        rows[0].delivered_at = T0 + timedelta(minutes=1)
        rows[2].delivered_at = T0 + timedelta(minutes=2)
    assert notify.prune_delivered(sessions, timedelta(days=1), now=T0 + timedelta(days=1, seconds=90)) == 1
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(OutboxRow)) == 3


@pytest.mark.postgres
def test_escalation_resend_and_delivery_on_postgresql(
        fresh_postgres_url: str, webhook: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PostgreSQL paths (ON CONFLICT DO NOTHING, FOR UPDATE SKIP LOCKED) on a real server."""
    monkeypatch.setenv("VIGIL_TEST_HOOK_SECRET", SECRET)
    store.upgrade(fresh_postgres_url)
    factory = store.session_factory(fresh_postgres_url)
    try:
        cfg = routing(receivers=[
            {"name": "am", "kind": "alertmanager", "url": "http://127.0.0.1:9"},
            {"name": "director", "kind": "webhook", "url": webhook.start(), "secret_env": "VIGIL_TEST_HOOK_SECRET"}],
            routes=[{"receiver": "am"}], escalation={"after": "PT30M", "receiver": "director"})
        alert = add_alert(factory)
        with factory.begin() as s:
            assert notify.enqueue(s, s.get(AlertRow, alert.id), "firing", cfg, now=T0) == ["am"]
            assert notify.enqueue(s, s.get(AlertRow, alert.id), "firing", cfg, now=T0) == []
        assert notify.resend_due(factory, cfg, T0 + timedelta(minutes=1)) == 1
        assert notify.escalate_due(factory, cfg, T0 + timedelta(minutes=31)) == 1
        assert notify.escalate_due(factory, cfg, T0 + timedelta(minutes=32)) == 0
        report = notify.deliver_due(factory, cfg, T0 + timedelta(minutes=31))
        assert (report.delivered, report.failed) == (1, 1)  # the escalation; port 9 refuses Alertmanager's firing
        assert [b["event"] for b in webhook.accepted] == ["escalation"]
        with factory() as s:
            assert s.scalar(select(func.count()).select_from(OutboxRow)) == 3
            assert audit.verify(s).ok
    finally:
        factory.kw["bind"].dispose()
