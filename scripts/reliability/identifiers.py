"""Issue #9 reliability campaign, part "identifiers": seed every source with canary identifiers, then search for them.

DESIGN.md §Reliability and security: "De-identified in, de-identified stored ... no identifier reaches the database or
the logs". The HIPAA Safe Harbor list (45 CFR 164.514(b)(2)) names what counts: names, addresses below state, telecom,
SSN / medical-record numbers and any other unique identifying number, exact dates of birth, ages over 89. This
campaign makes such values unique and greppable (every text canary holds the marker ``zyxqu`` or ``canaryname``;
numbers use reserved shapes: SSN ``987-NN-NNNN``, phone ``(555) 7NN-NNNN``, ZIP+4 ``96NNN-NNNN``, birth dates before
1990), puts them into a simulated feed (vigil.simulator) — on persons, in references' displays, notes, comments,
narratives, contained persons, ids — and into deliberately invalid resources (so they reach dead letters, their
reasons and replays), and sends that feed through every source vigil has:

- ``files``: ``vigil run --once --config`` with a ``kind: files`` source (the scanner-upgrade scenario, which fires
  alerts; routed to a webhook receiver, an SMTP server and Alertmanager, then delivered from the outbox);
- ``bulk-directory``, ``fhir-bulk-export`` (a real HTTP ``$export`` server on loopback), ``fhir-rest`` (the same
  server's paged search), ``kafka`` (librdkafka's mock cluster, a real Kafka-protocol server) and the subscription
  webhook of ``vigil serve`` (its app served by uvicorn on loopback; it forwards to a Kafka topic that a second
  ``kafka`` source consumes) — all in one ``vigil run --once --config`` into PostgreSQL (or SQLite);
- dead-letter replay (``vigil deadletters replay --all``) on that store;
- ``vigil ingest`` with ``deid_policy: quarantine``.

Afterwards it searches, case-insensitively and in normalised forms (digits-only phones, SSNs, ZIP+4 and birth dates;
US-style dates), every byte vigil produced: a full dump of each store (SQLite ``iterdump`` plus the raw database file,
PostgreSQL ``COPY`` of every table), the pipeline checkpoint pickles, every log record at DEBUG, the CLI's stdout and
stderr, outbound notifications (webhook requests, SMTP messages, the alerts Alertmanager holds), the generated report.
The same search must find every kind of canary in the inputs, or the campaign is void.

The Kafka topic the webhook forwards to carries the notified resources unchanged: it is vigil's *input* topic (the
webhook deliberately does no de-identification, vigil/webhook.py), so it is searched as an input (canaries expected
there) and not counted as an outbound message.

Run: ``.venv/bin/python scripts/reliability/identifiers.py --json [--scale S] [--no-postgres]``. Exit status 0 when
no canary was found in any output and every kind was found in the inputs, else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import secrets
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email import policy as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
for _path in (str(ROOT), str(TESTS)):  # vigil itself, and the loopback servers the tests use (tests/*.py helpers)
    if _path not in sys.path:
        sys.path.insert(0, _path)

import httpx  # noqa: E402
import orjson  # noqa: E402
import yaml  # noqa: E402

MARKERS = ("zyxqu", "canaryname")
"""Every text canary contains one of these; nothing else vigil is given or configured with does."""
SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.19.5.99999.2"
MAIDEN_URL = "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName"
MODEL_SYSTEM = "https://vigil.dev/fhir/CodeSystem/model"
XHTML = "http://www.w3.org/1999/xhtml"
HOOK_KEY_ENV = "VIGIL_CAMPAIGN_HOOK_KEY"  # the notification webhook's HMAC key, set for the run only
SUBSCRIPTION_SECRET_ENV = "VIGIL_CAMPAIGN_SUBSCRIPTION_SECRET"  # the subscription endpoint's shared secret
STREAM_SOURCES = ("bulk-directory", "fhir-bulk-export", "fhir-rest", "kafka", "subscription-webhook")
VALUE_KINDS = ("name", "street address", "city", "postal code", "phone", "email", "SSN", "MRN", "patient id",
               "visit id", "exact birth date", "age over 89", "mother's maiden name", "next of kin")
"""What a canary is (the scanner names each hit by one of these)."""
CARRIER_KINDS = ("reference display", "logical reference identifier", "note", "comment", "narrative text.div",
                 "contained person", "free-text value", "conditional reference", "invalid resources",
                 "non-FHIR or broken JSON lines")
"""Where canaries were put besides a person's own elements (each carries name, SSN, phone ... values)."""
KNOWN_FINDINGS = {
    "REST cursor keeps boundary resource ids":  # an (id, versionId) pair of the cursor's at_since list
        lambda hit: re.search(r'\["%s","[^"]*"\]' % re.escape(hit.value), hit.context) is not None,
    "kafka-python logs record contents at DEBUG": lambda hit: hit.place.startswith("logs (DEBUG): kafka."),
}
"""Leaks this campaign found in code its author may not change: reported by name, so the test can hold everything
else at zero and mark these as expected failures until they are fixed.

- ingest/rest_poll.py stores the (id, versionId) of the resources at the cursor instant (``at_since``) in
  ``source_cursors``: raw Patient and Encounter ids (MRN- and visit-number-type identifiers).
- kafka-python logs record contents at DEBUG: ``kafka.producer.kafka`` every record it sends ("Sending (key=..
  value=..)"), ``kafka.conn`` the (truncated) bytes of each ProduceRequest; the subscription webhook
  (vigil/webhook.py) forwards raw notified resources, so a root logger at DEBUG writes whole Patients to the log."""


# --- canaries ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Person:
    """One seeded person: every Safe Harbor element filled with a value unique to ``n``."""

    n: int
    birth: str  # YYYY-MM-DD
    over_89: bool

    @property
    def pid(self) -> str:
        return f"zyxqu-pid-{self.n:05d}"

    @property
    def given(self) -> str:
        return "Zyxqu"

    @property
    def family(self) -> str:
        return f"Canaryname-{self.n:05d}"

    @property
    def full_name(self) -> str:
        return f"{self.given} {self.family}"

    @property
    def street(self) -> str:
        return f"{self.n} Zyxqu Canarystreet"

    @property
    def city(self) -> str:
        return f"Zyxquville-{self.n:05d}"

    @property
    def postal(self) -> str:
        return f"96{self.n % 1000:03d}-{self.n % 10000:04d}"

    @property
    def phone(self) -> str:
        return f"(555) {700 + (self.n // 10000) % 300:03d}-{self.n % 10000:04d}"

    @property
    def email(self) -> str:
        return f"zyxqu.{self.n:05d}@mail.example.org"

    @property
    def ssn(self) -> str:
        return f"987-{(self.n // 10000) % 100:02d}-{self.n % 10000:04d}"

    @property
    def mrn(self) -> str:
        return f"ZYXQU-MRN-{self.n:05d}"

    @property
    def maiden(self) -> str:
        return f"Zyxqumaiden-{self.n:05d}"

    @property
    def kin(self) -> str:
        return f"Zyxqu Canarykin-{self.n:05d}"

    @property
    def birth_us(self) -> str:
        year, month, day = self.birth.split("-")
        return f"{month}/{day}/{year}"

    def visit(self, k: int) -> str:
        return f"zyxqu-visit-{self.n:05d}-{k}"

    def sentence(self) -> str:
        """Clinician free text quoting the person: what notes and narratives leak in practice."""
        return (f"{self.full_name} (MRN {self.mrn}, SSN {self.ssn}, born {self.birth}) of {self.street}, {self.city} "
                f"MA {self.postal}; call {self.phone} or {self.email}")


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


class CanaryBook:
    """Issues persons, counts every canary value injected per kind, and knows each value's normalised forms."""

    def __init__(self, oldest_safe_year: int):
        self.oldest_safe_year = oldest_safe_year
        self.persons: dict[str, Person] = {}  # original simulator patient id → person
        self.injected: Counter[str] = Counter()
        self.numeric: dict[str, set[str]] = {"SSN": set(), "phone": set(), "postal code": set(),
                                             "exact birth date": set()}
        self.tokens: dict[str, str] = {}  # lower-case text canary → kind

    def person(self, original_id: str, birth_year: int) -> Person:
        found = self.persons.get(original_id)
        if found is None:
            n = len(self.persons) + 1
            over_89 = n % 10 == 0
            year = self.oldest_safe_year - 1 - n % 7 if over_89 else birth_year
            found = Person(n, f"{year:04d}-{n % 12 + 1:02d}-{n % 28 + 1:02d}", over_89)
            self.persons[original_id] = found
            self._register(found)
        return found

    def _register(self, p: Person) -> None:
        for kind, value in (("name", p.full_name), ("name", p.family), ("street address", p.street),
                            ("city", p.city), ("email", p.email), ("MRN", p.mrn), ("patient id", p.pid),
                            ("mother's maiden name", p.maiden), ("next of kin", p.kin)):
            self.tokens[value.lower()] = kind
        self.numeric["SSN"].add(_digits(p.ssn))
        self.numeric["phone"].add(_digits(p.phone))
        self.numeric["postal code"].add(_digits(p.postal))
        self.numeric["exact birth date"].add(_digits(p.birth))

    def count(self, kind: str, n: int = 1) -> None:
        self.injected[kind] += n

    def kind_of_token(self, token: str) -> str:
        """The kind of a marker-bearing token found in a haystack (a visit id, a note fragment ...)."""
        token = token.lower().strip(".-@+")
        if token in self.tokens:
            return self.tokens[token]
        for prefix, kind in (("zyxqu-visit-", "visit id"), ("zyxqu-pid-", "patient id"), ("zyxqu-mrn-", "MRN"),
                             ("zyxquville-", "city"), ("zyxqumaiden-", "mother's maiden name"),
                             ("canaryname-", "name"), ("canarykin-", "next of kin"), ("zyxqu.", "email")):
            if token.startswith(prefix):
                return kind
        return "name or free text"


# --- injection ------------------------------------------------------------------------------------------------------


def _patient_ref(reference: dict | None, ids: dict[str, str]) -> None:
    if isinstance(reference, dict) and isinstance(reference.get("reference"), str):
        rtype, _, rid = reference["reference"].partition("/")
        if rid in ids:
            reference["reference"] = f"{rtype}/{ids[rid]}"


@dataclass
class Injector:
    """Rewrites a simulator feed in place so that its persons carry canaries everywhere a feed can put them."""

    book: CanaryBook
    patient_ids: dict[str, str] = field(default_factory=dict)  # simulator id → canary id
    encounter_ids: dict[str, str] = field(default_factory=dict)
    _visits: Counter[int] = field(default_factory=Counter)
    _by_pid: dict[str, Person] = field(default_factory=dict)

    def inject(self, resources: list[dict]) -> None:
        patients = [r for r in resources if r["resourceType"] == "Patient"]
        for r in patients:
            self._patient(r)
        for r in resources:
            if r["resourceType"] == "Encounter":
                self._encounter(r)
        for r in resources:
            rtype = r["resourceType"]
            if rtype in ("RiskAssessment", "Condition", "Procedure", "Observation"):
                self._event(r)

    def owner(self, resource: dict) -> Person | None:
        """The seeded person a (rewritten) resource is about: the Patient itself, or its subject."""
        if len(self._by_pid) != len(self.book.persons):
            self._by_pid = {p.pid: p for p in self.book.persons.values()}
        if resource["resourceType"] == "Patient":
            return self._by_pid.get(resource["id"])
        return self._by_pid.get((resource.get("subject") or {}).get("reference", "").removeprefix("Patient/"))

    def _patient(self, r: dict) -> None:
        year = int(str(r.get("birthDate", "1960"))[:4])
        p = self.book.person(r["id"], year)
        self.patient_ids[r["id"]] = p.pid
        r["id"] = p.pid
        r["name"] = [{"use": "official", "text": p.full_name, "family": p.family, "given": [p.given]}]
        r["telecom"] = [{"system": "phone", "value": p.phone, "use": "home"}, {"system": "email", "value": p.email}]
        r["address"] = [{"line": [p.street], "city": p.city, "state": "MA", "postalCode": p.postal, "country": "US"}]
        r["identifier"] = [
            {"system": SSN_SYSTEM, "value": p.ssn},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
             "system": MRN_SYSTEM, "value": p.mrn}]
        r["birthDate"] = p.birth
        r["text"] = {"status": "generated", "div": f'<div xmlns="{XHTML}">{p.sentence()}</div>'}
        r.setdefault("extension", []).append({"url": MAIDEN_URL, "valueString": p.maiden})
        r["contact"] = [{"name": {"text": p.kin}, "telecom": [{"system": "phone", "value": p.phone}]}]
        for kind in ("name", "phone", "email", "street address", "city", "postal code", "SSN", "MRN", "patient id",
                     "exact birth date", "narrative text.div", "mother's maiden name", "next of kin"):
            self.book.count(kind)
        if p.over_89:
            self.book.count("age over 89")

    def _encounter(self, r: dict) -> None:
        patient = r["subject"]["reference"].partition("/")[2]
        p = self.book.persons[patient]
        self._visits[p.n] += 1
        self.encounter_ids[r["id"]] = p.visit(self._visits[p.n])
        r["id"] = self.encounter_ids[r["id"]]
        _patient_ref(r["subject"], self.patient_ids)
        r["subject"]["display"] = p.full_name
        r["text"] = {"status": "generated", "div": f'<div xmlns="{XHTML}">Visit of {p.full_name}</div>'}
        self.book.count("visit id")
        self.book.count("reference display")
        self.book.count("narrative text.div")

    def _event(self, r: dict) -> None:
        patient = r["subject"]["reference"].partition("/")[2]
        p = self.book.persons.get(patient)
        _patient_ref(r["subject"], self.patient_ids)
        if isinstance(r.get("encounter"), dict):
            _patient_ref(r["encounter"], self.encounter_ids)
            if r["encounter"]["reference"].startswith("Encounter/zyxqu-visit-"):
                self.book.count("visit id")
        if p is None:
            return
        r["subject"]["display"] = p.full_name
        r["note"] = [{"authorString": f"Dr. for {p.full_name}", "text": p.sentence()}]
        self.book.count("reference display")
        self.book.count("note")
        if r["resourceType"] == "RiskAssessment" and p.n % 5 == 0:
            r["contained"] = [{"resourceType": "Patient", "id": "who", "name": [{"text": p.full_name}],
                               "telecom": [{"system": "phone", "value": p.phone}], "birthDate": p.birth}]
            self.book.count("contained person")


def invalid_resources(p: Person, updated: str, book: CanaryBook) -> list[bytes]:
    """Deliberately broken inputs about ``p``, one per way a feed breaks; each carries canaries, so each path into
    the dead letters (reason, payload, replay) is searched. Lines, not dicts: two of them are not even JSON."""
    meta = {"versionId": "1", "lastUpdated": updated}
    subject = {"reference": f"Patient/{p.pid}", "display": p.full_name}
    note = [{"text": p.sentence()}]
    div = {"status": "generated", "div": f'<div xmlns="{XHTML}">{p.sentence()}</div>'}
    person = {"resourceType": "Patient", "id": "who", "name": [{"text": p.full_name}],
              "telecom": [{"system": "phone", "value": p.phone}], "address": [{"line": [p.street]}]}
    resources: list[dict] = [
        # no performer: "missing performer", redacted payload kept for replay
        {"resourceType": "RiskAssessment", "id": f"bad-ra-{p.n}", "meta": meta, "status": "final", "text": div,
         "contained": [person], "subject": subject, "note": note, "occurrenceDateTime": updated,
         "method": {"coding": [{"system": MODEL_SYSTEM, "code": "cta-stenosis"}]},
         "prediction": [{"probabilityDecimal": 0.4}]},
        # a model the config does not list: replayable once it is configured
        {"resourceType": "RiskAssessment", "id": f"other-model-{p.n}", "meta": meta, "status": "final",
         "subject": subject, "note": note, "occurrenceDateTime": updated,
         "performer": {"reference": "Device/ecg-af-1.0", "display": p.full_name},
         "method": {"coding": [{"system": MODEL_SYSTEM, "code": "ecg-af-screen"}]},
         "prediction": [{"probabilityDecimal": 0.4}]},
        # a birth date in US format: rejected, and the date must not survive in the payload
        {"resourceType": "Patient", "id": f"{p.pid}-dup", "meta": meta, "birthDate": p.birth_us,
         "name": [{"family": p.family, "given": [p.given]}], "identifier": [{"system": SSN_SYSTEM, "value": p.ssn}],
         "text": div},
        # a conditional reference carrying the SSN
        {"resourceType": "Encounter", "id": f"{p.visit(99)}", "meta": meta, "status": "finished",
         "subject": {"reference": f"Patient?identifier={SSN_SYSTEM}|{p.ssn}", "display": p.full_name},
         "period": {"start": updated}},
        # no time: free text in note, comment-like valueString and narrative
        {"resourceType": "Observation", "id": f"bad-obs-{p.n}", "meta": meta, "status": "final", "subject": subject,
         "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]}, "note": note, "text": div,
         "valueString": f"patient {p.full_name} phoned from {p.phone}"},
        # no code: a Condition with a comment on its evidence and a note
        {"resourceType": "Condition", "id": f"bad-cond-{p.n}", "meta": meta, "subject": subject,
         "onsetDateTime": updated, "note": note, "evidence": [{"detail": [{"display": p.full_name}]}],
         "asserter": {"identifier": {"system": MRN_SYSTEM, "value": p.mrn}},
         "stage": [{"assessment": [{"reference": f"Patient/{p.pid}", "display": p.full_name}]}]},
        # a server's error report quoting the patient
        {"resourceType": "OperationOutcome", "id": f"oo-{p.n}", "meta": meta, "issue": [
            {"severity": "error", "code": "processing", "diagnostics": f"could not export {p.sentence()}",
             "details": {"text": p.full_name}, "expression": [f"Patient/{p.pid}"]}]},
        # an ignored type full of identifiers (vigil only counts it)
        {"resourceType": "Appointment", "id": f"appt-{p.n}", "meta": meta, "status": "booked",
         "comment": p.sentence(), "participant": [{"actor": subject, "status": "accepted"}]},
    ]
    lines = [orjson.dumps(r) for r in resources]
    lines.append(orjson.dumps({"patient": p.full_name, "ssn": p.ssn, "phone": p.phone}))  # JSON, not FHIR
    lines.append(f'{{"resourceType": "Patient", "name": "{p.full_name}", "ssn": {p.ssn}'.encode())  # broken JSON
    for kind, n in (("reference display", 9), ("note", 4), ("narrative text.div", 3), ("contained person", 1),
                    ("conditional reference", 1), ("free-text value", 3), ("comment", 1),
                    ("logical reference identifier", 1)):
        book.count(kind, n)
    book.count("invalid resources", len(resources))
    book.count("non-FHIR or broken JSON lines", 2)
    return lines


# --- the feeds ------------------------------------------------------------------------------------------------------


@dataclass
class Feed:
    """A seeded simulator feed: resources in arrival order, and invalid lines per person."""

    resources: list[dict]
    invalid: list[bytes]
    persons: list[Person]
    injector: Injector


def seeded_feed(book: CanaryBook, out: Path, scenario: str, *, seed: int, days: int, change_day: int,
                volume: float, invalid_every: int) -> Feed:
    """Simulate ``scenario`` into ``out``, seed its persons, and add invalid resources for every
    ``invalid_every``-th person."""
    from vigil.simulator import simulate

    simulate(scenario, out, seed=seed, days=days, change_day=change_day, volume=volume)
    resources = [orjson.loads(line) for path in sorted(out.glob("*.ndjson")) for line in path.read_bytes().splitlines()]
    for path in out.glob("*.ndjson"):
        path.unlink()
    injector = Injector(book)
    first = len(book.persons)
    injector.inject(resources)
    resources.sort(key=lambda r: (r.get("meta", {}).get("lastUpdated", ""), r["resourceType"] == "RiskAssessment"))
    persons = list(book.persons.values())[first:]
    invalid = []
    for p in persons[::invalid_every]:
        invalid.extend(invalid_resources(p, "2026-02-01T12:00:00Z", book))
    return Feed(resources, invalid, persons, injector)


def write_bulk(directory: Path, resources: Iterable[dict], invalid: list[bytes]) -> None:
    """The bulk-data layout: ``<Type>.000.ndjson`` in arrival order; the invalid lines in ``Invalid.000.ndjson``."""
    directory.mkdir(parents=True, exist_ok=True)
    by_type: dict[str, list[bytes]] = {}
    for r in resources:
        by_type.setdefault(r["resourceType"], []).append(orjson.dumps(r))
    for rtype, lines in by_type.items():
        (directory / f"{rtype}.000.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    if invalid:
        (directory / "Invalid.000.ndjson").write_bytes(b"\n".join(invalid) + b"\n")


def split_by_subject(feed: Feed, names: tuple[str, ...]) -> dict[str, tuple[list[dict], list[bytes]]]:
    """Each person (and everything about them) to one source, by person number; reference data to every source."""
    parts: dict[str, tuple[list[dict], list[bytes]]] = {name: ([], []) for name in names}
    for r in feed.resources:
        p = feed.injector.owner(r)
        if p is None:
            for name in names:
                parts[name][0].append(r)
        else:
            parts[names[p.n % len(names)]][0].append(r)
    for line in feed.invalid:
        found = re.search(rb"Canaryname-(\d{5})", line)
        n = int(found.group(1)) if found else 0
        parts[names[n % len(names)]][1].append(line)
    return parts


# --- receivers of outbound messages ---------------------------------------------------------------------------------


class CapturingHttp:
    """An HTTP server on loopback that answers 200 and keeps every request (the webhook receiver)."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        captured = self.requests

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                captured.append(str(self.requestline).encode() + b"\n" + bytes(self.headers) + body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/hook"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class SmtpInbox:
    """aiosmtpd on loopback keeping every message's raw bytes (the email receiver)."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[bytes] = []
        inbox = self.messages

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's hook name)
                inbox.append(envelope.original_content or envelope.content)
                return "250 OK"

        self.port = _free_port()
        self._controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def texts(self) -> list[bytes]:
        """Raw messages plus their decoded bodies (a body may be quoted-printable or base64 on the wire)."""
        out = []
        for raw in self.messages:
            out.append(raw)
            message = message_from_bytes(raw, policy=email_policy.default)
            for part in message.walk():
                if not part.is_multipart():
                    out.append(str(part.get_content()).encode())
        return out

    def close(self) -> None:
        self._controller.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def alertmanager(work: Path) -> Iterator[str | None]:
    """Debian's prometheus-alertmanager on loopback (API v2), or None when it is not installed."""
    import shutil
    import subprocess

    binary = shutil.which("prometheus-alertmanager")
    if binary is None:
        yield None
        return
    root = work / "alertmanager"
    root.mkdir()
    (root / "alertmanager.yml").write_text('route:\n  receiver: "null"\nreceivers:\n  - name: "null"\n')
    url = f"http://127.0.0.1:{_free_port()}"
    with (root / "alertmanager.log").open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={root / 'alertmanager.yml'}", f"--web.listen-address={url[7:]}",
             "--cluster.listen-address=", f"--storage.path={root / 'data'}"], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Alertmanager did not become ready on {url}; see {root / 'alertmanager.log'}")
                time.sleep(0.1)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def served(app: Any) -> Iterator[str]:
    """An ASGI app (here: `vigil serve`'s app with the subscription webhook) under uvicorn on a loopback port."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="debug", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class LogCapture(logging.Handler):
    """Every record of every logger at DEBUG, formatted with its traceback: what a log shipper would receive."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        self.lines: list[tuple[str, str]] = []  # (logger name, formatted record)
        self._saved: tuple[int, list[logging.Handler]] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append((record.name, self.format(record)))
        except Exception:  # a record whose arguments do not format is still evidence: keep its raw parts
            self.lines.append((record.name, f"{record.name} {record.msg!r} {record.args!r}"))

    def by_logger(self) -> dict[str, str]:
        """The captured text per logger, so a hit names the logger that wrote it."""
        out: dict[str, list[str]] = {}
        for name, line in self.lines:
            out.setdefault(name, []).append(line)
        return {name: "\n".join(lines) for name, lines in sorted(out.items())}

    def __enter__(self) -> LogCapture:
        root = logging.getLogger()
        self._saved = (root.level, list(root.handlers))
        root.setLevel(logging.DEBUG)
        root.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        if self._saved is not None:
            root.setLevel(self._saved[0])


# --- the scanner ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hit:
    place: str
    kind: str
    value: str
    context: str


_MARKER = re.compile("|".join(MARKERS).encode())
_TOKEN_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_.@+-")
_WORD_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_")
_DIGITS = frozenset(b"0123456789")
_NUMERIC: tuple[tuple[str, re.Pattern[bytes], int], ...] = (
    # (kind, pattern, bytes before the match that belong to it); each starts with a literal, so the scan is fast
    ("SSN", re.compile(rb"9\d\d[- ]?\d\d[- ]?\d{4}"), 0),
    ("phone", re.compile(rb"555\)?[ .-]?7\d\d[ .-]?\d{4}"), 0),
    ("postal code", re.compile(rb"96\d{3}-?\d{4}"), 0),
    ("exact birth date", re.compile(rb"1[89]\d\d-?[01]\d-?[0-3]\d"), 0),
    ("exact birth date", re.compile(rb"/[0-3]\d/1[89]\d\d"), 2),  # US style MM/DD/YYYY
)


class Scanner:
    """Finds canaries in any bytes: marker-bearing tokens (case-insensitive), and numbers of the reserved shapes
    whose digits (normalised: separators dropped, US dates reordered) are ones the book injected. A number counts
    only as a whole token (no letter or digit right before it, no digit right after), so a canary's digits inside
    a hex key or a longer number are not taken for it."""

    def __init__(self, book: CanaryBook):
        self.book = book
        self.over_89 = {_digits(p.birth) for p in book.persons.values() if p.over_89}

    def scan(self, place: str, data: bytes | str) -> list[Hit]:
        raw = data.encode() if isinstance(data, str) else data
        lower = raw.lower()
        hits = []
        end = -1
        for m in _MARKER.finditer(lower):
            if m.start() < end:  # inside the token already reported
                continue
            start, end = _token_span(lower, m.start(), m.end())
            kind = None
            if lower[start:end] == b"zyxqu":  # a given name, or the first word of a street or a next of kin
                for follower, what in ((b" canaryname-", "name"), (b" canarystreet", "street address"),
                                       (b" canarykin-", "next of kin")):
                    if lower.startswith(follower, end):
                        kind, end = what, _token_span(lower, end + 1, end + len(follower))[1]
                        break
            token = raw[start:end].decode("latin-1")
            hits.append(Hit(place, kind or self.book.kind_of_token(token), token, _context(raw, start, end)))
        for kind, pattern, before in _NUMERIC:
            for m in pattern.finditer(lower):
                start, stop = m.start() - before, m.end()
                if start < 0 or (start > 0 and lower[start - 1] in _WORD_BYTES) \
                        or (stop < len(lower) and lower[stop] in _DIGITS):
                    continue
                if kind == "phone" and start >= 1 and lower[start - 1] == ord("("):
                    start -= 1
                value = raw[start:stop].decode("latin-1")
                digits = _digits(value)
                if before:
                    digits = digits[4:] + digits[:4]
                if digits in self.book.numeric[kind]:
                    found = "age over 89" if kind == "exact birth date" and digits in self.over_89 else kind
                    hits.append(Hit(place, found, value, _context(raw, start, stop)))
        return hits


def _token_span(lower: bytes, start: int, end: int, limit: int = 80) -> tuple[int, int]:
    """The token around a marker: the run of name/id/e-mail characters, at most ``limit`` each side."""
    left = start
    while left > max(0, start - limit) and lower[left - 1] in _TOKEN_BYTES:
        left -= 1
    right = end
    while right < min(len(lower), end + limit) and lower[right] in _TOKEN_BYTES:
        right += 1
    return left, right


def _context(raw: bytes, start: int, end: int, width: int = 60) -> str:
    return raw[max(0, start - width):end + width].decode("latin-1").replace("\n", "\\n")


@dataclass
class Place:
    name: str
    role: str  # "output" (must hold no canary) or "input" (must hold them: the positive control)
    size: int
    hits: list[Hit]


@dataclass
class Findings:
    scanner: Scanner
    places: list[Place] = field(default_factory=list)

    def add(self, name: str, data: bytes | str, role: str = "output") -> None:
        size = len(data.encode() if isinstance(data, str) else data)
        self.places.append(Place(name, role, size, self.scanner.scan(name, data)))

    def outputs(self) -> list[Place]:
        return [p for p in self.places if p.role == "output"]

    def inputs(self) -> list[Place]:
        return [p for p in self.places if p.role == "input"]

    def leaks(self) -> list[Hit]:
        return [h for p in self.outputs() for h in p.hits]

    def found_in_inputs(self) -> Counter[str]:
        return Counter(h.kind for p in self.inputs() for h in p.hits)


# --- dumping the stores ---------------------------------------------------------------------------------------------


def dump_store(url: str, label: str, findings: Findings) -> dict[str, int]:
    """Every table of the store, and its checkpoint pickles, into ``findings``; returns rows per table."""
    from sqlalchemy import create_engine, inspect, text

    rows: dict[str, int] = {}
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        with contextlib.closing(sqlite3.connect(path)) as connection:
            findings.add(f"{label}: SQLite iterdump ({path.name})", "\n".join(connection.iterdump()))
            for (table,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
                rows[table] = connection.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
            pickles = [bytes(state) for (state,) in connection.execute("SELECT state FROM checkpoints")]
        for suffix in ("", "-wal", "-journal"):
            raw = path.with_name(path.name + suffix)
            if raw.exists():  # free pages keep deleted rows: the file itself is searched too
                findings.add(f"{label}: raw database file {raw.name}", raw.read_bytes())
    else:
        import psycopg

        conninfo = url.replace("postgresql+psycopg://", "postgresql://")
        engine = create_engine(url)
        try:
            tables = inspect(engine).get_table_names()
            with engine.connect() as connection:
                pickles = [bytes(s) for s in connection.execute(text("SELECT state FROM checkpoints")).scalars()]
        finally:
            engine.dispose()
        with psycopg.connect(conninfo) as connection, connection.cursor() as cursor:
            for table in tables:
                buffer = bytearray()
                with cursor.copy(f'COPY (SELECT * FROM "{table}") TO STDOUT') as copy:
                    for chunk in copy:
                        buffer += chunk
                rows[table] = buffer.count(b"\n")
                findings.add(f"{label}: PostgreSQL table {table} (COPY)", bytes(buffer))
    for i, blob in enumerate(pickles):
        findings.add(f"{label}: pipeline checkpoint pickle #{i} ({len(blob):,} bytes)", blob)
    return rows


# --- the campaign ---------------------------------------------------------------------------------------------------


def example_config(store_url: str, subject_key: str, **overrides: Any) -> dict:
    """examples/vigil.yaml (models, maps, PCCPs) with absolute paths, a store, a secret and the given sections."""
    from vigil.settings import EXAMPLES_DIR

    raw = yaml.safe_load((EXAMPLES_DIR / "vigil.yaml").read_text())
    raw["concept_maps"] = [str(EXAMPLES_DIR / p) for p in raw.get("concept_maps", [])]
    for model in raw["models"]:
        if model.get("pccp"):
            model["pccp"] = str(EXAMPLES_DIR / model["pccp"])
    raw.update(store_url=store_url, subject_key=subject_key, **overrides)
    return raw


ALERTING = {
    "subgroups": {"attributes": ["scanner"], "min_n": 30},
    "monitors": {"baseline_days": 20, "metrics": ["fnr", "error_rate"], "odds_ratio": 2.0,
                 "budget": {"false_alarms": 1, "per_days": 30}},
}
"""Fewer streams and a looser false-alarm budget than the example, so that a short scanner-upgrade feed (60 days at
scale 0.2) already fires alerts and the notification path carries real messages; identifiers do not depend on it."""


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class CliCall:
    args: list[str]
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return orjson.loads(self.stdout)


class Campaign:
    """One run of the whole campaign in ``work``; ``scale`` sizes the simulated feeds (1.0: about 35,000 resources
    through ``files`` and 12,000 through the stream sources)."""

    def __init__(self, work: Path, scale: float = 1.0, postgres_url: str | None = None,
                 log: Callable[[str], None] = lambda _m: None):
        from ingest.deid import oldest_safe_birth_year

        self.work, self.scale, self.postgres_url = work, scale, postgres_url
        self._t0 = time.monotonic()
        self.say = lambda message: log(f"[{time.monotonic() - self._t0:6.1f} s] {message}")
        self.book = CanaryBook(oldest_safe_birth_year())
        self.subject_key = secrets.token_hex(16)
        self.calls: list[CliCall] = []
        self.sources: dict[str, dict[str, int]] = {}
        self.figures: dict[str, Any] = {}
        self.inputs: list[tuple[str, bytes]] = []
        self.outbound: list[tuple[str, bytes | str]] = []

    def cli(self, *args: str) -> CliCall:
        from typer.testing import CliRunner

        from vigil.cli import app

        result = CliRunner().invoke(app, list(args))
        call = CliCall(list(args), result.exit_code, result.stdout, result.stderr)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise RuntimeError(f"`vigil {' '.join(args)}` raised {result.exception!r}") from result.exception
        self.calls.append(call)
        return call

    def run(self) -> dict:
        started = time.monotonic()
        with LogCapture() as logs:
            stores = {"files (SQLite)": self._files_run(), **self._stream_runs(), **self._quarantine_run()}
        self.say("scanning")
        findings = Findings(Scanner(self.book))
        for label, url in stores.items():
            self.figures.setdefault("rows", {})[label] = dump_store(url, label, findings)
        (self.work / "campaign.log").write_text("\n".join(line for _, line in logs.lines))  # kept, to trace a hit
        for logger, text in logs.by_logger().items():
            findings.add(f"logs (DEBUG): {logger}", text)
        for call in self.calls:
            findings.add(f"CLI: vigil {' '.join(call.args[:2])} stdout", call.stdout)
            findings.add(f"CLI: vigil {' '.join(call.args[:2])} stderr", call.stderr)
        for name, data in self.outbound:
            findings.add(name, data)
        for name, data in self.inputs:
            findings.add(name, data, role="input")
        return self._report(findings, time.monotonic() - started)

    # -- files: `vigil run --config` with kind: files; alerts routed to three receivers ------------------------------

    def _files_run(self) -> str:
        from vigil import notify
        from vigil.settings import load_settings
        from vigil.store import session_factory

        directory = self.work / "files-feed"
        days = max(60, round(180 * self.scale))
        feed = seeded_feed(self.book, directory, "scanner-upgrade", seed=5, days=days, change_day=days * 5 // 12,
                           volume=round(max(0.3, 0.5 * self.scale), 2), invalid_every=25)
        write_bulk(directory, feed.resources, feed.invalid)
        self.sources["files"] = {"resources": len(feed.resources), "invalid lines": len(feed.invalid),
                                 "persons": len(feed.persons)}
        self.inputs += [(f"input: {p.name}", p.read_bytes()) for p in sorted(directory.glob("*.ndjson"))]
        url = f"sqlite:///{self.work / 'files.db'}"
        hook, inbox = CapturingHttp(), SmtpInbox()
        os.environ[HOOK_KEY_ENV] = secrets.token_hex(8)
        with alertmanager(self.work) as am_url:
            receivers: list[dict] = [
                {"name": "hook", "kind": "webhook", "url": hook.url, "secret_env": HOOK_KEY_ENV},
                {"name": "mail", "kind": "email", "smtp_host": "127.0.0.1", "smtp_port": inbox.port,
                 "starttls": False, "from": "vigil@example.org", "to": ["safety@example.org"]}]
            if am_url:
                receivers.append({"name": "am", "kind": "alertmanager", "url": am_url})
            routing = {"receivers": receivers,
                       "routes": [{"receiver": r["name"], "continue": True} for r in receivers]}
            config = write_config(self.work / "files.yaml", example_config(
                url, self.subject_key, sources=[{"kind": "files", "paths": [str(directory)]}], routing=routing,
                **ALERTING))
            self.say("files: vigil run --once")
            ran = self.cli("run", "--once", "--json", "--config", str(config))
            if ran.exit_code != 0:
                raise RuntimeError(f"vigil run (files) failed: {ran.stdout}{ran.stderr}")
            self.figures["files_run"] = ran.json()
            self.say("files: delivering the outbox")
            settings = load_settings(config)
            factory = session_factory(url)
            delivered = 0
            try:
                for _ in range(50):
                    tick = notify.tick(factory, settings.routing)
                    delivered += tick.delivery.delivered
                    if tick.delivery.delivered == 0 and tick.delivery.failed == 0:
                        break
            finally:
                factory.kw["bind"].dispose()
            alerts_held = httpx.get(f"{am_url}/api/v2/alerts", timeout=5).content if am_url else b""
        hook.close()
        inbox.close()
        os.environ.pop(HOOK_KEY_ENV, None)
        self.figures["notifications"] = {"delivered": delivered, "webhook requests": len(hook.requests),
                                         "emails": len(inbox.messages),
                                         "alertmanager alerts held": len(orjson.loads(alerts_held or b"[]")),
                                         "alertmanager": "running" if am_url else "not installed"}
        self.outbound += [(f"outbound: webhook request #{i}", r) for i, r in enumerate(hook.requests)]
        self.outbound += [(f"outbound: email #{i}", m) for i, m in enumerate(inbox.texts())]
        if am_url:
            self.outbound.append(("outbound: alerts held by Alertmanager (GET /api/v2/alerts)", alerts_held))
        self.say("files: listings and report")
        listed = {args: self.cli(*args, "--json", "--store", url)
                  for args in (("alerts", "list"), ("tickets", "list"), ("deadletters", "list"))}
        report = self.work / "report.html"
        self.cli("report", "--out", str(report), "--store", url, "--config", str(config))
        if report.exists():
            self.outbound.append(("report: vigil report HTML", report.read_bytes()))
        self.figures["files_alerts_listed"] = len(listed["alerts", "list"].json())
        return url

    # -- every stream source in one `vigil run --config`, then replay ------------------------------------------------

    def _stream_runs(self) -> dict[str, str]:
        from fhir_server import ExportFile, FhirServer  # tests/: the loopback FHIR server of the source tests
        from kafka import KafkaConsumer
        from kafka_mock import MockCluster  # tests/: librdkafka's mock cluster

        from vigil.store import upgrade

        directory = self.work / "stream-feed"
        feed = seeded_feed(self.book, directory, "stable", seed=11, days=max(14, round(60 * self.scale)),
                           change_day=7, volume=round(max(0.1, 0.35 * self.scale), 2), invalid_every=7)
        parts = split_by_subject(feed, STREAM_SOURCES)
        url = self.postgres_url or f"sqlite:///{self.work / 'streams.db'}"
        upgrade(url)
        for name, (resources, invalid) in parts.items():
            self.sources[name] = {"resources": len(resources), "invalid lines": len(invalid)}

        # bulk-directory: a downloaded export on disk
        drop = self.work / "drop"
        write_bulk(drop, *parts["bulk-directory"])
        self.inputs += [(f"input: drop/{p.name}", p.read_bytes()) for p in sorted(drop.glob("*.ndjson"))]
        cluster = MockCluster(group_initial_rebalance_delay_ms=0)
        with FhirServer() as export_server, FhirServer() as rest_server:
            # fhir-bulk-export: the same layout served through $export (kick-off, status, manifest, downloads)
            resources, invalid = parts["fhir-bulk-export"]
            staged = self.work / "export-staged"
            write_bulk(staged, resources, invalid)
            export_server.status_polls_before_done = 0
            export_server.export_files = [ExportFile(p.name.split(".")[0], p.read_bytes(), name=p.name)
                                          for p in sorted(staged.glob("*.ndjson"))]
            self.inputs += [(f"input: $export file {f.name}", f.body) for f in export_server.export_files]
            # fhir-rest: paged _lastUpdated search. Lines that are not resources cannot be served by a search, and a
            # server answers a search with OperationOutcomes as search.mode "outcome", never as matches
            resources, invalid = parts["fhir-rest"]
            served_invalid = [r for r in map(_maybe_json, invalid) if isinstance(r, dict) and "meta" in r
                              and r["resourceType"] != "OperationOutcome"]
            rest_server.add(*resources, *served_invalid)
            self.sources["fhir-rest"]["invalid lines"] = len(served_invalid)
            rest_types = sorted({r["resourceType"] for r in rest_server.resources})
            self.inputs.append(("input: FHIR REST server resources", orjson.dumps(rest_server.resources)))
            # kafka: one record per line, in arrival order, on one partition
            resources, invalid = parts["kafka"]
            records = [orjson.dumps(r) for r in resources] + invalid
            cluster.produce("fhir.feed", [(0, value) for value in records])
            self.inputs.append(("input: Kafka topic fhir.feed", b"\n".join(records)))
            self.say("streams: subscription webhook")
            # subscription webhook of `vigil serve`: notifications forwarded to fhir.notified (enough partitions for
            # the whole feed: the mock broker keeps only ~5 MB per partition)
            cluster.create_topic("fhir.notified", 16)
            responses = self._notify_webhook(cluster.bootstrap, url, parts["subscription-webhook"])
            self.outbound += responses
            forwarded = self._read_topic(KafkaConsumer, cluster.bootstrap, "fhir.notified",
                                         self.sources["subscription-webhook"]["forwarded"])
            self.inputs.append(("input: Kafka topic fhir.notified (webhook forward; vigil's input)",
                                b"\n".join(forwarded)))
            self.sources["subscription-webhook"]["forwarded records"] = len(forwarded)
            sources = [
                {"kind": "bulk-directory", "name": "drop", "path": str(drop)},
                {"kind": "fhir-bulk-export", "name": "nightly", "base_url": export_server.base_url,
                 "level": "system", "backoff_s": 0.1},
                {"kind": "fhir-rest", "name": "emr", "base_url": rest_server.base_url, "resource_types": rest_types,
                 "page_size": 200, "poll_interval_s": 0.5, "backoff_s": 0.1},
                {"kind": "kafka", "name": "ehr", "bootstrap_servers": cluster.bootstrap, "topics": ["fhir.feed"],
                 "group_id": "vigil", "api_version": "2.3", "idle_timeout_s": 1.0, "max_poll_records": 5000},
                {"kind": "kafka", "name": "notified", "bootstrap_servers": cluster.bootstrap,
                 "topics": ["fhir.notified"], "group_id": "vigil-notified", "api_version": "2.3",
                 "idle_timeout_s": 1.0, "max_poll_records": 5000},
            ]
            config = write_config(self.work / "streams.yaml", example_config(url, self.subject_key, sources=sources))
            self.say("streams: vigil run --once")
            ran = self.cli("run", "--once", "--json", "--config", str(config), "--commit-every", "30")
            if ran.exit_code != 0:
                raise RuntimeError(f"vigil run (streams) failed: {ran.stdout}{ran.stderr}")
            self.figures["streams_run"] = ran.json()
            topics = self._topics(KafkaConsumer, cluster.bootstrap)
        cluster.close()
        self.figures["kafka_topics_after_run"] = sorted(topics)
        self.say("streams: vigil deadletters replay --all")
        replayed = self.cli("deadletters", "replay", "--all", "--json", "--config", str(config), "--store", url)
        self.figures["replay"] = ({k: len(v) for k, v in replayed.json().items() if isinstance(v, list)}
                                  if replayed.exit_code == 0 else replayed.stdout + replayed.stderr)
        listed = self.cli("deadletters", "list", "--json", "--store", url)
        letters = listed.json() if listed.exit_code == 0 else []
        self.figures["stream_dead_letters"] = len(letters)
        for letter in letters[:5]:
            self.cli("deadletters", "show", str(letter["id"]), "--json", "--store", url)
        return {"streams (PostgreSQL)" if self.postgres_url else "streams (SQLite)": url}

    def _notify_webhook(self, bootstrap: str, url: str, part: tuple[list[dict], list[bytes]]
                        ) -> list[tuple[str, bytes]]:
        """POST the part as R4 backport notifications (100 resources each) to the webhook of `vigil serve`'s app."""
        from kafka import KafkaProducer
        from test_subscription import r4_backport  # tests/: the R4 Subscriptions Backport notification builder

        from ingest.subscription import SubscriptionConfig
        from vigil.api import create_app
        from vigil.settings import load_settings
        from vigil.webhook import SubscriptionForwarder

        resources, invalid = part
        lines = [_maybe_json(line) for line in invalid]
        notified = resources + [r for r in lines if isinstance(r, dict) and "resourceType" in r]
        unreadable = [line for line, r in zip(invalid, lines) if not (isinstance(r, dict) and "resourceType" in r)]
        secret = f"Bearer {secrets.token_hex(16)}"  # what Subscription.channel.header would send
        os.environ[SUBSCRIPTION_SECRET_ENV] = secret
        config = SubscriptionConfig(name="emr-hook", path="/fhir/subscription", forward_bootstrap_servers=bootstrap,
                                    forward_topic="fhir.notified", secret_env=SUBSCRIPTION_SECRET_ENV,
                                    resource_types=sorted({r["resourceType"] for r in notified}))
        # as `vigil serve` builds it (acks=all), plus the mock's protocol version and large batches: the mock hands
        # a consumer one produced batch per fetch, so 16 KB batches would make the run crawl
        forwarder = SubscriptionForwarder(config, KafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                                                api_version=(2, 3), batch_size=1 << 20))
        settings = load_settings(write_config(self.work / "serve.yaml", example_config(url, self.subject_key)))
        app = create_app(url, extra_routers=[forwarder.router()], settings=settings)
        bodies: list[bytes] = []
        responses: list[tuple[str, bytes]] = []
        try:
            with served(app) as base, httpx.Client(base_url=base, timeout=30) as client:
                headers = {"Content-Type": "application/fhir+json", "Authorization": secret}
                bodies.append(r4_backport("handshake", 0))
                client.post("/fhir/subscription", content=bodies[-1], headers=headers).raise_for_status()
                for i in range(0, len(notified), 100):
                    chunk = notified[i:i + 100]
                    events = [(i + j + 1, "2026-02-01T10:00:00Z", f"{r['resourceType']}/{r.get('id', 'x')}")
                              for j, r in enumerate(chunk)]
                    bodies.append(r4_backport("event-notification", i + len(chunk), events, chunk))
                    answer = client.post("/fhir/subscription", content=bodies[-1], headers=headers)
                    answer.raise_for_status()
                    responses.append((f"outbound: webhook answer #{len(responses)}", answer.content))
                for line in unreadable:  # a body that is no notification: answered 400, nothing forwarded
                    bodies.append(line)
                    answer = client.post("/fhir/subscription", content=line, headers=headers)
                    responses.append((f"outbound: webhook answer to an unreadable body ({answer.status_code})",
                                      answer.content))
        finally:
            forwarder.close()
            os.environ.pop(SUBSCRIPTION_SECRET_ENV, None)
        self.inputs.append(("input: subscription notifications POSTed", b"\n".join(bodies)))
        self.sources["subscription-webhook"].update(notifications=len(bodies), forwarded=forwarder.forwarded)
        return responses

    @staticmethod
    def _read_topic(consumer_cls: Any, bootstrap: str, topic: str, expected: int) -> list[bytes]:
        """Every record of ``topic``: read until ``expected`` arrived, or nothing more came for 3 s after 60 s."""
        consumer = consumer_cls(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id="campaign-reader", api_version=(2, 3), consumer_timeout_ms=3000)
        values: list[bytes] = []
        deadline = time.monotonic() + 60
        try:
            while len(values) < expected and time.monotonic() < deadline:
                values += [record.value for record in consumer]
            return values
        finally:
            consumer.close()

    @staticmethod
    def _topics(consumer_cls: Any, bootstrap: str) -> set[str]:
        consumer = consumer_cls(bootstrap_servers=bootstrap, api_version=(2, 3))
        try:
            return consumer.topics()
        finally:
            consumer.close()

    # -- quarantine: `vigil ingest` with deid_policy: quarantine --------------------------------------------------------

    def _quarantine_run(self) -> dict[str, str]:
        url = f"sqlite:///{self.work / 'quarantine.db'}"
        config = write_config(self.work / "quarantine.yaml", example_config(url, self.subject_key,
                                                                            deid_policy="quarantine"))
        self.say("quarantine: vigil ingest")
        ran = self.cli("ingest", str(self.work / "drop"), "--json", "--config", str(config))
        if ran.exit_code != 0:
            raise RuntimeError(f"vigil ingest (quarantine) failed: {ran.stdout}{ran.stderr}")
        self.figures["quarantine_rejected"] = ran.json()["rejected"]
        self.sources["files (quarantine policy)"] = {"resources": self.sources["bulk-directory"]["resources"]}
        return {"quarantine (SQLite)": url}

    # -- the report ------------------------------------------------------------------------------------------------------

    def _report(self, findings: Findings, seconds: float) -> dict:
        leaks = findings.leaks()
        found = findings.found_in_inputs()
        injected = {k: self.book.injected[k] for k in VALUE_KINDS if self.book.injected[k]}
        carriers = {k: self.book.injected[k] for k in CARRIER_KINDS if self.book.injected[k]}
        outputs = findings.outputs()
        known = {name: sum(1 for h in leaks if matches(h)) for name, matches in KNOWN_FINDINGS.items()}
        unexplained = [h for h in leaks if not any(matches(h) for matches in KNOWN_FINDINGS.values())]
        return {
            "ok": not leaks and all(found[k] for k in injected),
            "persons_seeded": len(self.book.persons),
            "sources": self.sources,
            "canaries_injected": injected,
            "canaries_injected_total": sum(injected.values()),
            "carriers": carriers,
            "found_in_inputs": {k: found[k] for k in injected},
            "kinds_missing_from_inputs": [k for k in injected if not found[k]],
            "places_searched": len(outputs),
            "bytes_searched": sum(p.size for p in outputs),
            "input_bytes_searched": sum(p.size for p in findings.inputs()),
            "hits": len(leaks),
            "known_findings": known,
            "unexplained_hits": len(unexplained),
            "hits_by_place": dict(Counter(h.place for h in leaks)),
            "hits_by_kind": dict(Counter(h.kind for h in leaks)),
            "first_hits": [{"place": h.place, "kind": h.kind, "value": h.value, "context": h.context,
                            "finding": next((n for n, matches in KNOWN_FINDINGS.items() if matches(h)), None)}
                           for h in _first_per_place(unexplained, 5)
                           + [h for h in _first_per_place(leaks, 2) if h not in unexplained]],
            "places": [{"place": p.name, "bytes": p.size, "hits": len(p.hits)} for p in outputs],
            **self.figures,
            "seconds": round(seconds, 1),
        }


def _first_per_place(hits: list[Hit], n: int) -> list[Hit]:
    seen: Counter[str] = Counter()
    out = []
    for hit in hits:
        seen[hit.place] += 1
        if seen[hit.place] <= n:
            out.append(hit)
    return out


def _maybe_json(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--scale", type=float, default=float(os.environ.get("VIGIL_SLOW_SCALE", "1.0")),
                        help="size of the simulated feeds (default VIGIL_SLOW_SCALE or 1.0)")
    parser.add_argument("--no-postgres", action="store_true", help="stream runs into SQLite, not a throwaway "
                        "PostgreSQL cluster (Debian postgresql, as the tests start it)")
    parser.add_argument("--work", type=Path, help="keep the campaign's files here (default: a temporary directory)")
    args = parser.parse_args(argv)
    import tempfile

    say = (lambda m: print(m, file=sys.stderr)) if not args.json else (lambda _m: None)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vigil-identifiers-")))
        work.mkdir(parents=True, exist_ok=True)
        postgres_url = None
        if not args.no_postgres:
            import conftest  # tests/conftest.py: the throwaway cluster the tests use, as a context manager

            cluster = stack.enter_context(contextlib.contextmanager(conftest.postgres_cluster.__wrapped__)())
            postgres_url = cluster.create_database()[1]
        report = Campaign(work, args.scale, postgres_url, log=say).run()
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(f"{report['hits']} canary hits in {report['places_searched']} places ({report['bytes_searched']:,} "
              f"bytes); {report['canaries_injected_total']:,} canaries injected; inputs missing kinds: "
              f"{report['kinds_missing_from_inputs'] or 'none'}")
        for hit in report["first_hits"]:
            print(f"  {hit['place']}: {hit['kind']} {hit['value']!r} … {hit['context']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
