"""The `vigil` command line (DESIGN.md §Contracts). Every listing command has ``--json``; every command ``--store``."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vigil import audit
from vigil.cli_common import ConfigOpt, JsonOpt, StoreOpt, console, err, existing_store, print_json, store_url
from vigil.settings import DEFAULT_CONFIG, Settings, load_settings
from vigil.store import session_factory, upgrade
from vigil.store_outage import SourceCannotRewind, StoreUnavailable

app = typer.Typer(help="vigil: post-market performance monitoring for AI medical devices.", no_args_is_help=True)


@app.callback()
def _logging(
    log_format: Annotated[str, typer.Option("--log-format", envvar="VIGIL_LOG_FORMAT",
                                            help="text, or json: one JSON object per line, for log shippers.")
                          ] = "text",
    log_level: Annotated[str, typer.Option("--log-level-root", envvar="VIGIL_LOG_LEVEL",
                                           help="Level of vigil's own log (debug, info, warning, error).")] = "warning",
) -> None:
    """vigil: post-market performance monitoring for AI medical devices."""
    if log_format not in ("text", "json"):
        raise typer.BadParameter(f"--log-format is text or json, got {log_format!r}", param_hint="--log-format")
    if log_format == "json":
        from vigil.observability import configure_json_logging

        configure_json_logging(log_level)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
dashboards_app = typer.Typer(help="Grafana dashboards built from code.", no_args_is_help=True)
db_app = typer.Typer(help="The store's schema.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(dashboards_app, name="dashboards")
app.add_typer(db_app, name="db")



def _settings(config: Path = DEFAULT_CONFIG, store: str | None = None) -> Settings:
    return load_settings(config, store_url=store)


# --- demo, simulate, ingest, run ---------------------------------------------------------------------------


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where to write summary.json, the feeds, stores and dashboards.")] = Path(
        "demo-out"),
    seed: int = 7,
    days: int = 180,
    volume: Annotated[float, typer.Option(help="Scale the simulated volume (1.0 = 30-40 predictions/day/site).")] = 1.0,
    scenario: Annotated[list[str] | None, typer.Option(help="Run only these scenarios (repeatable).")] = None,
    json: JsonOpt = False,
) -> None:
    """Simulate every scenario, run the whole pipeline in-process on SQLite, and show what was found next to the truth."""
    from dashboards.build import write_dashboards
    from vigil.demo import run_demo
    from vigil.simulator import SCENARIOS

    chosen = scenario or list(SCENARIOS)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                  disable=json) as progress:
        task = progress.add_task("demo", total=len(chosen) * 2 + 1)
        try:
            summary = run_demo(out, seed=seed, days=days, volume=volume, scenarios=chosen,
                               on_step=lambda msg: progress.update(task, advance=1, description=msg))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--scenario") from None
    written = write_dashboards(out / "dashboards")
    if json:
        print_json(summary)
        return
    _show_demo(summary)
    console.print(f"\nWrote [bold]{out / 'summary.json'}[/], the surveillance report [bold]{out / 'report.html'}[/], "
                  f"{len(written)} Grafana dashboards in {out / 'dashboards'}, and one SQLite store per scenario in "
                  f"{out / 'stores'}.")


def _show_demo(summary: dict) -> None:
    table = Table(title="What vigil found, next to the injected truth")
    for col in ("scenario", "injected change", "first alert", "delay", "ticket (expected)", "false alarms"):
        table.add_column(col)
    for ev in summary["evaluation"]:
        false = f"[{'red' if ev['false_alarms'] else 'green'}]{ev['false_alarms']}[/] of {ev['alerts']}"
        if "change_time" not in ev:
            table.add_row(ev["scenario"], "none", "-", "-", "-", false)
            continue
        where = f"{ev['detected_where']} {ev['detected_at'][5:10]}" if ev["detected"] else "[red]not detected[/]"
        ok = "green" if ev["category_ok"] else "red"
        table.add_row(ev["scenario"], f"{ev['model']} {ev['site']}/{ev['subgroup']} {ev['change_time'][5:10]}",
                      where, f"{ev['delay_days']:.0f} d" if ev["detected"] else "-",
                      f"[{ok}]{', '.join(ev['ticket_categories']) or 'none'}[/] ({ev['expected_category']})", false)
    console.print(table)
    seconds = sum(ev["seconds"] for ev in summary["evaluation"])
    cases = sum(ev["cases"] for ev in summary["evaluation"])
    console.print(f"{cases} labeled cases from {len(summary['evaluation'])} feeds in {seconds:.0f} s of pipeline time.")
    tickets = Table(title="Retraining tickets")
    for col in ("scenario", "model", "PCCP", "cause", "remedy", "mod", "alerts"):
        tickets.add_column(col)
    for t in summary["tickets"]:
        tickets.add_row(t["scenario"], t["model"], t["category"] + (" + U" if t["safety_overlay"] else ""),
                        t["cause"], t["remedy"], t["matched_mod"] or "-", str(len(t["alert_ids"])))
    console.print(tickets)
    console.print("PCCP: C1 data-quality fix, no model change · C2 within the plan, run its protocol · "
                  "U urgent safety overlay (MDR/806 evaluation)")


@app.command()
def publish(
    paths: Annotated[list[Path], typer.Argument(help="NDJSON files or directories (e.g. from `vigil simulate`).")],
    bootstrap: Annotated[str, typer.Option(help="Kafka brokers, host:port[,host:port].")] = "localhost:9092",
    topic: Annotated[str, typer.Option(help="The FHIR topic stage 1 consumes.")] = "fhir.outcomes",
    json: JsonOpt = False,
) -> None:
    """Send a FHIR feed to Kafka as stage 1 needs it: in arrival order, each resource in its patient's partition,
    resources about no patient (Device, Organization) and the feed clock to every partition."""
    import orjson

    from vigil.keyed_feed import in_arrival_order
    from vigil.keyed_feed import publish as send

    files = [f for p in paths for f in (sorted(p.glob("*.ndjson")) if p.is_dir() else [p])]
    if not files:
        raise typer.BadParameter(f"no .ndjson files in {', '.join(map(str, paths))}", param_hint="PATHS")
    resources = []
    for f in files:
        for n, line in enumerate(f.read_bytes().splitlines(), start=1):
            if line.strip():
                try:
                    resources.append(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    raise typer.BadParameter(f"{f}:{n}: not JSON ({exc})", param_hint="PATHS") from None
    sent = send(in_arrival_order(resources), [b.strip() for b in bootstrap.split(",") if b.strip()], topic)
    if json:
        print_json({"topic": topic, "resources": len(resources), "records": sent})
    else:
        console.print(f"{len(resources)} resources as {sent} records to {topic}")


@app.command()
def simulate(
    scenario: Annotated[str, typer.Option(help="stable | scanner-upgrade | mapping-break | population-shift | "
                                               "subgroup-decay")],
    out: Annotated[Path, typer.Option(help="Directory for the NDJSON feed and ground_truth.json.")],
    seed: int = 7,
    days: int = 180,
    volume: float = 1.0,
    change_day: int = 100,
    json: JsonOpt = False,
) -> None:
    """Write a synthetic multi-site FHIR feed (bulk-export NDJSON) and its ground truth."""
    from vigil.simulator import simulate as run

    try:
        truth = run(scenario, out, seed=seed, days=days, volume=volume, change_day=change_day)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--scenario") from None
    if json:
        print_json(truth.to_dict())
    else:
        console.print(f"Wrote the [bold]{scenario}[/] feed to {out} ({len(truth.changes)} injected change(s)).")


def _run_pipeline(paths: list[Path], settings: Settings, json: bool) -> None:
    from vigil.persist import persist
    from vigil.pipeline import Pipeline

    _warn_demo_key(settings)
    started = datetime.now(UTC)
    pipeline = Pipeline(settings)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, disable=json) as progress:
        task = progress.add_task("processing events", total=None)
        result = pipeline.run_paths(paths, progress=lambda i, n: progress.update(task, completed=i, total=n))
    persist(result, settings, [str(p) for p in paths], started)
    report = {
        "accepted": dict(result.accepted), "rejected": dict(result.rejected), "ignored": dict(result.ignored),
        "duplicates": dict(result.duplicates), "identifier_elements_stripped": dict(result.stripped),
        "cases": len(result.cases), "alerts": len(result.alerts.alerts), "tickets": len(result.tickets),
        "corrections": dict(result.corrections),
        "unmapped_codes": [{"site": site, "system": system, "code": code, "count": n}
                           for (site, system, code), n in sorted(result.unmapped.items())],
        "terminology_unavailable": [{"site": site, "system": system, "count": n}
                                    for (site, system), n in sorted(result.terminology_unavailable.items())],
        "dead_letters": [{"position": str(d.position), "reason": d.reason} for d in result.dead_letters[:50]],
    }
    if json:
        print_json(report)
        _fail_on_missing_inputs(result)
        return
    table = Table(title=f"Ingested into {settings.store_url}")
    table.add_column("")
    table.add_column("resource type / reason")
    table.add_column("count", justify="right")
    for label, counter in (("accepted", result.accepted), ("rejected", result.rejected),
                           ("ignored", result.ignored), ("duplicate", result.duplicates)):
        for key, n in sorted(counter.items()):
            table.add_row(label, key, str(n))
    console.print(table)
    for d in result.dead_letters[:20]:
        err.print(f"[yellow]rejected[/] {d.position}: {d.reason}")
    if len(result.dead_letters) > 20:
        err.print(f"... and {len(result.dead_letters) - 20} more (vigil stores them all as dead letters)")
    console.print(f"{len(result.cases)} cases labeled, {len(result.alerts.alerts)} alerts, "
                  f"{len(result.tickets)} tickets.")
    _fail_on_missing_inputs(result)


def _warn_demo_key(settings: Settings) -> None:
    if settings.subject_key == Settings.model_fields["subject_key"].default:
        err.print("[yellow]warning[/]: subjects are keyed with the public demo key; set VIGIL_SUBJECT_KEY to a secret "
                  "before ingesting real data, or the pseudonyms can be reversed")


def _fail_on_missing_inputs(result) -> None:
    """The other inputs were stored; a path that does not exist still makes the command fail, for scripts."""
    if result.rejected.get("file not found"):
        err.print(f"[red]error[/]: {result.rejected['file not found']} input path(s) not found (see above)")
        raise typer.Exit(2)


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="NDJSON files, Bundles, or bulk-export directories.")],
    config: ConfigOpt = DEFAULT_CONFIG,
    store: StoreOpt = None,
    json: JsonOpt = False,
) -> None:
    """One-shot load: decode, validate and de-identify, dead-letter bad input, run the flow, store the results."""
    _run_pipeline(paths, _settings(config, store), json)


@app.command()
def run(
    config: ConfigOpt = DEFAULT_CONFIG,
    store: StoreOpt = None,
    once: Annotated[bool, typer.Option("--once", help="Stop when every source is exhausted (files: after reading).")
                    ] = False,
    commit_every: Annotated[float, typer.Option(help="Seconds between stores of results, offsets and state.")] = 5.0,
    stage: Annotated[str | None, typer.Option(
        "--stage", help="Run one stage of the two-stage deployment: 'cases' (the Kafka source → label join → the "
                        "cases topic) or 'monitor' (the cases topic → streams, detectors, alerts, tickets). Start "
                        "any number of processes per stage; they share the stage's consumer group.")] = None,
    json: JsonOpt = False,
) -> None:
    """The service: consume the configured sources until stopped (Ctrl-C), storing results, offsets and the pipeline
    state in one transaction, so a restart resumes exactly where the store ends. File sources are read once."""
    from vigil.feeds import stream_sources
    from vigil.service import Service

    settings = _settings(config, store)
    if stage is not None:
        _run_stage(settings, stage, once, commit_every, json)
        return
    paths = [p for src in settings.sources if src.kind == "files" for p in src.paths]
    streams = [src for src in settings.sources if src.kind != "files"]
    if not settings.sources:
        raise typer.BadParameter(f"no sources configured in {config} (sources: [{{kind: files, paths: [...]}}], "
                                 "or kafka / fhir-rest / fhir-bulk-export / bulk-directory)", param_hint="--config")
    if paths and streams:
        raise typer.BadParameter("file sources are read whole and sorted, stream sources consumed as they come: "
                                 "configure one or the other per `vigil run`", param_hint="--config")
    if settings.ticket_feed is not None:  # tickets opened by this run are queued for the feed (`vigil serve` sends)
        from vigil.ticket_feed import publish_ticket_events

        publish_ticket_events(settings.ticket_feed)
    if paths:
        _run_pipeline(paths, settings, json)
        return
    _warn_demo_key(settings)
    factory = session_factory(settings.store_url)
    sources = stream_sources(settings, factory)
    if not sources:
        raise typer.BadParameter("only fhir-subscription sources are configured: `vigil serve` receives them and "
                                 "forwards their resources to their forward_topic; add a kafka source on that topic",
                                 param_hint="--config")
    service = Service(settings, sources, commit_every=commit_every, retry=settings.store_retry)
    if not json:
        err.print(f"vigil run: consuming {', '.join(s.name for s in sources)} into {settings.store_url} "
                  "(Ctrl-C stops after storing what was read)")
    try:
        report = service.run(once=once)
    except KeyboardInterrupt:  # the final commit did not run; the last stored transaction is where a restart resumes
        err.print("[yellow]stopped[/]: a restart resumes after the last stored batch")
        raise typer.Exit(130) from None
    except (SourceCannotRewind, StoreUnavailable) as exc:  # the store went away: a restart resumes from it
        err.print(f"[red]vigil run stopped[/]: {exc}")
        raise typer.Exit(75) from None  # EX_TEMPFAIL: a supervisor should start it again
    finally:
        factory.kw["bind"].dispose()
    summary = {"restored": report.restored, "messages": report.messages, "commits": report.commits,
               "checkpoint_bytes": report.checkpoint_bytes, "run_id": report.run_id, "outages": report.outages,
               "outage_seconds": round(report.outage_seconds, 3), "reread": report.reread}
    if json:
        print_json(summary)
    else:
        console.print(f"{report.messages} messages in {report.commits} commits; {report.restored}")


def _run_stage(settings, stage: str, once: bool, commit_every: float, json: bool) -> None:
    from vigil.stages import StageWorker

    try:
        worker = StageWorker(settings, stage, commit_every=commit_every)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--stage") from None
    _warn_demo_key(settings)
    if not json:
        err.print(f"vigil run --stage {stage}: consuming {', '.join(worker.config.topics)} in group "
                  f"{worker.config.group_id} into {settings.store_url} (Ctrl-C stops after storing what was read)")
    try:
        report = worker.run(once=once)
    except KeyboardInterrupt:
        err.print("[yellow]stopped[/]: a restart resumes after the last stored batch")
        raise typer.Exit(130) from None
    summary = {"stage": stage, "messages": report.messages, "commits": report.commits, "outages": report.outages,
               "published": report.published, "partitions": report.assigned, "restored": report.restored}
    if json:
        print_json(summary)
    else:
        console.print(f"{report.messages} messages in {report.commits} commits; partitions held at the end: "
                      f"{', '.join(report.assigned) or 'none'}")


# --- alerts and tickets ------------------------------------------------------------------------------------


@audit_app.command("verify")
def audit_verify(store: StoreOpt = None, json: JsonOpt = False) -> None:
    """Check the hash chain; name the first record that was edited, removed or reordered."""
    url = existing_store(store)
    upgrade(url)
    with session_factory(url)() as s:
        result = audit.verify(s)
    if json:
        print_json({"ok": result.ok, "checked": result.checked, "first_bad_seq": result.first_bad_seq,
                     "reason": result.reason, "head_hash": result.head_hash})
    elif result.ok:
        console.print(f"[green]audit log intact[/]: {result.checked} records verified; head {result.head_hash} "
                      "(keep it elsewhere to detect truncation)")
    else:
        console.print(f"[red]audit log broken at seq {result.first_bad_seq}[/]: {result.reason}")
    raise typer.Exit(0 if result.ok else 1)


@dashboards_app.command("build")
def dashboards_build(out: Annotated[Path, typer.Option(help="Directory for the dashboard JSON files.")]) -> None:
    """Write the Grafana dashboards (JSON models) for provisioning."""
    from dashboards.build import write_dashboards

    for path in write_dashboards(out):
        console.print(f"wrote {path}")


@db_app.command("upgrade")
def db_upgrade(store: StoreOpt = None) -> None:
    """Create or migrate the store's schema (Alembic)."""
    url = store_url(store)
    upgrade(url)
    console.print(f"{url} is at the latest schema")


def _mount_subcommands() -> None:
    """Sub-apps live in their own modules (they import ``vigil.cli_common``, not this module)."""
    from vigil.cli_alerts import alerts_app
    from vigil.cli_calibrate import calibrate_app
    from vigil.cli_deadletters import deadletters_app
    from vigil.cli_report import dashboards_push, report
    from vigil.cli_serve import mount as mount_serve
    from vigil.cli_tickets import tickets_app

    app.add_typer(alerts_app, name="alerts")
    app.add_typer(tickets_app, name="tickets")
    app.add_typer(deadletters_app, name="deadletters")
    app.add_typer(calibrate_app, name="calibrate", help="Thresholds from a target ARL0, and ARLs, computed exactly.")
    mount_serve(app)
    app.command("report")(report)
    dashboards_app.command("push")(dashboards_push)


_mount_subcommands()
