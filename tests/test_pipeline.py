"""The embedded pipeline: determinism, version dedup, and feed problems named by file and line."""

import json

from vigil.pipeline import Pipeline
from vigil.settings import load_settings
from vigil.simulator import simulate


def _signature(result):
    return [(a.id, str(a.signal.stream), a.signal.detected_at, a.signal.change_estimate, round(a.signal.statistic, 9),
             a.fire_count) for a in result.alerts.alerts]


def test_same_inputs_and_config_give_the_same_alerts_and_tickets(tmp_path):
    simulate("scanner-upgrade", tmp_path, seed=5, days=120, change_day=50, volume=0.6)
    first = Pipeline(load_settings()).run_paths([tmp_path])
    second = Pipeline(load_settings()).run_paths([tmp_path])
    assert first.alerts.alerts, "the scenario should raise alerts"
    assert _signature(first) == _signature(second)
    assert [(t.category, t.cause, t.alert_ids) for t in first.tickets] == [
        (t.category, t.cause, t.alert_ids) for t in second.tickets]


def _resource_lines(tmp_path):
    ra = {
        "resourceType": "RiskAssessment", "id": "ra-1", "meta": {"lastUpdated": "2026-02-01T10:00:00Z"},
        "status": "final", "subject": {"reference": "Patient/p1"}, "occurrenceDateTime": "2026-02-01T09:00:00Z",
        "method": {"coding": [{"system": "https://vigil.dev/fhir/CodeSystem/model", "code": "sepsis-watch"}]},
        "performer": {"reference": "Device/sepsis-watch-1"}, "prediction": [{"probabilityDecimal": 0.4}],
    }
    condition = {
        "resourceType": "Condition", "id": "c-1", "meta": {"versionId": "1", "lastUpdated": "2026-02-02T10:00:00Z"},
        "subject": {"reference": "Patient/p1"}, "onsetDateTime": "2026-02-02T08:00:00Z",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "233970002"}]},
    }
    path = tmp_path / "Mixed.000.ndjson"
    path.write_text("\n".join(json.dumps(r) for r in (ra, condition, condition)) + "\n")
    return path


def test_a_prediction_for_an_unconfigured_model_is_dead_lettered_with_its_position(tmp_path):
    path = _resource_lines(tmp_path)
    result = Pipeline(load_settings()).run_paths([path])
    [letter] = result.dead_letters
    assert str(letter.position) == f"{path}:1"
    assert letter.reason.startswith("RiskAssessment/ra-1: unknown model 'sepsis-watch'")
    assert result.rejected == {"unknown model": 1}
    assert result.accepted["RiskAssessment"] == 0


def test_a_resent_version_is_counted_once(tmp_path):
    path = _resource_lines(tmp_path)
    result = Pipeline(load_settings()).run_paths([path])
    assert result.duplicates == {"Condition": 1}
    assert result.accepted["Condition"] == 2  # both lines decoded; the second is the same version again


def _ndjson(path, resources):
    path.write_text("\n".join(json.dumps(r) for r in resources) + "\n")
    return path


def _aki_world():
    """A site, the AKI model Device, one patient and encounter: reference data for hand-written events."""
    return [
        {"resourceType": "Organization", "id": "site-a", "name": "Riverside General"},
        {"resourceType": "Device", "id": "aki-risk-1.4.0", "deviceName": [{"name": "aki-risk", "type": "model-name"}],
         "type": {"coding": [{"system": "https://vigil.dev/fhir/CodeSystem/device-kind", "code": "ai-model"}]},
         "version": [{"value": "1.4.0"}]},
        {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1950"},
        {"resourceType": "Encounter", "id": "e1", "status": "finished", "subject": {"reference": "Patient/p1"},
         "serviceProvider": {"reference": "Organization/site-a"}, "period": {"start": "2026-02-01T08:00:00Z"}},
    ]


def _creatinine(rid, at, value, arrives):
    return {"resourceType": "Observation", "id": rid, "status": "final", "meta": {"lastUpdated": arrives},
            "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
            "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]}, "effectiveDateTime": at,
            "valueQuantity": {"value": value, "unit": "mg/dL", "code": "mg/dL"}}


def _risk(version="1", score=0.2, arrives="2026-02-01T10:05:00Z"):
    return {"resourceType": "RiskAssessment", "id": "ra-1", "status": "final",
            "meta": {"versionId": version, "lastUpdated": arrives},
            "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
            "occurrenceDateTime": "2026-02-01T10:00:00Z",
            "method": {"coding": [{"system": "https://vigil.dev/fhir/CodeSystem/model", "code": "aki-risk"}]},
            "performer": {"reference": "Device/aki-risk-1.4.0"}, "prediction": [{"probabilityDecimal": score}]}


def test_a_baseline_lab_drawn_before_the_prediction_still_counts(tmp_path):
    # KDIGO: 1.0 mg/dL drawn before the score, 1.35 after → a rise of 0.35 → AKI. Had the earlier lab been dropped
    # (it arrives before the prediction), 1.35 would have become the baseline and the case a false negative.
    events = [_creatinine("o0", "2026-02-01T06:00:00Z", 1.0, "2026-02-01T07:00:00Z"), _risk(),
              _creatinine("o1", "2026-02-02T06:00:00Z", 1.35, "2026-02-02T07:00:00Z")]
    result = Pipeline(load_settings()).run_paths([_ndjson(tmp_path / "f.ndjson", _aki_world() + events)])
    [case] = result.cases
    assert case.label.value == "positive" and set(case.evidence) == {"o0", "o1"}


def test_an_amended_prediction_replaces_the_pending_one_and_counts_once(tmp_path):
    events = [_risk(), _risk(version="2", score=0.9, arrives="2026-02-01T11:00:00Z"),
              _creatinine("o0", "2026-02-01T09:00:00Z", 1.0, "2026-02-01T12:00:00Z"),
              _creatinine("o1", "2026-02-02T06:00:00Z", 1.0, "2026-02-07T07:00:00Z")]  # moves the watermark on
    result = Pipeline(load_settings()).run_paths([_ndjson(tmp_path / "f.ndjson", _aki_world() + events)])
    [case] = result.cases
    assert case.prediction.version_id == "2" and case.decision is True and case.label.value == "negative"
    [monitor] = result.monitors()
    score_streams = [s for k, s in monitor.streams.items() if k.metric == "score_mean" and k.site == "all"
                     and k.subgroup == "all"]
    assert score_streams[0].b_n == 1  # the amendment did not add a second score


def test_input_file_order_does_not_change_the_alerts(tmp_path):
    simulate("scanner-upgrade", tmp_path, seed=5, days=120, change_day=50, volume=0.6)
    files = sorted(tmp_path.glob("*.ndjson"))
    forward = Pipeline(load_settings()).run_paths(files)
    backward = Pipeline(load_settings()).run_paths(list(reversed(files)))
    assert _signature(forward) == _signature(backward)


def test_labeled_claims_make_a_breach_critical(tmp_path):
    simulate("scanner-upgrade", tmp_path, seed=5, days=150, change_day=50, volume=0.6)
    result = Pipeline(load_settings()).run_paths([tmp_path])
    fnr_b = [a for a in result.alerts.alerts if a.signal.stream.metric == "fnr" and a.signal.stream.site == "site-b"]
    assert fnr_b, "the scanner upgrade should raise an fnr alert at site-b"
    # sensitivity claim 0.85 → fnr 0.15; a CI wholly above 0.15 is a labeled-claim breach
    assert all((a.severity == "critical") == (a.signal.current_ci[0] > 0.15) for a in fnr_b)
    assert any(a.severity == "critical" for a in fnr_b)
