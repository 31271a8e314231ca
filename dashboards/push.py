"""`vigil dashboards push`: upload the built dashboards to a running Grafana through its HTTP API (grafana-client).

File provisioning (``provisioning/``) is the default delivery; push is for a Grafana that is already running and not
provisioned from this repository. It is idempotent: the folder and every dashboard have stable uids, dashboards are
saved with ``overwrite: true``, so a second push changes nothing but Grafana's version counters.
Grafana HTTP API: https://grafana.com/docs/grafana/latest/developers/http_api/ (folder, dashboard, data source).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import yaml
from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaUnauthorizedError

from dashboards.build import build_dashboards
from vigil import __version__

PROVISIONING = Path(__file__).resolve().parent / "provisioning"
FOLDER_UID = "vigil"  # the same folder as provisioning/dashboards/vigil.yaml
FOLDER_TITLE = "vigil · post-market monitoring"
_DATASOURCE_KEYS = ("name", "uid", "type", "access", "url", "user", "isDefault", "jsonData", "secureJsonData")


class PushError(RuntimeError):
    """A push that could not be completed; the message says where and what to do."""


@dataclass(slots=True)
class PushResult:
    url: str
    folder_uid: str
    folder: str  # created | updated | unchanged
    datasource: str | None  # created | updated | None (not asked)
    dashboards: list[dict[str, Any]] = field(default_factory=list)  # uid, version, url, status per dashboard


def provisioned_datasource(env: Mapping[str, str] | None = None,
                           path: Path = PROVISIONING / "datasources" / "vigil.yaml") -> dict[str, Any]:
    """The datasource exactly as provisioning defines it, with its ``${VIGIL_GRAFANA_DB_*}`` variables filled from
    ``env`` (default: the environment), as a body for Grafana's data source API."""
    env = os.environ if env is None else env
    try:
        text = Template(path.read_text(encoding="utf-8")).substitute(env)
    except KeyError as exc:
        raise PushError(f"{path} needs the environment variable {exc.args[0]} (set it to the value Grafana should "
                        "use to reach vigil's PostgreSQL), or push without --datasource") from None
    [source] = yaml.safe_load(text)["datasources"]
    return {k: source[k] for k in _DATASOURCE_KEYS if k in source}


def push_dashboards(url: str, token: str | None = None, basic_auth: tuple[str, str] | None = None,
                    folder_title: str = FOLDER_TITLE, boards: Mapping[str, dict[str, Any]] | None = None, *,
                    folder_uid: str = FOLDER_UID, datasource: Mapping[str, Any] | None = None,
                    timeout: float = 10.0) -> PushResult:
    """Ensure the folder, optionally create or update the datasource, and save every dashboard into the folder.

    ``token`` (a service-account token, sent as Bearer) is preferred over ``basic_auth``; ``boards`` defaults to
    ``build_dashboards()`` (uid → JSON model).
    """
    if token and basic_auth:
        raise PushError("give either a token or basic auth, not both")
    boards = build_dashboards() if boards is None else boards
    api = GrafanaApi.from_url(url, credential=token or basic_auth, timeout=timeout)
    result = PushResult(url=url, folder_uid=folder_uid, folder="unchanged", datasource=None)
    with _explained(url, "GET /api/health"):
        api.client.GET("/health")
    with _explained(url, f"folder {folder_uid}"):
        result.folder = _ensure_folder(api, folder_uid, folder_title)
    if datasource is not None:
        with _explained(url, f"datasource {datasource.get('uid')}"):
            result.datasource = _ensure_datasource(api, dict(datasource))
    for uid, model in sorted(boards.items()):
        if model.get("uid", uid) != uid:
            raise PushError(f"dashboard keyed {uid!r} carries uid {model.get('uid')!r}: uids must match")
        body = {"dashboard": {**model, "uid": uid, "id": None}, "folderUid": folder_uid, "overwrite": True,
                "message": f"vigil {__version__}: vigil dashboards push"}
        with _explained(url, f"dashboard {uid}"):
            saved = api.dashboard.update_dashboard(body)
        result.dashboards.append({"uid": uid, "title": model.get("title"), "version": saved.get("version"),
                                  "url": saved.get("url"), "status": saved.get("status")})
    return result


def _ensure_folder(api: GrafanaApi, uid: str, title: str) -> str:
    try:
        folder = api.folder.get_folder(uid)
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
        api.folder.create_folder(title, uid=uid)
        return "created"
    if folder.get("title") != title:
        api.folder.update_folder(uid, title=title, overwrite=True)
        return "updated"
    return "unchanged"


def _ensure_datasource(api: GrafanaApi, body: dict[str, Any]) -> str:
    uid = body.get("uid")
    if not uid:
        raise PushError("the datasource needs a fixed uid: every panel references it by uid")
    try:
        api.datasource.get_datasource_by_uid(uid)
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
        api.datasource.create_datasource(body)
        return "created"
    api.datasource.update_datasource_by_uid(uid, body)
    return "updated"


class _explained:
    """Turn grafana-client and connection errors into a PushError that names the Grafana, the step and the fix."""

    def __init__(self, url: str, step: str) -> None:
        self.url, self.step = url, step

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: Any) -> bool:
        if exc is None or isinstance(exc, PushError):
            return False
        where = f"Grafana at {_safe(self.url)} ({self.step})"
        if isinstance(exc, GrafanaUnauthorizedError):
            raise PushError(f"{where} refused the credentials (401): set VIGIL_GRAFANA_TOKEN to a service-account "
                            "token with the Editor role, or pass --token") from None
        if isinstance(exc, GrafanaException):
            status = getattr(exc, "status_code", None)
            hint = " (the token's role may not allow it: Editor is needed)" if status == 403 else ""
            raise PushError(f"{where} answered {status}: {exc.message}{hint}") from None
        if isinstance(exc, OSError | ConnectionError) or "connect" in type(exc).__name__.lower():
            raise PushError(f"{where} could not be reached: {exc}; check --url and that Grafana is running") from None
        return False


def _safe(url: str) -> str:
    """The URL without any password in it."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
