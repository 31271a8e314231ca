"""Write one pipeline run into the store, in one transaction, with its audit trail.

Cases, stream checkpoints, daily metric points, dead letters, alerts and tickets land together with the run record,
so a crash leaves either the whole run or none of it. Every alert and ticket (with its classification) is also
appended to the hash-chained audit log.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from alerts.lifecycle import identity
from monitors.streams import Stream, interval
from vigil import __version__, audit
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
    """Store ``result``; returns the mapping from the run's provisional alert and ticket keys to the stored ids."""
    upgrade(settings.store_url)
    engine = engine_for(settings.store_url)
    try:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            return _persist(session, result, settings, inputs, started_at)
    finally:
        engine.dispose()  # no open handles on the store file once the run is stored


def _persist(session: Session, result: RunResult, settings: Settings, inputs: list[str],
             started_at: datetime) -> dict[str, str]:
    _cases(session, result)
    _streams(session, result)
    if result.dead_letters:
        session.execute(insert(DeadLetterRow), [_row(DeadLetterRow.from_dead_letter(d)) for d in result.dead_letters])
    ids = _alerts(session, result)
    ids.update(_tickets(session, result, ids))
    counts = {
        "accepted": dict(result.accepted), "rejected": dict(result.rejected), "ignored": dict(result.ignored),
        "duplicates": dict(result.duplicates), "stripped": dict(result.stripped),
        "corrections": dict(result.corrections), "cases": len(result.cases), "alerts": len(result.alerts.alerts), "tickets": len(result.tickets),
    }
    run = RunRow(started_at=started_at, finished_at=datetime.now(UTC), config_hash=settings.config_hash(),
                 code_version=__version__, inputs=inputs, counts=counts)
    session.add(run)
    session.flush()
    audit.record(session, ACTOR, "run.completed", "run", str(run.id),
                 {"config_hash": run.config_hash, "inputs": inputs, "counts": counts})
    return ids


def _row(obj) -> dict:
    """Column values of an ORM object, for a bulk insert (ORM adds are too slow for tens of thousands of cases)."""
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns if getattr(obj, c.key) is not None}


def _cases(session, result: RunResult) -> None:
    cases = result.cases
    if not cases:
        return
    models = {c.prediction.model_id for c in cases}
    known = set(session.execute(select(CaseRow.model, CaseRow.prediction_id).where(CaseRow.model.in_(models))).all())
    rows = [_row(CaseRow.from_case(c)) for c in cases
            if (c.prediction.model_id, c.prediction.resource_id) not in known]
    if rows:
        session.execute(insert(CaseRow), rows)


def _streams(session, result: RunResult) -> None:
    """Replace the checkpoints and daily points of every stream this run computed."""
    for monitor in result.monitors():
        for table in (StreamStateRow, MetricPointRow):
            session.execute(delete(table).where(table.model == monitor.model.id, table.model_version == monitor.version))
        states, points = [], []
        for s in monitor.streams.values():
            states.append(_state_row(s))
            points.extend(_point_rows(s))
        if states:
            session.execute(insert(StreamStateRow), states)
        if points:
            session.execute(insert(MetricPointRow), points)


def _key(s: Stream) -> dict:
    k = s.key
    return {"model": k.model, "model_version": k.version, "metric": k.metric, "site": k.site, "subgroup": k.subgroup}


def _state_row(s: Stream) -> dict:
    d = s.detector
    return {**_key(s), "detector": s.detector_name, "status": s.status, "baseline": s.baseline,
            "baseline_n": s.b_n, "n": d.n if d else 0, "threshold": d.threshold if d else None, "arl0": s.arl0,
            "statistic": d.statistic if d else None, "state": d.state() if d else {}}


def _point_rows(s: Stream) -> list[dict]:
    rows = []
    for day, p in sorted(s.points.items()):
        lo, hi = interval(s.key.metric, p.total, p.total_sq, p.n)
        rows.append({**_key(s), "period_start": day, "n": p.n, "value": p.total / p.n, "ci_low": lo, "ci_high": hi,
                     "statistic": p.statistic, "threshold": p.threshold})
    return rows


def _alerts(session, result: RunResult) -> dict[str, str]:
    """Insert new alerts; a re-fire of an alert still open in the store updates it instead."""
    ids: dict[str, str] = {}
    for alert in result.alerts.alerts:
        ident = identity(alert.signal)
        existing = session.scalars(select(AlertRow).where(
            AlertRow.model == ident[0], AlertRow.model_version == ident[1], AlertRow.metric == ident[2],
            AlertRow.site == ident[3], AlertRow.subgroup == ident[4], AlertRow.detector == ident[5],
            AlertRow.state.in_(("firing", "acknowledged")))).first()
        if existing is not None:
            ids[alert.id] = existing.id
            newest = alert.last_fired_at or alert.signal.detected_at
            if newest <= existing.last_fired_at:
                continue  # this run's firing is already stored (the same run stored again)
            existing.fire_count += alert.fire_count
            existing.last_fired_at = newest
            if alert.severity == "critical":
                existing.severity = "critical"
            s = alert.signal
            existing.statistic, existing.current, existing.n_current = s.statistic, s.current, s.n_current
            existing.ci_low, existing.ci_high = s.current_ci
            audit.record(session, ACTOR, "alert.refired", "alert", existing.id,
                         {"fire_count": existing.fire_count, "severity": existing.severity,
                          "current": s.current, "ci": list(s.current_ci), "n_current": s.n_current})
            continue
        row = AlertRow.from_alert(alert)
        row.id = next_id(session, AlertRow, "A")
        row.last_fired_at = alert.last_fired_at or alert.signal.detected_at
        session.add(row)
        session.flush()
        ids[alert.id] = row.id
        audit.record(session, ACTOR, "alert.fired", "alert", row.id, _alert_payload(row))
    return ids


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
    return ids

