"""river's drift detectors behind vigil's detector interface, for comparison benchmarks and unlabeled-score streams.

river (Montiel et al. 2021, *JMLR* 22(110):1–8), version 0.26.1: ``det.update(x)`` returns None and sets
``det.drift_detected``; a detector restarts by itself on the update after a detection, as vigil's do. These adapters
add what vigil's interface promises — ``update(x) -> bool``, ``n`` since the last reset, ``statistic``, ``threshold``,
``change_index``, ``reset()`` and ``state()`` — without changing river's algorithms.

Their thresholds are *not* calibrated to an in-control ARL (river's defaults fire at rates that depend on the data's
scale and prevalence; reference/peers.md §4.2). ``bench/detection_delay.py`` calibrates them by simulation, the only
route since they have no exact run-length theory. ``state()`` carries the river object pickled (river has no other
persistence format); restore it only from vigil's own store, never from outside input.
"""

from __future__ import annotations

import base64
import math
import pickle
from typing import Any, ClassVar

from river import drift

from monitors.detectors import restored, saved_state


class RiverDetector:
    """Common adapter: counts, restart semantics and (de)serialisation around one river drift detector."""

    name: ClassVar[str]
    threshold_param: ClassVar[str]  # the river parameter reported as ``threshold``
    _river_class: ClassVar[type]

    def __init__(self, **params: Any) -> None:
        try:
            self._river = self._river_class(**params)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{type(self).__name__}: river.drift.{self._river_class.__name__} rejected {params}: "
                             f"{err}") from None
        self.params = dict(params)
        self.threshold = float(getattr(self._river, self.threshold_param))
        self.reset()

    def reset(self) -> None:
        self._river = self._river.clone()  # river's clone: same parameters, fresh state
        self.n = 0
        self.statistic = 0.0
        self.drift_detected = False
        self.change_index: int | None = None

    def update(self, x: float) -> bool:
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"{self.name}: observations must be finite numbers, got {x!r}")
        if self.drift_detected:  # river restarts inside its next update; mirror it in the counters
            self.n = 0
            self.change_index = None
        self.n += 1
        self._river.update(x)
        self.drift_detected = bool(self._river.drift_detected)
        self.statistic = self._statistic()
        if self.drift_detected:
            self.change_index = self._change_index()
        return self.drift_detected

    def _statistic(self) -> float:
        raise NotImplementedError

    def _change_index(self) -> int | None:
        return None  # river's detector gives no change-time estimate

    def state(self) -> dict[str, Any]:
        return saved_state(self, self.params,
                           {"river_pickle": base64.b64encode(pickle.dumps(self._river)).decode("ascii")})

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> RiverDetector:
        detector, s = restored(cls, d)
        detector._river = pickle.loads(base64.b64decode(s["river_pickle"]))  # noqa: S301 — vigil's own state only
        return detector

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params}; n={self.n}, statistic={self.statistic:.4g})"


class RiverAdwin(RiverDetector):
    """ADWIN, adaptive windowing (Bifet & Gavaldà 2007, *SIAM SDM*, doi:10.1137/1.9781611972771.42).

    Keeps a window whose two sub-windows are tested for equal means with confidence ``delta`` every ``clock``
    updates, dropping the old part when they differ. ``threshold`` is delta (smaller = fewer alarms),
    ``statistic`` the current window's mean, and after a drift ``change_index`` is the first observation of the
    window ADWIN kept (its change-time estimate).
    """

    name = "adwin"
    threshold_param = "delta"
    _river_class = drift.ADWIN

    def _statistic(self) -> float:
        return float(self._river.estimation)

    def _change_index(self) -> int | None:
        return max(1, self.n - int(self._river.width) + 1)


class RiverPageHinkley(RiverDetector):
    """Page–Hinkley test (Page 1954; Hinkley 1971, *Biometrika* 58:509) as river implements it: cumulative deviations
    from the running mean, minus a tolerance ``delta``, with forgetting factor ``alpha``; alarm when the distance from
    the running extreme exceeds ``threshold`` (in the data's raw units, not sd units). ``statistic`` is that
    distance (the larger of the two sides for ``mode="both"``), read from river's running sums.
    """

    name = "page_hinkley"
    threshold_param = "threshold"
    _river_class = drift.PageHinkley

    def _statistic(self) -> float:
        r = self._river
        up = r._sum_increase - r._min_increase if math.isfinite(r._min_increase) else 0.0
        down = r._max_decrease - r._sum_decrease if r._max_decrease >= 0 else 0.0
        mode = r.mode
        return float(max(up if mode != "down" else 0.0, down if mode != "up" else 0.0, 0.0))


class RiverKswin(RiverDetector):
    """KSWIN, Kolmogorov–Smirnov windowing (Raab, Heusinger & Schleif 2020, *Neurocomputing* 416:340): a two-sample
    KS test between the last ``stat_size`` observations and a random sample of the older part of a window of
    ``window_size``, alarm when p < ``alpha``. ``threshold`` is alpha and ``statistic`` the last p-value (1 before
    the window fills). The seed defaults to 0 so that replays are deterministic.
    """

    name = "kswin"
    threshold_param = "alpha"
    _river_class = drift.KSWIN

    def __init__(self, **params: Any) -> None:
        params.setdefault("seed", 0)
        super().__init__(**params)

    def _statistic(self) -> float:
        return float(getattr(self._river, "p_value", 1.0))


ADAPTERS: dict[str, type[RiverDetector]] = {c.__name__: c for c in (RiverAdwin, RiverPageHinkley, RiverKswin)}
