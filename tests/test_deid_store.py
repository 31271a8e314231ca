"""Issue 3's must-show, end to end: after `vigil ingest` of the Synthea export (real third-party FHIR with names,
addresses, phones, SSN/passport/driver's-licence numbers and birth dates), none of those values appears anywhere in
the database (every table, dumped), the dead letters, the command's output, or the logs (captured at DEBUG)."""

from __future__ import annotations

import logging
import re
import sqlite3
from pathlib import Path

import orjson
from typer.testing import CliRunner

from vigil.cli import app

SYNTHEA = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea-bulk-10"


def _identifiers() -> set[str]:
    secrets: set[str] = set()
    for line in (SYNTHEA / "Patient.000.ndjson").read_bytes().splitlines():
        patient = orjson.loads(line)
        secrets.add(patient["birthDate"])
        secrets |= {i["value"] for i in patient.get("identifier", ())}  # SSN, passport, licence, MRN, the id
        secrets |= {t["value"] for t in patient.get("telecom", ())}
        for name in patient.get("name", ()):
            secrets |= {name["family"], *name.get("given", ())}
        for address in patient.get("address", ()):
            secrets |= {*address.get("line", ()), address["city"], address.get("postalCode", "")} - {""}
    return secrets


def test_no_identifier_from_the_synthea_export_reaches_the_store_the_output_or_the_logs(tmp_path, caplog):
    secrets = _identifiers()
    assert len(secrets) > 100
    db = tmp_path / "vigil.db"
    with caplog.at_level(logging.DEBUG):
        out = CliRunner().invoke(app, ["ingest", str(SYNTHEA), "--store", f"sqlite:///{db}", "--json"])
    assert out.exit_code == 0, out.output
    report = orjson.loads(out.stdout)
    assert report["rejected"] == {"not a FHIR resource": 4}  # log.ndjson, named in the dead letters
    with sqlite3.connect(db) as connection:
        dump = "\n".join(connection.iterdump())
        letters = connection.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    assert letters == 4 and "INSERT INTO" in dump
    text = "\n".join([dump, out.output, caplog.text])
    # whole tokens: a ZIP code such as 67501 also occurs by chance inside uuids and SNOMED codes
    pattern = re.compile(r"(?<![\w-])(?:%s)(?![\w-])" % "|".join(map(re.escape, sorted(secrets))))
    assert len(set(pattern.findall((SYNTHEA / "Patient.000.ndjson").read_text()))) > 100  # the pattern does find them
    assert pattern.findall(text) == []
