"""Branches of rules R7 and R9 (reference/pccp.md §8.4) that tests/test_classify.py does not reach.

R7's Q1 (cybersecurity only → C3), its intent principle (a change responding to harm → C5) and its fall-through
(no submission trigger → C3 with RA sign-off); R9's pathway for De Novo and PMA devices, and the PMA periodic report
after a passed C2 (814.39(b)/814.84).
"""

from test_classify import CTA, bundle, passing_result, rules

from retrain_trigger.classify import classify
from retrain_trigger.pccp import load_pccp
from vigil.domain import PccpCategory
from vigil.settings import EXAMPLES_DIR

AKI = load_pccp(EXAMPLES_DIR / "pccp-aki.yaml")
PMA = CTA.model_copy(
    update={"device": CTA.device.model_copy(update={"authorization": CTA.device.authorization.model_copy(
        update={"type": "pma", "number": "P240012"})})}
)


def test_r7_q1_cybersecurity_only_change_is_c3_document():
    d = classify(bundle(proposed_remedy={"type": "pipeline_fix", "cybersecurity_only": True}), CTA)
    assert (d.category, d.matched_mod) == (PccpCategory.C3, None)
    assert rules(d) == ["R0", "R1", "R2", "R3", "R4", "R7", "R8"]
    assert d.rationale[5][1].startswith("Q1: change made solely to strengthen cybersecurity → C3")
    assert "letter to file under QS design-change control with RA sign-off" in d.required_actions


def test_r7_intent_a_non_model_change_responding_to_harm_is_c5():
    d = classify(bundle(proposed_remedy={"type": "pipeline_fix"}, harm_signals={"adverse_events": ["AE-3"]}), CTA)
    assert d.category == PccpCategory.C5
    assert "intent: the change responds to a safety signal or adverse events → presume C5" == d.rationale[5][1]
    assert rules(d)[-1] == "R9"


def test_r7_without_any_submission_trigger_is_c3_with_ra_sign_off():
    d = classify(bundle(proposed_remedy={"type": "pipeline_fix"}), CTA)
    assert d.category == PccpCategory.C3 and d.safety_overlay is False
    assert "Q1–Q4 give no submission trigger for pipeline_fix" in d.rationale[5][1]
    assert d.rationale[5][2] == "S7 Figure 1"


def test_r9_pathway_for_a_de_novo_device():
    aki_bundle = bundle(model="aki-risk", device=AKI.device.model_dump(), proposed_remedy={
        "type": "retrain_arch_change", "reference_standard_id": "kdigo-creatinine"})
    d = classify(aki_bundle, AKI)
    assert d.category == PccpCategory.C5
    assert d.rationale[-1][:2] == ("R9", "denovo device → De Novo-granted device, treated as 510(k) for later "
                                         "changes: new Traditional 510(k)")


def test_r9_pathway_for_a_pma_device_and_the_periodic_report_after_a_pass():
    c5 = classify(bundle(proposed_remedy={"type": "retrain_arch_change"}), PMA)
    assert c5.rationale[-1][1] == "pma device → PMA supplement (180-day, panel-track or real-time by scope)"
    assert c5.rationale[-1][2] == "807.81(a)(3); 814.39(a); S3 §V.E–F"
    c2 = classify(bundle(), PMA, passing_result())
    assert c2.category == PccpCategory.C2
    assert "include the implemented modification in the PMA periodic report (814.39(b)/814.84)" in c2.required_actions
    unmeasured = classify(bundle(), PMA)
    assert not any("periodic report" in a for a in unmeasured.required_actions)
