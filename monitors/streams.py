"""Streams: one monitored series per (model, version, metric, site, subgroup cell), each with a calibrated detector.

Life of a stream:
1. **baseline** — observations whose event time falls in the first ``baseline_days`` estimate the in-control rate
   (or score mean and sd);
2. the metric's baseline is **complete** when no more baseline observations can arrive (for labeled metrics: the
   label window and grace of the last baseline prediction have passed). Observations that arrive before then for
   later events are buffered and replayed in arrival order;
3. at completion every stream of the metric is calibrated together: the device's family false-alarm budget is split
   equally over the metrics and then over that metric's streams (Bonferroni), each stream's ARL0 follows from its
   event rate (``monitors.budget.stream_arl0``) and its threshold from the exact ARL (``monitors.calibrate``);
   a stream with fewer than ``min_n`` baseline events is reported as ``insufficient_data``, never silently dropped;
4. **active** — each observation updates the detector; an alarm yields a ``Signal`` and the detector restarts.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from monitors.budget import stream_arl0
from monitors.calibrate import bernoulli_threshold, ewma_threshold
from monitors.detectors import BernoulliCusum, Ewma
from vigil.domain import ALL, Signal, StreamKey
from vigil.settings import ModelConfig, MonitorConfig, SubgroupConfig

RATE_METRICS = ("error_rate", "fnr", "fpr", "outcome_rate", "unmapped_rate")
MEAN_METRICS = ("score_mean",)
LABELED_METRICS = ("error_rate", "fnr", "fpr", "outcome_rate")


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
    """95 % interval of a stream's value over n observations: Wilson for rates, normal for score means."""
    if metric in MEAN_METRICS:
        mean = total / n
        half = 1.96 * math.sqrt(max(total_sq / n - mean * mean, 0.0) / n)
        return (mean - half, mean + half)
    return wilson(total, n)


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


@dataclass(slots=True)
class Stream:
    key: StreamKey
    detector_name: str
    status: str = "baseline"  # baseline | active | insufficient_data
    b_n: int = 0
    b_sum: float = 0.0  # of the charted value: the 0/1 event, or the score's log-odds
    b_sumsq: float = 0.0
    b_raw: float = 0.0  # of the reported value (the score itself)
    baseline: float | None = None  # reported in-control value (rate, or mean score)
    centre: float = 0.0  # charted in-control mean and sd (log-odds scale for scores)
    sd: float | None = None
    arl0: float | None = None
    detector: BernoulliCusum | Ewma | None = None
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

    def add_baseline(self, x: float, charted: float) -> None:
        self.b_n += 1
        self.b_raw += x
        self.b_sum += charted
        self.b_sumsq += charted * charted


class StreamMonitor:
    """All streams of one model; observations in, signals out."""

    def __init__(self, model: ModelConfig, version: str, cfg: MonitorConfig, subgroups: SubgroupConfig,
                 start: datetime):
        self.model = model
        self.version = version
        self.cfg = cfg
        self.min_n = subgroups.min_n
        self.metrics = [m for m in cfg.metrics if m in RATE_METRICS + MEAN_METRICS]
        self.start = start
        self.baseline_end = start + timedelta(days=cfg.baseline_days)
        label_lag = model.label_window + model.label_grace
        self.complete_at = {
            m: self.baseline_end + (label_lag if m in LABELED_METRICS else timedelta(0)) for m in self.metrics
        }
        self.streams: dict[StreamKey, Stream] = {}
        self._buffer: dict[str, list[tuple[str, list[str], float, datetime]]] = {m: [] for m in self.metrics}
        self._active: set[str] = set()
        self._groups: dict[tuple[str, str, tuple[str, ...]], list[Stream]] = {}
        self.late_baseline: Counter[str] = Counter()  # baseline-period observations that arrived after completion
        self._next_completion: datetime | None = min(self.complete_at.values()) if self.complete_at else None

    # --- input ---------------------------------------------------------------------------------------

    def observe(self, metric: str, site: str, cells: list[str], x: float, event_time: datetime,
                watermark: datetime) -> list[Signal]:
        """One observation of ``metric`` for an event at ``site`` in subgroup ``cells`` (incl. "all")."""
        if metric not in self.complete_at:
            return []
        signals = self.advance(watermark)
        if event_time < self.baseline_end:
            if metric in self._active:  # the baseline is calibrated and frozen: too late to count
                self.late_baseline[metric] += 1
                return signals
            charted = _logit(x) if metric in MEAN_METRICS else x
            for stream in self._group(metric, site, cells):
                stream.add_baseline(x, charted)
        elif metric in self._active:
            signals += self._update(metric, site, cells, x, event_time, watermark)
        else:
            self._buffer[metric].append((site, cells, x, event_time))
        return signals

    def advance(self, watermark: datetime) -> list[Signal]:
        """Complete every metric whose baseline can no longer change, and replay what waited for it."""
        if self._next_completion is None or watermark < self._next_completion:
            return []  # the common case, on every event
        signals: list[Signal] = []
        for metric, at in self.complete_at.items():
            if metric not in self._active and watermark >= at:
                self._calibrate(metric)
                self._active.add(metric)
                for site, cells, x, event_time in self._buffer.pop(metric):
                    signals += self._update(metric, site, cells, x, event_time, watermark)
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
        design shift). A change that persists keeps the rate at the out-of-control level, so its alert stays open."""
        s = self.streams.get(key)
        if s is None or s.detector is None or s.since_alarm_n < self.min_n:
            return False
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
        which the alert evidence and the dashboards show. Rate metrics only (labels do not change scores).
        """
        if metric not in self.complete_at or metric in MEAN_METRICS:
            return
        if metric not in self._active:
            if event_time < self.baseline_end:
                for stream in self._group(metric, site, cells):
                    stream.b_n += (new is not None) - 1
                    stream.b_sum += (new or 0.0) - old
                    stream.b_raw += (new or 0.0) - old
                    stream.b_sumsq += (new or 0.0) ** 2 - old * old
            else:
                buffer = self._buffer[metric]
                i = buffer.index((site, cells, old, event_time))
                if new is None:
                    del buffer[i]
                else:
                    buffer[i] = (site, cells, new, event_time)
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
        group_key = (metric, site, tuple(cells))
        group = self._groups.get(group_key)
        if group is None:
            sites = (site, ALL) if site != ALL else (ALL,)
            group = self._groups[group_key] = [
                self._stream(StreamKey(self.model.id, self.version, metric, s, c)) for s in sites for c in cells]
        return group

    def _stream(self, key: StreamKey) -> Stream:
        stream = self.streams.get(key)
        if stream is None:
            name = "ewma" if key.metric in MEAN_METRICS else "bernoulli_cusum"
            stream = self.streams[key] = Stream(key, name)
            if key.metric in self._active:  # a cell first seen after the baseline (e.g. a new scanner) has none
                stream.status = "insufficient_data"
        return stream

    def _calibrate(self, metric: str) -> None:
        streams = [s for s in self.streams.values() if s.key.metric == metric]
        eligible = [s for s in streams if s.b_n >= self.min_n]
        for s in streams:
            if s.b_n < self.min_n:
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
            else:
                s.baseline = (s.b_sum + 0.5) / (s.b_n + 1)  # Jeffreys-style: off zero for error-free baselines
                p0 = _design_rate(s.b_sum, s.b_n)
                odds = p0 / (1 - p0) * self.cfg.odds_ratio
                p1 = odds / (1 + odds)
                s.detector = BernoulliCusum(p0, p1, bernoulli_threshold(p0, p1, s.arl0))
            s.status = "active"

    def _update(self, metric: str, site: str, cells: list[str], x: float, event_time: datetime,
                watermark: datetime) -> list[Signal]:
        signals = []
        day = event_time.replace(hour=0, minute=0, second=0, microsecond=0)
        mean = metric in MEAN_METRICS
        charted = _logit(x) if mean else x
        for s in self._group(metric, site, cells):
            d = s.detector
            if d is None:
                continue
            before = s.prev_stat
            alarm = d.update((charted - s.centre) / s.sd if mean else x)
            # where the current excursion began: the statistic left zero (CUSUM) or Z changed sign (EWMA)
            centre = d.z if mean else d.statistic
            if s.run_start is None or (before * centre <= 0 if mean else before <= 0):
                s.run_start, s.run_n, s.run_sum, s.run_sumsq = event_time, 0, 0.0, 0.0
            s.run_n += 1
            s.run_sum += x
            s.run_sumsq += x * x
            point = s.last_point
            if point is None or point.day != day:
                point = s.points.get(day)
                if point is None:
                    point = s.points[day] = DayPoint(day)
                s.last_point = point
            point.n += 1
            point.total += x
            point.total_sq += x * x
            point.statistic, point.threshold = d.statistic, d.threshold
            point.stored = False
            s.since_alarm_n += 1
            s.since_alarm_sum += x
            if alarm:
                signals.append(self._signal(s, watermark))
                s.since_alarm_n, s.since_alarm_sum = 0, 0.0
                d.reset()
                s.run_start, s.prev_stat = None, 0.0
            else:
                s.prev_stat = centre
        return signals

    def _signal(self, s: Stream, watermark: datetime) -> Signal:
        s.alarms += 1
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
