"""`vigil report` (the surveillance report) and `vigil dashboards push` (upload to a running Grafana).

Mounted by ``vigil.cli``: ``app.command("report")(report)`` and ``dashboards_app.command("push")(dashboards_push)``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated

import orjson
import typer

from vigil.cli_common import JsonOpt, StoreOpt, console, err, existing_store
from vigil.settings import DEFAULT_CONFIG


def _print_json(obj: object) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS,
                                  default=str).decode() + "\n")


def parse_utc(value: str | None, option: str) -> datetime | None:
    """``2026-03-01`` (midnight UTC) or an ISO 8601 timestamp; one without an offset is taken as UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        try:
            day = date.fromisoformat(value)
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not a date (2026-03-01) or ISO 8601 time "
                                     "(2026-03-01T00:00:00Z)", param_hint=option) from None
        parsed = datetime(day.year, day.month, day.day)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def report(
    out: Annotated[Path, typer.Option(help="HTML file to write (self-contained: open it anywhere, offline).")],
    store: StoreOpt = None,
    config: Annotated[Path, typer.Option("--config", "-c", help="Config YAML: labeled claims, and the hash checked "
                                                               "against the runs (default: the embedded example).")
                      ] = DEFAULT_CONFIG,
    model: Annotated[str | None, typer.Option(help="Only this device (model id); default every model.")] = None,
    since: Annotated[str | None, typer.Option(help="Start of the period (UTC date or ISO time, inclusive).")] = None,
    until: Annotated[str | None, typer.Option(help="End of the period (UTC date or ISO time, exclusive).")] = None,
    pdf: Annotated[bool, typer.Option("--pdf", help="Also print FILE.pdf with headless Chromium.")] = False,
    json: JsonOpt = False,
) -> None:
    """Write the periodic surveillance report: summary, control charts, alerts and decisions, tickets, data coverage,
    and how to reproduce every figure."""
    from vigil.report import build_report

    url = existing_store(store)
    start, end = parse_utc(since, "--since"), parse_utc(until, "--until")
    if start and end and start >= end:
        raise typer.BadParameter(f"--since {since} is not before --until {until}", param_hint="--since")
    try:
        info = build_report(url, out, model=model, since=start, until=end, config=config, pdf=pdf)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    except RuntimeError as exc:  # --pdf without Chromium, or Chromium failed: the HTML is there
        err.print(f"[red]error[/]: {exc}")
        raise typer.Exit(1) from None
    if json:
        _print_json({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(info).items()})
        return
    console.print(f"Wrote [bold]{info.path}[/] ({info.bytes / 1e6:.1f} MB, {info.figures} figures, {info.alerts} "
                  f"alerts, {info.tickets} tickets; sha256 {info.sha256[:16]})" + (f" and {info.pdf}" if info.pdf
                                                                                    else ""))
    for note in info.notes:
        err.print(f"[yellow]note[/]: {note}")


def dashboards_push(
    url: Annotated[str, typer.Option(envvar="VIGIL_GRAFANA_URL", help="Grafana base URL.")] = "http://localhost:3000",
    token: Annotated[str | None, typer.Option(envvar="VIGIL_GRAFANA_TOKEN", show_default=False,
                                              help="Service-account token (Editor role); prefer the env variable.")
                     ] = None,
    user: Annotated[str | None, typer.Option(envvar="VIGIL_GRAFANA_USER", help="Basic auth user (if no token).")
                    ] = None,
    password: Annotated[str | None, typer.Option(envvar="VIGIL_GRAFANA_PASSWORD", show_default=False,
                                                 help="Basic auth password.")] = None,
    folder: Annotated[str | None, typer.Option(help="Folder title (uid stays 'vigil').")] = None,
    datasource: Annotated[bool, typer.Option(
        "--datasource", help="Also create/update the PostgreSQL datasource from provisioning/datasources/vigil.yaml "
                             "(needs the VIGIL_GRAFANA_DB_* variables).")] = False,
    json: JsonOpt = False,
) -> None:
    """Upload the dashboards to a running Grafana (stable uids, one folder, overwrite): idempotent."""
    from dashboards.push import FOLDER_TITLE, PushError, provisioned_datasource, push_dashboards

    if token and (user or password):
        raise typer.BadParameter("give a token or --user/--password, not both", param_hint="--token")
    if bool(user) != bool(password):
        raise typer.BadParameter("basic auth needs both --user and --password", param_hint="--user")
    try:
        ds = provisioned_datasource() if datasource else None
        result = push_dashboards(url, token=token, basic_auth=(user, password) if user and password else None,
                                 folder_title=folder or FOLDER_TITLE, datasource=ds)
    except PushError as exc:
        err.print(f"[red]error[/]: {exc}")
        raise typer.Exit(1) from None
    if json:
        _print_json(asdict(result))
        return
    console.print(f"folder {result.folder_uid}: {result.folder}"
                  + (f"; datasource: {result.datasource}" if result.datasource else ""))
    for d in result.dashboards:
        console.print(f"  {d['uid']}: version {d['version']} {d['url'] or ''}")
