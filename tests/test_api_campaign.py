"""Issue #9 reliability campaign, part "API", at test scale: the campaign of ``scripts/reliability/api.py`` run on a
store seeded by a real simulated pipeline run (SQLite), against the app as `vigil serve` assembles it, in-process.

- Every route the app serves authenticates, or is on the script's public / own-auth allow-list with a reason; the list
  is read from the app (``app.routes``), so a new endpoint is covered without editing anything here.
- Every operation of the OpenAPI spec refuses generated requests with no token, malformed headers, a revoked token
  and an unknown token (401 with a Bearer challenge), and with each role lacking the route's permission (403), the
  permission read from the route's ``require(...)`` and the roles from ``vigil.auth.ROLE_PERMISSIONS``; the store is
  unchanged afterwards. ``tests/test_api_authz.py`` keeps the hand-written matrix; this checks the same rule from the
  code's own declarations on generated requests.
- Schemathesis (4.x Python API, ``schemathesis.openapi.from_asgi``) finds no server error and no response that breaks
  the spec, with an admin token and with a viewer token, positive and negative cases.

Example counts scale with ``VIGIL_SLOW_SCALE`` (CI sets 0.2). No mock: real store, real app, real generated HTTP.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from script_module import load_script
from fastapi import APIRouter, Depends
from fastapi.testclient import TestClient

from vigil import store
from vigil.api import authenticated, require
from vigil.auth import ROLE_PERMISSIONS, Permission

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reliability" / "api.py"
SCALE = float(os.environ.get("VIGIL_SLOW_SCALE", "1"))
FUZZ_EXAMPLES = max(3, round(15 * SCALE))  # per operation, generation mode and role: 3 at CI scale
REFUSAL_EXAMPLES = max(1, round(5 * SCALE))  # generated requests per operation, each sent with 8 + refused-roles creds


campaign = load_script(SCRIPT, "vigil_api_campaign")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Any:
    return campaign.seed_store(tmp_path_factory.mktemp("api-campaign") / "seed")


@pytest.fixture
def app(seeded, tmp_path) -> Iterator[Any]:
    app = campaign.serve_app(seeded.copy(tmp_path))
    yield app
    app.state.sessions.kw["bind"].dispose()


def test_the_seeded_store_holds_pipeline_alerts_in_several_states_and_a_ticket(seeded):
    sessions = store.session_factory(seeded.url)
    with sessions() as s:
        alerts = {a.id: a.state for a in s.query(store.AlertRow)}
        tickets = {t.id: t.category for t in s.query(store.TicketRow)}
    sessions.kw["bind"].dispose()
    assert len(alerts) >= 3 and {"firing", "acknowledged", "silenced"} <= set(alerts.values())
    assert tickets and set(tickets.values()) <= {"C1", "C2", "C2-F", "C3", "C4", "C5"}
    assert set(seeded.tokens) == set(store.ROLES)


def test_every_route_authenticates_or_is_on_a_justified_allow_list(app):
    policies = campaign.route_policies(app)
    assert campaign.unprotected(policies) == []
    assert campaign.stale_allow_list(policies) == []
    served = {(p.method, p.path) for p in policies}
    documented = {(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops}
    assert documented <= served  # every operation of the spec is among the routes the policy saw
    assert ("GET", "/alerts") in served and ("POST", "/fhir/subscription") in served and ("GET", "/metrics") in served
    by_route = {(p.method, p.path): p for p in policies}
    # read from the code, not copied: spot-check the derivation against the declared table
    assert by_route[("GET", "/audit/verify")].allowed_roles == ("admin",)
    assert by_route[("POST", "/alerts/{alert_id}/ack")].refused_roles == ("viewer", "engineer")
    assert by_route[("GET", "/metrics")].permission is Permission.READ_ALERTS
    for p in policies:
        if p.authenticated:
            assert p.permission is not None, f"{p.method} {p.path} authenticates but declares no permission"
            assert set(p.allowed_roles) == {r for r, perms in ROLE_PERMISSIONS.items() if p.permission in perms}


def test_an_unguarded_new_route_is_reported(seeded, tmp_path):
    """The guard can fail: a route added without ``require`` (or with only ``authenticated``) shows up."""
    leak, guarded = APIRouter(), APIRouter()

    @leak.get("/export/cases")
    def export() -> dict[str, str]:
        return {}

    @guarded.get("/whoami")
    def whoami(principal=Depends(authenticated)) -> dict[str, str]:  # noqa: B008
        return {"name": principal.name}

    @guarded.get("/admin-only", dependencies=[Depends(require(Permission.MANAGE_TOKENS))])
    def admin_only() -> dict[str, str]:
        return {}

    url = seeded.copy(tmp_path)
    app = campaign.create_app(url, extra_routers=[leak, guarded])
    policies = {(p.method, p.path): p for p in campaign.route_policies(app)}
    assert campaign.unprotected(list(policies.values())) == ["GET /export/cases"]
    assert policies[("GET", "/whoami")].authenticated and policies[("GET", "/whoami")].permission is None
    assert policies[("GET", "/admin-only")].refused_roles == ("viewer", "safety_officer", "engineer")
    app.state.sessions.kw["bind"].dispose()


def test_public_routes_answer_without_a_token_and_show_no_data(app, tmp_path):
    """A public route answers the same on the seeded store as on an empty one, so it cannot show what is stored."""
    empty_url = f"sqlite:///{tmp_path / 'empty.db'}"
    store.upgrade(empty_url)
    empty = campaign.serve_app(empty_url)
    public = [p.path for p in campaign.route_policies(app) if p.public_reason is not None and p.method == "GET"]
    assert "/healthz" in public and "/openapi.json" in public
    with TestClient(app) as seeded_client, TestClient(empty) as empty_client:
        for path in public:
            r, baseline = seeded_client.get(path), empty_client.get(path)
            assert r.status_code == 200, (path, r.text)
            assert r.content == baseline.content, path
    empty.state.sessions.kw["bind"].dispose()


def test_every_operation_refuses_bad_credentials_and_roles_without_the_permission(seeded, tmp_path):
    report = campaign.check_refusals(seeded, tmp_path, REFUSAL_EXAMPLES)
    assert report.violations == []
    assert report.store_unchanged
    # 19 operations need a credential (all but /healthz); each generated request went out with 8 bad credentials,
    # then with the token of every role lacking the permission
    assert report.operations == 19
    sent = Counter()
    for label, n in report.by_credential.items():  # "X→generator's credential": the case carried its own instead
        sent[label.split("→")[0]] += n
    bad = ["none", "revoked", "unknown"] + [k for k in sent if k.startswith("malformed:")]
    assert len(bad) == 8 and len({sent[k] for k in bad}) == 1, sent  # every request, every bad credential
    assert sent["none"] >= report.operations  # at least one generated request per operation
    assert all(report.by_credential[k] > 0 for k in bad)  # ... and ours really went out, not only generated ones
    assert report.refusals_401 >= 8 * sent["none"]
    assert report.refusals_403 > 0 and report.by_credential["role:viewer"] > 0
    assert report.by_credential["role:engineer"] > 0 and report.by_credential["role:safety_officer"] > 0
    assert sent["role:admin"] > 0  # the webhook refuses every vigil token, admin's too
    assert report.calls == report.refusals_401 + report.refusals_403


def test_the_webhook_refuses_requests_without_its_secret_and_accepts_the_secret(app):
    with TestClient(app) as client:
        assert client.post(campaign.WEBHOOK_PATH, content=b"{}").status_code == 401
        wrong = client.post(campaign.WEBHOOK_PATH, content=b"{}", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "OperationOutcome" in wrong.text
        right = client.post(campaign.WEBHOOK_PATH, content=b"{}", headers={"Authorization": "campaign-secret"})
        assert right.status_code == 400  # past the secret: the body is not a notification, and it says so


def test_a_webhook_without_a_configured_secret_is_refused(seeded, tmp_path):
    app = campaign.serve_app(seeded.copy(tmp_path), webhook_secret=None)
    with TestClient(app) as client:
        r = client.post(campaign.WEBHOOK_PATH, content=b'{"resourceType": "Bundle"}',
                        headers={"Content-Type": "application/fhir+json"})
    app.state.sessions.kw["bind"].dispose()
    assert r.status_code == 401


def test_a_malformed_body_is_refused_for_credentials_before_it_is_parsed(seeded, app):
    """Found by the campaign: FastAPI parses a JSON body before the auth dependency runs, so a broken body was
    answered 422/400 to callers with no token. Now the caller is checked first (``vigil.api._refusal``)."""
    alert = seeded.ids["alert_id"][0]
    broken = {"content-type": "application/json"}
    viewer = {**broken, "Authorization": f"Bearer {seeded.tokens['viewer']}"}
    officer = {**broken, "Authorization": f"Bearer {seeded.tokens['safety_officer']}"}
    with TestClient(app) as client:
        for body in (b"{", b"\xff]"):
            r = client.post(f"/alerts/{alert}/ack", content=body, headers=broken)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer"), (body, r.text)
            r = client.post(f"/alerts/{alert}/ack", content=body,
                            headers={**broken, "Authorization": f"Bearer {seeded.revoked}"})
            assert r.status_code == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]
            assert client.post(f"/alerts/{alert}/ack", content=body, headers=viewer).status_code == 403
        assert client.post(f"/alerts/{alert}/ack", content=b"{", headers=officer).status_code == 422
        assert client.post(f"/alerts/{alert}/ack", content=b"\xff]", headers=officer).status_code == 400
        listed = client.get("/alerts", params={"limit": 1}, headers={"Authorization": viewer["Authorization"]})
        assert listed.status_code == 200 and listed.json()["limit"] == 1


def test_a_huge_offset_is_a_422_not_a_server_error(app, seeded):
    """Found by the campaign: ``offset=2**63`` made SQLite raise OverflowError (a 500). Offsets are now bounded."""
    viewer = {"Authorization": f"Bearer {seeded.tokens['viewer']}"}
    with TestClient(app, raise_server_exceptions=False) as client:
        for path in ("/alerts", "/tickets"):
            r = client.get(path, params={"offset": 2**63}, headers=viewer)
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "offset"], r.text
            edge = client.get(path, params={"offset": 1_000_000_000}, headers=viewer)
            assert edge.status_code == 200 and edge.json()["items"] == []


@pytest.mark.parametrize("role", campaign.FUZZ_ROLES)
def test_schemathesis_finds_no_server_error_and_no_spec_violation(seeded, tmp_path, role):
    report = campaign.fuzz(seeded, role, tmp_path, FUZZ_EXAMPLES)
    assert [(f.operation, f.mode, f.failure) for f in report.failures] == []
    assert report.server_errors == 0
    assert len({r.operation for r in report.results}) == 20  # every operation of the spec, both modes
    assert report.calls >= 20 * 2 * FUZZ_EXAMPLES // 2
    statuses = sum((r.statuses for r in report.results), start=Counter())
    assert statuses[200] > 0 and statuses[422] > 0 and statuses[404] > 0  # reached handlers, validation, misses
    if role == "viewer":
        assert statuses[403] > 0 and not any(200 <= s < 300 for r in report.results if r.operation.startswith("POST")
                                             and "subscription" not in r.operation for s in r.statuses)
    else:
        assert statuses[409] > 0 or statuses[201] > 0  # admin's writes reached the lifecycle
