"""Family false-alarm budget on long in-control feeds: observed vs budgeted false alarms per device (issue 5).

DESIGN.md §Statistics: "a `stable` simulation must stay within the budget". The budget is a device-wide promise,
``monitors.budget`` — at most B false alarms per D days across all streams of a device — split equally over the
device's metrics and then over each metric's eligible streams (``monitors.streams``). This script measures it.

Method
1. Feed. ``vigil.simulator.simulate("stable", dir, seed, days, volume)``: no change is injected, so **every alarm is a
   false alarm**. Each seed is an independent feed.
2. Pipeline. ``Pipeline(settings).run_paths([dir])`` with ``examples/vigil.yaml`` (``load_settings()``), only the
   budget replaced when asked (``--budget``, ``--generous``). The feed is simulated once per seed and every budget
   is run on the same feed.
3. Alarms. One *alarm* is one detector signal (the chart then restarts): Σ ``Stream.alarms``, cross-checked against
   Σ ``Alert.fire_count`` (a re-fire of an open alert is another alarm of the same stream, and the ARL0 behind the
   budget counts every alarm of a restarting chart). Distinct alerts (what a safety officer opens) are reported too.
4. Exposure. A metric is monitored from ``baseline_end`` (its first post-baseline event time: observations that
   arrive before its baseline is complete are buffered and replayed) to the last event day its streams observed.
   Labeled metrics are complete only after baseline + label window + grace, and the mixed ones (error_rate, fpr,
   outcome_rate) observe a case when its window closes, so their monitored span ends a label window before the feed.
   Per metric m with span T_m days the budget allows (B/M)·T_m/D false alarms (M metrics share the budget equally);
   the device's budgeted count is their sum, i.e. B·T/D with T = mean of T_m ("monitored device-days").
5. Bound. The exact (Garwood) one-sided 95 % upper bound on the false-alarm rate, ``gamma.ppf(0.95, k + 1)`` / T,
   in alarms per D days, and P(X ≥ k | Poisson(budgeted)), the chance of seeing at least the observed count if the
   family spent exactly its budget.
6. Nominal. Σ_s n_s / ARL0_s over a metric's streams (n_s monitored observations): what the calibrated ARL0s promise
   if the baseline estimates were the truth. It is below the budget (ARL0 rounded up, capped; rate charts designed
   on the upper Wilson bound); a large observed/nominal ratio means the in-control ARL is shorter than designed.

    python -m bench.false_alarms                       # 4 seeds × 730 days + a generous budget (several minutes)
    python -m bench.false_alarms --quick               # 1 seed × 240 days, for a smoke run
    python -m bench.false_alarms --seeds 2 --days 365 --generous 50 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
from scipy.stats import gamma, poisson

from monitors.calibrate import ewma_arl, ewma_threshold
from monitors.streams import StreamMonitor
from vigil.pipeline import Pipeline, RunResult
from vigil.settings import BudgetConfig, Settings, load_settings
from vigil.simulator import simulate


@dataclass(frozen=True)
class MetricRow:
    """One metric of one device in one run."""

    seed: int
    budget: float  # B: false alarms ...
    per_days: float  # ... per D days
    model: str
    metric: str
    streams: int  # active (calibrated) streams
    insufficient: int  # gated by min_n
    exposure_days: float  # T_m
    budgeted: float  # (B/M)·T_m/D
    nominal: float  # Σ n_s / ARL0_s
    adjusted: float  # score charts: nominal × E[over-spend from estimated parameters] (estimation_inflation)
    alarms: int  # detector alarms (Σ Stream.alarms)
    alerts: int  # distinct alerts
    alarmed_baseline_n: tuple[int, ...]  # baseline size of each stream that alarmed (small cells?)


def with_budget(settings: Settings, false_alarms: float, per_days: float) -> Settings:
    """A copy of ``settings`` with only the family budget replaced."""
    monitors = settings.monitors.model_copy(update={"budget": BudgetConfig(false_alarms=false_alarms,
                                                                           per_days=per_days)})
    return settings.model_copy(update={"monitors": monitors})


def metric_rows(result: RunResult, seed: int) -> list[MetricRow]:
    """Per (device, metric): streams, exposure, budgeted, nominal and observed false alarms."""
    rows = []
    for monitor in result.monitors():
        rows += _monitor_rows(monitor, result, seed)
    return rows


def _monitor_rows(monitor: StreamMonitor, result: RunResult, seed: int) -> list[MetricRow]:
    budget = monitor.cfg.budget
    n_metrics = len(monitor.metrics)
    alerts_by_metric: dict[str, list] = defaultdict(list)
    for alert in result.alerts.of(monitor.model.id):
        if alert.signal.stream.version == monitor.version:
            alerts_by_metric[alert.signal.stream.metric].append(alert)
    rows = []
    for metric in monitor.metrics:
        streams = [s for s in monitor.streams.values() if s.key.metric == metric]
        active = [s for s in streams if s.detector is not None]
        days = [d for s in active for d in s.points]
        exposure = 0.0
        if days:
            exposure = max((max(days) + timedelta(days=1) - monitor.baseline_end).total_seconds() / 86_400, 0.0)
        alarms = sum(s.alarms for s in streams)
        fires = sum(a.fire_count for a in alerts_by_metric[metric])
        if alarms != fires:
            raise RuntimeError(f"{monitor.model.id}/{metric}: streams raised {alarms} alarms but the alerts record "
                               f"{fires} fires; the alert book lost or double-counted a signal")
        nominal = sum(sum(p.n for p in s.points.values()) / s.arl0 for s in active)
        adjusted = nominal
        if metric == "score_mean":
            adjusted = sum(sum(p.n for p in s.points.values()) / s.arl0
                           * _inflation(monitor.cfg.ewma_lambda, s.arl0, _two_digits(s.b_n)) for s in active)
        rows.append(MetricRow(
            seed=seed, budget=budget.false_alarms, per_days=budget.per_days, model=monitor.model.id, metric=metric,
            streams=len(active), insufficient=sum(s.status == "insufficient_data" for s in streams),
            exposure_days=exposure, budgeted=budget.false_alarms / n_metrics * exposure / budget.per_days,
            nominal=nominal, adjusted=adjusted, alarms=alarms, alerts=len(alerts_by_metric[metric]),
            alarmed_baseline_n=tuple(sorted(s.b_n for s in streams if s.alarms))))
    return rows


def run_seed(seed: int, days: int, volume: float, budgets: list[tuple[float, float]],
             log=print) -> tuple[list[MetricRow], dict[str, float]]:
    """Simulate one stable feed and run the pipeline on it once per budget."""
    rows: list[MetricRow] = []
    timing: dict[str, float] = {}
    base = load_settings()
    with tempfile.TemporaryDirectory(prefix="vigil-fa-") as tmp:
        t = time.perf_counter()
        simulate("stable", Path(tmp), seed=seed, days=days, volume=volume)
        timing["simulate"] = time.perf_counter() - t
        log(f"  seed {seed}: simulated {days} days in {timing['simulate']:.0f} s")
        for false_alarms, per_days in budgets:
            t = time.perf_counter()
            result = Pipeline(with_budget(base, false_alarms, per_days)).run_paths([tmp])
            label = f"pipeline {false_alarms:g}/{per_days:g}d"
            timing[label] = time.perf_counter() - t
            new = metric_rows(result, seed)
            rows += new
            log(f"  seed {seed}: budget {false_alarms:g} per {per_days:g} d → {sum(r.alarms for r in new)} alarms "
                f"({timing[label]:.0f} s)")
    return rows, timing


# --- why score charts overspend: estimated parameters ---------------------------------------------------


def estimation_inflation(lam: float, arl0: float, n: int, draws: int = 300, seed: int = 0) -> float:
    """E[in-control alarm rate] / (1/ARL0) for a fixed-limit EWMA whose mean and sd come from n baseline points.

    Standardising by an estimated mean (error e ~ N(0, 1/n) sd) and sd (ratio r ~ sqrt(χ²_{n−1}/(n−1))) is the
    same as charting N(e, 1) data against limits L·r, so the actual ARL is ``ewma_arl(λ, L·r, e)`` (Jones, Champ &
    Rigdon 2001, *Technometrics* 43:156). Averaged over ``draws`` baselines; 1/ARL is convex, so the mean rate exceeds
    the nominal one even when the estimates are unbiased, and the more so the longer ARL0 (the further into the tail).
    Normal data and fixed limits: the deployed chart uses exact limits on log-odds scores, so this is an estimate.
    """
    rng = np.random.default_rng(seed)
    L = ewma_threshold(lam, arl0)
    e = rng.standard_normal(draws) / math.sqrt(n)
    r = np.sqrt(rng.chisquare(n - 1, draws) / (n - 1))
    return float(np.mean([arl0 / ewma_arl(lam, L * ri, abs(ei)) for ei, ri in zip(e, r)]))


@functools.lru_cache(maxsize=None)
def _inflation(lam: float, arl0: float, n: int) -> float:
    return estimation_inflation(lam, arl0, n, draws=200)


def _two_digits(n: int) -> int:
    return int(float(f"{n:.2g}"))


def theory_table(lam: float) -> str:
    arl0s, ns = (2e3, 2e4, 1e5, 1e6), (50, 100, 300, 1000, 3000)
    lines = [[f"{a:.0e}"] + [f"{estimation_inflation(lam, a, n):.2f}" for n in ns] for a in arl0s]
    return _table(["ARL0 \\ baseline n"] + [str(n) for n in ns], lines)


# --- summaries ---------------------------------------------------------------------------------------


def rate_upper(k: int, exposure_days: float, per_days: float, level: float = 0.95) -> float:
    """Exact one-sided upper confidence bound on a Poisson rate (Garwood 1936), in events per ``per_days``."""
    return float(gamma.ppf(level, k + 1)) / exposure_days * per_days if exposure_days > 0 else float("inf")


def device_summary(rows: list[MetricRow]) -> list[dict]:
    """Per (budget, device), pooled over seeds: device-days, budgeted, observed, ratio, bounds."""
    groups: dict[tuple[float, float, str], list[MetricRow]] = defaultdict(list)
    for r in rows:
        groups[(r.budget, r.per_days, r.model)].append(r)
    out = []
    for (b, d, model), rs in sorted(groups.items()):
        n_metrics = len({r.metric for r in rs})
        device_days = sum(r.exposure_days for r in rs) / n_metrics  # summed over seeds
        budgeted = sum(r.budgeted for r in rs)
        alarms = sum(r.alarms for r in rs)
        out.append({
            "budget": f"{b:g} per {d:g} d", "model": model, "seeds": len({r.seed for r in rs}),
            "streams": sum(r.streams for r in rs) / len({r.seed for r in rs}), "device_days": device_days,
            "budgeted": budgeted, "nominal": sum(r.nominal for r in rs), "adjusted": sum(r.adjusted for r in rs),
            "alarms": alarms,
            "alerts": sum(r.alerts for r in rs), "ratio": alarms / budgeted if budgeted else float("nan"),
            "rate_per_D": alarms / device_days * d if device_days else float("nan"),
            "rate_upper95_per_D": rate_upper(alarms, device_days, d), "budget_per_D": b,
            "p_at_least": float(poisson.sf(alarms - 1, budgeted)) if alarms else 1.0,
        })
    return out


def metric_summary(rows: list[MetricRow]) -> list[dict]:
    """Per (budget, device, metric), pooled over seeds."""
    groups: dict[tuple[float, float, str, str], list[MetricRow]] = defaultdict(list)
    for r in rows:
        groups[(r.budget, r.per_days, r.model, r.metric)].append(r)
    out = []
    for (b, d, model, metric), rs in sorted(groups.items()):
        seeds = len({r.seed for r in rs})
        out.append({
            "budget": f"{b:g} per {d:g} d", "model": model, "metric": metric,
            "streams": sum(r.streams for r in rs) / seeds, "insufficient": sum(r.insufficient for r in rs) / seeds,
            "exposure_days": sum(r.exposure_days for r in rs), "budgeted": sum(r.budgeted for r in rs),
            "nominal": sum(r.nominal for r in rs), "adjusted": sum(r.adjusted for r in rs),
            "alarms": sum(r.alarms for r in rs),
            "alerts": sum(r.alerts for r in rs),
            "alarmed_baseline_n": sorted(n for r in rs for n in r.alarmed_baseline_n),
        })
    return out


def _table(header: list[str], lines: list[list[str]]) -> str:
    head = "| " + " | ".join(header) + " |\n|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"
    return "\n".join([head] + ["| " + " | ".join(line) + " |" for line in lines])


def render(devices: list[dict], metrics: list[dict]) -> str:
    dev = _table(
        ["budget", "device", "seeds", "streams/seed", "device-days", "budgeted", "nominal", "adjusted",
         "observed alarms",
         "distinct alerts", "observed / budgeted", "rate per D (95 % upper)", "P(X ≥ obs | budget)"],
        [[d["budget"], d["model"], str(d["seeds"]), f"{d['streams']:.0f}", f"{d['device_days']:.0f}",
          f"{d['budgeted']:.2f}", f"{d['nominal']:.2f}", f"{d['adjusted']:.2f}", str(d["alarms"]), str(d["alerts"]),
          f"{d['ratio']:.2f}",
          f"{d['rate_per_D']:.2f} ({d['rate_upper95_per_D']:.2f})", f"{d['p_at_least']:.2g}"] for d in devices])
    met = _table(
        ["budget", "device", "metric", "streams (+gated)/seed", "monitored days", "budgeted", "nominal", "adjusted",
         "observed alarms", "alerts", "baseline n of alarmed streams"],
        [[m["budget"], m["model"], m["metric"], f"{m['streams']:.0f} (+{m['insufficient']:.0f})",
          f"{m['exposure_days']:.0f}", f"{m['budgeted']:.2f}", f"{m['nominal']:.2f}", f"{m['adjusted']:.2f}",
          str(m["alarms"]),
          str(m["alerts"]), ", ".join(map(str, m["alarmed_baseline_n"])) or "—"] for m in metrics])
    return f"Per device (pooled over seeds)\n\n{dev}\n\nPer metric (pooled over seeds)\n\n{met}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=4, help="independent stable feeds (seeds FIRST..FIRST+N-1)")
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--days", type=int, default=730, help="days of predictions per feed")
    ap.add_argument("--volume", type=float, default=1.0, help="simulator volume (1.0 ≈ 210 predictions/day)")
    ap.add_argument("--budget", type=float, default=None,
                    help="false alarms per --per-days (default: the configured budget)")
    ap.add_argument("--per-days", type=float, default=None)
    ap.add_argument("--generous", type=float, default=50.0,
                    help="also run this many false alarms per --per-days on the first --generous-seeds feeds "
                         "(0 to skip)")
    ap.add_argument("--generous-seeds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 seed × 240 days")
    ap.add_argument("--json", type=Path, default=None, help="also write every row and summary to this file")
    ap.add_argument("--theory", action="store_true",
                    help="only print the expected over-spend of an EWMA on estimated parameters (no feeds)")
    args = ap.parse_args(argv)
    if args.theory:
        lam = load_settings().monitors.ewma_lambda
        print(f"E[alarm rate] / nominal, EWMA λ = {lam}, fixed limits, 300 baselines per cell\n")
        print(theory_table(lam))
        return 0
    if args.quick:
        args.seeds, args.days, args.generous_seeds = 1, 240, 1
    configured = load_settings().monitors.budget
    budget = (args.budget or configured.false_alarms, args.per_days or configured.per_days)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"stable feeds: {args.seeds} seeds × {args.days} days, volume {args.volume}; budget {budget[0]:g} per "
        f"{budget[1]:g} d" + (f", generous {args.generous:g} per {budget[1]:g} d on {args.generous_seeds} seed(s)"
                              if args.generous else ""))
    rows: list[MetricRow] = []
    timings = {}
    started = time.perf_counter()
    for i, seed in enumerate(range(args.first_seed, args.first_seed + args.seeds)):
        budgets = [budget] + ([(args.generous, budget[1])] if args.generous and i < args.generous_seeds else [])
        new, timings[seed] = run_seed(seed, args.days, args.volume, budgets, log)
        rows += new
        log(f"  {i + 1}/{args.seeds} seeds done, {time.perf_counter() - started:.0f} s elapsed")
    devices, metrics = device_summary(rows), metric_summary(rows)
    print(render(devices, metrics))
    print(f"{args.seeds} seeds (from {args.first_seed}) × {args.days} days, volume {args.volume}; "
          f"total {time.perf_counter() - started:.0f} s;"
          f" Python {platform.python_version()}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": [asdict(r) for r in rows], "devices": devices, "metrics": metrics,
                                         "timings_s": timings}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
