"""ingest.reader: containers → resources or dead letters, against the real Synthea bulk export and small files."""

from __future__ import annotations

import gzip
import shutil
from collections import Counter
from pathlib import Path

import orjson
import pytest

from ingest.reader import NOT_FHIR, iter_resources
from vigil.domain import DeadLetter, Position

SYNTHEA = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea-bulk-10"  # ../shared beside the repo


def _split(items):
    resources = [i for i in items if not isinstance(i, DeadLetter)]
    dead = [i for i in items if isinstance(i, DeadLetter)]
    return resources, dead


def test_bulk_export_yields_every_line_with_its_position():
    resources, dead = _split(list(iter_resources([SYNTHEA])))
    per_file = Counter(Path(pos.source).name for pos, _ in resources)
    for path in SYNTHEA.glob("*.000.ndjson"):
        assert per_file[path.name] == sum(1 for line in path.open() if line.strip()), path.name
    assert len(resources) == 7160  # 7,164 lines minus the 4 of log.ndjson
    first_patient = next(r for pos, r in resources if pos == Position(str(SYNTHEA / "Patient.000.ndjson"), 1))
    assert first_patient["id"] == "129c6ac7-8d06-89de-ad63-0204a93e76c3"
    # log.ndjson is the export client's log, not FHIR: every line is rejected, by line
    assert [(Path(d.position.source).name, d.position.line, d.reason) for d in dead] == [
        ("log.ndjson", n, NOT_FHIR) for n in (1, 2, 3, 4)
    ]


def test_broken_and_non_fhir_lines_are_dead_lettered_by_line_and_the_rest_read(tmp_path):
    feed = tmp_path / "Condition.000.ndjson"
    feed.write_text(
        '{"resourceType":"Condition","id":"c1"}\n'
        '{"resourceType":"Condition","id":\n'
        "\n"
        '["a list", "not a resource"]\n'
        '{"resourceType":"Condition","id":"c2"}\n'
        '{"resourceType":["Condition"],"id":"c3"}\n'
    )
    resources, dead = _split(list(iter_resources([feed])))
    assert [(pos.line, r["id"]) for pos, r in resources] == [(1, "c1"), (5, "c2")]
    assert [(d.position, d.reason.split(":")[0]) for d in dead] == [
        (Position(str(feed), 2), "invalid JSON"),
        (Position(str(feed), 4), NOT_FHIR),
        (Position(str(feed), 6), NOT_FHIR),
    ]
    assert dead[0].reason == "invalid JSON: unexpected end of data at column 35"


def test_gzip_ndjson_reads_like_the_plain_file(tmp_path):
    plain = SYNTHEA / "Condition.000.ndjson"
    packed = tmp_path / "Condition.000.ndjson.gz"
    with plain.open("rb") as src, gzip.open(packed, "wb") as dst:
        shutil.copyfileobj(src, dst)
    from_plain = [(p.line, r) for p, r in iter_resources([plain])]
    from_gzip = [(p.line, r) for p, r in iter_resources([packed])]
    assert len(from_gzip) == 555
    assert from_gzip == from_plain


def test_corrupt_gzip_is_a_dead_letter_not_a_crash(tmp_path):
    bad = tmp_path / "Patient.000.ndjson.gz"
    bad.write_bytes(b"this is not gzip at all")
    good = tmp_path / "Organization.000.ndjson"
    good.write_text('{"resourceType":"Organization","id":"site-a"}\n')
    resources, dead = _split(list(iter_resources([bad, good])))
    assert [r["id"] for _, r in resources] == ["site-a"]
    assert len(dead) == 1 and dead[0].position.source == str(bad)
    assert dead[0].reason.startswith("cannot read file: ")


def test_missing_file_names_the_path_and_the_run_goes_on(tmp_path):
    missing = tmp_path / "nope.ndjson"
    items = list(iter_resources([missing, SYNTHEA / "Device.000.ndjson"]))
    assert isinstance(items[0], DeadLetter)
    assert items[0].position.source == str(missing)
    assert items[0].reason.startswith(f"file not found: {missing}")
    assert len(items) == 1 + 16


def _transaction_bundle() -> dict:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:0b1c-patient",
                "resource": {"resourceType": "Patient", "id": "p1", "gender": "female"},
            },
            {
                "fullUrl": "urn:uuid:7e57-encounter",  # no id: it takes the uuid
                "resource": {"resourceType": "Encounter", "subject": {"reference": "urn:uuid:0b1c-patient"}},
            },
            {
                "fullUrl": "urn:uuid:ra-1",
                "resource": {
                    "resourceType": "RiskAssessment",
                    "id": "ra-1",
                    "subject": {"reference": "urn:uuid:0b1c-patient"},
                    "encounter": {"reference": "urn:uuid:7e57-encounter"},
                    "basis": [{"reference": "Device/ct-1"}, {"reference": "urn:uuid:unknown"}],
                    "extension": [{"url": "x", "valueReference": {"reference": "urn:uuid:0b1c-patient"}}],
                },
            },
        ],
    }


def test_bundle_entries_expand_in_order_with_urn_uuid_references_resolved(tmp_path):
    path = tmp_path / "bundle.json"
    path.write_bytes(orjson.dumps(_transaction_bundle()))
    items = list(iter_resources([path]))
    assert [pos for pos, _ in items] == [Position(str(path), n) for n in (1, 2, 3)]
    patient, encounter, risk = (r for _, r in items)
    assert encounter["id"] == "7e57-encounter"
    assert encounter["subject"]["reference"] == "Patient/p1"
    assert risk["subject"]["reference"] == "Patient/p1"
    assert risk["encounter"]["reference"] == "Encounter/7e57-encounter"
    assert risk["extension"][0]["valueReference"]["reference"] == "Patient/p1"  # "anywhere" in the entry
    assert risk["basis"] == [{"reference": "Device/ct-1"}, {"reference": "urn:uuid:unknown"}]


def test_bundle_entry_without_resource_is_dead_lettered_at_its_index(tmp_path):
    path = tmp_path / "history.json"
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [{"request": {"method": "DELETE", "url": "Condition/c9"}}, {"resource": {"id": "x"}}],
    }
    path.write_bytes(orjson.dumps(bundle))
    dead = list(iter_resources([path]))
    assert [(d.position.line, d.reason.split(" (")[0]) for d in dead] == [
        (1, "Bundle entry without a resource"),
        (2, "not a FHIR resource"),
    ]


def test_directory_walk_is_sorted_recursive_and_skips_manifests_and_ground_truth(tmp_path, caplog):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "Organization.000.ndjson").write_text('{"resourceType":"Organization","id":"o2"}\n')
    (tmp_path / "a.json").write_bytes(orjson.dumps({"resourceType": "Organization", "id": "o1"}))
    (tmp_path / "manifest.json").write_bytes(orjson.dumps({"transactionTime": "2024-01-01T00:00:00Z", "output": []}))
    (tmp_path / "ground_truth.json").write_bytes(orjson.dumps({"changes": [{"site": "a"}]}))
    (tmp_path / "notes.md").write_text("not read at all")
    with caplog.at_level("DEBUG", logger="ingest.reader"):
        items = list(iter_resources([str(tmp_path)]))
    assert [(Path(p.source).name, r["id"]) for p, r in items] == [("a.json", "o1"), ("Organization.000.ndjson", "o2")]
    assert sum("without resourceType" in m for m in caplog.messages) == 2


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b'{"transactionTime": "2024"}', NOT_FHIR), (b'{"resourceType": "Patient",', "invalid JSON")],
)
def test_a_json_file_named_explicitly_must_be_fhir(tmp_path, content, reason):
    path = tmp_path / "given.json"
    path.write_bytes(content)
    [dead] = list(iter_resources([path]))
    assert dead.position == Position(str(path))
    assert dead.reason.startswith(reason)


def test_invalid_json_file_says_line_and_column(tmp_path):
    path = tmp_path / "bundle.json"
    path.write_bytes(b'{"resourceType": "Bundle",\n "entry": [}\n')
    [dead] = list(iter_resources([path]))
    assert dead.reason.startswith("invalid JSON: ") and dead.reason.endswith("at line 2 column 12")
