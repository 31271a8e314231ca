"""Cause triage and ticket planning on synthetic alert sets shaped like the simulator's five scenarios."""

import dataclasses
import json
import random
from datetime import datetime, timedelta

import pytest

from retrain_trigger.pccp import load_pccp
from retrain_trigger.tickets import plan_tickets, reclassify_ticket
from retrain_trigger.triage import AcquisitionChange, TriageContext, triage
from vigil.domain import Alert, PccpCategory, Signal, StreamKey
from vigil.settings import EXAMPLES_DIR

CTA = load_pccp(EXAMPLES_DIR / "pccp-cta.yaml")
AKI = load_pccp(EXAMPLES_DIR / "pccp-aki.yaml")
SITES = ["site-a", "site-b", "site-c"]
T0 = datetime(2025, 3, 3)
PHILIPS = AcquisitionChange("site-b", T0 - timedelta(days=6), "Philips", "IQon Spectral CT")


def alert(
    aid,
    metric,
    site="all",
    subgroup="all",
    *,
    model="cta-stenosis",
    baseline=0.15,
    current=0.24,
    change=T0,
    detected_after=21,
) -> Alert:
    half = 0.03
    return Alert(
        id=aid,
        signal=Signal(
            stream=StreamKey(model, "2.1.0" if model == "cta-stenosis" else "1.4.0", metric, site, subgroup),
            detector="bernoulli_cusum" if metric != "score_mean" else "ewma",
            detected_at=change + timedelta(days=detected_after),
            change_estimate=change,
            statistic=5.3,
            threshold=4.4,
            baseline=baseline,
            current=current,
            current_ci=(current - half, current + half),
            n_baseline=600,
            n_current=180,
        ),
    )


def ctx(*changes: AcquisitionChange) -> TriageContext:
    return TriageContext(sites=SITES, acquisition_changes=list(changes), indications_min_age=18)


def scanner_upgrade() -> list[Alert]:
    return [
        alert("b-fnr", "fnr", "site-b", baseline=0.14, current=0.27),
        alert("b-err", "error_rate", "site-b", baseline=0.17, current=0.23, change=T0 + timedelta(days=2)),
        alert("all-fnr", "fnr", baseline=0.14, current=0.18, change=T0 + timedelta(days=4)),
    ]


def test_scanner_upgrade_is_one_acquisition_ticket_c2_via_m2():
    tickets = plan_tickets(scanner_upgrade(), ctx(PHILIPS), CTA, "2.1.0")
    assert len(tickets) == 1
    t = tickets[0]
    assert (t.cause, t.remedy, t.category, t.matched_mod) == (
        "acquisition_device",
        "new_input_source_same_type",
        PccpCategory.C2,
        "M2",
    )
    assert t.alert_ids == ["all-fnr", "b-err", "b-fnr"]  # the all-site alert is explained by site-b
    assert t.scope["site_ids"] == ["site-b"]
    assert t.scope["acquisition"] == {"manufacturer": "Philips", "model": "IQon Spectral CT"}
    assert t.cause_confidence >= 0.8
    assert any("Philips IQon Spectral CT" in r for r in triage(scanner_upgrade(), ctx(PHILIPS))[0][0].rationale)
    # fnr 0.27 ± 0.03 at site-b means sensitivity CI [0.70, 0.76] < the labeled 0.85: overlay with MDR clocks
    assert t.safety_overlay is True
    assert t.evidence["awareness_date"] == "2025-03-24T00:00:00"
    assert t.evidence["bundle"]["metric"]["name"] == "sensitivity"
    assert t.evidence["bundle"]["metric"]["site"] == "site-b"
    json.dumps(dataclasses.asdict(t))  # the whole draft is JSON-serialisable


def test_scanner_too_old_to_explain_the_change_is_not_blamed():
    old = dataclasses.replace(PHILIPS, first_seen=T0 - timedelta(days=45))
    causes = [h.cause for h, _ in triage(scanner_upgrade(), ctx(old))]
    assert "acquisition_device" not in causes
    late = dataclasses.replace(PHILIPS, first_seen=T0 + timedelta(days=8))  # after the fnr change by > 7 days
    assert [h.cause for h, _ in triage(scanner_upgrade()[:1], ctx(late))] == ["concept_drift"]


def test_subgroup_alert_follows_its_sites_cause():
    alerts = [*scanner_upgrade(), alert("b-80-fnr", "fnr", "site-b", "age_band=80+", baseline=0.15, current=0.3)]
    [(hyp, members)] = triage(alerts, ctx(PHILIPS))
    assert hyp.cause == "acquisition_device" and "b-80-fnr" in {a.id for a in members}
    assert hyp.scope_subgroups == ["age_band=80+", "all"]


def test_mapping_break_is_one_data_quality_ticket_not_a_retrain():
    alerts = [
        alert("a-unmapped", "unmapped_rate", "site-a", baseline=0.01, current=0.22),
        alert("a-fpr", "fpr", "site-a", baseline=0.18, current=0.26, change=T0 + timedelta(days=3)),
    ]
    [t] = plan_tickets(alerts, ctx(), CTA, "2.1.0")
    assert (t.cause, t.remedy, t.category, t.matched_mod) == ("data_quality", "pipeline_fix", PccpCategory.C1, None)
    assert t.alert_ids == ["a-fpr", "a-unmapped"]
    assert t.cause_confidence == pytest.approx(0.95)  # 0.6 + 0.25 + 0.1, capped
    assert t.evidence["bundle"]["drift_diagnostics"]["input_integrity"]["unmapped_rate_delta"] == pytest.approx(0.21)
    assert not any("modification protocol" in a for a in t.required_actions)


def test_an_all_site_data_quality_alert_is_explained_by_the_site_whose_feed_broke():
    alerts = [
        alert("a-unmapped", "unmapped_rate", "site-a", baseline=0.01, current=0.22),
        alert("all-unmapped", "unmapped_rate", "all", baseline=0.01, current=0.08),
        alert("a-fpr", "fpr", "site-a", baseline=0.18, current=0.26, change=T0 + timedelta(days=3)),
    ]
    [t] = plan_tickets(alerts, ctx(), CTA, "2.1.0")
    assert (t.cause, t.category) == ("data_quality", PccpCategory.C1)
    assert t.alert_ids == ["a-fpr", "a-unmapped", "all-unmapped"]


def test_performance_alert_outside_the_data_quality_window_is_not_joined():
    alerts = [
        alert("a-unmapped", "unmapped_rate", "site-a", baseline=0.01, current=0.22),
        alert("a-fpr", "fpr", "site-a", change=T0 + timedelta(days=45)),
    ]
    got = [(h.cause, [a.id for a in m]) for h, m in triage(alerts, ctx())]
    assert got == [("data_quality", ["a-unmapped"]), ("concept_drift", ["a-fpr"])]


def test_population_shift_on_aki_is_recalibration_c2_via_m1():
    alerts = [alert(f"{s}-score", "score_mean", s, model="aki-risk", baseline=0.21, current=0.29) for s in SITES]
    [t] = plan_tickets(alerts, ctx(), AKI, "1.4.0")
    assert (t.cause, t.remedy, t.category, t.matched_mod) == (
        "population_shift",
        "recalibration",
        PccpCategory.C2,
        "M1",
    )
    assert t.scope["site_ids"] == SITES and t.scope["level"] == "global"
    assert t.evidence["bundle"]["drift_diagnostics"]["covariate_shift"]["score_mean_delta"] == pytest.approx(0.08)
    assert t.safety_overlay is False  # score means carry no labeled claim


def test_subgroup_decay_is_retrain_c2_via_m3():
    alerts = [
        alert("all-80", "fnr", subgroup="age_band=80+", baseline=0.15, current=0.22),
        alert("a-80", "fnr", "site-a", "age_band=80+", baseline=0.15, current=0.24),
        alert("c-80", "fnr", "site-c", "age_band=80+", baseline=0.15, current=0.25),
    ]
    [t] = plan_tickets(alerts, ctx(), CTA, "2.1.0")
    assert (t.cause, t.remedy, t.category, t.matched_mod) == (
        "subgroup_performance",
        "retrain_same_arch_new_data",
        PccpCategory.C2,
        "M3",
    )
    assert t.scope["subgroup"] == {"age_band": "80+"}
    assert t.scope["site_ids"] == SITES  # the pooled subgroup stream covers every site
    assert t.cause_confidence == pytest.approx(0.8)  # 0.3 + 2 × 0.15 + 0.2


def test_subgroup_below_the_indicated_age_is_off_label_c5():
    alerts = [alert(f"{s}-teen", "fnr", s, "age_band=12-17") for s in ("site-a", "site-b")]
    [t] = plan_tickets(alerts, ctx(), CTA, "2.1.0")
    assert (t.cause, t.remedy, t.category) == ("subgroup_performance", "population_outside_IFU", PccpCategory.C5)
    assert any("off-label" in a for a in t.required_actions)


def test_lone_site_alert_is_low_confidence_and_not_retrained():
    [t] = plan_tickets([alert("c-fnr", "fnr", "site-c", current=0.2)], ctx(), CTA, "2.1.0")
    assert (t.cause, t.remedy, t.category) == ("concept_drift", "none", PccpCategory.C0)
    assert t.cause_confidence < CTA.monitoring_plan.cause_confidence_min
    assert any("investigation required" in a for a in t.required_actions)


def test_mixed_scenarios_split_into_causes_in_priority_order_whatever_the_input_order():
    alerts = [
        *scanner_upgrade(),
        alert("a-unmapped", "unmapped_rate", "site-a", baseline=0.01, current=0.22),
        alert("a-fpr", "fpr", "site-a"),
        alert("a-80", "fnr", "site-a", "age_band=80+"),
        alert("c-80", "fnr", "site-c", "age_band=80+"),
    ]
    first = [(h, [a.id for a in m]) for h, m in triage(alerts, ctx(PHILIPS))]
    assert [(h.cause, ids) for h, ids in first] == [
        ("data_quality", ["a-80", "a-fpr", "a-unmapped"]),
        ("acquisition_device", ["all-fnr", "b-err", "b-fnr"]),
        ("concept_drift", ["c-80"]),  # site-a's 80+ alert went with site-a's feed defect: one site is left
    ]
    for seed in range(5):
        shuffled = alerts[:]
        random.Random(seed).shuffle(shuffled)
        assert [(h, [a.id for a in m]) for h, m in triage(shuffled, ctx(PHILIPS))] == first


def test_alerts_of_two_models_are_refused():
    with pytest.raises(ValueError, match=r"one model; got alerts for \['aki-risk', 'cta-stenosis'\]"):
        triage([alert("x", "fnr"), alert("y", "score_mean", model="aki-risk")], ctx())


def test_tickets_against_the_wrong_pccp_are_refused():
    with pytest.raises(ValueError, match="PCCP PCCP-AKI-001 is for 'aki-risk'"):
        plan_tickets(scanner_upgrade(), ctx(PHILIPS), AKI, "2.1.0")


def test_reclassify_ticket_keeps_the_evidence_and_changes_the_decision():
    [t] = plan_tickets(scanner_upgrade(), ctx(PHILIPS), CTA, "2.1.0")
    r = reclassify_ticket(t, CTA, "new_input_type")
    assert (r.remedy, r.category, r.matched_mod) == ("new_input_type", PccpCategory.C5, None)
    assert r.alert_ids == t.alert_ids and r.key == t.key
    assert r.evidence["bundle"]["proposed_remedy"]["type"] == "new_input_type"
    assert r.rationale[0][0] == "reclassify"
