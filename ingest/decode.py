"""FHIR resource → domain record: the fast path reads exactly the elements docs/feed.md lists, nothing else.

Plain dict access, no model objects: the fast path must keep up with ~100,000 resources/s. ``strict=True`` adds full
FHIR R4B validation (fhir.resources) in front of it. Identifiers never pass: subjects are keyed, person identifiers
are either not copied (``strip``, counted) or the resource is quarantined; dead-letter payloads are redacted copies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Literal

import orjson
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from ingest.deid import (KEYED_TYPES, PERSON_TYPES, SubjectKeyer, find_identifiers, oldest_safe_birth_year, redact,
                        safe_birth_year, without_keyed_id)
from ingest.reader import NOT_FHIR
from vigil.domain import (
    Coding,
    DeadLetter,
    DeviceInfo,
    EncounterInfo,
    Fact,
    FeedClock,
    Position,
    Prediction,
    SiteInfo,
    SubjectInfo,
)

Record = SubjectInfo | SiteInfo | DeviceInfo | EncounterInfo | Prediction | Fact | FeedClock

MODEL_SYSTEM = "https://vigil.dev/fhir/CodeSystem/model"
DEVICE_KIND_SYSTEM = "https://vigil.dev/fhir/CodeSystem/device-kind"
RACE_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
ETHNICITY_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
IDENTIFIERS_PRESENT = "identifiers present"
FEED_CLOCK = "vigil-feed-clock"  # the name of a Parameters resource's parameter that carries the feed's clock
FETCH_FAILURE_SYSTEM = "https://vigil.dev/fhir/CodeSystem/fetch-failure"
"""Marks the OperationOutcome that stands for a resource an id-only notification named but vigil could not read
(``ingest.id_only``)."""
_DEVICE_KINDS = {"ai-model": "model", "acquisition-device": "scanner"}
_CODING_CACHE_SIZE = 1 << 16
_REFERENCE_CACHE_SIZE = 1 << 16
_EMPTY: dict = {}
_fromisoformat = datetime.fromisoformat


class Rejected(ValueError):
    """The resource breaks the feed profile; the message names the element ("missing subject", "invalid ...")."""


def parse_datetime(text: str) -> datetime:
    """A FHIR date, dateTime or instant of any precision (YYYY, YYYY-MM, ...) → aware UTC; naive means UTC.

    Not memoised: in a feed most timestamps are distinct (BENCHMARKS.md §Ingest fast path: 198,167 distinct of
    231,566), and ``datetime.fromisoformat`` (C, Python 3.11 reads "Z") costs about what a cache miss's bookkeeping does. A "Z" or
    "+00:00" time already comes back in ``UTC``; ``astimezone`` would return the same object.
    """
    n = len(text)
    if n == 4:
        return datetime(int(text), 1, 1, tzinfo=UTC)
    if n == 7 and text[4] == "-":
        return datetime(int(text[:4]), int(text[5:]), 1, tzinfo=UTC)
    value = _fromisoformat(text)
    tz = value.tzinfo
    if tz is UTC:
        return value
    return value.replace(tzinfo=UTC) if tz is None else value.astimezone(UTC)


class Decoder:
    """Decodes one resource at a time into a ``Record``, a ``DeadLetter``, or ``None`` for types vigil does not use."""

    def __init__(self, keyer: SubjectKeyer, policy: Literal["strip", "quarantine"] = "strip", strict: bool = False,
                 models: Iterable[str] | None = None):
        """``models``: the configured model ids. When given, a RiskAssessment of another model is rejected here,
        where its redacted payload can still be kept, so `vigil deadletters replay` can re-inject it once the model
        is configured; None leaves that check to the pipeline (whose dead letter then has no payload)."""
        if policy not in ("strip", "quarantine"):
            raise ValueError(f"deid_policy must be 'strip' or 'quarantine', got {policy!r}")
        self.keyer = keyer
        self.policy = policy
        self.strict = strict
        self.models: frozenset[str] | None = None if models is None else frozenset(models)
        self.stripped: Counter[str] = Counter()
        self._coding_cache: dict[tuple[str, str, str | None], Coding] = {}
        # raw reference string → keyed id; the keyer's own cache holds the same raw ids, bounded alike
        self._subject_keys: dict[str, str] = {}
        self._encounter_keys: dict[str, str] = {}
        self._oldest_year = oldest_safe_birth_year()
        self._handlers: dict[str, Callable[[dict], Record]] = {
            "RiskAssessment": self._risk_assessment,
            "Condition": self._condition,
            "Procedure": self._procedure,
            "Observation": self._observation,
            "Encounter": self._encounter,
            "Patient": self._patient,
            "Device": self._device,
            "Organization": self._organization,
            "Parameters": self._feed_clock,
        }

    def decode(self, resource: dict, position: Position) -> Record | DeadLetter | None:
        rtype = resource.get("resourceType")
        if rtype.__class__ is not str:
            return DeadLetter(position, NOT_FHIR)
        if self.strict and (problem := _validation_problem(resource)):
            return self._dead_letter(resource, position, problem)
        handler = self._handlers.get(rtype)
        if handler is None:
            if rtype == "OperationOutcome":
                return _outcome_letter(resource, position)
            return None
        try:
            if rtype in PERSON_TYPES or "contained" in resource:
                found = find_identifiers(resource, self._oldest_year)
                if found:  # Counter.update costs as much as the check itself, even when given nothing
                    if self.policy == "quarantine":
                        reason = f"{IDENTIFIERS_PRESENT}: {', '.join(found)}"
                        return DeadLetter(position, reason, rtype, self._safe_id(resource), payload=None)
                    self.stripped.update(found)
            return handler(resource)
        except Rejected as exc:
            return self._dead_letter(resource, position, str(exc))
        except (AttributeError, TypeError, KeyError, IndexError, RecursionError) as exc:  # wrong JSON type, or
            # persons contained in persons deeper than Python's recursion limit
            problem = f"invalid structure ({type(exc).__name__}: {exc}); decode with strict=True to locate the element"
            return self._dead_letter(resource, position, problem)

    # --- dead letters ------------------------------------------------------------------

    def _dead_letter(self, resource: dict, position: Position, problem: str) -> DeadLetter:
        rtype, rid = resource.get("resourceType"), self._safe_id(resource)
        label = f"{rtype}/{rid}" if rid else f"{rtype} (no id)"
        try:
            payload: str | None = orjson.dumps(redact(resource, self.keyer, self._oldest_year)).decode()
        except (RecursionError, orjson.JSONEncodeError):  # nested deeper than a FHIR resource is (orjson: 254)
            payload, problem = None, f"{problem}; payload not kept: nested too deeply to store"
        return DeadLetter(position, f"{label}: {problem}", rtype if isinstance(rtype, str) else None, rid, payload)

    def _safe_id(self, resource: dict) -> str | None:
        """The resource id fit for a dead letter: a Patient's or Encounter's id is keyed as its references are."""
        rid, rtype = resource.get("id"), resource.get("resourceType")
        if not isinstance(rid, str) or not rid:
            return None
        return self.keyer.key(f"{rtype}/{rid}") if rtype in KEYED_TYPES else rid

    # --- reference data ----------------------------------------------------------------

    def _patient(self, r: dict) -> SubjectInfo:
        birth_year = None
        if (birth := r.get("birthDate")) is not None:
            if not (isinstance(birth, str) and len(birth) >= 4 and birth[:4].isdecimal()):  # int() reads these
                raise Rejected("invalid birthDate (must be YYYY, YYYY-MM or YYYY-MM-DD)")
            birth_year = safe_birth_year(birth, self._oldest_year)
        race = ethnicity = None
        for ext in r.get("extension") or ():
            url = ext.get("url")
            if url == RACE_URL:
                race = _omb_category(ext)
            elif url == ETHNICITY_URL:
                ethnicity = _omb_category(ext)
        return SubjectInfo(self.keyer.key(f"Patient/{_id(r)}"), birth_year, _string(r.get("gender"), "gender"), race,
                           ethnicity)

    def _feed_clock(self, r: dict) -> FeedClock | None:
        """A ``Parameters`` resource is used only as the feed's clock (``vigil-feed-clock``); any other is ignored."""
        for p in _list(r.get("parameter")):
            if isinstance(p, dict) and p.get("name") == FEED_CLOCK:
                return FeedClock(_time(p.get("valueInstant"), f"Parameters.parameter({FEED_CLOCK}).valueInstant"))
        return None

    def _organization(self, r: dict) -> SiteInfo:
        name = r.get("name")
        return SiteInfo(_id(r), name if isinstance(name, str) else None)

    def _device(self, r: dict) -> DeviceInfo:
        kind = "other"
        for coding in (r.get("type") or _EMPTY).get("coding") or ():
            if coding.get("system") == DEVICE_KIND_SYSTEM:
                kind = _DEVICE_KINDS.get(coding.get("code"), "other")
                break
        names, versions = r.get("deviceName") or (), r.get("version") or ()
        model = r.get("modelNumber")
        if kind == "model" and names and names[0].get("name"):
            model = names[0]["name"]
        return DeviceInfo(
            device_id=_id(r),
            kind=kind,
            manufacturer=_string(r.get("manufacturer"), "manufacturer"),
            model=_string(model, "deviceName[0].name or modelNumber"),
            version=_string(versions[0].get("value"), "version[0].value") if versions else None,
            site=reference_id(r.get("owner"), "Organization", conditional=True),
        )

    def _encounter(self, r: dict) -> EncounterInfo:
        start = (r.get("period") or _EMPTY).get("start")
        return EncounterInfo(
            encounter=self._encounter_key(_id(r)),
            subject=self._subject(r),
            site=reference_id(r.get("serviceProvider"), "Organization", conditional=True),
            start=_time(start, "period.start") if start is not None else None,
        )

    # --- events --------------------------------------------------------------------------

    def _risk_assessment(self, r: dict) -> Prediction:
        get = r.get
        rid, status, occurred, performer = get("id"), get("status"), get("occurrenceDateTime"), get("performer")
        if not (rid and status and occurred and performer):
            raise Rejected(_first_missing(r, ("id", "status", "occurrenceDateTime", "performer")))
        if rid.__class__ is not str:
            raise Rejected("invalid id (must be a string)")
        if status.__class__ is not str:
            raise Rejected("invalid status (must be a code)")
        subject = self._subject(r)
        try:
            score = r["prediction"][0]["probabilityDecimal"]
        except (KeyError, IndexError, TypeError):
            raise Rejected("missing prediction[0].probabilityDecimal") from None
        if not ((score.__class__ is float or score.__class__ is int) and 0 <= score <= 1):
            raise Rejected(f"invalid prediction[0].probabilityDecimal {_score_shown(score)} (must be a number from 0 "
                           "to 1)")
        model_id = None
        for coding in (get("method") or _EMPTY).get("coding") or ():
            if coding.get("system") == MODEL_SYSTEM:
                model_id = coding.get("code")
                break
        if not model_id:
            raise Rejected(f"missing method.coding with system {MODEL_SYSTEM} (the model id)")
        if self.models is not None and model_id not in self.models:
            raise Rejected(unknown_model(model_id))
        model_device = reference_id(performer, "Device")
        if model_device is None:
            raise Rejected("invalid performer (must reference Device/<id> of the AI model)")
        scanner = None
        for basis in get("basis") or ():
            if (scanner := reference_id(basis, "Device")) is not None:
                break
        meta = get("meta") or _EMPTY
        # Positional: 2-3x cheaper than keywords here; test_risk_assessment_decodes_to_a_prediction pins the order.
        return Prediction(
            rid,
            _version_id(meta),
            status,
            model_id,
            "",  # model_version: resolved from the model Device by the pipeline
            subject,
            self._encounter_ref(get("encounter")),
            _time(occurred, "occurrenceDateTime"),
            float(score),
            model_device,
            scanner,
            None,  # site: resolved from the encounter by ontology
            _received(meta),
        )

    def _condition(self, r: dict) -> Fact:
        status = _first_code(r.get("verificationStatus"))
        if status != "entered-in-error":
            status = _first_code(r.get("clinicalStatus")) or "active"
        return self._fact(r, _event_time(r, "onsetDateTime", "recordedDate"), status)

    def _procedure(self, r: dict) -> Fact:
        if (performed := r.get("performedDateTime")) is not None:
            time = _time(performed, "performedDateTime")
        elif (start := (r.get("performedPeriod") or _EMPTY).get("start")) is not None:
            time = _time(start, "performedPeriod.start")
        else:
            raise Rejected("missing performedDateTime or performedPeriod.start")
        return self._fact(r, time, r.get("status") or "unknown")

    def _observation(self, r: dict) -> Fact:
        fact = self._fact(r, _event_time(r, "effectiveDateTime"), r.get("status") or "unknown")
        quantity = r.get("valueQuantity")
        if quantity:
            value = quantity.get("value")
            if not (value is None or value.__class__ is float or value.__class__ is int):
                raise Rejected("invalid valueQuantity.value (must be a number)")
            fact.value = None if value is None else float(value)
            unit = quantity.get("code") or quantity.get("unit")
            fact.unit = unit if unit is None or unit.__class__ is str else _string(unit, "valueQuantity.code or unit")
        return fact

    def _fact(self, r: dict, time: datetime, status: str) -> Fact:
        rid = r.get("id")
        if not rid:
            raise Rejected("missing id")
        if rid.__class__ is not str:
            raise Rejected("invalid id (must be a string)")
        if status.__class__ is not str:
            raise Rejected("invalid status (must be a code)")
        codings = self._codings((r.get("code") or _EMPTY).get("coding") or ())
        if not codings:
            raise Rejected("missing code.coding (at least one coding with system and code)")
        meta = r.get("meta") or _EMPTY
        # Positional, like Prediction; the Fact tests pin the order.
        return Fact(
            r["resourceType"],
            rid,
            _version_id(meta),
            status,
            self._subject(r),
            self._encounter_ref(r.get("encounter")),
            codings,
            time,
            None,  # value, unit: Observation only
            None,
            _received(meta),
        )

    def _codings(self, codings: list) -> tuple[Coding, ...]:
        """Complete codings as shared ``Coding`` objects: feeds repeat few codes; frozen dataclasses build slowly."""
        out = []
        cache = self._coding_cache
        for c in codings:
            system, code = c.get("system"), c.get("code")
            if system and code:
                ident = (system, code, c.get("display"))
                coding = cache.get(ident)
                if coding is None:
                    if len(cache) >= _CODING_CACHE_SIZE:
                        cache.clear()
                    coding = cache[ident] = Coding(*ident)
                out.append(coding)
        return tuple(out)

    def _encounter_key(self, encounter: str | None) -> str | None:
        """Visit numbers identify people too: encounters are keyed like subjects, so joins still work."""
        return self.keyer.key("Encounter/" + encounter) if encounter else None

    def _encounter_ref(self, reference: object) -> str | None:
        """``_encounter_key(reference_id(reference, "Encounter"))``, memoised by the reference string."""
        ref = reference.get("reference") if reference.__class__ is dict else None
        if ref.__class__ is str:
            key = self._encounter_keys.get(ref)  # type: ignore[arg-type]
            if key is None:
                key = self._encounter_key(reference_id(reference, "Encounter"))
                if key is None:
                    return None
                _bounded_put(self._encounter_keys, ref, key)  # type: ignore[arg-type]
            return key
        return None  # reference_id gives None for anything but a dict with a string reference

    def _subject(self, r: dict) -> str:
        subject = r.get("subject")
        if subject is None:
            raise Rejected("missing subject")
        ref = subject.get("reference") if subject.__class__ is dict else None
        if ref.__class__ is str and (key := self._subject_keys.get(ref)) is not None:  # type: ignore[arg-type]
            return key
        patient = reference_id(subject, "Patient")
        if patient is None:
            if str(subject.get("reference", "")).startswith("urn:"):  # the uuid itself may be the patient's id
                raise Rejected("invalid subject: unresolved urn: reference (no entry of its Bundle has that fullUrl;"
                               " send the Patient in the same Bundle or reference Patient/<id>)")
            raise Rejected("invalid subject (must reference Patient/<id>)")
        key = self.keyer.key("Patient/" + patient)
        _bounded_put(self._subject_keys, ref, key)  # type: ignore[arg-type]
        return key


def unknown_model(model_id: object) -> str:
    """The problem text of a prediction of a model the config does not list (the pipeline's own check says the same)."""
    return f"unknown model '{model_id}' (configure it under models: to monitor it)"


def _bounded_put(cache: dict, key: object, value: object) -> None:
    if len(cache) >= _REFERENCE_CACHE_SIZE:
        cache.clear()
    cache[key] = value


def reference_id(reference: object, rtype: str, conditional: bool = False) -> str | None:
    """The id a Reference points to, if it points to ``rtype``: ``Type/id``, absolute or ``/_history/n`` forms.

    With ``conditional``, ``Type?identifier=system|value`` gives ``value`` (Synthea refers to Organizations this way).
    """
    ref = reference.get("reference") if reference.__class__ is dict else None
    if ref.__class__ is not str:
        return None
    head, _, tail = ref.partition("/")
    if head == rtype and tail and "/" not in tail:  # the common "Type/id"
        return tail
    prefix = rtype + "/"
    if ref.startswith(prefix):
        rest = ref[len(prefix) :]
    elif (at := ref.find("/" + prefix)) >= 0:
        rest = ref[at + 1 + len(prefix) :]
    elif conditional and ref.startswith(rtype + "?identifier="):
        return ref.rsplit("|", 1)[-1] or None
    else:
        return None
    return rest.split("/", 1)[0] or None


def _version_id(meta: dict) -> str:
    """``meta.versionId`` as text, "1" if absent. A FHIR id is ASCII (letters, digits, '-' and '.'); a non-ASCII
    one ("²": ``str.isdigit`` passes it, ``int`` refuses it) is rejected before the pipeline orders versions by it."""
    version = str(meta.get("versionId") or "1")
    if version.isascii():
        return version
    raise Rejected("invalid meta.versionId (must be a FHIR id: ASCII letters, digits, '-' and '.')")


def _string(value: object, element: str) -> str | None:
    """A string element (code, unit, name) as sent, None if absent; another JSON type is rejected, so that no
    later step (units, subgroups, the store) meets a list or an object where it reads text."""
    if value is None or value.__class__ is str:
        return value  # type: ignore[return-value]
    raise Rejected(f"invalid {element} (must be a string, got {type(value).__name__})")


def _score_shown(score: object) -> str:
    """A wrong score as the dead-letter reason shows it: a number from -100 to 100 itself (a percentage, another
    scale), anything else by its JSON type only — a string or a long number in the score field may be a sender's
    column mix-up carrying an SSN or MRN (found by scripts/reliability/identifiers.py, issue #9)."""
    if score.__class__ in (int, float) and -100 <= score <= 100:
        return repr(score)
    if score.__class__ in (int, float):
        return "(a JSON number outside -100 to 100; value not kept)"
    kind = {str: "string", bool: "boolean", dict: "object", list: "array", type(None): "null"}.get(
        score.__class__, type(score).__name__)
    return f"(a JSON {kind}; value not kept)"


def _first_missing(r: dict, elements: tuple[str, ...]) -> str:
    return next(f"missing {e}" for e in elements if not r.get(e))


def _id(r: dict) -> str:
    rid = r.get("id")
    if not isinstance(rid, str) or not rid:
        raise Rejected("missing id")
    return rid


def _time(text: object, element: str) -> datetime:
    """``parse_datetime`` naming ``element`` on failure; a full dateTime (the common case) is parsed inline."""
    try:
        if len(text) > 7:  # type: ignore[arg-type]  # not YYYY or YYYY-MM: what parse_datetime does, one call less
            value = _fromisoformat(text)  # type: ignore[arg-type]
            tz = value.tzinfo
            if tz is UTC:
                return value
            return value.replace(tzinfo=UTC) if tz is None else value.astimezone(UTC)
        return parse_datetime(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise Rejected(f"invalid {element} (not a FHIR dateTime)") from None


def _event_time(r: dict, *elements: str) -> datetime:
    for element in elements:
        if (text := r.get(element)) is not None:
            return _time(text, element)
    raise Rejected(f"missing {' or '.join(elements)}")


def _received(meta: dict) -> datetime | None:
    updated = meta.get("lastUpdated")
    return None if updated is None else _time(updated, "meta.lastUpdated")


def _first_code(concept: object) -> str | None:
    codings = concept.get("coding") if isinstance(concept, dict) else None
    return codings[0].get("code") if codings else None


def _omb_category(extension: dict) -> str | None:
    for sub in extension.get("extension") or ():
        if sub.get("url") == "ombCategory":
            return _string((sub.get("valueCoding") or {}).get("code"), f"{extension.get('url')} ombCategory code")
    return None


def _not_a_type(rtype: str) -> str:
    return f"invalid resourceType {rtype[:64]!r} (not a FHIR R4B resource)"


def _outcome_letter(outcome: dict, position: Position) -> DeadLetter:
    """An OperationOutcome in a feed (a bulk-data ``error`` file, a failed Bundle entry) is the server's report
    that something could not be delivered: a dead letter with its issue codes. Free text (``diagnostics``,
    ``details.text``) is left out of reason and payload alike, since it may quote patient data."""
    issues = []
    for issue in _list(outcome.get("issue")):
        if isinstance(issue, dict):
            details = issue.get("details") if isinstance(issue.get("details"), dict) else {}
            codings = [{"system": _text(c.get("system")), "code": _text(c.get("code"))}
                       for c in _list(details.get("coding")) if isinstance(c, dict)]
            issues.append({"severity": _text(issue.get("severity")), "code": _text(issue.get("code")),
                           **({"details": {"coding": codings}} if codings else {}),
                           **({"expression": [without_keyed_id(e) for e in issue["expression"] if isinstance(e, str)]}
                              if isinstance(issue.get("expression"), list) else {})})
    rid = outcome.get("id") if isinstance(outcome.get("id"), str) else None
    payload = orjson.dumps({"resourceType": "OperationOutcome", "issue": issues}).decode()
    if (failed := _fetch_failure(issues)) is not None:
        return DeadLetter(position, *failed, payload)
    label = f"OperationOutcome/{rid}" if rid else "OperationOutcome (no id)"
    codes = ", ".join(f"{i['severity']}/{i['code']}" for i in issues) or "no issues"
    reason = (f"{label}: server error ({codes}; the server reported that it could not deliver some data — check "
              "the export or search on the server side, then re-request it)")
    return DeadLetter(position, reason, "OperationOutcome", rid, payload)


def _list(value: object) -> list:
    """An element the profile says is a list, or [] when a feed sends something else (reported by the caller)."""
    return value if isinstance(value, list) else []


def _text(value: object) -> str | None:
    """A code or system kept from an OperationOutcome: strings only (anything else could nest without bound)."""
    return value if isinstance(value, str) else None


def _fetch_failure(issues: list[dict]) -> tuple[str, str | None, str | None] | None:
    """(reason, resource type, resource id) of an ``ingest.id_only`` fetch-failure outcome, else None."""
    for issue in issues:
        for coding in (issue.get("details") or _EMPTY).get("coding") or ():
            if coding.get("system") == FETCH_FAILURE_SYSTEM:
                # a feed could send this outcome too: a person's id in it is never kept
                where = without_keyed_id(str(next(iter(issue.get("expression") or ()), "(unknown reference)")))
                rtype, _, rid = where.partition("/")
                reason = (f"{where}: not fetched for an id-only subscription notification ({issue['code']}, "
                          f"{coding.get('code')}); the notification was acknowledged and the stream went on "
                          "without it — fix the cause on the FHIR server, then have it resend the resource or "
                          "re-read it with a REST catch-up")
                return reason, rtype or None, rid if rid and not rid.startswith("(") else None
    return None


def _validation_problem(resource: dict) -> str | None:
    """Full FHIR R4B validation (fhir.resources); the first error's location and message, or None."""
    rtype = resource.get("resourceType")
    try:
        model = get_fhir_model_class(rtype)
    except (ValueError, TypeError, KeyError):
        return _not_a_type(rtype)
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
        return f"fails FHIR R4B validation at {location or '(resource)'}: {first['msg']}"
    return None
