"""Re-inject dead letters into the pipeline once their cause is fixed (`vigil deadletters replay`).

A dead letter keeps its payload only once it is free of identifiers (DESIGN.md §Reliability): a redacted copy whose
Patient ids and references are already keyed, and marked as such (``ingest.deid.SubjectKeyer.marked``), so decoding
it again keys each subject once, to the pseudonym the original resource had. A dead letter without a payload (it
held identifiers, or was not readable JSON) cannot be replayed; the report says so and why.

Replay runs the payloads through the same path as a feed: ``ingest.reader.iter_message`` → the pipeline's decoder
→ ``Pipeline.ingest`` on the pipeline restored from the store's checkpoint, then stores the results, the marks
("deadletter.replayed" audit entries, one per dead letter) and the new checkpoint in one transaction, as the service
stores a batch (vigil/service.py). So a replayed resource is counted once: a second replay skips what the audit log
marks as replayed, and the pipeline keeps one version per resource (a resource the source re-sent meanwhile counts
as a duplicate, not twice). Without a checkpoint that fits the current config there is no state to add to, and the
replay is refused with what to do instead. Dead letters stay in the store unchanged: they are evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ingest import Decoder, IngestResult, iter_message, reason_category
from ingest.decode import Record
from vigil import audit, checkpoint
from vigil.domain import DeadLetter, Position
from vigil.pipeline import decoder_for
from vigil.service import store_and_checkpoint
from vigil.settings import Settings
from vigil.store import AuditRow, DeadLetterRow, RunRow, engine_for, upgrade

REPLAYED = "deadletter.replayed"
"""Audit action marking one dead letter as re-injected (entity "dead_letter", entity id = its id)."""
SUMMARY = "deadletters.replayed"
NO_PAYLOAD = ("no payload was kept (it held identifiers, or was not readable as JSON), so there is nothing to "
              "replay: have the sender resend the resource")
OUTCOMES = ("replayed", "still_rejected", "ignored", "not_replayable", "already_replayed")


class ReplayRefused(Exception):
    """The replay cannot run against this store as it is; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters: by id, by source (exact), by reason (substring, case-insensitive), or all of them."""

    ids: Sequence[int] = ()
    source: str | None = None
    reason: str | None = None
    all: bool = False

    def __post_init__(self) -> None:
        if not (self.ids or self.source or self.reason or self.all):
            raise ValueError("name dead-letter ids, or select by --source SOURCE, --reason TEXT or --all")

    def query(self):
        query = select(DeadLetterRow).order_by(DeadLetterRow.id)
        if self.ids:
            query = query.where(DeadLetterRow.id.in_(list(self.ids)))
        if self.source is not None:
            query = query.where(DeadLetterRow.source == self.source)
        if self.reason:
            query = query.where(DeadLetterRow.reason.icontains(self.reason, autoescape=True))
        return query


@dataclass(slots=True)
class ReplayReport:
    """Per outcome, one entry per dead letter: ``{"id", "where", "was", "detail"}``."""

    dry_run: bool
    entries: dict[str, list[dict]] = field(default_factory=lambda: {o: [] for o in OUTCOMES})
    duplicates: int = 0  # replayed records the pipeline had already counted (same resource version)
    checkpoint: str = ""

    @property
    def selected(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def as_dict(self) -> dict:
        return {"dry_run": self.dry_run, "selected": self.selected, "duplicates": self.duplicates,
                "checkpoint": self.checkpoint, **self.entries}


@dataclass(slots=True)
class _Decoded:
    row: DeadLetterRow
    records: list[tuple[Position, Record]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)  # resourceType of each record, for the accepted counts

    def describe(self) -> str:
        """What the records are, e.g. "RiskAssessment → Prediction" (no ids: a Patient's would be its key anyway)."""
        return ", ".join(f"{t} → {type(r).__name__}" for t, (_, r) in zip(self.types, self.records, strict=True))


def replay(url: str, settings: Settings, selection: Selection, actor: str, *, dry_run: bool = False,
           strict: bool = False, checkpoint_name: str = checkpoint.DEFAULT_NAME, force: bool = False) -> ReplayReport:
    """Re-inject the selected dead letters (or, ``dry_run``, only say what the current decoder makes of them)."""
    upgrade(url)
    engine = engine_for(url)
    try:
        with sessionmaker(engine, expire_on_commit=False)() as session, session.begin():
            rows = list(session.scalars(selection.query()))
            missing = sorted(set(selection.ids) - {r.id for r in rows})
            if missing:
                raise ReplayRefused(f"no dead letter {', '.join(map(str, missing))} in {url}"
                                    + (f" from source {selection.source!r}" if selection.source else "")
                                    + (f" with reason containing {selection.reason!r}" if selection.reason else "")
                                    + " (list them with `vigil deadletters list`)")
            if dry_run:
                return _preview(rows, decoder_for(settings, strict))
            return _reinject(session, rows, settings, actor, checkpoint_name, force)
    finally:
        engine.dispose()


def replayed_ids(session: Session) -> dict[int, int]:
    """Dead-letter id → the audit sequence number of its replay, from the hash-chained audit log."""
    rows = session.execute(select(AuditRow.entity_id, AuditRow.seq).where(AuditRow.entity == "dead_letter",
                                                                          AuditRow.action == REPLAYED))
    return {int(entity_id): seq for entity_id, seq in rows}


def _entry(row: DeadLetterRow, detail: str) -> dict:
    return {"id": row.id, "where": str(_position(row)), "was": row.reason, "detail": detail}


def _position(row: DeadLetterRow) -> Position:
    return Position(row.source, row.position, row.partition)


def _decode(row: DeadLetterRow, decoder: Decoder) -> _Decoded:
    """One stored payload through the reader and the decoder, as the feed's message once went."""
    out = _Decoded(row)
    for item in iter_message(row.payload.encode(), _position(row)):
        if isinstance(item, DeadLetter):
            out.problems.append(item.reason)
            continue
        position, resource = item
        outcome = decoder.decode(resource, position)
        if isinstance(outcome, DeadLetter):
            out.problems.append(outcome.reason)
        elif outcome is None:
            out.ignored.append(resource["resourceType"])
        else:
            out.records.append((position, outcome))
            out.types.append(resource["resourceType"])
    return out


def _classify(decoded: _Decoded, report: ReplayReport) -> bool:
    """File a decoded dead letter that cannot enter the pipeline; True if it can."""
    if decoded.problems:
        report.entries["still_rejected"].append(_entry(decoded.row, "; ".join(decoded.problems)))
        return False
    if not decoded.records:
        report.entries["ignored"].append(_entry(decoded.row, "vigil does not use "
                                                + (", ".join(decoded.ignored) or "an empty message")))
        return False
    return True


def _preview(rows: list[DeadLetterRow], decoder: Decoder) -> ReplayReport:
    report = ReplayReport(dry_run=True, checkpoint="dry run: nothing stored")
    for row in rows:
        if row.payload is None:
            report.entries["not_replayable"].append(_entry(row, NO_PAYLOAD))
            continue
        decoded = _decode(row, decoder)
        if _classify(decoded, report):
            report.entries["replayed"].append(_entry(row, "would enter the pipeline as "
                                                     + decoded.describe()))
    return report


def _reinject(session: Session, rows: list[DeadLetterRow], settings: Settings, actor: str, name: str,
              force: bool) -> ReplayReport:
    _check_no_service_running(session, force)
    restored = checkpoint.restore(session, settings, name)
    if restored.pipeline is None:
        raise ReplayRefused(_no_state(restored.reason))
    pipeline = restored.pipeline
    report = ReplayReport(dry_run=False, checkpoint=restored.reason)
    done = replayed_ids(session)
    candidates: list[_Decoded] = []
    for row in rows:
        if row.id in done:
            report.entries["already_replayed"].append(_entry(row, f"replayed before (audit entry #{done[row.id]})"))
        elif row.payload is None:
            report.entries["not_replayable"].append(_entry(row, NO_PAYLOAD))
        else:
            decoded = _decode(row, pipeline.decoder)
            if _classify(decoded, report):
                candidates.append(decoded)
    if candidates:
        rejected_later, report.duplicates = _ingest(pipeline, candidates)
        for decoded in candidates:
            problems = rejected_later.get(decoded.row.id)
            if problems:
                report.entries["still_rejected"].append(_entry(decoded.row, "; ".join(problems)))
                continue
            entry = _entry(decoded.row, "re-injected as " + decoded.describe())
            report.entries["replayed"].append(entry)
            audit.record(session, actor, REPLAYED, "dead_letter", str(decoded.row.id),
                         {"where": entry["where"], "records": entry["detail"],
                          "config_hash": settings.config_hash()})
        store_and_checkpoint(session, pipeline, settings, name, window_metrics=True)
    audit.record(session, actor, SUMMARY, "dead_letter", _id_span([r.id for r in rows]),
                 {"ids": [r.id for r in rows], "config_hash": settings.config_hash(), "duplicates": report.duplicates,
                  **{k: [e["id"] for e in v] for k, v in report.entries.items()}})
    return report


def _ingest(pipeline, candidates: list[_Decoded]) -> tuple[dict[int, list[str]], int]:
    """All candidates' records through ``Pipeline.ingest`` in one batch (it orders events by arrival, as for a feed);
    returns what the pipeline itself rejected, per dead-letter id, and how many records it had already counted.

    Those rejections are taken back out of the pipeline's new dead letters: the original dead letter already records
    the input, a second row would only repeat it. The feed's watermark is kept where it was: replayed events are
    old arrivals, and the time of the feed does not go back for them.
    """
    result = pipeline.result
    loaded = IngestResult()
    owner: dict[tuple[Position, str | None], int] = {}
    for decoded in candidates:
        loaded.records.extend(decoded.records)
        loaded.accepted.update(decoded.types)
        for position, record in decoded.records:
            owner[(position, getattr(record, "resource_id", None))] = decoded.row.id
    letters_before, duplicates_before = len(result.dead_letters), sum(result.duplicates.values())
    watermark = result.watermark
    pipeline.ingest(loaded)
    pipeline.finish()  # the run it joins had ended: its stage 2 applies what the replay emitted
    if watermark is not None and result.watermark is not None and result.watermark < watermark:
        result.watermark = watermark
    rejections: dict[int, list[str]] = {}
    kept = result.dead_letters[:letters_before]
    for letter in result.dead_letters[letters_before:]:
        row_id = owner.get((letter.position, letter.resource_id))
        if row_id is None:  # not traced to a replayed dead letter: stored as a new one, as the service would
            kept.append(letter)
            continue
        result.rejected[reason_category(letter.reason)] -= 1
        rejections.setdefault(row_id, []).append(letter.reason)
    result.dead_letters[:] = kept
    return rejections, sum(result.duplicates.values()) - duplicates_before


def _check_no_service_running(session: Session, force: bool) -> None:
    """The service keeps its pipeline in memory and overwrites the checkpoint at its next commit: a replay while it
    runs would be lost from the stream state. An unfinished newest run is a running (or crashed) `vigil run`."""
    run = session.scalar(select(RunRow).order_by(RunRow.id.desc()).limit(1))
    if run is not None and run.finished_at is None and not force:
        raise ReplayRefused(f"run {run.id} (started {run.started_at:%Y-%m-%d %H:%M:%S}) has not finished: stop "
                            "`vigil run` before replaying (replay and the service both write the pipeline "
                            "checkpoint); if that run was killed, pass --force")


def _no_state(reason: str) -> str:
    if reason.startswith("no checkpoint"):
        return ("the store has no pipeline checkpoint to add the dead letters to (a one-shot `vigil ingest` or "
                "`vigil demo` keeps none; `vigil run` does): replaying into an empty pipeline would replace the "
                "stored stream state with one built from the dead letters alone. Use --dry-run to see what the "
                "current decoder makes of them, or re-run the feed with `vigil run`.")
    return (f"the pipeline checkpoint does not fit this config ({reason}). Run `vigil run --config FILE --once` "
            "with the fixed config first, so the service rebuilds its state from its sources under it, then replay "
            "the dead letters into that state.")


def _id_span(ids: list[int]) -> str:
    """The audit entity id of a replay: "7", "3-9" or "none"."""
    if not ids:
        return "none"
    return str(ids[0]) if len(ids) == 1 else f"{min(ids)}-{max(ids)}"
