"""The label join: predictions meet their late, out-of-order outcomes inside the model's label window.

Stage 1 of the flow is keyed by subject because a prediction and its outcomes must meet here. A prediction is
labeled positive as soon as its outcome definition is met by facts that arrived (in any order); negative when the
feed's watermark passes the end of its window plus the grace period for late reports.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from datetime import datetime

from ontology.outcomes import OutcomeDefinition
from vigil.domain import Case, Label, OutcomeFact, Prediction
from vigil.settings import ModelConfig


class LabelJoin:
    """Pending predictions and the facts that may label them, for one model.

    >>> # see tests/test_join.py for a runnable walk-through with late and out-of-order outcomes
    """

    def __init__(self, model: ModelConfig, definition: OutcomeDefinition):
        self.model = model
        self.definition = definition
        self._pending: dict[str, Prediction] = {}
        self._by_subject: dict[str, set[str]] = defaultdict(set)
        self._facts: dict[str, dict[str, OutcomeFact]] = defaultdict(dict)
        self._expiry: list[tuple[datetime, str]] = []
        self.watermark: datetime | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def __contains__(self, resource_id: str) -> bool:
        """Whether a prediction is still waiting for its label."""
        return resource_id in self._pending

    def add_prediction(self, pred: Prediction) -> Case | None:
        """Register a prediction (a newer version replaces a pending one); label it at once if facts decide it."""
        self._pending[pred.resource_id] = pred
        self._by_subject[pred.subject].add(pred.resource_id)
        closes = pred.time + self.model.label_window + self.model.label_grace
        heapq.heappush(self._expiry, (closes, pred.resource_id))
        return self._try(pred, closed=False)

    def retract_prediction(self, resource_id: str) -> bool:
        """An entered-in-error prediction leaves the join; True if it was still pending."""
        pred = self._pending.pop(resource_id, None)
        if pred is None:
            return False
        self._by_subject[pred.subject].discard(resource_id)
        return True

    def add_fact(self, of: OutcomeFact) -> list[Case]:
        """A relevant outcome fact (or a new version of one) arrives: label what it decides."""
        fact = of.fact
        if fact.status == "entered-in-error":  # it no longer counts for what is still pending
            self._facts[fact.subject].pop(fact.resource_id, None)
            return []
        self._facts[fact.subject][fact.resource_id] = of
        cases = []
        for rid in sorted(self._by_subject.get(fact.subject, ())):
            case = self._try(self._pending[rid], closed=False)
            if case is not None:
                cases.append(case)
        return cases

    def advance(self, watermark: datetime) -> list[Case]:
        """Move the feed's watermark; close every window that has expired (negative unless met)."""
        if self.watermark is None or watermark > self.watermark:
            self.watermark = watermark
        cases = []
        while self._expiry and self._expiry[0][0] <= self.watermark:
            _, rid = heapq.heappop(self._expiry)
            pred = self._pending.get(rid)
            if pred is not None:
                case = self._try(pred, closed=True)
                if case is not None:
                    cases.append(case)
        return cases

    def recheck(self, case: Case) -> tuple[bool, Case | None]:
        """Re-decide a labeled case from the subject's facts as they are now (after an amendment or a retraction).

        Returns ``(changed, case)``: ``changed`` False when the label stands; else the relabeled case, or None when
        the facts no longer decide it and the prediction waits in the join again until its window closes. Only
        cases whose window and grace have not passed are rechecked: their facts are all still held (``prune_facts``
        keeps every fact of a subject with something pending or recent), and their mixed metrics not yet counted.
        """
        pred = case.prediction
        closes = pred.time + self.model.label_window + self.model.label_grace
        closed = self.watermark is not None and self.watermark >= closes
        result = self.definition.evaluate(pred.time, self.model.label_window,
                                          list(self._facts.get(pred.subject, {}).values()), closed)
        if result is None:
            self._pending[pred.resource_id] = pred
            self._by_subject[pred.subject].add(pred.resource_id)
            heapq.heappush(self._expiry, (closes, pred.resource_id))
            return True, None
        if result[0] is case.label:
            return False, case
        return True, self._emit(pred, *result)

    def prune_facts(self, older_than: datetime) -> None:
        """Drop the facts of subjects with nothing pending once all are too old to matter (bounded state)."""
        for subject in [s for s, facts in self._facts.items()
                        if not self._by_subject.get(s) and all(of.fact.time < older_than for of in facts.values())]:
            del self._facts[subject]
            self._by_subject.pop(subject, None)

    def _try(self, pred: Prediction, closed: bool) -> Case | None:
        facts = list(self._facts.get(pred.subject, {}).values())
        result = self.definition.evaluate(pred.time, self.model.label_window, facts, closed)
        if result is None:
            return None
        label, evidence = result
        return self._emit(pred, label, evidence)

    def _emit(self, pred: Prediction, label: Label, evidence: tuple[str, ...]) -> Case:
        self._pending.pop(pred.resource_id, None)
        self._by_subject[pred.subject].discard(pred.resource_id)
        return Case(
            prediction=pred,
            label=label,
            decision=pred.score >= self.model.threshold,
            labeled_at=self.watermark or pred.time,
            outcome_definition=self.definition.ref,
            evidence=evidence,
        )
