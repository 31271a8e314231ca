"""The pipeline's in-memory state, saved with the source offsets and restored on restart.

What a restart must not lose is more than detector statistics: predictions still waiting for their outcomes, facts
kept for outcome rules, the day's partial metric points, open alerts. All of it lives in the ``Pipeline`` object, so
the checkpoint is that object, serialised (pickle) without its settings and without the subject-key secret.

Three guards, because a checkpoint is only worth restoring if it is exactly what this code wrote for this config:
- ``code_version`` and the analysis config hash (``Settings.analysis_hash``) must match, else the checkpoint is ignored and the service replays its sources
  from the start (a new model, threshold or code version must be applied to the whole feed, not to its tail);
- ``signature`` is an HMAC-SHA256 of the blob under the subject key, so a blob written by anyone without that key is
  refused before it is unpickled (unpickling runs code);
- it is written in the same transaction as the results and offsets it accounts for (``save`` takes the caller's
  session), so the three never disagree after a crash.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import pickle
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from vigil import __version__
from vigil.pipeline import Pipeline
from vigil.settings import Settings
from vigil.store import CheckpointRow

log = logging.getLogger(__name__)

DEFAULT_NAME = "pipeline"


@dataclass(frozen=True, slots=True)
class Restored:
    pipeline: Pipeline | None  # None: start afresh
    reason: str  # why it was (not) restored, for the log and `vigil run --json`


def _sign(blob: bytes, settings: Settings) -> str:
    return hmac.new(settings.subject_key.encode(), blob, hashlib.sha256).hexdigest()


def save(session: Session, pipeline: Pipeline, settings: Settings, name: str = DEFAULT_NAME) -> int:
    """Write the checkpoint in ``session``'s transaction; returns its size in bytes."""
    blob = pickle.dumps(pipeline, protocol=pickle.HIGHEST_PROTOCOL)
    row = session.get(CheckpointRow, name)
    if row is None:
        row = CheckpointRow(name=name)
        session.add(row)
    row.code_version, row.config_hash = __version__, settings.analysis_hash()
    row.state, row.signature = blob, _sign(blob, settings)
    return len(blob)


def restore(session: Session, settings: Settings, name: str = DEFAULT_NAME) -> Restored:
    row = session.scalar(select(CheckpointRow).where(CheckpointRow.name == name))
    if row is None:
        return Restored(None, "no checkpoint: starting from the beginning of the sources")
    if row.code_version != __version__ or row.config_hash != settings.analysis_hash():
        return Restored(None, f"checkpoint '{name}' was written by vigil {row.code_version} with config "
                              f"{row.config_hash[:12]}; this is vigil {__version__} with config "
                              f"{settings.analysis_hash()[:12]}: replaying the sources from the start")
    if not hmac.compare_digest(row.signature, _sign(row.state, settings)):
        raise ValueError(f"checkpoint '{name}' in the store has a bad signature: it was not written by this vigil "
                         "with this subject key. Refusing to load it; if the key was rotated on purpose, delete the "
                         "checkpoint (vigil replays the sources from the start)")
    pipeline = pickle.loads(row.state)  # noqa: S301 — authenticated above
    return Restored(pipeline.bind(settings), f"restored checkpoint '{name}' ({len(row.state)} bytes)")
