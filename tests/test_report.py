"""The surveillance report (issue #8, "Must show"): built from a store the real demo pipeline wrote (the demo's
scanner-upgrade store: 180 days, change on day 100), self-contained, one inline SVG per chart, no identifiers, every
value escaped, and it renders in headless Chromium (a screenshot that shows the charts' colours).

The demo run is the one test_e2e.py checks (``_shared_fixtures.demo_run``, once per session); the safety officer's
decisions below are undone when this module ends, so they never reach another module's view of the shared run."""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime

import pytest
from _shared_fixtures import demo_run, restored_afterwards, start_demo_in_background
from matplotlib import image as mpimg
from sqlalchemy import select
from typer.testing import CliRunner

from vigil.cli import app
from vigil.report import build_report, chromium_binary, print_pdf
from vigil.store import AlertRow, CaseRow, RunRow, session_factory

runner = CliRunner()
start_demo_in_background()  # the demo runs on the other core while the modules collected before this one are tested
HOSTILE_COMMENT = '<script>alert("x")</script> & checked'


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The real pipeline on the demo's scanner-upgrade feed (change on day 100), then a safety officer's decisions,
    in the demo's own store (the run's configuration hash covers the store URL, which the report checks); the store
    is restored when this module is done. Yields (store URL, the demo's output directory)."""
    out, summary = demo_run(tmp_path_factory)
    alerts = [a for a in summary["alerts"] if a["scenario"] == "scanner-upgrade"]
    assert alerts, "the simulation must raise at least one alert for the report to show"
    demo_report = (out / "report.html").read_text(encoding="utf-8")  # `vigil demo` writes one too
    assert "Scenario scanner-upgrade" in demo_report and demo_report.count("<svg") >= 2
    with restored_afterwards(out / "stores" / "scanner-upgrade.db", tmp_path_factory.mktemp("pristine")) as url:
        first = alerts[0]["id"]
        assert runner.invoke(app, ["alerts", "ack", first, "--by", "dr.safety", "--comment", HOSTILE_COMMENT,
                                   "--store", url]).exit_code == 0
        assert runner.invoke(app, ["alerts", "resolve", first, "--by", "dr.safety", "--store", url]).exit_code == 0
        yield url, out


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    url, _ = store
    info = build_report(url, tmp_path_factory.mktemp("report") / "report.html")
    return info, info.path.read_text(encoding="utf-8")


def test_report_is_self_contained(report):
    info, html = report
    assert info.path.exists() and info.bytes == len(html.encode())
    assert not re.search(r"https?://", html), "no URL of any kind: nothing can be fetched"
    assert not re.search(r"<script|<link|<iframe|<img|@import|url\((?!#)", html, re.I)  # url(#id): in-page clip
    assert not re.search(r"\b(?:src|href)\s*=\s*(?![\"']?#)", html, re.I)  # xlink:href="#m..": in-page markers
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")


def test_one_inline_svg_per_figure_with_every_alerted_stream_charted(store, report):
    url, _ = store
    info, html = report
    with session_factory(url)() as s:
        alerts = s.scalars(select(AlertRow)).all()
    streams = {(a.model, a.metric, a.site, a.subgroup) for a in alerts}
    models = {a.model for a in alerts}
    assert html.count("<svg") == info.figures == len(streams) + 2  # one per alerted stream + a grid per device
    assert len(re.findall(r"<b>Figure \d+\.</b>", html)) == info.figures
    for a in alerts:
        assert f"{a.metric} · site {a.site} · subgroup {a.subgroup}" in html  # the chart title and caption
        assert f"{a.metric} · {a.site} · {a.subgroup}" in html  # the alerts table
        assert a.id in html
    assert info.alerts == len(alerts) and models <= {m.split("@")[0] for m in info.models}


def test_no_identifier_reaches_the_report(store, report):
    url, _ = store
    _, html = report
    with session_factory(url)() as s:
        rows = s.execute(select(CaseRow.subject, CaseRow.prediction_id, CaseRow.encounter)).all()
    identifiers = {v for row in rows for v in row if v}
    assert len(rows) > 1000 and all(re.fullmatch(r"[A-Za-z0-9]+", v) for v in identifiers)
    tokens = set(re.findall(r"[A-Za-z0-9]+", html))  # every maximal alphanumeric run: an id would be one of them
    assert tokens and identifiers.isdisjoint(tokens)


def test_decisions_are_shown_and_escaped(report):
    _, html = report
    assert "acknowledged by dr.safety" in html and "resolved by dr.safety" in html
    assert "alert.acknowledged" in html and "alert.resolved" in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; checked" in html
    assert "<script>" not in html


def test_reproduction_section_names_config_hash_code_version_inputs_and_commands(store, report):
    url, out = store
    _, html = report
    with session_factory(url)() as s:
        run = s.scalars(select(RunRow)).one()
    assert run.config_hash in html and run.code_version in html
    assert str(out / "feeds" / "scanner-upgrade") in html
    assert "vigil ingest" in html and "vigil audit verify" in html and "vigil report --out" in html
    assert "Audit log intact" in html
    assert f"has hash {run.config_hash}, the same as every run" in html  # the report's config is the run's
    assert "C2" in html and "WITHIN_PCCP_IMPLEMENT_PER_PROTOCOL" in html  # the scanner ticket's category


def test_period_filter_drops_alerts_outside_it(store, tmp_path):
    url, _ = store
    info = build_report(url, tmp_path / "early.html", model="cta-stenosis",
                        until=datetime(2026, 3, 1, tzinfo=UTC))
    html = info.path.read_text()
    assert info.alerts == 0 and info.models == ["cta-stenosis@2.1.0"]
    assert "aki-risk" not in html and "--until 2026-03-01T00:00:00+00:00" in html


def test_unknown_model_and_naive_dates_are_clear_errors(store, tmp_path):
    url, _ = store
    with pytest.raises(ValueError, match=r"model 'nope' has no data .*models there: aki-risk, cta-stenosis"):
        build_report(url, tmp_path / "x.html", model="nope")
    with pytest.raises(ValueError, match="no time zone"):
        build_report(url, tmp_path / "x.html", since=datetime(2026, 1, 1))


CHROMIUM = chromium_binary()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed; CI installs it with "
                                                              "scripts/ensure-debs.sh (Debian package `chromium`)")


@needs_chromium
def test_report_renders_in_headless_chromium_with_its_charts(report, tmp_path):
    info, _ = report
    shot = tmp_path / "report.png"
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                           f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars",
                           info.path.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    pixels = mpimg.imread(shot)[..., :3]  # floats in 0..1
    assert pixels.shape[:2] == (2000, 1280)
    non_white = (pixels < 0.94).any(axis=-1).sum()
    assert non_white > 0.03 * 1280 * 2000, f"only {non_white} non-white pixels: the page looks blank"
    # Chart lines are saturated colours; the page's own text and tables are black, grey or pale. Measured with this
    # report: about 16,000 such pixels with its SVGs, 3,500 with the SVGs removed (the heading rule, coloured notes).
    saturated = (pixels.max(axis=-1) - pixels.min(axis=-1) > 0.25).sum()
    assert saturated > 8000, f"{saturated} coloured pixels: the SVG charts did not render"


@needs_chromium
def test_pdf_is_printed_by_chromium(report, tmp_path):
    info, _ = report
    pdf = print_pdf(info.path, tmp_path / "report.pdf")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-") and len(data) > 50_000


def test_report_command_writes_the_file_and_reports_json(store, tmp_path):
    import json

    import typer

    from vigil.cli_report import report as report_command

    url, _ = store
    cli = typer.Typer()
    cli.command("report")(report_command)
    cli.command("noop")(lambda: None)  # a group, so the command is addressed by name as on `vigil report`
    out = tmp_path / "cta.html"
    done = runner.invoke(cli, ["report", "--out", str(out), "--store", url, "--model", "cta-stenosis",
                               "--since", "2026-01-01", "--json"])
    assert done.exit_code == 0, done.output
    info = json.loads(done.stdout)
    assert info["path"] == str(out) and out.exists() and info["models"] == ["cta-stenosis@2.1.0"]
    assert info["since"].startswith("2026-01-01T00:00:00") and info["alerts"] >= 1
    bad = runner.invoke(cli, ["report", "--out", str(out), "--store", url, "--since", "March"])
    assert bad.exit_code == 2 and "is not a date" in bad.output
    missing = runner.invoke(cli, ["report", "--out", str(out), "--store", f"sqlite:///{tmp_path / 'none.db'}"])
    assert missing.exit_code == 2 and "no vigil store" in missing.output


@pytest.mark.postgres
def test_report_reads_a_postgresql_store(fresh_postgres_url, tmp_path):
    """Production stores are PostgreSQL: the report's queries run there too (rows written directly, no pipeline)."""
    from datetime import timedelta

    from vigil import audit
    from vigil.store import MetricPointRow, TicketRow, upgrade

    url = fresh_postgres_url
    upgrade(url)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    key = {"model": "cta-stenosis", "model_version": "2.1.0", "metric": "fnr", "site": "site-b"}
    with session_factory(url)() as s, s.begin():
        s.add(TicketRow(id="T-000001", model="cta-stenosis", model_version="2.1.0", category="C2", cause="scanner",
                        cause_confidence=0.7, remedy="retrain", rationale=[["R0", "finding", "S3"]]))
        s.flush()
        for subgroup in ("all", "sex=female"):
            for day in range(40):
                v = 0.15 if day < 25 else 0.4
                s.add(MetricPointRow(**key, subgroup=subgroup, period_start=t0 + timedelta(days=day), n=20, value=v,
                                     ci_low=v - 0.1, ci_high=v + 0.1, statistic=day / 8, threshold=4.0))
        s.add(AlertRow(id="A-000001", **key, subgroup="sex=female", detector="bernoulli_cusum", state="firing",
                       severity="critical", detected_at=t0 + timedelta(days=33), change_estimate=t0 + timedelta(days=25),
                       statistic=4.1, threshold=4.0, baseline=0.15, current=0.4, ci_low=0.3, ci_high=0.5,
                       n_baseline=500, n_current=160, last_fired_at=t0 + timedelta(days=33), ticket_id="T-000001"))
        s.add(RunRow(started_at=t0, finished_at=t0, config_hash="0123456789abcdef", code_version="0.1.0",
                     inputs=["feeds/site-b"]))
        audit.record(s, "dr.safety", "alert.acknowledged", "alert", "A-000001", {"comment": "scanner swap"})
    info = build_report(url, tmp_path / "pg.html")
    html = info.path.read_text()
    assert info.models == ["cta-stenosis@2.1.0"] and info.alerts == 1 and info.tickets == 1
    assert html.count("<svg") == info.figures == 2  # the alerted subgroup stream + the device grid
    assert "fnr · site site-b · subgroup sex=female" in html and "scanner swap" in html
    assert "0123456789abcdef" in html and "postgres@127.0.0.1" in html
