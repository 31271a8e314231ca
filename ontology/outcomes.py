"""Computable outcome definitions: the ground truth a prediction is scored against, declared in config, versioned.

Every case records the ``ref`` ("id@version") of the definition that labelled it, so changing a definition is a
visible, auditable event rather than a silent shift in the metrics. A definition sees one subject's facts and says
POSITIVE as soon as the criterion is met inside the label window, NEGATIVE only once the window is closed, and
nothing (None) while it cannot yet tell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from vigil.domain import Label, OutcomeFact
from vigil.settings import OutcomeConfig

Decision = tuple[Label, tuple[str, ...]]

_TOLERANCE = 1e-9
"""Slack on the lab thresholds so 1.3 − 1.0 counts as a rise of 0.3 despite binary floating point."""


class OutcomeDefinition(Protocol):
    ref: str

    def relevant(self, of: OutcomeFact) -> bool:
        """Whether this fact can bear on the outcome (the label join keeps only these)."""
        ...

    def evaluate(
        self, prediction_time: datetime, window: timedelta, facts: Sequence[OutcomeFact], closed: bool
    ) -> Decision | None:
        """(label, evidence resource ids) once decidable from this subject's non-retracted facts, else None."""
        ...


@dataclass(frozen=True, slots=True)
class CodeSetOutcome:
    """Positive when a fact with one of ``codes`` has its clinical time (onset, performed, effective) inside
    [prediction_time, prediction_time + window], both ends included. A fact before the prediction is a pre-existing
    condition, not an outcome of it, and does not count.
    """

    ref: str
    codes: frozenset[tuple[str, str]]

    def relevant(self, of: OutcomeFact) -> bool:
        return of.mapped and of.concept is not None and (of.concept.system, of.concept.code) in self.codes

    def evaluate(
        self, prediction_time: datetime, window: timedelta, facts: Sequence[OutcomeFact], closed: bool
    ) -> Decision | None:
        end = prediction_time + window
        hits = sorted(
            (of.fact.time, of.fact.resource_id)
            for of in facts
            if self.relevant(of) and prediction_time <= of.fact.time <= end
        )
        if hits:
            return Label.POSITIVE, tuple(dict.fromkeys(rid for _, rid in hits))
        return (Label.NEGATIVE, ()) if closed else None


@dataclass(frozen=True, slots=True)
class LabRiseOutcome:
    """A rise of a lab value over its baseline, after the KDIGO serum-creatinine criteria for acute kidney injury
    (KDIGO Clinical Practice Guideline for Acute Kidney Injury, Kidney Int Suppl 2012;2:1-138, §2.1.1: a rise of
    ≥ 0.3 mg/dL within 48 h, or to ≥ 1.5 × baseline known or presumed to have occurred within the prior 7 days).

    Baseline: the latest value within ``baseline_lookback`` before the prediction; when there is none, the first
    value inside the window, and only later values are compared with it. Positive when a value inside the window
    is ≥ ``relative_rise`` × baseline, or ≥ ``absolute_rise`` above the baseline or an earlier value in the window
    measured at most ``absolute_rise_within`` (KDIGO: 48 h) before it — a 0.3 mg/dL rise spread over five days is
    not AKI by the absolute criterion. Only values inside the label window count
    for either criterion: KDIGO's 1.5× rule looks back 7 days, but with a 48 h window a 1.5× rise reached on day 5
    is not an outcome of this prediction. A subject with no values at all (no baseline, nothing in the window) is
    NEGATIVE once the window closes: nobody measured creatinine, which in practice means nobody suspected AKI;
    calling it censored instead would drop exactly the unremarkable stays and inflate the positive rate.
    """

    ref: str
    analyte: tuple[str, str]
    unit: str
    absolute_rise: float | None
    relative_rise: float | None
    baseline_lookback: timedelta
    absolute_rise_within: timedelta = timedelta(hours=48)

    def relevant(self, of: OutcomeFact) -> bool:
        return (
            of.mapped
            and of.value is not None
            and of.unit == self.unit
            and of.concept is not None
            and (of.concept.system, of.concept.code) == self.analyte
        )

    def evaluate(
        self, prediction_time: datetime, window: timedelta, facts: Sequence[OutcomeFact], closed: bool
    ) -> Decision | None:
        end = prediction_time + window
        values = sorted((of for of in facts if self.relevant(of)), key=lambda of: (of.fact.time, of.fact.resource_id))
        before = [of for of in values if prediction_time - self.baseline_lookback <= of.fact.time < prediction_time]
        inside = [of for of in values if prediction_time <= of.fact.time <= end]
        if before:
            baseline, later = before[-1], inside
        elif inside:
            baseline, later = inside[0], inside[1:]
        else:
            return (Label.NEGATIVE, ()) if closed else None
        for i, of in enumerate(later):
            if self.relative_rise is not None and baseline.value > 0 \
                    and of.value >= self.relative_rise * baseline.value - _TOLERANCE:
                return Label.POSITIVE, (baseline.fact.resource_id, of.fact.resource_id)
            if self.absolute_rise is not None:
                since = of.fact.time - self.absolute_rise_within
                for ref in (baseline, *later[:i]):
                    if ref.fact.time >= since and of.value - ref.value >= self.absolute_rise - _TOLERANCE:
                        return Label.POSITIVE, (ref.fact.resource_id, of.fact.resource_id)
        if closed:
            return Label.NEGATIVE, tuple(dict.fromkeys(of.fact.resource_id for of in [baseline, *later]))
        return None


def definition_for(cfg: OutcomeConfig) -> OutcomeDefinition:
    """The executable definition for one configured outcome; a config that cannot be evaluated is refused here."""
    if cfg.kind == "code_set":
        if not cfg.codes:
            raise ValueError(f"outcome {cfg.ref}: kind code_set needs at least one entry in 'codes'")
        return CodeSetOutcome(ref=cfg.ref, codes=frozenset((c.system, c.code) for c in cfg.codes))
    missing = [name for name in ("analyte", "unit") if getattr(cfg, name) is None]
    if missing:
        raise ValueError(f"outcome {cfg.ref}: kind lab_rise needs {' and '.join(missing)}")
    if cfg.absolute_rise is None and cfg.relative_rise is None:
        raise ValueError(f"outcome {cfg.ref}: kind lab_rise needs absolute_rise, relative_rise or both")
    if cfg.relative_rise is not None and cfg.relative_rise <= 1:
        raise ValueError(f"outcome {cfg.ref}: relative_rise is a ratio to baseline, must be > 1: {cfg.relative_rise}")
    if cfg.absolute_rise is not None and cfg.absolute_rise <= 0:
        raise ValueError(f"outcome {cfg.ref}: absolute_rise must be > 0, got {cfg.absolute_rise}")
    return LabRiseOutcome(
        ref=cfg.ref,
        analyte=(cfg.analyte.system, cfg.analyte.code),
        unit=cfg.unit,
        absolute_rise=cfg.absolute_rise,
        relative_rise=cfg.relative_rise,
        baseline_lookback=cfg.baseline_lookback,
        absolute_rise_within=cfg.absolute_rise_within,
    )
