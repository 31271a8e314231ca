"""vigil: monitors step — calibrated sequential detectors and the exact run lengths behind their thresholds."""

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
from monitors.detectors import (
    BernoulliCusum,
    Detector,
    Ewma,
    RiskAdjustedCusum,
    TabularCusum,
    detector_from_state,
)

__all__ = [
    "BernoulliCusum",
    "Detector",
    "Ewma",
    "RiskAdjustedCusum",
    "TabularCusum",
    "bernoulli_arl",
    "bernoulli_threshold",
    "cusum_arl",
    "cusum_threshold",
    "detector_from_state",
    "ewma_arl",
    "ewma_threshold",
    "monte_carlo_arl",
    "racusum_arl",
    "racusum_threshold",
    "stream_arl0",
]
