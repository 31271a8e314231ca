"""Computable outcomes: KDIGO creatinine rise and code sets, decided inside the label window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ontology import CodeSetOutcome, LabRiseOutcome, definition_for
from ontology.outcomes import FactTimeline
from vigil.domain import Coding, Fact, Label, OutcomeFact
from vigil.settings import CodeRef, OutcomeConfig

LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"
CREATININE = Coding(LOINC, "2160-0")
STENOSIS = Coding(SCT, "233970002")
ANGIOGRAPHY = Coding(SCT, "33367005")
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
H48 = timedelta(hours=48)
D90 = timedelta(days=90)

AKI = OutcomeConfig(
    id="aki",
    version=2,
    kind="lab_rise",
    analyte=CodeRef(system=LOINC, code="2160-0"),
    unit="mg/dL",
    absolute_rise=0.3,
    relative_rise=1.5,
    baseline_lookback=timedelta(hours=24),
)
CAD = OutcomeConfig(
    id="cad", kind="code_set", codes=[CodeRef(system=SCT, code="233970002"), CodeRef(system=SCT, code="33367005")]
)


def lab(rid: str, hours: float, value: float | None, unit: str = "mg/dL", concept: Coding = CREATININE) -> OutcomeFact:
    return outcome_fact(rid, T0 + timedelta(hours=hours), concept, value, unit)


def onset(rid: str, days: float, concept: Coding | None = STENOSIS) -> OutcomeFact:
    return outcome_fact(rid, T0 + timedelta(days=days), concept, None, None)


def outcome_fact(
    rid: str, time: datetime, concept: Coding | None, value: float | None, unit: str | None
) -> OutcomeFact:
    fact = Fact("Observation", rid, "1", "final", "s1", None, (concept or Coding("urn:x", "y"),), time, value, unit)
    return OutcomeFact(fact=fact, concept=concept, value=value, unit=unit, mapped=concept is not None)


@pytest.fixture
def aki() -> LabRiseOutcome:
    definition = definition_for(AKI)
    assert isinstance(definition, LabRiseOutcome)
    return definition


@pytest.fixture
def cad() -> CodeSetOutcome:
    definition = definition_for(CAD)
    assert isinstance(definition, CodeSetOutcome)
    return definition


# --- lab_rise (KDIGO) ------------------------------------------------------------------------------------------


def test_ref_carries_the_version(aki: LabRiseOutcome, cad: CodeSetOutcome) -> None:
    assert (aki.ref, cad.ref) == ("aki@2", "cad@1")


def test_rise_of_0_3_within_the_window_is_positive_with_evidence(aki: LabRiseOutcome) -> None:
    facts = [lab("cr-24h", 24, 1.3), lab("cr-base", -6, 1.0)]
    for closed in (False, True):
        assert aki.evaluate(T0, H48, facts, closed) == (Label.POSITIVE, ("cr-base", "cr-24h"))


def test_rise_below_0_3_is_negative_only_once_closed(aki: LabRiseOutcome) -> None:
    facts = [lab("cr-base", -6, 1.0), lab("cr-24h", 24, 1.25)]
    assert aki.evaluate(T0, H48, facts, closed=False) is None
    assert aki.evaluate(T0, H48, facts, closed=True) == (Label.NEGATIVE, ("cr-base", "cr-24h"))


def test_rise_after_the_window_does_not_count(aki: LabRiseOutcome) -> None:
    facts = [lab("cr-base", -6, 1.0), lab("cr-60h", 60, 1.6)]
    assert aki.evaluate(T0, H48, facts, closed=False) is None
    assert aki.evaluate(T0, H48, facts, closed=True) == (Label.NEGATIVE, ("cr-base",))


def test_relative_rise_counts_when_the_absolute_rise_is_small(aki: LabRiseOutcome) -> None:
    facts = [lab("cr-base", -2, 0.5), lab("cr-30h", 30, 0.76)]  # +0.26 mg/dL but 1.52 x baseline
    assert aki.evaluate(T0, H48, facts, closed=False) == (Label.POSITIVE, ("cr-base", "cr-30h"))
    absolute_only = definition_for(AKI.model_copy(update={"relative_rise": None}))
    assert absolute_only.evaluate(T0, H48, facts, closed=True)[0] is Label.NEGATIVE


def test_baseline_is_the_latest_value_inside_the_lookback(aki: LabRiseOutcome) -> None:
    facts = [lab("cr-20h-ago", -20, 0.9), lab("cr-2h-ago", -2, 1.1), lab("cr-10h", 10, 1.35)]
    assert aki.evaluate(T0, H48, facts, closed=True) == (Label.NEGATIVE, ("cr-2h-ago", "cr-10h"))


def test_without_a_baseline_the_first_value_in_the_window_is_the_baseline(aki: LabRiseOutcome) -> None:
    too_old = lab("cr-30h-ago", -30, 0.8)  # outside the 24 h lookback: would make 1.2 a rise of 0.4
    assert aki.evaluate(T0, H48, [too_old, lab("a", 2, 1.0), lab("b", 10, 1.2)], closed=True) == (
        Label.NEGATIVE,
        ("a", "b"),
    )
    assert aki.evaluate(T0, H48, [lab("a", 0, 1.0), lab("b", 47, 1.3)], closed=False) == (Label.POSITIVE, ("a", "b"))


def test_no_values_at_all_is_negative_when_closed(aki: LabRiseOutcome) -> None:
    assert aki.evaluate(T0, H48, [], closed=False) is None
    assert aki.evaluate(T0, H48, [], closed=True) == (Label.NEGATIVE, ())


def test_irrelevant_lab_facts_are_ignored(aki: LabRiseOutcome) -> None:
    base = lab("cr-base", -6, 1.0)
    others = [
        lab("glucose", 10, 9.0, concept=Coding(LOINC, "2345-7")),
        lab("no-value", 12, None),
        lab("unconverted", 14, 150.0, unit="umol/L"),
    ]
    assert not any(aki.relevant(of) for of in others)
    assert aki.relevant(base)
    assert aki.evaluate(T0, H48, [base, *others], closed=True) == (Label.NEGATIVE, ("cr-base",))


# --- code_set ----------------------------------------------------------------------------------------------------


def test_code_set_positive_inside_the_window(cad: CodeSetOutcome) -> None:
    facts = [onset("angio", 40, ANGIOGRAPHY), onset("sten", 30)]
    assert cad.evaluate(T0, D90, facts, closed=False) == (Label.POSITIVE, ("sten", "angio"))


def test_code_set_window_edges(cad: CodeSetOutcome) -> None:
    assert cad.evaluate(T0, D90, [onset("d90", 90)], closed=False) == (Label.POSITIVE, ("d90",))
    assert cad.evaluate(T0, D90, [onset("d91", 91)], closed=False) is None
    assert cad.evaluate(T0, D90, [onset("d91", 91)], closed=True) == (Label.NEGATIVE, ())
    assert cad.evaluate(T0, D90, [onset("before", -1)], closed=True) == (Label.NEGATIVE, ())


def test_code_set_ignores_other_and_unmapped_concepts(cad: CodeSetOutcome) -> None:
    other = onset("mi", 5, Coding(SCT, "22298006"))
    unmapped = onset("sten-2", 5, None)
    assert not cad.relevant(other) and not cad.relevant(unmapped)
    assert cad.evaluate(T0, D90, [other, unmapped], closed=True) == (Label.NEGATIVE, ())


# --- configuration errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"kind": "code_set", "codes": []}, "outcome aki@2: kind code_set needs at least one entry in 'codes'"),
        ({"unit": None}, "outcome aki@2: kind lab_rise needs unit"),
        ({"absolute_rise": None, "relative_rise": None}, "needs absolute_rise, relative_rise or both"),
        ({"relative_rise": 0.5}, "relative_rise is a ratio to baseline, must be > 1: 0.5"),
    ],
)
def test_unusable_outcome_config_is_refused(update: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        definition_for(AKI.model_copy(update=update))


# --- the ordered timeline the label join keeps (BENCHMARKS.md R4) -------------------------------------------------


def _reference(definition, prediction_time, window, facts, closed):
    """``evaluate`` as committed at 03fc6df (filter and sort every call), the behaviour the timeline must keep."""
    end = prediction_time + window
    if isinstance(definition, CodeSetOutcome):
        hits = sorted((of.fact.time, of.fact.resource_id) for of in facts
                      if definition.relevant(of) and prediction_time <= of.fact.time <= end)
        if hits:
            return Label.POSITIVE, tuple(dict.fromkeys(rid for _, rid in hits))
        return (Label.NEGATIVE, ()) if closed else None
    values = sorted((of for of in facts if definition.relevant(of)), key=lambda of: (of.fact.time, of.fact.resource_id))
    before = [of for of in values if prediction_time - definition.baseline_lookback <= of.fact.time < prediction_time]
    inside = [of for of in values if prediction_time <= of.fact.time <= end]
    if before:
        baseline, later = before[-1], inside
    elif inside:
        baseline, later = inside[0], inside[1:]
    else:
        return (Label.NEGATIVE, ()) if closed else None
    for i, of in enumerate(later):
        if definition.relative_rise is not None and baseline.value > 0 \
                and of.value >= definition.relative_rise * baseline.value - 1e-9:
            return Label.POSITIVE, (baseline.fact.resource_id, of.fact.resource_id)
        if definition.absolute_rise is not None:
            since = of.fact.time - definition.absolute_rise_within
            for ref in (baseline, *later[:i]):
                if ref.fact.time >= since and of.value - ref.value >= definition.absolute_rise - 1e-9:
                    return Label.POSITIVE, (ref.fact.resource_id, of.fact.resource_id)
    if closed:
        return Label.NEGATIVE, tuple(dict.fromkeys(of.fact.resource_id for of in [baseline, *later]))
    return None


# facts on a coarse grid of hours and a small pool of ids, so ties in time and new versions of one id are common
_op = st.tuples(
    st.sampled_from(["put", "put", "put", "remove"]),
    st.sampled_from([f"r{i}" for i in range(8)]),
    st.integers(-6, 14).map(lambda h: h * 6),  # hours from T0: on the grid of the prediction and window ends
    st.sampled_from([0.5, 0.8, 1.0, 1.1, 1.3, 1.6, 2.0]),
    st.sampled_from([CREATININE, STENOSIS, CREATININE, ANGIOGRAPHY, CREATININE, STENOSIS, Coding(LOINC, "2345-7")]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=30), at=st.integers(0, 4).map(lambda h: h * 6), closed=st.booleans(),
       which=st.sampled_from(["aki", "cad"]))
def test_a_timeline_kept_by_put_and_remove_decides_as_evaluate_did(ops, at, closed, which, aki, cad) -> None:
    definition = aki if which == "aki" else cad
    window = H48 if which == "aki" else timedelta(days=4)
    timeline, held = FactTimeline(), {}
    for op, rid, hours, value, concept in ops:
        if op == "remove":
            assert (timeline.remove(rid) is not None) == (rid in held)
            held.pop(rid, None)
            continue
        of = outcome_fact(rid, T0 + timedelta(hours=hours), concept, value, "mg/dL")
        if definition.relevant(of):  # what the join keeps
            timeline.put(of)
            held[rid] = of
    assert timeline.facts == sorted(held.values(), key=lambda of: (of.fact.time, of.fact.resource_id))
    assert timeline.times == [of.fact.time for of in timeline.facts] and len(timeline) == len(held)
    prediction_time = T0 + timedelta(hours=at)
    expected = _reference(definition, prediction_time, window, list(held.values()), closed)
    assert definition.decide(prediction_time, window, timeline, closed) == expected
    # evaluate on a plain list (duplicate versions and irrelevant facts included) is unchanged too
    raw = [outcome_fact(rid, T0 + timedelta(hours=h), c, v, "mg/dL") for op, rid, h, v, c in ops if op == "put"]
    assert definition.evaluate(prediction_time, window, raw, closed) == _reference(
        definition, prediction_time, window, raw, closed)


def test_lab_values_on_the_prediction_time_and_the_window_end_are_inside(aki: LabRiseOutcome) -> None:
    base = lab("base", -6, 1.0)
    assert aki.evaluate(T0, H48, [base, lab("at-0", 0, 1.35)], closed=False) == (Label.POSITIVE, ("base", "at-0"))
    assert aki.evaluate(T0, H48, [base, lab("at-48", 48, 1.6)], closed=False) == (Label.POSITIVE, ("base", "at-48"))
    assert aki.evaluate(T0, H48, [lab("at-24h-ago", -24, 1.0), lab("h10", 10, 1.3)], closed=False) == (
        Label.POSITIVE, ("at-24h-ago", "h10"))  # the lookback's far end is a baseline too


def test_drop_before_forgets_old_facts_only() -> None:
    timeline = FactTimeline([lab("a", -30, 1.0), lab("b", -6, 1.1), lab("c", 0, 1.2), lab("d", 10, 1.3)])
    assert timeline.drop_before(T0) == 2
    assert [of.fact.resource_id for of in timeline.facts] == ["c", "d"]
    assert "a" not in timeline and "c" in timeline
    assert timeline.remove("a") is None and timeline.remove("c") is not None
    assert timeline.times == [T0 + timedelta(hours=10)]
