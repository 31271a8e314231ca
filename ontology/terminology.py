"""Optional FHIR terminology server client: ``$translate``, ``$lookup`` and ``$subsumes`` (interop.md §4.1 d, §4.2).

vigil ships SNOMED CT concept ids only, never hierarchy (SNOMED International Affiliate Licence). A deployment that
holds a licence can point vigil at its own terminology server (Ontoserver, Snowstorm, HAPI...) through the FHIR
terminology operations (http://hl7.org/fhir/R4/terminology-service.html): ``ConceptMap/$translate`` for local codes
no local ConceptMap covers, ``CodeSystem/$lookup`` for displays and properties, ``CodeSystem/$subsumes`` for
hierarchy-based outcome definitions.

Only codes ever leave vigil — a code system URI and a code, never a subject, encounter, site or value — and requests
go out as GET with those in the query. Answers are cached (LRU with a time to live), so a hot code is asked once. 429
and 5xx are retried with exponential backoff honouring ``Retry-After`` (the shared FHIR HTTP client,
``ingest.rest_poll.FhirHttp``); when the server stays unavailable the client fails fast for ``cooldown_s`` so a feed
is not slowed to the server's timeout on every fact, and :class:`ServerFallback` turns that into a counted
data-quality event in :class:`ontology.mapper.FactMapper`, never a crash or a silently dropped fact.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Literal


from ingest.rest_poll import FhirHttp, FhirHttpError
from ontology.conceptmap import _RANK, ACCEPTABLE, EQUIVALENCES, STANDARD_SYSTEMS, Match, TerminologyUnavailable
from vigil.settings import TerminologyServerConfig

log = logging.getLogger(__name__)

Subsumption = Literal["equivalent", "subsumes", "subsumed-by", "not-subsumed"]
SUBSUMPTION_OUTCOMES: frozenset[str] = frozenset({"equivalent", "subsumes", "subsumed-by", "not-subsumed"})

R5_RELATIONSHIP_TO_R4: dict[str, str] = {
    # FHIR R5 ConceptMap.group.element.target.relationship → the R4 equivalence vigil reasons with
    # (R5 ConceptMap "Mapping from R4 equivalence"; source-is-narrower-than-target = the target is wider).
    "related-to": "relatedto",
    "equivalent": "equivalent",
    "source-is-narrower-than-target": "wider",
    "source-is-broader-than-target": "narrower",
    "not-related-to": "disjoint",
}

__all__ = [
    "Lookup",
    "ServerFallback",
    "Subsumption",
    "TerminologyClient",
    "TerminologyError",
    "TerminologyServerConfig",
    "TerminologyUnavailable",
    "Translation",
]


class TerminologyError(RuntimeError):
    """The server answered, but not usably (refused credentials, bad request, malformed Parameters)."""


@dataclass(frozen=True, slots=True)
class Translation:
    """One ``match`` of a ``$translate`` answer; ``equivalence`` is the R4 code (an R5 relationship is mapped)."""

    system: str
    code: str
    display: str | None
    equivalence: str
    source: str | None  # the ConceptMap the server used, when it says

    @property
    def acceptable(self) -> bool:
        return self.equivalence in ACCEPTABLE


@dataclass(frozen=True, slots=True)
class Lookup:
    display: str | None
    properties: dict[str, tuple[object, ...]]  # property code → every value the server gave


class _TtlLru:
    """A bounded mapping: least recently used out first, entries older than ``ttl`` seconds treated as absent."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float]) -> None:
        self.size, self.ttl, self.clock = size, ttl, clock
        self._data: OrderedDict[Hashable, tuple[float, object]] = OrderedDict()

    def get(self, key: Hashable, default: object = None) -> object:
        item = self._data.get(key)
        if item is None:
            return default
        if item[0] <= self.clock():
            del self._data[key]
            return default
        self._data.move_to_end(key)
        return item[1]

    def put(self, key: Hashable, value: object) -> None:
        if self.size <= 0:
            return
        self._data[key] = (self.clock() + self.ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


_MISSING = object()
TRANSLATE, LOOKUP, SUBSUMES = "ConceptMap/$translate", "CodeSystem/$lookup", "CodeSystem/$subsumes"


class TerminologyClient:
    """The three operations vigil needs, cached. Raises :class:`TerminologyUnavailable` when the server cannot be
    reached or keeps failing (429/5xx after the retries), :class:`TerminologyError` when it refuses the request.

    ``sleep`` (retry delays) and ``clock`` (cache expiry, cooldown) are injectable for tests. The HTTP client (and
    with it the auth header) is made at construction, so a missing auth env var fails at start-up, and is never
    pickled: a pipeline checkpoint holding this client carries the cached answers but no connection or secret.
    """

    def __init__(
        self,
        config: TerminologyServerConfig,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.sleep = sleep
        self.clock = clock
        self._cache = _TtlLru(config.cache_size, config.cache_ttl_s, clock)
        self._down_until = 0.0
        self._down_reason = ""
        self._http: FhirHttp | None = FhirHttp(config, sleep=sleep)
        self._lock = threading.Lock()

    # --- operations ----------------------------------------------------------------------------------------

    def translate(
        self, system: str, code: str, target_system: str | None = None, conceptmap_url: str | None = None
    ) -> list[Translation]:
        """Every match the server returns for ``system#code`` with its equivalence; [] when ``result`` is false and
        nothing matched. Callers must check each equivalence (``Translation.acceptable``), as the spec says.
        """
        params = {"system": system, "code": code}
        if target_system:
            params["targetsystem"] = target_system
        if conceptmap_url:
            params["url"] = conceptmap_url
        return self._cached(("translate", system, code, target_system, conceptmap_url),
                            lambda: _translations(self._get(TRANSLATE, params), self._where(TRANSLATE, params)))

    def lookup(self, system: str, code: str) -> Lookup | None:
        """Display and properties of ``system#code``; None when the server does not know the code (HTTP 404)."""
        params = {"system": system, "code": code}
        return self._cached(("lookup", system, code),
                            lambda: _lookup(self._get(LOOKUP, params, missing_ok=True), self._where(LOOKUP, params)))

    def subsumes(self, system: str, code_a: str, code_b: str) -> Subsumption:
        """How ``code_a`` relates to ``code_b`` in ``system``'s hierarchy (``subsumes``: a is an ancestor of b)."""
        params = {"system": system, "codeA": code_a, "codeB": code_b}
        return self._cached(("subsumes", system, code_a, code_b),
                            lambda: _subsumption(self._get(SUBSUMES, params), self._where(SUBSUMES, params)))

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    # --- plumbing ------------------------------------------------------------------------------------------

    def _cached(self, key: tuple, fetch: Callable[[], object]):
        with self._lock:
            hit = self._cache.get(key, _MISSING)
        if hit is not _MISSING:
            return hit
        value = fetch()
        with self._lock:
            self._cache.put(key, value)
        return value

    def _get(self, operation: str, params: dict[str, str], missing_ok: bool = False) -> dict | None:
        url = f"{self.config.base_url}/{operation}"
        now = self.clock()
        if now < self._down_until:
            raise TerminologyUnavailable(
                f"terminology server {url} skipped: it was unavailable ({self._down_reason}); vigil asks again in "
                f"{self._down_until - now:.0f} s (cooldown_s={self.config.cooldown_s:g})"
            )
        try:
            http = self._client()
        except ValueError as exc:  # restored from a checkpoint where the auth env var is not set
            raise TerminologyError(f"terminology server {url}: {exc}") from None
        try:
            response = http.request("GET", url, params=params, ok=(200, 404) if missing_ok else (200,))
        except FhirHttpError as exc:
            if exc.retryable:
                self._down_until = self.clock() + self.config.cooldown_s
                self._down_reason = f"HTTP {exc.status}" if exc.status else "unreachable"
                log.warning("terminology server unavailable, failing fast for %g s: %s", self.config.cooldown_s, exc)
                raise TerminologyUnavailable(
                    f"terminology server unavailable: {exc}. Facts whose codes need it are counted as "
                    "'terminology unavailable' until it answers; check the server and terminology.base_url"
                ) from None
            raise TerminologyError(f"terminology server refused the request: {exc}") from None
        if response.status_code == 404:
            return None
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
            found = body.get("resourceType") if isinstance(body, dict) else type(body).__name__
            raise TerminologyError(
                f"GET {url}: expected a FHIR Parameters resource, got {found!r}; is base_url the FHIR base of a "
                "terminology server (it should end where /ConceptMap and /CodeSystem begin)?"
            )
        return body

    def _client(self) -> FhirHttp:
        if self._http is None:
            self._http = FhirHttp(self.config, sleep=self.sleep)
        return self._http

    def _where(self, operation: str, params: dict[str, str]) -> str:
        """Where an unusable answer came from: the operation URL and the codes asked (codes only, never PHI)."""
        return f"GET {self.config.base_url}/{operation} ({', '.join(f'{k}={v}' for k, v in params.items())})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_http"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class ServerFallback:
    """The hook :class:`ontology.mapper.FactMapper` calls when no local ConceptMap maps a code: asks the server to
    translate it (into each of ``target_systems`` in turn, or once into any standard system when none are set) and
    returns the acceptable matches (equivalent, equal, wider, subsumes) as :class:`Match`, best first.

    Only the code system and code are sent; the site is deliberately not (it is the mapper's cache key, not the
    server's business). Any server failure, refusal included, becomes :class:`TerminologyUnavailable`, which the
    mapper counts per site and system: a misconfigured token must show on the data-quality panel, not stop the feed.
    """

    def __init__(self, client: TerminologyClient) -> None:
        self.client = client

    def __call__(self, system: str, code: str, site: str | None = None) -> list[Match]:
        config = self.client.config
        for target in config.target_systems or [None]:
            try:
                found = self.client.translate(system, code, target, config.conceptmap_url)
            except TerminologyError as exc:
                raise TerminologyUnavailable(str(exc)) from None
            allowed = STANDARD_SYSTEMS if target is None else {target}
            matches = [
                Match(t.system, t.code, t.equivalence, t.source or config.base_url)
                for t in found
                if t.acceptable and t.system in allowed
            ]
            if matches:
                return sorted(matches, key=lambda m: _RANK.get(m.equivalence, len(_RANK)))
        return []


# --- Parameters → results ------------------------------------------------------------------------------------------


def _parameters(body: dict, where: str) -> list[dict]:
    params = body.get("parameter") or []
    if not isinstance(params, list):
        raise TerminologyError(f"{where}: Parameters.parameter is not a list")
    return [p for p in params if isinstance(p, dict)]


def _translations(body: dict | None, where: str) -> list[Translation]:
    if body is None:  # unreachable: $translate is asked without missing_ok
        return []
    params = _parameters(body, where)
    result = next((p.get("valueBoolean") for p in params if p.get("name") == "result"), None)
    if not isinstance(result, bool):
        raise TerminologyError(f"{where}: $translate answer has no boolean 'result' parameter")
    out = []
    for match in (p for p in params if p.get("name") == "match"):
        parts = {q.get("name"): q for q in match.get("part") or () if isinstance(q, dict)}
        concept = (parts.get("concept") or {}).get("valueCoding") or {}
        if "equivalence" in parts:
            equivalence = parts["equivalence"].get("valueCode")
        elif "relationship" in parts:  # R5
            relationship = parts["relationship"].get("valueCode")
            equivalence = R5_RELATIONSHIP_TO_R4.get(relationship or "")
            if equivalence is None:
                raise TerminologyError(f"{where}: match has R5 relationship {relationship!r}, not one of "
                                       f"{', '.join(R5_RELATIONSHIP_TO_R4)}")
        else:  # no equivalence given: related somehow, not trusted for outcome measurement
            equivalence = "relatedto"
        if equivalence not in EQUIVALENCES:
            raise TerminologyError(f"{where}: match has equivalence {equivalence!r}, not an R4 ConceptMap code")
        if equivalence in ACCEPTABLE and not (concept.get("system") and concept.get("code")):
            raise TerminologyError(f"{where}: match '{equivalence}' has no concept system and code")
        source = (parts.get("source") or {}).get("valueUri") or (parts.get("originMap") or {}).get("valueCanonical")
        out.append(Translation(concept.get("system") or "", concept.get("code") or "", concept.get("display"),
                               equivalence, source))
    if not result and any(t.acceptable for t in out):
        raise TerminologyError(f"{where}: $translate says result=false but returns an acceptable match; "
                               "the server contradicts itself, report it to its operator")
    return out


def _lookup(body: dict | None, where: str) -> Lookup | None:
    if body is None:
        return None
    display = None
    properties: dict[str, list[object]] = {}
    for p in _parameters(body, where):
        if p.get("name") == "display":
            display = p.get("valueString")
        elif p.get("name") == "property":
            parts = [q for q in p.get("part") or () if isinstance(q, dict)]
            code = next((q.get("valueCode") for q in parts if q.get("name") == "code"), None)
            value = next((v for q in parts if q.get("name") == "value"
                          for k, v in q.items() if k.startswith("value")), None)
            if code:
                properties.setdefault(code, []).append(value)
    return Lookup(display, {k: tuple(v) for k, v in properties.items()})


def _subsumption(body: dict | None, where: str) -> Subsumption:
    outcome = next((p.get("valueCode") for p in _parameters(body or {}, where) if p.get("name") == "outcome"), None)
    if outcome not in SUBSUMPTION_OUTCOMES:
        raise TerminologyError(f"{where}: $subsumes outcome {outcome!r} is not one of "
                               f"{', '.join(sorted(SUBSUMPTION_OUTCOMES))}")
    return outcome  # type: ignore[return-value]

