"""The pipeline's memory is bounded by the label horizon, not by the length of the feed (issue 4, "state bounded by
window expiry"), and what arrives beyond the horizon is counted — a late prediction dead-lettered with its reason —
never silently joined against facts that were already forgotten. Also: mapping coverage per site *and* code system
(issue 4 item 6), on the `mapping-break` scenario."""

from datetime import datetime, timedelta, timezone

import pytest

from test_pipeline import _aki_world, _creatinine, _ndjson
from vigil.domain import ALL
from ingest import load
from vigil.pipeline import ENCOUNTER_RETENTION, REFERENCE_TYPES, Pipeline, _arrival_order
from vigil.scenarios import RIVERSIDE_DX
from vigil.settings import load_settings
from vigil.simulator import simulate

T0 = datetime(2026, 2, 1, tzinfo=timezone.utc)


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _aki_prediction(rid: str, at: datetime, arrives: datetime) -> dict:
    return {"resourceType": "RiskAssessment", "id": rid, "status": "final", "meta": {"lastUpdated": _iso(arrives)},
            "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
            "occurrenceDateTime": _iso(at),
            "method": {"coding": [{"system": "https://vigil.dev/fhir/CodeSystem/model", "code": "aki-risk"}]},
            "performer": {"reference": "Device/aki-risk-1.4.0"}, "prediction": [{"probabilityDecimal": 0.2}]}


def test_a_prediction_arriving_after_its_window_and_grace_closed_is_dead_lettered_not_labeled(tmp_path):
    settings = load_settings()
    aki = next(m for m in settings.models if m.id == "aki-risk")
    closed = aki.label_window + aki.label_grace + timedelta(days=1)
    resources = _aki_world() + [
        _creatinine("cr-now", _iso(T0 + closed + timedelta(days=3)), 1.0, _iso(T0 + closed + timedelta(days=3))),
        _aki_prediction("ra-late", T0, arrives=T0 + closed + timedelta(days=3, hours=1)),
        _aki_prediction("ra-ok", T0 + closed + timedelta(days=3), arrives=T0 + closed + timedelta(days=3, hours=2)),
    ]
    path = _ndjson(tmp_path / "feed.ndjson", resources)
    result = Pipeline(settings).run_paths([path])
    [letter] = result.dead_letters
    assert letter.resource_id == "ra-late" and "too late to be labeled" in letter.reason
    assert str(letter.position) == f"{path}:6"
    assert result.late == {"RiskAssessment": 1} and result.rejected == {"too late": 1}
    assert result.accepted["RiskAssessment"] == 1  # the on-time one
    assert "ra-late" not in result.models["aki-risk"].join and "ra-ok" in result.models["aki-risk"].join


def test_a_redelivered_prediction_is_a_duplicate_even_after_its_window_closed(tmp_path):
    """At-least-once delivery (Kafka, webhook catch-up) re-sends what was monitored: counted as a duplicate, not
    dead-lettered as late."""
    settings = load_settings()
    aki = next(m for m in settings.models if m.id == "aki-risk")
    later = T0 + aki.label_window + aki.label_grace + timedelta(days=3)
    first = _aki_prediction("ra-1", T0, arrives=T0 + timedelta(hours=1))
    again = _aki_prediction("ra-1", T0, arrives=later + timedelta(hours=1))
    path = _ndjson(tmp_path / "feed.ndjson", _aki_world() + [first, _creatinine("cr", _iso(later), 1.0, _iso(later)),
                                                           again])
    result = Pipeline(settings).run_paths([path])
    assert result.duplicates == {"RiskAssessment": 1}
    assert result.late == {} and result.dead_letters == []


def test_a_fact_older_than_every_horizon_is_counted_late_and_its_replay_is_not_a_second_observation(tmp_path):
    settings = load_settings()
    p = Pipeline(settings)
    old = _creatinine("cr-old", _iso(T0), 1.0, _iso(T0 + timedelta(hours=1)))
    now = T0 + p.horizon + timedelta(days=2)
    later = _creatinine("cr-new", _iso(now), 1.1, _iso(now))
    replay = dict(old, meta={"lastUpdated": _iso(now + timedelta(hours=1))})
    p.run_paths([_ndjson(tmp_path / "feed.ndjson", _aki_world() + [old, later, replay])])
    assert p.result.late == {"Observation": 1}  # the replay of cr-old, two days past the horizon
    assert p.result.duplicates == {}
    assert ("Observation", "cr-old") not in p._versions  # forgotten once beyond the horizon
    assert ("Observation", "cr-new") in p._versions


@pytest.fixture(scope="module")
def long_feed(tmp_path_factory):
    out = tmp_path_factory.mktemp("stable-200d")
    simulate("stable", out, seed=3, days=200, volume=0.3)
    return out


def test_dedupe_and_encounter_state_stay_bounded_over_a_long_feed(long_feed):
    """200 simulated days: the dedupe map holds about a horizon's worth of resources, not the whole feed."""
    p = Pipeline(load_settings())
    result = p.run_paths([long_feed])
    events = sum(result.accepted.values())
    assert events > 20_000
    versions_at_end = len(p._versions)
    # the horizon is the CTA model's 60-day window + 14-day grace + a day: ~ 75/200 of the feed's events at most
    assert versions_at_end < 0.5 * events, (versions_at_end, events)
    oldest = min(t for t, _ in p._version_expiry) - p.horizon
    assert oldest >= result.watermark - p.horizon - timedelta(days=1)
    horizon_days = (p.horizon + ENCOUNTER_RETENTION).days
    assert all(e.start >= result.watermark - timedelta(days=horizon_days + 1)
               for e in p.encounters.values() if e.start is not None)
    assert result.late == {} and result.dead_letters == []  # a healthy feed has nothing late
    # per-subject maps hold the subjects active within the horizon, not every subject ever seen
    assert len(p._subject_active) < 0.6 * len(p.subjects)
    assert set(p._followed_up) <= set(p._subject_active) and set(p._subject_models) <= set(p._subject_active)
    assert all(t >= result.watermark - p.horizon - timedelta(days=1) for t in p._subject_active.values())


def test_service_mode_forgets_settled_cases_and_ends_with_the_one_shot_results(long_feed):
    """Fed in 40 batches with a store after each (as ``vigil run`` does), the pipeline keeps only the cases inside the
    horizon in memory, yet counts and alerts exactly what one pass over the whole feed does."""
    settings = load_settings()
    whole = Pipeline(settings).run_paths([long_feed])
    p = Pipeline(settings)
    loaded = load([long_feed], p.decoder)
    reference = [(pos, r) for pos, r in loaded.records if isinstance(r, REFERENCE_TYPES)]
    events = sorted(((pos, r) for pos, r in loaded.records if not isinstance(r, REFERENCE_TYPES)),
                    key=_arrival_order)
    p.process(reference)
    peak = 0
    for i in range(40):
        p.process(events[i * len(events) // 40:(i + 1) * len(events) // 40])
        p.result.mark_stored()
        p.forget_stored()
        peak = max(peak, len(p.result.cases))
    assert p.result.case_count == len(whole.cases) > 5_000
    assert p.result.forgotten_cases > 0.5 * len(whole.cases)
    assert peak < 0.6 * len(whole.cases)
    assert [(str(a.signal.stream), a.signal.detected_at) for a in p.result.alerts.alerts] == [
        (str(a.signal.stream), a.signal.detected_at) for a in whole.alerts.alerts]


@pytest.fixture(scope="module")
def mapping_break(tmp_path_factory):
    out = tmp_path_factory.mktemp("mapping-break")
    simulate("mapping-break", out, seed=11, days=110, change_day=70, volume=0.5)
    return Pipeline(load_settings()).run_paths([out])


def test_mapping_coverage_is_followed_per_site_and_code_system(mapping_break):
    """site-a codes its stenosis Conditions in SNOMED CT until day 70, then in its own local system, which no
    ConceptMap maps: the site's coverage stream alarms, and the per-code-system streams show why — the local system
    is new (first seen after the baseline: no baseline, so reported as insufficient data, not silently charted) and
    everything unmapped at site-a is in it; no other site's coverage moves."""
    change = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(days=70)
    local = f"code_system={RIVERSIDE_DX}"
    streams = {k: s for m in mapping_break.monitors() for k, s in m.streams.items() if k.metric == "unmapped_rate"}
    by_cell = {(k.model, k.site, k.subgroup): s for k, s in streams.items()}
    new = by_cell[("cta-stenosis", "site-a", local)]
    assert new.status == "insufficient_data" and new.b_n == 0
    snomed = by_cell[("cta-stenosis", "site-a", "code_system=snomed")]
    assert snomed.status == "active" and snomed.b_n > 100 and snomed.b_sum == 0
    assert sum(p.total for p in snomed.points.values()) == 0  # nothing in SNOMED went unmapped
    site_a = by_cell[("cta-stenosis", "site-a", ALL)]
    assert sum(p.total for d, p in site_a.points.items() if d < change) == 0
    assert sum(p.total for d, p in site_a.points.items() if d >= change) > 50
    for site in ("site-b", "site-c"):
        assert all(s.b_sum == 0 and sum(p.total for p in s.points.values()) == 0
                   for (model, where, _), s in by_cell.items() if where == site)
    alerted = {(a.signal.stream.site, a.signal.stream.subgroup) for a in mapping_break.alerts.alerts
               if a.signal.stream.metric == "unmapped_rate"}
    assert ("site-a", ALL) in alerted
    assert not {s for s, _ in alerted} & {"site-b", "site-c"}
