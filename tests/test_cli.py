"""The command line on real files and a real SQLite store: ingest with bad input, alert lifecycle, audit verify."""

import json
import sqlite3

import pytest
from typer.testing import CliRunner

from vigil.cli import app
from vigil.simulator import simulate

runner = CliRunner()


@pytest.fixture(scope="module")
def feed(tmp_path_factory):
    out = tmp_path_factory.mktemp("feed")
    simulate("stable", out, seed=3, days=20, change_day=10, volume=0.2)
    (out / "Broken.000.ndjson").write_text(
        '{"resourceType": "Organization", "id": "site-x"}\n'
        '{"resourceType": "Organization", "id": \n'
        '{"hello": "not fhir"}\n'
    )
    return out


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_ingest_reports_bad_lines_with_file_and_line_and_keeps_going(feed, tmp_path):
    store = f"sqlite:///{tmp_path / 'v.db'}"
    report = json.loads(_invoke("ingest", feed, "--store", store, "--json").stdout)
    assert report["rejected"] == {"invalid JSON": 1, "not a FHIR resource": 1}
    positions = {d["position"]: d["reason"] for d in report["dead_letters"]}
    broken = str(feed / "Broken.000.ndjson")
    assert positions[f"{broken}:2"].startswith("invalid JSON")
    assert positions[f"{broken}:3"].startswith("not a FHIR resource")
    assert report["accepted"]["Organization"] == 4  # the three sites and the good line of the broken file
    assert report["accepted"]["RiskAssessment"] > 100
    assert report["cases"] > 0
    with sqlite3.connect(tmp_path / "v.db") as db:
        assert db.execute("select count(*) from dead_letters").fetchone()[0] == 2
        assert db.execute("select count(*) from cases").fetchone()[0] == report["cases"]
        assert db.execute("select count(*) from runs").fetchone()[0] == 1


def test_simulate_json_gives_the_ground_truth(tmp_path):
    truth = json.loads(_invoke("simulate", "--scenario", "scanner-upgrade", "--out", tmp_path, "--days", "30",
                               "--change-day", "20", "--volume", "0.1", "--json").stdout)
    [change] = truth["changes"]
    assert (change["model"], change["site"], change["expected_category"]) == ("cta-stenosis", "site-b", "C2")
    assert (tmp_path / "ground_truth.json").exists()


def test_unknown_scenario_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["simulate", "--scenario", "nope", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "stable" in result.output and "scanner-upgrade" in result.output


def test_calibrate_reproduces_the_published_cusum_design():
    out = json.loads(_invoke("calibrate", "threshold", "--detector", "cusum", "--k", "0.5", "--arl0", "465",
                             "--json").stdout)
    assert out["h"] == pytest.approx(5.0, abs=0.01)


def test_reading_commands_refuse_a_missing_store_instead_of_creating_one(tmp_path):
    store = tmp_path / "nope.db"
    for args in (["alerts", "list"], ["tickets", "list"], ["alerts", "show", "A-000001"], ["audit", "verify"]):
        result = runner.invoke(app, [*args, "--store", f"sqlite:///{store}"])
        assert result.exit_code == 2, (args, result.output)
        assert "no vigil store" in result.output
    assert not store.exists()


def test_ingest_of_a_missing_path_fails_after_storing_the_rest(feed, tmp_path):
    store = tmp_path / "v.db"
    result = runner.invoke(app, ["ingest", str(feed / "Organization.000.ndjson"), str(tmp_path / "missing.ndjson"),
                                 "--store", f"sqlite:///{store}", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["accepted"] == {"Organization": 3}
    with sqlite3.connect(store) as db:
        assert db.execute("select reason from dead_letters").fetchone()[0].startswith("file not found")


def test_demo_rejects_an_unknown_scenario(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--scenario", "nope"])
    assert result.exit_code == 2 and "unknown scenario" in result.output
