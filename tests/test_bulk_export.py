"""``$export`` client and exported directories, against a real HTTP server on loopback (tests/fhir_server.py).

The sources get an injected clock and ``sleep`` (time advances when they wait) so a ``Retry-After`` is honoured
without the test waiting it out; the HTTP exchange, gzip transfer, manifest and files are real.
"""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import orjson
import pytest

from fhir_server import ExportFile, FhirServer, Recorded  # tests/ is on sys.path (no __init__.py)
from ingest import Decoder, SubjectKeyer, iter_resources, load, load_messages
from ingest.bulk_export import (
    BulkDirectorySource,
    BulkDirectorySourceConfig,
    BulkExportSource,
    BulkExportSourceConfig,
)
from ingest.reader import NOT_FHIR
from ingest.sources import Checkpoint
from vigil.domain import DeadLetter

SYNTHEA = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea-bulk-10"
KEYER = SubjectKeyer("test-secret")


class Clock:
    """Monotonic time that advances only when the source sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        self.now += seconds


def _obs(rid: str, value: float) -> dict:
    return {"resourceType": "Observation", "id": rid, "meta": {"versionId": "1", "lastUpdated": "2026-02-01T10:00:00Z"},
            "status": "final", "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2026-02-01T09:00:00Z",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
            "valueQuantity": {"value": value, "unit": "mg/dL", "code": "mg/dL"}}


def _condition(rid: str) -> dict:
    return {"resourceType": "Condition", "id": rid, "meta": {"versionId": "1", "lastUpdated": "2026-02-02T10:00:00Z"},
            "subject": {"reference": "Patient/p1"}, "onsetDateTime": "2026-02-02T08:00:00Z",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "233970002"}]}}


def _ndjson(*resources: dict) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in resources)


OUTCOME = {"resourceType": "OperationOutcome", "id": "oo-1", "issue": [
    {"severity": "error", "code": "processing", "diagnostics": "could not export Patient/Jane-Roe-1960-05-04"}]}


def _source(server: FhirServer, clock: Clock, **overrides) -> BulkExportSource:
    config = BulkExportSourceConfig(name="emr-bulk", base_url=server.base_url, **{
        "level": "group", "group_id": "cohort-1", "types": ["Observation", "Condition"],
        "since": "2026-01-01T00:00:00Z", "backoff_s": 0.5, **overrides})
    return BulkExportSource(config, sleep=clock.sleep, clock=clock)


def _drain(source, max_records: int = 1000) -> list:
    out = []
    for _ in range(1000):
        out.extend(source.poll(max_records, timeout_s=30.0))
        if source.exhausted:
            return out
    raise AssertionError("the source never became exhausted")


def _serve_small_export(server: FhirServer) -> None:
    server.export_files = [
        ExportFile("Observation", _ndjson(_obs("o1", 1.0), _obs("o2", 1.4)) + b"\n" + _ndjson(_obs("o3", 0.9))),
        ExportFile("Condition", _ndjson(_condition("c1"), _condition("c2")), gzip=True),
        ExportFile("OperationOutcome", _ndjson(OUTCOME), section="error"),
        ExportFile("Observation", _ndjson(_obs("o4", 1.7)), gz_file=True, name="Observation.3.ndjson.gz"),
    ]
    server.status_polls_before_done = 1
    server.retry_after = "3"


def test_kick_off_status_manifest_download_and_next_since():
    clock = Clock()
    with FhirServer() as server:
        _serve_small_export(server)
        source = _source(server, clock)
        messages = _drain(source)
        assert not server.requests_to("_export/", "DELETE")  # not before the results are stored
        source.committed()
        deletes = server.requests_to("_export/", "DELETE")

    [kick_off] = server.requests_to("$export")
    assert kick_off.path == "/fhir/Group/cohort-1/$export"
    assert kick_off.query == {"_outputFormat": ["application/fhir+ndjson"], "_type": ["Observation,Condition"],
                              "_since": ["2026-01-01T00:00:00Z"]}
    assert kick_off.headers["Prefer"] == "respond-async"
    assert clock.sleeps == [3.0]  # the status answered 202 with Retry-After: 3 once
    assert source.progress == "50% done"
    files = [f"{server.base_url}/_files/{i}/{name}" for i, name in enumerate(
        ["Observation.0.ndjson", "Condition.1.ndjson", "OperationOutcome.2.ndjson", "Observation.3.ndjson.gz"])]
    # manifest order: output files first (the .gz one too), then error files; line 3 of the first file is blank
    assert [(m.position.source, m.position.line) for m in messages] == [
        (files[0], 1), (files[0], 2), (files[0], 4), (files[1], 1), (files[1], 2), (files[3], 1), (files[2], 1)]
    assert source.checkpoint().cursor == orjson.dumps(
        {"since": "2026-03-01T12:00:00Z", "status_url": None, "file": 0, "line": 0}).decode()
    assert [d.path for d in deletes] == ["/fhir/_export/0"]
    file_requests = server.requests_to("_files/")
    assert all("Authorization" not in r.headers for r in file_requests)  # requiresAccessToken: false

    result = load_messages(messages, Decoder(KEYER))
    assert result.accepted == {"Observation": 4, "Condition": 2}  # both gzip forms decoded like plain files
    [letter] = result.dead_letters
    assert letter.position.source == files[2] and letter.position.line == 1
    assert letter.reason.startswith("OperationOutcome/oo-1: server error (error/processing;")
    assert result.rejected == {"server error": 1}
    assert "Jane" not in letter.reason and "Jane" not in letter.payload


def test_the_next_export_uses_transaction_time_as_since():
    clock = Clock()
    with FhirServer() as server:
        _serve_small_export(server)
        server.status_polls_before_done = 0
        source = _source(server, clock, repeat_every_s=3600)
        first = []
        while len(first) < 7:
            first.extend(source.poll(100, 1.0))
        assert source.poll(100, 1.0) == [] and not source.exhausted  # waiting for the next run
        clock.now += 3600
        second = []
        while len(second) < 7:
            second.extend(source.poll(100, 1.0))
    kick_offs = server.requests_to("$export")
    assert [k.query["_since"] for k in kick_offs] == [["2026-01-01T00:00:00Z"], ["2026-03-01T12:00:00Z"]]
    assert [m.payload for m in second] == [m.payload for m in first]


def test_restart_mid_download_continues_after_the_last_line_handed_out():
    clock = Clock()
    with FhirServer() as server:
        _serve_small_export(server)
        first = _source(server, clock)
        batch = []
        while len(batch) < 4:
            batch.extend(first.poll(4 - len(batch), 5.0))
        stored = first.checkpoint()
        assert orjson.loads(stored.cursor) == {"since": "2026-01-01T00:00:00Z",
                                               "status_url": f"{server.base_url}/_export/0", "file": 1, "line": 1}
        restarted = _source(server, clock)
        restarted.resume(stored)
        rest = _drain(restarted)
    assert [(m.position.source.rsplit("/", 1)[-1], m.position.line) for m in rest] == [
        ("Condition.1.ndjson", 2), ("Observation.3.ndjson.gz", 1), ("OperationOutcome.2.ndjson", 1)]
    assert len(server.requests_to("$export")) == 1  # the job was picked up again, not restarted


def test_a_forgotten_job_is_exported_again_from_the_same_since():
    clock = Clock()
    with FhirServer() as server:
        _serve_small_export(server)
        source = _source(server, clock)
        source.resume(Checkpoint(cursor=orjson.dumps({"since": "2026-01-05T00:00:00Z", "file": 1, "line": 1,
                                                      "status_url": f"{server.base_url}/_export/gone"}).decode()))
        messages = _drain(source)
    assert [k.query["_since"] for k in server.requests_to("$export")] == [["2026-01-05T00:00:00Z"]]
    assert len(messages) == 7  # the new job is read from its first line


def test_a_failed_kick_off_names_the_url_and_the_outcome():
    with FhirServer() as server:
        server.fail_next("$export", 400)
        source = _source(server, Clock(), level="patient")
        with pytest.raises(Exception) as caught:
            source.poll(10, 1.0)
    assert str(caught.value).startswith(f"GET {server.base_url}/Patient/$export: HTTP 400 after 1 attempt(s) "
                                        "(OperationOutcome: error/transient)")


def test_group_level_needs_a_group_id():
    with pytest.raises(ValueError, match="level 'group' needs group_id"):
        BulkExportSourceConfig(name="x", base_url="https://emr.example.org/fhir")


def _counts(result):
    return result.accepted, result.ignored, result.stripped


def test_synthea_served_through_export_loads_like_the_directory(tmp_path):
    clock = Clock()
    with FhirServer() as server:
        server.serve_export_directory(SYNTHEA, gzip_types=("Patient", "Encounter"))
        server.status_polls_before_done = 2
        server.retry_after = "1"
        messages = _drain(_source(server, clock, types=[]))
        gzipped = [r for r in server.requests_to("_files/") if "Patient" in r.path]
    assert gzipped and gzipped[0].headers.get("Accept-Encoding") == "gzip"
    assert len(messages) == 7160  # every FHIR line; the client log is not part of the export
    assert Counter(orjson.loads(m.payload)["resourceType"] for m in messages) == Counter({
        "Procedure": 2056, "MedicationRequest": 1745, "DocumentReference": 1215, "Encounter": 1215, "Condition": 555,
        "Immunization": 161, "Location": 44, "Organization": 43, "Practitioner": 43, "PractitionerRole": 43,
        "Device": 16, "Patient": 13, "AllergyIntolerance": 11})  # the line counts of the files
    served = load_messages(messages, Decoder(KEYER))
    direct = load(SYNTHEA, Decoder(KEYER))
    assert _counts(served) == _counts(direct)
    assert direct.rejected - served.rejected == Counter({"not a FHIR resource": 4})  # log.ndjson, read directly
    assert served.accepted["Patient"] == 13 and served.accepted["Encounter"] > 0


def test_downloaded_export_directory_is_read_through_its_manifest(tmp_path):
    (tmp_path / "1.Observation.ndjson").write_bytes(_ndjson(_obs("o1", 1.0), _obs("o2", 1.2)))
    (tmp_path / "2.Condition.ndjson.gz").write_bytes(gzip.compress(_ndjson(_condition("c1"))))
    (tmp_path / "3.err.ndjson").write_bytes(_ndjson(OUTCOME))
    (tmp_path / "stale.Observation.ndjson").write_bytes(_ndjson(_obs("stale", 9.0)))  # not in the manifest
    (tmp_path / "manifest.json").write_bytes(orjson.dumps({
        "transactionTime": "2026-03-01T12:00:00Z", "requiresAccessToken": True,
        "output": [{"type": "Observation", "url": "https://emr.example.org/files/1.Observation.ndjson"},
                   {"type": "Condition", "url": "https://emr.example.org/files/2.Condition.ndjson"},
                   {"type": "Observation", "url": "https://emr.example.org/files/4.Observation.ndjson"}],
        "error": [{"type": "OperationOutcome", "url": "https://emr.example.org/files/3.err.ndjson"}]}))

    items = list(iter_resources([tmp_path]))
    ids = [item[1]["id"] for item in items if not isinstance(item, DeadLetter)]
    assert ids == ["o1", "o2", "c1", "oo-1"]  # manifest order, the gzip copy found, the stale file not read
    [missing] = [item for item in items if isinstance(item, DeadLetter)]
    assert missing.reason.startswith("file not found: the manifest lists https://emr.example.org/files/"
                                     "4.Observation.ndjson (output, Observation)")

    source = BulkDirectorySource(BulkDirectorySourceConfig(name="drop", path=tmp_path))
    messages = _drain(source, max_records=2)
    assert source.exhausted
    assert [orjson.loads(m.payload)["id"] for m in messages] == ids
    assert [d.reason.split(":")[0] for d in source.dead_letters] == ["file not found"]
    from_source = load_messages(messages, Decoder(KEYER))
    from_files = load(tmp_path, Decoder(KEYER))
    assert from_source.accepted == from_files.accepted == {"Observation": 2, "Condition": 1}
    assert from_source.rejected == {"server error": 1}
    assert from_files.rejected == {"server error": 1, "file not found": 1}


def test_directory_source_resumes_and_reads_synthea_without_a_manifest():
    source = BulkDirectorySource(BulkDirectorySourceConfig(name="synthea", path=SYNTHEA))
    first = source.poll(3000, 0.0)
    stored = source.checkpoint()
    restarted = BulkDirectorySource(BulkDirectorySourceConfig(name="synthea", path=SYNTHEA))
    restarted.resume(stored)
    rest = _drain(restarted, max_records=1000)
    assert len(first) == 3000 and len(first) + len(rest) == 7164  # log.ndjson lines included: the decoder rejects
    positions = [(m.position.source, m.position.line) for m in first + rest]
    assert len(set(positions)) == 7164
    result = load_messages(first + rest, Decoder(KEYER))
    direct = load(SYNTHEA, Decoder(KEYER))
    assert _counts(result) == _counts(direct) and result.rejected == direct.rejected
    assert result.rejected[NOT_FHIR.split(" (")[0]] == 4


class PagedExportServer(FhirServer):
    """The loopback FHIR server of tests/fhir_server.py, with its completion manifest split into pages of
    ``page_size`` files, each linking the next with ``link: [{relation: next, url}]`` (BulkDataManifest ``link``).
    Pages after the first are served from ``/_manifest/<job>/<n>``, with a relative link when ``relative_pages``."""

    def __init__(self, page_size: int, relative_pages: bool = False, loop: bool = False):
        self.page_size, self.relative_pages, self.loop = page_size, relative_pages, loop
        self.pages: dict[str, list[dict]] = {}
        super().__init__()

    def _handler(self):
        server, base = self, super()._handler()

        class Paged(base):
            def _dispatch(self, method: str) -> None:
                path = self.path.removeprefix("/fhir/")
                if method == "GET" and path.startswith("_manifest/"):
                    _, job, n = path.split("/")
                    server.requests.append(Recorded(method, "/fhir/" + path, {}, dict(self.headers.items())))
                    return self._send(200, server.pages[job][int(n)], content_type="application/json")
                return super()._dispatch(method)

            def _send(self, status, body, headers=None, content_type="application/fhir+json"):
                if status == 200 and isinstance(body, dict) and "transactionTime" in body and "link" not in body:
                    job = self.path.rstrip("/").rsplit("/", 1)[-1]
                    server.pages[job] = server.paginate(job, body)
                    body = server.pages[job][0]
                return super()._send(status, body, headers, content_type)

        return Paged

    def paginate(self, job: str, manifest: dict) -> list[dict]:
        entries = [(section, e) for section in ("output", "deleted", "error") for e in manifest[section]]
        chunks = [entries[i:i + self.page_size] for i in range(0, len(entries), self.page_size)]
        pages = []
        for n, chunk in enumerate(chunks):
            page = {**manifest, "output": [], "deleted": [], "error": []}
            for section, entry in chunk:
                page[section].append(entry)
            if n + 1 < len(chunks) or self.loop:
                target = 0 if n + 1 == len(chunks) else n + 1
                url = f"_manifest/{job}/{target}"
                page["link"] = [{"relation": "self", "url": "ignored"},
                                {"relation": "next", "url": url if self.relative_pages else f"{self.base_url}/{url}"}]
            pages.append(page)
        pages[0]["link"] = pages[0].get("link", [])  # marks it as paginated (not split again)
        return pages


# the server pages output files first, then error files (as one manifest lists them)
PAGED_ORDER = [("Observation.0.ndjson", 1), ("Observation.0.ndjson", 2), ("Observation.0.ndjson", 4),
               ("Condition.1.ndjson", 1), ("Condition.1.ndjson", 2), ("Observation.3.ndjson.gz", 1),
               ("OperationOutcome.2.ndjson", 1)]


def _files_read(messages) -> list[tuple[str, int]]:
    return [(m.position.source.rsplit("/", 1)[-1], m.position.line) for m in messages]


@pytest.mark.parametrize("relative", [False, True])
def test_a_paged_manifest_is_followed_to_its_last_page(relative):
    clock = Clock()
    with PagedExportServer(page_size=1, relative_pages=relative) as server:
        _serve_small_export(server)
        source = _source(server, clock)
        paged = _drain(source)
        pages = server.requests_to("_manifest/")
    with FhirServer() as plain:
        _serve_small_export(plain)
        whole = _drain(_source(plain, Clock()))
    # one page per file: every file is read once, in the pages' order, and the lines are those of one manifest
    assert [p.path.rsplit("/", 2)[-2:] for p in pages] == [["0", "1"], ["0", "2"], ["0", "3"]]
    assert _files_read(paged) == PAGED_ORDER
    assert sorted(m.payload for m in paged) == sorted(m.payload for m in whole)
    assert orjson.loads(source.checkpoint().cursor) == {"since": "2026-03-01T12:00:00Z", "status_url": None,
                                                        "file": 0, "line": 0}  # the next export's _since


def test_a_restart_on_a_later_manifest_page_continues_there():
    clock = Clock()
    with PagedExportServer(page_size=2) as server:
        _serve_small_export(server)
        first = _source(server, clock)
        batch = []
        while len(batch) < 6:  # into the second page (its first file, the third of all)
            batch.extend(first.poll(6 - len(batch), 5.0))
        stored = first.checkpoint()
        assert orjson.loads(stored.cursor)["file"] == 2
        restarted = _source(server, clock)
        restarted.resume(stored)
        rest = _drain(restarted)
    assert _files_read(batch + rest) == PAGED_ORDER
    assert _files_read(rest) == [("OperationOutcome.2.ndjson", 1)]
    assert len(server.requests_to("$export")) == 1


def test_a_manifest_whose_next_link_loops_is_an_error_naming_the_page():
    with PagedExportServer(page_size=2, loop=True) as server:
        _serve_small_export(server)
        source = _source(server, Clock())
        with pytest.raises(Exception) as caught:
            _drain(source)
    # status URL (page 0) → page 1 → page 0 again under its own URL → page 1: seen, so the client stops there
    assert str(caught.value).startswith(f"GET {server.base_url}/_manifest/0/0: the export manifest's next link "
                                        f"({server.base_url}/_manifest/0/1) points back to a page already read")
