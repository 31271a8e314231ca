"""Stage 2 of the flow: observations in canonical order → streams, detectors, alerts and tickets of each model.

Keyed by model (DESIGN.md §The flow: stage 2 is keyed by stream). A device's streams are one unit: its false-alarm
budget is split over all of them when their baselines complete (``monitors.streams``), its alerts are grouped under
their parent streams, and its tickets triage all its alerts together — so all streams of one model live in one
partition, and a model's results never depend on which process holds which of its streams.

Besides observations, stage 2 runs two kinds of timers at exact feed times, in order with the observations:
a metric's baseline completes at its ``complete_at`` (so its alerts' detection times do not depend on when a batch
happened to arrive), and at every midnight alerts back in control are resolved and the day's alerts are triaged into
tickets (``retrain_trigger``).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from monitors.streams import StreamMonitor
from retrain_trigger import AcquisitionChange, TriageContext, plan_tickets
from vigil.domain import ALL
from vigil.observations import INFINITY, Observation, Sequencer, feed_time

_DAY = timedelta(days=1)


class StreamStage:
    """The streams of every model of a ``RunResult`` (``ModelRun.monitors``), fed through a ``Sequencer``.

    >>> # vigil.pipeline.Pipeline drives one in-process (the embedded default); vigil.stages runs it per partition
    """

    def __init__(self, settings, result):
        self.settings = settings
        self.result = result
        self.sequencer = Sequencer()
        self.clock: datetime | None = None  # feed time of the last observation or timer applied
        self.applied = 0
        self._midnight: datetime | None = None  # the next midnight timer
        self._due: datetime | None = None  # the earliest timer (a baseline completion or the midnight)
        self._scanner_models: dict[str, tuple[str, str]] = {}  # acquisition device id → (manufacturer, model)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["settings"]  # bound again on restore (Pipeline.bind)
        return state

    # --- input -------------------------------------------------------------------------------------------------

    def receive(self, source: str, numbered: list[tuple[int, Observation]], watermark: int | None,
                upstream: list[str], end: bool = False) -> None:
        """Take a batch from one upstream partition (observations with their sequence numbers) and its progress,
        then apply what became ready."""
        if numbered:
            self.sequencer.push(source, numbered)
        self.sequencer.progress(source, watermark, upstream, end)
        self.apply_ready(flush=self.sequencer.finished)

    def apply_ready(self, flush: bool = False) -> int:
        """Apply every observation the sequencer releases, and the timers due by the low watermark."""
        ready = self.sequencer.ready(flush)
        at, when = None, None
        for obs in ready:
            if obs.at != at:
                at, when = obs.at, feed_time(obs.at)
                if self._due is not None and when >= self._due:
                    self._tick(when)
                self.clock = when
            self._apply(obs, when)
        self.applied += len(ready)
        low = self.sequencer.low_watermark()
        if flush:
            self.finish()
        elif low is not None and low < INFINITY and self.clock is not None:
            low_time = feed_time(low)
            if self._due is not None and low_time >= self._due:
                self._tick(low_time)
        return len(ready)

    def finish(self) -> None:
        """The input ended: triage what alerted since the last midnight."""
        self.plan_tickets()

    # --- observations --------------------------------------------------------------------------------------------

    def _apply(self, o: Observation, when: datetime) -> None:
        run = self.result.models[o.model]
        kind = o.kind
        if kind == "prediction":
            monitor = self._monitor(run, o.version, o.time)
            if o.scanner is not None:
                device, manufacturer, model = o.scanner
                key = (o.site, device)
                run.scanners[key] = min(run.scanners.get(key, o.time), o.time)
                self._scanner_models[device] = (manufacturer, model)
            if not o.amended:  # the score of a prediction counts once, whatever its versions
                self._signals(monitor.observe("score_mean", o.site, o.cells, o.score, o.time, when))
        elif kind == "positive":
            self._signals(run.monitors[o.version].observe("fnr", o.site, o.cells, float(not o.decision), o.time,
                                                          when))
        elif kind == "release":
            observe = run.monitors[o.version].observe
            site, cells, time = o.site, o.cells, o.time
            self._signals(observe("error_rate", site, cells, float(o.decision != o.positive), time, when))
            self._signals(observe("outcome_rate", site, cells, float(o.positive), time, when))
            self._signals(observe("calibration_oe", site, cells, float(o.positive), time, when, risk=o.score))
            self._signals(observe("no_followup_rate", site, cells, float(not o.followed_up), time, when))
            if not o.positive:
                self._signals(observe("fpr", site, cells, float(o.decision), time, when))
        elif kind == "fact":
            for _, monitor in sorted(run.monitors.items()):
                self._signals(monitor.observe("unmapped_rate", o.site, o.cells, float(o.unmapped), o.time, when))
        else:  # correct: a positive's label was withdrawn
            run.monitors[o.version].correct("fnr", o.site, o.cells, float(not o.decision), None, o.time)

    def _monitor(self, run, version: str, time: datetime) -> StreamMonitor:
        """The streams of this model version: a new version is monitored against its own baseline."""
        monitor = run.monitors.get(version)
        if monitor is None:
            start = time.replace(hour=0, minute=0, second=0, microsecond=0)
            monitor = run.monitors[version] = StreamMonitor(
                run.config, version, self.settings.monitors, self.settings.subgroups, start, opened=self.clock)
            self._schedule()
        return monitor

    def _signals(self, signals) -> None:
        for signal in signals:
            self.result.alerts.fire(signal)

    # --- timers --------------------------------------------------------------------------------------------------

    def _tick(self, until: datetime) -> None:
        """Run every timer due at or before ``until``, in time order: baseline completions and midnights."""
        while self._due is not None and self._due <= until:
            due = self._due
            for _, run in sorted(self.result.models.items()):
                for _, monitor in sorted(run.monitors.items()):
                    nxt = monitor.next_completion
                    if nxt is not None and nxt <= due:
                        self._signals(monitor.advance(nxt))
            if self._midnight is not None and self._midnight <= due:
                self._at_midnight(self._midnight)
                self._midnight += _DAY
            self.clock = max(self.clock or due, due)
            self._schedule()

    def _schedule(self) -> None:
        if self._midnight is None and self.clock is not None:
            self._midnight = self.clock.replace(hour=0, minute=0, second=0, microsecond=0) + _DAY
        times = [m.next_completion for run in self.result.models.values() for m in run.monitors.values()
                 if m.next_completion is not None]
        if self._midnight is not None:
            times.append(self._midnight)
        self._due = min(times) if times else None

    def _at_midnight(self, midnight: datetime) -> None:
        after = self.settings.monitors.auto_resolve_after
        if after is not None:
            self.result.alerts.auto_resolve(midnight, after, self._in_control)
        self.plan_tickets()

    def _in_control(self, alert) -> bool:
        key = alert.signal.stream
        monitor = self.result.models[key.model].monitors.get(key.version)
        return monitor is not None and monitor.back_in_control(key)

    # --- tickets -------------------------------------------------------------------------------------------------

    def plan_tickets(self) -> None:
        """Group each model version's alerts into root causes and classify them against the device's PCCP.

        Planned afresh from all alerts (also those since resolved: each needs its root cause on a ticket) at every
        midnight of feed time and when the input ends; a stored ticket is matched to its alerts when persisted."""
        tickets = []
        for model_id, run in sorted(self.result.models.items()):
            if run.pccp is None:
                continue
            for version, monitor in sorted(run.monitors.items()):
                alerts = [a for a in self.result.alerts.of(model_id) if a.signal.stream.version == version]
                if not alerts:
                    continue
                ctx = TriageContext(sites=sorted({k.site for k in monitor.streams if k.site != ALL}),
                                    acquisition_changes=self._acquisition_changes(run, monitor),
                                    indications_min_age=run.pccp.indications_for_use.population.min_age)
                tickets.extend(plan_tickets(alerts, ctx, run.pccp, version))
        self.result.tickets = tickets

    def _acquisition_changes(self, run, monitor: StreamMonitor) -> list[AcquisitionChange]:
        """This model's scanners first used after its baseline period: candidate acquisition-device causes."""
        changes = []
        for (site, device_id), first in sorted(run.scanners.items()):
            if first >= monitor.baseline_end:
                manufacturer, model = self._scanner_models.get(device_id, ("", ""))
                changes.append(AcquisitionChange(site, first, manufacturer or "unknown", model or "unknown"))
        return changes

