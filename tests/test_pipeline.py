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
