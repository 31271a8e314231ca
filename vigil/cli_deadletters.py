"""`vigil deadletters list|show|replay`: the rejected inputs, kept as evidence, and their re-injection once fixed.

Every rejected input is stored with its source, position (file:line or topic[partition]@offset) and reason, and with
a payload only once it is free of identifiers (DESIGN.md §Reliability). Replay (``vigil.replay``) sends those stored
payloads through the decoder and the pipeline again and marks each replayed dead letter in the hash-chained audit
log; ``--dry-run`` only reports what the current decoder makes of them. Dead-letter rows are never changed.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.table import Table
from sqlalchemy import select

from vigil.cli_common import JsonOpt, StoreOpt, console, err, existing_store, print_json
from vigil.domain import Position
from vigil.replay import NO_PAYLOAD, ReplayRefused, ReplayReport, Selection, replay, replayed_ids
from vigil.settings import DEFAULT_CONFIG, load_settings
from vigil.store import DeadLetterRow, session_factory, upgrade

deadletters_app = typer.Typer(help="Rejected inputs kept as evidence: list, show, replay into the pipeline once fixed.",
                              no_args_is_help=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Config YAML (models, subject key, de-id policy).")]


def _position(row: DeadLetterRow) -> str:
    return str(Position(row.source, row.position, row.partition))


def _summary(row: DeadLetterRow, replayed: dict[int, int]) -> dict:
    return {"id": row.id, "source": row.source, "partition": row.partition, "position": row.position,
            "where": _position(row), "reason": row.reason, "resource_type": row.resource_type,
            "resource_id": row.resource_id, "has_payload": row.payload is not None,
            "created_at": row.created_at.isoformat(), "replayed": row.id in replayed,
            "replay_audit_seq": replayed.get(row.id)}


@deadletters_app.command("list")
def deadletters_list(
    store: StoreOpt = None,
    source: Annotated[str | None, typer.Option(help="Only this source (file path or Kafka topic), exactly.")] = None,
    reason: Annotated[str | None, typer.Option(help="Only reasons containing this text (case-insensitive).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, oldest first.")] = 50,
    json: JsonOpt = False,
) -> None:
    """List dead letters: where each came from and why it was rejected."""
    url = existing_store(store)
    upgrade(url)
    query = select(DeadLetterRow).order_by(DeadLetterRow.id).limit(limit)
    if source is not None:
        query = query.where(DeadLetterRow.source == source)
    if reason:
        query = query.where(DeadLetterRow.reason.icontains(reason, autoescape=True))
    with session_factory(url)() as s:
        done = replayed_ids(s)
        rows = [_summary(r, done) for r in s.scalars(query)]
    if json:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} dead letters" + (f" (first {limit})" if len(rows) == limit else ""))
    for col in ("id", "where", "reason", "resource", "payload", "replayed"):
        table.add_column(col)
    for r in rows:
        resource = f"{r['resource_type']}/{r['resource_id']}" if r["resource_type"] else "-"
        table.add_row(str(r["id"]), r["where"], r["reason"], resource, "kept" if r["has_payload"] else "-",
                      f"yes (audit #{r['replay_audit_seq']})" if r["replayed"] else "-")
    console.print(table)


@deadletters_app.command("show")
def deadletters_show(dead_letter_id: Annotated[int, typer.Argument(metavar="ID")], store: StoreOpt = None,
                     json: JsonOpt = False) -> None:
    """One dead letter with its (identifier-free) payload."""
    url = existing_store(store)
    upgrade(url)
    with session_factory(url)() as s:
        row = s.get(DeadLetterRow, dead_letter_id)
        if row is None:
            raise typer.BadParameter(f"no dead letter {dead_letter_id} in {url} (list them with `vigil deadletters "
                                     "list`)", param_hint="ID")
        data = {**_summary(row, replayed_ids(s)), "payload": _parsed(row.payload)}
    if json:
        print_json(data)
        return
    for key, value in data.items():
        if key != "payload":
            console.print(f"[bold]{key:>13}[/] {value}")
    console.print("[bold]      payload[/] " + (orjson.dumps(data["payload"], option=orjson.OPT_INDENT_2).decode()
                                              if data["payload"] is not None else NO_PAYLOAD))


def _parsed(payload: str | None) -> object:
    if payload is None:
        return None
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload


@deadletters_app.command("replay")
def deadletters_replay(
    ids: Annotated[list[int] | None, typer.Argument(metavar="[IDS]...", help="Dead-letter ids to replay.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    source: Annotated[str | None, typer.Option(help="Replay the dead letters of this source (exact).")] = None,
    reason: Annotated[str | None, typer.Option(help="Replay those whose reason contains this text "
                                                    "(case-insensitive), e.g. 'unknown model'.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what the current decoder makes of them; "
                                                            "store nothing.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="With --dry-run: full FHIR validation first.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replay although the newest `vigil run` has not finished "
                                                        "(only if it was killed).")] = False,
    by: Annotated[str | None, typer.Option(help="Who replays (audit log); default: the OS user.")] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    store: StoreOpt = None,
    json: JsonOpt = False,
) -> None:
    """Re-inject dead letters, once their cause is fixed, into the pipeline state of the last `vigil run`.

    Each payload goes through the reader, the decoder and the pipeline again; the results, a "deadletter.replayed"
    audit entry per dead letter and the new pipeline checkpoint are stored in one transaction. A dead letter
    replayed before is skipped, one without a payload is reported as not replayable; dead letters themselves are
    never changed (they are evidence). Stop `vigil run` first.
    """
    if strict and not dry_run:
        raise typer.BadParameter("--strict applies to --dry-run only (a replay decodes as the service does)",
                                 param_hint="--strict")
    try:
        selection = Selection(ids=ids or (), source=source, reason=reason, all=all_)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="IDS") from None
    url = existing_store(store)
    settings = load_settings(config, store_url=url)
    try:
        report = replay(url, settings, selection, by or getpass.getuser(), dry_run=dry_run, strict=strict,
                        force=force)
    except ReplayRefused as exc:
        err.print(f"[red]replay refused:[/] {exc}")
        raise typer.Exit(1) from None
    refused = report.selected > 0 and len(report.entries["not_replayable"]) == report.selected
    if json:
        print_json(report.as_dict())
    else:
        _print_report(report)
    if refused:
        raise typer.Exit(1)


_STYLES = {"replayed": "green", "still_rejected": "red", "ignored": "yellow", "not_replayable": "dim",
           "already_replayed": "cyan"}


def _print_report(report: ReplayReport) -> None:
    verb = "Would replay" if report.dry_run else "Replayed"
    table = Table(title=f"{verb} {len(report.entries['replayed'])} of {report.selected} dead letters "
                        f"({report.checkpoint})")
    for col in ("id", "where", "now", "detail"):
        table.add_column(col, overflow="fold")
    for outcome, entries in report.entries.items():
        label = "would replay" if report.dry_run and outcome == "replayed" else outcome.replace("_", " ")
        for e in entries:
            table.add_row(str(e["id"]), e["where"], f"[{_STYLES[outcome]}]{label}[/]", e["detail"])
    console.print(table)
    n = {k: len(v) for k, v in report.entries.items()}
    console.print(f"{n['replayed']} {'would be ' if report.dry_run else ''}re-injected, {n['still_rejected']} still "
                  f"rejected, {n['ignored']} of types vigil does not use, {n['not_replayable']} not replayable "
                  f"(no payload), {n['already_replayed']} replayed before"
                  + (f"; {report.duplicates} records were already counted (duplicates)" if report.duplicates else "")
                  + ("." if report.dry_run else ". Recorded in the audit log."))
