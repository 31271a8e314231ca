"""The label join's state is bounded by window expiry (issue 4): fed 400 simulated days, every internal map and heap
stays below a bound set by the label window, grace and baseline lookback, not by the length of the feed.

The feed is driven the way ``vigil.pipeline.Pipeline`` drives the join (events in arrival order, ``advance`` before
each, ``prune_facts`` on each new day with the pipeline's cut-off) and holds what makes state pile up: predictions
re-sent with another time, retracted predictions, amended and retracted creatinine results, subjects seen once, and
a few chronic subjects with a prediction every day for the whole feed (their facts must age out while they always
have something pending).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from monitors.join import LabelJoin
from ontology import definition_for
from vigil.domain import Coding, Fact, Label, OutcomeFact, Prediction
from vigil.settings import load_settings

CREATININE = Coding("http://loinc.org", "2160-0")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAYS = 400
SUBJECTS_PER_DAY = 12
CHRONIC = 3
HOUR = timedelta(hours=1)


def _prediction(rid: str, subject: str, at: datetime, version: str = "1", status: str = "final") -> Prediction:
    return Prediction(rid, version, status, "aki-risk", "1.0.0", subject, None, at, 0.4, site="site-a")


def _creatinine(rid: str, subject: str, at: datetime, value: float, status: str = "final") -> OutcomeFact:
    fact = Fact("Observation", rid, "1", status, subject, None, (CREATININE,), at, value, "mg/dL")
    return OutcomeFact(fact, CREATININE, value, "mg/dL", True)


def _feed(rng: random.Random) -> list[tuple[datetime, object]]:
    """(arrival time, event): predictions and creatinine results for 400 days, in no particular order."""
    events: list[tuple[datetime, object]] = []
    for day in range(DAYS):
        midnight = T0 + timedelta(days=day)
        for n in range(SUBJECTS_PER_DAY):
            subject, at = f"s{day}-{n}", midnight + rng.randrange(24) * HOUR
            base = round(rng.uniform(0.6, 1.2), 2)
            events.append((at - 5 * HOUR, _creatinine(f"cr{day}-{n}-b", subject, at - 6 * HOUR, base)))
            events.append((at, _prediction(f"p{day}-{n}", subject, at)))
            for k in range(rng.randrange(3)):  # follow-up results, reported up to four days late
                taken = at + rng.randrange(1, 60) * HOUR
                value = round(base + rng.uniform(-0.1, 0.5), 2)
                events.append((taken + rng.randrange(96) * HOUR, _creatinine(f"cr{day}-{n}-{k}", subject, taken,
                                                                             value)))
            roll = rng.random()
            if roll < 0.05:  # re-sent later with a corrected time: the old window must not close it
                events.append((at + 2 * HOUR, _prediction(f"p{day}-{n}", subject, at + 3 * HOUR, "2")))
            elif roll < 0.08:
                events.append((at + HOUR, _prediction(f"p{day}-{n}", subject, at, "2", "entered-in-error")))
            elif roll < 0.12:  # the baseline is amended to another time, then one in five of those retracted
                amended = _creatinine(f"cr{day}-{n}-b", subject, at - 2 * HOUR, base)
                events.append((at + 4 * HOUR, amended))
                if rng.random() < 0.2:
                    events.append((at + 8 * HOUR, _creatinine(f"cr{day}-{n}-b", subject, at - 2 * HOUR, base,
                                                              "entered-in-error")))
        for c in range(CHRONIC):  # always something pending for these: a prediction and two results a day
            subject, at = f"chronic-{c}", midnight + 9 * HOUR
            events.append((at, _prediction(f"pc{c}-{day}", subject, at)))
            for k, hours in enumerate((-3, 20)):
                events.append((at + (hours + 1) * HOUR, _creatinine(f"crc{c}-{day}-{k}", subject,
                                                                    at + hours * HOUR, 1.0)))
    rng.shuffle(events)
    events.sort(key=lambda e: e[0])
    return events


def _sizes(join: LabelJoin) -> dict[str, int]:
    return {
        "pending": len(join._pending),
        "closes": len(join._closes),
        "by_subject": len(join._by_subject),
        "facts (subjects)": len(join._facts),
        "facts (held)": sum(len(t) for t in join._facts.values()),
        "expiry heap": len(join._expiry),
        "aging heap": len(join._aging),
        "aging keys": len(join._aging_key),
    }


def test_every_map_and_heap_of_the_join_stays_bounded_by_the_window_over_400_days() -> None:
    model = load_settings().model("aki-risk")
    join = LabelJoin(model, definition_for(model.outcome))
    horizon = model.label_window + model.label_grace + model.outcome.baseline_lookback + timedelta(days=1)
    day, worst, labels = None, dict.fromkeys(_sizes(join), 0), {}
    for arrival, event in _feed(random.Random(20261129)):
        cases = join.advance(arrival)
        if arrival.date() != day:  # what the pipeline does on a new day (vigil/pipeline.py, _advance)
            day = arrival.date()
            join.prune_facts(arrival - horizon)
            worst = {k: max(worst[k], v) for k, v in _sizes(join).items()}
        if isinstance(event, Prediction):
            if event.status == "entered-in-error":
                join.retract_prediction(event.resource_id)
            else:
                case = join.add_prediction(event)
                cases += [case] if case is not None else []
        else:
            cases += join.add_fact(event)
        labels.update((c.prediction.resource_id, c.label) for c in cases)

    # the feed was long enough for unbounded growth to show: 400 days of 15 subjects
    subjects = DAYS * (SUBJECTS_PER_DAY + CHRONIC)
    assert len(labels) > 0.95 * DAYS * (SUBJECTS_PER_DAY + CHRONIC)
    assert {Label.POSITIVE, Label.NEGATIVE} <= set(labels.values())
    # a window (48 h) + grace (3 d) + lookback (1 d) + a day of pruning slack is ~7 days of feed; allow 10 days
    per_day_predictions = SUBJECTS_PER_DAY + CHRONIC
    bound = {
        "pending": 10 * per_day_predictions,
        "closes": 10 * per_day_predictions,
        "by_subject": 10 * per_day_predictions,
        "facts (subjects)": 10 * per_day_predictions,
        "facts (held)": 10 * (4 * SUBJECTS_PER_DAY + 2 * CHRONIC),
        "expiry heap": 3 * 10 * per_day_predictions + 64,  # stale entries are compacted at twice the live ones
        "aging heap": 3 * 10 * per_day_predictions + 64,
        "aging keys": 10 * per_day_predictions,
    }
    over = {k: (worst[k], bound[k]) for k in bound if worst[k] > bound[k]}
    assert not over, f"state grows with the feed ({subjects} subjects in {DAYS} days): {over}"
    # the chronic subjects' facts age out although a prediction of theirs is always pending
    assert all(len(join._facts[f"chronic-{c}"]) <= 2 * 8 for c in range(CHRONIC))
    # and once the feed is over and every window has closed, nothing is left
    end = T0 + timedelta(days=DAYS + 30)
    join.advance(end)
    join.prune_facts(end + horizon)
    assert {k: v for k, v in _sizes(join).items() if v} == {}
