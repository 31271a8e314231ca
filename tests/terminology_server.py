"""A small real FHIR terminology server on loopback for the terminology client tests — a stand-in, not a mock.

No licensed SNOMED CT terminology server (Ontoserver, Snowstorm with an RF2 release, a national server) can run here:
there is no SNOMED licence or release on this machine and no internet. So this serves a handful of public codes over
real HTTP (``http.server`` in a thread, answering vigil's real httpx client) with just enough of the FHIR R4
terminology operations (http://hl7.org/fhir/R4/terminology-service.html) to test against:

- ``GET [base]/ConceptMap/$translate?system&code[&targetsystem][&url]`` → ``Parameters{result, match*{equivalence |
  relationship (R5 mode), concept, source}}``, from one illustrative ConceptMap of Riverside's (fictional) local codes
  to SNOMED CT concept ids (ids only, no SNOMED content) and LOINC;
- ``GET [base]/CodeSystem/$lookup?system&code`` → ``Parameters{name, display, property*}``; 404 + OperationOutcome
  for an unknown code. LOINC content is © Regenstrief Institute (loinc.org/license), ICD-10-CM is public (CDC/NCHS);
- ``GET [base]/CodeSystem/$subsumes?system&codeA&codeB`` → ``Parameters{outcome}`` over a few ICD-10-CM parent
  links (public), not SNOMED hierarchy, which needs a licence.

The mappings are test fixtures, not authoritative maps. Every request is recorded (``requests``), and faults can be
injected: ``fail_next`` (a status with headers for the next requests, e.g. 503 + Retry-After), ``down`` (every
request answers 503), ``answer`` (a fixed 200 body, e.g. not a Parameters) and ``stop()`` (the port closes:
connection refused).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import orjson

SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RIVERSIDE_DX = "https://riverside.example.org/fhir/CodeSystem/dx"
RIVERSIDE_LAB = "https://riverside.example.org/fhir/CodeSystem/lab"
RIVERSIDE_MAP = "https://terminology.example.org/fhir/ConceptMap/riverside"

# (source system, code) → [(target system, target code, display, R4 equivalence)]
TRANSLATIONS: dict[tuple[str, str], list[tuple[str, str, str | None, str]]] = {
    (RIVERSIDE_DX, "STEN-2"): [(SCT, "233970002", None, "equivalent")],  # coronary stenosis
    (RIVERSIDE_DX, "STEN-LAD"): [(SCT, "233970002", None, "wider")],  # LAD stenosis → the wider coronary stenosis
    (RIVERSIDE_DX, "CAD-ANY"): [(SCT, "233970002", None, "narrower")],  # any CAD → a narrower concept: not usable
    (RIVERSIDE_DX, "SMOKER"): [("", "", None, "unmatched")],  # explicitly no SNOMED target
    (RIVERSIDE_DX, "SEPSIS"): [(SCT, "91302008", None, "equivalent")],
    (RIVERSIDE_LAB, "CR-UMOL"): [(LOINC, "2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "equivalent")],
}
R4_TO_R5 = {"equivalent": "equivalent", "equal": "equivalent", "wider": "source-is-narrower-than-target",
            "subsumes": "source-is-narrower-than-target", "narrower": "source-is-broader-than-target",
            "specializes": "source-is-broader-than-target", "relatedto": "related-to", "inexact": "related-to",
            "unmatched": "not-related-to", "disjoint": "not-related-to"}
NEGATIVE = {"unmatched", "disjoint"}

# (system, code) → (display, [(property code, value[x] key, value)])
LOOKUPS: dict[tuple[str, str], tuple[str, list[tuple[str, str, object]]]] = {
    (LOINC, "2160-0"): (
        "Creatinine [Mass/volume] in Serum or Plasma",
        [("COMPONENT", "valueString", "Creatinine"), ("PROPERTY", "valueString", "MCnc"),
         ("SYSTEM", "valueString", "Ser/Plas"), ("SCALE_TYP", "valueString", "Qn"),
         ("CLASS", "valueString", "CHEM")],
    ),
    (ICD10CM, "I25.10"): (
        "Atherosclerotic heart disease of native coronary artery without angina pectoris",
        [("parent", "valueCode", "I25.1"), ("inactive", "valueBoolean", False)],
    ),
    (ICD10CM, "A41.9"): ("Sepsis, unspecified organism", [("parent", "valueCode", "A41")]),
}
CODE_SYSTEM_NAMES = {LOINC: "LOINC", ICD10CM: "ICD-10-CM", SCT: "SNOMED CT"}
ICD10CM_PARENT = {"I25.10": "I25.1", "I25.1": "I25", "A41.9": "A41"}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    raw: str  # request line + headers as received, to check nothing but codes went out


@dataclass
class Fault:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1


class TerminologyServer:
    """Start with ``with TerminologyServer() as server:``; ``server.base_url`` ends in ``/fhir``."""

    def __init__(self, r5: bool = False, required_auth: str | None = None):
        self.r5 = r5  # answer $translate with R5 ``relationship`` instead of R4 ``equivalence``
        self.required_auth = required_auth  # Authorization header value every request must carry
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.down = False
        self.answer: dict | None = None  # when set, every request gets this body with 200
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._stopped = False

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/fhir"

    def __enter__(self) -> TerminologyServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Shut down and close the port: from now on a client gets 'connection refused' (and a kept-alive
        connection is hung up on)."""
        if not self._stopped:
            self._stopped = True
            self._httpd.shutdown()
            self._httpd.server_close()

    def fail_next(self, status: int, headers: dict[str, str] | None = None, times: int = 1) -> None:
        self.faults.append(Fault(status, headers or {}, times))

    def sent(self, operation: str) -> list[Recorded]:
        """The recorded requests for one operation, e.g. ``"$translate"``."""
        return [r for r in self.requests if r.path.endswith(operation)]

    # --- operations -------------------------------------------------------------------------------------------

    def translate(self, q: dict[str, str]) -> tuple[int, dict]:
        if not (q.get("system") and q.get("code")):
            return 400, _outcome("required", "$translate needs system and code")
        if q.get("url") and q["url"] != RIVERSIDE_MAP:
            return 404, _outcome("not-found", f"no ConceptMap with url {q['url']}")
        rows = [row for row in TRANSLATIONS.get((q["system"], q["code"]), [])
                if not q.get("targetsystem") or row[0] in (q["targetsystem"], "")]
        params: list[dict] = [{"name": "result", "valueBoolean": any(row[3] not in NEGATIVE for row in rows)}]
        if not rows:
            params.append({"name": "message", "valueString": "no mapping found"})
        for system, code, display, equivalence in rows:
            parts: list[dict] = [{"name": "relationship", "valueCode": R4_TO_R5[equivalence]} if self.r5
                                 else {"name": "equivalence", "valueCode": equivalence}]
            if code:
                coding = {"system": system, "code": code, **({"display": display} if display else {})}
                parts.append({"name": "concept", "valueCoding": coding})
            parts.append({"name": "source", "valueUri": RIVERSIDE_MAP})
            params.append({"name": "match", "part": parts})
        return 200, {"resourceType": "Parameters", "parameter": params}

    def lookup(self, q: dict[str, str]) -> tuple[int, dict]:
        found = LOOKUPS.get((q.get("system", ""), q.get("code", "")))
        if found is None:
            return 404, _outcome("not-found", f"unknown code {q.get('system')}|{q.get('code')}")
        display, properties = found
        params = [{"name": "name", "valueString": CODE_SYSTEM_NAMES[q["system"]]},
                  {"name": "display", "valueString": display}]
        params += [{"name": "property", "part": [{"name": "code", "valueCode": code}, {"name": "value", key: value}]}
                   for code, key, value in properties]
        return 200, {"resourceType": "Parameters", "parameter": params}

    def subsumes(self, q: dict[str, str]) -> tuple[int, dict]:
        a, b = q.get("codeA", ""), q.get("codeB", "")
        if q.get("system") != ICD10CM or not a or not b:
            return 400, _outcome("not-supported", "this stand-in answers $subsumes for ICD-10-CM codeA/codeB only")
        if a == b:
            outcome = "equivalent"
        elif a in _ancestors(b):
            outcome = "subsumes"
        elif b in _ancestors(a):
            outcome = "subsumed-by"
        else:
            outcome = "not-subsumed"
        return 200, {"resourceType": "Parameters", "parameter": [{"name": "outcome", "valueCode": outcome}]}

    # --- HTTP -----------------------------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self
        routes = {"/fhir/ConceptMap/$translate": self.translate, "/fhir/CodeSystem/$lookup": self.lookup,
                  "/fhir/CodeSystem/$subsumes": self.subsumes}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if server._stopped:  # a kept-alive connection outlives shutdown(): hang up like a dead server
                    self.close_connection = True
                    return
                split = urlsplit(self.path)
                query = parse_qs(split.query)
                raw = self.requestline + "\r\n" + str(self.headers)
                with server._lock:
                    server.requests.append(Recorded("GET", split.path, query, dict(self.headers), raw))
                    fault = server.faults[0] if server.faults else None
                    if fault is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            server.faults.pop(0)
                if fault is not None:
                    return self._send(fault.status, _outcome("transient", "injected fault"), fault.headers)
                if server.down:
                    return self._send(503, _outcome("transient", "server down"))
                if server.required_auth and self.headers.get("Authorization") != server.required_auth:
                    return self._send(401, _outcome("security", "missing or wrong Authorization"))
                if server.answer is not None:
                    return self._send(200, server.answer)
                route = routes.get(split.path)
                if route is None:
                    return self._send(404, _outcome("not-found", f"no operation at {split.path}"))
                status, body = route({k: v[0] for k, v in query.items()})
                self._send(status, body)

            def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
                data = orjson.dumps(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _ancestors(code: str) -> set[str]:
    out = set()
    while code in ICD10CM_PARENT:
        code = ICD10CM_PARENT[code]
        out.add(code)
    return out


def _outcome(code: str, text: str) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}
