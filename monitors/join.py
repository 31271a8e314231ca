"""The label join: predictions meet their late, out-of-order outcomes inside the model's label window.

Stage 1 of the flow is keyed by subject because a prediction and its outcomes must meet here. A prediction is
labeled positive as soon as its outcome definition is met by facts that arrived (in any order); negative when the
feed's watermark passes the end of its window plus the grace period for late reports.

State is bounded by window expiry (issue 4): a prediction leaves when it is labeled, retracted or its window closes; a
fact leaves once it is older than anything a still-open window can look at (``prune_facts``). Both are found through
heaps ordered by time, so the daily pruning costs what it removes, not the size of the state (BENCHMARKS.md R3).
"""

from __future__ import annotations

import heapq
from datetime import datetime

from ontology.outcomes import FactTimeline, OutcomeDefinition
from vigil.domain import Case, Fact, Label, OutcomeFact, Prediction
from vigil.settings import ModelConfig

_NO_FACTS = FactTimeline()  # read only: what a subject without relevant facts is decided from


class LabelJoin:
    """Pending predictions and the facts that may label them, for one model.

    >>> # see tests/test_join.py for a runnable walk-through with late and out-of-order outcomes
    """

    def __init__(self, model: ModelConfig, definition: OutcomeDefinition):
        self.model = model
        self.definition = definition
        self._pending: dict[str, Prediction] = {}
        self._closes: dict[str, datetime] = {}  # pending prediction → when its window (with grace) closes
        self._by_subject: dict[str, set[str]] = {}  # subject → its pending predictions; no empty sets
        self._facts: dict[str, FactTimeline] = {}  # subject → its relevant facts in time order; no empty timelines
        self._expiry: list[tuple[datetime, str]] = []  # heap of (closes, prediction); stale entries skipped
        self._aging: list[tuple[datetime, str]] = []  # heap of (time of the subject's oldest fact, subject)
        self._aging_key: dict[str, datetime] = {}  # subject → its live entry in ``_aging`` (others are stale)
        self.watermark: datetime | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def __contains__(self, resource_id: str) -> bool:
        """Whether a prediction is still waiting for its label."""
        return resource_id in self._pending

    def waiting(self, subject: str) -> bool:
        """Whether any prediction of this subject still waits for its label."""
        return bool(self._by_subject.get(subject))

    def holds(self, fact: Fact) -> bool:
        """Whether a version of this resource is among the facts kept for its subject."""
        timeline = self._facts.get(fact.subject)
        return timeline is not None and fact.resource_id in timeline

    def add_prediction(self, pred: Prediction) -> Case | None:
        """Register a prediction (a newer version replaces a pending one); label it at once if facts decide it."""
        self._wait(pred)
        return self._try(pred, closed=False)

    def retract_prediction(self, resource_id: str) -> bool:
        """An entered-in-error prediction leaves the join; True if it was still pending."""
        pred = self._pending.get(resource_id)
        if pred is None:
            return False
        self._settle(pred)
        return True

    def add_fact(self, of: OutcomeFact) -> list[Case]:
        """A relevant outcome fact (or a new version of one) arrives: label what it decides.

        A version the definition cannot use (entered in error, or no longer ``relevant``) takes the resource's earlier
        version out: it no longer counts for what is still pending.
        """
        fact = of.fact
        timeline = self._facts.get(fact.subject)
        if fact.status == "entered-in-error" or not self.definition.relevant(of):
            if timeline is not None and timeline.remove(fact.resource_id) is not None and not timeline:
                del self._facts[fact.subject]
            return []
        if timeline is None:
            timeline = self._facts[fact.subject] = FactTimeline()
        timeline.put(of)
        self._age_from(fact.subject, fact.time)
        cases = []
        for rid in sorted(self._by_subject.get(fact.subject, ())):
            case = self._try(self._pending[rid], closed=False)
            if case is not None:
                cases.append(case)
        return cases

    def advance(self, watermark: datetime) -> list[Case]:
        """Move the feed's watermark; close every window that has expired (negative unless met).

        A case closed here is labeled at its window's close (or, if its prediction arrived after that, at the
        watermark it arrived under): a time that does not depend on which later event happened to move the watermark,
        so a split of the subjects over partitions labels it the same (``vigil.observations``)."""
        before = self.watermark
        if self.watermark is None or watermark > self.watermark:
            self.watermark = watermark
        cases = []
        while self._expiry and self._expiry[0][0] <= self.watermark:
            closes, rid = heapq.heappop(self._expiry)
            if self._closes.get(rid) != closes:  # labeled, retracted, or re-versioned with another time since
                continue
            at = closes if before is None or closes > before else before
            case = self._try(self._pending[rid], closed=True, at=at)
            if case is not None:
                cases.append(case)
        return cases

    def recheck(self, case: Case) -> tuple[bool, Case | None]:
        """Re-decide a labeled case from the subject's facts as they are now (after an amendment or a retraction).

        Returns ``(changed, case)``: ``changed`` False when the label stands; else the relabeled case, or None when
        the facts no longer decide it and the prediction waits in the join again until its window closes. Only
        cases whose window and grace have not passed are rechecked: their facts are all still held (``prune_facts``
        keeps every fact a window still open can look at), and their mixed metrics not yet counted.
        """
        pred = case.prediction
        closed = self.watermark is not None and self.watermark >= self._close_time(pred)
        result = self.definition.decide(pred.time, self.model.label_window,
                                        self._facts.get(pred.subject, _NO_FACTS), closed)
        if result is None:
            self._wait(pred)
            return True, None
        if result[0] is case.label:
            return False, case
        return True, self._emit(pred, *result)

    def prune_facts(self, older_than: datetime) -> None:
        """Forget the facts older than ``older_than`` (bounded state); the pipeline passes the watermark minus the
        label window, grace, baseline lookback and a day, so no window still open can reach them.

        A subject with predictions still pending keeps, whatever ``older_than`` says, every fact from its earliest
        pending prediction's baseline lookback on. Only subjects whose oldest fact is older than ``older_than`` are
        visited (a heap by oldest fact time), so the cost follows what ages out, not how many subjects are held.
        """
        lookback = self.model.outcome.baseline_lookback
        protected = []
        while self._aging and self._aging[0][0] < older_than:
            oldest, subject = heapq.heappop(self._aging)
            if self._aging_key.get(subject) != oldest:
                continue  # stale: the subject got an older fact (a newer entry) or was dropped since
            del self._aging_key[subject]
            timeline = self._facts.get(subject)
            if timeline is None:
                continue
            cutoff = older_than
            waiting = self._by_subject.get(subject)
            if waiting:
                cutoff = min(cutoff, min(self._pending[rid].time for rid in waiting) - lookback)
            timeline.drop_before(cutoff)
            if not timeline:
                del self._facts[subject]
            elif timeline.times[0] < older_than:  # kept for a pending prediction: look again at the next prune
                protected.append(subject)
            else:
                self._age_from(subject, timeline.times[0])
        for subject in protected:
            self._age_from(subject, self._facts[subject].times[0])

    def _age_from(self, subject: str, time: datetime) -> None:
        """Keep the invariant of ``_aging``: every subject with facts has a live entry no later than its oldest."""
        key = self._aging_key.get(subject)
        if key is None or time < key:
            self._aging_key[subject] = time
            heapq.heappush(self._aging, (time, subject))
            if len(self._aging) > 2 * len(self._aging_key) + 64:  # mostly stale: rebuild from the live entries
                self._aging = [(t, s) for s, t in self._aging_key.items()]
                heapq.heapify(self._aging)

    def _close_time(self, pred: Prediction) -> datetime:
        return pred.time + self.model.label_window + self.model.label_grace

    def _wait(self, pred: Prediction) -> None:
        """The prediction waits for its label until its window closes (a new version replaces the held one)."""
        rid = pred.resource_id
        closes = self._close_time(pred)
        held = self._pending.get(rid)
        if held is not None and held.subject != pred.subject:
            self._settle(held)
        self._pending[rid] = pred
        self._by_subject.setdefault(pred.subject, set()).add(rid)
        if self._closes.get(rid) != closes:
            self._closes[rid] = closes
            heapq.heappush(self._expiry, (closes, rid))
            if len(self._expiry) > 2 * len(self._closes) + 64:  # mostly stale: rebuild from the live entries
                self._expiry = [(c, r) for r, c in self._closes.items()]
                heapq.heapify(self._expiry)

    def _settle(self, pred: Prediction) -> None:
        """The prediction no longer waits (labeled or retracted): forget it, and its subject once nothing waits."""
        rid = pred.resource_id
        self._pending.pop(rid, None)
        self._closes.pop(rid, None)
        waiting = self._by_subject.get(pred.subject)
        if waiting is not None:
            waiting.discard(rid)
            if not waiting:
                del self._by_subject[pred.subject]

    def _try(self, pred: Prediction, closed: bool, at: datetime | None = None) -> Case | None:
        result = self.definition.decide(pred.time, self.model.label_window,
                                        self._facts.get(pred.subject, _NO_FACTS), closed)
        if result is None:
            return None
        label, evidence = result
        return self._emit(pred, label, evidence, at)

    def _emit(self, pred: Prediction, label: Label, evidence: tuple[str, ...], at: datetime | None = None) -> Case:
        self._settle(pred)
        return Case(
            prediction=pred,
            label=label,
            decision=pred.score >= self.model.threshold,
            labeled_at=at or self.watermark or pred.time,
            outcome_definition=self.definition.ref,
            evidence=evidence,
        )
