"""FHIR REST polling: an HTTP client with retry and backoff, and an incremental ``_lastUpdated`` search source.

The client is shared by the ``$export`` client (``ingest.bulk_export``). Searches follow FHIR R4 search paging
(http://hl7.org/fhir/R4/http.html#paging: ``Bundle.link[relation=next]``, absolute or relative) and sort by
``_lastUpdated`` so the cursor — the newest ``meta.lastUpdated`` handed out — only moves forward.

The query is ``_lastUpdated=ge<cursor>``, not ``gt``: a resource committed later with the very same timestamp as the
cursor would be lost by ``gt``. The resources already handed out at the cursor's instant are remembered with the cursor
and skipped when they come back, so nothing is lost and nothing is counted twice. They are remembered by a keyed hash
of (type, id, ``versionId``), never by id: a Patient or Encounter id is an MRN- or visit-number-type identifier (HIPAA
Safe Harbor, 45 CFR 164.514(b)(2)(i)(R)), and the cursor is stored in the database (``source_cursors``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import BinaryIO, Literal
from urllib.parse import urljoin

import httpx
import orjson
from pydantic import BaseModel, Field, field_validator

from ingest.decode import parse_datetime
from ingest.deid import SubjectKeyer
from ingest.sources import Checkpoint, Message
from vigil.domain import Position

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class FhirHttpConfig(BaseModel):
    """Connection settings shared by every FHIR HTTP source. The secret itself never sits in a config file."""

    base_url: str = Field(description="FHIR base URL, e.g. https://emr.example.org/fhir")
    auth_env: str | None = Field(None, description="name of the env var holding the auth header value, "
                                                   "e.g. VIGIL_EMR_TOKEN='Bearer eyJ...'")
    auth_header: str = "Authorization"
    timeout_s: float = Field(30.0, gt=0, description="connect/read timeout per request")
    max_retries: int = Field(5, ge=0, description="retries on 429, 5xx and connection errors")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles per retry (exponential backoff)")
    max_backoff_s: float = Field(120.0, ge=0, description="cap on one delay, Retry-After included")

    @field_validator("base_url")
    @classmethod
    def _no_trailing_slash(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
        return url.rstrip("/")


class FhirHttpError(RuntimeError):
    """A FHIR server request failed for good; the message names the URL, the status and what to do."""

    def __init__(self, message: str, url: str, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.url = url
        self.status = status
        self.retryable = retryable


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP-date (RFC 9110 §10.2.3); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdecimal():  # RFC 9110 delta-seconds: ASCII digits ("²" is isdigit())
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class FhirHttp:
    """httpx with timeouts, the configured auth header, and exponential backoff on 429/5xx/connection errors.

    ``sleep`` is injectable so a test can record the delays instead of waiting them out.
    """

    def __init__(self, config: FhirHttpConfig, sleep: Callable[[float], None] = time.sleep,
                 transport: httpx.BaseTransport | None = None):
        self.config = config
        self.sleep = sleep
        self._auth = _auth_headers(config)
        self.client = httpx.Client(timeout=config.timeout_s, transport=transport, follow_redirects=True,
                                   headers={"Accept": FHIR_JSON})

    def url(self, path_or_url: str) -> str:
        """Absolute URL: a relative one (a relative ``next`` link, ``Patient/$export``) is taken from the base."""
        return urljoin(self.config.base_url + "/", path_or_url)

    def request(self, method: str, url: str, *, params: dict | None = None, headers: dict | None = None,
                auth: bool = True, ok: tuple[int, ...] = (200,), into: BinaryIO | None = None) -> httpx.Response:
        """One request, retried on 429/5xx/connection errors (honouring ``Retry-After``); other statuses raise.

        With ``into``, a successful body is streamed into that file (``Content-Encoding`` undone), never held whole
        in memory; a download cut off midway is retried from the start.
        """
        url = self.url(url)
        sent = {**(self._auth if auth else {}), **(headers or {})}
        delay = self.config.backoff_s
        for attempt in range(self.config.max_retries + 1):
            last = attempt == self.config.max_retries
            try:
                if into is None:
                    response = self.client.request(method, url, params=params, headers=sent)
                else:
                    response = self._stream(method, url, params, sent, ok, into)
            except httpx.TransportError as exc:
                if last:
                    raise FhirHttpError(
                        f"{method} {url}: cannot reach the FHIR server ({type(exc).__name__}: {exc}) after "
                        f"{attempt + 1} attempts; check base_url and the network — vigil retries on the next poll",
                        url, retryable=True) from exc
                wait = delay
            else:
                if response.status_code in ok:
                    return response
                if response.status_code not in RETRY_STATUSES or last:
                    raise _status_error(method, response, attempt + 1, self.config)
                wait = retry_after_seconds(response.headers.get("Retry-After"))
                wait = delay if wait is None else wait
                log.info("%s %s: HTTP %d, retrying in %.1f s", method, _safe_url(url), response.status_code, wait)
            self.sleep(min(wait, self.config.max_backoff_s))
            delay = min(delay * 2, self.config.max_backoff_s) if delay else self.config.backoff_s
        raise AssertionError("unreachable")  # the loop returns or raises on its last attempt

    def _stream(self, method: str, url: str, params: dict | None, headers: dict, ok: tuple[int, ...],
                into: BinaryIO) -> httpx.Response:
        with self.client.stream(method, url, params=params, headers=headers) as response:
            if response.status_code not in ok:
                response.read()
                return response
            into.seek(0)
            into.truncate()
            for chunk in response.iter_bytes():
                into.write(chunk)
            into.flush()
            return response

    def close(self) -> None:
        self.client.close()


def _auth_headers(config: FhirHttpConfig) -> dict[str, str]:
    if config.auth_env is None:
        return {}
    value = os.environ.get(config.auth_env)
    if not value:
        raise ValueError(f"auth_env names {config.auth_env!r} but that environment variable is not set or empty: "
                         f"export it with the header value (e.g. 'Bearer <token>') for {config.base_url}")
    return {config.auth_header: value}


def _status_error(method: str, response: httpx.Response, attempts: int, config: FhirHttpConfig) -> FhirHttpError:
    status, url = response.status_code, str(response.request.url)
    todo = {
        401: f"the server refused the credentials: check the token in ${config.auth_env or '<auth_env not set>'}",
        403: "the credentials lack access to this resource: ask the EMR team for the scope",
        404: "the URL does not exist: check base_url, the resource type or the export status URL",
        410: "the resource is gone (an expired export?): start a new one",
    }.get(status)
    if todo is None:
        todo = ("the server is unavailable or throttling: vigil retries on the next poll" if status in RETRY_STATUSES
                else "the server rejected the request: see its OperationOutcome above and check the configuration")
    return FhirHttpError(f"{method} {_safe_url(url)}: HTTP {status} after {attempts} attempt(s){_outcome(response)}; "
                         f"{todo}", url, status, retryable=status in RETRY_STATUSES)


def _outcome(response: httpx.Response) -> str:
    """The issue codes of an OperationOutcome body (no free text: diagnostics may quote patient data)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    issues = [f"{i.get('severity')}/{i.get('code')}" for i in body.get("issue") or () if isinstance(i, dict)]
    return f" (OperationOutcome: {', '.join(issues)})" if issues else ""


def _safe_url(url: str) -> str:
    """The URL without its query: search parameters may carry identifiers (``patient=``, ``identifier=``)."""
    return url.split("?", 1)[0]


# --- incremental search ----------------------------------------------------------------------------------------


class RestPollSourceConfig(FhirHttpConfig):
    """An incremental ``_lastUpdated`` search per resource type (``vigil run`` source ``kind: fhir-rest``)."""

    kind: Literal["fhir-rest"] = "fhir-rest"
    name: str
    resource_types: list[str] = Field(min_length=1, description="searched in this order each cycle")
    page_size: int = Field(200, gt=0, description="_count per page")
    since: str | None = Field(None, description="first cursor (FHIR instant) when nothing is stored yet")
    poll_interval_s: float = Field(60.0, ge=0, description="wait after a cycle that found nothing new")

    @field_validator("since")
    @classmethod
    def _instant(cls, since: str | None) -> str | None:
        if since is not None:
            parse_datetime(since)  # ValueError names the bad value
        return since


class SeenKeys:
    """Keyed hashes of (type, id, versionId) for the cursor's seen-set: the subject keyer's HMAC-SHA256 (RFC 2104),
    so a stored cursor holds no resource id and the same resource gives the same key after a restart.

    Without a keyer (a source built without the settings' subject key) the hash is an unkeyed SHA-256: still no id in
    the database, but a guessable id could be confirmed by hashing it — pass ``keyer`` (see ``vigil.feeds``).
    """

    __slots__ = ("_keyer",)

    def __init__(self, keyer: SubjectKeyer | None = None):
        self._keyer = keyer

    def __call__(self, rtype: str, rid: str, version: str) -> str:
        text = f"{rtype}/{rid}/_history/{version}"  # a versioned FHIR reference: "/" never occurs inside an id
        if self._keyer is not None:
            return self._keyer.key(text)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(slots=True)
class TypeCursor:
    """One resource type's resume point: the newest ``lastUpdated`` handed out and who was handed out at it."""

    since: str | None = None
    at_since: set[str] = field(default_factory=set)  # SeenKeys of the resources with lastUpdated == since

    def after(self, seen_key: str, updated: str | None) -> None:
        if updated is None:
            return
        if self.since is None or parse_datetime(updated) > parse_datetime(self.since):
            self.since, self.at_since = updated, {seen_key}
        elif parse_datetime(updated) == parse_datetime(self.since):
            self.at_since.add(seen_key)


def encode_cursor(cursors: dict[str, TypeCursor]) -> str:
    """The ``Checkpoint.cursor`` text: JSON ``{type: {since, seen: [keyed hash, ...]}}`` (no resource ids)."""
    return orjson.dumps({t: {"since": c.since, "seen": sorted(c.at_since)} for t, c in sorted(cursors.items())},
                        ).decode()


def decode_cursor(text: str | None, seen_keys: SeenKeys | None = None) -> dict[str, TypeCursor]:
    """Read a stored cursor. The old format (``at_since``: raw ``[id, versionId]`` pairs) still loads: its pairs are
    hashed with ``seen_keys`` on the way in, so the next checkpoint overwrites the raw ids with keys."""
    if not text:
        return {}
    seen_keys = seen_keys or SeenKeys()
    try:
        raw = orjson.loads(text)
        cursors = {}
        for rtype, value in raw.items():
            seen = {str(k) for k in value.get("seen") or ()}
            old = value.get("at_since") or ()
            if old:
                log.warning("REST cursor of %s is in the old format (raw ids): %d resource(s) at its instant read as "
                            "keyed hashes; the next checkpoint stores the new format", rtype, len(old))
            seen.update(seen_keys(rtype, str(rid), str(ver)) for rid, ver in old)
            cursors[rtype] = TypeCursor(value.get("since"), seen)
        return cursors
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        # the text is not quoted: an old-format cursor holds raw resource ids
        raise ValueError(f"stored REST cursor is not valid ({type(exc).__name__}: {exc}); delete the source's row in "
                         "source_cursors to start again from `since`") from None


def cursor_since(resource_types: list[str], since: str) -> str:
    """A cursor that makes a poller re-read every listed type from ``since`` (a subscription catch-up)."""
    return encode_cursor({t: TypeCursor(since) for t in resource_types})


@dataclass(slots=True)
class _Pending:
    message: Message
    rtype: str
    key: str  # SeenKeys of (type, id, versionId)
    updated: str | None


class RestPollSource:
    """``Source`` over FHIR searches: ``GET [base]/<Type>?_lastUpdated=ge<cursor>&_sort=_lastUpdated&_count=N``.

    A cycle searches every configured type and follows ``next`` links to the last page. A cycle that found something
    is followed at once by another (catching up); one that found nothing sets ``exhausted`` (``vigil run --once``)
    and the next starts ``poll_interval_s`` later. The checkpoint covers exactly the messages handed out.

    ``keyer`` (the settings' subject key) keys the cursor's seen-set; see ``SeenKeys``.
    """

    def __init__(self, config: RestPollSourceConfig, sleep: Callable[[float], None] = time.sleep,
                 transport: httpx.BaseTransport | None = None, clock: Callable[[], float] = time.monotonic,
                 keyer: SubjectKeyer | None = None):
        self.name = config.name
        self.seen_keys = SeenKeys(keyer)
        self.clock = clock
        self.config = config
        self.http = FhirHttp(config, sleep=sleep, transport=transport)
        self.sleep = sleep
        self.cursors: dict[str, TypeCursor] = {t: TypeCursor(config.since) for t in config.resource_types}
        self.last_error: FhirHttpError | None = None
        self._pending: deque[_Pending] = deque()
        self._type_index = 0
        self._next_url: str | None = None  # inside a search: the next page
        self._seen: set[str] = set()  # this search's SeenKeys: pages may overlap while data changes
        self._new_in_cycle = 0
        self._idle_until: float | None = None  # between cycles, after one that found nothing
        self._exhausted = False

    # --- Source ------------------------------------------------------------------------------------------------

    def resume(self, checkpoint: Checkpoint) -> None:
        stored = decode_cursor(checkpoint.cursor, self.seen_keys)
        for rtype in self.config.resource_types:
            if rtype in stored:
                self.cursors[rtype] = stored[rtype]

    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        deadline = self.clock() + timeout_s
        while not self._pending:
            if self._idle_until is not None:
                wait = min(self._idle_until, deadline) - self.clock()
                if wait > 0:
                    self.sleep(wait)
                if self.clock() < self._idle_until:
                    return []
                self._idle_until = None
            try:
                self._fetch_page()
            except FhirHttpError as exc:
                if not exc.retryable:
                    raise
                self.last_error = exc
                log.error("%s: %s", self.name, exc)
                return []
            if self.clock() >= deadline and not self._pending:
                return []
        out = []
        while self._pending and len(out) < max_records:
            item = self._pending.popleft()
            self.cursors[item.rtype].after(item.key, item.updated)
            out.append(item.message)
        return out

    @property
    def exhausted(self) -> bool:
        return self._exhausted and not self._pending

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(cursor=encode_cursor(self.cursors))

    def committed(self) -> None:
        """Nothing to acknowledge upstream: the stored cursor is the acknowledgement."""

    def close(self) -> None:
        self.http.close()

    # --- searching ---------------------------------------------------------------------------------------------

    def _fetch_page(self) -> None:
        rtype = self.config.resource_types[self._type_index]
        if self._next_url is None:
            cursor = self.cursors[rtype]
            params = {"_sort": "_lastUpdated", "_count": str(self.config.page_size)}
            if cursor.since:
                params["_lastUpdated"] = f"ge{cursor.since}"
            response = self.http.request("GET", rtype, params=params)
            skip = cursor.at_since
            self._seen = set()
        else:
            response = self.http.request("GET", self._next_url)
            skip = self.cursors[rtype].at_since
        page_url = str(response.url)
        bundle = _bundle(response, page_url)
        for index, entry in enumerate(bundle.get("entry") or (), 1):
            item = self._entry(entry, rtype, page_url, index)
            if item is None or item.key in self._seen or item.key in skip:
                continue
            self._seen.add(item.key)
            self._pending.append(item)
            self._new_in_cycle += 1
        next_link = next((link.get("url") for link in bundle.get("link") or ()
                          if isinstance(link, dict) and link.get("relation") == "next"), None)
        self._next_url = urljoin(page_url, next_link) if next_link else None
        if self._next_url is None:
            self._end_search()

    def _entry(self, entry: object, rtype: str, page_url: str, index: int) -> _Pending | None:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        position = Position(page_url, index)  # our own query: no identifiers in it, and it tells pages apart
        if not isinstance(resource, dict):
            return None
        if ((entry.get("search") or {}).get("mode") == "outcome" or resource.get("resourceType") == "OperationOutcome"):
            issues = [f"{i.get('severity')}/{i.get('code')}" for i in resource.get("issue") or ()
                      if isinstance(i, dict)]
            log.warning("%s: the server reported %s with the %s search (%s)", self.name, issues, rtype, position)
            return None
        meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
        updated = meta.get("lastUpdated") if isinstance(meta.get("lastUpdated"), str) else None
        key = self.seen_keys(str(resource.get("resourceType")), str(resource.get("id")),
                             str(meta.get("versionId") or ""))
        if resource.get("resourceType") != rtype:  # _include'd resources do not move this type's cursor
            updated = None
        return _Pending(Message(position, orjson.dumps(resource)), rtype, key, updated)

    def _end_search(self) -> None:
        self._type_index += 1
        if self._type_index < len(self.config.resource_types):
            return
        self._type_index = 0
        self._exhausted = self._new_in_cycle == 0
        if self._exhausted:
            self._idle_until = self.clock() + self.config.poll_interval_s
        self._new_in_cycle = 0


def _bundle(response: httpx.Response, url: str) -> dict:
    try:
        bundle = response.json()
    except ValueError:
        raise FhirHttpError(f"GET {_safe_url(url)}: the response is not JSON (Content-Type "
                            f"{response.headers.get('Content-Type')!r}); check that base_url is the FHIR endpoint",
                            url) from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        got = bundle.get("resourceType") if isinstance(bundle, dict) else type(bundle).__name__
        raise FhirHttpError(f"GET {_safe_url(url)}: expected a searchset Bundle, got {got!r}; check base_url", url)
    return bundle
