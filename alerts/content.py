"""What a notification says: what changed, where, since when, how much and how sure, and where to look next.

A safety officer must be able to decide from the message alone (issue 6, Content). Every message is built from
``AlertFacts`` — stream, detector and aggregate evidence only — so no subject key, case id, encounter or any other
identifier can reach an email, chat, webhook or Alertmanager (DESIGN.md, Reliability and security). The alert and
ticket numbers ("A-000001", "T-000001") are vigil's own record numbers, not patient data, and are included so the
reader can act on them.

Formats: RFC 5322 email with a plain-text and an HTML part; Prometheus Alertmanager API v2 alert objects
(labels identify, annotations describe, ``endsAt`` resolves; reference/interop.md §6); a versioned JSON webhook body.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from alerts.routing import ALERT_LABELS, Links

ALERTNAME = "VigilModelPerformanceDrift"
"""The ``alertname`` label of every alert vigil sends to Alertmanager."""

WEBHOOK_VERSION = "1"

EVENTS = ("firing", "resend", "acknowledged", "escalation", "resolved")
"""Why a notification is sent: a (re-)fire, a periodic Alertmanager re-send, an acknowledgement, an escalation after
the acknowledgement delay, a resolution."""

_CI_LEVEL = "95%"  # monitors.streams.interval: Wilson for rates, normal for score means


@dataclass(frozen=True, slots=True)
class AlertFacts:
    """The parts of an alert a notification may show: stream, detector, evidence, lifecycle — no identifiers."""

    alert_id: str
    model: str
    model_version: str
    metric: str
    site: str
    subgroup: str
    detector: str
    severity: str
    state: str
    detected_at: datetime
    change_estimate: datetime
    baseline: float
    current: float
    ci_low: float
    ci_high: float
    n_baseline: int
    n_current: int
    statistic: float
    threshold: float
    fire_count: int = 1
    acked_by: str | None = None
    acked_at: datetime | None = None
    resolved_at: datetime | None = None
    ticket_id: str | None = None

    def labels(self) -> dict[str, str]:
        """The routing labels (``alerts.routing.ALERT_LABELS``)."""
        values = asdict(self)
        return {name: str(values[name]) for name in ALERT_LABELS}


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _num(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _where(f: AlertFacts) -> str:
    site = "all sites" if f.site == "all" else f"site {f.site}"
    subgroup = "all patients" if f.subgroup == "all" else f"subgroup {f.subgroup}"
    return f"{site}, {subgroup}"


def _headline(f: AlertFacts, event: str) -> str:
    prefix = {
        "firing": "FIRING" if f.fire_count == 1 else f"FIRING again (x{f.fire_count})",
        "resend": "STILL FIRING",
        "acknowledged": "ACKNOWLEDGED",
        "escalation": "ESCALATED: not acknowledged",
        "resolved": "RESOLVED",
    }.get(event, event.upper())
    return f"[vigil {f.severity}] {prefix}: {f.metric} of {f.model} {f.model_version} at {_where(f)}"


def grafana_link(f: AlertFacts, links: Links) -> str | None:
    """The per-stream dashboard with this stream selected, from a week before the change estimate until now."""
    if links.grafana_url is None:
        return None
    start = f.change_estimate - timedelta(days=7)
    query = urlencode({
        "var-model": f.model, "var-model_version": f.model_version, "var-metric": f.metric,
        "var-site": f.site, "var-subgroup": f.subgroup,
        "from": int(start.timestamp() * 1000), "to": "now",
    })
    return f"{str(links.grafana_url).rstrip('/')}/d/{links.grafana_dashboard}?{query}"


def alert_link(f: AlertFacts, links: Links) -> str | None:
    return f"{str(links.vigil_url).rstrip('/')}/alerts/{f.alert_id}" if links.vigil_url else None


def ticket_link(f: AlertFacts, links: Links) -> str | None:
    if links.vigil_url is None or f.ticket_id is None:
        return None
    return f"{str(links.vigil_url).rstrip('/')}/tickets/{f.ticket_id}"


def facts_table(f: AlertFacts, event: str) -> list[tuple[str, str]]:
    """The message body as (field, value) rows, shared by every format so they cannot disagree."""
    rows = [
        ("What", f"{f.metric} of model {f.model} version {f.model_version}"),
        ("Where", _where(f)),
        ("Since", f"{_when(f.change_estimate)} (estimated change time; detected {_when(f.detected_at)})"),
        ("Current", f"{_num(f.current)} ({_CI_LEVEL} CI {_num(f.ci_low)}-{_num(f.ci_high)}, n={f.n_current:,})"),
        ("Baseline", f"{_num(f.baseline)} (n={f.n_baseline:,})"),
        ("Detector", f"{f.detector} (statistic {_num(f.statistic)}, threshold {_num(f.threshold)})"),
        ("Severity", f.severity),
        ("State", f.state),
        ("Alert", f"{f.alert_id}, fired {f.fire_count} time{'s' if f.fire_count != 1 else ''}"),
    ]
    if f.acked_by and f.acked_at:
        rows.append(("Acknowledged", f"by {f.acked_by} at {_when(f.acked_at)}"))
    if event == "escalation":
        rows.append(("Escalation", "this alert has not been acknowledged within the configured delay"))
    if f.resolved_at:
        rows.append(("Resolved", _when(f.resolved_at)))
    if f.ticket_id:
        rows.append(("Ticket", f.ticket_id))
    return rows


def _link_rows(f: AlertFacts, links: Links) -> list[tuple[str, str]]:
    found = [("Dashboard", grafana_link(f, links)), ("Alert", alert_link(f, links)), ("Ticket", ticket_link(f, links))]
    return [(name, url) for name, url in found if url]


def _next_step(f: AlertFacts, event: str) -> str | None:
    """What the reader should do, for messages that need someone to act."""
    if event in ("firing", "resend", "escalation") and f.state == "firing":
        return (f"Acknowledge it (vigil alerts ack {f.alert_id}, or POST /alerts/{f.alert_id}/ack) once someone owns "
                "it; unacknowledged alerts are escalated.")
    return None


def summary(f: AlertFacts) -> str:
    """One line: what, where, how much, since when."""
    return (f"{f.metric} {_num(f.current)} ({_CI_LEVEL} CI {_num(f.ci_low)}-{_num(f.ci_high)}, n={f.n_current:,}) "
            f"vs baseline {_num(f.baseline)} (n={f.n_baseline:,}) at {_where(f)} since {_when(f.change_estimate)}")


def email_content(f: AlertFacts, event: str, links: Links) -> dict[str, str]:
    """``subject``, ``text`` and ``html`` of the email; the notifier adds the envelope."""
    rows = facts_table(f, event)
    link_rows = _link_rows(f, links)
    width = max(len(name) for name, _ in rows + link_rows)
    action = _next_step(f, event)
    text = "\n".join(
        [_headline(f, event), "", *(f"{name.ljust(width)}  {value}" for name, value in rows), "",
         *(f"{name.ljust(width)}  {url}" for name, url in link_rows), *(["", action] if action else [])]
    )
    cells = "".join(f"<tr><th align='left'>{html.escape(n)}</th><td>{html.escape(v)}</td></tr>" for n, v in rows)
    anchors = " · ".join(f"<a href='{html.escape(url, quote=True)}'>{html.escape(name)}</a>"
                         for name, url in link_rows)
    body = (f"<html><body><h2>{html.escape(_headline(f, event))}</h2><table>{cells}</table>"
            f"<p>{anchors}</p>{f'<p>{html.escape(action)}</p>' if action else ''}</body></html>")
    return {"subject": _headline(f, event), "text": text + "\n", "html": body}


def chat_content(f: AlertFacts, event: str, links: Links) -> dict[str, str]:
    """``title`` and a short markdown-free ``body`` for a chat channel."""
    lines = [summary(f), f"Detector {f.detector}, severity {f.severity}, state {f.state}, alert {f.alert_id}."]
    lines += [f"{name}: {url}" for name, url in _link_rows(f, links)]
    return {"title": _headline(f, event), "body": "\n".join(lines)}


def alertmanager_alert(f: AlertFacts, event: str, links: Links, *, ends_at: datetime | None = None) -> dict[str, Any]:
    """One Alertmanager API v2 alert object.

    Labels are the stable identity (Alertmanager fingerprints the label set, so re-sends update one alert); everything
    that changes between re-sends is an annotation. A resolution sets ``endsAt`` to the resolution time; for an open
    alert the sender fills ``endsAt`` a few re-send intervals ahead at delivery time.
    """
    labels = {"alertname": ALERTNAME, **{k: v for k, v in f.labels().items() if k != "state"}}
    annotations = {
        "summary": summary(f),
        "description": "; ".join(f"{name}: {value}" for name, value in facts_table(f, event)),
        "state": f.state,
        "change_estimate": _rfc3339(f.change_estimate),
        "current": _num(f.current),
        "ci": f"{_num(f.ci_low)}-{_num(f.ci_high)}",
        "n_current": str(f.n_current),
        "baseline": _num(f.baseline),
        "n_baseline": str(f.n_baseline),
        "alert_id": f.alert_id,
    }
    for name, url in _link_rows(f, links):
        annotations[f"{name.lower()}_url"] = url
    body: dict[str, Any] = {"labels": labels, "annotations": annotations, "startsAt": _rfc3339(f.detected_at)}
    if event == "resolved":
        ends_at = f.resolved_at or ends_at
    if ends_at is not None:
        body["endsAt"] = _rfc3339(ends_at)
    generator = alert_link(f, links)
    if generator:
        body["generatorURL"] = generator
    return body


def webhook_body(f: AlertFacts, event: str, links: Links) -> dict[str, Any]:
    """The signed JSON webhook body: a version, the event, the alert's facts and the links."""
    alert = {
        "id": f.alert_id, "model": f.model, "model_version": f.model_version, "metric": f.metric,
        "site": f.site, "subgroup": f.subgroup, "detector": f.detector, "severity": f.severity, "state": f.state,
        "detected_at": _rfc3339(f.detected_at), "change_estimate": _rfc3339(f.change_estimate),
        "baseline": {"value": f.baseline, "n": f.n_baseline},
        "current": {"value": f.current, "n": f.n_current, "ci": [f.ci_low, f.ci_high], "ci_level": 0.95},
        "statistic": f.statistic, "threshold": f.threshold, "fire_count": f.fire_count,
        "acknowledged": {"by": f.acked_by, "at": _rfc3339(f.acked_at)} if f.acked_by and f.acked_at else None,
        "resolved_at": _rfc3339(f.resolved_at) if f.resolved_at else None,
        "ticket_id": f.ticket_id,
    }
    return {"version": WEBHOOK_VERSION, "event": event, "summary": summary(f), "alert": alert,
            "links": {name.lower(): url for name, url in _link_rows(f, links)}}


def render(kind: str, f: AlertFacts, event: str, links: Links) -> dict[str, Any]:
    """The outbox payload for a receiver kind (what the notifier of that kind sends)."""
    if kind == "alertmanager":
        return {"alerts": [alertmanager_alert(f, event, links)]}
    if kind == "email":
        return email_content(f, event, links)
    if kind == "webhook":
        return webhook_body(f, event, links)
    if kind == "chat":
        return chat_content(f, event, links)
    raise ValueError(f"unknown receiver kind {kind!r}; expected alertmanager, email, webhook or chat")
