"""Streams: one monitored series per (model, version, metric, site, subgroup cell), each with a calibrated detector.

Life of a stream:
1. **baseline** — observations whose event time falls in the first ``baseline_days`` estimate the in-control rate
   (or score mean and sd; or, for ``calibration_oe``, the model's calibration in the large and its risk mix);
2. the metric's baseline is **complete** when no more baseline observations can arrive (for labeled metrics: the
   label window and grace of the last baseline prediction have passed). Observations that arrive before then for
   later events are buffered and replayed in arrival order;
3. at completion every stream of the metric is calibrated together: the device's family false-alarm budget is split
   equally over the metrics and then over that metric's streams (Bonferroni), each stream's ARL0 follows from its
   event rate (``monitors.budget.stream_arl0``) and its threshold from the exact ARL (``monitors.calibrate``);
   a stream with fewer than ``min_n`` baseline events is reported as ``insufficient_data``, never silently dropped;
4. **active** — each observation updates the detector; an alarm yields a ``Signal`` and the detector restarts.

Metrics and their charts: event rates (``RATE_METRICS``, 0/1 per case) — Bernoulli CUSUM (Reynolds & Stoumbos 1999);
the mean score (``MEAN_METRICS``, charted as log-odds) — EWMA (Roberts 1959); calibration (``RISK_METRICS``: the
outcome of each case with the model's predicted risk) — risk-adjusted CUSUM (Steiner, Cook, Farewell & Treasure
2000, *Biostatistics* 1:441), which asks whether events are more frequent than the model predicts, case by case.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from scipy.optimize import brentq
from scipy.special import gammaincinv

from monitors.budget import stream_arl0
from monitors.calibrate import bernoulli_threshold, ewma_threshold, racusum_threshold
from monitors.detectors import BernoulliCusum, Ewma, RiskAdjustedCusum
from vigil.domain import ALL, Signal, StreamKey
from vigil.settings import ModelConfig, MonitorConfig, SubgroupConfig

RATE_METRICS = ("error_rate", "fnr", "fpr", "outcome_rate", "unmapped_rate", "no_followup_rate")
MEAN_METRICS = ("score_mean",)
RISK_METRICS = ("calibration_oe",)
METRICS = RATE_METRICS + MEAN_METRICS + RISK_METRICS
LABELED_METRICS = ("error_rate", "fnr", "fpr", "outcome_rate", "calibration_oe", "no_followup_rate")  # at close
DETECTORS = {**dict.fromkeys(RATE_METRICS, "bernoulli_cusum"), **dict.fromkeys(MEAN_METRICS, "ewma"),
             **dict.fromkeys(RISK_METRICS, "racusum")}
"""The chart each metric's streams use (``Stream.detector_name``, the alerts' ``detector``)."""

MIN_EXPECTED_EVENTS = 5.0
"""A calibration stream needs at least this many events expected by the model in its baseline: with fewer, its
calibration in the large (observed/expected) is too uncertain to design a chart on — the usual "expected count ≥ 5"
rule for Poisson and χ² approximations (Cochran 1954, *Biometrics* 10:417). Such streams are insufficient data."""

_RISK_FLOOR = 1e-6  # predicted risks are clamped into [floor, 1 − floor]: a score of exactly 0 or 1 has no odds
_MIX_LOGIT_LOW, _MIX_LOGIT_HIGH, _MIX_BINS = -8.0, 8.0, 64  # risk-mix grid: 0.25 wide on the log-odds scale
_MIX_SCALE = _MIX_BINS / (_MIX_LOGIT_HIGH - _MIX_LOGIT_LOW)
_ONE_DAY = timedelta(days=1)


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def interval(metric: str, total: float, total_sq: float, n: int) -> tuple[float, float]:
    """95 % interval of a stream's value over n observations: Wilson for rates, normal for score means.

    (``calibration_oe`` is charted and stored as observed/expected events, with ``oe_interval``.)"""
    if metric in MEAN_METRICS:
        mean = total / n
        half = 1.96 * math.sqrt(max(total_sq / n - mean * mean, 0.0) / n)
        return (mean - half, mean + half)
    return wilson(total, n)


def oe_interval(observed: float, expected: float, level: float = 0.95) -> tuple[float, float]:
    """Exact Poisson interval of an observed/expected ratio (standardised ratio, as an SMR) — Ulm 1990
    (*Am. J. Epidemiol.* 131:373): with O events, [χ²_{2O, α/2}/2, χ²_{2O+2, 1−α/2}/2] / E, written with the gamma
    quantile Γ⁻¹(k, q) = χ²_{2k, q}/2 (Garwood 1936). Conservative for a sum of Bernoulli outcomes, whose variance is
    below the Poisson's.

    >>> [round(v, 3) for v in oe_interval(10, 5.0)]
    [0.959, 3.678]
    """
    if expected <= 0.0:
        return (0.0, math.inf)
    alpha = 1.0 - level
    low = float(gammaincinv(observed, alpha / 2)) if observed > 0 else 0.0
    return (low / expected, float(gammaincinv(observed + 1, 1.0 - alpha / 2)) / expected)


def expected_events(values: list[float], counts: list[float], odds_ratio: float) -> float:
    """Expected events over a risk mix if the true odds are ``odds_ratio`` × the predicted odds:
    Σ nᵢ·r·pᵢ / (1 − pᵢ + r·pᵢ)."""
    return sum(n * odds_ratio * p / (1.0 - p + odds_ratio * p) for p, n in zip(values, counts, strict=True))


def recalibration_odds_ratio(values: list[float], counts: list[float], observed: float) -> float:
    """The odds multiplier r that makes the expected events of a risk mix equal ``observed``.

    It is the maximum-likelihood estimate of the intercept γ = ln r of logistic recalibration with the model's
    log-odds as an offset, logit P(y = 1) = γ + logit p ("recalibration in the large": Cox 1958, *Biometrika* 45:562;
    Steyerberg, *Clinical Prediction Models*, 2nd ed. 2019, §15.3): its score equation is observed = expected(r),
    and expected(r) rises strictly in r, so the root is unique; it is found by Brent's method on ln r. r = 1 means
    calibrated in the large; r > 1, the model under-predicts. Needs 0 < observed < Σ nᵢ.

    >>> round(recalibration_odds_ratio([0.1], [1000], 150), 4)  # (0.15/0.85) / (0.1/0.9)
    1.5882
    """
    total = sum(counts)
    if not 0.0 < observed < total:
        raise ValueError(f"the observed events must lie strictly between 0 and the {total:g} cases of the mix to "
                         f"estimate an odds ratio, got {observed:g}")
    lo, hi = -1.0, 1.0
    while expected_events(values, counts, math.exp(lo)) > observed:
        lo *= 2.0
    while expected_events(values, counts, math.exp(hi)) < observed:
        hi *= 2.0
    return math.exp(brentq(lambda g: expected_events(values, counts, math.exp(g)) - observed, lo, hi,
                           xtol=1e-12, rtol=1e-12))


def _design_odds_ratio(values: list[float], counts: list[float], observed: float,
                       confidence: float = 0.95) -> float | None:
    """The in-control odds ratio R_0 a calibration chart is designed for: the odds multiplier at which the mix would
    expect the one-sided 95 % exact Poisson upper bound of the observed count (Garwood 1936: Γ⁻¹(O + 1, 0.95)),
    rounded *up* to three significant digits; None when no finite multiplier reaches it (nearly every baseline case an
    event).

    As for the rates (``_design_rate``): a chart designed on an estimate that falls below the truth alarms far more
    often than its nominal ARL0 (Jones, Champ & Rigdon 2004); designing for the upper bound keeps the nominal
    false-alarm rate with ≥ 95 % confidence per stream (Gandy & Kvaløy 2013). The Poisson bound is conservative for
    a sum of Bernoulli outcomes, whose variance is smaller. With O = 0 it still gives a finite bound (3.0 events).
    """
    target = float(gammaincinv(observed + 1.0, confidence))
    if target >= sum(counts) * (1.0 - 1e-9):
        return None
    r = recalibration_odds_ratio(values, counts, target)
    scale = 10.0 ** (math.floor(math.log10(r)) - 2)
    return float(f"{math.ceil(r / scale - 1e-9) * scale:.3g}")


def _risk_bin(p: float) -> int:
    """The risk-mix bin of a predicted risk: 64 bins 0.25 wide in log-odds over [−8, 8]; the end bins take the
    tails (risks below 3.4e-4 or above 0.99966)."""
    i = int((math.log(p / (1.0 - p)) - _MIX_LOGIT_LOW) * _MIX_SCALE)
    return 0 if i < 0 else (i if i < _MIX_BINS else _MIX_BINS - 1)


class RiskMix:
    """A stream's baseline risk mix in bounded memory: per bin of a fixed log-odds grid, the number of cases and the
    sum of their predicted risks (≈ 900 bytes per stream whatever the baseline size; dropped once the chart is
    calibrated). Each bin stands for its cases at their mean risk, so the expected events Σp are kept exactly and the
    chart's ARL is computed over at most 64 distinct risks (the risk mix ``monitors.calibrate.racusum_threshold``
    takes as a histogram)."""

    __slots__ = ("counts", "sums")

    def __init__(self) -> None:
        self.counts = array("i", [0]) * _MIX_BINS
        self.sums = array("d", [0.0]) * _MIX_BINS

    def add(self, i: int, p: float, n: int = 1) -> None:
        self.counts[i] += n
        self.sums[i] += n * p

    def histogram(self) -> tuple[list[float], list[float]]:
        """(mean risk, count) of every non-empty bin."""
        pairs = [(s / n, float(n)) for n, s in zip(self.counts, self.sums, strict=True) if n > 0]
        return [min(max(p, _RISK_FLOOR), 1.0 - _RISK_FLOOR) for p, _ in pairs], [n for _, n in pairs]


def _risk(metric: str, risk: float | None) -> float:
    if risk is None or not risk == risk:  # None or NaN
        raise ValueError(f"metric {metric!r} needs the prediction's predicted risk (risk=...), got {risk!r}: "
                         "pass the model's score for the case")
    return _RISK_FLOOR if risk < _RISK_FLOOR else (1.0 - _RISK_FLOOR if risk > 1.0 - _RISK_FLOOR else float(risk))


@dataclass(slots=True)
class DayPoint:
    """One day of one stream, for the dashboards: count, value and the chart statistic at day end."""

    day: datetime
    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    statistic: float | None = None
    threshold: float | None = None
    stored: bool = False  # False once changed since the store last wrote it
    expected: float = 0.0  # calibration_oe: events the model predicted that day (Σ risk); O/E = total / expected


@dataclass(slots=True)
class Stream:
    key: StreamKey
    detector_name: str
    status: str = "baseline"  # baseline | active | insufficient_data
    b_n: int = 0
    b_sum: float = 0.0  # of the charted value: the 0/1 event, or the score's log-odds
    b_sumsq: float = 0.0
    b_raw: float = 0.0  # of the reported value (the score itself)
    baseline: float | None = None  # reported in-control value (rate, mean score, or O/E)
    centre: float = 0.0  # charted in-control mean and sd (log-odds scale for scores)
    sd: float | None = None
    arl0: float | None = None
    detector: BernoulliCusum | Ewma | RiskAdjustedCusum | None = None
    run_start: datetime | None = None  # event time at which the statistic last left its centre
    run_n: int = 0
    run_sum: float = 0.0
    run_sumsq: float = 0.0
    prev_stat: float = 0.0
    alarms: int = 0
    since_alarm_n: int = 0  # observations since the last alarm, and their sum: is the stream back in control?
    since_alarm_sum: float = 0.0
    corrections: int = 0  # observations changed after they were counted (amended or retracted outcomes)
    points: dict[datetime, DayPoint] = field(default_factory=dict)
    last_point: DayPoint | None = None  # the day most recently updated: observations come in runs of one day
    # calibration_oe only: events the model predicted (Σ risk) in the baseline, over the current run, and since the
    # last alarm at the design odds R_0; the baseline risk mix until calibration
    b_expected: float = 0.0
    run_expected: float = 0.0
    since_alarm_expected: float = 0.0
    mix: RiskMix | None = None
    stored: bool = False  # False once its state row changed since the store last wrote it

    def add_baseline(self, x: float, charted: float) -> None:
        self.b_n += 1
        self.b_raw += x
        self.b_sum += charted
        self.b_sumsq += charted * charted


class StreamMonitor:
    """All streams of one model; observations in, signals out."""

    def __init__(self, model: ModelConfig, version: str, cfg: MonitorConfig, subgroups: SubgroupConfig,
                 start: datetime, opened: datetime | None = None):
        """``start``: the day of the version's first prediction; ``opened``: the feed time it was first seen, if
        later than its baseline period (its predictions were replayed late, e.g. dead letters re-injected once the
        model was configured): then the baseline stays open for a day of feed after ``opened`` (plus the label
        window and grace for labeled metrics), so that late history is the baseline rather than too late for it."""
        self.model = model
        self.version = version
        self.cfg = cfg
        self.min_n = subgroups.min_n
        self.metrics = [m for m in cfg.metrics if m in METRICS]
        self.start = start
        self.baseline_end = start + timedelta(days=cfg.baseline_days)
        label_lag = model.label_window + model.label_grace
        closes = max(self.baseline_end, opened + _ONE_DAY) if opened is not None else self.baseline_end
        self.complete_at = {m: closes + (label_lag if m in LABELED_METRICS else timedelta(0)) for m in self.metrics}
        self.streams: dict[StreamKey, Stream] = {}
        self._buffer: dict[str, list[tuple[str, list[str], float, datetime, float | None]]] = {
            m: [] for m in self.metrics}
        self._active: set[str] = set()
        self._groups: dict[tuple[str, ...], list[Stream]] = {}
        self.late_baseline: Counter[str] = Counter()  # baseline-period observations that arrived after completion
        self._next_completion: datetime | None = min(self.complete_at.values()) if self.complete_at else None
        self._day: datetime | None = None  # the day of the last observation, and the start of the next one
        self._day_end: datetime | None = None

    # --- input ---------------------------------------------------------------------------------------

    def observe(self, metric: str, site: str, cells: list[str], x: float, event_time: datetime,
                watermark: datetime, risk: float | None = None) -> list[Signal]:
        """One observation of ``metric`` for an event at ``site`` in subgroup ``cells`` (incl. "all").

        ``risk``: the model's predicted risk of the case, required for ``calibration_oe`` (x is then the outcome,
        1.0 or 0.0) and ignored otherwise; risks are clamped into [1e-6, 1 − 1e-6]."""
        if metric not in self.complete_at:
            return []
        if metric in RISK_METRICS:
            risk = _risk(metric, risk)
        else:
            risk = None
        nxt = self._next_completion
        signals = self.advance(watermark) if nxt is not None and watermark >= nxt else []
        if event_time < self.baseline_end:
            if metric in self._active:  # the baseline is calibrated and frozen: too late to count
                self.late_baseline[metric] += 1
                return signals
            group = self._group(metric, site, cells)
            if metric in MEAN_METRICS:
                charted = _logit(x)
                for stream in group:
                    stream.add_baseline(x, charted)
                    stream.stored = False
            elif risk is None:
                sq = x * x
                for stream in group:
                    stream.b_n += 1
                    stream.b_raw += x
                    stream.b_sum += x
                    stream.b_sumsq += sq
                    stream.stored = False
            else:
                i = _risk_bin(risk)
                for stream in group:
                    stream.add_baseline(x, x)
                    stream.b_expected += risk
                    stream.mix.add(i, risk)
                    stream.stored = False
        elif metric in self._active:
            group = self._group(metric, site, cells)
            day = self._day  # the day of the event, computed once per day of events (they come in runs of a day)
            if day is None or event_time.tzinfo is not day.tzinfo or not day <= event_time < self._day_end:
                day = self._day_of(event_time)
            if risk is not None:
                signals += self._update_risk(group, x, risk, day, event_time, watermark)
            elif metric in MEAN_METRICS:
                signals += self._update_mean(group, x, day, event_time, watermark)
            else:
                signals += self._update_rate(group, x, day, event_time, watermark)
        else:
            self._buffer[metric].append((site, cells, x, event_time, risk))
        return signals

    @property
    def next_completion(self) -> datetime | None:
        """When the next metric's baseline completes (``advance`` then calibrates it); None once all have."""
        return self._next_completion

    def advance(self, watermark: datetime) -> list[Signal]:
        """Complete every metric whose baseline can no longer change, and replay what waited for it."""
        if self._next_completion is None or watermark < self._next_completion:
            return []  # the common case, on every event
        signals: list[Signal] = []
        for metric, at in self.complete_at.items():
            if metric not in self._active and watermark >= at:
                self._calibrate(metric)
                self._active.add(metric)
                for site, cells, x, event_time, risk in self._buffer.pop(metric):
                    signals += self._update(metric, site, cells, x, event_time, watermark, risk)
        waiting = [at for m, at in self.complete_at.items() if m not in self._active]
        self._next_completion = min(waiting) if waiting else None
        return signals

    def forget_points(self, before: datetime) -> int:
        """Drop daily points older than ``before`` that the store already holds: no late label can change them any
        more, and a service running for years must not keep every day of every stream in memory (nor in its
        checkpoint). Returns how many were dropped."""
        dropped = 0
        for s in self.streams.values():
            old = [day for day, p in s.points.items() if day < before and p.stored]
            for day in old:
                if s.last_point is s.points[day]:
                    s.last_point = None
                del s.points[day]
            dropped += len(old)
        return dropped

    def back_in_control(self, key: StreamKey) -> bool:
        """Whether an alerted stream performs as designed again: since its last alarm at least ``min_n`` observations
        whose rate is no worse than the in-control rate its chart was designed for (scores: a mean within half the
        design shift; calibration: no more events than the model's risks predict at the design odds ratio R_0).
        A change that persists keeps the rate at the out-of-control level, so its alert stays open."""
        s = self.streams.get(key)
        if s is None or s.detector is None or s.since_alarm_n < self.min_n:
            return False
        if key.metric in RISK_METRICS:
            return s.since_alarm_sum <= s.since_alarm_expected
        mean = s.since_alarm_sum / s.since_alarm_n
        if key.metric in MEAN_METRICS:
            return abs(_logit(mean) - s.centre) <= 0.5 * self.cfg.ewma_shift * s.sd
        return mean <= s.detector.p0

    def correct(self, metric: str, site: str, cells: list[str], old: float, new: float | None,
                event_time: datetime) -> None:
        """An observation already counted changed (``new``) or was withdrawn (``new`` None): a corrected outcome.

        Before the baseline is complete the baseline sums (or the buffer of early observations) are corrected exactly.
        Once a stream is active its daily point is corrected, so the performance shown is right, but a sequential
        detector cannot be rewound: its statistic stands, and the stream counts the correction (``corrections``),
        which the alert evidence and the dashboards show. Rate metrics only: labels do not change scores, and the
        calibration stream is observed only once a case's label is frozen.
        """
        if metric not in self.complete_at or metric not in RATE_METRICS:
            return
        if metric not in self._active:
            if event_time < self.baseline_end:
                for stream in self._group(metric, site, cells):
                    stream.b_n += (new is not None) - 1
                    stream.b_sum += (new or 0.0) - old
                    stream.b_raw += (new or 0.0) - old
                    stream.b_sumsq += (new or 0.0) ** 2 - old * old
                    stream.stored = False
            else:
                buffer = self._buffer[metric]
                i = buffer.index((site, cells, old, event_time, None))
                if new is None:
                    del buffer[i]
                else:
                    buffer[i] = (site, cells, new, event_time, None)
            return
        if event_time < self.baseline_end:
            self.late_baseline[metric] += 1  # the baseline is calibrated and frozen
            return
        day = event_time.replace(hour=0, minute=0, second=0, microsecond=0)
        for stream in self._group(metric, site, cells):
            point = stream.points.get(day)
            if stream.detector is None or point is None:
                continue
            stream.corrections += 1
            stream.stored = False
            point.n += (new is not None) - 1
            point.total += (new or 0.0) - old
            point.total_sq += (new or 0.0) ** 2 - old * old
            point.stored = False
            if point.n == 0:
                del stream.points[day]
                stream.last_point = None

    # --- internals -------------------------------------------------------------------------------------

    def _group(self, metric: str, site: str, cells: list[str]) -> list[Stream]:
        """The streams one observation feeds: its site and "all", each subgroup cell; cached per combination."""
        group_key = (metric, site, *cells)
        group = self._groups.get(group_key)
        if group is None:
            sites = (site, ALL) if site != ALL else (ALL,)
            group = self._groups[group_key] = [
                self._stream(StreamKey(self.model.id, self.version, metric, s, c)) for s in sites for c in cells]
        return group

    def _stream(self, key: StreamKey) -> Stream:
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = Stream(key, DETECTORS[key.metric])
            if key.metric in self._active:  # a cell first seen after the baseline (e.g. a new scanner) has none
                stream.status = "insufficient_data"
            elif key.metric in RISK_METRICS:
                stream.mix = RiskMix()
        return stream

    def _calibrate(self, metric: str) -> None:
        streams = [s for s in self.streams.values() if s.key.metric == metric]
        designs: dict[StreamKey, tuple[float, list[float], list[float]]] = {}
        if metric in RISK_METRICS:
            for s in streams:
                if s.b_n >= self.min_n and s.b_expected >= MIN_EXPECTED_EVENTS:
                    values, counts = s.mix.histogram()
                    r0 = _design_odds_ratio(values, counts, s.b_sum)
                    if r0 is not None:
                        designs[s.key] = (r0, values, counts)
                s.mix = None  # the mix is needed only for the design: bounded memory once active
            eligible = [s for s in streams if s.key in designs]
        elif metric in RATE_METRICS:  # a rate whose baseline is already at its ceiling (every case an event, e.g.
            # no follow-up at all) has no room to rise: no chart can be designed for it
            eligible = [s for s in streams if s.b_n >= self.min_n and _design_rate(s.b_sum, s.b_n) < 1.0]
        else:
            eligible = [s for s in streams if s.b_n >= self.min_n]
        chosen = {id(s) for s in eligible}
        for s in streams:
            s.stored = False  # designed now, or found insufficient
            if id(s) not in chosen:
                s.status = "insufficient_data"
        if not eligible:
            return
        days = self.cfg.baseline_days
        # the family budget is shared equally by the metrics, then by the streams of each metric
        share = len(eligible) * len(self.metrics)
        for s in eligible:
            s.arl0 = _ceil_to_grid(stream_arl0(self.cfg.budget.false_alarms, self.cfg.budget.per_days, share,
                                               s.b_n / days, cap=self.cfg.max_arl0))
            if metric in MEAN_METRICS:
                # scores are charted as log-odds, which are close to normal for a calibrated risk model
                # (binormal ROC model, Metz 1978); raw probabilities are skewed and would break the ARL0
                mean = s.b_sum / s.b_n
                lam = self.cfg.ewma_lambda
                s.centre = mean
                s.sd = math.sqrt(max(s.b_sumsq / s.b_n - mean * mean, 1e-12)) * _estimation_allowance(s.b_n, lam)
                s.baseline = s.b_raw / s.b_n
                s.detector = Ewma(lam, ewma_threshold(lam, s.arl0, limits="exact"), limits="exact")
            elif metric in RISK_METRICS:
                # Steiner et al. 2000 with R_0 the design odds ratio (in control: true odds = R_0 × predicted odds),
                # R_A = R_0 × the design odds ratio of the rate charts; the ARL is exact over the baseline risk mix
                r0, values, counts = designs[s.key]
                ra = r0 * self.cfg.odds_ratio
                s.baseline = s.b_sum / s.b_expected  # observed / expected events in the baseline
                s.centre = r0
                s.detector = RiskAdjustedCusum(ra, racusum_threshold(values, ra, s.arl0, r0=r0, counts=counts), r0)
            else:
                s.baseline = (s.b_sum + 0.5) / (s.b_n + 1)  # Jeffreys-style: off zero for error-free baselines
                p0 = _design_rate(s.b_sum, s.b_n)
                odds = p0 / (1 - p0) * self.cfg.odds_ratio
                p1 = odds / (1 + odds)
                s.detector = BernoulliCusum(p0, p1, bernoulli_threshold(p0, p1, s.arl0))
            s.status = "active"

    def _day_of(self, event_time: datetime) -> datetime:
        """Midnight of the event's day (in its own time zone), kept with the start of the next day so that the next
        observation of the same day (the common case: ``observe`` checks inline) reuses it."""
        day = self._day = event_time.replace(hour=0, minute=0, second=0, microsecond=0)
        self._day_end = day + _ONE_DAY
        return day

    def _update(self, metric: str, site: str, cells: list[str], x: float, event_time: datetime,
                watermark: datetime, risk: float | None = None) -> list[Signal]:
        group = self._group(metric, site, cells)
        day = self._day_of(event_time)  # replays from the buffer: not a hot path
        if metric in MEAN_METRICS:
            return self._update_mean(group, x, day, event_time, watermark)
        if risk is not None:
            return self._update_risk(group, x, risk, day, event_time, watermark)
        return self._update_rate(group, x, day, event_time, watermark)

    def _update_rate(self, group: list[Stream], x: float, day: datetime, event_time: datetime,
                     watermark: datetime) -> list[Signal]:
        """One 0/1 observation into each stream's Bernoulli CUSUM, run, daily point and since-alarm counts.

        The hot path (R5 in BENCHMARKS.md): the outcome is checked once, the chart steps in one call
        (``BernoulliCusum.update_event``), and x² = x for 0/1 is not recomputed; the results are the same as
        the general recursion's, bit for bit (tests/test_racusum_stream.py)."""
        if x == 1:
            event = True
        elif x == 0:
            event = False
        else:
            raise ValueError(f"rate metrics take 0/1 observations, got {x!r}")
        signals = []
        for s in group:
            d = s.detector
            if d is None:
                continue
            s.stored = False
            before = s.prev_stat
            alarm = d.update_event(event)
            stat = d.statistic
            # where the current excursion began: the statistic left zero
            if before <= 0 or s.run_start is None:
                s.run_start, s.run_n, s.run_sum, s.run_sumsq = event_time, 0, 0.0, 0.0
            s.run_n += 1
            s.run_sum += x
            s.run_sumsq += x
            point = s.last_point
            if point is None or (point.day is not day and point.day != day):
                point = s.points.get(day)
                if point is None:  # the threshold is fixed for the chart's life: written once per day
                    point = s.points[day] = DayPoint(day, threshold=d.threshold)
                s.last_point = point
            point.n += 1
            point.total += x
            point.total_sq += x
            point.statistic = stat
            point.stored = False
            s.since_alarm_n += 1
            s.since_alarm_sum += x
            if alarm:
                signals.append(self._signal(s, watermark))
                s.since_alarm_n, s.since_alarm_sum = 0, 0.0
                d.reset()
                s.run_start, s.prev_stat = None, 0.0
            else:
                s.prev_stat = stat
        return signals

    def _update_mean(self, group: list[Stream], x: float, day: datetime, event_time: datetime,
                     watermark: datetime) -> list[Signal]:
        """One score into each stream's EWMA (on log-odds, standardised by the baseline), run and daily point."""
        signals = []
        charted = _logit(x)
        sq = x * x
        for s in group:
            d = s.detector
            if d is None:
                continue
            s.stored = False
            before = s.prev_stat
            alarm = d.update((charted - s.centre) / s.sd)
            z = d.z
            # where the current excursion began: Z changed sign
            if before * z <= 0 or s.run_start is None:
                s.run_start, s.run_n, s.run_sum, s.run_sumsq = event_time, 0, 0.0, 0.0
            s.run_n += 1
            s.run_sum += x
            s.run_sumsq += sq
            point = s.last_point
            if point is None or (point.day is not day and point.day != day):
                point = s.points.get(day)
                if point is None:
                    point = s.points[day] = DayPoint(day, threshold=d.threshold)
                s.last_point = point
            point.n += 1
            point.total += x
            point.total_sq += sq
            point.statistic = d.statistic
            point.stored = False
            s.since_alarm_n += 1
            s.since_alarm_sum += x
            if alarm:
                signals.append(self._signal(s, watermark))
                s.since_alarm_n, s.since_alarm_sum = 0, 0.0
                d.reset()
                s.run_start, s.prev_stat = None, 0.0
            else:
                s.prev_stat = z
        return signals

    def _update_risk(self, group: list[Stream], y: float, risk: float, day: datetime, event_time: datetime,
                     watermark: datetime) -> list[Signal]:
        """One outcome with its predicted risk into each stream's risk-adjusted CUSUM; the run, the day and the
        since-alarm counts also sum the events the model expected (the since-alarm ones at the design odds R_0)."""
        signals = []
        for s in group:
            d = s.detector
            if d is None:
                continue
            s.stored = False
            before = s.prev_stat
            alarm = d.update(y, risk)
            stat = d.statistic
            if before <= 0 or s.run_start is None:
                s.run_start, s.run_n, s.run_sum, s.run_sumsq, s.run_expected = event_time, 0, 0.0, 0.0, 0.0
            s.run_n += 1
            s.run_sum += y
            s.run_sumsq += y
            s.run_expected += risk
            point = s.last_point
            if point is None or (point.day is not day and point.day != day):
                point = s.points.get(day)
                if point is None:
                    point = s.points[day] = DayPoint(day, threshold=d.threshold)
                s.last_point = point
            point.n += 1
            point.total += y
            point.total_sq += y
            point.expected += risk
            point.statistic = stat
            point.stored = False
            s.since_alarm_n += 1
            s.since_alarm_sum += y
            r0 = d.r0
            s.since_alarm_expected += r0 * risk / (1.0 + (r0 - 1.0) * risk)
            if alarm:
                signals.append(self._signal(s, watermark))
                s.since_alarm_n, s.since_alarm_sum, s.since_alarm_expected = 0, 0.0, 0.0
                d.reset()
                s.run_start, s.prev_stat = None, 0.0
            else:
                s.prev_stat = stat
        return signals

    def _signal(self, s: Stream, watermark: datetime) -> Signal:
        s.alarms += 1
        if s.key.metric in RISK_METRICS:  # observed / expected events since the excursion began, exact Poisson CI
            current = s.run_sum / s.run_expected
            ci = oe_interval(s.run_sum, s.run_expected)
        else:
            current = s.run_sum / s.run_n
            ci = interval(s.key.metric, s.run_sum, s.run_sumsq, s.run_n)
        return Signal(
            stream=s.key,
            detector=s.detector_name,
            detected_at=watermark,
            change_estimate=s.run_start,
            statistic=s.detector.statistic,
            threshold=s.detector.threshold,
            baseline=s.baseline,
            current=current,
            current_ci=ci,
            n_baseline=s.b_n,
            n_current=s.run_n,
        )


def _ceil_to_grid(arl0: float, steps_per_decade: int = 10) -> float:
    """Round an ARL0 *up* to a log grid (26 % steps): a little more conservative, and calibrations are shared."""
    return 10 ** (math.ceil(math.log10(arl0) * steps_per_decade - 1e-9) / steps_per_decade)


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _estimation_allowance(n: int, lam: float, z: float = 1.645) -> float:
    """Widening of an EWMA's sd when the in-control mean and sd are estimated from ``n`` baseline points.

    A chart on estimated parameters alarms far more often than its nominal ARL0 (Jones, Champ & Rigdon 2001,
    *Technometrics* 43:156; measured here: ~7× at n = 100, ARL0 = 1e5 — bench/false_alarms.py). As the rate charts
    are designed on the upper confidence bound of their rate (``_design_rate``), the score chart is designed on
    (a) the one-sided 95 % upper bound of σ (χ² with n − 1 df, Wilson–Hilferty), and (b) the estimated centre's own
    error, σ²/n, added to the EWMA's asymptotic variance λσ²/(2 − λ): the factor is
    (σ_upper/σ̂) · sqrt(1 + (2 − λ)/(λ n)). It tends to 1 as n grows (1.24 at n = 100, 1.05 at n = 1000, λ = 0.1).
    """
    k = n - 1
    chi2_low = k * (1 - 2 / (9 * k) - z * math.sqrt(2 / (9 * k))) ** 3  # lower 5 % point of χ²_k
    return math.sqrt(k / chi2_low) * math.sqrt(1 + (2 - lam) / (lam * n))


def _design_rate(errors: float, n: int, z: float = 1.645) -> float:
    """The in-control rate the Bernoulli CUSUM is designed for: the one-sided 95 % upper Wilson bound of the baseline.

    A chart calibrated on an estimated rate has a much shorter in-control ARL than its nominal ARL0 whenever the
    estimate falls below the truth (Jones, Champ & Rigdon 2004, *Technometrics* 46:95); designing for the upper
    confidence bound guarantees the nominal false-alarm rate with 95 % confidence per stream, in the spirit of
    Gandy & Kvaløy 2013 (*Scand. J. Stat.* 40:647). Two significant digits let streams share one calibration.
    """
    return float(f"{wilson(errors + 0.5, n + 1, z)[1]:.2g}")
