"""`vigil alerts list|show|ack|resolve|silence|unsilence|comment`: the CLI twin of the API's alert endpoints.

Both go through ``vigil.alert_actions`` (same transitions, same audit entries). ``--by`` names the person acting; it is
recorded on the alert and in the audit log. States shown are effective states: an expired silence reads as firing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy.orm import Session

from vigil import alert_actions, notify
from vigil.cli_common import ConfigOpt, JsonOpt, StoreOpt, console, existing_store, print_json
from vigil.settings import DEFAULT_CONFIG, load_settings
from vigil.store import ALERT_STATES, SEVERITIES, AlertCommentRow, AlertRow, session_factory, upgrade, utcnow

alerts_app = typer.Typer(help="Drift alerts: list, show, acknowledge, resolve, silence, comment.",
                         no_args_is_help=True)

ByOpt = Annotated[str, typer.Option("--by", help="Who acts (recorded on the alert and in the audit log).")]
AlertIdArg = Annotated[str, typer.Argument(metavar="ALERT_ID", help="Alert id, e.g. A-000001.")]

_DURATION = re.compile(r"(?P<n>\d+)(?P<unit>[mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@contextmanager
def _session(store: str | None, *, write: bool) -> Iterator[Session]:
    """A session on the existing store (migrated first); one transaction when writing. Action errors become a clear
    usage error naming the alert."""
    url = existing_store(store)
    upgrade(url)
    sessions = session_factory(url)
    try:
        with sessions() as s:
            if write:
                with s.begin():
                    yield s
            else:
                yield s
    except alert_actions.AlertNotFound as exc:
        raise typer.BadParameter(f"{exc} [store {url}]", param_hint="ALERT_ID") from None
    except alert_actions.InvalidTransition as exc:
        raise typer.BadParameter(str(exc), param_hint="ALERT_ID") from None
    except alert_actions.InvalidInput as exc:
        raise typer.BadParameter(str(exc)) from None
    finally:
        sessions.kw["bind"].dispose()


def alert_dict(a: AlertRow, now: datetime) -> dict[str, Any]:
    """Every column (datetimes as ISO 8601), with ``state`` the effective state."""
    d = {c.key: (v.isoformat() if isinstance(v := getattr(a, c.key), datetime) else v)
         for c in AlertRow.__table__.columns}
    d["state"] = alert_actions.effective_state(a, now)
    return d


def _comment_dict(c: AlertCommentRow) -> dict[str, Any]:
    return {"id": c.id, "author": c.author, "at": c.at.isoformat(), "text": c.text}


def parse_duration(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``2w`` or combinations (``1d12h``) → a timedelta."""
    parts = list(_DURATION.finditer(text))
    if not text or "".join(p.group(0) for p in parts) != text:
        raise typer.BadParameter(f"{text!r} is not a duration: use a number and a unit m, h, d or w, e.g. 7d, 12h, "
                                 "1d12h", param_hint="--for")
    return sum((timedelta(**{_UNITS[p["unit"]]: int(p["n"])}) for p in parts), timedelta())


def _parse_until(text: str) -> datetime:
    try:
        until = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time; e.g. 2026-12-06T08:00:00Z",
                                 param_hint="--until") from None
    if until.tzinfo is None:
        raise typer.BadParameter(f"{text!r} has no time zone; add one (Z for UTC, or +01:00)", param_hint="--until")
    return until.astimezone(UTC)


@alerts_app.command("list")
def alerts_list(
    store: StoreOpt = None,
    state: Annotated[str | None, typer.Option(help="firing | acknowledged | resolved | silenced")] = None,
    site: str | None = None,
    metric: str | None = None,
    model: str | None = None,
    severity: Annotated[str | None, typer.Option(help="warning | critical")] = None,
    json: JsonOpt = False,
) -> None:
    """List alerts, newest first (``--state firing`` includes alerts whose silence has ended)."""
    for option, value, vocabulary in (("--state", state, ALERT_STATES), ("--severity", severity, SEVERITIES)):
        if value is not None and value not in vocabulary:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(vocabulary)}", param_hint=option)
    now = utcnow()
    with _session(store, write=False) as s:
        rows = s.scalars(alert_actions.query(state=state, site=site, metric=metric, model=model, severity=severity,
                                             now=now)).all()
        data = [alert_dict(a, now) for a in rows]
    if json:
        print_json(data)
        return
    table = Table(title=f"{len(data)} alerts")
    for col in ("id", "state", "severity", "model", "metric", "site", "subgroup", "detected", "since", "baseline",
                "current (95% CI)", "ticket"):
        table.add_column(col)
    for a in data:
        table.add_row(a["id"], a["state"], a["severity"], f"{a['model']}@{a['model_version']}", a["metric"], a["site"],
                      a["subgroup"], a["detected_at"][:10], a["change_estimate"][:10], f"{a['baseline']:.3f}",
                      f"{a['current']:.3f} ({a['ci_low']:.3f}-{a['ci_high']:.3f})", a["ticket_id"] or "-")
    console.print(table)


@alerts_app.command("show")
def alerts_show(alert_id: AlertIdArg, store: StoreOpt = None, json: JsonOpt = False) -> None:
    """Everything about one alert: what, where, since when, how much, its lifecycle and comments."""
    now = utcnow()
    with _session(store, write=False) as s:
        d = alert_dict(alert_actions.get(s, alert_id), now)
        d["comments"] = [_comment_dict(c) for c in alert_actions.comments(s, alert_id)]
    if json:
        print_json(d)
        return
    notes = d.pop("comments")
    for k, v in d.items():
        console.print(f"[bold]{k:>16}[/] {v}")
    console.print(f"[bold]{'allowed actions':>16}[/] {', '.join(alert_actions.allowed_actions(d['state']))}")
    for c in notes:
        console.print(f"[bold]{'comment':>16}[/] {c['at'][:19]} {c['author']}: {c['text']}")


def _report(t: alert_actions.Transition) -> None:
    console.print(f"{t.alert.id}: {t.from_state} → {t.to_state} by {t.by}")


@contextmanager
def _notifying(config: Path) -> Iterator[None]:
    """Queue the transition's notifications (to the receivers under ``routing:`` in ``config``) in its transaction;
    `vigil serve` delivers them."""
    routing = load_settings(config).routing
    stop = notify.notify_on_transitions(routing) if routing.receivers else None
    try:
        yield
    finally:
        if stop is not None:
            stop()


@alerts_app.command("ack")
def alerts_ack(alert_id: AlertIdArg, by: ByOpt, comment: str | None = None, store: StoreOpt = None,
               config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Acknowledge a firing (or silenced) alert."""
    with _notifying(config), _session(store, write=True) as s:
        t = alert_actions.acknowledge(s, alert_id, by, comment, context={"via": "cli"})
    _report(t)


@alerts_app.command("resolve")
def alerts_resolve(alert_id: AlertIdArg, by: ByOpt, comment: str | None = None, store: StoreOpt = None,
                   config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Resolve an alert (firing, acknowledged or silenced)."""
    with _notifying(config), _session(store, write=True) as s:
        t = alert_actions.resolve(s, alert_id, by, comment, context={"via": "cli"})
    _report(t)


@alerts_app.command("silence")
def alerts_silence(
    alert_id: AlertIdArg,
    by: ByOpt,
    reason: Annotated[str, typer.Option(help="Why it is muted (recorded).")],
    until: Annotated[str | None, typer.Option(help="End, ISO 8601 with zone, e.g. 2026-12-06T08:00:00Z.")] = None,
    for_: Annotated[str | None, typer.Option("--for", help="Length instead of --until: 30m, 12h, 7d, 2w.")] = None,
    store: StoreOpt = None,
) -> None:
    """Mute an alert for a while (at most 30 days); when the silence ends it is firing again."""
    if (until is None) == (for_ is None):
        raise typer.BadParameter("give exactly one of --until or --for", param_hint="--until / --for")
    now = utcnow()
    end = _parse_until(until) if until is not None else now + parse_duration(for_ or "")
    with _session(store, write=True) as s:
        t = alert_actions.silence(s, alert_id, by, end, reason, context={"via": "cli"}, now=now)
    console.print(f"{t.alert.id}: {t.from_state} → silenced until {end.isoformat(timespec='minutes')} by {t.by}")


@alerts_app.command("unsilence")
def alerts_unsilence(alert_id: AlertIdArg, by: ByOpt, store: StoreOpt = None) -> None:
    """End a silence early: the alert is firing again."""
    with _session(store, write=True) as s:
        t = alert_actions.unsilence(s, alert_id, by, context={"via": "cli"})
    _report(t)


@alerts_app.command("comment")
def alerts_comment(
    alert_id: AlertIdArg,
    text: Annotated[str, typer.Argument(help="The note.")],
    by: ByOpt,
    store: StoreOpt = None,
) -> None:
    """Add a note to an alert's history (any state)."""
    with _session(store, write=True) as s:
        row = alert_actions.comment(s, alert_id, by, text, context={"via": "cli"})
        cid = row.id
    console.print(f"{alert_id}: comment {cid} by {by}")
