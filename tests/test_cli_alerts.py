"""The CLI twins of the API: `vigil alerts ...` and `vigil tokens ...` on a real SQLite store, and `vigil serve` as a
real uvicorn process on loopback answering a token issued by the CLI."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import typer
from sqlalchemy import select
from typer.testing import CliRunner

from vigil import audit, store
from vigil.cli_alerts import alerts_app, parse_duration
from vigil.cli_serve import mount
from vigil.store import AlertRow, ApiTokenRow, AuditRow

T0 = datetime(2026, 9, 1, 8, 0, tzinfo=UTC)

app = typer.Typer()
app.add_typer(alerts_app, name="alerts")
mount(app)  # `serve` and `tokens`, exactly as the lead mounts them on `vigil`
runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that rich does not elide table cells


def _alert(alert_id: str, **overrides) -> AlertRow:
    values = dict(
        id=alert_id, model="cta-stenosis", model_version="2.1", metric="sensitivity", site="site-a", subgroup="all",
        detector="cusum", state="firing", severity="warning", detected_at=T0, change_estimate=T0 - timedelta(days=9),
        statistic=5.4, threshold=5.0, baseline=0.91, current=0.78, ci_low=0.71, ci_high=0.84, n_baseline=900,
        n_current=140, last_fired_at=T0,
    )
    values.update(overrides)
    return AlertRow(**values)


@pytest.fixture
def url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'vigil.db'}"
    store.upgrade(url)
    sessions = store.session_factory(url)
    now = datetime.now(UTC)
    with sessions() as s, s.begin():
        s.add_all([
            _alert("A-000001"),
            _alert("A-000002", metric="specificity", site="site-b", severity="critical",
                   detected_at=T0 + timedelta(days=1)),
            _alert("A-000003", model="sepsis", state="resolved", resolved_by="dr.lee", resolved_at=T0,
                   detected_at=T0 + timedelta(days=2)),
            _alert("A-000004", state="silenced", silenced_until=now - timedelta(hours=1), silenced_by="dr.lee",
                   silence_reason="old", detected_at=T0 + timedelta(days=3)),
        ])
    sessions.kw["bind"].dispose()
    return url


def run(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def state_of(url: str, alert_id: str) -> str:
    sessions = store.session_factory(url)
    try:
        with sessions() as s:
            return s.get(AlertRow, alert_id).state
    finally:
        sessions.kw["bind"].dispose()


def test_list_filters_with_json(url):
    def listed(*filters: str) -> list[str]:
        return [x["id"] for x in json.loads(run("alerts", "list", "--store", url, "--json", *filters).stdout)]

    assert listed() == ["A-000004", "A-000003", "A-000002", "A-000001"]
    assert listed("--state", "firing") == ["A-000004", "A-000002", "A-000001"]  # A-000004's silence has ended
    assert listed("--state", "resolved") == ["A-000003"]
    assert listed("--site", "site-b") == ["A-000002"]
    assert listed("--metric", "specificity", "--severity", "critical") == ["A-000002"]
    assert listed("--model", "sepsis") == ["A-000003"]
    rows = json.loads(run("alerts", "list", "--store", url, "--json").stdout)
    assert {r["id"]: r["state"] for r in rows}["A-000004"] == "firing"
    bad = run("alerts", "list", "--store", url, "--state", "asleep", code=2)
    assert "firing, acknowledged, resolved, silenced" in bad.output
    table = run("alerts", "list", "--store", url).stdout
    assert "4 alerts" in table and "A-000002" in table and "critical" in table


def test_ack_resolve_and_the_errors_of_a_wrong_transition(url):
    out = run("alerts", "ack", "A-000001", "--by", "dr.lee", "--comment", "looking", "--store", url).stdout
    assert "A-000001: firing → acknowledged by dr.lee" in out
    assert "acknowledged → resolved" in run("alerts", "resolve", "A-000001", "--by", "dr.lee", "--store", url).stdout
    again = run("alerts", "resolve", "A-000001", "--by", "dr.lee", "--store", url, code=2)
    assert "A-000001 is resolved" in again.output and "comment" in again.output
    missing = run("alerts", "ack", "A-999999", "--by", "dr.lee", "--store", url, code=2)
    assert "no alert A-999999" in missing.output
    shown = json.loads(run("alerts", "show", "A-000001", "--store", url, "--json").stdout)
    assert (shown["state"], shown["acked_by"], shown["ack_comment"], shown["resolved_by"]) == (
        "resolved", "dr.lee", "looking", "dr.lee")
    sessions = store.session_factory(url)
    with sessions() as s:
        actions = s.scalars(select(AuditRow.action).order_by(AuditRow.seq)).all()
        assert actions == ["alert.acknowledged", "alert.resolved"]
        assert audit.verify(s).ok
    sessions.kw["bind"].dispose()


def test_silence_for_a_duration_or_until_and_unsilence(url):
    before = datetime.now(UTC)
    out = run("alerts", "silence", "A-000002", "--by", "dr.lee", "--for", "1d12h", "--reason", "recalibration",
              "--store", url).stdout
    assert "A-000002: firing → silenced until" in out
    shown = json.loads(run("alerts", "show", "A-000002", "--store", url, "--json").stdout)
    until = datetime.fromisoformat(shown["silenced_until"])
    assert before + timedelta(hours=36) <= until <= datetime.now(UTC) + timedelta(hours=36)
    assert (shown["state"], shown["silence_reason"]) == ("silenced", "recalibration")

    end = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    run("alerts", "silence", "A-000001", "--by", "dr.lee", "--until", end.isoformat(), "--reason", "x",
        "--store", url)
    assert json.loads(run("alerts", "show", "A-000001", "--store", url, "--json").stdout)["silenced_until"] == \
        end.isoformat()
    for args, needle in ((["--for", "40d"], "30 days"), (["--for", "soon"], "not a duration"),
                         (["--until", "2030-01-01T00:00"], "no time zone"), ([], "exactly one"),
                         (["--until", "2020-01-01T00:00Z"], "not in the future")):
        bad = run("alerts", "silence", "A-000002", "--by", "dr.lee", "--reason", "x", *args, "--store", url, code=2)
        assert needle in bad.output, (args, bad.output)
    assert "silenced → firing" in run("alerts", "unsilence", "A-000002", "--by", "dr.lee", "--store", url).stdout
    assert state_of(url, "A-000002") == "firing"
    expired = run("alerts", "unsilence", "A-000004", "--by", "dr.lee", "--store", url, code=2)
    assert "A-000004 is firing" in expired.output


def test_comment_and_show_with_comments(url):
    assert "A-000003: comment 1 by dr.lee" in run("alerts", "comment", "A-000003", "closed after site visit",
                                                  "--by", "dr.lee", "--store", url).stdout
    shown = json.loads(run("alerts", "show", "A-000003", "--store", url, "--json").stdout)
    assert [(c["author"], c["text"]) for c in shown["comments"]] == [("dr.lee", "closed after site visit")]
    text = run("alerts", "show", "A-000003", "--store", url).stdout
    assert "closed after site visit" in text and "allowed actions" in text
    run("alerts", "comment", "A-000003", "  ", "--by", "dr.lee", "--store", url, code=2)


def test_reading_a_missing_store_is_an_error_not_a_new_store(tmp_path):
    missing = tmp_path / "nope.db"
    for args in (["alerts", "list"], ["alerts", "show", "A-000001"], ["tokens", "list"]):
        result = run(*args, "--store", f"sqlite:///{missing}", code=2)
        assert "no vigil store" in result.output
    assert not missing.exists()


def test_parse_duration():
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("2w3d12h30m") == timedelta(days=17, hours=12, minutes=30)
    for bad in ("", "7", "d7", "7days", "1.5h"):
        with pytest.raises(typer.BadParameter):
            parse_duration(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tokens_cli_and_serve_over_real_http(url):
    """`vigil serve` as a real uvicorn process: a CLI-issued token works until the CLI revokes it."""
    created = json.loads(run("tokens", "create", "dr.lee", "--role", "safety_officer", "--by", "ops",
                             "--store", url, "--json").stdout)
    token = created["token"]
    assert token.startswith("vigil_") and created["role"] == "safety_officer"
    run("tokens", "create", "dr.lee", "--role", "viewer", "--store", url, code=2)  # names are never reused
    bad_role = run("tokens", "create", "x", "--role", "superuser", "--store", url, code=2)
    assert "viewer, safety_officer, engineer, admin" in bad_role.output
    listed = run("tokens", "list", "--store", url, "--json").stdout
    sessions = store.session_factory(url)
    with sessions() as s:
        stored_hash = s.scalar(select(ApiTokenRow.token_hash).where(ApiTokenRow.name == "dr.lee"))
    assert token not in listed and stored_hash not in listed and token != stored_hash
    assert json.loads(listed) == [{"name": "dr.lee", "role": "safety_officer", "created_at": json.loads(listed)[0][
        "created_at"], "revoked_at": None}]

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "import typer; from vigil.cli_serve import mount; app = typer.Typer(); mount(app); "
                               "app()", "serve", "--port", str(port), "--store", url, "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stdout.read().decode()
            assert time.monotonic() < deadline, "vigil serve did not answer /healthz within 30 s"
            time.sleep(0.1)
        auth = {"Authorization": f"Bearer {token}"}
        r = httpx.post(f"{base}/alerts/A-000001/ack", json={"comment": "over HTTP"}, headers=auth)
        assert r.status_code == 200 and r.json()["by"] == "dr.lee"
        assert httpx.get(f"{base}/openapi.json").json()["info"]["title"] == "vigil"

        assert "token dr.lee revoked" in run("tokens", "revoke", "dr.lee", "--by", "ops", "--store", url).stdout
        refused = httpx.get(f"{base}/alerts", headers=auth)
        assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
        again = run("tokens", "revoke", "dr.lee", "--store", url, code=2)
        assert "already revoked" in again.output
    finally:
        server.terminate()
        server.wait(timeout=30)
    with sessions() as s:
        entries = s.execute(select(AuditRow.action, AuditRow.actor).where(AuditRow.entity == "api_token")
                            .order_by(AuditRow.seq)).all()
        assert [tuple(e) for e in entries] == [("token.created", "ops"), ("token.revoked", "ops")]
        assert audit.verify(s).ok
    sessions.kw["bind"].dispose()


def test_cli_transitions_queue_notifications_for_the_configured_receivers(url, tmp_path):
    """With receivers under ``routing:``, `vigil alerts ack|resolve --config` queue their notifications in the same
    transaction (delivered by `vigil serve`); without --config the embedded example routes nowhere."""
    from vigil.store import OutboxRow

    config = tmp_path / "vigil.yaml"
    config.write_text("routing:\n  receivers:\n    - {name: eqms, kind: webhook, url: 'http://127.0.0.1:9/hook', "
                      "secret_env: VIGIL_TEST_SECRET}\n  default_receiver: eqms\n")
    runner.invoke(app, ["alerts", "ack", "A-000001", "--by", "dr.lee", "--store", url, "--config", str(config)],
                  catch_exceptions=False)
    runner.invoke(app, ["alerts", "resolve", "A-000001", "--by", "dr.lee", "--store", url, "--config", str(config)],
                  catch_exceptions=False)
    runner.invoke(app, ["alerts", "ack", "A-000002", "--by", "dr.lee", "--store", url], catch_exceptions=False)
    sessions = store.session_factory(url)
    with sessions() as s:
        queued = [(o.receiver, o.alert_id, o.event) for o in s.scalars(select(OutboxRow).order_by(OutboxRow.id))]
    sessions.kw["bind"].dispose()
    assert queued == [("eqms", "A-000001", "acknowledged"), ("eqms", "A-000001", "resolved")]
