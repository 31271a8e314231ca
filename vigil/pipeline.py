"""The embedded pipeline: ingest → ontology → label join → streams and detectors → alerts → tickets, in one process.

This is the wiring of DESIGN.md §The flow. Reference resources (sites, devices, patients, encounters) are applied
first; events are then processed in arrival order (``meta.lastUpdated``), which is the feed's watermark: labels
close against it, so the same inputs and config always give the same alerts, whatever the order of the input files.

The pipeline is stage 1 (ingest, ontology, label join; keyed by subject): what a stream must count leaves it as an
``Observation`` with a canonical key (``vigil.observations``). In the embedded default (``mode="local"``) they go to
its own stage 2 (``vigil.stream_stage``) in the same process; with ``mode="cases"`` they wait in ``outbox`` for the
stage runner (``vigil.stages``) to publish; with ``mode="monitor"`` the pipeline only runs stage 2 on what it
``receive``s. The embedded default and any split across processes therefore count the same observations in the same
order.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from alerts.lifecycle import AlertBook
from ingest import Decoder, IngestResult, SubjectKeyer, load, reason_category
from ingest.decode import unknown_model
from ingest.load import cyclic_gc_paused
from monitors.join import LabelJoin
from monitors.streams import StreamMonitor
from ontology import ConceptMaps, FactMapper, attributes, cells, definition_for
from ontology.mapper import code_system_cell
from ontology.terminology import ServerFallback, TerminologyClient
from retrain_trigger import Pccp, TicketDraft, load_pccp
from vigil.domain import (
    ALL,
    Case,
    DeadLetter,
    DeviceInfo,
    EncounterInfo,
    Fact,
    FeedClock,
    Label,
    Position,
    Prediction,
    SiteInfo,
    SubjectInfo,
)
from vigil.observations import RANK_CLOSED, RANK_CLOSED_LATE, RANK_EVENT, Observation, micros
from vigil.settings import ModelConfig, Settings
from vigil.stream_stage import StreamStage

REFERENCE_TYPES = (SiteInfo, DeviceInfo, SubjectInfo, EncounterInfo)
ENCOUNTER_RETENTION = timedelta(days=365)  # kept beyond the horizon: stays that long still resolve their site
_CORRECTIONS = ("amended", "corrected", "entered-in-error")  # outcome statuses that may change a decided label


@dataclass
class ModelRun:
    """The per-model state of one run: the join, one set of streams per model version, and what they produced."""

    config: ModelConfig
    join: LabelJoin
    pccp: Pccp | None
    monitors: dict[str, StreamMonitor] = field(default_factory=dict)  # by model version (stage 2)
    cases: dict[str, Case] = field(default_factory=dict)  # by prediction resource id: corrections replace
    closing: list[tuple[datetime, int, Case]] = field(default_factory=list)  # heap by window close
    unreleased: dict[str, set[str]] = field(default_factory=dict)  # subject → labeled cases still before close
    scanners: dict[tuple[str, str], datetime] = field(default_factory=dict)  # (site, device) → first use (stage 2)
    measured: dict[str, datetime] = field(default_factory=dict)  # subject → latest fact its outcome can use

    def followed_up(self, pred: Prediction, any_fact: dict[str, datetime]) -> bool:
        """Whether the feed delivered follow-up for this prediction by the close of its window and grace: a fact dated
        at or after it (inside the window or later) that the outcome definition can use (a lab-rise outcome needs
        measurements) — or, for a code-set outcome, whose negatives rest on the *absence* of a code, any fact about
        the subject at all. A completeness signal for the feed, not part of the label."""
        latest = (self.measured if self.config.outcome.kind == "lab_rise" else any_fact).get(pred.subject)
        return latest is not None and latest >= pred.time


@dataclass
class RunResult:
    accepted: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    ignored: Counter = field(default_factory=Counter)
    duplicates: Counter = field(default_factory=Counter)
    stripped: Counter = field(default_factory=Counter)
    corrections: Counter = field(default_factory=Counter)  # amendments/retractions the join could not yet apply
    late: Counter = field(default_factory=Counter)  # events older than every label horizon on arrival, by type
    unmapped: Counter = field(default_factory=Counter)  # (site, system, code) → count
    terminology_unavailable: Counter = field(default_factory=Counter)  # (site, system) → facts not asked (outage)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    models: dict[str, ModelRun] = field(default_factory=dict)
    unsaved: dict[tuple[str, str], Case] = field(default_factory=dict)  # (model, prediction id) → case, until stored
    alerts: AlertBook = field(default_factory=AlertBook)
    tickets: list[TicketDraft] = field(default_factory=list)
    watermark: datetime | None = None

    forgotten_cases: int = 0  # settled, stored cases dropped from memory (service mode)

    @property
    def cases(self) -> list[Case]:
        """The cases in memory: all of them in a one-shot run; in service mode, those not yet settled and stored."""
        return [c for run in self.models.values() for c in run.cases.values()]

    @property
    def case_count(self) -> int:
        return self.forgotten_cases + sum(len(run.cases) for run in self.models.values())

    def mark_stored(self) -> None:
        """The store now holds every case and dead letter so far (its transaction committed): forget the deltas."""
        self.unsaved.clear()
        self.dead_letters.clear()

    def monitors(self) -> list[StreamMonitor]:
        return [m for run in self.models.values() for _, m in sorted(run.monitors.items())]


MODES = ("local", "cases", "monitor")


class Pipeline:
    def __init__(self, settings: Settings, mode: str = "local"):
        if mode not in MODES:
            raise ValueError(f"pipeline mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.settings = settings
        self.mode = mode
        self.decoder = decoder_for(settings)
        self.mapper = FactMapper(ConceptMaps.load(settings.concept_maps), [m.outcome for m in settings.models],
                                 fallback=_terminology(settings))
        self.result = RunResult(alerts=AlertBook(claims={m.id: dict(m.claims) for m in settings.models}))
        for m in settings.models:  # a broken PCCP file fails here, before any work, naming the file
            pccp = load_pccp(m.pccp) if m.pccp else None
            self.result.models[m.id] = ModelRun(m, LabelJoin(m, definition_for(m.outcome)), pccp)
        self.sites: dict[str, SiteInfo] = {}
        self.devices: dict[str, DeviceInfo] = {}
        self.subjects: dict[str, SubjectInfo] = {}
        self.encounters: dict[str, EncounterInfo] = {}
        self._versions: dict[tuple[str, str], tuple[str, datetime]] = {}  # dedupe: (version, forget after)
        self._version_expiry: list[tuple[datetime, tuple[str, str]]] = []  # heap: when a key may leave _versions
        self._subject_models: dict[str, set[str]] = defaultdict(set)
        self._subject_site: dict[str, str] = {}
        self._followed_up: dict[str, datetime] = {}  # subject → clinical time of the latest fact received
        # the per-subject maps above forget a subject once its latest event is beyond the horizon
        self._subject_active: dict[str, datetime] = {}
        self._subject_expiry: list[tuple[datetime, str]] = []  # heap
        self._seq = 0  # tiebreak in the closing heaps: cases closing at the same instant keep arrival order
        # how far behind the watermark an event may still change a label: the longest window + grace + baseline
        # lookback of any model, plus the day ``prune_facts`` keeps (an older event is ``late``)
        self.horizon = max((_fact_horizon(m) for m in settings.models), default=timedelta(days=1))
        self._encounter_starts: list[tuple[datetime, str]] = []  # heap, to forget old encounters
        self._high_water: datetime | None = None  # the latest arrival so far
        self._next_day: datetime | None = None  # midnight after the watermark: daily housekeeping is due then
        self.streams = StreamStage(settings, self.result)  # stage 2 (modes local and monitor)
        self.outbox: list[Observation] = []  # what stage 1 emitted and nobody took yet
        self.out_seq = 0  # sequence number of the next observation emitted (stage 2 drops replayed ones)
        self._cause: tuple = ()  # canonical key of the event being processed (``vigil.observations``)
        self._sub = 0  # observations emitted for it so far

    # --- entry points ----------------------------------------------------------------------------------

    def run_paths(self, paths: Iterable[Path | str], progress=None) -> RunResult:
        """Read files/directories, decode, and process everything in arrival order (the input ends there)."""
        with cyclic_gc_paused():  # a batch holds no reference cycles: the collector only re-scans a growing heap
            self.ingest(load(list(paths), self.decoder), progress)
            return self.finish()

    def finish(self) -> RunResult:
        """The input ended: stage 2 applies what still waits for a later watermark, and triages."""
        if self.mode == "local":
            self.streams.apply_ready(flush=True)
        return self.result

    def ingest(self, loaded: IngestResult, progress=None) -> RunResult:
        """Process what a decoder produced (from files, or one batch of stream messages), in arrival order."""
        r = self.result
        r.accepted.update(loaded.accepted)
        r.rejected.update(loaded.rejected)
        r.ignored.update(loaded.ignored)
        r.stripped.update(loaded.stripped)
        r.dead_letters.extend(loaded.dead_letters)
        self.process(loaded.records, progress=progress)
        return r

    def process(self, records: list[tuple[Position, object]], progress=None) -> None:
        events = []
        for position, rec in records:
            if isinstance(rec, REFERENCE_TYPES):
                self._apply_reference(rec)
            else:
                events.append((position, rec))
        events.sort(key=_arrival_order)
        for i, (position, event) in enumerate(events):
            watermark = self._advance(event.received or event.time)  # windows closed before it arrived close first
            if isinstance(event, FeedClock) or self._is_duplicate(event) or self._late(event, position):
                continue  # a clock only moves the watermark; a re-delivery is a duplicate, not late
            self._remember_version(event)
            self._cause, self._sub = (micros(self._high_water), RANK_EVENT, *_arrival_key(event)), 0
            if isinstance(event, Prediction):
                self._on_prediction(event, watermark, position)
            else:
                self._on_fact(event, watermark)
            self._release_all(watermark, None)
            if progress is not None and i % 5000 == 0:
                progress(i, len(events))
        if progress is not None:
            progress(len(events), len(events))
        self.result.unmapped = self.mapper.unmapped_codes
        self.result.terminology_unavailable = self.mapper.terminology_unavailable
        if self.mode == "local" and self._high_water is not None:
            self.streams.receive("local", self.take_outbox(), micros(self._high_water), ["local"])

    def receive(self, source: str, numbered: list[tuple[int, Observation]], watermark: int | None,
                upstream: list[str], end: bool = False) -> None:
        """Stage 2 (``mode="monitor"``): a batch of observations from one stage-1 partition and its progress."""
        self.streams.receive(source, numbered, watermark, upstream, end)

    def take_outbox(self) -> list[tuple[int, Observation]]:
        """Stage 1: the observations emitted since the last call, with their sequence numbers."""
        batch, self.outbox = self.outbox, []
        return list(enumerate(batch, start=self.out_seq - len(batch)))

    @property
    def watermark_micros(self) -> int | None:
        """Stage 1's promise to stage 2: no observation it emits from now on has ``at`` below this."""
        return micros(self._high_water) if self._high_water is not None else None

    # --- checkpoints -------------------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        """Everything learned from the feed; not the settings, nor the decoder (it holds the subject-key secret)."""
        state = self.__dict__.copy()
        del state["settings"], state["decoder"]
        return state  # pickle's default restore puts it back in __dict__; ``bind`` adds the rest

    def forget_stored(self) -> int:
        """After a store (service mode), drop what the store holds and no event can change any more, so memory and the
        checkpoint stay bounded by the label horizon: daily points older than each model's label window and grace
        (plus a day), and settled cases whose prediction is beyond the horizon (an event about them is ``late``).
        Returns how many points and cases were dropped."""
        watermark = self._high_water or self.streams.clock  # stage 2 alone knows only its feed clock
        if watermark is None:
            return 0
        dropped = 0
        for run in self.result.models.values():
            horizon = watermark - _prediction_horizon(run.config)
            for monitor in run.monitors.values():
                dropped += monitor.forget_points(horizon)
            settled = [rid for rid, case in run.cases.items() if case.prediction.time < horizon]
            for rid in settled:
                del run.cases[rid]
            self.result.forgotten_cases += len(settled)
            dropped += len(settled)
        return dropped

    def bind(self, settings: Settings) -> Pipeline:
        """Attach the settings (and a decoder built from them) to a pipeline restored from a checkpoint."""
        self.settings = self.streams.settings = settings
        self.decoder = decoder_for(settings)
        self.mapper.fallback = _terminology(settings)
        return self

    # --- reference data ----------------------------------------------------------------------------------

    def _apply_reference(self, rec) -> None:
        if isinstance(rec, SiteInfo):
            self.sites[rec.site] = rec
        elif isinstance(rec, DeviceInfo):
            self.devices[rec.device_id] = rec
        elif isinstance(rec, SubjectInfo):
            self.subjects[rec.subject] = rec
        else:
            self.encounters[rec.encounter] = rec
            if rec.start is not None:
                heapq.heappush(self._encounter_starts, (rec.start, rec.encounter))

    def _late(self, event: Prediction | Fact, position: Position) -> bool:
        """An event older than the horizon on arrival can no longer change any label: every window it could bear on
        closed, and the facts it would need may be gone (``prune_facts``). Counted in ``late``, never joined; a late
        prediction is also dead-lettered (it is lost to monitoring, and an operator should see why)."""
        run = self.result.models.get(event.model_id) if isinstance(event, Prediction) else None
        horizon = _prediction_horizon(run.config) if run is not None else self.horizon
        if event.time >= self._high_water - horizon:
            return False
        self.result.late[_identity(event)[0]] += 1
        if isinstance(event, Prediction):
            days = (self._high_water - event.time) / timedelta(days=1)
            self._reject(DeadLetter(position, f"RiskAssessment/{event.resource_id}: too late to be labeled, not "
                                    f"monitored (arrived {days:.0f} days after its prediction time, when its label "
                                    f"window and grace had closed a day or more before)",
                                    "RiskAssessment", event.resource_id))
            self.result.accepted["RiskAssessment"] -= 1  # decoded, but it does not enter the flow
        return True

    def _is_duplicate(self, event: Prediction | Fact) -> bool:
        """Replays and re-sent versions count once: a version counts only if it is newer than the last one seen.

        Versions are remembered until the event leaves the horizon (then a replay of it is ``late`` anyway), so the
        dedupe state is bounded by the horizon, not by the length of the feed."""
        seen = self._versions.get(_identity(event))
        if seen is not None and _version_order(event.version_id) <= _version_order(seen[0]):
            self.result.duplicates[_identity(event)[0]] += 1
            return True
        return False

    def _remember_version(self, event: Prediction | Fact) -> None:
        key = _identity(event)
        seen = self._versions.get(key)
        expires = event.time + self.horizon
        if seen is None or expires > seen[1]:
            heapq.heappush(self._version_expiry, (expires, key))
        self._versions[key] = (event.version_id, max(expires, seen[1]) if seen else expires)

    def _forget_versions(self, watermark: datetime) -> None:
        """Drop the versions of resources whose every version is now beyond the horizon."""
        while self._version_expiry and self._version_expiry[0][0] < watermark:
            expires, key = heapq.heappop(self._version_expiry)
            seen = self._versions.get(key)
            if seen is not None and seen[1] <= expires:
                del self._versions[key]

    # --- events ----------------------------------------------------------------------------------------

    def _on_prediction(self, pred: Prediction, watermark: datetime, position: Position) -> None:
        run = self.result.models.get(pred.model_id)
        if run is None:
            self._reject(DeadLetter(position, f"RiskAssessment/{pred.resource_id}: {unknown_model(pred.model_id)}",
                                    "RiskAssessment", pred.resource_id))
            self.result.accepted["RiskAssessment"] -= 1  # decoded, but it does not enter the flow
            return
        rid = pred.resource_id
        if pred.status == "entered-in-error":
            if not run.join.retract_prediction(rid) and run.cases.pop(rid, None) is not None:
                self.result.corrections["prediction retracted after its label"] += 1
            return
        if rid in run.cases:  # an amendment of a labeled prediction: relabeling is not built yet
            self.result.corrections["prediction amended after its label"] += 1
            return
        amended = rid in run.join
        device = self.devices.get(pred.model_device or "")
        pred.model_version = (device.version if device and device.version else None) or "unknown"
        encounter = self.encounters.get(pred.encounter or "")
        pred.site = (encounter.site if encounter and encounter.site else None) or "unknown"
        scanner = self.devices.get(pred.scanner_device or "")
        pred.attributes = attributes(self.subjects.get(pred.subject), scanner, pred.time, self.settings.subgroups)
        pred.cells = cells(pred.attributes, self.settings.subgroups)  # once: every metric of it counts in these
        self._touch(pred.subject, pred.time)
        self._subject_models[pred.subject].add(pred.model_id)
        self._subject_site[pred.subject] = pred.site
        self._emit(Observation(
            self._key(None, 0), "prediction", pred.model_id, pred.model_version, pred.site, pred.cells, pred.time,
            score=pred.score, amended=amended,
            scanner=(scanner.device_id, scanner.manufacturer or "", scanner.model or "") if scanner else None))
        case = run.join.add_prediction(pred)
        if case is not None:
            self._on_case(run, case, watermark, None)

    def _on_fact(self, fact: Fact, watermark: datetime) -> None:
        encounter = self.encounters.get(fact.encounter or "")
        fact.site = (encounter.site if encounter else None) or self._subject_site.get(fact.subject) or "unknown"
        of = self.mapper.map(fact)
        self._touch(fact.subject, fact.time)
        if fact.status != "entered-in-error":
            _latest(self._followed_up, fact.subject, fact.time)
        coverage = [ALL, code_system_cell(fact)]  # mapping coverage per site, and per site and code system
        for model_id in sorted(self._subject_models.get(fact.subject, ())):
            self._emit(Observation(self._key(None, 0), "fact", model_id, "", fact.site, coverage, fact.time,
                                   unmapped=not of.mapped))
        correction = fact.status in _CORRECTIONS or fact.version_id not in ("", "1")
        if not of.mapped and not correction:
            return
        # every model whose outcome this fact can bear on keeps it, even before that subject's prediction arrives
        # (a baseline creatinine is drawn before the risk score)
        for model_id, run in sorted(self.result.models.items()):
            relevant = run.join.definition.relevant(of)
            # a correction may make an earlier version stop counting (retracted, or no longer relevant): the join
            # drops it; a fact this outcome never used is no correction of it
            if relevant or (correction and run.join.holds(fact)):
                if relevant and fact.status != "entered-in-error":
                    _latest(run.measured, fact.subject, fact.time)
                for case in run.join.add_fact(of):
                    self._on_case(run, case, watermark, None)
                if correction:
                    self._recheck(run, fact.subject, watermark)  # it may undo labels it decided

    def _recheck(self, run: ModelRun, subject: str, watermark: datetime) -> None:
        """Relabel the subject's labeled cases whose window and grace have not closed, from the facts as they are now.

        A positive whose outcome was retracted (or amended below the threshold) goes back to waiting, or becomes
        negative at its window's close; its ``fnr`` observation is withdrawn from the streams (``correct``) and the
        stored case is updated. Mixed metrics are counted only at close, so they never need correcting.
        """
        if subject not in run.unreleased and not run.join.waiting(subject) \
                and run.config.id in self._subject_models.get(subject, ()):
            # labels freeze when window and grace have closed (the grace is the time allowed for corrections): a
            # later correction is counted for the data-quality record, not applied — a detector cannot be rewound
            self.result.corrections["outcome corrected after its labels froze (not applied)"] += 1
            return
        for rid in sorted(run.unreleased.get(subject, ())):
            case = run.cases[rid]
            changed, new = run.join.recheck(case)
            if not changed:
                continue
            pred = case.prediction
            self.result.corrections["relabeled: outcome amended or retracted"] += 1
            _settled(run, subject, rid)
            if case.label is Label.POSITIVE:
                self._emit(Observation(self._key(None, 0), "correct", pred.model_id, pred.model_version, pred.site,
                                       pred.cells, pred.time, decision=case.decision))
            if new is None:  # waits again; stored as unlabeled until then
                del run.cases[rid]
                self.result.unsaved[(pred.model_id, rid)] = Case(pred, None, case.decision, watermark,
                                                                  case.outcome_definition)
            else:
                self._on_case(run, new, watermark, None)

    def _on_case(self, run: ModelRun, case: Case, watermark: datetime, closing: tuple | None) -> None:
        """Feed a labeled case to the streams of its model version.

        Positives arrive early (when their outcome is reported) and negatives only when the window closes, so a
        metric that mixes both would see a run of positives first and alarm on the order of arrival, not on the
        device. ``fnr`` (positives only) is observed at once; the mixed metrics (error rate, fpr, outcome rate) wait
        until the case's window has closed and are observed in prediction-time order (``_release``).
        ``closing``: the canonical key of a case decided by its window's close (None: by the current event).
        """
        pred = case.prediction
        run.cases[pred.resource_id] = case
        self.result.unsaved[(pred.model_id, pred.resource_id)] = case
        if case.label is Label.CENSORED:
            return
        if case.label is Label.POSITIVE:
            self._emit(Observation(self._key(closing, 0), "positive", pred.model_id, pred.model_version, pred.site,
                                   pred.cells, pred.time, decision=case.decision))
        closes = pred.time + run.config.label_window + run.config.label_grace
        self._seq += 1
        heapq.heappush(run.closing, (closes, self._seq, case))
        if closes > watermark:  # until then a corrected outcome may still relabel it
            run.unreleased.setdefault(pred.subject, set()).add(pred.resource_id)

    def _release_all(self, watermark: datetime, before: datetime | None) -> None:
        for run in self.result.models.values():
            self._release(run, watermark, before)

    def _release(self, run: ModelRun, watermark: datetime, before: datetime | None) -> None:
        """Release the mixed metrics of every case whose label window has closed, oldest prediction first.

        Runs after the join has closed its windows for this event, so a batch of late negatives and the positives of
        the same days are interleaved by prediction time, never positives first. ``before``: the high-water mark
        before the event being advanced to (then each case is released at its close), or None (by the event).
        """
        while run.closing and run.closing[0][0] <= watermark:
            case = heapq.heappop(run.closing)[2]
            pred = case.prediction
            if run.cases.get(pred.resource_id) is not case:  # retracted or relabeled since
                continue
            _settled(run, pred.subject, pred.resource_id)
            closing = None if before is None else _closing_key(run, pred, before)
            self._emit(Observation(self._key(closing, 1), "release", pred.model_id, pred.model_version, pred.site,
                                   pred.cells, pred.time, score=pred.score, decision=case.decision,
                                   positive=case.label is Label.POSITIVE,
                                   followed_up=run.followed_up(pred, self._followed_up)))

    def _advance(self, watermark: datetime) -> datetime:
        """Move the feed's watermark to this event's arrival and close, release and complete what is due by then.

        The high-water mark (the latest arrival ever) only grows: lateness and forgetting are judged against it, so
        a replayed old resource is ``late`` rather than counted again once its version has been forgotten."""
        self.result.watermark = watermark
        before = self._high_water or watermark
        self._high_water = max(watermark, before)
        for run in self.result.models.values():
            for case in run.join.advance(watermark):
                self._on_case(run, case, watermark, _closing_key(run, case.prediction, before))
            self._release(run, watermark, before)  # labels whose window and grace closed before this event are final
        if self._next_day is None or watermark >= self._next_day:  # bounded state, once a day: after the releases,
            # which read what a subject's facts were by then, however long this partition was quiet before
            self._next_day = watermark.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
            self._forget_versions(self._high_water)
            self._forget_encounters(self._high_water)
            self._forget_subjects(self._high_water)
            for run in self.result.models.values():  # facts too old to label anything still to come
                run.join.prune_facts(watermark - _fact_horizon(run.config))
        return watermark

    def _touch(self, subject: str, at: datetime) -> None:
        last = self._subject_active.get(subject)
        if last is None or at > last:
            self._subject_active[subject] = at
            heapq.heappush(self._subject_expiry, (at + self.horizon, subject))

    def _forget_subjects(self, watermark: datetime) -> None:
        """A subject whose latest event is beyond the horizon: any event of theirs still to come is ``late`` or a new
        start (its predictions read follow-up dated after themselves), so their site, models and follow-up times go."""
        while self._subject_expiry and self._subject_expiry[0][0] < watermark:
            expires, subject = heapq.heappop(self._subject_expiry)
            last = self._subject_active.get(subject)
            if last is None or last + self.horizon > expires:
                continue  # active since: a later entry stands for it
            del self._subject_active[subject]
            self._subject_models.pop(subject, None)
            self._subject_site.pop(subject, None)
            self._followed_up.pop(subject, None)
            for run in self.result.models.values():
                run.measured.pop(subject, None)

    def _forget_encounters(self, watermark: datetime) -> None:
        """Encounters that began a year before the horizon: an event inside one of them would be ``late``."""
        cutoff = watermark - self.horizon - ENCOUNTER_RETENTION
        while self._encounter_starts and self._encounter_starts[0][0] < cutoff:
            start, encounter = heapq.heappop(self._encounter_starts)
            info = self.encounters.get(encounter)
            if info is not None and info.start == start:
                del self.encounters[encounter]

    # --- helpers ---------------------------------------------------------------------------------------

    def _key(self, closing: tuple | None, sub: int) -> tuple:
        """The canonical key of the next observation: of a closing case (``sub`` orders its observations), or
        of the current event (numbered in emission order)."""
        if closing is not None:
            return (*closing, sub)
        self._sub += 1
        return (*self._cause, self._sub)

    def _emit(self, observation: Observation) -> None:
        self.outbox.append(observation)
        self.out_seq += 1

    def _reject(self, letter: DeadLetter) -> None:
        self.result.dead_letters.append(letter)
        self.result.rejected[reason_category(letter.reason)] += 1


def _latest(times: dict[str, datetime], subject: str, at: datetime) -> None:
    if at > times.get(subject, at):
        times[subject] = at
    else:
        times.setdefault(subject, at)


def _settled(run: ModelRun, subject: str, rid: str) -> None:
    """The case can no longer be relabeled (its window closed, or it was relabeled): stop tracking it."""
    waiting = run.unreleased.get(subject)
    if waiting is not None:
        waiting.discard(rid)
        if not waiting:
            del run.unreleased[subject]


def decoder_for(settings: Settings, strict: bool = False) -> Decoder:
    """The feed's decoder: the subject key and de-identification policy, and the configured models (a prediction
    for another model is dead-lettered at decode time, with its redacted payload, so it can be replayed later)."""
    return Decoder(SubjectKeyer(settings.subject_key), policy=settings.deid_policy, strict=strict,
                   models=[m.id for m in settings.models])


def _prediction_horizon(model: ModelConfig) -> timedelta:
    """A prediction older than this on arrival has a closed window and may have lost the facts it needed."""
    return model.label_window + model.label_grace + timedelta(days=1)


def _fact_horizon(model: ModelConfig) -> timedelta:
    """A fact older than this on arrival bears on no window that is still open (the facts ``prune_facts`` keeps)."""
    return _prediction_horizon(model) + model.outcome.baseline_lookback


def _terminology(settings: Settings) -> ServerFallback | None:
    """The terminology-server fallback for codes no local ConceptMap covers, when one is configured."""
    return ServerFallback(TerminologyClient(settings.terminology)) if settings.terminology else None


def _arrival_order(item: tuple[Position, Prediction | Fact]):
    """Arrival time, then event time, then identity and version: a total order independent of the input files."""
    e = item[1]
    return (e.received or e.time, e.time, *_identity(e), _version_order(e.version_id))


def _arrival_key(e: Prediction | Fact) -> tuple:
    """``_arrival_order`` as flat integers and strings: the tiebreak of an event's observations on the wire."""
    return (micros(e.received or e.time), micros(e.time), *_identity(e), *_version_order(e.version_id))


def _closing_key(run: ModelRun, pred: Prediction, before: datetime) -> tuple:
    """Canonical key of a case decided or released because its window (and grace) closed: at the close, before any
    event of that instant — or, for a prediction that arrived after its close, just after the event it came with
    (``before``, the high-water mark then): its own observations were emitted there."""
    closes = pred.time + run.config.label_window + run.config.label_grace
    at, rank = (closes, RANK_CLOSED) if closes > before else (before, RANK_CLOSED_LATE)
    return (micros(at), rank, pred.model_id, micros(pred.time), pred.resource_id)


def _identity(event: Prediction | Fact | FeedClock) -> tuple[str, str]:
    return ("RiskAssessment" if isinstance(event, Prediction) else event.resource_type, event.resource_id)


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdecimal() else (0, version)
