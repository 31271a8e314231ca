"""Computable outcome definitions: the ground truth a prediction is scored against, declared in config, versioned.

Every case records the ``ref`` ("id@version") of the definition that labelled it, so changing a definition is a
visible, auditable event rather than a silent shift in the metrics. A definition sees one subject's facts and says
POSITIVE as soon as the criterion is met inside the label window, NEGATIVE only once the window is closed, and
nothing (None) while it cannot yet tell.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from vigil.domain import Label, OutcomeFact
from vigil.settings import OutcomeConfig

Decision = tuple[Label, tuple[str, ...]]

_TOLERANCE = 1e-9
"""Slack on the lab thresholds so 1.3 − 1.0 counts as a rise of 0.3 despite binary floating point."""


def _order(of: OutcomeFact) -> tuple[datetime, str]:
    return of.fact.time, of.fact.resource_id


class FactTimeline:
    """One subject's facts that bear on an outcome, kept in (clinical time, resource id) order.

    The label join holds one per subject and updates it as facts arrive, are amended (a new version replaces the old,
    possibly at another time) or are retracted, so a definition takes its lookback and window slices by bisection
    instead of filtering and sorting all of the subject's facts for every pending prediction (BENCHMARKS.md R4).
    ``facts`` and ``times`` are parallel lists (``times[i] == facts[i].fact.time``); read them, do not modify them.
    Built from a sequence, a timeline keeps every element, even two versions of one resource, exactly as
    ``evaluate`` always treated its argument; ``put`` and ``remove`` keep one version per resource id.
    """

    __slots__ = ("facts", "times", "_by_id")

    def __init__(self, facts: Iterable[OutcomeFact] = ()) -> None:
        self.facts: list[OutcomeFact] = sorted(facts, key=_order)  # stable: ties keep their given order
        self.times: list[datetime] = [of.fact.time for of in self.facts]
        self._by_id: dict[str, OutcomeFact] = {of.fact.resource_id: of for of in self.facts}

    def __len__(self) -> int:
        return len(self.facts)

    def __contains__(self, resource_id: str) -> bool:
        return resource_id in self._by_id

    def put(self, of: OutcomeFact) -> None:
        """Add a fact, or replace the held version of the same resource."""
        rid = of.fact.resource_id
        old = self._by_id.get(rid)
        if old is not None:
            self._drop(old)
        self._by_id[rid] = of
        t, times, facts = of.fact.time, self.times, self.facts
        i = bisect_right(times, t)  # facts usually arrive in time order: this is the end of the list
        while i and times[i - 1] == t and facts[i - 1].fact.resource_id > rid:
            i -= 1
        times.insert(i, t)
        facts.insert(i, of)

    def remove(self, resource_id: str) -> OutcomeFact | None:
        """Take a resource's fact out (it was entered in error); the removed fact, or None if none was held."""
        of = self._by_id.pop(resource_id, None)
        if of is not None:
            self._drop(of)
        return of

    def drop_before(self, cutoff: datetime) -> int:
        """Forget every fact whose time is before ``cutoff``; returns how many."""
        n = bisect_left(self.times, cutoff)
        for of in self.facts[:n]:
            if self._by_id.get(of.fact.resource_id) is of:
                del self._by_id[of.fact.resource_id]
        del self.facts[:n], self.times[:n]
        return n

    def _drop(self, of: OutcomeFact) -> None:
        i = bisect_left(self.times, of.fact.time)
        while self.facts[i] is not of:  # past facts at the same instant (another resource id)
            i += 1
        del self.facts[i], self.times[i]


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

    def decide(
        self, prediction_time: datetime, window: timedelta, timeline: FactTimeline, closed: bool
    ) -> Decision | None:
        """``evaluate`` on facts already filtered by ``relevant`` and ordered (the label join's timeline)."""
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
        return self.decide(prediction_time, window, FactTimeline(of for of in facts if self.relevant(of)), closed)

    def decide(
        self, prediction_time: datetime, window: timedelta, timeline: FactTimeline, closed: bool
    ) -> Decision | None:
        times = timeline.times
        lo, hi = bisect_left(times, prediction_time), bisect_right(times, prediction_time + window)
        if lo < hi:  # evidence: every hit in time order, each resource once
            return Label.POSITIVE, tuple(dict.fromkeys(of.fact.resource_id for of in timeline.facts[lo:hi]))
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
        return self.decide(prediction_time, window, FactTimeline(of for of in facts if self.relevant(of)), closed)

    def decide(
        self, prediction_time: datetime, window: timedelta, timeline: FactTimeline, closed: bool
    ) -> Decision | None:
        values, times = timeline.facts, timeline.times
        lookback = bisect_left(times, prediction_time - self.baseline_lookback)  # first value in the lookback
        start = bisect_left(times, prediction_time)  # first value inside the window
        end = bisect_right(times, prediction_time + window)  # past the last value inside it
        if lookback < start:  # the latest value before the prediction, within the lookback
            baseline, later = values[start - 1], values[start:end]
        elif start < end:
            baseline, later = values[start], values[start + 1:end]
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
