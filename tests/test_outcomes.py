"""Computable outcomes: KDIGO creatinine rise and code sets, decided inside the label window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ontology import CodeSetOutcome, LabRiseOutcome, definition_for
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
