"""Windowed AUROC, O/E, Brier and calibration per site × subgroup, computed from a store the real pipeline filled.

The feed is the simulator's scanner upgrade (site-b's CT scanner is replaced on day 60; the CTA model's sensitivity
there falls from 0.85 to 0.60), ingested, joined and monitored by ``vigil.pipeline`` and stored by
``vigil.persist`` — on SQLite, and once more on the session's real PostgreSQL.
"""

from __future__ import annotations

import functools
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from scipy import integrate
from scipy.special import expit, logit
from scipy.stats import norm
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from monitors import metrics
from vigil.performance import (
    WINDOW_METRICS,
    WindowReport,
    compute_window_metrics,
    load_cases,
    store_watermark,
    window_metrics,
    window_points,
)
from vigil.persist import persist
from vigil.pipeline import Pipeline
from vigil.scenarios import CTA
from vigil.settings import load_settings
from vigil.simulator import SCORE_SD, simulate
from vigil.store import CaseRow, MetricPointRow, engine_for, upgrade

CHANGE_DAY, DAYS = 60, 150
START = datetime(2026, 1, 1, tzinfo=UTC)
CHANGE = START + timedelta(days=CHANGE_DAY)
PERIOD = timedelta(days=30)  # compute_window_metrics' default; day 60 is the start of window 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(settings, pipeline result) of one scanner-upgrade feed."""
    feed = tmp_path_factory.mktemp("feed")
    simulate("scanner-upgrade", feed, seed=11, days=DAYS, change_day=CHANGE_DAY, volume=0.5)
    settings = load_settings()
    return settings, Pipeline(settings).run_paths([feed])


@pytest.fixture(scope="module")
def store(run, tmp_path_factory):
    """A SQLite store holding the run and its window metrics: (settings, engine, points written, report)."""
    settings, result = run
    settings = settings.model_copy(update={"store_url": f"sqlite:///{tmp_path_factory.mktemp('store') / 'v.db'}"})
    persist(result, settings, ["feed"], datetime.now(UTC))
    engine = engine_for(settings.store_url)
    with Session(engine) as session, session.begin():
        report = window_metrics(session, settings)
    yield settings, engine, len(report.points), report
    engine.dispose()


def _points(engine, **where) -> list[MetricPointRow]:
    with Session(engine) as session:
        query = select(MetricPointRow).where(MetricPointRow.metric.in_(WINDOW_METRICS))
        for column, value in where.items():
            query = query.where(getattr(MetricPointRow, column) == value)
        return list(session.scalars(query.order_by(MetricPointRow.model, MetricPointRow.model_version,
                                                   MetricPointRow.metric, MetricPointRow.site,
                                                   MetricPointRow.subgroup, MetricPointRow.period_start)))


def _cases(engine, model: str) -> list[CaseRow]:
    with Session(engine) as session:
        return list(session.scalars(select(CaseRow).where(CaseRow.model == model)))


def _window(cases: list[CaseRow], k: int, site: str | None = None, **attrs: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores and 0/1 outcomes of the labeled cases of window k (30 days from UTC midnight of the first prediction),
    selected by hand from the stored rows."""
    anchor = min(c.predicted_at for c in cases).replace(hour=0, minute=0, second=0, microsecond=0)
    start = anchor + k * PERIOD
    chosen = [c for c in cases if c.label in ("positive", "negative") and start <= c.predicted_at < start + PERIOD
              and (site is None or c.site == site) and all(c.attributes.get(a) == v for a, v in attrs.items())]
    return (np.array([c.score for c in chosen]), np.array([float(c.label == "positive") for c in chosen]))


def _value(points: list[MetricPointRow], metric: str, site: str, subgroup: str, k: int) -> MetricPointRow | None:
    start = START + k * PERIOD
    return next((p for p in points if (p.metric, p.site, p.subgroup, p.period_start) == (metric, site, subgroup,
                                                                                        start)), None)


# --- what is written --------------------------------------------------------------------------------------------


def test_every_model_gets_all_five_metrics_per_site_and_overall(store) -> None:
    settings, engine, written, _ = store
    points = _points(engine)
    assert written == len(points) > 0
    for model, sites in (("cta-stenosis", ("site-a", "site-b", "site-c", "all")),
                         ("aki-risk", ("site-a", "site-b", "site-c", "all"))):
        for site in sites:
            cell = {p.metric for p in points if p.model == model and p.site == site and p.subgroup == "all"}
            assert cell == set(WINDOW_METRICS), (model, site)
    subgroups = {p.subgroup for p in points if p.model == "cta-stenosis"}
    assert {"all", "sex=female", "sex=male", "age_band=50-64"} <= subgroups
    assert all(p.statistic is None and p.threshold is None for p in points)


def test_windows_are_30_days_from_midnight_of_the_first_prediction(store) -> None:
    _, engine, _, _ = store
    starts = {p.period_start for p in _points(engine)}
    assert min(starts) == START  # the first prediction of both models falls on 2026-01-01
    assert all((s - START) % PERIOD == timedelta(0) for s in starts)


def test_values_lie_inside_their_confidence_intervals(store) -> None:
    _, engine, _, _ = store
    points = _points(engine)
    for p in points:
        assert p.n >= 30, p
        if p.metric == "brier":
            assert 0.0 <= p.value <= 1.0 and p.ci_low is None and p.ci_high is None
        else:
            assert p.ci_low <= p.value <= p.ci_high, p
        if p.metric == "auroc":
            assert 0.0 <= p.ci_low and p.ci_high <= 1.0
    assert sum(p.metric == "auroc" for p in points) > 100


def test_a_site_cell_and_a_subgroup_cell_match_monitors_metrics_on_the_same_cases(store) -> None:
    """Cross-check by hand: pick the cases of a window from the stored rows and compute with monitors.metrics."""
    _, engine, _, _ = store
    points = _points(engine, model="cta-stenosis")
    cases = _cases(engine, "cta-stenosis")
    for site, subgroup, attrs, k in (("site-b", "all", {}, 0), ("site-a", "sex=female", {"sex": "female"}, 1)):
        s, y = _window(cases, k, site, **attrs)
        assert 30 <= y.size and 0 < y.sum() < y.size
        auroc = _value(points, "auroc", site, subgroup, k)
        assert auroc.n == y.size
        direct = metrics.auroc(s, y)
        assert (auroc.value, auroc.ci_low, auroc.ci_high) == pytest.approx((direct.value, direct.low, direct.high),
                                                                           abs=1e-12)
        oe = metrics.observed_expected(s, y)
        assert _value(points, "oe_ratio", site, subgroup, k).value == pytest.approx(oe.value, abs=1e-12)
        assert _value(points, "brier", site, subgroup, k).value == pytest.approx(metrics.brier(s, y), abs=1e-12)
        fit = metrics.calibration_intercept_slope(s, y)
        slope = _value(points, "calibration_slope", site, subgroup, k)
        assert (slope.value, slope.ci_low, slope.ci_high) == pytest.approx(
            (fit["slope"].value, fit["slope"].low, fit["slope"].high), abs=1e-9)
        intercept = _value(points, "calibration_intercept", site, subgroup, k)
        assert intercept.value == pytest.approx(fit["intercept"].value, abs=1e-9)
    # "all" pools the sites: its window 0 holds every site's cases
    s, y = _window(cases, 0)
    assert _value(points, "auroc", "all", "all", 0).value == pytest.approx(metrics.auroc(s, y).value, abs=1e-12)


def test_cells_below_min_n_or_with_one_outcome_get_no_point_and_are_counted(store) -> None:
    settings, engine, _, report = store
    min_n = settings.subgroups.min_n
    points = _points(engine, model="cta-stenosis")
    cases = _cases(engine, "cta-stenosis")
    # Native Hawaiian or Other Pacific Islander: 1 % of patients, so a handful per site and window
    _, y = _window(cases, 0, "site-b", race="nhpi")
    race_values = {c.attributes.get("race") for c in cases}
    assert "nhpi" in race_values, race_values
    assert 0 < y.size < min_n
    assert _value(points, "auroc", "site-b", "race=nhpi", 0) is None
    assert report.insufficient[("cta-stenosis", CTA.version)] > 0


def test_min_n_is_the_gate_exactly(store) -> None:
    """A cell with n cases has points at min_n = n and none at min_n = n + 1 (site-c's cases only, to stay quick)."""
    settings, engine, _, _ = store
    _, y = _window(_cases(engine, "cta-stenosis"), 1, "site-c", sex="male")
    n = y.size
    assert 0 < y.sum() < n
    with Session(engine) as session:
        frame = load_cases(session, "cta-stenosis")
        watermark = store_watermark(session, "cta-stenosis")
    frame = frame[frame["site"] == "site-c"]
    config = settings.model("cta-stenosis")
    for min_n, present in ((n, True), (n + 1, False)):
        rows = window_points(frame, config, settings.subgroups, watermark, 30, min_n)
        got = [r for r in rows if (r["metric"], r["site"], r["subgroup"], r["period_start"])
               == ("auroc", "site-c", "sex=male", START + PERIOD)]
        assert [r["n"] for r in got] == ([n] if present else []), min_n


def test_cases_still_inside_their_label_window_are_left_out(store) -> None:
    """CTA labels close 90 + 14 days after the prediction; before that only positives are labeled, so counting them
    would inflate O/E. The last settled CTA prediction is 104 days before the store's latest label."""
    settings, engine, _, report = store
    with Session(engine) as session:
        latest = session.scalar(select(func.max(CaseRow.labeled_at)).where(CaseRow.model == "cta-stenosis"))
        early_positives = session.scalar(select(func.count()).select_from(CaseRow).where(
            CaseRow.model == "cta-stenosis", CaseRow.label == "positive",
            CaseRow.predicted_at > latest - timedelta(days=104)))
    assert early_positives > 0 and report.pending[("cta-stenosis", CTA.version)] >= early_positives
    cta = _points(engine, model="cta-stenosis", site="all", subgroup="all", metric="oe_ratio")
    assert max(p.period_start for p in cta) <= latest - timedelta(days=104)
    # AKI's window is 48 h + 3 days: its last window (from day 120) is settled and present
    aki = _points(engine, model="aki-risk", site="all", subgroup="all", metric="auroc")
    assert max(p.period_start for p in aki) == START + 4 * PERIOD


# --- what the numbers say about the simulated devices ----------------------------------------------------------


@functools.cache
def _binormal_truth(sensitivity: float) -> tuple[float, float, float]:
    """AUROC, O/E and calibration slope of the simulator's CTA score model (``vigil.simulator._binormal_scores``):
    logit(score) ~ N(cut − sd₀Φ⁻¹(spec), sd₀²) for negatives and N(cut + sd₁Φ⁻¹(sens), sd₁²) for positives.
    O/E by quadrature, the slope by a logistic fit to 200,000 draws from the same model."""
    sd0, sd1 = SCORE_SD
    cut = logit(CTA.threshold)
    mu0, mu1 = cut - sd0 * norm.ppf(CTA.specificity), cut + sd1 * norm.ppf(sensitivity)
    auroc = float(norm.cdf((mu1 - mu0) / math.hypot(sd0, sd1)))
    mean_risk = [integrate.quad(lambda x, m=m, s=s: expit(x) * norm.pdf(x, m, s), -40, 40)[0]
                 for m, s in ((mu0, sd0), (mu1, sd1))]
    oe = CTA.prevalence / ((1 - CTA.prevalence) * mean_risk[0] + CTA.prevalence * mean_risk[1])
    rng = np.random.default_rng(0)
    y = rng.random(200_000) < CTA.prevalence
    x = np.where(y, rng.normal(mu1, sd1, y.size), rng.normal(mu0, sd0, y.size))
    slope = metrics.calibration_intercept_slope(expit(x), y.astype(float))["slope"].value
    return auroc, oe, slope


def _covers(point: MetricPointRow, truth: float, z: float = 3.29) -> bool:
    """Whether the point's interval, widened from 95 % to a two-sided (1 − 0.001) level, covers ``truth``: dozens of
    windows are checked at once, so each gets a Bonferroni-sized interval (family error ≈ 5 % over 36 checks)."""
    scale = z / 1.959963984540054
    return (point.value - scale * (point.value - point.ci_low) <= truth
            <= point.value + scale * (point.ci_high - point.value))


def test_the_stable_cta_model_ranks_well_but_its_scores_are_not_calibrated_probabilities(store) -> None:
    """The simulator draws scores from a binormal ROC model placed to hit sensitivity 0.85 and specificity 0.80 at
    the 0.5 threshold — not calibrated risks. With prevalence 0.25 the mean score is ~0.38, so O/E ≈ 0.65 (risks
    overestimated), and the narrower spread of positives' log-odds makes the recalibration slope ≈ 1.36 (> 1: risks
    too moderate), not 1. The windows before the change must show that at every site and overall.

    One window's slope is noisy (sd ≈ 0.15 at n ≈ 450), so the slope is judged on the inverse-variance pooled
    estimate of the six independent site × window cells. In this feed the draws of window 1 sit low at all three
    sites (the stored slopes equal those of the simulator's own scores and outcomes, checked by hand), so the pooled
    slope is 1.18 ± 0.05: clearly above 1, below the population value — the tolerance says so."""
    _, engine, _, _ = store
    auroc, oe, slope = _binormal_truth(CTA.sensitivity)
    assert auroc == pytest.approx(0.888, abs=0.001) and oe == pytest.approx(0.652, abs=0.002)
    assert slope == pytest.approx(1.36, abs=0.02)
    points = _points(engine, model="cta-stenosis", subgroup="all")
    slopes, weights = [], []
    for site in ("all", "site-a", "site-b", "site-c"):
        for k in (0, 1):  # before the change on day 60
            got = {m: _value(points, m, site, "all", k) for m in ("auroc", "oe_ratio", "calibration_slope")}
            assert _covers(got["auroc"], auroc), (site, k, got["auroc"].value)
            assert _covers(got["oe_ratio"], oe), (site, k, got["oe_ratio"].value)
            assert got["oe_ratio"].ci_high < 1.0, (site, k)  # risks overestimated: O/E clearly below 1
            if site != "all":
                se = (got["calibration_slope"].ci_high - got["calibration_slope"].ci_low) / (2 * 1.959963984540054)
                slopes.append(got["calibration_slope"].value)
                weights.append(se ** -2)
    pooled = float(np.average(slopes, weights=weights))
    pooled_se = float(np.sum(weights) ** -0.5)
    assert pooled - 1.96 * pooled_se > 1.0, (pooled, pooled_se)  # not 1: the scores are not calibrated
    assert pooled == pytest.approx(slope, abs=0.25)


def test_the_scanner_upgrade_lowers_auroc_at_site_b_only(store) -> None:
    """After day 60 site-b's stenoses score lower (sensitivity 0.60): the binormal AUROC falls from 0.888 to 0.807.
    Every settled window after the change at site-b lies below every window before it, with its CI; the other sites
    keep theirs. (O/E rises only from 0.65 to 0.71 in theory — within one window's CI, so it is not asserted.)"""
    _, engine, _, _ = store
    after_truth = _binormal_truth(0.60)[0]
    assert after_truth == pytest.approx(0.807, abs=0.001)
    points = _points(engine, model="cta-stenosis", subgroup="all", metric="auroc")
    windows = {site: {p.period_start: p for p in points if p.site == site} for site in ("site-a", "site-b", "site-c")}
    before = [windows["site-b"][START + k * PERIOD] for k in (0, 1)]
    after = [p for start, p in windows["site-b"].items() if start >= CHANGE]
    assert len(after) >= 2
    assert max(p.ci_high for p in after) < min(p.value for p in before)
    assert all(_covers(p, after_truth) for p in after), [p.value for p in after]
    for site in ("site-a", "site-c"):
        assert all(p.ci_low > after_truth for start, p in windows[site].items() if start >= CHANGE), site


# --- idempotence and PostgreSQL -----------------------------------------------------------------------------------


def _snapshot(engine) -> list[tuple]:
    return [(p.model, p.model_version, p.metric, p.site, p.subgroup, p.period_start, p.n, round(p.value, 9),
             None if p.ci_low is None else round(p.ci_low, 9), None if p.ci_high is None else round(p.ci_high, 9))
            for p in _points(engine)]


def test_a_rerun_replaces_the_points_with_the_same_ones(store) -> None:
    settings, engine, written, _ = store
    before = _snapshot(engine)
    with Session(engine) as session, session.begin():
        assert compute_window_metrics(session, settings) == written
    assert _snapshot(engine) == before
    with Session(engine) as session:  # the detectors' daily points are untouched
        daily = session.scalar(select(func.count()).select_from(MetricPointRow).where(
            MetricPointRow.metric.not_in(WINDOW_METRICS)))
    assert daily > 0


@pytest.mark.postgres
def test_postgresql_store_gets_the_same_points(store, fresh_postgres_url) -> None:
    """The same cases in a real PostgreSQL store (schema by the migrations, rows copied from the SQLite store the
    pipeline filled) give the same points to 1e-9."""
    settings, sqlite_engine, written, _ = store
    upgrade(fresh_postgres_url)
    engine = engine_for(fresh_postgres_url)
    columns = [c for c in CaseRow.__table__.columns if c.key != "id"]
    try:
        with Session(sqlite_engine) as source:
            rows = [dict(zip([c.key for c in columns], r, strict=True)) for r in source.execute(select(*columns))]
        with Session(engine) as session, session.begin():
            session.execute(insert(CaseRow), rows)
            assert compute_window_metrics(session, settings) == written
        assert _snapshot(engine) == _snapshot(sqlite_engine)
    finally:
        engine.dispose()


# --- edge cases on hand-made cases (no store needed) ------------------------------------------------------------


def _frame(rows: list[tuple[datetime, float, str]], site: str = "site-x") -> pd.DataFrame:
    return pd.DataFrame({"model_version": "9", "site": site, "attributes": [{"sex": "female"}] * len(rows),
                         "predicted_at": pd.to_datetime([r[0] for r in rows], utc=True),
                         "score": [r[1] for r in rows], "label": [r[2] for r in rows]})


def test_a_separated_cell_gets_auroc_by_hanley_mcneil_and_no_recalibration() -> None:
    """One positive, scored above all 39 negatives: AUROC 1 (DeLong needs two of each, so Hanley–McNeil), Brier and
    O/E as usual, and no calibration slope or intercept — the logistic fit has no finite maximum — counted."""
    settings = load_settings()
    config = settings.model("cta-stenosis")
    t0 = datetime(2026, 1, 1, 9, tzinfo=UTC)
    rows = [(t0 + timedelta(hours=i), 0.1 + 0.01 * i, "negative") for i in range(39)]
    rows.append((t0 + timedelta(days=2), 0.95, "positive"))
    rows.append((t0 + timedelta(days=3), 0.2, "censored"))  # never counts
    rows.append((t0 + timedelta(days=200), 0.9, "positive"))  # still inside its label window at the watermark
    report = WindowReport()
    points = window_points(_frame(rows), config, settings.subgroups, t0 + timedelta(days=210), 30, 30, report)
    by_metric = {(p["metric"], p["site"], p["subgroup"]): p for p in points}
    assert {m for m, _, _ in by_metric} == {"auroc", "brier", "oe_ratio"}
    auroc = by_metric[("auroc", "site-x", "all")]
    assert auroc["n"] == 40 and auroc["value"] == 1.0 and auroc["period_start"] == datetime(2026, 1, 1, tzinfo=UTC)
    se = metrics.hanley_mcneil_se(1.0, 1, 39)
    assert auroc["ci_low"] == pytest.approx(max(0.0, 1.0 - 1.959963984540054 * se))
    scores = np.array([r[1] for r in rows[:40]])
    assert by_metric[("oe_ratio", "all", "all")]["value"] == pytest.approx(1 / scores.sum())
    # site-x and all, each × all and sex=female: four cells, one distinct case set, one failed fit
    assert len(points) == 4 * 3 and report.not_fitted[("cta-stenosis", "9")] == 1
    assert report.pending[("cta-stenosis", "9")] == 1
