"""Fetch the resources an ``id-only`` subscription notification names (FHIR R5 / R4B Subscriptions Backport IG).

An ``id-only`` notification carries only references (``notificationEvent.focus``, or entries with a ``fullUrl`` and
no resource): the receiver reads each one with a FHIR ``read`` (``GET [base]/Type/id``) before forwarding it. Only
references on the configured server are read, so its credentials never go to another host. A reference that cannot
be read — not found, refused, unreachable, not the resource named — becomes a fetch-failure ``OperationOutcome``
(issue codes from the FHIR IssueType value set, plus ``FETCH_FAILURE_SYSTEM`` codes), which goes down the same
stream and which the decoder turns into a dead letter with the reason; the stream goes on. No free text from the
server and no Patient id is copied into it: the outcome may be stored.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import orjson

from ingest.decode import FETCH_FAILURE_SYSTEM
from ingest.deid import without_keyed_id
from ingest.rest_poll import FhirHttp, FhirHttpConfig, FhirHttpError

log = logging.getLogger(__name__)

_REFERENCE = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?/?$")
# an HTTP status → (FHIR IssueType code, what to do)
_BY_STATUS = {
    401: ("security", "the server refused the credentials (check catch_up_auth_env)"),
    403: ("security", "the credentials lack read access to this resource type"),
    404: ("not-found", "the server does not have it (deleted, or not yet visible)"),
    410: ("not-found", "the server has deleted it"),
}


@dataclass(frozen=True, slots=True)
class Fetched:
    """One reference's outcome: ``payload`` is the resource's JSON, or a fetch-failure OperationOutcome's."""

    reference: str
    payload: bytes
    ok: bool


class IdOnlyFetcher:
    """Reads referenced resources from one FHIR server (``catch_up_base_url``) with its auth and retries."""

    def __init__(self, config: FhirHttpConfig, sleep: Callable[[float], None] = time.sleep,
                 transport: httpx.BaseTransport | None = None):
        self.config = config
        self.http = FhirHttp(config, sleep=sleep, transport=transport)

    def fetch(self, reference: str) -> Fetched:
        parsed = _REFERENCE.search(reference.split("?", 1)[0])
        if parsed is None:
            return self._failed(reference, None, "invalid", "not-a-reference",
                                "the focus is not a Type/id reference")
        rtype, rid = parsed.groups()
        relative = f"{rtype}/{rid}"
        if "://" in reference and not reference.startswith(self.config.base_url + "/"):
            return self._failed(reference, relative, "security", "foreign-server",
                                f"it is not on the configured server {self.config.base_url} (catch_up_base_url), "
                                "so it was not requested there with its credentials")
        try:
            response = self.http.request("GET", relative, ok=(200,))
        except FhirHttpError as exc:
            if exc.status is None:
                return self._failed(reference, relative, "transient", "unreachable",
                                    f"the server {self.config.base_url} could not be reached")
            code, todo = _BY_STATUS.get(exc.status, ("transient" if exc.retryable else "processing",
                                                     "the server failed to answer"))
            return self._failed(reference, relative, code, f"http-{exc.status}", f"HTTP {exc.status}: {todo}")
        try:
            resource = response.json()
        except ValueError:
            return self._failed(reference, relative, "invalid", "not-json", "the answer is not JSON")
        if not (isinstance(resource, dict) and resource.get("resourceType") == rtype and resource.get("id") == rid):
            return self._failed(reference, relative, "invalid", "wrong-resource",
                                "the answer is not the resource named")
        return Fetched(reference, response.content, True)

    def _failed(self, reference: str, relative: str | None, code: str, detail: str, why: str) -> Fetched:
        where = _safe(relative)
        log.warning("id-only notification: %s not fetched: %s", where, why)
        return Fetched(reference, orjson.dumps(fetch_failure(where, code, detail)), False)

    def close(self) -> None:
        self.http.close()


def fetch_failure(where: str, code: str, detail: str) -> dict:
    """The OperationOutcome that stands for a resource that could not be fetched (``decode`` dead-letters it)."""
    return {"resourceType": "OperationOutcome", "id": f"fetch-{uuid.uuid4().hex[:16]}", "issue": [{
        "severity": "error", "code": code, "expression": [where],
        "details": {"coding": [{"system": FETCH_FAILURE_SYSTEM, "code": detail}]}}]}


def _safe(relative: str | None) -> str:
    """``Type/id`` fit to store: a Patient's or Encounter's id identifies a person, so only its type is kept."""
    if relative is None:
        return "(unreadable reference)"
    return without_keyed_id(relative)
