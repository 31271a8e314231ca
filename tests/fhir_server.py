"""A small real FHIR server on loopback for the source tests: searches with paging, ``$export``, a request log.

``http.server`` in a thread, speaking real HTTP to the real httpx client of the sources. It implements just what
the sources use — search by ``_lastUpdated`` (``ge``/``gt``), ``_sort=_lastUpdated``, ``_count`` with ``next``
links (absolute or relative), and the bulk-data async pattern (kick-off → 202 + Content-Location → status 202 with
Retry-After/X-Progress → 200 manifest → NDJSON downloads, optionally gzip → DELETE) — plus injectable faults
(``fail_next``: a status with headers for the next matching requests, e.g. 429 + Retry-After).
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import orjson


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@dataclass
class ExportFile:
    type: str
    body: bytes  # NDJSON
    gzip: bool = False  # served with Content-Encoding: gzip
    gz_file: bool = False  # served as a gzip file (application/gzip, name .ndjson.gz), no Content-Encoding
    name: str | None = None  # default <type>.<n>.ndjson
    section: str = "output"  # output | error | deleted


@dataclass
class Fault:
    path_contains: str
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class FhirServer:
    """Start with ``with FhirServer() as server:``; ``server.base_url`` ends in ``/fhir``."""

    def __init__(self, relative_links: bool = False):
        self.resources: list[dict] = []
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.relative_links = relative_links
        # $export behaviour
        self.export_files: list[ExportFile] = []
        self.status_polls_before_done = 1  # status requests answered 202 before the manifest
        self.retry_after = "1"
        self.transaction_time = "2026-03-01T12:00:00Z"
        self.requires_access_token = False
        self.jobs: dict[str, dict] = {}
        self.jobs_started = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/fhir"

    def __enter__(self) -> FhirServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def add(self, *resources: dict) -> None:
        with self._lock:
            self.resources.extend(resources)

    def fail_next(self, path_contains: str, status: int, headers: dict[str, str] | None = None, times: int = 1) -> None:
        self.faults.append(Fault(path_contains, status, headers or {}, times))

    def serve_export_directory(self, directory: Path, gzip_types: tuple[str, ...] = ()) -> None:
        """Offer every ``<Type>.*.ndjson`` file of a directory as ``$export`` output (non-FHIR files left out)."""
        for path in sorted(directory.glob("*.ndjson")):
            rtype = path.name.split(".", 1)[0]
            if rtype[:1].isupper():
                self.export_files.append(ExportFile(rtype, path.read_bytes(), gzip=rtype in gzip_types, name=path.name))

    def requests_to(self, fragment: str, method: str = "GET") -> list[Recorded]:
        return [r for r in self.requests if fragment in r.path and r.method == method]

    # --- HTTP ----------------------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stall

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_DELETE(self) -> None:
                self._dispatch("DELETE")

            def _dispatch(self, method: str) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                server.requests.append(Recorded(method, parts.path, query, dict(self.headers.items())))
                for fault in server.faults:
                    if fault.times > 0 and fault.path_contains in self.path:
                        fault.times -= 1
                        return self._send(fault.status, {"resourceType": "OperationOutcome", "issue": [
                            {"severity": "error", "code": "throttled" if fault.status == 429 else "transient"}]},
                                          fault.headers)
                path = parts.path.removeprefix("/fhir/")
                if method == "DELETE" and path.startswith("_export/"):
                    server.jobs.pop(path.split("/")[1], None)
                    return self._send(202, None)
                if path.endswith("$export"):
                    return self._kick_off(path, query)
                if path.startswith("_export/"):
                    return self._status(path.split("/")[1])
                if path.startswith("_files/"):
                    return self._file(int(path.split("/")[1]))
                if "/" not in path and path[:1].isupper():
                    return self._search(path, query)
                return self._send(404, {"resourceType": "OperationOutcome",
                                        "issue": [{"severity": "error", "code": "not-found"}]})

            # search
            def _search(self, rtype: str, query: dict[str, list[str]]) -> None:
                with server._lock:
                    matches = [r for r in server.resources if r["resourceType"] == rtype]
                for value in query.get("_lastUpdated", ()):
                    op, when = value[:2], _instant(value[2:])
                    keep = (lambda t: t >= when) if op == "ge" else (lambda t: t > when)
                    matches = [r for r in matches if keep(_instant(r["meta"]["lastUpdated"]))]
                if query.get("_sort") == ["_lastUpdated"]:
                    matches.sort(key=lambda r: (_instant(r["meta"]["lastUpdated"]), r["id"]))
                count = int(query.get("_count", ["50"])[0])
                offset = int(query.get("_offset", ["0"])[0])
                page = matches[offset:offset + count]
                links = [{"relation": "self", "url": server.base_url + self.path.removeprefix("/fhir")}]
                if offset + count < len(matches):
                    qs = urlencode({**{k: v[0] for k, v in query.items()}, "_offset": str(offset + count)})
                    url = f"{rtype}?{qs}" if server.relative_links else f"{server.base_url}/{rtype}?{qs}"
                    links.append({"relation": "next", "url": url})
                self._send(200, {"resourceType": "Bundle", "type": "searchset", "total": len(matches),
                                 "link": links, "entry": [{"fullUrl": f"{server.base_url}/{rtype}/{r['id']}",
                                                           "resource": r, "search": {"mode": "match"}}
                                                          for r in page]})

            # $export
            def _kick_off(self, path: str, query: dict[str, list[str]]) -> None:
                if self.headers.get("Prefer") != "respond-async":
                    return self._send(400, {"resourceType": "OperationOutcome",
                                            "issue": [{"severity": "error", "code": "required"}]})
                job = str(server.jobs_started)
                server.jobs_started += 1
                server.jobs[job] = {"polls": 0, "request": path, "query": query}
                self._send(202, None, {"Content-Location": f"{server.base_url}/_export/{job}"})

            def _status(self, job: str) -> None:
                state = server.jobs.get(job)
                if state is None:
                    return self._send(404, {"resourceType": "OperationOutcome",
                                            "issue": [{"severity": "error", "code": "not-found"}]})
                state["polls"] += 1
                if state["polls"] <= server.status_polls_before_done:
                    return self._send(202, None, {"Retry-After": server.retry_after,
                                                  "X-Progress": f"{50 * state['polls']}% done"})
                manifest: dict = {"transactionTime": server.transaction_time,
                                  "request": f"{server.base_url}/{state['request']}",
                                  "requiresAccessToken": server.requires_access_token,
                                  "output": [], "deleted": [], "error": []}
                for i, f in enumerate(server.export_files):
                    entry = {"type": f.type, "url": f"{server.base_url}/_files/{i}/{f.name or f'{f.type}.{i}.ndjson'}"}
                    if f.section == "output":
                        entry["count"] = f.body.count(b"\n")
                    manifest[f.section].append(entry)
                self._send(200, manifest, content_type="application/json")

            def _file(self, index: int) -> None:
                f = server.export_files[index]
                body, headers = f.body, {}
                if f.gzip:
                    body, headers = gzip.compress(body), {"Content-Encoding": "gzip"}
                if f.gz_file:
                    return self._send_bytes(200, gzip.compress(body), "application/gzip", {})
                self._send_bytes(200, body, "application/fhir+ndjson", headers)

            def _send(self, status: int, body: dict | None, headers: dict[str, str] | None = None,
                      content_type: str = "application/fhir+json") -> None:
                self._send_bytes(status, b"" if body is None else orjson.dumps(body), content_type, headers or {})

            def _send_bytes(self, status: int, data: bytes, content_type: str, headers: dict[str, str]) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler
