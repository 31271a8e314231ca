"""FHIR Bulk Data ``$export`` as a source: the client (kick-off, status polling, download) and exported directories.

HL7 Bulk Data Access IG v2 (``export.md``): kick-off ``GET [base]/$export`` (or ``Patient/$export``,
``Group/[id]/$export``) with ``Prefer: respond-async`` → ``202`` + ``Content-Location``; poll that status URL
(``202`` with ``Retry-After``/``X-Progress`` while running) until ``200`` and the manifest; download every ``output``,
``deleted`` and ``error`` file (NDJSON, gzip allowed) line by line; store ``transactionTime`` as the next ``_since``;
``DELETE`` the status URL once the results are safe. A large export's manifest may come in pages: each page lists
some files and links the next with ``link[relation=next].url`` (BulkDataManifest ``link``, Bulk Data IG v2.0+);
the pages are fetched as the files of the one before are read, until a page has no ``next`` link.

Every line becomes a ``Message`` at ``Position(file URL, line)``. ``error`` files hold OperationOutcomes, which the
decoder turns into dead letters; ``deleted`` files hold DELETE Bundles, dead-lettered as unsupported deletes.
The checkpoint cursor is JSON ``{since, status_url, file, line}`` (``file`` counts across manifest pages): a restart
mid-download re-reads the manifest from the status URL, follows its pages up to that file, and continues after the
last line handed out; if the server has forgotten the job, the export is
requested again from the same ``_since`` (the pipeline dedupes by type/id/version, so nothing counts twice).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import httpx
import orjson
from pydantic import BaseModel, Field, model_validator

from ingest.reader import ExportFile, iter_lines, read_manifest
from ingest.rest_poll import FhirHttp, FhirHttpConfig, FhirHttpError, retry_after_seconds
from ingest.sources import Checkpoint, Message
from vigil.domain import DeadLetter, Position

log = logging.getLogger(__name__)

NDJSON = "application/fhir+ndjson"
SECTIONS = ("output", "deleted", "error")


class BulkExportSourceConfig(FhirHttpConfig):
    """An ``$export`` client (``vigil run`` source ``kind: fhir-bulk-export``)."""

    kind: Literal["fhir-bulk-export"] = "fhir-bulk-export"
    name: str
    level: Literal["system", "patient", "group"] = "group"
    group_id: str | None = Field(None, description="required for level: group (Group/[id]/$export)")
    types: list[str] = Field(default_factory=list, description="_type: resource types to export (empty: all)")
    since: str | None = Field(None, description="_since of the first export; later ones use transactionTime")
    status_poll_s: float = Field(5.0, gt=0, description="status poll interval when the server sends no Retry-After")
    max_status_poll_s: float = Field(300.0, gt=0, description="cap on the status poll interval")
    max_wait_s: float = Field(24 * 3600.0, gt=0, description="give up (and cancel) a job still running after this")
    repeat_every_s: float | None = Field(None, gt=0, description="export again after this long (next _since); "
                                                                  "unset: one export, then the source is exhausted")

    @model_validator(mode="after")
    def _group_needs_id(self) -> BulkExportSourceConfig:
        if self.level == "group" and not self.group_id:
            raise ValueError(f"source {self.name!r}: level 'group' needs group_id (Group/[id]/$export); "
                             "or set level: patient or system")
        return self

    def kickoff_path(self) -> str:
        return {"system": "$export", "patient": "Patient/$export"}.get(self.level) or f"Group/{self.group_id}/$export"


@dataclass(slots=True)
class _Cursor:
    since: str | None = None  # _since of the export in progress (or of the next one)
    status_url: str | None = None  # the job in progress
    file: int = 0  # index into the manifest's output + deleted + error files
    line: int = 0  # lines of that file already handed out

    def encode(self) -> str:
        return orjson.dumps({"since": self.since, "status_url": self.status_url, "file": self.file,
                             "line": self.line}).decode()

    @classmethod
    def decode(cls, text: str | None) -> _Cursor | None:
        if not text:
            return None
        try:
            raw = orjson.loads(text)
            return cls(raw.get("since"), raw.get("status_url"), int(raw.get("file") or 0), int(raw.get("line") or 0))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"stored $export cursor is not valid ({exc}): {text[:200]!r}; delete the source's "
                             "cursor row to export again from `since`") from None


@dataclass(frozen=True, slots=True)
class ManifestFile:
    section: str  # output | deleted | error
    type: str
    url: str


def manifest_files(manifest: dict, where: str) -> list[ManifestFile]:
    """The files of a completion manifest, output first, then deleted, then error; key off ``type``, not names."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("output"), list):
        raise FhirHttpError(f"GET {where}: the export completed but its manifest has no output[] list; "
                            "check the server's $export implementation", where)
    return [ManifestFile(section, str(entry.get("type") or ""), entry["url"])
            for section in SECTIONS for entry in manifest.get(section) or ()
            if isinstance(entry, dict) and isinstance(entry.get("url"), str)]


def manifest_next(manifest: dict, where: str) -> str | None:
    """The URL of the manifest's next page (``link`` with ``relation`` "next"), or None on the last page."""
    links = manifest.get("link") if isinstance(manifest, dict) else None
    for link in links if isinstance(links, list) else ():
        if isinstance(link, dict) and link.get("relation") == "next":
            url = link.get("url")
            if not isinstance(url, str) or not url or url.startswith("#"):
                raise FhirHttpError(f"GET {where}: the manifest's next link has no URL ({link!r}); the export "
                                    "cannot be read past this page — check the server's $export implementation",
                                    where)
            return url
    return None


class BulkExportSource:
    """``Source`` over ``$export`` jobs; see the module docstring for the protocol and the cursor.

    The status URL is deleted in ``committed()`` after the checkpoint that finished the job is stored, so a crash
    before then can still re-read the job's files. ``sleep`` and ``clock`` are injectable for tests that record
    the waits.
    """

    def __init__(self, config: BulkExportSourceConfig, sleep: Callable[[float], None] = time.sleep,
                 transport: httpx.BaseTransport | None = None, clock: Callable[[], float] = time.monotonic):
        self.name = config.name
        self.clock = clock
        self.config = config
        self.http = FhirHttp(config, sleep=sleep, transport=transport)
        self.sleep = sleep
        self.cursor = _Cursor(config.since)
        self.progress: str | None = None  # the server's last X-Progress
        self.transaction_time: str | None = None
        self.last_error: FhirHttpError | None = None
        self._state: Literal["idle", "waiting", "reading", "done"] = "idle"
        self._next_at = 0.0  # monotonic time of the next kick-off or status request
        self._started_at = 0.0
        self._status_delay = config.status_poll_s
        self._files: list[ManifestFile] = []  # of every manifest page fetched so far, in order
        self._next_page: str | None = None  # the manifest page after those
        self._pages_seen: list[str] = []  # manifest page URLs read, the last one is the current page
        self._requires_token = False
        self._lines: Iterator[tuple[Position, bytes]] | None = None
        self._spool: tempfile._TemporaryFileWrapper | None = None
        self._to_delete: list[str] = []  # finished jobs' status URLs, deleted once committed
        self._finished: str | None = None

    # --- Source ------------------------------------------------------------------------------------------------

    def resume(self, checkpoint: Checkpoint) -> None:
        stored = _Cursor.decode(checkpoint.cursor)
        if stored is None:
            return
        self.cursor = stored
        if stored.status_url:  # a job was being read when the process stopped: fetch its manifest again
            self._state, self._next_at, self._started_at = "waiting", 0.0, self.clock()

    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        deadline = self.clock() + timeout_s
        try:
            while True:
                if self._state == "reading":
                    out = self._read(max_records)
                    if out:
                        return out
                    continue
                if self._state == "done":
                    if self.config.repeat_every_s is None:
                        return []
                    self._state = "idle"
                now = self.clock()
                if now < self._next_at:
                    self.sleep(max(0.0, min(self._next_at, deadline) - now))
                    if self.clock() < self._next_at:
                        return []
                if self._state == "idle":
                    self._kick_off()
                else:
                    self._check_status()
                if self._state != "reading" and self.clock() >= deadline:
                    return []
        except FhirHttpError as exc:
            if not exc.retryable:
                raise
            self.last_error = exc
            log.error("%s: %s", self.name, exc)
            self._next_at = self.clock() + self.config.max_backoff_s
            return []

    @property
    def exhausted(self) -> bool:
        return self._state == "done" and self.config.repeat_every_s is None

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(cursor=self.cursor.encode())

    def committed(self) -> None:
        """The finished job's results are stored: release it on the server (``DELETE`` the status URL)."""
        while self._to_delete:
            url = self._to_delete.pop()
            try:
                self.http.request("DELETE", url, ok=(200, 202, 204, 404))
            except FhirHttpError as exc:  # the server expires jobs on its own; a failed clean-up loses nothing
                log.warning("%s: could not delete the finished export job: %s", self.name, exc)

    def close(self) -> None:
        self._close_file()
        self.http.close()

    # --- the job -----------------------------------------------------------------------------------------------

    def _kick_off(self) -> None:
        params = {"_outputFormat": NDJSON}
        if self.config.types:
            params["_type"] = ",".join(self.config.types)
        if self.cursor.since:
            params["_since"] = self.cursor.since
        response = self.http.request("GET", self.config.kickoff_path(), params=params, ok=(202,),
                                     headers={"Prefer": "respond-async"})
        location = response.headers.get("Content-Location")
        if not location:
            raise FhirHttpError(f"GET {response.request.url}: the $export kick-off answered 202 without "
                                "Content-Location; the server does not follow the bulk-data IG", str(response.url))
        self.cursor.status_url = self.http.url(location)
        self.cursor.file = self.cursor.line = 0
        self._state, self._started_at = "waiting", self.clock()
        self._status_delay = self.config.status_poll_s
        self._next_at = self.clock()  # the first status check may follow at once (bulk-data IG)
        log.info("%s: export started (_since=%s)", self.name, self.cursor.since)

    def _check_status(self) -> None:
        url = self.cursor.status_url
        assert url is not None
        try:
            response = self.http.request("GET", url, ok=(200, 202))
        except FhirHttpError as exc:
            if exc.status not in (404, 410):
                raise
            log.warning("%s: the server no longer knows export job %s (HTTP %s): exporting again from _since=%s",
                        self.name, url, exc.status, self.cursor.since)
            self.cursor.status_url, self._state, self._next_at = None, "idle", 0.0
            return
        if response.status_code == 202:
            self.progress = response.headers.get("X-Progress")
            if self.clock() - self._started_at > self.config.max_wait_s:
                self._to_delete.append(url)
                self.committed()
                self.cursor.status_url, self._state = None, "idle"
                raise FhirHttpError(f"GET {url}: the export is still running after {self.config.max_wait_s:.0f} s "
                                    f"(last progress {self.progress!r}); cancelled — raise max_wait_s or narrow "
                                    "_type", url)
            wait = retry_after_seconds(response.headers.get("Retry-After"))
            if wait is None:
                wait = self._status_delay
                self._status_delay = min(self._status_delay * 2, self.config.max_status_poll_s)
            self._next_at = self.clock() + min(wait, self.config.max_status_poll_s)
            log.info("%s: export in progress (%s); next status check in %.1f s", self.name, self.progress, wait)
            return
        try:
            manifest = response.json()
        except ValueError:
            raise FhirHttpError(f"GET {url}: the export completed but the manifest is not JSON; check the server",
                                url) from None
        self._files = manifest_files(manifest, url)
        self._next_page, self._pages_seen = manifest_next(manifest, url), [url]
        self._requires_token = bool(manifest.get("requiresAccessToken"))
        self.transaction_time = manifest.get("transactionTime")
        if not isinstance(self.transaction_time, str):
            raise FhirHttpError(f"GET {url}: the manifest has no transactionTime, so the next _since is unknown; "
                                "check the server's $export implementation", url)
        self._state = "reading"
        log.info("%s: export complete, %d files (transactionTime %s)", self.name, len(self._files),
                 self.transaction_time)

    # --- reading the files -------------------------------------------------------------------------------------

    def _read(self, max_records: int) -> list[Message]:
        out: list[Message] = []
        while len(out) < max_records:
            if self._lines is None:
                if self.cursor.file >= len(self._files) and self._next_page is not None:
                    self._fetch_page(self._next_page)
                    continue
                if self.cursor.file >= len(self._files):
                    self._finish()
                    return out
                self._open(self._files[self.cursor.file])
            item = next(self._lines, None)
            if item is None:
                self._close_file()
                self.cursor.file += 1
                self.cursor.line = 0
                continue
            if (message := _fresh(item, self.cursor)) is not None:
                out.append(message)
        return out

    def _fetch_page(self, link: str) -> None:
        """The next manifest page: its files join the list (the cursor's file index runs across pages)."""
        url = self.http.url(link)
        if url in self._pages_seen:
            raise FhirHttpError(f"GET {self._pages_seen[-1]}: the export manifest's next link ({url}) points back to "
                                "a page already read; the server's manifest paging loops — check its $export "
                                "implementation", url)
        self._pages_seen.append(url)
        page = self.http.request("GET", url, auth=True, ok=(200,), headers={"Accept": "application/json"})
        try:
            manifest = page.json()
        except ValueError:
            raise FhirHttpError(f"GET {url}: the manifest page is not JSON; check the server", url) from None
        files = manifest_files(manifest, url)
        self._files.extend(files)
        self._next_page = manifest_next(manifest, url)
        if manifest.get("transactionTime") not in (None, self.transaction_time):
            log.warning("%s: manifest page %s has transactionTime %s, the first page %s; keeping the first",
                        self.name, url, manifest.get("transactionTime"), self.transaction_time)
        log.info("%s: manifest page %d: %d more files", self.name, len(self._pages_seen), len(files))

    def _open(self, file: ManifestFile) -> None:
        """Download the file into a temporary spool (gzip kept as is), then stream its lines."""
        spool = tempfile.NamedTemporaryFile(prefix="vigil-export-", suffix=".ndjson")
        self.http.request("GET", file.url, auth=self._requires_token, into=spool,
                          headers={"Accept": f"{NDJSON}, application/ndjson", "Accept-Encoding": "gzip"})
        self._spool = spool
        source = _safe(file.url)
        # no size cap here: an oversized line goes on as a message and is dead-lettered by the decoding (iter_message)
        self._lines = ((Position(source, position.line), line)
                       for position, line in iter_lines(Path(spool.name), max_bytes=sys.maxsize))  # type: ignore[misc]
        log.info("%s: reading %s file %s (%s)", self.name, file.section, source, file.type)

    def _close_file(self) -> None:
        self._lines = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def _finish(self) -> None:
        if self.cursor.status_url:
            self._to_delete.append(self.cursor.status_url)
        self.cursor = _Cursor(self.transaction_time or self.cursor.since)
        self._files, self._next_page, self._state = [], None, "done"
        if self.config.repeat_every_s is not None:
            self._next_at = self.clock() + self.config.repeat_every_s


def _safe(url: str) -> str:
    """A file URL without its query (a signed download URL carries a token there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


# --- an export already on disk ------------------------------------------------------------------------------------


def _fresh(item: tuple[Position, bytes], cursor) -> Message | None:
    """The line as a message, moving ``cursor.line`` on — or None if it was handed out before a restart."""
    position, line = item
    if position.line <= cursor.line:
        return None
    cursor.line = position.line
    return Message(position, line.rstrip(b"\r\n"))


class BulkDirectorySourceConfig(BaseModel):
    """An ``$export`` result directory, read once (``vigil run`` source ``kind: bulk-directory``)."""

    kind: Literal["bulk-directory"] = "bulk-directory"
    name: str
    path: Path


class BulkDirectorySource:
    """A finite ``Source`` over a downloaded ``$export`` result: the files its ``manifest.json`` lists (by
    ``output[].type``), or every ``*.ndjson[.gz]`` file when there is no manifest. Cursor: ``{file, line}``."""

    def __init__(self, config: BulkDirectorySourceConfig):
        self.name = config.name
        self.config = config
        self.position = _Cursor()
        self.dead_letters: list[DeadLetter] = []  # a broken manifest, a missing or unreadable file: drain after poll
        if not config.path.is_dir():
            raise FileNotFoundError(f"source {config.name!r}: {config.path} is not a directory; give the $export "
                                    "result directory (with manifest.json) or use kind: files")
        manifest = read_manifest(config.path)
        if isinstance(manifest, DeadLetter):
            self.dead_letters.append(manifest)
            manifest = []
        self.files: list[ExportFile] = manifest or [
            ExportFile(p, "", "output", p.name) for p in sorted(config.path.rglob("*"))
            if p.is_file() and p.name.endswith((".ndjson", ".ndjson.gz"))]
        self._lines: Iterator[tuple[Position, bytes]] | None = None

    def resume(self, checkpoint: Checkpoint) -> None:
        stored = _Cursor.decode(checkpoint.cursor)
        if stored is not None:
            self.position = stored

    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        out: list[Message] = []
        while len(out) < max_records and self.position.file < len(self.files):
            if self._lines is None:
                file = self.files[self.position.file]
                if not file.path.is_file():
                    self.dead_letters.append(DeadLetter(Position(str(file.path)), f"file not found: the manifest "
                                                        f"lists {file.url} but {file.path} is missing; re-download"))
                    self._next_file()
                    continue
                self._lines = iter_lines(file.path, max_bytes=sys.maxsize)  # type: ignore[assignment]
            try:
                item = next(self._lines, None)
            except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt gzip
                path = self.files[self.position.file].path
                self.dead_letters.append(DeadLetter(Position(str(path)), f"cannot read file: {exc} (re-export it)"))
                item = None
            if item is None:
                self._next_file()
                continue
            if (message := _fresh(item, self.position)) is not None:
                out.append(message)
        return out

    def _next_file(self) -> None:
        self._lines = None
        self.position.file += 1
        self.position.line = 0

    @property
    def exhausted(self) -> bool:
        return self.position.file >= len(self.files)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(cursor=self.position.encode())

    def committed(self) -> None:
        """Nothing upstream to acknowledge."""

    def close(self) -> None:
        self._lines = None
