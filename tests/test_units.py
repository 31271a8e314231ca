"""UCUM conversion: molar ↔ mass for creatinine, UCUM spellings, impossible conversions, the factor cache."""

from __future__ import annotations

import pytest

from ontology import units
from ontology.units import UnitError, convert

CREATININE = "2160-0"


@pytest.mark.parametrize("micromolar", ["umol/L", "µmol/L", "μmol/L"])  # ASCII u, micro sign, Greek mu
def test_creatinine_micromolar_to_mass(micromolar: str) -> None:
    assert convert(88.42, micromolar, "mg/dL", CREATININE) == pytest.approx(1.000, abs=0.001)


def test_creatinine_mass_to_micromolar_and_back() -> None:
    assert convert(1.0, "mg/dL", "umol/L", CREATININE) == pytest.approx(88.40, abs=0.01)
    assert convert(convert(1.37, "mg/dL", "umol/L", CREATININE), "umol/L", "mg/dL", CREATININE) == pytest.approx(1.37)


def test_creatinine_millimolar_and_the_molar_loinc_code() -> None:
    assert convert(0.08842, "mmol/L", "mg/dL", CREATININE) == pytest.approx(1.000, abs=0.001)
    assert convert(2.0, "mg/dL", "umol/L", "14682-9") == pytest.approx(176.8, abs=0.05)


def test_same_dimension_needs_no_analyte() -> None:
    assert convert(1.0, "g/L", "mg/dL") == pytest.approx(100.0)
    assert convert(250.0, "mg/dl", "g/L") == pytest.approx(2.5)  # UCUM allows l and L for litre
    assert convert(1.3, "mg/dL", "mg/dL") == 1.3


def test_ucum_spellings() -> None:
    assert convert(5.0, "10*3/uL", "10*9/L") == pytest.approx(5.0)
    assert convert(5.0, "10*3{cells}/uL", "/uL") == pytest.approx(5000.0)
    assert convert(50.0, "%", "1") == pytest.approx(0.5)
    assert convert(37.0, "Cel", "[degF]") == pytest.approx(98.6)
    assert convert(120.0, "mm[Hg]", "kPa") == pytest.approx(16.0, abs=0.01)
    assert convert(1.0, "kg.m-2", "g/cm2") == pytest.approx(0.1)


def test_impossible_conversion_names_both_units() -> None:
    with pytest.raises(UnitError) as err:
        convert(1.0, "mg/dL", "s")
    assert "'mg/dL'" in str(err.value) and "'s'" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_molar_to_mass_without_a_known_molar_mass_says_what_is_missing() -> None:
    with pytest.raises(UnitError, match="needs the analyte's LOINC code"):
        convert(88.0, "umol/L", "mg/dL")
    with pytest.raises(UnitError, match="analyte 2345-7 has none in MOLAR_MASSES"):
        convert(5.0, "mmol/L", "mg/dL", "2345-7")


def test_unreadable_unit_is_named() -> None:
    with pytest.raises(UnitError, match="unit 'qqq/L' is not a UCUM unit"):
        convert(1.0, "qqq/L", "mg/dL")


def test_factor_is_computed_once_per_unit_pair_and_analyte(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = units._affine

    def counting(unit: str, to: str, analyte: str | None) -> tuple[float, float]:
        calls.append((unit, to, analyte))
        return real(unit, to, analyte)

    monkeypatch.setattr(units, "_affine", counting)
    monkeypatch.setattr(units, "_factors", {})
    monkeypatch.setattr(units, "_failures", {})
    values = [convert(v, "umol/L", "mg/dL", CREATININE) for v in (88.42, 176.84, 44.21)]
    assert values == pytest.approx([1.0002, 2.0004, 0.5001], abs=1e-4)
    for _ in range(2):
        with pytest.raises(UnitError, match="'mg/h'"):
            convert(1.0, "mg/h", "mg/dL", CREATININE)
    assert calls == [("umol/L", "mg/dL", CREATININE), ("mg/h", "mg/dL", CREATININE)]
