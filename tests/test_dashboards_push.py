"""`vigil dashboards push` through grafana-client against a recording stand-in for Grafana's HTTP API.

No Grafana server can run here (no Docker engine, no Grafana package, no internet), so this test serves a real HTTP
server on loopback that implements just enough of the Grafana HTTP API — health, folders, data sources and
``POST /api/dashboards/db`` with Grafana's version/overwrite rules — and RECORDS every call. It is a stand-in, not
Grafana: it checks what vigil sends (paths, bodies, auth, uids, folder, overwrite, idempotence), not how Grafana
renders it (tests/test_dashboards.py validates the dashboard JSON and runs every panel's SQL on PostgreSQL).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from typer.testing import CliRunner

from dashboards.build import build_dashboards
from dashboards.push import FOLDER_TITLE, FOLDER_UID, PushError, provisioned_datasource, push_dashboards

TOKEN = "glsa_test_token_123"


class FakeGrafana:
    """State and call log of the stand-in."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.calls: list[dict[str, Any]] = []
        self.folders: dict[str, dict] = {}
        self.datasources: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}  # uid -> {"dashboard", "folderUid", "version"}
        self.lock = threading.Lock()

    def handle(self, method: str, path: str, body: Any, auth: str | None) -> tuple[int, Any]:
        with self.lock:
            self.calls.append({"method": method, "path": path, "body": body, "auth": auth})
            if auth != f"Bearer {self.token}":
                return 401, {"message": "Unauthorized"}
            return self._route(method, path, body)

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if (method, path) == ("GET", "/api/health"):
            return 200, {"commit": "stand-in", "database": "ok", "version": "11.6.0"}
        if m := re.fullmatch(r"/api/folders/([\w-]+)", path):
            uid = m[1]
            if uid not in self.folders:
                return 404, {"message": "folder not found", "status": "not-found"}
            if method == "GET":
                return 200, self.folders[uid]
            if method == "PUT":
                self.folders[uid].update(title=body["title"], version=self.folders[uid]["version"] + 1)
                return 200, self.folders[uid]
        if (method, path) == ("POST", "/api/folders"):
            if body.get("uid") in self.folders:
                return 409, {"message": "a folder with the same uid already exists"}
            folder = {"uid": body.get("uid"), "title": body["title"], "id": len(self.folders) + 1, "version": 1}
            self.folders[folder["uid"]] = folder
            return 200, folder
        if m := re.fullmatch(r"/api/datasources/uid/([\w-]+)", path):
            uid = m[1]
            if uid not in self.datasources:
                return 404, {"message": "Data source not found"}
            if method == "GET":
                return 200, self.datasources[uid]
            if method == "PUT":
                self.datasources[uid] = body
                return 200, {"message": "Datasource updated", "datasource": body}
        if (method, path) == ("POST", "/api/datasources"):
            if body["uid"] in self.datasources:
                return 409, {"message": "data source with the same uid already exists"}
            self.datasources[body["uid"]] = body
            return 200, {"message": "Datasource added", "datasource": body}
        if (method, path) == ("POST", "/api/dashboards/db"):
            return self._save_dashboard(body)
        return 404, {"message": f"stand-in does not implement {method} {path}"}

    def _save_dashboard(self, body: dict) -> tuple[int, Any]:
        dash = body["dashboard"]
        uid = dash.get("uid")
        if body.get("folderUid") not in self.folders:
            return 400, {"message": "folder not found", "status": "folder-not-found"}
        existing = self.dashboards.get(uid)
        if existing and not body.get("overwrite") and dash.get("version") != existing["version"]:
            return 412, {"message": "The dashboard has been changed by someone else", "status": "version-mismatch"}
        version = existing["version"] + 1 if existing else 1
        self.dashboards[uid] = {"dashboard": dash, "folderUid": body["folderUid"], "version": version}
        return 200, {"id": list(self.dashboards).index(uid) + 1, "uid": uid, "url": f"/d/{uid}/x",
                     "status": "success", "version": version, "slug": "x"}


@pytest.fixture
def grafana():
    fake = FakeGrafana()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            status, reply = fake.handle(self.command, self.path, json.loads(raw) if raw else None,
                                        self.headers.get("Authorization"))
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


DB_ENV = {"VIGIL_GRAFANA_DB_HOST": "postgres:5432", "VIGIL_GRAFANA_DB_USER": "grafana_ro",
          "VIGIL_GRAFANA_DB_NAME": "vigil", "VIGIL_GRAFANA_DB_PASSWORD": "s3cret"}


def test_push_creates_folder_datasource_and_every_dashboard(grafana):
    fake, url = grafana
    boards = build_dashboards()
    result = push_dashboards(url, token=TOKEN, datasource=provisioned_datasource(DB_ENV))
    assert result.folder == "created" and result.datasource == "created"
    assert [(c["method"], c["path"]) for c in fake.calls[:5]] == [
        ("GET", "/api/health"), ("GET", f"/api/folders/{FOLDER_UID}"), ("POST", "/api/folders"),
        ("GET", "/api/datasources/uid/vigil-postgres"), ("POST", "/api/datasources")]
    assert all(c["auth"] == f"Bearer {TOKEN}" for c in fake.calls)
    assert fake.folders[FOLDER_UID]["title"] == FOLDER_TITLE
    ds = fake.datasources["vigil-postgres"]
    assert ds["type"] == "grafana-postgresql-datasource" and ds["url"] == "postgres:5432"
    assert ds["jsonData"]["database"] == "vigil" and ds["secureJsonData"]["password"] == "s3cret"
    saves = [c["body"] for c in fake.calls if c["path"] == "/api/dashboards/db"]
    assert sorted(b["dashboard"]["uid"] for b in saves) == sorted(boards) and len(boards) >= 5
    for body in saves:
        assert body["overwrite"] is True and body["folderUid"] == FOLDER_UID and body["dashboard"]["id"] is None
        sent = {k: v for k, v in body["dashboard"].items() if k != "id"}
        assert sent == {k: v for k, v in boards[body["dashboard"]["uid"]].items() if k != "id"}
    assert {d["uid"]: d["version"] for d in result.dashboards} == {uid: 1 for uid in boards}


def test_second_push_changes_nothing_but_versions(grafana):
    fake, url = grafana
    push_dashboards(url, token=TOKEN)
    before = {uid: (d["dashboard"], d["folderUid"]) for uid, d in fake.dashboards.items()}
    folders_before = json.loads(json.dumps(fake.folders))
    n_calls = len(fake.calls)
    again = push_dashboards(url, token=TOKEN)
    second = fake.calls[n_calls:]
    assert again.folder == "unchanged" and again.datasource is None
    assert not any(c["path"] == "/api/folders" for c in second)  # no second folder
    assert {uid: (d["dashboard"], d["folderUid"]) for uid, d in fake.dashboards.items()} == before
    assert fake.folders == folders_before
    assert {d["uid"]: d["version"] for d in again.dashboards} == {uid: 2 for uid in before}


def test_renamed_folder_is_put_back_and_existing_datasource_updated(grafana):
    fake, url = grafana
    push_dashboards(url, token=TOKEN, datasource=provisioned_datasource(DB_ENV))
    fake.folders[FOLDER_UID]["title"] = "someone renamed it"
    result = push_dashboards(url, token=TOKEN, datasource=provisioned_datasource(
        {**DB_ENV, "VIGIL_GRAFANA_DB_HOST": "db.internal:5432"}))
    assert result.folder == "updated" and fake.folders[FOLDER_UID]["title"] == FOLDER_TITLE
    assert result.datasource == "updated" and fake.datasources["vigil-postgres"]["url"] == "db.internal:5432"
    assert ("PUT", "/api/datasources/uid/vigil-postgres") in [(c["method"], c["path"]) for c in fake.calls]


def test_errors_name_grafana_the_step_and_the_fix(grafana):
    fake, url = grafana
    with pytest.raises(PushError, match=r"refused the credentials \(401\).*VIGIL_GRAFANA_TOKEN"):
        push_dashboards(url, token="wrong")
    assert fake.dashboards == {}
    with pytest.raises(PushError, match="needs the environment variable VIGIL_GRAFANA_DB_PASSWORD"):
        provisioned_datasource({k: v for k, v in DB_ENV.items() if k != "VIGIL_GRAFANA_DB_PASSWORD"})
    with pytest.raises(PushError, match=r"could not be reached.*check --url"):
        push_dashboards("http://127.0.0.1:9", token=TOKEN, timeout=2)


def test_cli_push_reads_the_token_from_the_environment(grafana):
    from vigil.cli_report import dashboards_push
    import typer

    fake, url = grafana
    cli = typer.Typer()
    cli.command("push")(dashboards_push)
    cli.command("noop")(lambda: None)  # a group, so the sub-command name is used as on `vigil dashboards push`
    out = CliRunner().invoke(cli, ["push", "--url", url, "--json"], env={"VIGIL_GRAFANA_TOKEN": TOKEN})
    assert out.exit_code == 0, out.output
    pushed = json.loads(out.stdout)
    assert pushed["folder_uid"] == FOLDER_UID and len(pushed["dashboards"]) == len(build_dashboards())
    assert fake.calls and all(c["auth"] == f"Bearer {TOKEN}" for c in fake.calls)
    bad = CliRunner().invoke(cli, ["push", "--url", url], env={"VIGIL_GRAFANA_TOKEN": "nope"})
    assert bad.exit_code != 0 and "401" in bad.output
