"""The late-label join: out-of-order outcomes, window closing by watermark, retractions."""

from datetime import UTC, datetime, timedelta

from monitors.join import LabelJoin
from ontology import definition_for
from vigil.domain import Coding, Fact, Label, OutcomeFact, Prediction
from vigil.settings import load_settings

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
STENOSIS = Coding("http://snomed.info/sct", "233970002")


def _join(model_id="cta-stenosis"):
    model = load_settings().model(model_id)
    return LabelJoin(model, definition_for(model.outcome)), model


def _pred(rid="p1", subject="s1", score=0.7, at=T0):
    return Prediction(rid, "1", "final", "cta-stenosis", "2.1.0", subject, None, at, score, site="site-a")


def _stenosis(rid="c1", subject="s1", at=T0 + timedelta(days=20), status="active"):
    fact = Fact("Condition", rid, "1", status, subject, None, (STENOSIS,), at)
    return OutcomeFact(fact, STENOSIS, None, None, True)


def test_outcome_inside_window_labels_positive_at_arrival():
    join, _ = _join()
    assert join.add_prediction(_pred()) is None
    join.advance(T0 + timedelta(days=25))
    [case] = join.add_fact(_stenosis())
    assert case.label is Label.POSITIVE and case.decision is True
    assert case.evidence == ("c1",)
    assert case.labeled_at == T0 + timedelta(days=25)
    assert case.outcome_definition == "cta-stenosis-ica@1"
    assert join.pending == 0


def test_outcome_arriving_before_the_prediction_still_joins():
    join, _ = _join()
    join.add_fact(_stenosis(at=T0 + timedelta(days=3)))
    case = join.add_prediction(_pred())
    assert case is not None and case.label is Label.POSITIVE


def test_window_closes_negative_only_after_window_and_grace():
    join, model = _join()
    join.add_prediction(_pred(score=0.2))
    closes = T0 + model.label_window + model.label_grace
    assert join.advance(closes - timedelta(seconds=1)) == []
    [case] = join.advance(closes)
    assert case.label is Label.NEGATIVE and case.decision is False


def test_outcome_outside_window_does_not_count():
    join, model = _join()
    join.add_prediction(_pred())
    assert join.add_fact(_stenosis(at=T0 + model.label_window + timedelta(days=1))) == []
    [case] = join.advance(T0 + model.label_window + model.label_grace + timedelta(days=2))
    assert case.label is Label.NEGATIVE


def test_retracted_prediction_leaves_the_join():
    join, model = _join()
    join.add_prediction(_pred())
    assert join.retract_prediction("p1") is True
    assert join.advance(T0 + timedelta(days=400)) == []


def test_other_subjects_facts_do_not_label():
    join, _ = _join()
    join.add_prediction(_pred(subject="s1"))
    assert join.add_fact(_stenosis(subject="s2")) == []
    assert join.pending == 1


def test_old_facts_of_subjects_with_nothing_pending_are_pruned_and_recent_ones_kept():
    join, _ = _join()
    join.add_fact(_stenosis(rid="old", subject="s-old", at=T0))
    join.add_fact(_stenosis(rid="new", subject="s-new", at=T0 + timedelta(days=30)))
    join.add_prediction(_pred(rid="p-wait", subject="s-wait", score=0.1))
    join.add_fact(_stenosis(rid="wait", subject="s-wait", at=T0 - timedelta(days=1)))  # before its prediction
    join.prune_facts(T0 + timedelta(days=10))
    assert set(join._facts) == {"s-new", "s-wait"}


def test_a_newer_version_replaces_the_pending_prediction():
    join, _ = _join()
    join.add_prediction(_pred(score=0.2))
    join.add_prediction(_pred(score=0.9))
    assert join.pending == 1 and "p1" in join
    [case] = join.add_fact(_stenosis())
    assert case.decision is True and case.prediction.score == 0.9


CREATININE = Coding("http://loinc.org", "2160-0")


def _creatinine(rid, subject, at, value, status="final", version="1"):
    fact = Fact("Observation", rid, version, status, subject, None, (CREATININE,), at, value, "mg/dL")
    return OutcomeFact(fact, CREATININE, value, "mg/dL", True)


def test_an_amended_fact_counts_at_its_new_time_only():
    join, model = _join()
    join.add_prediction(_pred(score=0.2))
    assert join.add_fact(_stenosis(at=T0 + timedelta(days=120))) == []  # after the window
    [case] = join.add_fact(_stenosis(at=T0 + timedelta(days=30)))  # version 2 of c1 moves it inside
    assert case.label is Label.POSITIVE and case.evidence == ("c1",)
    assert [of.fact.time for of in join._facts["s1"].facts] == [T0 + timedelta(days=30)]


def test_a_retracted_fact_no_longer_labels_and_leaves_no_empty_state():
    join, model = _join()
    join.add_fact(_stenosis(at=T0 + timedelta(days=3)))
    assert join.add_fact(_stenosis(at=T0 + timedelta(days=3), status="entered-in-error")) == []
    assert "s1" not in join._facts
    assert join.add_prediction(_pred()) is None
    [case] = join.advance(T0 + model.label_window + model.label_grace)
    assert case.label is Label.NEGATIVE and case.evidence == ()
    assert (join._pending, join._by_subject, join._closes) == ({}, {}, {})


def test_a_re_sent_prediction_with_a_later_time_closes_with_its_new_window():
    join, model = _join()
    join.add_prediction(_pred(score=0.2))
    join.add_prediction(_pred(score=0.2, at=T0 + timedelta(days=10)))  # version 2: the time was corrected
    first_close = T0 + model.label_window + model.label_grace
    assert join.advance(first_close) == [] and "p1" in join  # the stale window does not close it
    [case] = join.add_fact(_stenosis(at=T0 + timedelta(days=95)))  # inside the new window only
    assert case.label is Label.POSITIVE and case.prediction.time == T0 + timedelta(days=10)


def test_pruning_keeps_the_facts_a_pending_prediction_can_still_use():
    model = load_settings().model("aki-risk")
    join = LabelJoin(model, definition_for(model.outcome))
    join.add_fact(_creatinine("base", "s1", T0 - timedelta(hours=20), 1.0))
    join.add_fact(_creatinine("too-old", "s1", T0 - timedelta(hours=30), 0.5))  # before the 24 h lookback
    join.add_prediction(_pred(subject="s1"))
    join.prune_facts(T0 + timedelta(days=10))  # a cut-off past the prediction: its lookback is kept all the same
    assert [of.fact.resource_id for of in join._facts["s1"].facts] == ["base"]
    [case] = join.add_fact(_creatinine("h20", "s1", T0 + timedelta(hours=20), 1.35))  # +0.35 in 40 h
    assert case.label is Label.POSITIVE and case.evidence == ("base", "h20")
    join.prune_facts(T0 + timedelta(days=10))  # nothing pending any more: all of it goes
    assert (join._facts, join._aging_key) == ({}, {})
