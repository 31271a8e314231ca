"""Containers → FHIR resources: NDJSON (plain or gzip), JSON resources, Bundles, and directories of them.

Bad input never raises: every broken line, non-FHIR value or unreadable file becomes a ``DeadLetter`` that names
where it was, and the run goes on with the rest (bulk-data IG: "validate each line separately").
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

from vigil.domain import DeadLetter, Position

log = logging.getLogger(__name__)

NOT_FHIR = "not a FHIR resource (no resourceType)"
_SUFFIXES = (".ndjson", ".ndjson.gz", ".json")

Item = tuple[Position, dict] | DeadLetter


def iter_resources(paths: Iterable[Path | str]) -> Iterator[Item]:
    """Yield ``(position, resource)`` for every resource in ``paths``, in order, or a ``DeadLetter`` where it fails."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for file in _walk(path):
                yield from _read_file(file, in_directory=True)
        elif path.is_file():
            yield from _read_file(path, in_directory=False)
        else:
            yield DeadLetter(Position(str(path)), f"file not found: {path} (check the path; other inputs were read)")


def _walk(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name.endswith(_SUFFIXES))


def _read_file(path: Path, in_directory: bool) -> Iterator[Item]:
    try:
        if path.name.endswith(".json"):
            yield from _read_json(path, in_directory)
        else:
            yield from _read_ndjson(path)
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, or a truncated/corrupt gzip stream
        yield DeadLetter(Position(str(path)), f"cannot read file: {exc} (check permissions or re-export the file)")


def _read_ndjson(path: Path) -> Iterator[Item]:
    source = str(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if line.isspace() or not line:
                continue
            yield _parse_line(line, Position(source, number))


def _parse_line(line: bytes, position: Position) -> Item:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return DeadLetter(position, f"invalid JSON: {exc.msg} at column {exc.pos + 1}")
    if _is_resource(value):
        return position, value
    return DeadLetter(position, NOT_FHIR)


def _read_json(path: Path, in_directory: bool) -> Iterator[Item]:
    source = str(path)
    try:
        value = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        yield DeadLetter(Position(source), f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
        return
    if not _is_resource(value) and in_directory:  # a bulk-export manifest, a simulator ground-truth file: not for us
        log.debug("skipping %s: JSON without resourceType", source)
        return
    yield from _resources_in(value, Position(source), entry_lines=True)


def iter_message(payload: bytes, position: Position) -> Iterator[Item]:
    """The resources in one message from a stream (a Kafka record, a webhook body): a resource or a Bundle."""
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        yield DeadLetter(position, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
        return
    yield from _resources_in(value, position, entry_lines=False)


def _resources_in(value: object, position: Position, entry_lines: bool) -> Iterator[Item]:
    """A resource as itself, a Bundle as its entries; in a file an entry's position is its 1-based index, in a
    message it keeps the message's own position (topic/partition/offset), since that is what a replay seeks to."""
    if not _is_resource(value):
        yield DeadLetter(position, NOT_FHIR)
        return
    if value["resourceType"] != "Bundle":
        yield position, value
        return
    for index, entry in enumerate(bundle_entries(value)):
        at = Position(position.source, index + 1) if entry_lines else position
        if _is_resource(entry):
            yield at, entry
        elif entry is None:
            yield DeadLetter(at, "Bundle entry without a resource (nothing to ingest; deletes are not supported)")
        else:
            yield DeadLetter(at, NOT_FHIR)


def _is_resource(value: object) -> bool:
    return isinstance(value, dict) and isinstance(value.get("resourceType"), str)


def bundle_entries(bundle: dict) -> list[dict | None]:
    """The entries' resources in order, with references to other entries' ``fullUrl`` rewritten to ``Type/id``.

    FHIR Bundle rules (http://hl7.org/fhir/R4/bundle.html#references): a ``urn:uuid:`` (or absolute) fullUrl names the
    entry; a resource without an id takes the uuid of its ``urn:uuid:`` fullUrl as id, so its referrers still resolve.
    """
    entries = [e if isinstance(e, dict) else {} for e in bundle.get("entry") or ()]
    targets: dict[str, str] = {}
    for entry in entries:
        resource, full_url = entry.get("resource"), entry.get("fullUrl")
        if not (isinstance(resource, dict) and isinstance(full_url, str) and resource.get("resourceType")):
            continue
        if "id" not in resource and full_url.startswith("urn:uuid:"):
            resource["id"] = full_url.removeprefix("urn:uuid:")
        if isinstance(resource.get("id"), str):
            targets[full_url] = f"{resource['resourceType']}/{resource['id']}"
    resources = [entry.get("resource") for entry in entries]
    if targets:
        for resource in resources:
            _rewrite_references(resource, targets)
    return resources


def _rewrite_references(value: object, targets: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                value[key] = targets.get(item, item)
            elif isinstance(item, (dict, list)):
                _rewrite_references(item, targets)
    elif isinstance(value, list):
        for item in value:
            _rewrite_references(item, targets)
