"""The dataset manifest of a retraining ticket: which cases, from when and where, and a hash to prove them later.

FDA's PCCP guidance asks that the data behind a modification be identified and controlled (S3 App. A 1.a–1.d; pccp.md
§9 C: "dataset ids with content hashes and version-control references"), and GMLP principle 3 asks for data sets that
can be reproduced. The manifest lists the cases (store row id and the pseudonymous prediction resource id, never the
subject key), the data window, the model and version, the outcome definition versions that produced the labels, the
source positions the store had reached, and a SHA-256 over a canonical serialisation of the cases' content.

The hash covers content, not storage: rows are ordered by prediction id and the store's row id is left out, so the
same feed replayed into a fresh store gives the same hash. Each case also carries a short digest of its own row, so
``verify_manifest`` can name the case that changed.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vigil.audit import canonical_json
from vigil.store import CaseRow, SourceCursorRow, SourceOffsetRow, TicketRow

MANIFEST_VERSION = 1
HASHED_COLUMNS = (
    "model",
    "model_version",
    "prediction_id",
    "prediction_version",
    "site",
    "attributes",
    "predicted_at",
    "score",
    "decision",
    "label",
    "labeled_at",
    "outcome_definition",
    "evidence",
)
"""What retraining uses of a case. Not ``subject`` or ``encounter`` (keyed pseudonyms that must not leave the store
needlessly), not ``id`` (storage, not content)."""

ROW_DIGEST_CHARS = 16


class ManifestError(ValueError):
    """A manifest that cannot be built or read; the message names the ticket or field."""


def _canonical(row: CaseRow) -> str:
    values: dict[str, Any] = {}
    for column in HASHED_COLUMNS:
        v = getattr(row, column)
        values[column] = v.astimezone(UTC).isoformat(timespec="microseconds") if isinstance(v, datetime) else v
    return canonical_json(values)


def content_hash(rows: Iterable[CaseRow]) -> tuple[str, list[str]]:
    """SHA-256 over the canonical rows, one per line in the given order, and each row's short digest."""
    total = hashlib.sha256()
    digests = []
    for row in rows:
        line = _canonical(row).encode()
        total.update(line + b"\n")
        digests.append(hashlib.sha256(line).hexdigest()[:ROW_DIGEST_CHARS])
    return total.hexdigest(), digests


def _parse_time(value: str, what: str) -> datetime:
    try:
        t = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{what} {value!r} is not an ISO 8601 time") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def ticket_selection(ticket: TicketRow) -> tuple[datetime, datetime, list[str]]:
    """The data window and sites a ticket's evidence names (evidence.data_window, the remedy's data sources)."""
    evidence = ticket.evidence or {}
    window = evidence.get("data_window")
    if not window:
        raise ManifestError(f"ticket {ticket.id} has no evidence.data_window; pass the window explicitly")
    start = _parse_time(window["start"], f"ticket {ticket.id} data_window.start")
    end = _parse_time(window["end"], f"ticket {ticket.id} data_window.end")
    sites = (evidence.get("data_lineage") or {}).get("source_sites") or (
        (evidence.get("bundle") or {}).get("scope") or {}
    ).get("site_ids", [])
    return start, end, sorted(sites)


def _query(model: str, model_version: str, start: datetime, end: datetime, sites: list[str]):
    q = select(CaseRow).where(
        CaseRow.model == model,
        CaseRow.model_version == model_version,
        CaseRow.predicted_at >= start,
        CaseRow.predicted_at <= end,
        CaseRow.label.is_not(None),
    )
    if sites:
        q = q.where(CaseRow.site.in_(sites))
    return q.order_by(CaseRow.prediction_id)


def build_manifest(
    session: Session,
    ticket: TicketRow,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    sites: list[str] | None = None,
    created_at: datetime | None = None,
) -> dict[str, Any]:
    """The manifest of the labeled cases of the ticket's model version in its data window at its sites.

    ``start``/``end``/``sites`` override what the ticket's evidence names (e.g. a longer window for re-training).
    """
    t_start, t_end, t_sites = ticket_selection(ticket) if None in (start, end, sites) else (start, end, sites)
    start, end = start or t_start, end or t_end
    sites = sorted(t_sites if sites is None else sites)
    if end < start:
        raise ManifestError(
            f"ticket {ticket.id}: data window ends {end.isoformat()} before it starts {start.isoformat()}"
        )
    rows = session.scalars(_query(ticket.model, ticket.model_version, start, end, sites)).all()
    digest, row_digests = content_hash(rows)
    offsets = session.scalars(select(SourceOffsetRow).order_by(SourceOffsetRow.source, SourceOffsetRow.partition))
    cursors = session.scalars(select(SourceCursorRow).order_by(SourceCursorRow.source))
    return {
        "manifest_version": MANIFEST_VERSION,
        "ticket_id": ticket.id,
        "model": ticket.model,
        "model_version": ticket.model_version,
        "data_window": {"start": start.isoformat(), "end": end.isoformat()},
        "sites": sites,
        "selection": "labeled cases (label not null) of model@model_version predicted inside the data window "
                     "at the listed sites (all sites if none are listed), ordered by prediction_id",
        "outcome_definitions": sorted({r.outcome_definition for r in rows if r.outcome_definition}),
        "label_counts": dict(sorted(Counter(r.label for r in rows).items())),
        "case_count": len(rows),
        "source_positions": {
            "offsets": [{"source": o.source, "partition": o.partition, "offset": o.offset} for o in offsets],
            "cursors": [{"source": c.source, "cursor": c.cursor} for c in cursors],
        },
        "content_hash": {
            "algorithm": "sha256",
            "columns": list(HASHED_COLUMNS),
            "serialisation": "one canonical JSON object per case (sorted keys, no spaces, UTC ISO 8601 times with "
                             "microseconds), newline-terminated, in the order of `cases`",
            "sha256": digest,
        },
        "cases": [
            {"id": r.id, "prediction_id": r.prediction_id, "prediction_version": r.prediction_version,
             "sha256_16": d}
            for r, d in zip(rows, row_digests, strict=True)
        ],
        "created_at": (created_at or datetime.now(UTC)).isoformat(),
    }


@dataclass(slots=True)
class ManifestCheck:
    ok: bool
    expected: str
    actual: str
    missing: list[str] = field(default_factory=list)  # prediction ids no longer in the store
    changed: list[str] = field(default_factory=list)  # prediction ids whose content differs
    new_in_window: list[str] = field(default_factory=list)  # cases the same selection finds now (e.g. late labels)

    def describe(self) -> str:
        if self.ok:
            new = len(self.new_in_window)
            extra = f"; {new} case(s) labeled since match the selection" if new else ""
            return f"manifest verified: content hash {self.actual}{extra}"
        parts = [f"content hash {self.actual} ≠ manifest {self.expected}"]
        if self.missing:
            parts.append(f"missing cases (prediction ids): {', '.join(self.missing[:20])}")
        if self.changed:
            parts.append(f"changed cases (prediction ids): {', '.join(self.changed[:20])}")
        return "; ".join(parts)


def verify_manifest(session: Session, manifest: Mapping[str, Any]) -> ManifestCheck:
    """Recompute the content hash of the listed cases and name any case missing or changed since."""
    try:
        model, version = manifest["model"], manifest["model_version"]
        listed = manifest["cases"]
        expected = manifest["content_hash"]["sha256"]
        start = _parse_time(manifest["data_window"]["start"], "data_window.start")
        end = _parse_time(manifest["data_window"]["end"], "data_window.end")
        sites = list(manifest["sites"])
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"not a vigil dataset manifest: missing field {exc}") from None
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ManifestError(
            f"manifest_version {manifest.get('manifest_version')!r}; this vigil reads {MANIFEST_VERSION}"
        )
    ids = [c["prediction_id"] for c in listed]
    found: dict[str, CaseRow] = {}
    for chunk in range(0, len(ids), 500):
        q = select(CaseRow).where(CaseRow.model == model, CaseRow.prediction_id.in_(ids[chunk:chunk + 500]))
        found.update({r.prediction_id: r for r in session.scalars(q)})
    missing = [i for i in ids if i not in found]
    present = [found[i] for i in ids if i in found]
    actual, digests = content_hash(present)
    by_id = {c["prediction_id"]: c.get("sha256_16") for c in listed}
    changed = [r.prediction_id for r, d in zip(present, digests, strict=True) if by_id[r.prediction_id] != d]
    now = {r.prediction_id for r in session.scalars(_query(model, version, start, end, sites))}
    new = sorted(now - set(ids))
    ok = actual == expected and not missing
    return ManifestCheck(ok, expected, actual, missing, changed, new)
