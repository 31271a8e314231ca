"""De-identification guard: keyed subject pseudonyms, detection of direct identifiers, redacted copies.

The HIPAA Safe Harbor list (45 CFR 164.514(b)(2)) drives what counts as a direct identifier of a person: names,
addresses below state, telecom, record/SSN-type identifiers, photos, exact dates (birth, death) and ages over 89.
Those elements live on person resources (Patient, RelatedPerson, Person), whether sent alone, contained in another
resource, or rendered in a narrative; an ``identifier`` on a RiskAssessment or Encounter is a business id, not a
person's.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any

PERSON_TYPES = frozenset({"Patient", "RelatedPerson", "Person"})
_DIRECT_ELEMENTS = ("name", "telecom", "address", "identifier", "photo", "contact")
_IDENTIFYING_VALUES = ("valueHumanName", "valueAddress", "valueContactPoint", "valueIdentifier", "valueAttachment")
_IDENTIFYING_VALUE_KEYS = frozenset(_IDENTIFYING_VALUES)
_SUSPECT_PERSON_KEYS = frozenset((*_DIRECT_ELEMENTS, "deceasedDateTime", "text"))
"""A person whose top-level keys miss all of these has no direct element, death date or narrative to report: the
element-by-element checks are skipped (an absent key reads as None, which is never reported). The birth date and
the extensions are always checked. tests/test_deid_fastpath.py proves the shortcut equal to the full walk."""
MOTHERS_MAIDEN_NAME = "patient-mothersMaidenName"
OVER_89 = "age over 89"
FULL_BIRTH_DATE = "birthDate (full date)"


KEYED_PREFIX = "vigil-key."
"""Starts the id of a Patient or Encounter that vigil already keyed, in the payloads it stores (dead letters):
``vigil-key.<key>.<tag>``, where ``tag`` is an HMAC of the type and key under the same secret, so only a holder of
the subject key can produce one."""
FREE_TEXT_ELEMENTS = frozenset({"note", "comment", "patientInstruction", "valueString"})
"""Annotation and comment elements, and string values (``Observation.valueString``, an extension's string): free
text, which may name anyone — never kept in a stored copy. (scripts/reliability/identifiers.py found a caller's name
and phone in a dead-lettered Observation.valueString.)"""
UNREADABLE_BIRTH_DATE = "(not kept: not a FHIR date)"
"""What a stored copy holds instead of a birth date that is not a FHIR date (it may be one in another format)."""
NOT_A_NUMBER = "(not kept: not a number)"
"""What a stored copy holds instead of a numeric element's value that is not a JSON number (a string in
``prediction[].probabilityDecimal`` may be a sender's column mix-up carrying an SSN: found by
scripts/reliability/identifiers.py, issue #9). Still no number, so a replayed copy is rejected for the same reason."""
_NUMERIC_SUFFIXES = ("Decimal", "Integer", "Integer64", "UnsignedInt", "PositiveInt")
"""FHIR choice-type element names of number type (``probabilityDecimal``, ``valueInteger``)."""
KEYED_TYPES = ("Patient", "Encounter")
"""Resource types whose ids are keyed wherever they appear: the patient, and the visit (a visit or account number
identifies a person too — Safe Harbor's "any other unique identifying number")."""


class SubjectKeyer:
    """Keyed hash so subjects are pseudonymous, stable across feeds, and not reversible without the secret.

    A reference already keyed by this keyer and marked (``marked``: what ``redact`` writes into stored payloads) keys
    to the key it carries, not to a hash of the hash: a dead letter replayed through the decoder keys its subject
    once, to the same pseudonym the original resource had. The mark is authenticated (HMAC tag, RFC 2104), so a feed
    cannot choose a pseudonym by sending an id that looks marked: an unverified one is keyed like any other id.
    """

    __slots__ = ("_keyed", "_cache")
    _CACHE_SIZE = 1 << 16

    def __init__(self, secret: str):
        if not secret:
            raise ValueError("subject_key is empty: set a secret in the config (subject_key) or VIGIL_SUBJECT_KEY")
        # keyed once: a copy of this HMAC skips re-deriving the padded key per subject (RFC 2104), a quarter faster
        self._keyed = hmac.new(secret.encode(), digestmod=hashlib.sha256)
        self._cache: dict[str, str] = {}

    def key(self, reference: str) -> str:
        """HMAC-SHA256 of ``Patient/<id>``, first 32 hex characters (128 bits); memoised, a subject recurs often.

        ``Patient/vigil-key.<key>.<tag>`` with a valid tag (see ``marked``) gives ``<key>`` itself.
        """
        cached = self._cache.get(reference)
        if cached is None:
            if len(self._cache) >= self._CACHE_SIZE:
                self._cache.clear()
            cached = self._cache[reference] = self._already_keyed(reference) or self._hash(reference)
        return cached

    def marked(self, reference: str) -> str:
        """The id to store for a keyed reference: ``vigil-key.<key>.<tag>`` (59 characters, a valid FHIR id)."""
        key = self.key(reference)
        return f"{KEYED_PREFIX}{key}.{self._tag(reference.partition('/')[0], key)}"

    def _hash(self, text: str) -> str:
        mac = self._keyed.copy()
        mac.update(text.encode())
        return mac.hexdigest()[:32]

    def _tag(self, rtype: str, key: str) -> str:
        # "\0" cannot occur in a FHIR reference, so a tag is never the key of any reference; the type is in the tag,
        # so a patient's mark does not pass as a visit's
        return self._hash(f"\0keyed\0{rtype}\0{key}")[:16]

    def _already_keyed(self, reference: str) -> str | None:
        """The key a marked ``Patient/<id>`` (or ``Encounter/<id>``) carries, if its tag verifies; else None (it is an
        ordinary id)."""
        rtype, _, rid = reference.partition("/")
        if rtype not in KEYED_TYPES or not rid.startswith(KEYED_PREFIX):
            return None
        key, _, tag = rid[len(KEYED_PREFIX):].partition(".")
        if len(key) == 32 and len(tag) == 16 and hmac.compare_digest(tag, self._tag(rtype, key)):
            return key
        return None


def oldest_safe_birth_year(today: datetime | None = None) -> int:
    """Birth years before this one mean an age over 89; Safe Harbor aggregates them into one "90 or older" year."""
    return (today or datetime.now(UTC)).year - 90


def find_identifiers(resource: dict, oldest_year: int | None = None) -> list[str]:
    """Names of the direct-identifier elements present on a person resource or on persons it contains.

    Contained persons are reported as ``contained.<element>``. Other resource types report only their contained persons.
    """
    oldest_year = oldest_safe_birth_year() if oldest_year is None else oldest_year
    found = _person_identifiers(resource, oldest_year) if resource.get("resourceType") in PERSON_TYPES else []
    contained = resource.get("contained")
    for inner in contained if isinstance(contained, list) else ():
        if isinstance(inner, dict):
            found.extend(f"contained.{name}" for name in find_identifiers(inner, oldest_year))
    return list(dict.fromkeys(found)) if len(found) > 1 else found


def _person_identifiers(person: dict, oldest_year: int) -> list[str]:
    """The direct identifiers of one person resource, in a fixed order (elements, birth date, death, narrative,
    extensions). Hot path: every Patient of a feed passes here, hence the key-set shortcut (``_SUSPECT_PERSON_KEYS``)."""
    suspect = not _SUSPECT_PERSON_KEYS.isdisjoint(person)
    found = [name for name in _DIRECT_ELEMENTS if person.get(name)] if suspect else []
    birth = person.get("birthDate")
    if isinstance(birth, str) and birth:
        if len(birth) > 4:
            found.append(FULL_BIRTH_DATE)
        if birth[:4].isdecimal() and int(birth[:4]) < oldest_year:  # isdigit() also passes "²", which int() refuses
            found.append(OVER_89)
    if suspect:
        if person.get("deceasedDateTime"):
            found.append("deceasedDateTime")
        text = person.get("text")
        if isinstance(text, dict) and text.get("div"):
            found.append("text.div")
    if "extension" in person:
        found.extend(f"extension {_last_segment(ext.get('url'))}" for ext in _identifying_extensions(person))
    return found


def _identifying_extensions(element: dict) -> list[dict]:
    """Extensions whose value is a name, address, telecom, identifier or attachment, or a mother's maiden name."""
    extensions = element.get("extension")
    return [
        ext
        for ext in (extensions if isinstance(extensions, list) else ())
        if isinstance(ext, dict)
        and (not _IDENTIFYING_VALUE_KEYS.isdisjoint(ext) or str(ext.get("url")).endswith(MOTHERS_MAIDEN_NAME))
    ]


def _last_segment(url: object) -> str:
    return str(url or "").rstrip("/").rsplit("/", 1)[-1] or "(no url)"


def safe_birth_year(birth_date: str, oldest_year: int) -> int:
    """The year of a FHIR date (any precision), aggregated to ``oldest_year`` when the person is over 89."""
    return max(int(birth_date[:4]), oldest_year)


def without_keyed_id(where: str) -> str:
    """``Type/id`` with the id dropped when the type's ids identify a person (``KEYED_TYPES``) — for text a feed
    supplied, where no keyer applies."""
    rtype, sep, _ = where.partition("/")
    return f"{rtype}/(id not kept)" if sep and rtype in KEYED_TYPES else where


def keyed_reference(reference: str, keyer: SubjectKeyer) -> str:
    """``Patient/<id>`` or ``Encounter/<id>`` (possibly absolute or versioned) → ``<Type>/<marked key>``; other
    references unchanged.

    The marked key (``SubjectKeyer.marked``) lets a stored payload be decoded again without keying it twice.

    A conditional reference ``Patient?identifier=...`` carries the identifier itself and is blanked.
    """
    for rtype in KEYED_TYPES:
        if reference.startswith(f"{rtype}?") or f"/{rtype}?" in reference:
            return f"{rtype}?(redacted)"
        head, sep, tail = reference.partition(f"{rtype}/")
        if sep and (not head or head.endswith("/")):
            return f"{rtype}/{keyer.marked(f'{rtype}/' + tail.split('/', 1)[0])}"
    return reference


def _plain_number(value: object, key: str) -> bool:
    """A JSON number (not a boolean); for a probability, also one from -100 to 100, as the decoder's reason shows it
    (a long number in a score field may be an identifier too)."""
    if value.__class__ not in (int, float):
        return False
    return key != "probabilityDecimal" or -100 <= value <= 100


def redact(resource: dict, keyer: SubjectKeyer, oldest_year: int | None = None) -> dict:
    """A copy safe to store in a dead letter: no direct identifiers, no narrative, Patient ids and references keyed
    (and marked as keyed, so decoding the copy again gives the same subject key).

    Reference displays (often the patient's name), reference identifiers, inline attachment data and free-text notes
    and comments are dropped too; person ids in an OperationOutcome's ``expression`` are masked; a numeric element
    holding anything but a number (free text) becomes ``NOT_A_NUMBER``.
    """
    oldest_year = oldest_safe_birth_year() if oldest_year is None else oldest_year
    return _redact_value(resource, keyer, oldest_year)


def _redact_value(value: Any, keyer: SubjectKeyer, oldest_year: int) -> Any:
    if isinstance(value, list):
        return [_redact_value(item, keyer, oldest_year) for item in value]
    if not isinstance(value, dict):
        return value
    person = value.get("resourceType") in PERSON_TYPES
    # a Reference, also a logical one (only identifier and/or display): its display and identifier name the target
    is_reference = isinstance(value.get("reference"), str) or (
        ("display" in value or "identifier" in value) and not ("resourceType" in value or "code" in value
                                                               or "system" in value))
    dropped = _identifying_extensions(value) if person else ()
    out: dict = {}
    for key, item in value.items():
        if key == "text" and "resourceType" in value:
            continue
        if person and (key in _DIRECT_ELEMENTS or key == "deceasedDateTime"):
            continue
        if is_reference and key in ("display", "identifier"):
            continue
        if key == "data" and "contentType" in value or key in FREE_TEXT_ELEMENTS:
            continue
        if key == "reference" and isinstance(item, str):
            out[key] = keyed_reference(item, keyer)
        elif key == "id" and value.get("resourceType") in KEYED_TYPES and isinstance(item, str):
            out[key] = keyer.marked(f"{value['resourceType']}/{item}")
        elif person and key == "birthDate":
            # a birth date in any other form (04/11/1937) may still be the exact date: replaced by a placeholder that
            # is no FHIR date either, so the copy is rejected again for the same reason when it is replayed
            valid = isinstance(item, str) and item[:4].isdecimal()
            out[key] = str(safe_birth_year(item, oldest_year)) if valid else UNREADABLE_BIRTH_DATE
        elif key.endswith(_NUMERIC_SUFFIXES) and not _plain_number(item, key):
            out[key] = NOT_A_NUMBER
        elif key == "expression" and isinstance(item, list):  # OperationOutcome: "Type/id" paths
            out[key] = [without_keyed_id(e) if isinstance(e, str) else e for e in item]
        elif key == "extension" and dropped:
            kept = [ext for ext in item if not any(ext is d for d in dropped)]
            if kept:
                out[key] = _redact_value(kept, keyer, oldest_year)
        else:
            out[key] = _redact_value(item, keyer, oldest_year)
    return out
