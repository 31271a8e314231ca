"""Exact ARLs against published tables and simulation; thresholds; the family budget; `vigil calibrate`."""

from __future__ import annotations

import doctest
import json
import math
import os
import tracemalloc
import warnings

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import monitors.budget
import monitors.calibrate
from monitors.budget import stream_arl0
from monitors.calibrate import (
    bernoulli_arl,
    bernoulli_threshold,
    cusum_arl,
    cusum_threshold,
    ewma_arl,
    ewma_threshold,
    monte_carlo_arl,
    racusum_arl,
    racusum_threshold,
)
from monitors.detectors import BernoulliCusum, Ewma, RiskAdjustedCusum, TabularCusum
from vigil.cli_calibrate import calibrate_app

SLOW_SCALE = float(os.environ.get("VIGIL_SLOW_SCALE", "1.0"))


def _runs(base: int) -> int:
    return max(200, int(base * SLOW_SCALE))


def _parsonnet_mix(n: int = 2000, seed: int = 0) -> np.ndarray:
    """Predicted risks of a cardiac-surgery-like mix: logit p = −3.68 + 0.077·Parsonnet (Steiner et al. 2000)."""
    score = np.minimum(np.random.default_rng(seed).exponential(10.0, n), 70.0)
    return 1.0 / (1.0 + np.exp(3.68 - 0.077 * score))


def test_docstring_examples_run() -> None:
    for module in (monitors.calibrate, monitors.budget):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0


# --- Tabular CUSUM -----------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "arl0", "arl1"), [(4.0, 168.0, 8.38), (5.0, 465.0, 10.4)])
def test_cusum_reproduces_lucas_crosier_1982(h, arl0, arl1) -> None:
    assert cusum_arl(0.5, h) == pytest.approx(arl0, rel=0.01)
    assert cusum_arl(0.5, h, shift=1.0) == pytest.approx(arl1, rel=0.01)


def test_two_sided_cusum_in_control_is_half_the_one_sided() -> None:
    one = cusum_arl(0.5, 4.0, sided="upper")
    assert one == pytest.approx(335.37, abs=0.01)  # Brook–Evans chain with 2,000 states: 335.367
    assert cusum_arl(0.5, 4.0, sided="lower") == pytest.approx(one)
    assert cusum_arl(0.5, 4.0) == pytest.approx(one / 2)
    assert cusum_arl(0.5, 4.0, shift=1.0, sided="lower") > 1e4  # a rise is invisible to the lower side


def test_cusum_threshold_inverts_the_arl() -> None:
    assert cusum_threshold(0.5, 465.0) == pytest.approx(5.0, abs=0.005)
    h = cusum_threshold(0.25, 1e6, sided="upper")
    assert cusum_arl(0.25, h, sided="upper") == pytest.approx(1e6, rel=1e-6)
    with pytest.raises(ValueError, match="ARL0"):
        cusum_threshold(0.5, 1.0)


def test_cusum_exact_arl_matches_simulation() -> None:
    """Out of control (δ = 1) the runs are short, so 4,000 of them give a ~1 % SE in well under a second."""
    exact = cusum_arl(0.5, 4.0, shift=1.0)
    mean, se = monte_carlo_arl(lambda: TabularCusum(0.5, 4.0), lambda rng, n: rng.normal(1.0, 1.0, n),
                               n_runs=4000, seed=3, max_steps=10_000)
    assert abs(mean - exact) < 3 * se
    assert se / mean < 0.02


# --- EWMA --------------------------------------------------------------------------------------


def test_ewma_reproduces_lucas_saccucci_1990() -> None:
    assert ewma_arl(0.1, 2.814) == pytest.approx(500.0, rel=0.02)
    assert ewma_arl(0.1, 2.814, shift=1.0) == pytest.approx(10.3, rel=0.01)
    assert ewma_arl(0.2, 2.962) == pytest.approx(500.0, rel=0.02)
    assert ewma_threshold(0.1, 500.0) == pytest.approx(2.814, abs=0.002)
    assert ewma_threshold(0.2, 500.0) == pytest.approx(2.962, abs=0.002)


def test_ewma_with_lambda_one_is_a_shewhart_chart() -> None:
    # λ = 1: Z_t = X_t, alarm when |X| > L; geometric run length with mean 1 / P(|X| > 3)
    assert ewma_arl(1.0, 3.0) == pytest.approx(1.0 / (2.0 * (1.0 - 0.9986501019683699)), rel=1e-6)


def test_ewma_exact_limits_shorten_runs_and_match_simulation() -> None:
    fixed, exact = ewma_arl(0.1, 2.814, shift=1.0), ewma_arl(0.1, 2.814, shift=1.0, limits="exact")
    assert exact < fixed - 1.0  # the tight early limits catch a shift that is present from the start
    mean, se = monte_carlo_arl(lambda: Ewma(0.1, 2.814, limits="exact"), lambda rng, n: rng.normal(1.0, 1.0, n),
                               n_runs=4000, seed=5, max_steps=10_000)
    assert abs(mean - exact) < 3 * se
    assert ewma_threshold(0.1, 500.0, limits="exact") > ewma_threshold(0.1, 500.0)


@pytest.mark.slow
def test_ewma_exact_limits_in_control_match_simulation() -> None:
    exact = ewma_arl(0.2, 2.5, limits="exact")
    mean, se = monte_carlo_arl(lambda: Ewma(0.2, 2.5, limits="exact"), lambda rng, n: rng.normal(0.0, 1.0, n),
                               n_runs=_runs(4000), seed=7, max_steps=100_000)
    assert abs(mean - exact) < 3 * se


# --- Bernoulli CUSUM ---------------------------------------------------------------------------


def test_bernoulli_arl_falls_with_the_true_rate() -> None:
    h = bernoulli_threshold(0.02, 0.04, 5000.0)
    in_control = bernoulli_arl(0.02, 0.04, h)
    assert 5000.0 <= in_control < 5000.0 * 1.01
    assert bernoulli_arl(0.02, 0.04, h, p=0.04) < in_control / 10
    assert bernoulli_arl(0.02, 0.04, h, p=0.01) > in_control


@pytest.mark.parametrize(("p0", "arl0"), [(0.005, 1e7), (0.05, 100.0), (0.3, 1e6)])
def test_bernoulli_threshold_is_the_smallest_that_reaches_arl0(p0, arl0) -> None:
    p1 = 2 * p0 / (1 + p0)  # odds doubled
    h = bernoulli_threshold(p0, p1, arl0)
    assert arl0 <= bernoulli_arl(p0, p1, h) < 1.01 * arl0
    assert bernoulli_arl(p0, p1, 0.995 * h) < arl0


def test_bernoulli_rejects_a_decrease() -> None:
    with pytest.raises(ValueError, match="increase"):
        bernoulli_threshold(0.1, 0.05, 1000.0)


@pytest.mark.slow
@pytest.mark.parametrize(("p0", "p1", "h", "p"), [(0.005, 0.01, 2.5, 0.005), (0.05, 0.1, 3.0, 0.05),
                                                  (0.2, 0.333, 3.0, 0.2), (0.02, 0.04, 3.0, 0.04)])
def test_bernoulli_chain_matches_simulation(p0, p1, h, p) -> None:
    exact = bernoulli_arl(p0, p1, h, p)
    mean, se = monte_carlo_arl(lambda: BernoulliCusum(p0, p1, h), lambda rng, n: (rng.random(n) < p).astype(float),
                               n_runs=_runs(2000), seed=11, max_steps=10_000_000)
    assert abs(mean - exact) < 3 * se


def _bernoulli_run_lengths(p0: float, p1: float, h: float, p: float, n_runs: int, seed: int,
                           slots: int = 2000) -> tuple[float, float]:
    """Monte Carlo of the unrounded Bernoulli CUSUM, one event at a time: between events the chart only falls, so a
    gap of G zeros then a 1 takes S to max(0, S − G·|w0|) + w1 (G + 1 ~ geometric(p)), and only a 1 can alarm.
    Vectorised over ``slots`` charts that restart when they alarm; each slot contributes its first n_runs/slots runs
    (not the first n_runs to finish overall, which would favour short runs). Mean and standard error."""
    up, down = math.log(p1 / p0), -math.log((1 - p1) / (1 - p0))
    per_slot = max(1, math.ceil(n_runs / slots))
    rng = np.random.default_rng(seed)
    s, length, count = np.zeros(slots), np.zeros(slots), np.zeros(slots, dtype=int)
    done: list[np.ndarray] = []
    while (count < per_slot).any():
        gap = rng.geometric(p, slots)
        s = np.maximum(0.0, s - (gap - 1) * down) + up
        length += gap
        alarm = s > h
        if alarm.any():
            done.append(length[alarm & (count < per_slot)].copy())
            count += alarm
            s[alarm], length[alarm] = 0.0, 0.0
    lengths = np.concatenate(done)
    return float(lengths.mean()), float(lengths.std(ddof=1) / math.sqrt(lengths.size))


def test_event_level_simulation_matches_the_detector() -> None:
    """The fast simulator used below against ``BernoulliCusum`` itself, where runs are short."""
    fast = _bernoulli_run_lengths(0.2, 1 / 3, 2.5, 0.2, 20_000, seed=1)
    slow = monte_carlo_arl(lambda: BernoulliCusum(0.2, 1 / 3, 2.5), lambda rng, n: (rng.random(n) < 0.2).astype(float),
                           n_runs=2000, seed=2, max_steps=1_000_000)
    assert abs(fast[0] - slow[0]) < 3 * math.hypot(fast[1], slow[1])
    assert fast[0] == pytest.approx(bernoulli_arl(0.2, 1 / 3, 2.5), rel=3 * fast[1] / fast[0])


@pytest.mark.slow
@pytest.mark.parametrize(("p0", "arl0"), [(0.005, 1e6), (0.3, 1e4)])
def test_bernoulli_threshold_matches_simulation(p0, arl0) -> None:
    """The threshold's in-control ARL, simulated without any grid (≈ 1 % SE at full scale)."""
    p1 = 2 * p0 / (1 + p0)
    h = bernoulli_threshold(p0, p1, arl0)
    mean, se = _bernoulli_run_lengths(p0, p1, h, p0, _runs(10_000), seed=17)
    assert abs(mean - arl0) < 3 * se


def test_bernoulli_threshold_is_cheap() -> None:
    """Cost as counts, not times: chain solves per threshold, chain states × bandwidth per solve, and what the caches
    keep. (The former grid, 64 cells per positive step, needed 2,000–2,900 states and a lower band of 60–90 cells
    at p0 ≥ 0.4, and 6–15 solves: 100× the work per threshold.)"""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for p0 in (0.005, 0.0123, 0.05, 0.15, 0.3, 0.45, 0.5):
        p1 = 2 * p0 / (1 + p0)
        for arl0 in (1e3, 1e5, 1e7):
            misses = monitors.calibrate._bernoulli_chain.cache_info().misses
            h = bernoulli_threshold(p0, p1, arl0)
            solves = monitors.calibrate._bernoulli_chain.cache_info().misses - misses
            assert solves <= (10 if arl0 < 1e4 else 7), (p0, arl0, solves)
            grid = monitors.calibrate._bernoulli_grid(p0, p1)
            states = h / grid.delta
            assert states < 2_000
            # the one-cell down step is solved in O(states); otherwise the banded LU costs states·lower·(lower+upper)
            work = states * (grid.up + 1) if grid.down == 1 else states * grid.down * (grid.down + grid.up + 2)
            assert work < 8e6, (p0, arl0, work)
            assert isinstance(monitors.calibrate._bernoulli_chain(p0, p1, p0, 10), float)
    retained = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert retained < 2_000_000  # the caches hold floats and small tuples, never the chain's arrays


def test_bernoulli_arl_is_continuous_and_solves_the_target() -> None:
    p0, p1 = 0.1, 2 * 0.1 / 1.1
    h = bernoulli_threshold(p0, p1, 1e5)
    assert bernoulli_arl(p0, p1, h) == pytest.approx(1e5, rel=1e-9)
    assert bernoulli_arl(p0, p1, h) >= 1e5
    grid = monitors.calibrate._bernoulli_grid(p0, p1)
    ratios = [bernoulli_arl(p0, p1, h + (i + 1) * grid.delta / 7) / bernoulli_arl(p0, p1, h + i * grid.delta / 7)
              for i in range(14)]
    assert all(1.0 < r < 1.01 for r in ratios)  # smooth: ln ARL rises ≈ Δ/7 per step, no jumps at the cell edges
    # tiny in-control rates need no dense band: ~30,000 states by the O(states) recursion
    assert bernoulli_threshold(0.0003, 0.0006, 1e6) == pytest.approx(4.35, abs=0.01)


# --- Risk-adjusted CUSUM -----------------------------------------------------------------------


def test_racusum_threshold_and_out_of_control_arl() -> None:
    risks = _parsonnet_mix()
    h = racusum_threshold(risks, 2.0, 5000.0)
    assert 5000.0 <= racusum_arl(risks, 2.0, h) < 5000.0 * 1.02
    assert racusum_arl(risks, 2.0, h, odds_ratio=2.0) < 250.0
    assert racusum_arl(risks, 2.0, h, odds_ratio=0.5) > 5000.0
    # the mix matters: the same chart on a low-risk mix waits longer for the same evidence
    assert racusum_arl(risks * 0.5, 2.0, h, odds_ratio=2.0) > racusum_arl(risks, 2.0, h, odds_ratio=2.0)


def test_racusum_rejects_bad_risks() -> None:
    with pytest.raises(ValueError, match="entry 2"):
        racusum_arl([0.1, 1.5], 2.0, 4.0)


@pytest.mark.slow
@pytest.mark.parametrize(("ra", "h", "odds_ratio"), [(2.0, 3.0, 1.0), (2.0, 3.0, 2.0), (0.5, 2.5, 1.0)])
def test_racusum_chain_matches_simulation(ra, h, odds_ratio) -> None:
    risks = _parsonnet_mix()
    exact = racusum_arl(risks, ra, h, odds_ratio)

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        p = risks[rng.integers(0, risks.size, n)]
        true_p = odds_ratio * p / (1 - p + odds_ratio * p)
        return np.column_stack([(rng.random(n) < true_p).astype(float), p])

    mean, se = monte_carlo_arl(lambda: RiskAdjustedCusum(ra, h), draw, n_runs=_runs(2000), seed=13,
                               max_steps=1_000_000)
    assert abs(mean - exact) < 3 * se


# --- Monte Carlo helper ------------------------------------------------------------------------


def test_monte_carlo_is_reproducible_and_warns_on_censoring() -> None:
    def run():
        return monte_carlo_arl(lambda: TabularCusum(0.5, 4.0), lambda rng, n: rng.normal(0.0, 1.0, n), 50, 1, 100)

    with pytest.warns(UserWarning, match="max_steps=100"):
        censored = run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run() == censored
    assert censored[0] <= 100


# --- family budget -----------------------------------------------------------------------------


def test_stream_arl0_splits_the_family_budget() -> None:
    # 1 false alarm per 90 days over 50 streams of 20 events/day: each stream may alarm once per 4,500 days
    assert stream_arl0(1, 90, 50, 20.0) == pytest.approx(90_000.0)
    # the budget holds: expected family false alarms in 90 days = Σ rate·days / ARL0 = 1
    assert 50 * 20.0 * 90 / stream_arl0(1, 90, 50, 20.0) == pytest.approx(1.0)
    assert stream_arl0(2, 90, 50, 20.0) == pytest.approx(45_000.0)
    assert stream_arl0(1, 365, 10_000, 500.0) == 1e7
    assert stream_arl0(1, 365, 10_000, 500.0, cap=1e10) == pytest.approx(1.825e9)
    with pytest.raises(ValueError, match="insufficient data"):
        stream_arl0(1, 90, 50, 0.0)


# --- `vigil calibrate` -------------------------------------------------------------------------


@pytest.fixture
def invoke():
    app = typer.Typer()
    app.add_typer(calibrate_app, name="calibrate")
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, ["calibrate", *args])

    return run


def test_cli_cusum_threshold_json(invoke) -> None:
    result = invoke("threshold", "--detector", "cusum", "--k", "0.5", "--arl0", "465", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["h"] == pytest.approx(5.0, abs=0.005)
    assert out["arl"] == pytest.approx(465.0, rel=1e-6)


def test_cli_one_sided_cusum_arl(invoke) -> None:
    out = json.loads(invoke("arl", "--detector", "cusum", "--sided", "one", "--h", "4", "--json").output)
    assert out["arl"] == pytest.approx(335.37, abs=0.01)


def test_cli_ewma_uses_L(invoke) -> None:
    out = json.loads(invoke("arl", "--detector", "ewma", "--lam", "0.1", "--L", "2.814", "--shift", "1", "--json")
                     .output)
    assert out["L"] == 2.814 and "h" not in out
    assert out["arl"] == pytest.approx(10.3, rel=0.01)
    missing = invoke("arl", "--detector", "ewma", "--h", "2.814")
    assert missing.exit_code == 2
    assert "--L" in missing.output
    threshold = json.loads(invoke("threshold", "--detector", "ewma", "--lam", "0.2", "--arl0", "500", "--json").output)
    assert threshold["L"] == pytest.approx(2.962, abs=0.002)


def test_cli_bernoulli(invoke) -> None:
    thr = json.loads(invoke("threshold", "--detector", "bernoulli", "--p0", "0.01", "--p1", "0.02", "--arl0", "1000",
                            "--json").output)
    assert thr["h"] == pytest.approx(bernoulli_threshold(0.01, 0.02, 1000.0))
    at_p1 = json.loads(invoke("arl", "--detector", "bernoulli", "--p0", "0.01", "--p1", "0.02", "--h", str(thr["h"]),
                              "--p", "0.02", "--json").output)
    assert at_p1["arl"] == pytest.approx(bernoulli_arl(0.01, 0.02, thr["h"], 0.02))
    assert at_p1["arl"] < thr["arl"] / 3
    missing = invoke("threshold", "--detector", "bernoulli", "--p0", "0.01", "--arl0", "1000")
    assert missing.exit_code == 2 and "--p1" in missing.output


def test_cli_racusum_reads_a_risk_file(invoke, tmp_path) -> None:
    risks = _parsonnet_mix(300)
    path = tmp_path / "risks.csv"
    path.write_text("risk,site\n" + "\n".join(f"{r:.6f},a" for r in risks) + "\n\n")
    out = json.loads(invoke("arl", "--detector", "racusum", "--ra", "2", "--risks", str(path), "--h", "4",
                            "--or", "2", "--json").output)
    assert out["n_risks"] == 300
    assert out["arl"] == pytest.approx(racusum_arl(np.round(risks, 6), 2.0, 4.0, 2.0))
    table = invoke("threshold", "--detector", "racusum", "--ra", "2", "--risks", str(path), "--arl0", "2000")
    assert table.exit_code == 0 and "racusum" in table.output and "arl" in table.output

    bad = tmp_path / "bad.txt"
    bad.write_text("0.1\n0.2\nhigh\n")
    result = invoke("arl", "--detector", "racusum", "--ra", "2", "--risks", str(bad), "--h", "4")
    assert result.exit_code == 2
    assert "bad.txt:3" in result.output.replace("\n", "").replace("│", "").replace(" ", "")


def test_cli_reports_impossible_targets(invoke) -> None:
    result = invoke("threshold", "--detector", "cusum", "--arl0", "0.5")
    assert result.exit_code == 2
    assert "ARL0" in result.output
