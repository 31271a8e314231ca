"""Containers → FHIR resources: NDJSON (plain or gzip), JSON resources, Bundles, and directories of them.

A directory holding a bulk-data ``manifest.json`` is read as the ``$export`` result it is (HL7 Bulk Data Access IG,
export.md "Response - Complete Status"): the files its ``output``, ``deleted`` and ``error`` entries name, in that
order, each file taken for the ``type`` the manifest gives it, not for its name.

Bad input never raises: every broken line, non-FHIR value or unreadable file becomes a ``DeadLetter`` that names
where it was, and the run goes on with the rest (bulk-data IG: "validate each line separately").
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import orjson

from vigil.domain import DeadLetter, Position

log = logging.getLogger(__name__)

NOT_FHIR = "not a FHIR resource (no resourceType)"
OVERSIZED = "oversized message"
MANIFEST = "manifest.json"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Default cap on one stream message or NDJSON line: a bigger one is dead-lettered unparsed (memory safety)."""
_SUFFIXES = (".ndjson", ".ndjson.gz", ".json")
_MANIFEST_SECTIONS = ("output", "deleted", "error")

Item = tuple[Position, dict] | DeadLetter


def iter_resources(paths: Iterable[Path | str]) -> Iterator[Item]:
    """Yield ``(position, resource)`` for every resource in ``paths``, in order, or a ``DeadLetter`` where it fails."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            manifest = read_manifest(path)
            if isinstance(manifest, DeadLetter):
                yield manifest
            elif manifest:  # an empty manifest (nothing exported) lists nothing: the directory is walked as before
                for file in manifest:
                    yield from _read_export_file(file)
            else:
                for file in _walk(path):
                    yield from _read_file(file, in_directory=True)
        elif path.is_file():
            yield from _read_file(path, in_directory=False)
        else:
            yield DeadLetter(Position(str(path)), f"file not found: {path} (check the path; other inputs were read)")


def _walk(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name.endswith(_SUFFIXES))


@dataclass(frozen=True, slots=True)
class ExportFile:
    """One file a bulk-data manifest lists: ``section`` is output, deleted or error; ``type`` its resource type."""

    path: Path
    type: str
    section: str
    url: str


def read_manifest(directory: Path) -> list[ExportFile] | DeadLetter | None:
    """The files of the ``$export`` result in ``directory``, None without a manifest, a DeadLetter if it is broken.

    A manifest ``url`` is matched to a file by its last path segment (clients save downloads under that name), or
    taken as a path relative to the directory; a ``.gz`` copy of the file is found too. Other files in the
    directory are not read (a client's log, a stale download).
    """
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None
    where = Position(str(manifest_path))
    try:
        manifest = orjson.loads(manifest_path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        return DeadLetter(where, f"unreadable bulk-data manifest: {exc} (re-download the export's manifest)")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("output"), list):
        return DeadLetter(where, "invalid bulk-data manifest: no output[] list (is this a $export manifest?)")
    files = []
    for section in _MANIFEST_SECTIONS:
        for entry in manifest.get(section) or ():
            url = entry.get("url") if isinstance(entry, dict) else None
            if not isinstance(url, str):
                continue
            files.append(ExportFile(_local_file(directory, url), str(entry.get("type") or ""), section, url))
    return files


def _local_file(directory: Path, url: str) -> Path:
    parts = urlsplit(url)
    relative = unquote(parts.path if parts.scheme in ("", "file") else parts.path.rsplit("/", 1)[-1])
    for candidate in (directory / relative.lstrip("/"), directory / Path(relative).name):
        for path in (candidate, candidate.with_name(candidate.name + ".gz")):
            if path.is_file():
                return path
    return directory / Path(relative).name


def _read_export_file(file: ExportFile) -> Iterator[Item]:
    if not file.path.is_file():
        yield DeadLetter(Position(str(file.path)), f"file not found: the manifest lists {file.url} ({file.section}, "
                                                   f"{file.type or 'no type'}) but {file.path} is missing; "
                                                   "re-download it")
        return
    yield from _read_file(file.path, in_directory=True)


def iter_lines(path: Path, max_bytes: int = MAX_MESSAGE_BYTES) -> Iterator[tuple[Position, bytes] | DeadLetter]:
    """The non-blank lines of an NDJSON file (gzip by name or by content), with their 1-based line numbers.

    Raises OSError/EOFError/zlib.error for an unreadable file, as ``open`` does; a line over ``max_bytes`` is a
    DeadLetter. The file is streamed, never read whole (bulk-data IG: files can be gigabytes).
    """
    source = str(path)
    with _open_lines(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line or line.isspace():
                continue
            if len(line) > max_bytes:
                yield oversized(Position(source, number), len(line), max_bytes)
                continue
            yield Position(source, number), line


def _open_lines(path: Path) -> BinaryIO:
    """The file opened for binary line reading, through gzip when its name or its first two bytes say so."""
    with open(path, "rb") as raw:
        packed = raw.read(2) == b"\x1f\x8b"
    if packed or path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def oversized(position: Position, size: int, max_bytes: int) -> DeadLetter:
    return DeadLetter(position, f"{OVERSIZED}: {size:,} bytes over the limit of {max_bytes:,} (not parsed; split the "
                                "Bundle at the sender or raise max_message_bytes)")


def _read_file(path: Path, in_directory: bool) -> Iterator[Item]:
    try:
        if path.name.endswith(".json"):
            yield from _read_json(path, in_directory)
        else:
            yield from _read_ndjson(path)
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, or a truncated/corrupt gzip stream
        yield DeadLetter(Position(str(path)), f"cannot read file: {exc} (check permissions or re-export the file)")


def _read_ndjson(path: Path, max_bytes: int = MAX_MESSAGE_BYTES) -> Iterator[Item]:
    """Each line a resource; a Bundle line is read as its entries (all at the line's position), as a stream message
    is (``iter_message``), so a file and a feed of the same lines decode alike.

    The hot path of a bulk load: ``iter_lines`` and the parse are inlined here (one generator instead of two), with
    the same blank-line, size and gzip rules.
    """
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    source = str(path)
    with _open_lines(path) as lines:
        for number, line in enumerate(lines, 1):
            if len(line) > max_bytes:
                if not line.isspace():
                    yield oversized(Position(source, number), len(line), max_bytes)
                continue
            try:
                value = loads(line)
            except decode_error as exc:
                if line.isspace():  # blank lines are allowed (and orjson refuses them): checked only on failure
                    continue
                yield DeadLetter(Position(source, number), f"invalid JSON: {exc.msg} at column {exc.pos + 1}")
                continue
            rtype = value.get("resourceType") if value.__class__ is dict else None
            if rtype.__class__ is str and rtype != "Bundle":
                yield Position(source, number), value
            else:
                yield from _resources_in(value, Position(source, number), entry_lines=False)


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


def iter_message(payload: bytes, position: Position, max_bytes: int = MAX_MESSAGE_BYTES) -> Iterator[Item]:
    """The resources in one message from a stream (a Kafka record, a webhook body): a resource or a Bundle.

    A message over ``max_bytes`` is dead-lettered without being parsed, so one huge record cannot exhaust memory.
    """
    if len(payload) > max_bytes:
        yield oversized(position, len(payload), max_bytes)
        return
    if not payload:
        yield DeadLetter(position, "empty message (a Kafka tombstone or an empty body): nothing to ingest")
        return
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
    if not isinstance(value.get("entry") or [], list):
        yield DeadLetter(position, f"invalid Bundle.entry (must be a list of entries, got "
                                   f"{type(value['entry']).__name__}; nothing ingested — fix the sender's Bundle)")
        return
    try:
        entries = bundle_entries(value)
    except RecursionError:  # reference rewriting walks every element; orjson parses up to 1024 levels
        yield DeadLetter(position, "invalid Bundle: nested deeper than Python's recursion limit (nothing ingested; "
                                   "no FHIR resource nests that deep — check the sender)")
        return
    for index, entry in enumerate(entries):
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
    raw = bundle.get("entry")
    entries = [e if isinstance(e, dict) else {} for e in raw] if isinstance(raw, list) else []
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
