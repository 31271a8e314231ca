"""Subgroup attributes and the stream cells a prediction counts in."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ontology import age_band, attributes, cells
from vigil.domain import DeviceInfo, SubjectInfo
from vigil.settings import SubgroupConfig

AT = datetime(2025, 6, 1, tzinfo=UTC)
BANDS = [18, 50, 65, 80]
SCANNER = DeviceInfo("dev-ct-1", "scanner", "Acme", "CT-9000", None, "site-a")


@pytest.mark.parametrize(
    ("birth_year", "band"),
    [
        (2008, "<18"),  # 17
        (2007, "18-49"),  # 18
        (1976, "18-49"),  # 49
        (1975, "50-64"),  # 50
        (1961, "50-64"),  # 64
        (1960, "65-79"),  # 65
        (1946, "65-79"),  # 79
        (1945, "80+"),  # 80
        (1925, "80+"),  # 100
        (None, "unknown"),
    ],
)
def test_age_band_edges(birth_year: int | None, band: str) -> None:
    assert age_band(birth_year, AT, BANDS) == band


def test_age_bands_must_be_given() -> None:
    with pytest.raises(ValueError, match="age_bands is empty"):
        age_band(1970, AT, [])


def test_attributes_from_subject_and_scanner() -> None:
    subject = SubjectInfo("subj-1", 1950, "female", "2054-5", "2135-2")
    assert attributes(subject, SCANNER, AT, SubgroupConfig()) == {
        "sex": "female",
        "age_band": "65-79",
        "race": "black",
        "ethnicity": "hispanic",
        "scanner": "Acme CT-9000",
    }


def test_missing_values_are_unknown_and_scanner_only_when_given() -> None:
    subject = SubjectInfo("subj-2", None, None, "UNK", None)
    assert attributes(subject, None, AT, SubgroupConfig()) == {
        "sex": "unknown",
        "age_band": "unknown",
        "race": "unknown",
        "ethnicity": "unknown",
    }
    assert attributes(None, DeviceInfo("d", "scanner", None, None, None, None), AT, SubgroupConfig()) == {
        "sex": "unknown",
        "age_band": "unknown",
        "race": "unknown",
        "ethnicity": "unknown",
        "scanner": "unknown",
    }


def test_race_codes_without_a_label_count_as_other() -> None:
    subject = SubjectInfo("subj-3", 1980, "male", "2028-9", "2186-5")
    cfg = SubgroupConfig(attributes=["race", "ethnicity"])
    assert attributes(subject, None, AT, cfg) == {"race": "asian", "ethnicity": "not-hispanic"}
    subject.race = "2108-9"  # a detailed code (European), not an OMB category
    assert attributes(subject, None, AT, cfg)["race"] == "other"


def test_only_configured_attributes_and_unknown_names_are_refused() -> None:
    subject = SubjectInfo("subj-4", 1990, "male", "2106-3", "2186-5")
    assert attributes(subject, SCANNER, AT, SubgroupConfig(attributes=["sex"])) == {"sex": "male"}
    with pytest.raises(ValueError, match="unknown subgroup attribute 'zip' .*known: sex, age_band, race, ethnicity"):
        attributes(subject, SCANNER, AT, SubgroupConfig(attributes=["sex", "zip"]))


def test_cells_with_an_intersection_in_declared_key_order() -> None:
    cfg = SubgroupConfig(
        attributes=["sex", "age_band", "scanner"], intersections=[["age_band", "sex"], ["sex", "scanner"]]
    )
    attrs = attributes(SubjectInfo("subj-5", 1940, "male", None, None), SCANNER, AT, cfg)
    assert cells(attrs, cfg) == [
        "all",
        "sex=male",
        "age_band=80+",
        "scanner=Acme CT-9000",
        "age_band=80+&sex=male",
        "sex=male&scanner=Acme CT-9000",
    ]
    without_scanner = attributes(SubjectInfo("subj-6", 2000, "female", None, None), None, AT, cfg)
    assert cells(without_scanner, cfg) == ["all", "sex=female", "age_band=18-49", "age_band=18-49&sex=female"]


def test_memoised_cells_follow_the_configuration_and_hand_out_fresh_lists() -> None:
    cfg = SubgroupConfig(attributes=["sex", "age_band"])
    attrs = {"sex": "female", "age_band": "50-64"}
    first = cells(attrs, cfg)
    assert first == ["all", "sex=female", "age_band=50-64"]
    first.append("changed by a caller")
    assert cells(attrs, cfg) == ["all", "sex=female", "age_band=50-64"]
    cfg.intersections.append(["sex", "age_band"])  # the same config object, changed in place
    assert cells(attrs, cfg) == ["all", "sex=female", "age_band=50-64", "sex=female&age_band=50-64"]
    cfg.attributes = ["age_band"]
    assert cells(attrs, cfg) == ["all", "age_band=50-64", "sex=female&age_band=50-64"]
    assert cells({"age_band": "80+"}, cfg) == ["all", "age_band=80+"]
