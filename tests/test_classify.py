"""The ordered rules R0–R9 of reference/pccp.md §8.4–8.5 on evidence bundles, including the §8.7 worked examples."""

from datetime import datetime

import pytest

from retrain_trigger.classify import AcceptanceResult, EvidenceBundle, classify, reclassify
from retrain_trigger.pccp import load_pccp
from vigil.domain import PccpCategory
from vigil.settings import EXAMPLES_DIR

CTA = load_pccp(EXAMPLES_DIR / "pccp-cta.yaml")
SITES = ["site-a", "site-b", "site-c"]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def bundle(**over) -> EvidenceBundle:
    """A confirmed, cause-known signal with no claim breach, proposing a re-train on all three sites (M3 shape)."""
    base = {
        "model": "cta-stenosis",
        "alert_ids": ["al-1"],
        "device": CTA.device.model_dump(),
        "deployed_model_version": "2.1.0",
        "authorized_baseline_version": "2.0.0",
        "last_modified_version": "2.1.0",
        "awareness_date": datetime(2025, 3, 7, 9, 0),  # a Friday
        "data_window": (datetime(2025, 2, 1), datetime(2025, 3, 7)),
        "metric": {
            "name": "sensitivity",
            "site": "all",
            "labeled_claim": 0.85,
            "baseline_value": 0.91,
            "current_value": 0.88,
            "ci95": (0.86, 0.90),
            "n": 400,
        },
        "scope": {"level": "global", "site_ids": SITES},
        "magnitude": {
            "abs_delta": -0.03,
            "rel_delta": -0.033,
            "statistic": 5.1,
            "threshold": 4.2,
            "persistence_windows": 1,
            "control_chart_rule": "bernoulli_cusum: 5.1 ≥ 4.2",
        },
        "drift_diagnostics": {"cause_hypothesis": "population_shift", "cause_confidence": 0.8},
        "harm_signals": {"clinical_severity_if_missed": "serious"},
        "proposed_remedy": {
            "type": "retrain_same_arch_new_data",
            "data_sources": SITES,
            "reference_standard_id": "ica-qca-50",
        },
    }
    return EvidenceBundle.model_validate(_merge(base, over))


def rules(decision) -> list[str]:
    return [r[0] for r in decision.rationale]


def est(candidate, comparator, diff_ci, candidate_ci=None):
    return {
        "candidate": candidate,
        "comparator": comparator,
        "diff_ci": diff_ci,
        "candidate_ci": candidate_ci or (candidate - 0.03, candidate + 0.03),
    }


def passing_result(mod_id="M3", **over) -> AcceptanceResult:
    """Every acceptance row, subgroup row and guard of CTA's M2/M3 passes."""
    overall = {
        "sensitivity": est(0.90, 0.89, (-0.01, 0.03)),
        "specificity": est(0.82, 0.81, (-0.01, 0.03)),
    }
    subgroups = [
        {
            "def": d,
            "metric": "sensitivity",
            "n": 150,
            "versus": {"original": est(0.88, 0.88, (-0.04, 0.04)), "last_modified": est(0.88, 0.87, (-0.03, 0.05))},
        }
        for d in (
            {"age_band": "18-49"},
            {"age_band": "50-64"},
            {"age_band": "65-79"},
            {"age_band": "80+"},
            {"sex": "female"},
            {"sex": "male"},
        )
    ]
    raw = {
        "mod_id": mod_id,
        "candidate_version": "2.2.0",
        "device_vv_passed": True,
        "overall": {"original": overall, "last_modified": overall},
        "subgroups": subgroups,
    }
    return AcceptanceResult.model_validate(_merge(raw, over))


# --- §8.7 worked examples --------------------------------------------------------------------------


def test_example_1_out_of_spec_slice_thickness_is_c1_with_safety_overlay():
    lvo = CTA.model_copy(
        update={
            "labeled_performance": CTA.labeled_performance.model_copy(update={"claims": {"sensitivity": 0.90}}),
            "monitoring_plan": CTA.monitoring_plan.model_copy(update={"clinical_severity_if_missed": "critical"}),
        }
    )
    b = bundle(
        metric={
            "site": "site-a",
            "labeled_claim": 0.90,
            "baseline_value": 0.93,
            "current_value": 0.84,
            "ci95": (0.79, 0.88),
        },
        scope={"level": "site", "site_ids": ["site-a"]},
        drift_diagnostics={
            "cause_hypothesis": "data_quality",
            "cause_confidence": 0.8,
            "input_integrity": {"dicom_tag_anomalies": ["SliceThickness 2.5 mm > spec 1 mm"]},
        },
        harm_signals={"clinical_severity_if_missed": "critical"},
        proposed_remedy={"type": "pipeline_fix", "data_sources": ["site-a"]},
    )
    d = classify(b, lvo)
    assert d.category == PccpCategory.C1
    assert d.safety_overlay is True
    assert rules(d) == ["R0", "R1", "R2"]
    assert "0.880" in d.rationale[0][1] and "0.900" in d.rationale[0][1]
    assert any("2025-04-06" in c and "803.50" in c for c in d.reporting_clocks)  # awareness + 30 days
    assert any("2025-03-14" in c and "803.53" in c for c in d.reporting_clocks)  # Friday + 5 work days
    assert any("806.10" in c for c in d.reporting_clocks)  # the input-check hot-fix is a correction
    assert any("do not re-train" in a for a in d.required_actions)


def test_example_2_compatible_scanner_is_c2_via_m2_and_stays_c2_after_acceptance():
    b = bundle(
        scope={"level": "acquisition_device", "site_ids": ["site-b"], "acquisition": {"manufacturer": "Philips"}},
        drift_diagnostics={"cause_hypothesis": "acquisition_device", "cause_confidence": 0.85},
        proposed_remedy={
            "type": "new_input_source_same_type",
            "data_sources": ["site-b"],
            "input_source": {"modality": "CT", "slice_thickness_mm": 0.625, "detector_rows": 128, "ecg_gating": "yes"},
            "test_sets_sequestered": True,
            "test_set_reuse": {"cta-scanner-equivalence-seq": 0},
            "projected_subgroup_n": {"age_band=80+": 60, "sex=female": 300},
        },
    )
    before = classify(b, CTA)
    assert (before.category, before.matched_mod, before.safety_overlay) == (PccpCategory.C2, "M2", False)
    assert not any(a.startswith("verify the new input source") for a in before.required_actions)
    after = classify(b, CTA, passing_result("M2"))
    assert (after.category, after.matched_mod) == (PccpCategory.C2, "M2")
    assert rules(after) == ["R0", "R1", "R2", "R3", "R4", "R5", "R6", "R8"]
    assert any("UDI-DI" in a for a in after.required_actions)


def test_example_4_adolescents_on_an_adult_only_device_is_c5():
    b = bundle(
        metric={"subgroup": "age_band=12-17"},
        scope={"level": "subgroup", "subgroup": {"age_band": "12-17"}},
        population_context={"patients_outside_ifu_fraction": 0.04},
        proposed_remedy={"subpopulation": {"age_band": "12-17"}},
    )
    d = classify(b, CTA)
    assert d.category == PccpCategory.C5
    assert rules(d) == ["R0", "R1", "R2", "R3", "R9"]
    assert "outside the indicated population" in d.rationale[3][1]
    assert any("off-label" in a and "input-age guard" in a for a in d.required_actions)
    assert "Traditional 510(k)" in d.rationale[-1][1]


def test_example_5_new_prediction_output_is_c5():
    d = classify(bundle(proposed_remedy={"type": "new_output_or_claim"}), CTA)
    assert d.category == PccpCategory.C5
    assert "R3" in rules(d) and "R4" not in rules(d)
    assert "De Novo or PMA" in d.rationale[-1][1]


# --- each rule reached by a minimal bundle ---------------------------------------------------------


def test_r1_unconfirmed_signal_is_c0_unless_harm_is_reported():
    weak = bundle(magnitude={"statistic": 3.0, "threshold": 4.2})
    d = classify(weak, CTA)
    assert d.category == PccpCategory.C0 and rules(d) == ["R0", "R1"]
    harmed = bundle(magnitude={"statistic": 3.0, "threshold": 4.2}, harm_signals={"complaints": ["CMP-7"]})
    assert classify(harmed, CTA).category == PccpCategory.C2


def test_r2_data_quality_and_low_confidence_and_security():
    dq = classify(bundle(drift_diagnostics={"cause_hypothesis": "data_quality", "cause_confidence": 0.7}), CTA)
    assert dq.category == PccpCategory.C1 and rules(dq) == ["R0", "R1", "R2"]
    flagged = bundle(drift_diagnostics={"input_integrity": {"unit_change": True}})
    assert classify(flagged, CTA).category == PccpCategory.C1
    vague = classify(bundle(drift_diagnostics={"cause_hypothesis": "unknown", "cause_confidence": 0.9}), CTA)
    assert vague.category == PccpCategory.C0
    assert any("investigation required" in a for a in vague.required_actions)
    low = classify(bundle(drift_diagnostics={"cause_confidence": 0.3}), CTA)
    assert low.category == PccpCategory.C0
    sec = classify(bundle(drift_diagnostics={"security": {"poisoning_suspected": True}}), CTA)
    assert sec.category == PccpCategory.C1
    assert any("cybersecurity" in a for a in sec.required_actions)


def test_r3_unplanned_claim_change_is_c5():
    d = classify(bundle(proposed_remedy={"labeling_claim_change": True, "subpopulation": {"age_band": "80+"}}), CTA)
    assert d.category == PccpCategory.C5
    assert "not pre-specified" in d.rationale[3][1]


def test_r4_match_and_r5_pass_is_c2_awaiting_the_protocol():
    d = classify(bundle(), CTA)
    assert (d.category, d.matched_mod) == (PccpCategory.C2, "M3")
    assert rules(d) == ["R0", "R1", "R2", "R3", "R4", "R5", "R6", "R8"]
    assert any(a.startswith("run the M3 modification protocol") for a in d.required_actions)
    assert any("attest sequestration" in a for a in d.required_actions)  # unknown to vigil: asked, not assumed


@pytest.mark.parametrize(
    ("remedy", "gap"),
    [
        ({"reference_standard_id": "discharge-diagnosis"}, "reference standard 'discharge-diagnosis'"),
        ({"data_sources": ["site-a", "site-b", "site-x"]}, "['site-x'] not allowed"),
        ({"data_sources": ["site-a", "site-b"]}, "2 site(s) of data, protocol needs 3"),
        ({"test_sets_sequestered": True, "test_set_reuse": {"cta-test-2024-seq": 3}}, "reused to the limit 3"),
        ({"test_sets_sequestered": False, "test_set_reuse": {}}, "not sequestered"),
        ({"projected_subgroup_n": {"age_band=80+": 40}}, "age_band=80+ projected n 40 < min_n 100"),
    ],
)
def test_r5_protocol_gap_is_c4(remedy, gap):
    d = classify(bundle(proposed_remedy=remedy), CTA)
    assert (d.category, d.matched_mod) == (PccpCategory.C4, "M3")
    assert rules(d)[-1] == "R5" and gap in d.rationale[-1][1]


def test_r7_no_match_model_change_is_c5_and_restore_to_spec_is_c3():
    out_of_range = classify(bundle(proposed_remedy={"type": "threshold_change", "threshold": 0.8}), CTA)
    assert out_of_range.category == PccpCategory.C5 and out_of_range.matched_mod is None
    assert "threshold 0.8 outside [0.35, 0.65]" in out_of_range.rationale[4][1]
    assert rules(out_of_range) == ["R0", "R1", "R2", "R3", "R4", "R7", "R9"]
    in_range = classify(bundle(proposed_remedy={"type": "threshold_change", "threshold": 0.45}), CTA)
    assert (in_range.category, in_range.matched_mod) == (PccpCategory.C2, "M1")
    rollback = classify(bundle(proposed_remedy={"type": "rollback"}), CTA)
    assert rollback.category == PccpCategory.C3 and rollback.safety_overlay  # C3 + U (806), §8.6
    assert "Q2" in rollback.rationale[5][1] and rules(rollback)[-1] == "R8"
    arch = classify(
        bundle(proposed_remedy={"architecture_change": {"changed": True, "description": "add a layer"}}), CTA
    )
    assert arch.category == PccpCategory.C5 and "'add a layer' not pre-specified" in arch.rationale[4][1]


def test_r4_update_frequency_limit():
    soon = bundle(awareness_date=datetime(2024, 11, 1))  # 46 days after the 2024-09-16 update; M3 needs 90
    d = classify(soon, CTA)
    assert d.matched_mod is None and "frequency limit 90 days" in d.rationale[4][1]


def test_remedy_none_after_a_known_cause_is_c0():
    d = classify(bundle(proposed_remedy={"type": "none"}), CTA)
    assert d.category == PccpCategory.C0 and rules(d) == ["R0", "R1", "R2", "R3", "R4"]


# --- R6 and R8 after the protocol ran -------------------------------------------------------------------


def test_failed_subgroup_margin_is_c2f():
    """§8.7 example 3: specificity improved, sensitivity at ≥ 80 years fell outside its NI margin."""
    bad = passing_result()
    rows = [
        s.model_copy(
            update={
                "versus": {**s.versus, "original": s.versus["original"].model_copy(update={"diff_ci": (-0.09, -0.01)})}
            }
        )
        if s.def_ == {"age_band": "80+"}
        else s
        for s in bad.subgroups
    ]
    d = classify(bundle(), CTA, bad.model_copy(update={"subgroups": rows}))
    assert d.category == PccpCategory.C2F and d.matched_mod == "M3"
    assert "age_band=80+ sensitivity vs original" in d.rationale[-1][1]
    assert "record the failure; do not implement the modification" in d.required_actions


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"overall": {"original": {"sensitivity": est(0.86, 0.89, (-0.05, -0.01))}}}, "non_inferiority at margin 0.02"),
        ({"overall": {"original": {"sensitivity": est(0.86, 0.85, (-0.01, 0.02), (0.83, 0.89))}}}, "floor"),
        (
            {"overall": {"original": {"sensitivity": {**est(0.9, 0.89, (-0.01, 0.03)), "ci_level": 0.9}}}},
            "CI level 0.9",
        ),
        ({"device_vv_passed": False}, "full-device V&V failed"),
        ({"subgroups": []}, "age_band=18-49 sensitivity: not evaluated"),
    ],
)
def test_each_acceptance_gate_can_fail(over, reason):
    d = classify(bundle(), CTA, passing_result(**over))
    assert d.category == PccpCategory.C2F
    assert reason in d.rationale[-1][1]


def test_passing_acceptance_beyond_cumulative_bounds_escalates():
    far = passing_result(overall={"original": {"sensitivity": est(0.98, 0.89, (0.07, 0.11))}})
    d = classify(bundle(), CTA, far)
    assert d.category == PccpCategory.C5
    assert rules(d)[-2:] == ["R8", "R9"] and "sensitivity moved +0.090" in d.rationale[-2][1]
    assert not any("UDI-DI" in a for a in d.required_actions)


def test_acceptance_for_another_modification_is_refused():
    with pytest.raises(ValueError, match="acceptance result is for M2, but the remedy matched M3"):
        classify(bundle(), CTA, passing_result("M2"))


# --- R0 safety overlay, reclassification, errors ----------------------------------------------------


def test_r0_breach_only_when_the_whole_ci_is_past_the_claim():
    near = classify(bundle(metric={"current_value": 0.83, "ci95": (0.80, 0.86)}), CTA)
    assert near.safety_overlay is False and near.reporting_clocks == []
    past = classify(
        bundle(
            supporting=[
                {
                    "name": "specificity",
                    "site": "site-c",
                    "labeled_claim": 0.80,
                    "baseline_value": 0.83,
                    "current_value": 0.71,
                    "ci95": (0.66, 0.76),
                    "n": 200,
                }
            ]
        ),
        CTA,
    )
    assert past.safety_overlay is True and "specificity CI [0.660, 0.760]" in past.rationale[0][1]
    assert past.category == PccpCategory.C2  # neither axis overrides the other
    deaths = classify(bundle(harm_signals={"deaths": 1}), CTA)
    assert deaths.safety_overlay and any("803.50" in c for c in deaths.reporting_clocks)


def test_reclassify_with_an_engineers_remedy():
    b = bundle(proposed_remedy={"type": "recalibration"})
    assert classify(b, CTA).matched_mod == "M1"
    d = reclassify(b, CTA, "retrain_arch_change")
    assert d.category == PccpCategory.C5
    assert d.rationale[0][0] == "reclassify" and "from recalibration to retrain_arch_change" in d.rationale[0][1]
    with pytest.raises(ValueError, match="unknown remedy 'retrain_harder'; choose one of: none, pipeline_fix"):
        reclassify(b, CTA, "retrain_harder")


def test_bundle_for_another_device_is_refused():
    aki = load_pccp(EXAMPLES_DIR / "pccp-aki.yaml")
    with pytest.raises(ValueError, match="'cta-stenosis' cannot be classified against PCCP PCCP-AKI-001"):
        classify(bundle(), aki)
