"""Control charts as inline SVG, drawn with matplotlib's SVG backend (no display, no pyplot global state).

A Shewhart-style reading of each stream (Montgomery, *Introduction to Statistical Quality Control*, 8th ed., ch. 9):
the daily metric value with its 95 % confidence band, the labeled-claim line, and underneath the detector statistic
against its decision threshold, with the alert's estimated change time and detection time marked.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from datetime import datetime, timedelta

import matplotlib
from matplotlib.axes import Axes
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vigil.report.data import Series

_RC = {
    "svg.fonttype": "none",  # text stays text: smaller files, selectable, uses the page's font (nothing fetched)
    "svg.hashsalt": "vigil-report",  # stable element ids, so the same data gives the same SVG
    "font.size": 8,
    "axes.titlesize": 9,
}
_PROLOGUE = re.compile(r"^.*?(?=<svg)", re.S)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)
_NAMESPACES = re.compile(r'\s+xmlns(:\w+)?="[^"]*"')

VALUE = "#1f5fa8"
BAND = "#9cc3ea"
CLAIM = "#2e8b57"
ALARM = "#c0392b"
CHANGE = "#e67e22"


def to_svg(fig: Figure, tight: bool = True) -> str:
    """The figure as an ``<svg>`` element for inlining in HTML: no XML prologue, DOCTYPE, RDF metadata or namespace
    declarations (the HTML parser supplies the SVG namespace), so the page references no external URL."""
    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None},
                    bbox_inches="tight" if tight else None)
    svg = _PROLOGUE.sub("", buf.getvalue(), count=1)
    svg = _METADATA.sub("", svg)
    return _NAMESPACES.sub("", svg)


def _dates(ax: Axes) -> None:
    locator = AutoDateLocator(minticks=3, maxticks=7)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))


def _value_panel(ax: Axes, s: Series, claim: float | None) -> None:
    lo = [v if v is not None else float("nan") for v in s.ci_low]
    hi = [v if v is not None else float("nan") for v in s.ci_high]
    val = [v if v is not None else float("nan") for v in s.value]
    ax.fill_between(s.days, lo, hi, color=BAND, alpha=0.6, linewidth=0, label="95% CI", step="mid")
    ax.plot(s.days, val, color=VALUE, linewidth=0.9, label="daily value")
    if claim is not None:
        ax.axhline(claim, color=CLAIM, linestyle="--", linewidth=1, label=f"labeled claim {claim:.2f}")
    _dates(ax)


def stream_chart(s: Series, alerts: Sequence[object], claim: float | None, title: str) -> str:
    """Two panels sharing the time axis: the metric with its CI band, and the detector statistic vs threshold."""
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(9.0, 4.2))
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2],
                                   gridspec_kw={"hspace": 0.12, "left": 0.08, "right": 0.99, "top": 0.93,
                                                "bottom": 0.1})
        _value_panel(top, s, claim)
        for a in alerts:
            baseline = getattr(a, "baseline")
            top.axhline(baseline, color="#555555", linewidth=0.8, linestyle=":", label=f"baseline {baseline:.3f}")
        stat = [v if v is not None else float("nan") for v in s.statistic]
        thr = [v if v is not None else float("nan") for v in s.threshold]
        bottom.plot(s.days, stat, color=VALUE, linewidth=0.9, label="detector statistic")
        bottom.plot(s.days, thr, color=ALARM, linewidth=1, linestyle="--", label="threshold h")
        for ax in (top, bottom):
            for i, a in enumerate(alerts):
                change: datetime = getattr(a, "change_estimate")
                detected: datetime = getattr(a, "detected_at")
                ax.axvline(change, color=CHANGE, linewidth=1.2, linestyle="-.",
                           label="estimated change" if i == 0 and ax is top else None)
                ax.axvline(detected, color=ALARM, linewidth=1.2,
                           label="alert raised" if i == 0 and ax is top else None)
        top.set_title(title, loc="left")
        top.set_ylabel(s.key[2])
        bottom.set_ylabel("statistic")
        top.legend(loc="upper left", fontsize=7, ncols=3, frameon=False)
        bottom.legend(loc="upper left", fontsize=7, ncols=2, frameon=False)
        _dates(bottom)
        return to_svg(fig, tight=False)


def weekly(s: Series) -> tuple[list[datetime], list[float]]:
    """n-weighted weekly means (ISO weeks, plotted at the week's Monday) of a stream's daily values."""
    sums: dict[datetime, list[float]] = {}
    for day, n, v in zip(s.days, s.n, s.value, strict=True):
        if v is None or not n:
            continue
        monday = (day - timedelta(days=day.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
        acc = sums.setdefault(monday, [0.0, 0.0])
        acc[0] += n * v
        acc[1] += n
    weeks = sorted(sums)
    return weeks, [sums[w][0] / sums[w][1] for w in weeks]


SITE_COLORS = ("#1b1b1b", "#1f5fa8", "#e67e22", "#2e8b57", "#8e44ad", "#c0392b", "#7f8c8d", "#b7950b")


def grid_chart(cells: dict[tuple[str, str], Series], metrics: Sequence[str], sites: Sequence[str],
               claims: dict[str, float], alarmed: set[tuple[str, str]]) -> str:
    """One small panel per metric, every site overlaid (weekly n-weighted means; "all" in black), so a site that
    departs from the others stands out; panels of alarmed metrics are titled in red with the alarmed sites named.

    A panel per metric rather than per metric x site: dozens of axes cost seconds each to lay out in matplotlib.
    """
    cols = 2
    rows = max(1, -(-len(metrics) // cols))
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(10.0, 2.0 * rows + 0.5))
        axes = fig.subplots(rows, cols, squeeze=False, sharex=True,
                            gridspec_kw={"hspace": 0.45, "wspace": 0.18, "left": 0.06, "right": 0.99,
                                         "top": 1 - 0.35 / (2.0 * rows + 0.5), "bottom": 0.6 / (2.0 * rows + 0.5)})
        for i, ax in enumerate(ax for row in axes for ax in row):
            if i >= len(metrics):
                ax.set_visible(False)
                continue
            metric = metrics[i]
            for j, site in enumerate(sites):
                s = cells.get((metric, site))
                if s is None or not s.days:
                    continue
                weeks, means = weekly(s)
                ax.plot(weeks, means, color=SITE_COLORS[j % len(SITE_COLORS)], linewidth=1.6 if site == "all" else 1,
                        label=site, marker="o", markersize=2)
            if metric in claims:
                ax.axhline(claims[metric], color=CLAIM, linestyle="--", linewidth=1)
            hot = sorted(site for m, site in alarmed if m == metric)
            ax.set_title(metric + (f" - alert at {', '.join(hot)}" if hot else ""), loc="left",
                         color=ALARM if hot else "black")
            ax.yaxis.set_major_locator(MaxNLocator(4))
            _dates(ax)
        axes[0][0].legend(loc="upper left", fontsize=7, ncols=min(len(sites), 5), frameon=False)
        return to_svg(fig, tight=False)
