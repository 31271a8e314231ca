"""Alert identity, re-fires and severity.

One open alert per identity (model, version, metric, site, subgroup, detector): a detector that alarms again on the
same stream updates the open alert (fire count, latest evidence) instead of opening another, so a safety officer sees
one thing to decide. Severity is ``critical`` when the stream's confidence interval lies wholly beyond the device's
labeled performance claim (reference/pccp.md §8.5 item 2), else ``warning``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from vigil.domain import CLAIM_OF, Alert, AlertState, Signal

OPEN_STATES = (AlertState.FIRING, AlertState.ACKNOWLEDGED)

Identity = tuple[str, str, str, str, str, str]


def identity(signal: Signal) -> Identity:
    k = signal.stream
    return (k.model, k.version, k.metric, k.site, k.subgroup, signal.detector)


def severity(signal: Signal, claims: dict[str, float]) -> str:
    """``critical`` if even the optimistic end of the CI breaches the labeled claim."""
    claim = claims.get(CLAIM_OF.get(signal.stream.metric, ""))
    if claim is not None and signal.current_ci[0] > 1 - claim:
        return "critical"
    return "warning"


@dataclass
class AlertBook:
    """The alerts of one run, in firing order; ``claims`` maps model id → labeled performance claims."""

    claims: dict[str, dict[str, float]] = field(default_factory=dict)
    next_seq: int = 1
    alerts: list[Alert] = field(default_factory=list)
    _open: dict[Identity, Alert] = field(default_factory=dict)
    stored: dict[str, tuple[str, int, bool]] = field(default_factory=dict)  # alert id → (stored id, fires, resolved)

    def fire(self, signal: Signal) -> Alert:
        ident = identity(signal)
        sev = severity(signal, self.claims.get(signal.stream.model, {}))
        alert = self._open.get(ident)
        if alert is not None and alert.state in OPEN_STATES:
            first = alert.signal
            alert.last_fired_at = signal.detected_at
            # keep when it was first detected and when it started; take the newest evidence
            signal.change_estimate = min(first.change_estimate, signal.change_estimate)
            signal.detected_at = first.detected_at
            alert.signal = signal
            alert.fire_count += 1
            if sev == "critical":
                alert.severity = sev
            return alert
        alert = Alert(id=f"A-{self.next_seq:06d}", signal=signal, severity=sev, last_fired_at=signal.detected_at)
        self.next_seq += 1
        self.alerts.append(alert)
        self._open[ident] = alert
        return alert

    def auto_resolve(self, watermark: datetime, after: timedelta,
                     in_control: Callable[[Alert], bool] = lambda alert: True) -> list[Alert]:
        """Resolve every open alert whose stream is back in control: no alarm for ``after`` (feed time), and
        ``in_control(alert)`` (the pipeline asks the stream's chart) holds now.

        Feed time, not wall-clock time, so a replay resolves the same alerts at the same point. A later alarm on the
        stream then opens a new alert (a new incident), not a re-fire of the resolved one.
        """
        resolved = []
        for alert in self._open.values():
            if alert.state in OPEN_STATES and watermark - (alert.last_fired_at or alert.signal.detected_at) >= after \
                    and in_control(alert):
                alert.state, alert.resolved_at = AlertState.RESOLVED, watermark
                resolved.append(alert)
        return resolved

    def of(self, model_id: str) -> list[Alert]:
        return [a for a in self.alerts if a.signal.stream.model == model_id]
