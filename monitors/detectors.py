"""Sequential change detectors with one tiny interface (river-style): ``update`` per event, ``drift_detected``.

Each detector is a recursion on a few floats, so hundreds of thousands of streams fit in memory and one update is a
handful of float operations (``__slots__``, no numpy). After an alarm the next ``update`` starts a fresh run (as river
does), so ``n`` counts observations since the last reset and ``change_index`` is 1-based within that run.
Thresholds come from ``monitors.calibrate`` (an exact ARL0), never from a guess.

``state()`` is JSON-serialisable and ``from_state`` restores a detector exactly (Python floats round-trip through
JSON), so a stream's detector can be checkpointed in the store with its source offsets.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Protocol, Self, runtime_checkable


@runtime_checkable
class Detector(Protocol):
    name: str
    threshold: float
    statistic: float  # current chart statistic (max of both sides for two-sided charts)
    n: int  # observations since the last reset
    drift_detected: bool  # set by the last update()
    change_index: int | None  # 1-based index (in n) of the estimated change point at the last alarm

    def update(self, x: float) -> bool: ...

    def reset(self) -> None: ...

    def state(self) -> dict[str, Any]: ...


COUNTERS = ("statistic", "n", "drift_detected", "change_index")
"""The run counters every detector keeps (charts, ``monitors.bocpd.Bocpd``, the river adapters)."""


def saved_state(detector: Any, params: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """The one ``state()`` layout: type, constructor ``params``, the common counters and the detector's ``own``
    run state — JSON-serialisable, restored by ``restored``."""
    return {"type": type(detector).__name__, "params": params,
            "state": {**{f: getattr(detector, f) for f in COUNTERS}, **own}}


def restored(cls: type, d: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A ``cls`` built from a saved state's params with its counters restored, and the saved run state (for the
    detector's own fields). Refuses a state saved by another detector type."""
    if d.get("type") != cls.__name__:
        raise ValueError(f"state is for a {d.get('type')!r} detector, not {cls.__name__}; "
                         "use monitors.detectors.detector_from_state to restore any detector")
    detector = cls(**d["params"])
    state = d["state"]
    for f in COUNTERS:
        setattr(detector, f, state[f])
    return detector, state


class _Chart:
    """What every chart shares: counters, reset, and (de)serialisation of its parameters and run state."""

    __slots__ = ("threshold", "statistic", "n", "drift_detected", "change_index")
    name: ClassVar[str]
    _params: ClassVar[tuple[str, ...]]  # constructor arguments (attribute names), saved in state()["params"]
    _fields: ClassVar[tuple[str, ...]]  # run state beyond the common counters, saved in state()["state"]

    def reset(self) -> None:
        self.statistic = 0.0
        self.n = 0
        self.drift_detected = False
        self.change_index = None
        self._restart()

    def _restart(self) -> None:
        """Reset the chart's own run state; every chart defines it."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return saved_state(self, {p: getattr(self, p) for p in self._params},
                           {f: getattr(self, f) for f in self._fields})

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Self:
        detector, state = restored(cls, d)
        for f in cls._fields:
            setattr(detector, f, state[f])
        return detector

    def __repr__(self) -> str:
        params = ", ".join(f"{p}={getattr(self, p)!r}" for p in self._params)
        return f"{type(self).__name__}({params}; n={self.n}, statistic={self.statistic:.4g})"


class TabularCusum(_Chart):
    """Tabular CUSUM (Page 1954, *Biometrika* 41:100) on standardised observations (mean 0, sd 1 in control).

    S⁺ = max(0, S⁺ + x − k), S⁻ = max(0, S⁻ − x − k); alarm when a watched side exceeds h. k = δ/2 is optimal for a
    shift of δ sd. ``head_start`` starts both sides at that value (fast initial response, Lucas & Crosier 1982).
    The change point is the observation after the alarming side last stood at zero; ``direction`` is +1 or −1.

    >>> cusum = TabularCusum(k=0.5, h=4.0)
    >>> [cusum.update(x) for x in [0.1, -0.3, 0.2, 1.6, 1.9, 1.4, 2.0]]
    [False, False, False, False, False, False, True]
    >>> cusum.change_index, cusum.direction, round(cusum.statistic, 2)
    (4, 1, 4.9)
    """

    __slots__ = ("k", "sided", "head_start", "upper", "lower", "direction", "_up_zero", "_low_zero",
                 "_watch_up", "_watch_low")
    name = "cusum"
    _params = ("k", "h", "sided", "head_start")
    _fields = ("upper", "lower", "direction", "_up_zero", "_low_zero")

    def __init__(self, k: float, h: float, sided: str = "two", head_start: float = 0.0) -> None:
        if sided not in ("two", "upper", "lower"):
            raise ValueError(f"sided must be 'two', 'upper' or 'lower', got {sided!r}")
        if k < 0 or h <= 0 or not 0 <= head_start < h:
            raise ValueError(f"TabularCusum needs k ≥ 0, h > 0 and 0 ≤ head_start < h; got k={k}, h={h}, "
                             f"head_start={head_start}")
        self.k, self.threshold, self.sided, self.head_start = float(k), float(h), sided, float(head_start)
        self._watch_up, self._watch_low = sided != "lower", sided != "upper"
        self.reset()

    @property
    def h(self) -> float:
        return self.threshold

    def _restart(self) -> None:
        self.upper = self.head_start if self._watch_up else 0.0
        self.lower = self.head_start if self._watch_low else 0.0
        self.statistic = self.head_start
        self.direction = 0
        self._up_zero = self._low_zero = 0

    def update(self, x: float) -> bool:
        if self.drift_detected:
            self.reset()
        n = self.n = self.n + 1
        up = low = 0.0
        if self._watch_up:
            up = self.upper + x - self.k
            if up <= 0.0:
                up = 0.0
                self._up_zero = n
        if self._watch_low:
            low = self.lower - x - self.k
            if low <= 0.0:
                low = 0.0
                self._low_zero = n
        self.upper, self.lower = up, low
        stat = self.statistic = up if up >= low else low
        if stat > self.threshold:
            self.drift_detected = True
            self.direction = 1 if up >= low else -1
            self.change_index = (self._up_zero if up >= low else self._low_zero) + 1
            return True
        return False


class Ewma(_Chart):
    """Two-sided EWMA chart (Roberts 1959, *Technometrics* 1:239) on standardised observations.

    Z = (1−λ)Z + λx from Z₀ = 0; the statistic is |Z| in units of its sd — sqrt(λ/(2−λ)) for ``limits="fixed"``,
    times sqrt(1 − (1−λ)^{2t}) for ``"exact"`` (variance-adjusted) — and the chart alarms when it exceeds L.
    The change point is where Z last crossed the centre line (the first observation of its current sign).

    >>> ewma = Ewma(lam=0.2, L=2.962)
    >>> [ewma.update(x) for x in [0.3, -0.4, 1.5, 1.8, 2.2, 1.9]]
    [False, False, False, False, False, True]
    >>> ewma.change_index, ewma.direction, round(ewma.statistic, 2)
    (3, 1, 3.31)
    """

    __slots__ = ("lam", "limits", "z", "direction", "_decay", "_run_start", "_sigma", "_decay_step")
    name = "ewma"
    _params = ("lam", "L", "limits")
    _fields = ("z", "direction", "_decay", "_run_start")

    def __init__(self, lam: float, L: float, limits: str = "fixed") -> None:
        if not 0.0 < lam <= 1.0 or L <= 0:
            raise ValueError(f"Ewma needs 0 < lam ≤ 1 and L > 0, got lam={lam}, L={L}")
        if limits not in ("fixed", "exact"):
            raise ValueError(f"limits must be 'fixed' or 'exact', got {limits!r}")
        self.lam, self.threshold, self.limits = float(lam), float(L), limits
        self._sigma = math.sqrt(lam / (2.0 - lam))
        self._decay_step = (1.0 - lam) ** 2
        self.reset()

    @property
    def L(self) -> float:
        return self.threshold

    def _restart(self) -> None:
        self.z = 0.0
        self.direction = 0
        self._decay = 1.0  # (1−λ)^{2t}
        self._run_start = 1

    def update(self, x: float) -> bool:
        if self.drift_detected:
            self.reset()
        n = self.n = self.n + 1
        previous = self.z
        z = self.z = previous + self.lam * (x - previous)
        if z * previous <= 0.0:
            self._run_start = n
        if self.limits == "exact":
            self._decay *= self._decay_step
            stat = abs(z) / (self._sigma * math.sqrt(1.0 - self._decay))
        else:
            stat = abs(z) / self._sigma
        self.statistic = stat
        if stat > self.threshold:
            self.drift_detected = True
            self.direction = 1 if z > 0.0 else -1
            self.change_index = self._run_start
            return True
        return False


class _UpperCusum(_Chart):
    """One-sided CUSUM on log-likelihood-ratio weights: S = max(0, S + w), alarm S > h."""

    __slots__ = ("_zero",)
    _fields = ("_zero",)

    def _restart(self) -> None:
        self._zero = 0

    def _step(self, w: float) -> bool:
        if self.drift_detected:
            self.reset()
        n = self.n = self.n + 1
        s = self.statistic + w
        if s <= 0.0:
            s = 0.0
            self._zero = n
        self.statistic = s
        if s > self.threshold:
            self.drift_detected = True
            self.change_index = self._zero + 1
            return True
        return False

    @property
    def h(self) -> float:
        return self.threshold


class BernoulliCusum(_UpperCusum):
    """Bernoulli CUSUM (Reynolds & Stoumbos 1999, *J. Quality Technology* 31:87) for an increase of an event rate.

    Each 0/1 outcome adds its log-likelihood ratio of p1 against p0: ln(p1/p0) for 1, ln((1−p1)/(1−p0)) for 0.
    h is in the same (natural log) units; ``monitors.calibrate.bernoulli_threshold`` gives it for a target ARL0.

    >>> chart = BernoulliCusum(p0=0.05, p1=0.10, h=2.0)
    >>> alarms = [chart.update(y) for y in [0] * 30 + [1, 0, 1, 1]]
    >>> alarms[-1], chart.n, chart.change_index, round(chart.statistic, 2)
    (True, 34, 31, 2.03)
    """

    __slots__ = ("p0", "p1", "_w1", "_w0")
    name = "bernoulli"
    _params = ("p0", "p1", "h")

    def __init__(self, p0: float, p1: float, h: float) -> None:
        if not 0.0 < p0 < p1 < 1.0 or h <= 0:
            raise ValueError(f"BernoulliCusum detects an increase: need 0 < p0 < p1 < 1 and h > 0, got p0={p0}, "
                             f"p1={p1}, h={h} (to watch a decrease, feed 1 − y with the complementary rates)")
        self.p0, self.p1, self.threshold = float(p0), float(p1), float(h)
        self._w1 = math.log(p1 / p0)
        self._w0 = math.log((1.0 - p1) / (1.0 - p0))
        self.reset()

    def update(self, x: float) -> bool:
        if x == 1:
            return self._step(self._w1)
        if x == 0:
            return self._step(self._w0)
        raise ValueError(f"BernoulliCusum takes 0/1 outcomes, got {x!r}")

    def update_event(self, event: bool) -> bool:
        """``update`` for an outcome already known to be 0/1 (``event`` = y == 1): the hot path of
        ``monitors.streams``, which checks y once per observation and feeds it to many streams."""
        return self._step(self._w1 if event else self._w0)


class RiskAdjustedCusum(_UpperCusum):
    """Risk-adjusted CUSUM (Steiner, Cook, Farewell & Treasure 2000, *Biostatistics* 1:441) on a risk model.

    Two-argument update: ``update(y, p)`` with the outcome y ∈ {0, 1} and the model's predicted risk p of that case.
    The weight tests odds ratio R_A against R_0 (default 1): W = y·ln(R_A/R_0) − ln[(1+(R_A−1)p)/(1+(R_0−1)p)].
    R_A > 1 signals under-prediction (more events than predicted), R_A < 1 over-prediction.

    >>> chart = RiskAdjustedCusum(ra=2.0, h=1.0)
    >>> round(chart.weight(1, 0.0246), 2), round(chart.weight(0, 0.0246), 3)
    (0.67, -0.024)
    >>> [chart.update(y, p) for y, p in [(0, 0.1), (1, 0.1), (1, 0.2), (0, 0.1)]]
    [False, False, True, False]
    >>> chart.n, chart.change_index
    (1, None)
    """

    __slots__ = ("ra", "r0", "_log_or", "_ra1", "_r01")
    name = "racusum"
    _params = ("ra", "h", "r0")

    def __init__(self, ra: float, h: float, r0: float = 1.0) -> None:
        if ra <= 0 or r0 <= 0 or ra == r0 or h <= 0:
            raise ValueError(f"RiskAdjustedCusum needs odds ratios ra ≠ r0, both > 0, and h > 0; got ra={ra}, "
                             f"r0={r0}, h={h}")
        self.ra, self.r0, self.threshold = float(ra), float(r0), float(h)
        self._log_or = math.log(ra / r0)
        self._ra1, self._r01 = ra - 1.0, r0 - 1.0
        self.reset()

    def weight(self, y: float, p: float) -> float:
        """The log-likelihood-ratio weight of outcome y at predicted risk p."""
        if not 0.0 < p < 1.0:
            raise ValueError(f"predicted risk must lie in (0, 1), got {p!r}")
        w = -math.log((1.0 + self._ra1 * p) / (1.0 + self._r01 * p))
        if y == 1:
            return w + self._log_or
        if y == 0:
            return w
        raise ValueError(f"RiskAdjustedCusum takes 0/1 outcomes, got {y!r}")

    def update(self, x: float, p: float) -> bool:  # type: ignore[override]
        return self._step(self.weight(x, p))


_KINDS: dict[str, type[_Chart]] = {c.__name__: c for c in (TabularCusum, Ewma, BernoulliCusum, RiskAdjustedCusum)}


def detector_from_state(d: dict[str, Any]) -> Detector:
    """Restore any detector from its ``state()`` (the charts here and ``monitors.bocpd.Bocpd``; river adapters are
    restored by their own ``from_state``, since their state holds a pickle)."""
    if d.get("type") == "Bocpd":
        from monitors.bocpd import Bocpd  # imported here: bocpd needs numpy, the charts do not

        return Bocpd.from_state(d)
    try:
        kind = _KINDS[d["type"]]
    except KeyError:
        raise ValueError(f"unknown detector type {d.get('type')!r} in saved state; known: {sorted(_KINDS) + ['Bocpd']}"
                         ) from None
    return kind.from_state(d)
