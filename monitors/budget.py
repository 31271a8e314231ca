"""Family false-alarm budget: one device-wide promise ("at most B false alarms per D days") → each stream's ARL0.

With S streams each at ARL0 = A the family raises false alarms S times as often as one stream
(reference/statistics.md §Many streams), so A must come from the budget and the streams' event rates, not be fixed.
"""

from __future__ import annotations

import math


def stream_arl0(budget_false_alarms: float, budget_days: float, n_streams: int, events_per_day: float,
                cap: float = 1e7) -> float:
    """In-control ARL (in events) for one stream so that the family of ``n_streams`` keeps the budget.

    Bonferroni-style split: a detector that restarts after each alarm raises in-control alarms at 1/ARL0 per event,
    so a stream with r events per day expects r·D/ARL0 false alarms in D days. Giving every stream an equal share
    B/S of the family's B alarms and solving gives ARL0 = r·D·S/B; by linearity of expectation the family then
    expects at most B false alarms in D days, whatever the dependence between streams (the union-bound argument
    behind Bonferroni). The cap keeps thresholds finite for high-volume streams; a capped stream spends less than
    its share, so the budget still holds.

    >>> stream_arl0(1, 365, 200, 40)          # one false alarm a year across 200 streams of 40 events a day
    2920000.0
    >>> stream_arl0(1, 365, 2000, 40)         # ten times the streams: the cap binds
    10000000.0
    """
    for name, value in (("budget_false_alarms", budget_false_alarms), ("budget_days", budget_days),
                        ("events_per_day", events_per_day), ("cap", cap)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}"
                             + (" (gate streams without events as insufficient data)" if name == "events_per_day"
                                else ""))
    if n_streams < 1:
        raise ValueError(f"n_streams must be ≥ 1, got {n_streams}")
    return min(cap, events_per_day * budget_days * n_streams / budget_false_alarms)
