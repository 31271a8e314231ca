"""Cause triage: group one model's alerts into root causes before anyone touches the model.

Fix the cause before the model (pccp.md §8.1 principle 2): data-quality and acquisition causes are tried before
population and subgroup causes, because re-training on corrupted data breaks the data-quality controls of
S3 App. A 1.b, and a new scanner is an *input* modification (S3 §VI.C(ii)), not a performance one. The causes
follow the drift taxonomy of the FDA lifecycle draft (S4 §XI): input data integrity, shifts in input data,
patient demographics / prevalence, and the rest.

Confidence is an additive evidence score: each piece of evidence adds a stated weight, the reasons go to
``rationale``, and the sum is capped below 1 because triage from monitoring streams alone is never certain.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from retrain_trigger.pccp import inside_ifu, parse_cell
from vigil.domain import ALL, Alert

DATA_QUALITY_METRICS = frozenset({"unmapped_rate", "no_followup_rate", "missing_rate", "duplicate_rate",
                                  "schema_mismatch_rate"})
SCORE_METRICS = frozenset({"score_mean"})
PREVALENCE_METRICS = frozenset({"outcome_rate"})
CALIBRATION_METRICS = frozenset({"calibration_oe"})  # O/E above its baseline: recalibration's target

DATA_QUALITY_WINDOW = timedelta(days=30)
ACQUISITION_BEFORE = timedelta(days=30)
ACQUISITION_AFTER = timedelta(days=7)
MAX_CONFIDENCE = 0.95


@dataclass(slots=True, frozen=True)
class AcquisitionChange:
    """A scanner first seen at a site after the baseline period."""

    site: str
    first_seen: datetime
    manufacturer: str
    model: str


@dataclass(slots=True)
class TriageContext:
    sites: list[str]  # all sites of the device
    acquisition_changes: list[AcquisitionChange]  # scanners first seen after the baseline period
    indications_min_age: int | None = None


@dataclass(slots=True)
class CauseHypothesis:
    cause: str  # data_quality | acquisition_device | population_shift | subgroup_performance | concept_drift | unknown
    confidence: float
    remedy: str  # a pccp.RemedyType
    scope_sites: list[str]  # the sites whose data the evidence covers
    scope_subgroups: list[str]
    rationale: list[str]
    acquisition_changes: list[AcquisitionChange] = field(default_factory=list)


class _Evidence:
    """Additive evidence score with its reasons."""

    def __init__(self) -> None:
        self.score = 0.0
        self.reasons: list[str] = []

    def add(self, weight: float, reason: str) -> None:
        self.score += weight
        self.reasons.append(f"{reason} (+{weight:.2f})")

    @property
    def confidence(self) -> float:
        return round(min(MAX_CONFIDENCE, self.score), 3)


def is_data_quality(alert: Alert) -> bool:
    return alert.signal.stream.metric in DATA_QUALITY_METRICS


def is_score(alert: Alert) -> bool:
    return alert.signal.stream.metric in SCORE_METRICS


def is_prevalence(alert: Alert) -> bool:
    return alert.signal.stream.metric in PREVALENCE_METRICS


def is_calibration(alert: Alert) -> bool:
    return alert.signal.stream.metric in CALIBRATION_METRICS


def is_performance(alert: Alert) -> bool:
    return not (is_data_quality(alert) or is_score(alert) or is_prevalence(alert) or is_calibration(alert))


def _sort_key(alert: Alert) -> tuple:
    k = alert.signal.stream
    return (k.site, k.subgroup, k.metric, alert.signal.detector, alert.signal.change_estimate, alert.id)


def _fmt(alert: Alert) -> str:
    k = alert.signal.stream
    return f"{alert.id} ({k.metric} site={k.site} {k.subgroup}, change ≈ {alert.signal.change_estimate:%Y-%m-%d})"


def _sites(alerts: Iterable[Alert]) -> list[str]:
    return sorted({a.signal.stream.site for a in alerts if a.signal.stream.site != ALL})


def _subgroups(alerts: Iterable[Alert]) -> list[str]:
    return sorted({a.signal.stream.subgroup for a in alerts})


class _Pool:
    """The alerts not yet explained, in a fixed order."""

    def __init__(self, alerts: Sequence[Alert]) -> None:
        self.left: list[Alert] = sorted(alerts, key=_sort_key)

    def take(self, chosen: Iterable[Alert]) -> list[Alert]:
        ids = {a.id for a in chosen}
        taken = [a for a in self.left if a.id in ids]
        self.left = [a for a in self.left if a.id not in ids]
        return taken

    def explained_all_site(self, members: Sequence[Alert]) -> list[Alert]:
        """Alerts at site "all" that a member at a specific site explains: same metric, same or "all" subgroup."""
        out = []
        for a in self.left:
            k = a.signal.stream
            if k.site != ALL:
                continue
            for m in members:
                mk = m.signal.stream
                if (
                    mk.site != ALL
                    and mk.metric == k.metric
                    and mk.subgroup in (k.subgroup, ALL)
                    and abs(m.signal.change_estimate - a.signal.change_estimate) <= DATA_QUALITY_WINDOW
                ):
                    out.append(a)
                    break
        return out

    def subgroup_followers(self, members: Sequence[Alert]) -> list[Alert]:
        """Subgroup alerts at a site (or "all") whose all-subgroup stream is already a member."""
        sites = {m.signal.stream.site for m in members if m.signal.stream.subgroup == ALL}
        return [a for a in self.left if a.signal.stream.subgroup != ALL and a.signal.stream.site in sites]


def triage(alerts: Sequence[Alert], ctx: TriageContext) -> list[tuple[CauseHypothesis, list[Alert]]]:
    """Group the alerts of ONE model into root causes, most specific cause first; deterministic in the input set."""
    models = sorted({(a.signal.stream.model, a.signal.stream.version) for a in alerts})
    if len({m for m, _ in models}) > 1:
        raise ValueError(f"triage takes the alerts of one model; got alerts for {[m for m, _ in models]}")
    pool = _Pool(alerts)
    found: list[tuple[CauseHypothesis, list[Alert]]] = []
    for step in (_data_quality, _acquisition_device, _population_shift, _subgroup_performance, _leftover):
        found.extend((hypothesis, sorted(members, key=_sort_key)) for hypothesis, members in step(pool, ctx))
    return found


# --- (a) data quality ---------------------------------------------------------------------


def _data_quality(pool: _Pool, ctx: TriageContext) -> list[tuple[CauseHypothesis, list[Alert]]]:
    out = []
    # specific sites first: an all-site data-quality alert is then explained by the site whose feed broke
    for site in sorted({a.signal.stream.site for a in pool.left if is_data_quality(a)}, key=lambda s: (s == ALL, s)):
        dq = [a for a in pool.left if is_data_quality(a) and a.signal.stream.site == site]
        if not dq:  # already explained by a specific site
            continue
        onset = min(a.signal.change_estimate for a in dq)
        covered = ctx.sites if site == ALL else [site]
        joined = [
            a
            for a in pool.left
            if not is_data_quality(a)
            and site in (ALL, a.signal.stream.site)
            and abs(a.signal.change_estimate - onset) <= DATA_QUALITY_WINDOW
        ]
        members = pool.take(dq + joined)
        members += pool.take(pool.explained_all_site(members))
        ev = _Evidence()
        ev.add(0.6, f"data-quality alert(s) at site {site}: {', '.join(_fmt(a) for a in dq)}")
        perf = [a for a in members if not is_data_quality(a)]
        if perf:
            ev.add(0.25, f"{len(perf)} performance/score alert(s) changed within ±30 days of the feed defect")
        others = _sites(a for a in pool.left if is_performance(a) and a.signal.stream.site not in covered)
        if perf and not others:
            ev.add(0.1, "no other site shows a performance alert, so the model itself is not implicated")
        ev.reasons.append(
            "remedy: fix the pipeline and re-measure; do not re-train on the affected data (S3 App. A 1.b)"
        )
        out.append(
            (
                CauseHypothesis(
                    "data_quality", ev.confidence, "pipeline_fix", sorted(covered), _subgroups(members), ev.reasons
                ),
                members,
            )
        )
    return out


# --- (b) acquisition device ---------------------------------------------------------------


def _acquisition_device(pool: _Pool, ctx: TriageContext) -> list[tuple[CauseHypothesis, list[Alert]]]:
    out = []
    by_site: dict[str, list[AcquisitionChange]] = {}
    for change in sorted(ctx.acquisition_changes, key=lambda c: (c.site, c.first_seen, c.manufacturer, c.model)):
        by_site.setdefault(change.site, []).append(change)
    for site, changes in sorted(by_site.items()):
        matched: list[Alert] = []
        used: list[AcquisitionChange] = []
        for a in pool.left:
            if a.signal.stream.site != site or is_data_quality(a):
                continue
            t = a.signal.change_estimate
            hits = [c for c in changes if t - ACQUISITION_BEFORE <= c.first_seen <= t + ACQUISITION_AFTER]
            if hits:
                matched.append(a)
                used.extend(c for c in hits if c not in used)
        if not matched:
            continue
        members = pool.take(matched)
        members += pool.take(pool.explained_all_site(members))
        ev = _Evidence()
        names = ", ".join(f"{c.manufacturer} {c.model} (first seen {c.first_seen:%Y-%m-%d})" for c in used)
        ev.add(0.5, f"new acquisition device at {site}: {names}, within 30 days before (or 7 after) the change")
        perf_metrics = sorted({a.signal.stream.metric for a in members if is_performance(a)})
        if len(perf_metrics) >= 2:
            ev.add(0.15, f"{len(perf_metrics)} performance metrics moved at {site}: {', '.join(perf_metrics)}")
        lag = min(abs(a.signal.change_estimate - c.first_seen) for a in members for c in used)
        ev.add(
            round(0.2 * max(0.0, 1 - lag / ACQUISITION_BEFORE), 3),
            f"closest change estimate {lag.days} day(s) from first use",
        )
        others = _sites(a for a in pool.left if is_performance(a) and a.signal.stream.site != site)
        if not others:
            ev.add(0.1, "no other site shows a performance alert: the degradation is local to the new device")
        explained = [a for a in members if a.signal.stream.site == ALL]
        if explained:
            ev.reasons.append(f"explains the all-site alert(s) {', '.join(a.id for a in explained)}")
        out.append(
            (
                CauseHypothesis(
                    "acquisition_device",
                    ev.confidence,
                    "new_input_source_same_type",
                    [site],
                    _subgroups(members),
                    ev.reasons,
                    used,
                ),
                members,
            )
        )
    return out


# --- (c) population shift -----------------------------------------------------------------


def _population_shift(pool: _Pool, ctx: TriageContext) -> list[tuple[CauseHypothesis, list[Alert]]]:
    whole = [a for a in pool.left if a.signal.stream.subgroup == ALL and not is_data_quality(a)]
    at_all = [a for a in whole if a.signal.stream.site == ALL]
    sites = _sites(whole)
    if not at_all and 2 * len(sites) < len(ctx.sites):
        return []
    members = pool.take(whole)
    members += pool.take(pool.subgroup_followers(members))
    ev = _Evidence()
    ev.add(
        0.3,
        f"whole-population alerts at {', '.join(sites) or 'no single site'}" + (" and at site all" if at_all else ""),
    )
    if ctx.sites:
        frac = len(set(sites) & set(ctx.sites)) / len(ctx.sites)
        ev.add(round(0.3 * frac, 3), f"{len(set(sites) & set(ctx.sites))} of {len(ctx.sites)} sites alerted")
    if at_all:
        ev.add(0.1, "the pooled (all-site) stream alerted")
    if any(is_score(a) for a in members):
        ev.add(0.2, "the score distribution moved (score_mean): a covariate/prior shift, which recalibration addresses")
    if any(is_prevalence(a) for a in members):
        ev.add(0.2, "the outcome rate moved (outcome_rate): a prior (prevalence) shift, which recalibration addresses")
    if any(is_calibration(a) for a in members):
        ev.add(0.2, "observed/expected events rose above the baseline's (calibration_oe, risk-adjusted CUSUM): "
                    "calibration drift, which recalibration addresses")
    scope = ctx.sites if at_all or not sites else sites
    return [
        (
            CauseHypothesis(
                "population_shift", ev.confidence, "recalibration", sorted(scope), _subgroups(members), ev.reasons
            ),
            members,
        )
    ]


# --- (d) subgroup performance -------------------------------------------------------------


def _subgroup_performance(pool: _Pool, ctx: TriageContext) -> list[tuple[CauseHypothesis, list[Alert]]]:
    out = []
    whole_sites = {a.signal.stream.site for a in pool.left if a.signal.stream.subgroup == ALL}
    for cell in sorted({a.signal.stream.subgroup for a in pool.left if a.signal.stream.subgroup != ALL}):
        cell_alerts = [a for a in pool.left if a.signal.stream.subgroup == cell and not is_data_quality(a)]
        at_all = [a for a in cell_alerts if a.signal.stream.site == ALL]
        sites = [s for s in _sites(cell_alerts) if s not in whole_sites]
        if not at_all and len(sites) < 2:
            continue
        members = pool.take(a for a in cell_alerts if a.signal.stream.site in (*sites, ALL))
        ev = _Evidence()
        ev.add(0.3, f"subgroup {cell} alerted while the whole population at those sites did not")
        ev.add(min(0.3, 0.15 * len(sites)), f"at {len(sites)} site(s): {', '.join(sites) or '-'}")
        if at_all:
            ev.add(0.2, "the pooled (all-site) stream of the subgroup alerted")
        if len({a.signal.stream.metric for a in members}) >= 2:
            ev.add(0.1, "more than one metric moved in the subgroup")
        if inside_ifu(parse_cell(cell), ctx.indications_min_age):
            remedy = "retrain_same_arch_new_data"
            ev.reasons.append(f"{cell} is inside the indications: re-train with more data from it (S3 §VI.C(i),(iii))")
        else:
            remedy = "population_outside_IFU"
            ev.reasons.append(
                f"{cell} lies outside the indicated ages (≥ {ctx.indications_min_age}): off-label use; the remedy "
                "is labeling and a use restriction, not re-training (pccp.md §8.4 R3)"
            )
        scope = ctx.sites if at_all else sites
        out.append(
            (CauseHypothesis("subgroup_performance", ev.confidence, remedy, sorted(scope), [cell], ev.reasons), members)
        )
    return out


# --- (e) whatever is left -----------------------------------------------------------------


def _leftover(pool: _Pool, ctx: TriageContext) -> list[tuple[CauseHypothesis, list[Alert]]]:
    out = []
    for site in sorted({a.signal.stream.site for a in pool.left}):
        members = pool.take([a for a in pool.left if a.signal.stream.site == site])
        ev = _Evidence()
        if any(is_performance(a) for a in members) and not any(is_score(a) for a in members):
            cause = "concept_drift"
            ev.add(
                0.3,
                f"performance moved at {site} while its score distribution did not: the label given the "
                "inputs may have changed",
            )
        else:
            cause = "unknown"
            ev.add(0.2, f"alerts at {site} match no data-quality, acquisition, population or subgroup pattern")
        ev.reasons.append("investigate before any model change; do not re-train blindly (pccp.md §8.4 R2)")
        out.append((CauseHypothesis(cause, ev.confidence, "none", [site], _subgroups(members), ev.reasons), members))
    return out
