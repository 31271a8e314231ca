"""Windowed discrimination and calibration per site × subgroup, from the stored cases, as metric points.

The detectors watch daily rates at the operating threshold; a safety officer and an inspector also ask how well the
device *ranks* and how well its risks are *calibrated*, period by period (FDA/IMDRF SaMD clinical evaluation, 2017
§7.2; TRIPOD, Collins et al. 2015). For every model version, site (and "all") and subgroup cell (and "all") this
computes, per window of ``period_days`` days:

- ``auroc`` with its 95 % DeLong interval (Hanley & McNeil when a window holds a single positive or negative);
- ``oe_ratio``, observed/expected events, with Garwood's exact Poisson interval;
- ``brier`` (no interval);
- ``calibration_slope`` and ``calibration_intercept`` by logistic recalibration, with Wald intervals
  (Van Calster et al. 2016, *J. Clin. Epidemiol.* 74:167).

The formulas are ``monitors.metrics``; this module only selects the cases and writes the points.

**Windows.** Calendar-aligned by prediction time: window k of a model version covers
``[anchor + k·period_days, anchor + (k+1)·period_days)``, where the anchor is UTC midnight of that version's first
stored prediction; ``period_start`` of a point is its window's start. The anchor depends only on the first
prediction, so windows stay put as the feed grows and a re-run replaces points in place.

**Settled cases only.** Positives are labeled as soon as their outcome arrives but negatives only when the label
window closes, so a window still inside its label window holds too many positives: its O/E and calibration would be
biased (the same reason ``vigil.pipeline`` releases mixed metrics only at window close). A case counts once
``predicted_at + label_window + label_grace`` ≤ the store's watermark — the latest prediction or label time stored
for the model, or ``as_of`` when the caller knows the feed's watermark. Censored and unlabeled cases never count.

**Small cells.** A window cell with fewer than ``min_n`` settled cases, or without both a positive and a negative,
gets no point and is counted as insufficient data (DESIGN.md §Statistics); the counts are in ``WindowReport`` and
logged (counts only, never a case).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pandas as pd
from sqlalchemy import Text, cast, delete, func, insert, select
from sqlalchemy.orm import Session

from monitors import metrics
from ontology import cells
from vigil.domain import ALL
from vigil.settings import ModelConfig, Settings, SubgroupConfig
from vigil.store import CaseRow, MetricPointRow, serialize

log = logging.getLogger(__name__)

WINDOW_METRICS = ("auroc", "oe_ratio", "brier", "calibration_slope", "calibration_intercept")
"""The metric names of window points in ``metric_points`` (distinct from the detectors' daily stream metrics)."""

RISK_CLIP = 1e-6
"""Risks of exactly 0 or 1 (scores rounded by the sender) are clipped to [1e-6, 1 − 1e-6] for the logistic
recalibration only, which needs a finite logit; O/E and Brier use the scores as sent."""

UNKNOWN_SITE = "unknown"  # what the pipeline calls a prediction without a site


@dataclass
class WindowReport:
    """What one computation produced: the point rows, and why the cells without points have none."""

    points: list[dict] = field(default_factory=list)
    insufficient: Counter = field(default_factory=Counter)  # (model, version) → window cells below min_n / one class
    not_fitted: Counter = field(default_factory=Counter)  # (model, version) → metrics a cell could not support
    pending: Counter = field(default_factory=Counter)  # (model, version) → labeled cases still in their label window
    skipped_models: list[str] = field(default_factory=list)  # models in the store but not configured


def compute_window_metrics(session: Session, settings: Settings, period_days: int = 30, min_n: int | None = None,
                           as_of: datetime | None = None) -> int:
    """Replace every configured model version's window points in the caller's transaction; returns how many
    points were written. ``min_n`` defaults to ``settings.subgroups.min_n``; ``as_of`` (the feed's watermark)
    defaults to the latest prediction or label time stored per model."""
    report = window_metrics(session, settings, period_days, min_n, as_of)
    return len(report.points)


def window_metrics(session: Session, settings: Settings, period_days: int = 30, min_n: int | None = None,
                   as_of: datetime | None = None) -> WindowReport:
    """``compute_window_metrics`` with the full report (points, insufficient cells, pending cases)."""
    if period_days < 1:
        raise ValueError(f"period_days must be a whole number of days ≥ 1, got {period_days}")
    min_n = settings.subgroups.min_n if min_n is None else min_n
    if min_n < 1:
        raise ValueError(f"min_n must be ≥ 1, got {min_n} (settings: subgroups.min_n)")
    if as_of is not None and as_of.tzinfo is None:
        raise ValueError(f"as_of must be timezone-aware UTC, got the naive {as_of.isoformat()}")
    report = WindowReport()
    serialize(session, "metric_points.window")  # replaced as a whole: two processes (stage 2) must not interleave
    for model in sorted(session.scalars(select(CaseRow.model).distinct())):
        config = settings.model(model)
        if config is None:
            report.skipped_models.append(model)
            log.warning("window metrics: model %r has stored cases but no entry under models: in the config, so "
                        "its label window is unknown; its window points are left as they are", model)
            continue
        frame = load_cases(session, model)
        watermark = as_of or store_watermark(session, model)
        for version, cases in frame.groupby("model_version", sort=True):
            points = window_points(cases, config, settings.subgroups, watermark, period_days, min_n, report)
            session.execute(delete(MetricPointRow).where(MetricPointRow.model == model,
                                                         MetricPointRow.model_version == version,
                                                         MetricPointRow.metric.in_(WINDOW_METRICS)))
            if points:
                session.execute(insert(MetricPointRow), points)
            report.points += points
    for (model, version), count in sorted(report.insufficient.items()):
        log.info("window metrics: %s@%s has %d window cells with insufficient data (n < %d or one outcome only)",
                 model, version, count, min_n)
    return report


_COLUMNS = (CaseRow.model_version, CaseRow.site, cast(CaseRow.attributes, Text).label("attributes"),
            CaseRow.predicted_at, CaseRow.score, CaseRow.label)


def load_cases(session: Session, model: str) -> pd.DataFrame:
    """Every stored case of ``model`` (the unlabeled ones fix the window anchor).

    The attributes come as JSON text and only the distinct texts are parsed: a feed has a few hundred attribute
    combinations, not one per case, and parsing each row's JSON dominated the load time."""
    # ordered: float sums must not depend on the order the store happens to return rows in (deterministic replay)
    rows = session.execute(select(*_COLUMNS).where(CaseRow.model == model).order_by(CaseRow.prediction_id)).all()
    frame = pd.DataFrame(rows, columns=["model_version", "site", "attributes", "predicted_at", "score", "label"])
    frame["predicted_at"] = pd.to_datetime(frame["predicted_at"], utc=True)
    frame["site"] = frame["site"].fillna(UNKNOWN_SITE)
    codes, texts = pd.factorize(frame["attributes"].fillna("{}"))
    parsed = [json.loads(text) or {} for text in texts]
    frame["attributes"] = [parsed[c] for c in codes]
    return frame


def store_watermark(session: Session, model: str) -> datetime:
    """The latest event time the store has seen for a model: every label window that closed before it is closed."""
    latest = session.execute(select(func.max(CaseRow.predicted_at), func.max(CaseRow.labeled_at))
                             .where(CaseRow.model == model)).one()
    return max(t for t in latest if t is not None)


def window_points(cases: pd.DataFrame, config: ModelConfig, subgroups: SubgroupConfig, watermark: datetime,
                  period_days: int, min_n: int, report: WindowReport | None = None) -> list[dict]:
    """Point rows of one model version from its cases (columns as ``load_cases``), settled by ``watermark``."""
    report = report if report is not None else WindowReport()
    if cases.empty:
        return []
    versions = cases["model_version"].unique()
    if versions.size != 1:
        raise ValueError(f"window_points takes the cases of one model version, got versions {sorted(versions)}")
    model, version = config.id, str(versions[0])
    anchor = cases["predicted_at"].min().floor("D")
    closes = pd.Timestamp(watermark) - pd.Timedelta(config.label_window + config.label_grace)
    labeled = cases["label"].isin(("positive", "negative"))
    settled = labeled & (cases["predicted_at"] <= closes)
    report.pending[(model, version)] += int((labeled & ~settled).sum())
    done = cases[settled]
    if done.empty:
        return []
    score = done["score"].to_numpy(dtype=float)
    outcome = (done["label"] == "positive").to_numpy(dtype=float)
    period = ((done["predicted_at"] - anchor) // pd.Timedelta(days=period_days)).to_numpy(dtype=np.int64)
    members = _memberships(done["site"].tolist(), done["attributes"].tolist(), subgroups)
    rows: list[dict] = []
    groups = pd.DataFrame({"case": members[0], "site": members[1], "subgroup": members[2],
                           "period": period[members[0]]}).groupby(["site", "subgroup", "period"], sort=True).indices
    case_of = members[0]
    same: dict[bytes, list[tuple[str, dict]]] = {}  # cells holding the very same cases share their estimates
    for (site, subgroup, k), positions in groups.items():
        idx = case_of[positions]
        n, events = idx.size, int(outcome[idx].sum())
        if n < min_n or events == 0 or events == n:
            report.insufficient[(model, version)] += 1
            continue
        fingerprint = idx.tobytes()
        if fingerprint not in same:  # e.g. a site's only scanner is that site's "all"
            same[fingerprint] = list(_estimates(score[idx], outcome[idx], report, (model, version)))
        key = {"model": model, "model_version": version, "site": site, "subgroup": subgroup,
               "period_start": (anchor + pd.Timedelta(days=period_days * int(k))).to_pydatetime(), "n": int(n),
               "statistic": None, "threshold": None}
        rows += ({**key, "metric": metric, **estimate} for metric, estimate in same[fingerprint])
    return rows


def _memberships(sites: list[str], attrs: list[dict], subgroups: SubgroupConfig
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(case index, site, subgroup) for every stream cell a case counts in: its site and "all", each of its subgroup
    cells (``ontology.cells``, the same cells the pipeline's streams use).

    ``cells`` runs once per distinct attribute combination; the expansion to cases is index arithmetic."""
    combo, uniques = pd.factorize(pd.Series([tuple(sorted((a or {}).items())) for a in attrs], dtype=object))
    per_combo = [cells(dict(key), subgroups) for key in uniques]
    flat = np.asarray([c for these in per_combo for c in these], dtype=object)
    sizes = np.fromiter((len(these) for these in per_combo), dtype=np.int64, count=len(per_combo))
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    count = sizes[combo]  # cells per case
    case = np.repeat(np.arange(len(attrs), dtype=np.int64), count)
    first = np.repeat(np.cumsum(count) - count, count)  # where each case's run begins in ``case``
    cell = flat[np.repeat(starts[combo], count) + np.arange(case.size) - first]
    site = np.asarray(sites, dtype=object)[case]
    own = site != ALL  # a case counts at its own site and at "all"
    return (np.concatenate((case[own], case)), np.concatenate((site[own], np.full(case.size, ALL, dtype=object))),
            np.concatenate((cell[own], cell)))


def _estimates(s: np.ndarray, y: np.ndarray, report: WindowReport, key: tuple[str, str]
               ) -> Iterable[tuple[str, dict]]:
    """The five metrics of one window cell that has both outcomes, each as value and interval columns. A metric the
    cell cannot support (separated outcomes for the recalibration; all risks 0 for O/E) is left out and counted."""
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    method = "delong" if min(n_pos, n_neg) >= 2 else "hanley_mcneil"
    yield "auroc", _columns(metrics.auroc(s, y, method=method))
    yield "brier", {"value": metrics.brier(s, y), "ci_low": None, "ci_high": None}
    try:
        yield "oe_ratio", _columns(metrics.observed_expected(s, y))
    except ValueError:
        report.not_fitted[key] += 1
    try:
        fit = metrics.calibration_intercept_slope(np.clip(s, RISK_CLIP, 1.0 - RISK_CLIP), y)
    except (ValueError, np.linalg.LinAlgError):  # no finite maximum-likelihood fit
        report.not_fitted[key] += 1
        return
    yield "calibration_slope", _columns(fit["slope"])
    yield "calibration_intercept", _columns(fit["intercept"])


def _columns(e: metrics.Estimate) -> dict:
    finite = [v if math.isfinite(v) else None for v in (e.value, e.low, e.high)]
    return {"value": finite[0], "ci_low": finite[1], "ci_high": finite[2]}

