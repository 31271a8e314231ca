"""What the surveillance report shows, read from the store: one ``DeviceData`` per model version.

Only aggregate, non-identifying columns are selected. Subject keys, prediction (case) ids and encounter ids are never
read, so they cannot reach the report; dead letters are shown by reason *category* (the raw reason names a resource id).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from ingest.load import reason_category
from vigil import audit
from vigil.domain import ALL
from vigil.store import (
    ALERT_STATES,
    PCCP_CATEGORIES,
    SEVERITIES,
    AlertCommentRow,
    AlertRow,
    AuditRow,
    CaseRow,
    DeadLetterRow,
    MetricPointRow,
    RunRow,
    StreamStateRow,
    TicketRow,
)

StreamKey = tuple[str, str, str, str, str]  # model, version, metric, site, subgroup

#: Claims are stated as sensitivity/specificity; the monitored metrics are their complements (error rates).
CLAIM_COMPLEMENTS = {"fnr": "sensitivity", "fpr": "specificity"}


@dataclass(slots=True)
class Window:
    """The report period; ``None`` ends are open."""

    since: datetime | None = None
    until: datetime | None = None

    def clause(self, column: Any) -> list[Any]:
        out = []
        if self.since is not None:
            out.append(column >= self.since)
        if self.until is not None:
            out.append(column < self.until)
        return out


@dataclass(slots=True)
class Series:
    """One stream's daily points (MetricPointRow) in the window."""

    key: StreamKey
    days: list[datetime] = field(default_factory=list)
    n: list[int] = field(default_factory=list)
    value: list[float | None] = field(default_factory=list)
    ci_low: list[float | None] = field(default_factory=list)
    ci_high: list[float | None] = field(default_factory=list)
    statistic: list[float | None] = field(default_factory=list)
    threshold: list[float | None] = field(default_factory=list)


@dataclass(slots=True)
class Decision:
    """One human or system action on an alert or ticket, from the audit log or the comment table."""

    at: datetime
    actor: str
    action: str
    entity_id: str
    comment: str | None


@dataclass(slots=True)
class DeviceData:
    model: str
    version: str
    first_day: datetime | None
    last_day: datetime | None
    sites: list[str]
    cases_by_site: list[tuple[str, int, int]]  # site, predictions, labeled
    labels: dict[str, int]
    streams_by_status: dict[str, int]
    subgroup_streams: list[tuple[str, str, int]]  # metric, status, count (subgroup != all)
    alerts: list[AlertRow]
    alerts_matrix: dict[tuple[str, str], int]  # (state, severity) -> count
    tickets: list[TicketRow]
    tickets_by_category: dict[str, int]
    decisions: list[Decision]
    alerted: dict[StreamKey, list[AlertRow]]
    series: dict[StreamKey, Series]  # alerted streams and every site-level (subgroup "all") stream
    unmapped_by_site: list[tuple[str, int, float]]  # site, outcome facts, share unmapped
    claims: dict[str, float]


@dataclass(slots=True)
class StoreData:
    devices: list[DeviceData]
    runs: list[RunRow]
    dead_letters: list[tuple[str, str, int]]  # reason category, resource type, count
    accepted: dict[str, int]
    rejected: dict[str, int]
    stripped: dict[str, int]
    audit_ok: bool
    audit_checked: int
    audit_head: str | None
    audit_problem: str | None


def available_models(session: Session) -> list[tuple[str, str]]:
    """(model, version) pairs with anything to report: streams, daily points, cases or alerts."""
    found: set[tuple[str, str]] = set()
    for row in (StreamStateRow, MetricPointRow, CaseRow, AlertRow):
        found |= set(session.execute(select(row.model, row.model_version).distinct()).all())
    return sorted((str(m), str(v)) for m, v in found)


def load(session: Session, models: list[tuple[str, str]], window: Window,
         claims_for: dict[str, dict[str, float]]) -> StoreData:
    """Everything the report shows for ``models``, restricted to ``window``."""
    devices = [_device(session, m, v, window, claims_for.get(m, {})) for m, v in models]
    letters: Counter[tuple[str, str]] = Counter()
    for reason, rtype, n in session.execute(
            select(DeadLetterRow.reason, DeadLetterRow.resource_type, func.count()).group_by(
                DeadLetterRow.reason, DeadLetterRow.resource_type)):
        letters[(reason_category(reason), rtype or "-")] += n
    runs = list(session.scalars(select(RunRow).order_by(RunRow.started_at, RunRow.id)))
    accepted: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    stripped: Counter[str] = Counter()
    for run in runs:
        accepted.update(run.counts.get("accepted", {}))
        rejected.update(run.counts.get("rejected", {}))
        stripped.update(run.counts.get("stripped", {}))
    verified = audit.verify(session)
    return StoreData(
        devices=devices, runs=runs,
        dead_letters=[(reason, rtype, n) for (reason, rtype), n in sorted(letters.items(), key=lambda x: -x[1])],
        accepted=dict(sorted(accepted.items())), rejected=dict(sorted(rejected.items())),
        stripped=dict(sorted(stripped.items())), audit_ok=verified.ok, audit_checked=verified.checked,
        audit_head=verified.head_hash, audit_problem=verified.reason,
    )


def _device(session: Session, model: str, version: str, window: Window, claims: dict[str, float]) -> DeviceData:
    mp = MetricPointRow
    of_device = [mp.model == model, mp.model_version == version, *window.clause(mp.period_start)]
    first_day, last_day = session.execute(select(func.min(mp.period_start), func.max(mp.period_start))
                                          .where(*of_device)).one()
    c = CaseRow
    of_cases = [c.model == model, c.model_version == version, *window.clause(c.predicted_at)]
    cases_by_site = [(site or "(none)", int(n), int(labeled or 0)) for site, n, labeled in session.execute(
        select(c.site, func.count(), func.count(c.label)).where(*of_cases).group_by(c.site).order_by(c.site))]
    labels = {label or "pending": int(n) for label, n in session.execute(
        select(c.label, func.count()).where(*of_cases).group_by(c.label))}
    st = StreamStateRow
    of_streams = [st.model == model, st.model_version == version]
    streams_by_status = {status: int(n) for status, n in session.execute(
        select(st.status, func.count()).where(*of_streams).group_by(st.status))}
    subgroup_streams = [(metric, status, int(n)) for metric, status, n in session.execute(
        select(st.metric, st.status, func.count()).where(*of_streams, st.subgroup != ALL)
        .group_by(st.metric, st.status).order_by(st.metric, st.status))]
    a = AlertRow
    alerts = list(session.scalars(select(a).where(a.model == model, a.model_version == version,
                                                  *window.clause(a.detected_at)).order_by(a.detected_at, a.id)))
    matrix = {(s, sev): 0 for s in ALERT_STATES for sev in SEVERITIES}
    for row in alerts:
        matrix[(row.state, row.severity)] = matrix.get((row.state, row.severity), 0) + 1
    ticket_ids = {row.ticket_id for row in alerts if row.ticket_id}
    if window.since is None and window.until is None:
        which = [TicketRow.model == model, TicketRow.model_version == version]
    else:
        which = [TicketRow.id.in_(ticket_ids)]
    tickets = list(session.scalars(select(TicketRow).where(*which).options(selectinload(TicketRow.alerts))
                                   .order_by(TicketRow.id)))
    by_category = {cat: 0 for cat in PCCP_CATEGORIES}
    for t in tickets:
        by_category[t.category] = by_category.get(t.category, 0) + 1
    alerted: dict[StreamKey, list[AlertRow]] = defaultdict(list)
    for row in alerts:
        alerted[(row.model, row.model_version, row.metric, row.site, row.subgroup)].append(row)
    series = _series(session, model, version, window, set(alerted))
    return DeviceData(
        model=model, version=version, first_day=first_day, last_day=last_day,
        sites=sorted({site for site, _, _ in cases_by_site}), cases_by_site=cases_by_site, labels=labels,
        streams_by_status=streams_by_status, subgroup_streams=subgroup_streams, alerts=alerts, alerts_matrix=matrix,
        tickets=tickets, tickets_by_category=by_category,
        decisions=_decisions(session, [r.id for r in alerts], [t.id for t in tickets]),
        alerted=dict(alerted), series=series, unmapped_by_site=_unmapped(series), claims=claims,
    )


def _series(session: Session, model: str, version: str, window: Window, alerted: set[StreamKey]) -> dict[
        StreamKey, Series]:
    """Daily points of every site-level stream (subgroup "all") and of every alerted stream."""
    mp = MetricPointRow
    wanted_subgroups = {ALL} | {key[4] for key in alerted}
    rows = session.execute(
        select(mp.metric, mp.site, mp.subgroup, mp.period_start, mp.n, mp.value, mp.ci_low, mp.ci_high,
               mp.statistic, mp.threshold)
        .where(mp.model == model, mp.model_version == version, mp.subgroup.in_(wanted_subgroups),
               *window.clause(mp.period_start))
        .order_by(mp.metric, mp.site, mp.subgroup, mp.period_start))
    out: dict[StreamKey, Series] = {}
    for metric, site, subgroup, day, n, value, lo, hi, stat, thr in rows:
        key = (model, version, metric, site, subgroup)
        if subgroup != ALL and key not in alerted:
            continue
        s = out.get(key)
        if s is None:
            s = out[key] = Series(key)
        s.days.append(day)
        s.n.append(n)
        s.value.append(value)
        s.ci_low.append(lo)
        s.ci_high.append(hi)
        s.statistic.append(stat)
        s.threshold.append(thr)
    return out


def _unmapped(series: dict[StreamKey, Series]) -> list[tuple[str, int, float]]:
    """Per site: outcome facts seen and the share whose local code no ConceptMap maps (the unmapped_rate metric)."""
    out = []
    for (_, _, metric, site, subgroup), s in sorted(series.items()):
        if metric != "unmapped_rate" or subgroup != ALL:
            continue
        total = sum(s.n)
        unmapped = sum(n * (v or 0.0) for n, v in zip(s.n, s.value, strict=True))
        out.append((site, total, unmapped / total if total else 0.0))
    return out


def _decisions(session: Session, alert_ids: list[str], ticket_ids: list[str]) -> list[Decision]:
    """Every audited action on these alerts and tickets except the pipeline's own firing, plus the comments."""
    out: list[Decision] = []
    for entity, ids in (("alert", alert_ids), ("ticket", ticket_ids)):
        for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = ids[start:start + 500]
            for row in session.scalars(select(AuditRow).where(AuditRow.entity == entity,
                                                              AuditRow.entity_id.in_(chunk))):
                payload = row.payload or {}
                comment = payload.get("comment") or payload.get("reason")
                out.append(Decision(row.at, row.actor, row.action, row.entity_id,
                                    str(comment) if comment is not None else None))
    for start in range(0, len(alert_ids), 500):
        chunk = alert_ids[start:start + 500]
        for row in session.scalars(select(AlertCommentRow).where(AlertCommentRow.alert_id.in_(chunk))):
            out.append(Decision(row.at, row.author, "alert.comment", row.alert_id, row.text))
    return sorted(out, key=lambda d: (d.at, d.entity_id, d.action))


def claim_lines(claims: dict[str, float]) -> dict[str, float]:
    """The labeled-claim value on each monitored metric's scale: fnr = 1 - sensitivity, fpr = 1 - specificity."""
    out = {metric: 1.0 - claims[claim] for metric, claim in CLAIM_COMPLEMENTS.items() if claim in claims}
    out.update({metric: value for metric, value in claims.items() if metric not in CLAIM_COMPLEMENTS.values()})
    return out
