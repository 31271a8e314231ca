"""`vigil calibrate`: a detector's threshold for a target in-control ARL, or the exact ARL of a design.

Mounted by ``vigil.cli`` as ``app.add_typer(calibrate_app, name="calibrate")`` (DESIGN.md §Contracts). ``--json``
prints ``{"detector", "h" (or "L" for EWMA), "arl", ...design}``; otherwise a table.
"""

from __future__ import annotations

import csv
import json as jsonlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from monitors import calibrate
from vigil.cli_common import JsonOpt

calibrate_app = typer.Typer(help="Detector thresholds from a target ARL0, and exact ARLs of a design.",
                            no_args_is_help=True)


class DetectorKind(str, Enum):
    cusum = "cusum"
    ewma = "ewma"
    bernoulli = "bernoulli"
    racusum = "racusum"


class Sided(str, Enum):
    one = "one"
    two = "two"


class Limits(str, Enum):
    fixed = "fixed"
    exact = "exact"


DetectorOpt = Annotated[DetectorKind, typer.Option("--detector", help="Which chart.")]
KOpt = Annotated[float, typer.Option("--k", help="cusum: reference value in sd (δ/2 for a design shift δ).")]
SidedOpt = Annotated[Sided, typer.Option("--sided", help="cusum: one-sided (upward) or two-sided.")]
LamOpt = Annotated[float, typer.Option("--lam", help="ewma: smoothing constant λ.")]
LimitsOpt = Annotated[Limits, typer.Option("--limits", help="ewma: asymptotic (fixed) or variance-adjusted limits.")]
P0Opt = Annotated[float | None, typer.Option("--p0", help="bernoulli: in-control event rate.")]
P1Opt = Annotated[float | None, typer.Option("--p1", help="bernoulli: the out-of-control rate to detect.")]
RaOpt = Annotated[float | None, typer.Option("--ra", help="racusum: odds ratio to detect (2: under-prediction).")]
RisksOpt = Annotated[Path | None, typer.Option("--risks", help="racusum: text/CSV file of predicted risks, one per line.")]


@dataclass(frozen=True, slots=True)
class _Design:
    """One detector design: how to solve its threshold and its ARL, and how to describe it."""

    detector: DetectorKind
    threshold_key: str  # "h", or "L" for EWMA
    params: dict[str, object]
    solve: Callable[[float], float]  # arl0 → threshold
    arl: Callable[[float], float]  # threshold → ARL under the chosen true condition


def _design(detector: DetectorKind, k: float, sided: Sided, lam: float, limits: Limits, p0: float | None,
            p1: float | None, ra: float | None, risks: Path | None, shift: float = 0.0, p: float | None = None,
            odds_ratio: float = 1.0) -> _Design:
    if detector is DetectorKind.cusum:
        side = "two" if sided is Sided.two else "upper"
        return _Design(detector, "h", {"k": k, "sided": sided.value, "shift": shift},
                       lambda a: calibrate.cusum_threshold(k, a, side),
                       lambda h: calibrate.cusum_arl(k, h, shift, side))
    if detector is DetectorKind.ewma:
        return _Design(detector, "L", {"lam": lam, "limits": limits.value, "shift": shift},
                       lambda a: calibrate.ewma_threshold(lam, a, limits.value),
                       lambda L: calibrate.ewma_arl(lam, L, shift, limits.value))
    if detector is DetectorKind.bernoulli:
        if p0 is None or p1 is None:
            raise typer.BadParameter("the bernoulli chart needs --p0 (in-control rate) and --p1 (rate to detect)",
                                     param_hint="--p0/--p1")
        return _Design(detector, "h", {"p0": p0, "p1": p1, "p": p0 if p is None else p},
                       lambda a: calibrate.bernoulli_threshold(p0, p1, a),
                       lambda h: calibrate.bernoulli_arl(p0, p1, h, p))
    if ra is None or risks is None:
        raise typer.BadParameter("the racusum chart needs --ra (odds ratio to detect) and --risks FILE",
                                 param_hint="--ra/--risks")
    mix = read_risks(risks)
    return _Design(detector, "h", {"ra": ra, "risks": str(risks), "n_risks": len(mix), "or": odds_ratio},
                   lambda a: calibrate.racusum_threshold(mix, ra, a),
                   lambda h: calibrate.racusum_arl(mix, ra, h, odds_ratio))


def read_risks(path: Path) -> list[float]:
    """Predicted risks from a text/CSV file: the first column of each line; blank lines, ``#`` comments and a
    non-numeric header line are skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read the risk file {path}: {exc.strerror}", param_hint="--risks") from None
    risks: list[float] = []
    for number, row in enumerate(csv.reader(lines), start=1):
        if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
            continue
        try:
            value = float(row[0])
        except ValueError:
            if number == 1:
                continue  # a header
            raise typer.BadParameter(f"{path}:{number}: {row[0]!r} is not a number; put one predicted risk per line",
                                     param_hint="--risks") from None
        if not 0.0 < value < 1.0:
            raise typer.BadParameter(f"{path}:{number}: risk {value} is outside (0, 1)", param_hint="--risks")
        risks.append(value)
    if not risks:
        raise typer.BadParameter(f"{path} holds no predicted risks", param_hint="--risks")
    return risks


def _show(design: _Design, threshold: float, arl: float, as_json: bool, title: str) -> None:
    result = {"detector": design.detector.value, design.threshold_key: threshold, "arl": arl, **design.params}
    if as_json:
        typer.echo(jsonlib.dumps(result))
        return
    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    Console().print(table)


def _run(compute: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    """Turn a calibration error (an impossible design or target) into a usage error that names it."""
    try:
        return compute()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@calibrate_app.command()
def threshold(
    detector: DetectorOpt,
    arl0: Annotated[float, typer.Option("--arl0", help="Target in-control ARL, in events.")],
    k: KOpt = 0.5,
    sided: SidedOpt = Sided.two,
    lam: LamOpt = 0.1,
    limits: LimitsOpt = Limits.fixed,
    p0: P0Opt = None,
    p1: P1Opt = None,
    ra: RaOpt = None,
    risks: RisksOpt = None,
    json: JsonOpt = False,
) -> None:
    """The threshold (h, or L for EWMA) whose exact in-control ARL is ARL0; also prints that ARL."""
    design = _design(detector, k, sided, lam, limits, p0, p1, ra, risks)

    def compute() -> tuple[float, float]:
        h = design.solve(arl0)
        return h, design.arl(h)

    h, arl_value = _run(compute)
    _show(design, h, arl_value, json, f"{detector.value} threshold for ARL0 = {arl0:g}")


@calibrate_app.command()
def arl(
    detector: DetectorOpt,
    h: Annotated[float | None, typer.Option("--h", help="Threshold (cusum, bernoulli, racusum).")] = None,
    L: Annotated[float | None, typer.Option("--L", help="ewma: limit width in sd of the statistic.")] = None,
    shift: Annotated[float, typer.Option("--shift", help="cusum/ewma: true mean shift in sd (0: in control).")] = 0.0,
    k: KOpt = 0.5,
    sided: SidedOpt = Sided.two,
    lam: LamOpt = 0.1,
    limits: LimitsOpt = Limits.fixed,
    p0: P0Opt = None,
    p1: P1Opt = None,
    p: Annotated[float | None, typer.Option("--p", help="bernoulli: true event rate (default p0).")] = None,
    ra: RaOpt = None,
    risks: RisksOpt = None,
    odds_ratio: Annotated[float, typer.Option("--or", help="racusum: true odds ratio (default 1).")] = 1.0,
    json: JsonOpt = False,
) -> None:
    """The exact zero-state ARL of a design under the given true condition."""
    design = _design(detector, k, sided, lam, limits, p0, p1, ra, risks, shift, p, odds_ratio)
    value = L if detector is DetectorKind.ewma else h
    if value is None:
        need = "--L (its limit width in sd); --h is for the CUSUMs" if detector is DetectorKind.ewma else "--h"
        raise typer.BadParameter(f"the {detector.value} chart needs its threshold {need}", param_hint="--h/--L")
    _, arl_value = _run(lambda: (value, design.arl(value)))
    _show(design, value, arl_value, json, f"{detector.value} ARL")
