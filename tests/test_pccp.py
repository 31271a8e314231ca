"""The machine-readable PCCP: the example files validate, and a bad file says which file and which field."""

from pathlib import Path

import pytest
import yaml

from retrain_trigger.pccp import (
    LabeledPerformance,
    PccpError,
    SpecBound,
    age_band_range,
    format_cell,
    inside_ifu,
    load_pccp,
    parse_cell,
)
from vigil.settings import EXAMPLES_DIR

CTA = EXAMPLES_DIR / "pccp-cta.yaml"
AKI = EXAMPLES_DIR / "pccp-aki.yaml"


def test_cta_example_loads_with_its_three_modifications():
    p = load_pccp(CTA)
    assert p.device.id == "cta-stenosis"
    assert p.device.authorization.type == "510k"
    assert (p.authorized_baseline_version, p.last_modified_version) == ("2.0.0", "2.1.0")
    assert p.indications_for_use.population.min_age == 18
    assert p.labeled_performance.claims == {"sensitivity": 0.85, "specificity": 0.80}
    assert [m.mod_id for m in p.modifications] == ["M1", "M2", "M3"]
    m1, m2, m3 = p.modifications
    assert set(m1.allowed_remedies) == {"recalibration", "threshold_change"}
    assert m1.bounds.threshold_range == (0.35, 0.65)
    assert m2.type == "input" and m2.allowed_remedies == ["new_input_source_same_type"]
    assert m2.bounds.input_specs["modality"].equals == "CT"
    assert m2.bounds.input_specs["slice_thickness_mm"].max == 1.0
    assert m3.allowed_remedies == ["retrain_same_arch_new_data"]
    assert {"age_band": "80+"} in m3.bounds.subpopulations and {"sex": "female"} in m3.bounds.subpopulations
    for m in p.modifications:
        dm = m.protocol.data_management
        assert dm.allowed_sources == ["site-a", "site-b", "site-c"]
        assert dm.reference_standard_id == "ica-qca-50"
        assert m.protocol.performance_evaluation.acceptance, m.mod_id
        assert all(row.min_n > 0 for row in m.protocol.performance_evaluation.subgroups)
        assert m.protocol.update_procedures.rollback_criteria, m.mod_id
    # the YAML anchor shares update procedures but M2 overrides the acceptance rows with equivalence margins
    assert {r.type for r in m2.protocol.performance_evaluation.acceptance} == {"equivalence"}
    assert m2.protocol.data_management.min_sites == 1 and m3.protocol.data_management.min_sites == 3


def test_aki_example_loads():
    p = load_pccp(AKI)
    assert p.device.id == "aki-risk"
    assert (p.authorized_baseline_version, p.last_modified_version) == ("1.3.0", "1.4.0")
    assert [(m.mod_id, m.allowed_remedies) for m in p.modifications] == [
        ("M1", ["recalibration"]),
        ("M2", ["retrain_same_arch_new_data"]),
    ]
    assert {m.protocol.data_management.reference_standard_id for m in p.modifications} == {"kdigo-creatinine"}
    assert p.monitoring_plan.reference_standard_id == "kdigo-creatinine"


def _write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(CTA.read_text())
    mutate(raw["pccp"])
    out = tmp_path / "bad-pccp.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def test_unknown_field_names_the_file_and_the_field(tmp_path):
    path = _write(tmp_path, lambda p: p["modifications"][1].update(allowed_remedy=["recalibration"]))
    with pytest.raises(PccpError) as err:
        load_pccp(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "pccp.modifications.1.allowed_remedy" in msg


def test_unknown_remedy_type_is_rejected(tmp_path):
    path = _write(tmp_path, lambda p: p["modifications"][0].update(allowed_remedies=["retrain_everything"]))
    with pytest.raises(PccpError, match=r"pccp\.modifications\.0\.allowed_remedies\.0"):
        load_pccp(path)


def test_subpopulation_outside_the_indications_is_rejected(tmp_path):
    path = _write(tmp_path, lambda p: p["modifications"][2]["bounds"]["subpopulations"].append({"age_band": "12-17"}))
    with pytest.raises(PccpError, match=r"M3: subpopulation \{'age_band': '12-17'\} lies outside"):
        load_pccp(path)


def test_protocol_must_compare_to_original_and_last_modified(tmp_path):
    def drop(p):
        p["modifications"][0]["protocol"]["performance_evaluation"]["compare_to"] = ["original"]

    with pytest.raises(PccpError, match="last_modified"):
        load_pccp(_write(tmp_path, drop))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(PccpError, match=r"not found: .*nope\.yaml"):
        load_pccp(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("pccp: [unclosed\n")
    with pytest.raises(PccpError, match=r"broken\.yaml is not valid YAML"):
        load_pccp(broken)


def test_spec_bounds():
    assert SpecBound(max=1.0).admits(0.625) and not SpecBound(max=1.0).admits(1.25)
    assert SpecBound(min=64).admits(128) and not SpecBound(min=64).admits(16)
    assert SpecBound(equals="CT").admits("ct") and not SpecBound(equals="CT").admits("MR")
    assert SpecBound(one_of=["arterial", "venous"]).admits("venous")
    assert str(SpecBound(max=1.0)) == "≤ 1"
    with pytest.raises(ValueError, match="exactly one"):
        SpecBound(max=1.0, min=0.5)


def test_subgroup_cells_and_age_bands():
    assert parse_cell("age_band=80+&sex=female") == {"age_band": "80+", "sex": "female"}
    assert parse_cell("all") == {}
    assert format_cell({"age_band": "80+", "sex": "female"}) == "age_band=80+&sex=female"
    assert format_cell({}) == "all"
    with pytest.raises(ValueError, match="not attribute=value"):
        parse_cell("age_band")
    assert age_band_range("65-79") == (65, 79)
    assert age_band_range("80+") == (80, None)
    assert age_band_range("<18") == (0, 17)
    assert inside_ifu({"age_band": "80+"}, 18)
    assert not inside_ifu({"age_band": "12-17"}, 18)
    assert not inside_ifu({"age_band": "<18"}, 18)
    assert not inside_ifu({"age_band": "80+"}, 18, max_age=85)  # open-ended band is not inside a capped range
    assert inside_ifu({"sex": "female"}, 18)


def test_subgroup_claim_falls_back_to_the_overall_claim():
    lp = LabeledPerformance.model_validate(
        {"sensitivity": 0.85, "specificity": 0.8, "subgroup_claims": {"age_band=80+": {"sensitivity": 0.8}}}
    )
    assert lp.claim("sensitivity", {"age_band": "80+"}) == 0.8
    assert lp.claim("sensitivity", {"age_band": "65-79"}) == 0.85
    assert lp.claim("specificity", {"age_band": "80+"}) == 0.8
    assert lp.claim("auroc") is None
