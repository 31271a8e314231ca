"""Write one pipeline run into the store, in one transaction, with its audit trail.

Cases, stream checkpoints, daily metric points, dead letters, alerts and tickets land together with the run record,
so a crash leaves either the whole run or none of it. Every alert and ticket (with its classification) is also
appended to the hash-chained audit log.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from sqlalchemy import delete, insert, select, tuple_, update
from sqlalchemy.orm import Session

from alerts.lifecycle import identity
from monitors.streams import RISK_METRICS, Stream, interval, oe_interval
from alerts.routing import RoutingConfig
from vigil import __version__, audit, notify, ticket_actions
from vigil.alert_actions import OPEN_STATES
from vigil.domain import ALL, AlertState
from vigil.performance import WINDOW_METRICS, compute_window_metrics
from vigil.pipeline import RunResult
from vigil.settings import Settings
from vigil.store import (
    AlertRow,
    CaseRow,
    DeadLetterRow,
    MetricPointRow,
    RunRow,
    StreamStateRow,
    TicketRow,
    engine_for,
    next_id,
    upgrade,
)

ACTOR = "vigil-pipeline"


def persist(result: RunResult, settings: Settings, inputs: list[str], started_at: datetime) -> dict[str, str]:
    """Store a one-shot run; returns the mapping from the run's provisional alert and ticket keys to the stored ids."""
    upgrade(settings.store_url)
    engine = engine_for(settings.store_url)
    try:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            record_config(session, settings)
            ids = store_results(session, result, settings.routing, incremental=False)
            compute_window_metrics(session, settings)  # after store_results: it rewrites the daily points
            record_run(session, RunRow(started_at=started_at, config_hash=settings.config_hash(),
                                       code_version=__version__, inputs=inputs), result)
    finally:
        engine.dispose()  # no open handles on the store file once the run is stored
    return ids


def store_results(session: Session, result: RunResult, routing: RoutingConfig,
                  incremental: bool = True) -> dict[str, str]:
    """Write the pipeline's results in the caller's transaction; returns provisional alert/ticket keys → stored ids.

    ``incremental`` (the service): only what changed since the last call is written, and the result remembers what
    it stored — call ``result.mark_stored()`` once the transaction commits. Otherwise (one-shot runs) everything is
    written and nothing is remembered, so the same result can be stored into several stores.
    """
    _cases(session, result)
    _streams(session, result, incremental)
    if result.dead_letters:
        session.execute(insert(DeadLetterRow), [_row(DeadLetterRow.from_dead_letter(d)) for d in result.dead_letters])
    ids = _alerts(session, result, routing, incremental)
    ids.update(_tickets(session, result, ids))
    return ids


def record_config(session: Session, settings: Settings) -> bool:
    """Audit a configuration change: when this run's config hash differs from the last run's, the effective analysis
    configuration (models, outcomes, subgroups, monitors, maps — no secrets, no source credentials) is appended to the
    audit log, so an inspector can see what changed and from when. Returns whether it was recorded."""
    now = settings.config_hash()
    last = session.scalar(select(RunRow.config_hash).order_by(RunRow.id.desc()).limit(1))
    if last == now:
        return False
    effective = settings.model_dump(mode="json", exclude={"subject_key", "sources", "routing", "store_url",
                                                          "config_path"})
    audit.record(session, ACTOR, "config.changed", "config", now, {
        "previous": last, "config_path": str(settings.config_path) if settings.config_path else None,
        "analysis_hash": settings.analysis_hash(), "effective": effective,
        "sources": [{"kind": s.kind, "name": getattr(s, "name", None)} for s in settings.sources],
        "receivers": [r.name for r in settings.routing.receivers],
    })
    return True


def record_run(session: Session, run: RunRow, result: RunResult, final: bool = True) -> RunRow:
    """Add or update the run record with the counts so far; the audit log gets one entry when the run completes."""
    run.counts = {
        "accepted": dict(result.accepted), "rejected": dict(result.rejected), "ignored": dict(result.ignored),
        "duplicates": dict(result.duplicates), "stripped": dict(result.stripped),
        "corrections": dict(result.corrections), "cases": result.case_count, "alerts": len(result.alerts.alerts),
        "tickets": len(result.tickets),
    }
    run.finished_at = datetime.now(UTC) if final else None
    run = session.merge(run)
    session.flush()
    if final:
        audit.record(session, ACTOR, "run.completed", "run", str(run.id),
                     {"config_hash": run.config_hash, "inputs": run.inputs, "counts": run.counts})
    return run


def _row(obj) -> dict:
    """Column values of an ORM object, for a bulk insert (ORM adds are too slow for tens of thousands of cases)."""
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns if getattr(obj, c.key) is not None}


def _cases(session, result: RunResult) -> None:
    """Insert the cases labeled since the last store; a case stored before (e.g. then censored, now relabeled by a
    late or corrected outcome) is updated in place."""
    cases = list(result.unsaved.values())
    if not cases:
        return
    known: dict[tuple[str, str], int] = {}
    for model in {c.prediction.model_id for c in cases}:
        ids = [c.prediction.resource_id for c in cases if c.prediction.model_id == model]
        for i in range(0, len(ids), 5000):
            known.update(((model, pid), row_id) for row_id, pid in session.execute(
                select(CaseRow.id, CaseRow.prediction_id).where(CaseRow.model == model,
                                                                CaseRow.prediction_id.in_(ids[i:i + 5000]))))
    rows, changes = [], []
    for c in cases:
        row = CaseRow.values_of(c)
        row_id = known.get((c.prediction.model_id, c.prediction.resource_id))
        if row_id is None:
            rows.append(row)
        else:
            changes.append({"id": row_id, **{k: row.get(k) for k in _RELABEL_COLUMNS}})
    if rows:
        session.connection().execute(CaseRow.__table__.insert(), rows)  # Core executemany: no ORM bookkeeping
    if changes:
        session.execute(update(CaseRow), changes)


_RELABEL_COLUMNS = ("label", "labeled_at", "outcome_definition", "evidence", "prediction_version", "score",
                    "decision")


def _streams(session, result: RunResult, incremental: bool) -> None:
    """Replace the state row of every stream that changed since last stored (all of them when not incremental), and
    the daily points from the earliest day that changed.

    Late labels change recent days only (within the label window), so a service storing every few seconds rewrites
    a bounded tail, not the whole history.
    """
    for monitor in result.monitors():
        model, version = monitor.model.id, monitor.version
        changed = [s for s in monitor.streams.values() if not (incremental and s.stored)]
        if len(changed) == len(monitor.streams):  # all of them (a first store): rows of streams gone go too
            session.execute(delete(StreamStateRow).where(StreamStateRow.model == model,
                                                         StreamStateRow.model_version == version))
        else:  # only the streams an observation, a calibration or a correction changed since the last store
            for i in range(0, len(changed), 500):
                session.execute(delete(StreamStateRow).where(
                    StreamStateRow.model == model, StreamStateRow.model_version == version,
                    tuple_(StreamStateRow.metric, StreamStateRow.site, StreamStateRow.subgroup).in_(
                        [(s.key.metric, s.key.site, s.key.subgroup) for s in changed[i:i + 500]])))
        if changed:
            session.execute(insert(StreamStateRow), [_state_row(s) for s in changed])
        for s in changed:
            s.stored = True
        days = [p.day for s in monitor.streams.values() for p in s.points.values() if not (incremental and p.stored)]
        if not days:
            continue
        since = min(days)
        session.execute(delete(MetricPointRow).where(MetricPointRow.model == model,
                                                     MetricPointRow.model_version == version,
                                                     MetricPointRow.metric.not_in(WINDOW_METRICS),
                                                     MetricPointRow.period_start >= since))
        points = [row for s in monitor.streams.values() for row in _point_rows(s, since, incremental)]
        if points:
            session.execute(insert(MetricPointRow), points)


def _key(s: Stream) -> dict:
    k = s.key
    return {"model": k.model, "model_version": k.version, "metric": k.metric, "site": k.site, "subgroup": k.subgroup}


def _state_row(s: Stream) -> dict:
    d = s.detector
    return {**_key(s), "detector": s.detector_name, "status": s.status, "baseline": s.baseline,
            "baseline_n": s.b_n, "n": d.n if d else 0, "threshold": d.threshold if d else None, "arl0": s.arl0,
            "statistic": d.statistic if d else None,
            "state": {**(d.state() if d else {}), "corrections": s.corrections}}


def _point_rows(s: Stream, since: datetime, mark: bool) -> list[dict]:
    rows = []
    for day, p in sorted(s.points.items()):
        if day < since:
            continue
        if s.key.metric in RISK_METRICS:  # observed / expected events, with its exact Poisson interval
            value, (lo, hi) = p.total / p.expected, oe_interval(p.total, p.expected)
        else:
            value, (lo, hi) = p.total / p.n, interval(s.key.metric, p.total, p.total_sq, p.n)
        rows.append({**_key(s), "period_start": day, "n": p.n, "value": value, "ci_low": lo, "ci_high": hi,
                     "statistic": p.statistic, "threshold": p.threshold})
        p.stored = p.stored or mark
    return rows


def _alerts(session, result: RunResult, routing: RoutingConfig, incremental: bool) -> dict[str, str]:
    """Insert new alerts, apply re-fires and back-in-control resolutions to stored ones; unchanged ones are untouched.

    An alert already stored by this process (``book.stored``) gets only the firings since; if a safety officer resolved
    it meanwhile, the new firing is a new incident and opens a new alert. An alert this process has not stored yet
    matches the stored alert of the same incident (same stream, same first detection: the same feed stored again, or
    a restart) or an open one of the same stream, else is inserted. Each new alert, re-fire and resolution queues its
    notifications (``vigil.notify``) in the same transaction.
    """
    book = result.alerts
    ids: dict[str, str] = {}
    for alert in book.alerts:
        resolved = alert.state is AlertState.RESOLVED
        stored_id, stored_fires, stored_resolved = (book.stored.get(alert.id, (None, 0, False)) if incremental
                                                    else (None, 0, False))
        if stored_id is not None and alert.fire_count == stored_fires and resolved == stored_resolved:
            ids[alert.id] = stored_id
            continue
        row = session.get(AlertRow, stored_id) if stored_id else _stored_match(session, alert)
        if row is not None and stored_id is None and row.detected_at == alert.signal.detected_at \
                and (alert.last_fired_at or alert.signal.detected_at) <= row.last_fired_at:
            pass  # this incident is stored as far as this run knows it (the same feed stored again)
        elif row is not None and row.state in OPEN_STATES:
            if alert.fire_count != stored_fires:
                _refire(session, row, alert, alert.fire_count - stored_fires if stored_id else alert.fire_count)
                _notify(session, row, "firing", routing)
        else:
            row = AlertRow.from_alert(alert)
            row.id = next_id(session, AlertRow, "A")
            row.state = AlertState.FIRING.value
            row.last_fired_at = alert.last_fired_at or alert.signal.detected_at
            session.add(row)
            session.flush()
            audit.record(session, ACTOR, "alert.fired", "alert", row.id, _alert_payload(row))
            _group(session, row)
            _notify(session, row, "firing", routing)
        ids[alert.id] = row.id
        if resolved and row.state in OPEN_STATES:
            _back_in_control(session, row, alert, routing)
        if incremental:
            book.stored[alert.id] = (row.id, alert.fire_count, resolved)
    return ids


def _notify(session, row: AlertRow, event: str, routing: RoutingConfig) -> None:
    """Queue the notifications of ``event``; an alert grouped under a parent is told through its parent's, so it
    queues none of its own (firing, re-fire or resolution)."""
    if row.parent_id is None:
        notify.enqueue(session, row, event, routing)


def _group(session, row: AlertRow) -> None:
    """Hierarchy (issue: one change, one signal): put ``row`` under the open alert of its parent stream — the same
    metric and detector at its site for all subgroups, else across all sites for its subgroup, else overall — and
    adopt the open alerts of its own child streams."""
    same = (AlertRow.model == row.model, AlertRow.model_version == row.model_version, AlertRow.metric == row.metric,
            AlertRow.detector == row.detector, AlertRow.state.in_(OPEN_STATES), AlertRow.id != row.id)
    parents = [(site, sub) for site, sub in ((row.site, ALL), (ALL, row.subgroup), (ALL, ALL))
               if (site, sub) != (row.site, row.subgroup)]
    candidates = session.scalars(select(AlertRow).where(*same, AlertRow.parent_id.is_(None))).all()
    for site, sub in parents:
        parent = next((a for a in candidates if (a.site, a.subgroup) == (site, sub)), None)
        if parent is not None:
            row.parent_id = parent.id
            audit.record(session, ACTOR, "alert.grouped", "alert", row.id, {"parent": parent.id})
            return
    for child in candidates:
        if (row.site in (ALL, child.site)) and (row.subgroup in (ALL, child.subgroup)):
            child.parent_id = row.id
            audit.record(session, ACTOR, "alert.grouped", "alert", child.id, {"parent": row.id})


def _stored_match(session, alert) -> AlertRow | None:
    ident = identity(alert.signal)
    same_stream = (AlertRow.model == ident[0], AlertRow.model_version == ident[1], AlertRow.metric == ident[2],
                   AlertRow.site == ident[3], AlertRow.subgroup == ident[4], AlertRow.detector == ident[5])
    same_incident = session.scalars(select(AlertRow).where(
        *same_stream, AlertRow.detected_at == alert.signal.detected_at)).first()
    return same_incident or session.scalars(select(AlertRow).where(
        *same_stream, AlertRow.state.in_(OPEN_STATES))).first()


def _back_in_control(session, row: AlertRow, alert, routing: RoutingConfig) -> None:
    """The pipeline resolves an alert whose stream has not alarmed for ``monitors.auto_resolve_after`` (feed time)."""
    row.state, row.resolved_by, row.resolved_at = AlertState.RESOLVED.value, ACTOR, alert.resolved_at
    audit.record(session, ACTOR, "alert.auto_resolved", "alert", row.id,
                 {"reason": "back in control: no alarm since the last firing", "last_fired_at":
                  row.last_fired_at.isoformat(), "resolved_at": alert.resolved_at.isoformat()})
    _notify(session, row, "resolved", routing)


def _refire(session, existing: AlertRow, alert, new_fires: int) -> None:
    existing.fire_count += new_fires
    existing.last_fired_at = max(existing.last_fired_at, alert.last_fired_at or alert.signal.detected_at)
    if alert.severity == "critical":
        existing.severity = "critical"
    s = alert.signal
    existing.statistic, existing.current, existing.n_current = s.statistic, s.current, s.n_current
    existing.ci_low, existing.ci_high = s.current_ci
    audit.record(session, ACTOR, "alert.refired", "alert", existing.id,
                 {"fire_count": existing.fire_count, "severity": existing.severity,
                  "current": s.current, "ci": list(s.current_ci), "n_current": s.n_current})


def _alert_payload(row: AlertRow) -> dict:
    return {
        "stream": f"{row.model}@{row.model_version}/{row.metric}/site={row.site}/{row.subgroup}",
        "detector": row.detector, "severity": row.severity, "detected_at": row.detected_at.isoformat(),
        "change_estimate": row.change_estimate.isoformat(), "baseline": row.baseline, "current": row.current,
        "ci": [row.ci_low, row.ci_high], "n_baseline": row.n_baseline, "n_current": row.n_current,
    }


def _tickets(session, result: RunResult, alert_ids: dict[str, str]) -> dict[str, str]:
    """Open a ticket per root cause; its key (the draft's stable hash) maps to the stored id."""
    ids: dict[str, str] = {}
    for draft in result.tickets:
        stored_alerts = [alert_ids[a] for a in draft.alert_ids if a in alert_ids]
        earlier = session.scalar(select(AlertRow.ticket_id).where(AlertRow.id.in_(stored_alerts),
                                                                  AlertRow.ticket_id.is_not(None)))
        if earlier:  # these alerts already have their ticket from an earlier run
            ids[draft.key] = earlier
            continue
        ticket = TicketRow(
            id=next_id(session, TicketRow, "T"), model=draft.model, model_version=draft.model_version,
            category=draft.category.value, safety_overlay=draft.safety_overlay, matched_mod=draft.matched_mod,
            cause=draft.cause, cause_confidence=draft.cause_confidence, remedy=draft.remedy,
            rationale=[list(r) for r in draft.rationale], required_actions=list(draft.required_actions),
            evidence=draft.evidence,
        )
        session.add(ticket)
        session.flush()
        ids[draft.key] = ticket.id
        for alert_id in stored_alerts:
            session.get(AlertRow, alert_id).ticket_id = ticket.id
        payload = {k: v for k, v in dataclasses.asdict(draft).items() if k not in ("evidence", "alert_ids")}
        audit.record(session, ACTOR, "ticket.opened", "ticket", ticket.id, {**payload, "alerts": stored_alerts})
        ticket_actions.opened(session, ticket, ACTOR)
    return ids

