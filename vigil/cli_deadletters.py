"""`vigil deadletters list|show|replay`: the rejected inputs, kept as evidence, and what the current decoder makes of them.

Every rejected input is stored with its source, position (file:line or topic[partition]@offset) and reason, and with
a payload only once it is free of identifiers (DESIGN.md §Reliability). Replay re-decodes those stored payloads with
the current decoder and reports what is now accepted and what is still rejected; it changes no dead letter (they are
evidence: nothing is marked or deleted) and records the replay in the hash-chained audit log.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.table import Table
from sqlalchemy import select

from ingest import Decoder, SubjectKeyer, iter_message
from vigil import audit
from vigil.cli_common import JsonOpt, StoreOpt, console, existing_store, print_json
from vigil.domain import DeadLetter, Position
from vigil.settings import DEFAULT_CONFIG, load_settings
from vigil.store import DeadLetterRow, session_factory, upgrade

deadletters_app = typer.Typer(help="Rejected inputs kept as evidence: list, show, replay through the current decoder.",
                              no_args_is_help=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Config YAML (subject key, de-id policy).")]
NO_PAYLOAD = "no payload kept (it held identifiers, or was not readable as JSON): nothing to replay"


def _position(row: DeadLetterRow) -> str:
    return str(Position(row.source, row.position, row.partition))


def _summary(row: DeadLetterRow) -> dict:
    return {"id": row.id, "source": row.source, "partition": row.partition, "position": row.position,
            "where": _position(row), "reason": row.reason, "resource_type": row.resource_type,
            "resource_id": row.resource_id, "has_payload": row.payload is not None,
            "created_at": row.created_at.isoformat()}


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
        rows = [_summary(r) for r in s.scalars(query)]
    if json:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} dead letters" + (f" (first {limit})" if len(rows) == limit else ""))
    for col in ("id", "where", "reason", "resource", "payload"):
        table.add_column(col)
    for r in rows:
        resource = f"{r['resource_type']}/{r['resource_id']}" if r["resource_type"] else "-"
        table.add_row(str(r["id"]), r["where"], r["reason"], resource, "kept" if r["has_payload"] else "-")
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
        data = {**_summary(row), "payload": _parsed(row.payload)}
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
    all_: Annotated[bool, typer.Option("--all", help="Replay every dead letter (with --source: all of it).")] = False,
    source: Annotated[str | None, typer.Option(help="Replay the dead letters of this source (exact).")] = None,
    by: Annotated[str | None, typer.Option(help="Who replays (audit log); default: the OS user.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Full FHIR validation (fhir.resources) first.")] = False,
    config: ConfigOpt = DEFAULT_CONFIG,
    store: StoreOpt = None,
    json: JsonOpt = False,
) -> None:
    """Re-decode stored payloads with the current decoder: what is now accepted, what is still rejected and why.

    Nothing is changed or deleted (dead letters are evidence); the replay and its outcome go to the audit log.
    """
    if not (ids or all_ or source):
        raise typer.BadParameter("name dead-letter ids, or pass --all or --source SOURCE", param_hint="IDS")
    url = existing_store(store)
    upgrade(url)
    settings = load_settings(config, store_url=url)
    decoder = Decoder(SubjectKeyer(settings.subject_key), policy=settings.deid_policy, strict=strict)
    query = select(DeadLetterRow).order_by(DeadLetterRow.id)
    if ids:
        query = query.where(DeadLetterRow.id.in_(ids))
    if source is not None:
        query = query.where(DeadLetterRow.source == source)
    actor = by or getpass.getuser()
    with session_factory(url)() as s, s.begin():
        rows = list(s.scalars(query))
        missing = sorted(set(ids or ()) - {r.id for r in rows})
        if missing:
            raise typer.BadParameter(f"no dead letter {', '.join(map(str, missing))} in {url}"
                                     + (f" from source {source!r}" if source else "")
                                     + " (list them with `vigil deadletters list`)", param_hint="IDS")
        report = {"accepted": [], "still_rejected": [], "ignored": [], "not_replayable": []}
        for row in rows:
            outcome, entry = _replay(row, decoder)
            report[outcome].append(entry)
        audit.record(s, actor, "deadletters.replayed", "dead_letter", _id_span([r.id for r in rows]),
                     {"ids": [r.id for r in rows], "strict": strict, "config_hash": settings.config_hash(),
                      **{k: [e["id"] for e in v] for k, v in report.items()}})
    if json:
        print_json({"replayed": len(rows), **report})
        return
    table = Table(title=f"Replayed {len(rows)} dead letters through the current decoder (nothing was changed)")
    for col in ("id", "where", "now", "detail"):
        table.add_column(col)
    styles = {"accepted": "green", "still_rejected": "red", "ignored": "yellow", "not_replayable": "dim"}
    for outcome, entries in report.items():
        for e in entries:
            detail = ", ".join(e["resources"]) if outcome == "accepted" else e.get("reason", "")
            table.add_row(str(e["id"]), e["where"], f"[{styles[outcome]}]{outcome.replace('_', ' ')}[/]", detail)
    console.print(table)
    console.print(f"{len(report['accepted'])} now accepted, {len(report['still_rejected'])} still rejected, "
                  f"{len(report['ignored'])} of types vigil does not use, {len(report['not_replayable'])} without "
                  "a payload. Recorded in the audit log.")


def _replay(row: DeadLetterRow, decoder: Decoder) -> tuple[str, dict]:
    """One dead letter through ``iter_message`` + the decoder: (outcome, report entry)."""
    entry: dict = {"id": row.id, "where": _position(row), "was": row.reason}
    if row.payload is None:
        return "not_replayable", {**entry, "reason": NO_PAYLOAD}
    position = Position(row.source, row.position, row.partition)
    accepted: list[str] = []
    rejected: list[str] = []
    ignored: list[str] = []
    for item in iter_message(row.payload.encode(), position):
        if isinstance(item, DeadLetter):
            rejected.append(item.reason)
            continue
        _, resource = item
        outcome = decoder.decode(resource, position)
        if isinstance(outcome, DeadLetter):
            rejected.append(outcome.reason)
        elif outcome is None:
            ignored.append(resource["resourceType"])
        else:
            accepted.append(f"{resource['resourceType']} → {type(outcome).__name__}")
    if rejected:
        return "still_rejected", {**entry, "reason": "; ".join(rejected)}
    if accepted:
        return "accepted", {**entry, "resources": accepted}
    return "ignored", {**entry, "reason": f"vigil does not use {', '.join(ignored) or 'an empty message'}"}


def _id_span(ids: list[int]) -> str:
    """The audit entity id of a replay: "7", "3-9" or "none"."""
    if not ids:
        return "none"
    return str(ids[0]) if len(ids) == 1 else f"{min(ids)}-{max(ids)}"
