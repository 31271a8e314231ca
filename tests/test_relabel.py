"""Corrected outcomes relabel cases: a positive whose only outcome is retracted before its window and grace close waits
in the join again (to be labeled at its window's close), its ``fnr`` observation is withdrawn from the stream's daily
point, the correction is counted, and the stored case is unlabeled. After the grace, labels are frozen."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from vigil.domain import Label
from vigil.pipeline import Pipeline
from vigil.settings import load_settings
from vigil.simulator import simulate

MODEL = "cta-stenosis"


@pytest.fixture(scope="module")
def feed(tmp_path_factory):
    out = tmp_path_factory.mktemp("feed")
    simulate("scanner-upgrade", out, seed=3, days=150, change_day=60, volume=0.5)
    return out


def _resources(feed, kind):
    return [orjson.loads(line) for path in sorted(feed.glob(f"{kind}.*.ndjson")) for line in path.read_bytes().splitlines()]


def _retraction(resource: dict) -> dict:
    retracted = {**resource, "meta": {**resource["meta"], "versionId": "2"}}
    updated = datetime.fromisoformat(resource["meta"]["lastUpdated"].replace("Z", "+00:00")) + timedelta(minutes=1)
    retracted["meta"]["lastUpdated"] = updated.strftime("%Y-%m-%dT%H:%M:%SZ")
    if resource["resourceType"] == "Condition":
        retracted["verificationStatus"] = {"coding": [{"code": "entered-in-error"}]}
    else:
        retracted["status"] = "entered-in-error"
    return retracted


def _lone_positive(feed, run):
    """(outcome resources by id, a positive case after the baseline decided by one outcome resource, for a subject
    with one prediction)."""
    outcomes = {r["id"]: r for kind in ("Condition", "Procedure") for r in _resources(feed, kind)}
    per_subject = Counter(c.prediction.subject for c in run.cases.values())
    case = next(c for _, c in sorted(run.cases.items()) if c.label is Label.POSITIVE and len(c.evidence) == 1
                and c.evidence[0] in outcomes and per_subject[c.prediction.subject] == 1
                and c.prediction.time > datetime(2026, 4, 1, tzinfo=UTC))
    return outcomes, case


def _fnr_total(result, day) -> int:
    return sum(p.n for m in result.models[MODEL].monitors.values() for s in m.streams.values()
               if s.key.metric == "fnr" and s.key.site == "all" and s.key.subgroup == "all"
               for d, p in s.points.items() if d == day)


def test_a_retracted_outcome_relabels_its_positive_case_and_corrects_the_stream(feed, tmp_path):
    original = Pipeline(load_settings()).run_paths([feed])
    run = original.models[MODEL]
    outcomes, case = _lone_positive(feed, run)
    (tmp_path / "Retraction.000.ndjson").write_bytes(orjson.dumps(_retraction(outcomes[case.evidence[0]])) + b"\n")

    corrected = Pipeline(load_settings()).run_paths([feed, tmp_path / "Retraction.000.ndjson"])
    rid = case.prediction.resource_id
    assert rid not in corrected.models[MODEL].cases and rid in corrected.models[MODEL].join  # waits again
    assert corrected.corrections["relabeled: outcome amended or retracted"] == 1
    day = case.prediction.time.replace(hour=0, minute=0, second=0, microsecond=0)
    assert _fnr_total(corrected, day) == _fnr_total(original, day) - 1
    assert corrected.unsaved[(MODEL, rid)].label is None  # the stored case loses its label
    # everything else is labeled as before
    assert {r: c.label for r, c in corrected.models[MODEL].cases.items()} == {
        r: c.label for r, c in run.cases.items() if r != rid}


def test_a_correction_after_the_window_and_grace_closed_is_counted_not_applied(feed, tmp_path):
    """Labels freeze when the grace period (the time allowed for corrections) ends: a later retraction is counted for
    the data-quality record; the case keeps its label and the streams are not touched."""
    original = Pipeline(load_settings()).run_paths([feed])
    run = original.models[MODEL]
    outcomes, case = _lone_positive(feed, run)
    closes = case.prediction.time + run.config.label_window + run.config.label_grace
    late = _retraction(outcomes[case.evidence[0]])
    late["meta"]["lastUpdated"] = (closes + timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
    heart_rate = {"resourceType": "Observation", "id": "hr-1", "status": "amended",  # not an outcome: no correction
                  "meta": {"versionId": "2", "lastUpdated": late["meta"]["lastUpdated"]}, "subject": late["subject"],
                  "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                  "effectiveDateTime": late["meta"]["lastUpdated"], "valueQuantity": {"value": 80, "code": "/min"}}
    (tmp_path / "Late.000.ndjson").write_bytes(orjson.dumps(late) + b"\n" + orjson.dumps(heart_rate) + b"\n")

    corrected = Pipeline(load_settings()).run_paths([feed, tmp_path / "Late.000.ndjson"])
    assert corrected.corrections["outcome corrected after its labels froze (not applied)"] == 1
    assert corrected.corrections["relabeled: outcome amended or retracted"] == 0
    after = corrected.models[MODEL].cases  # also the windows the late arrival's watermark closed
    assert {r: after[r].label for r in run.cases} == {r: c.label for r, c in run.cases.items()}
    day = case.prediction.time.replace(hour=0, minute=0, second=0, microsecond=0)
    assert _fnr_total(corrected, day) == _fnr_total(original, day)
