"""Detection delay at matched in-control ARL0: vigil's CUSUMs against the exact Markov-chain optimum and against river's
PageHinkley and ADWIN (DESIGN.md "Performance targets": within 10 % of the exact optimum; ≥ 2× shorter than river).

Method
1. Streams. Normal: N(0, 1), then N(δ, 1) with the design shift δ = 1 sd. Bernoulli: event rate p0 = 0.05, then
   p1 = 0.0952 (odds doubled). The change comes after ``tau`` in-control observations.
2. Matched ARL0. vigil's thresholds come from the exact ARL (``monitors.calibrate``: Nyström for the two-sided
   CUSUM, k = δ/2; the Markov chain for the Bernoulli CUSUM). river's detectors have no run-length theory, so their
   alarm parameter (PageHinkley ``threshold``, ADWIN ``delta``) is solved by simulation: bisection on its logarithm
   until the mean of ``--cal-runs`` in-control run lengths (common random numbers, so the mean is monotone in the
   parameter) equals the target; runs are capped at 10·ARL0. Every detector's ARL0 is then re-measured on
   ``--verify-runs`` independent streams and reported with its standard error.
3. Delay. ``--runs`` streams, the *same* streams for every detector (common random numbers); a run that alarms
   before the change is a false alarm and is dropped (counted); the conditional delay is the number of observations
   from the first changed one to the alarm, inclusive (so a zero-state chart's delay equals its out-of-control ARL).
4. Exact optimum. The CUSUM is the optimal detector for the design shift (Moustakides 1986); its exact conditional
   delay at ``tau`` is computed from the Brook–Evans chain (``monitors.calibrate.conditional_delay``: state
   distribution after tau in-control steps given no alarm × out-of-control ARL vector); the zero-state ARL1
   (Lorden's worst case) is reported beside it. For the two-sided Normal chart the chain is the upper side's
   (the lower side's contribution to a rise is < 1e-4 of the mass).
5. "vigil as deployed" (Bernoulli, exact, no simulation): ``monitors.streams`` designs a rate chart for the
   one-sided 95 % upper Wilson bound of a baseline estimate (to keep the nominal ARL0 when p0 is estimated), so on
   the true p0 its ARL0 is longer and its delay longer than the known-p0 optimum; shown for a baseline of 2,000 cases.

    python -m bench.detection_delay [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from monitors.calibrate import (
    bernoulli_arl,
    bernoulli_chain,
    bernoulli_threshold,
    conditional_delay,
    cusum_arl,
    cusum_chain,
    cusum_threshold,
)
from monitors.detectors import BernoulliCusum, TabularCusum
from monitors.river_adapters import RiverAdwin, RiverPageHinkley
from monitors.streams import _design_rate

Make = Callable[[], object]
_BLOCK = 512


@dataclass(frozen=True)
class Stream:
    name: str
    arl0: float
    tau: int
    draw: Callable[[np.random.Generator, int], np.ndarray]  # base randomness for n observations
    apply: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (base, changed mask) → observations


NORMAL_SHIFT = 1.0
P0 = 0.05
P1 = 2 * P0 / (1 + P0)  # odds doubled: 0.0952


def normal_stream(arl0: float, tau: int) -> Stream:
    return Stream("normal", arl0, tau, lambda rng, n: rng.standard_normal(n),
                  lambda z, changed: z + NORMAL_SHIFT * changed)


def bernoulli_stream(arl0: float, tau: int) -> Stream:
    return Stream("bernoulli", arl0, tau, lambda rng, n: rng.random(n),
                  lambda u, changed: (u < np.where(changed, P1, P0)).astype(float))


def first_alarm(make: Make, stream: Stream, seed: tuple[int, ...], change_at: int | None, limit: int) -> int | None:
    """Index (1-based) of the first alarm on one stream, or None within ``limit`` observations. Observations after
    ``change_at`` (None: never) are shifted."""
    detector = make()
    update = detector.update  # type: ignore[attr-defined]
    rng = np.random.default_rng(seed)
    t = 0
    while t < limit:
        n = min(_BLOCK, limit - t)
        index = np.arange(t + 1, t + n + 1)
        changed = index > change_at if change_at is not None else np.zeros(n, dtype=bool)
        for x in stream.apply(stream.draw(rng, n), changed).tolist():
            t += 1
            if update(x):
                return t
    return None


def mean_run_length(make: Make, stream: Stream, seeds: range, tag: int) -> tuple[float, float, int]:
    """In-control mean run length, its standard error and the number of runs censored at 10·ARL0."""
    limit = int(10 * stream.arl0)
    lengths = []
    censored = 0
    for r in seeds:
        hit = first_alarm(make, stream, (tag, r), None, limit)
        censored += hit is None
        lengths.append(limit if hit is None else hit)
    a = np.asarray(lengths, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size)), censored


def calibrate_by_simulation(factory: Callable[[float], Make], stream: Stream, lo: float, hi: float, increasing: bool,
                            runs: int, iterations: int, cap: float | None = None) -> float:
    """The parameter whose simulated in-control ARL equals ``stream.arl0``: bisection on log(parameter) with common
    random numbers. ``increasing``: the ARL rises with the parameter (PageHinkley's threshold) or falls (ADWIN's
    delta)."""
    target = math.log(stream.arl0)

    def gap(param: float) -> float:
        mean, _, _ = mean_run_length(factory(param), stream, range(runs), tag=1)
        return (math.log(mean) - target) * (1 if increasing else -1)

    for _ in range(6):  # widen a bracket that misses (the start brackets come from earlier runs)
        if gap(lo) > 0:
            lo /= 2
        elif gap(hi) < 0:
            if cap is not None and hi >= cap:
                raise SystemExit(f"{stream.name}: ARL0 {stream.arl0:g} is out of reach (parameter capped at {cap})")
            hi = min(hi * 2, cap) if cap is not None else hi * 2
        else:
            break
    a, b = math.log(lo), math.log(hi)
    for _ in range(iterations):
        mid = 0.5 * (a + b)
        if gap(math.exp(mid)) < 0:
            a = mid
        else:
            b = mid
    return math.exp(0.5 * (a + b))


def conditional_delays(make: Make, stream: Stream, runs: int) -> dict[str, float]:
    limit = stream.tau + int(20 * stream.arl0)
    delays, false_alarms, missed = [], 0, 0
    for r in range(runs):
        hit = first_alarm(make, stream, (2, r), stream.tau, limit)
        if hit is None:
            missed += 1
        elif hit <= stream.tau:
            false_alarms += 1
        else:
            delays.append(hit - stream.tau)
    d = np.asarray(delays, dtype=float)
    return {"delay": float(d.mean()), "delay_se": float(d.std(ddof=1) / math.sqrt(d.size)),
            "delay_median": float(np.median(d)), "n": int(d.size), "false_alarms_before_change": false_alarms,
            "missed": missed}


@dataclass
class Row:
    stream: str
    detector: str
    parameter: str
    arl0_target: float
    arl0_measured: float | None
    arl0_se: float | None
    delay: float
    delay_se: float | None
    delay_median: float | None
    n: int | None
    false_alarms_before_change: int | None
    note: str = ""


def run(stream: Stream, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    t0 = time.perf_counter()

    def measure(name: str, parameter: str, make: Make, note: str = "") -> None:
        arl, se, censored = mean_run_length(make, stream, range(args.verify_runs), tag=3)
        d = conditional_delays(make, stream, args.runs)
        if censored:
            note = (note + "; " if note else "") + f"{censored} ARL0 runs censored at 10·ARL0"
        if d["missed"]:
            note = (note + "; " if note else "") + f"{d['missed']} runs never alarmed"
        rows.append(Row(stream.name, name, parameter, stream.arl0, arl, se, d["delay"], d["delay_se"],
                        d["delay_median"], d["n"], d["false_alarms_before_change"], note))
        print(f"  {stream.name:9s} {name:28s} {parameter:22s} ARL0 {arl:8.0f} ± {se:5.0f}  delay {d['delay']:7.1f} "
              f"± {d['delay_se']:4.1f}  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    if stream.name == "normal":
        k = NORMAL_SHIFT / 2
        h = cusum_threshold(k, stream.arl0)
        q_in, q_out = cusum_chain(k, h, 0.0, args.states), cusum_chain(k, h, NORMAL_SHIFT, args.states)
        exact = conditional_delay(q_in, q_out, stream.tau)
        zero_state = cusum_arl(k, h, NORMAL_SHIFT)
        rows.append(Row(stream.name, "exact optimum (chain)", f"k={k}, h={h:.4f}", stream.arl0, cusum_arl(k, h), None,
                        exact, None, None, None, None, f"zero-state ARL1 {zero_state:.2f}"))
        measure("vigil TabularCusum", f"k={k}, h={h:.4f}", lambda: TabularCusum(k, h))
        ph_mode, ph_tuned_delta = "both", NORMAL_SHIFT / 2
        ph_brackets, adwin_bracket = ((35.0, 80.0), (5.0, 11.0)), (0.3, 0.95)
    else:
        h = bernoulli_threshold(P0, P1, stream.arl0)
        exact = conditional_delay(bernoulli_chain(P0, P1, h, P0), bernoulli_chain(P0, P1, h, P1), stream.tau)
        zero_state = bernoulli_arl(P0, P1, h, P1)
        rows.append(Row(stream.name, "exact optimum (chain)", f"p0={P0}, p1={P1:.4f}, h={h:.4f}", stream.arl0,
                        bernoulli_arl(P0, P1, h), None, exact, None, None, None, None,
                        f"zero-state ARL1 {zero_state:.1f}"))
        measure("vigil BernoulliCusum", f"h={h:.4f}", lambda: BernoulliCusum(P0, P1, h))
        # as deployed: designed for the 95 % upper Wilson bound of a 2,000-case baseline (exact, on the true rates)
        n_base = 2000
        p0d = _design_rate(P0 * n_base, n_base)
        p1d = 2 * p0d / (1 + p0d)
        hd = bernoulli_threshold(p0d, p1d, stream.arl0)
        q_in, q_out = bernoulli_chain(p0d, p1d, hd, P0), bernoulli_chain(p0d, p1d, hd, P1)
        rows.append(Row(stream.name, "vigil as deployed (exact)", f"p0'={p0d}, h={hd:.4f}", stream.arl0,
                        bernoulli_arl(p0d, p1d, hd, P0), None, conditional_delay(q_in, q_out, stream.tau), None, None,
                        None, None, f"designed for the upper Wilson bound of {n_base} baseline cases"))
        ph_mode, ph_tuned_delta = "up", (P1 - P0) / 2
        ph_brackets, adwin_bracket = ((11.0, 25.0), (6.0, 14.0)), (0.3, 0.95)

    variants = (("river PageHinkley (default δ)", {}), ("river PageHinkley (tuned δ)", {"delta": ph_tuned_delta}))
    for (label, extra), bracket in zip(variants, ph_brackets, strict=True):
        if args.only and args.only not in label:
            continue
        def factory(th: float, extra: dict = extra) -> Make:
            return lambda: RiverPageHinkley(threshold=th, mode=ph_mode, **extra)

        th = calibrate_by_simulation(factory, stream, *bracket, True, args.cal_runs, args.iterations)
        delta = extra.get("delta", 0.005)
        measure(label, f"threshold={th:.4g}, δ={delta:.4g}", factory(th), f"mode={ph_mode}")

    for label, extra in (("river ADWIN", {}), ("river ADWIN (clock=1)", {"clock": 1})):
        if args.only and args.only not in label:
            continue

        def adwin(delta: float, extra: dict = extra) -> Make:
            return lambda: RiverAdwin(delta=delta, **extra)

        clock = f"clock={extra.get('clock', 32)}" + ("" if extra else " (default)")
        try:
            delta = calibrate_by_simulation(adwin, stream, *adwin_bracket, False, args.cal_runs, args.iterations,
                                            cap=0.999)
            measure(label, f"delta={delta:.4g}", adwin(delta), clock)
        except SystemExit as err:
            print(f"  {label}: {err}", file=sys.stderr)
            measure(label, "delta=0.999", adwin(0.999), f"{clock}; cannot reach the target ARL0: at its floor")
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| stream | detector | parameters | ARL0 target | ARL0 measured (± SE) | conditional delay (± SE) | "
             "median | runs | false alarms before change | ratio to vigil | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stream in dict.fromkeys(r.stream for r in rows):
        group = [r for r in rows if r.stream == stream]
        vigil = next(r for r in group if r.detector.startswith("vigil") and r.delay_se is not None)
        for r in group:
            arl = f"{r.arl0_measured:,.0f}" + (f" ± {r.arl0_se:,.0f}" if r.arl0_se is not None else " (exact)")
            delay = f"{r.delay:.1f}" + (f" ± {r.delay_se:.1f}" if r.delay_se is not None else " (exact)")
            lines.append(f"| {r.stream} | {r.detector} | {r.parameter} | {r.arl0_target:,.0f} | {arl} | {delay} | "
                         f"{'' if r.delay_median is None else f'{r.delay_median:.0f}'} | {r.n or ''} | "
                         f"{'' if r.false_alarms_before_change is None else r.false_alarms_before_change} | "
                         f"{r.delay / vigil.delay:.2f} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI size: fewer runs (≈ 1–2 minutes on 2 cores)")
    parser.add_argument("--normal-arl0", type=float, default=2000.0)
    parser.add_argument("--bernoulli-arl0", type=float, default=10_000.0)
    parser.add_argument("--normal-tau", type=int, default=500)
    parser.add_argument("--bernoulli-tau", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=1000, help="delay runs per detector")
    parser.add_argument("--cal-runs", type=int, default=200, help="in-control runs per calibration step")
    parser.add_argument("--verify-runs", type=int, default=300, help="in-control runs to re-measure ARL0")
    parser.add_argument("--iterations", type=int, default=8, help="bisection steps of a simulated calibration")
    parser.add_argument("--states", type=int, default=1000, help="Brook–Evans states for the Normal chain")
    parser.add_argument("--only", metavar="TEXT", help="run only the river detectors whose label contains TEXT")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.cal_runs, args.verify_runs, args.iterations = 200, 40, 60, 5
    started = time.perf_counter()
    rows = run(normal_stream(args.normal_arl0, args.normal_tau), args)
    rows += run(bernoulli_stream(args.bernoulli_arl0, args.bernoulli_tau), args)
    elapsed = time.perf_counter() - started
    print(table(rows))
    print(f"\n{platform.python_implementation()} {platform.python_version()}, {'quick' if args.quick else 'full'} run: "
          f"runs={args.runs}, cal-runs={args.cal_runs}, verify-runs={args.verify_runs}, "
          f"iterations={args.iterations}; {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "args": vars(args), "seconds": elapsed}, f, indent=2)


if __name__ == "__main__":
    main()
