"""`vigil tickets ...`: retraining tickets, their PCCP category, lifecycle, dataset manifest and FHIR Task export.

Mounted by ``vigil.cli`` as ``app.add_typer(tickets_app, name="tickets")``. Every listing has ``--json``; every
command takes ``--store`` (env ``VIGIL_STORE_URL``). Changes go through ``vigil.ticket_actions`` so each is written
with its audit record in one transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy import select

from retrain_trigger.fhir_task import ticket_to_task, validate_task
from retrain_trigger.lifecycle import acceptance_criteria, deployable
from retrain_trigger.manifest import ManifestError, build_manifest, verify_manifest
from retrain_trigger.pccp import PccpError
from vigil import ticket_actions
from vigil.cli_common import ConfigOpt, JsonOpt, StoreOpt, console, err, existing_store, print_json
from vigil.settings import DEFAULT_CONFIG, Settings, load_settings
from vigil.store import TicketRow, session_factory, upgrade
from vigil.ticket_actions import TicketLifecycleError, TicketNotFound

tickets_app = typer.Typer(help="Retraining tickets and their PCCP category.", no_args_is_help=True)

ByOpt = Annotated[str, typer.Option("--by", help="Who does this (recorded in the audit log).")]


def _ticket_dict(t: TicketRow, full: bool = False) -> dict:
    d = {c.key: (v.isoformat() if isinstance(v := getattr(t, c.key), datetime) else v)
         for c in TicketRow.__table__.columns
         if full or c.key not in ("rationale", "required_actions", "evidence", "acceptance")}
    d["alert_ids"] = [a.id for a in t.alerts]
    d["deployable"] = deployable(t)
    return d


def _not_found(ticket_id: str, url: str) -> typer.BadParameter:
    return typer.BadParameter(f"no ticket {ticket_id} in {url} (list them with `vigil tickets list`)",
                              param_hint="TICKET_ID")


def _get(session, ticket_id: str, url: str) -> TicketRow:
    try:
        return ticket_actions.get(session, ticket_id)
    except TicketNotFound:
        raise _not_found(ticket_id, url) from None


def _act(store: str | None, ticket_id: str, action, *args, **kwargs) -> dict:
    """Run one ticket action in its own transaction; lifecycle errors become usage errors naming the ticket."""
    url = existing_store(store)
    try:
        with session_factory(url)() as s, s.begin():
            row = action(s, *args, **kwargs)
            return _ticket_dict(row, full=True)
    except TicketNotFound:
        raise _not_found(ticket_id, url) from None
    except PccpError as exc:  # the configured PCCP file is missing or invalid
        raise typer.BadParameter(str(exc), param_hint="--config") from None
    except TicketLifecycleError as exc:
        raise typer.BadParameter(str(exc), param_hint="TICKET_ID") from None


def _settings(config: Path, store: str | None) -> Settings:
    return load_settings(config, store_url=store)


# --- reading -----------------------------------------------------------------------------------------------


@tickets_app.command("list")
def tickets_list(
    store: StoreOpt = None,
    status: Annotated[str | None, typer.Option(help="open | in_progress | acceptance_recorded | closed")] = None,
    category: Annotated[str | None, typer.Option(help="C0 | C1 | C2 | C2-F | C3 | C4 | C5")] = None,
    json: JsonOpt = False,
) -> None:
    """List retraining tickets with their PCCP category."""
    url = existing_store(store)
    upgrade(url)
    with session_factory(url)() as s:
        q = select(TicketRow).order_by(TicketRow.id)
        if status:
            q = q.where(TicketRow.status == status)
        if category:
            q = q.where(TicketRow.category == category)
        data = [_ticket_dict(t) for t in s.scalars(q).all()]
    if json:
        print_json(data)
        return
    table = Table(title=f"{len(data)} tickets")
    for col in ("id", "status", "model", "category", "U", "cause", "confidence", "remedy", "PCCP mod", "alerts"):
        table.add_column(col)
    for t in data:
        table.add_row(t["id"], t["status"], f"{t['model']}@{t['model_version']}", t["category"],
                      "U" if t["safety_overlay"] else "", t["cause"], f"{t['cause_confidence']:.2f}", t["remedy"],
                      t["matched_mod"] or "-", ", ".join(t["alert_ids"]))
    console.print(table)


@tickets_app.command("show")
def tickets_show(ticket_id: str, store: StoreOpt = None, json: JsonOpt = False) -> None:
    """One ticket: category, the rule trace with citations, required actions and evidence."""
    url = existing_store(store)
    with session_factory(url)() as s:
        d = _ticket_dict(_get(s, ticket_id, url), full=True)
    if json:
        print_json(d)
        return
    _show(d)


def _show(d: dict) -> None:
    console.print(f"[bold]{d['id']}[/] {d['model']}@{d['model_version']}  category [bold]{d['category']}[/]"
                  f"{'  + U (urgent safety overlay)' if d['safety_overlay'] else ''}  status {d['status']}")
    console.print(f"cause {d['cause']} (confidence {d['cause_confidence']:.2f}); remedy {d['remedy']}; "
                  f"PCCP modification {d['matched_mod'] or '-'}; alerts {', '.join(d['alert_ids'])}")
    rules = Table(title="Rule trace")
    for col in ("rule", "finding", "citation"):
        rules.add_column(col)
    for row in d["rationale"]:
        rules.add_row(*[escape(str(x)) for x in row])
    console.print(rules)
    for action in d["required_actions"]:
        console.print(f"  • {escape(action)}")
    a = d.get("acceptance")
    if a:
        verdict = "[green]passed[/]" if a["passed"] else f"[red]failed[/]: {escape('; '.join(a['failed_criteria']))}"
        console.print(f"acceptance ({a['mod_id']}): {verdict} — evidence {escape(a['evidence_ref'])}, recorded by "
                      f"{escape(a['recorded_by'])} at {a['recorded_at']}")
    console.print(f"deployable: {'[green]yes[/]' if d['deployable'] else 'no'}")


class ExportFormat(str, Enum):
    json = "json"
    fhir_task = "fhir-task"


@tickets_app.command("export")
def tickets_export(
    out: Annotated[Path, typer.Option(help="File to write.")],
    ticket_ids: Annotated[list[str] | None, typer.Argument(help="Tickets to export (default: all).")] = None,
    format: Annotated[ExportFormat, typer.Option("--format", help="json: the tickets with full evidence; "
                                                 "fhir-task: FHIR R4 Task (one id) or a collection Bundle of Tasks"
                                                 )] = ExportFormat.json,
    store: StoreOpt = None,
) -> None:
    """Export tickets with their full evidence, for Regulatory Affairs, an inspector, or a FHIR work queue."""
    url = existing_store(store)
    with session_factory(url)() as s:
        rows = ([_get(s, i, url) for i in ticket_ids] if ticket_ids
                else list(s.scalars(select(TicketRow).order_by(TicketRow.id))))
        if format is ExportFormat.json:
            data: Any = [_ticket_dict(t, full=True) for t in rows]
        else:
            tasks = [ticket_to_task(t) for t in rows]
            data = tasks[0] if ticket_ids and len(tasks) == 1 else _bundle(tasks)
    out.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    what = "FHIR Task" if format is ExportFormat.fhir_task else "ticket"
    console.print(f"Wrote {len(rows)} {what}{'s' if len(rows) != 1 else ''} to {out}")


def _bundle(tasks: list[dict]) -> dict:
    from fhir.resources.R4B.bundle import Bundle

    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"fullUrl": f"urn:vigil:ticket:{t['id']}", "resource": t} for t in tasks]}
    Bundle.model_validate(bundle)
    for t in tasks:
        validate_task(t, t["id"])
    return bundle


# --- lifecycle -----------------------------------------------------------------------------------------------


def _done(d: dict, json: bool, message: str) -> None:
    if json:
        print_json(d)
    else:
        console.print(escape(message))


@tickets_app.command("start")
def tickets_start(ticket_id: str, by: ByOpt, store: StoreOpt = None, json: JsonOpt = False) -> None:
    """open → in_progress: take the ticket (run the Modification Protocol, or fix the pipeline)."""
    d = _act(store, ticket_id, ticket_actions.start, ticket_id, by)
    _done(d, json, f"{ticket_id}: open → in_progress by {by}")


@tickets_app.command("accept")
def tickets_accept(
    ticket_id: str,
    by: ByOpt,
    passed: Annotated[bool, typer.Option("--passed/--failed", help="The Modification Protocol's verdict.")],
    results: Annotated[Path, typer.Option(help='JSON file: {"criterion": value or {"value": v, "passed": bool}}; '
                                               "`vigil tickets criteria ID` lists the criteria.")],
    evidence: Annotated[str, typer.Option(help="Reference to the test report (document id or URL).")],
    config: ConfigOpt = DEFAULT_CONFIG,
    store: StoreOpt = None,
    json: JsonOpt = False,
) -> None:
    """in_progress → acceptance_recorded: pass keeps the ticket C2, fail makes it C2-F (do not implement)."""
    try:
        data = orjson.loads(results.read_bytes())
    except FileNotFoundError:
        raise typer.BadParameter(f"results file {results} not found", param_hint="--results") from None
    except orjson.JSONDecodeError as exc:
        raise typer.BadParameter(f"results file {results} is not valid JSON: {exc}", param_hint="--results") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"results file {results} must hold a JSON object of criterion → result",
                                 param_hint="--results")
    settings = _settings(config, store)
    d = _act(store, ticket_id, ticket_actions.record_acceptance, settings, ticket_id, by, passed=passed,
             results=data, evidence_ref=evidence)
    _done(d, json, f"{ticket_id}: acceptance {'passed' if passed else 'failed'} → {d['category']} "
                   f"(deployable: {'yes' if d['deployable'] else 'no'}) recorded by {by}")


@tickets_app.command("criteria")
def tickets_criteria(ticket_id: str, config: ConfigOpt = DEFAULT_CONFIG, store: StoreOpt = None,
                     json: JsonOpt = False) -> None:
    """The acceptance criteria of the ticket's matched PCCP modification (the keys of `accept --results`)."""
    url = existing_store(store)
    settings = _settings(config, store)
    with session_factory(url)() as s:
        row = _get(s, ticket_id, url)
        if row.matched_mod is None:
            raise typer.BadParameter(f"ticket {ticket_id} matched no PCCP modification ({row.category}): it has no "
                                     "acceptance criteria", param_hint="TICKET_ID")
        try:
            keys = acceptance_criteria(ticket_actions.pccp_for(settings, row).modification(row.matched_mod))
        except (TicketLifecycleError, PccpError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--config") from None
    if json:
        print_json(keys)
        return
    for key in keys:
        console.print(escape(key))


@tickets_app.command("close")
def tickets_close(
    ticket_id: str,
    by: ByOpt,
    comment: Annotated[str, typer.Option(help="What was done, or why nothing is (kept on the ticket).")],
    store: StoreOpt = None,
    json: JsonOpt = False,
) -> None:
    """Close the ticket (from open, in_progress or acceptance_recorded)."""
    d = _act(store, ticket_id, ticket_actions.close, ticket_id, by, comment)
    _done(d, json, f"{ticket_id}: closed by {by} ({d['category']}, deployable: {'yes' if d['deployable'] else 'no'})")


@tickets_app.command("reclassify")
def tickets_reclassify(
    ticket_id: str,
    remedy: Annotated[str, typer.Option(help="The remedy the engineer proposes, e.g. retrain_same_arch_new_data.")],
    by: ByOpt,
    config: ConfigOpt = DEFAULT_CONFIG,
    store: StoreOpt = None,
    json: JsonOpt = False,
) -> None:
    """Classify the ticket's evidence again with another remedy, against the model's PCCP from the config."""
    settings = _settings(config, store)
    d = _act(store, ticket_id, ticket_actions.reclassify, settings, ticket_id, by, remedy)
    if json:
        print_json(d)
        return
    console.print(f"{ticket_id}: remedy {remedy} → category [bold]{d['category']}[/]"
                  f"{' + U' if d['safety_overlay'] else ''}, modification {d['matched_mod'] or '-'}")
    _show(d)


# --- data lineage --------------------------------------------------------------------------------------------


@tickets_app.command("manifest")
def tickets_manifest(
    ticket_id: str,
    out: Annotated[Path, typer.Option(help="JSON file for the dataset manifest.")],
    by: Annotated[str | None, typer.Option("--by", help="Record the manifest hash on the ticket, as this person."
                                           )] = None,
    start: Annotated[datetime | None, typer.Option(help="Window start (ISO 8601, UTC if no offset); default: the "
                                                        "ticket's data window.")] = None,
    end: Annotated[datetime | None, typer.Option(help="Window end; default: the ticket's data window.")] = None,
    site: Annotated[list[str] | None, typer.Option(help="Sites (repeatable); default: the ticket's data sources."
                                                   )] = None,
    store: StoreOpt = None,
    json: JsonOpt = False,
) -> None:
    """Write the dataset manifest of the ticket (case ids, window, sources, SHA-256) for reproducible retraining."""
    url = existing_store(store)
    start, end = (t if t is None or t.tzinfo else t.replace(tzinfo=UTC) for t in (start, end))
    try:
        with session_factory(url)() as s, s.begin():
            manifest = build_manifest(s, _get(s, ticket_id, url), start=start, end=end, sites=site or None)
            if by:
                ticket_actions.attach_manifest(s, ticket_id, by, manifest)
    except (ManifestError, TicketLifecycleError) as exc:
        raise typer.BadParameter(str(exc), param_hint="TICKET_ID") from None
    out.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    summary = {k: manifest[k] for k in ("ticket_id", "case_count", "data_window", "sites")}
    summary["sha256"] = manifest["content_hash"]["sha256"]
    _done(summary, json, f"Wrote the manifest of {ticket_id} to {out}: {manifest['case_count']} cases, sha256 "
                         f"{summary['sha256']}{' (recorded on the ticket)' if by else ''}")


@tickets_app.command("verify-manifest")
def tickets_verify_manifest(manifest: Annotated[Path, typer.Argument(help="A manifest written by `manifest`.")],
                            store: StoreOpt = None, json: JsonOpt = False) -> None:
    """Recompute a manifest's content hash from the store; exit 1 and name the cases if anything changed."""
    url = existing_store(store)
    try:
        data = orjson.loads(manifest.read_bytes())
        with session_factory(url)() as s:
            check = verify_manifest(s, data)
    except (FileNotFoundError, orjson.JSONDecodeError, ManifestError) as exc:
        raise typer.BadParameter(f"{manifest}: {exc}", param_hint="MANIFEST") from None
    if json:
        print_json({"ok": check.ok, "expected": check.expected, "actual": check.actual, "missing": check.missing,
                     "changed": check.changed, "new_in_window": check.new_in_window})
    else:
        console.print(("[green]" if check.ok else "[red]") + escape(check.describe()) + "[/]")
    raise typer.Exit(0 if check.ok else 1)
