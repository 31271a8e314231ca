"""The FHIR terminology client against a real HTTP server on loopback, and the FactMapper fallback through it.

The server is ``tests/terminology_server.py``: no licensed SNOMED CT terminology server can run here, so it is a
stand-in serving a handful of public codes with the real FHIR operations over real HTTP; the client, its retries,
its cache and the mapper are the production code. Retry delays go through an injected ``sleep`` that records them
and then really sleeps; cache expiry and the outage cooldown read an injected clock so the test can move time.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from ontology import ConceptMaps, FactMapper, Match
from ontology.terminology import (
    Lookup,
    ServerFallback,
    TerminologyClient,
    TerminologyError,
    TerminologyServerConfig,
    TerminologyUnavailable,
    Translation,
)
from terminology_server import (  # tests/ is on sys.path (no __init__.py)
    ICD10CM,
    LOINC,
    RIVERSIDE_DX,
    RIVERSIDE_LAB,
    RIVERSIDE_MAP,
    SCT,
    TerminologyServer,
)
from vigil.domain import Coding, Fact
from vigil.settings import EXAMPLES_DIR, CodeRef, OutcomeConfig

HILLCREST = EXAMPLES_DIR / "conceptmaps" / "hillcrest.json"
HILLCREST_DX = "https://hillcrest.example.org/fhir/CodeSystem/dx"
AKI = OutcomeConfig(id="aki", kind="lab_rise", analyte=CodeRef(system=LOINC, code="2160-0"), unit="mg/dL",
                    absolute_rise=0.3)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sleeps(list):
    """Records each retry delay, then waits it for real (the delays used here are at most 1 s)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        time.sleep(seconds)


@pytest.fixture
def server() -> Iterator[TerminologyServer]:
    with TerminologyServer() as s:
        yield s


def client_for(server: TerminologyServer, clock: Clock | None = None, sleeps: Sleeps | None = None,
               **config: object) -> TerminologyClient:
    cfg = TerminologyServerConfig(base_url=server.base_url, **{"backoff_s": 0.05, **config})
    return TerminologyClient(cfg, sleep=sleeps if sleeps is not None else Sleeps(), clock=clock or Clock())


def fact(code: Coding, site: str, value: float | None = None, unit: str | None = None) -> Fact:
    return Fact("Observation" if value is not None else "Condition", "cond-7f3a", "1", "final",
                "subject-5be1c0ffee", "encounter-9d2e", (code,), datetime(2025, 3, 1, tzinfo=UTC), value, unit,
                site=site)


# --- $translate -----------------------------------------------------------------------------------------------------


def test_translate_reports_every_equivalence(server: TerminologyServer) -> None:
    client = client_for(server)
    assert client.translate(RIVERSIDE_DX, "STEN-2") == [
        Translation(SCT, "233970002", None, "equivalent", RIVERSIDE_MAP)]
    wider = client.translate(RIVERSIDE_DX, "STEN-LAD")
    assert [(t.code, t.equivalence, t.acceptable) for t in wider] == [("233970002", "wider", True)]
    narrower = client.translate(RIVERSIDE_DX, "CAD-ANY")
    assert [(t.code, t.equivalence, t.acceptable) for t in narrower] == [("233970002", "narrower", False)]
    unmatched = client.translate(RIVERSIDE_DX, "SMOKER")
    assert [(t.system, t.code, t.equivalence, t.acceptable) for t in unmatched] == [("", "", "unmatched", False)]
    assert client.translate(RIVERSIDE_DX, "NOT-A-CODE") == []


def test_translate_sends_target_system_and_map_url_and_nothing_else(server: TerminologyServer) -> None:
    client = client_for(server)
    lab = client.translate(RIVERSIDE_LAB, "CR-UMOL", target_system=LOINC, conceptmap_url=RIVERSIDE_MAP)
    assert lab == [Translation(LOINC, "2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "equivalent",
                               RIVERSIDE_MAP)]
    assert client.translate(RIVERSIDE_LAB, "CR-UMOL", target_system=SCT) == []
    first, second = server.sent("$translate")
    assert first.query == {"system": [RIVERSIDE_LAB], "code": ["CR-UMOL"], "targetsystem": [LOINC],
                           "url": [RIVERSIDE_MAP]}
    assert second.query == {"system": [RIVERSIDE_LAB], "code": ["CR-UMOL"], "targetsystem": [SCT]}
    assert first.headers["Accept"] == "application/fhir+json"


def test_r5_relationships_are_read_as_r4_equivalences() -> None:
    with TerminologyServer(r5=True) as server:
        client = client_for(server)
        assert [(t.equivalence, t.acceptable) for t in client.translate(RIVERSIDE_DX, "STEN-2")] == [
            ("equivalent", True)]
        assert [t.equivalence for t in client.translate(RIVERSIDE_DX, "STEN-LAD")] == ["wider"]
        assert [t.equivalence for t in client.translate(RIVERSIDE_DX, "CAD-ANY")] == ["narrower"]
        assert [t.equivalence for t in client.translate(RIVERSIDE_DX, "SMOKER")] == ["disjoint"]
        assert all(not t.acceptable for t in client.translate(RIVERSIDE_DX, "SMOKER"))


def test_unknown_conceptmap_url_is_an_error_naming_the_server(server: TerminologyServer) -> None:
    client = client_for(server)
    with pytest.raises(TerminologyError) as err:
        client.translate(RIVERSIDE_DX, "STEN-2", conceptmap_url="https://nowhere.example/ConceptMap/x")
    message = str(err.value)
    assert f"{server.base_url}/ConceptMap/$translate" in message and "HTTP 404" in message
    assert "not-found" in message and "check base_url" in message


# --- $lookup and $subsumes -------------------------------------------------------------------------------------------


def test_lookup_gives_display_and_properties(server: TerminologyServer) -> None:
    client = client_for(server)
    creatinine = client.lookup(LOINC, "2160-0")
    assert creatinine == Lookup(
        "Creatinine [Mass/volume] in Serum or Plasma",
        {"COMPONENT": ("Creatinine",), "PROPERTY": ("MCnc",), "SYSTEM": ("Ser/Plas",), "SCALE_TYP": ("Qn",),
         "CLASS": ("CHEM",)},
    )
    atherosclerosis = client.lookup(ICD10CM, "I25.10")
    assert atherosclerosis.properties == {"parent": ("I25.1",), "inactive": (False,)}
    assert client.lookup(LOINC, "99999-9") is None  # 404: the server does not know the code


@pytest.mark.parametrize(
    ("a", "b", "outcome"),
    [("I25", "I25.10", "subsumes"), ("I25.10", "I25", "subsumed-by"), ("I25.10", "I25.10", "equivalent"),
     ("A41.9", "I25.10", "not-subsumed"), ("A41", "A41.9", "subsumes")],
)
def test_subsumes(server: TerminologyServer, a: str, b: str, outcome: str) -> None:
    assert client_for(server).subsumes(ICD10CM, a, b) == outcome
    assert server.sent("$subsumes")[0].query == {"system": [ICD10CM], "codeA": [a], "codeB": [b]}


# --- cache ------------------------------------------------------------------------------------------------------------


def test_a_hot_code_is_asked_once_until_its_answer_expires(server: TerminologyServer) -> None:
    clock = Clock()
    client = client_for(server, clock, cache_ttl_s=60)
    for _ in range(5):
        assert client.translate(RIVERSIDE_DX, "STEN-2")[0].code == "233970002"
        assert client.lookup(LOINC, "2160-0").display.startswith("Creatinine")
        assert client.translate(RIVERSIDE_DX, "NOT-A-CODE") == []  # "does not map" is cached too
    assert len(server.sent("$translate")) == 2 and len(server.sent("$lookup")) == 1
    clock.now += 61
    client.translate(RIVERSIDE_DX, "STEN-2")
    assert len(server.sent("$translate")) == 3


def test_cache_is_bounded_least_recently_used_out_first(server: TerminologyServer) -> None:
    client = client_for(server, cache_size=2)
    client.translate(RIVERSIDE_DX, "STEN-2")
    client.translate(RIVERSIDE_DX, "STEN-LAD")
    client.translate(RIVERSIDE_DX, "STEN-2")  # hit: STEN-2 is now the most recent
    client.translate(RIVERSIDE_DX, "SMOKER")  # evicts STEN-LAD
    client.translate(RIVERSIDE_DX, "STEN-2")  # still cached
    client.translate(RIVERSIDE_DX, "STEN-LAD")  # asked again
    assert [r.query["code"][0] for r in server.sent("$translate")] == ["STEN-2", "STEN-LAD", "SMOKER", "STEN-LAD"]


# --- retries, outage, auth ------------------------------------------------------------------------------------------


def test_503_with_retry_after_is_waited_out_then_answered(server: TerminologyServer) -> None:
    sleeps = Sleeps()
    client = client_for(server, sleeps=sleeps)
    server.fail_next(503, {"Retry-After": "1"})
    server.fail_next(429, {})  # no Retry-After: exponential backoff from backoff_s
    started = time.monotonic()
    assert client.translate(RIVERSIDE_DX, "STEN-2")[0].code == "233970002"
    assert sleeps == [1.0, 0.1]  # Retry-After honoured; then the doubled backoff (0.05 → 0.1)
    assert time.monotonic() - started >= 1.0
    assert len(server.sent("$translate")) == 3


def test_outage_raises_unavailable_naming_the_url_then_fails_fast_until_the_cooldown_ends(
    server: TerminologyServer,
) -> None:
    clock, sleeps = Clock(), Sleeps()
    client = client_for(server, clock, sleeps, max_retries=2, cooldown_s=30)
    server.down = True
    with pytest.raises(TerminologyUnavailable) as err:
        client.translate(RIVERSIDE_DX, "STEN-2")
    assert f"{server.base_url}/ConceptMap/$translate" in str(err.value) and "HTTP 503 after 3 attempt(s)" in str(
        err.value)
    assert "check the server and terminology.base_url" in str(err.value)
    assert sleeps == [0.05, 0.1] and len(server.requests) == 3
    with pytest.raises(TerminologyUnavailable, match=r"skipped: it was unavailable \(HTTP 503\).*30 s"):
        client.lookup(LOINC, "2160-0")
    assert len(server.requests) == 3  # failing fast: nothing sent during the cooldown
    server.down = False
    clock.now += 31
    assert client.translate(RIVERSIDE_DX, "STEN-2")[0].code == "233970002"


def test_connection_refused_is_unavailable(server: TerminologyServer) -> None:
    client = client_for(server, max_retries=1)
    base = server.base_url
    server.stop()
    with pytest.raises(TerminologyUnavailable, match=f"{base}/CodeSystem/\\$subsumes: cannot reach"):
        client.subsumes(ICD10CM, "I25", "I25.10")


def test_auth_header_comes_from_the_named_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    with TerminologyServer(required_auth="Bearer tx-secret") as server:
        monkeypatch.setenv("VIGIL_TX_TOKEN", "Bearer tx-secret")
        assert client_for(server, auth_env="VIGIL_TX_TOKEN").lookup(LOINC, "2160-0") is not None
        assert server.requests[-1].headers["Authorization"] == "Bearer tx-secret"
        monkeypatch.setenv("VIGIL_TX_TOKEN", "Bearer stale")
        with pytest.raises(TerminologyError, match=r"HTTP 401.*check the token in \$VIGIL_TX_TOKEN"):
            client_for(server, auth_env="VIGIL_TX_TOKEN").lookup(LOINC, "2160-0")
        monkeypatch.delenv("VIGIL_TX_TOKEN")
        with pytest.raises(ValueError, match="'VIGIL_TX_TOKEN' but that environment variable is not set"):
            client_for(server, auth_env="VIGIL_TX_TOKEN")


def test_a_client_restored_without_its_auth_env_var_refuses_instead_of_crashing_the_mapper(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with TerminologyServer(required_auth="Bearer tx-secret") as server:
        monkeypatch.setenv("VIGIL_TX_TOKEN", "Bearer tx-secret")
        fallback = ServerFallback(client_for(server, auth_env="VIGIL_TX_TOKEN"))
        mapper = FactMapper(ConceptMaps(), [AKI], fallback=fallback)
        checkpoint = pickle.dumps(mapper)
        assert b"tx-secret" not in checkpoint
        monkeypatch.delenv("VIGIL_TX_TOKEN")
        restored = pickle.loads(checkpoint)
        assert not restored.map(fact(Coding(RIVERSIDE_DX, "STEN-2"), "site-a")).mapped
        assert restored.terminology_unavailable == {("site-a", RIVERSIDE_DX): 1}
        assert server.requests == []


def test_a_non_parameters_answer_is_refused_with_a_hint(server: TerminologyServer) -> None:
    server.answer = {"resourceType": "Bundle", "type": "searchset"}  # e.g. base_url points at a plain FHIR server
    with pytest.raises(TerminologyError, match=r"/CodeSystem/\$lookup: expected a FHIR Parameters resource, got "
                                               r"'Bundle'; is base_url the FHIR base of a terminology server"):
        client_for(server).lookup(LOINC, "2160-0")


@pytest.mark.parametrize(
    ("parameter", "message"),
    [
        ([{"name": "message", "valueString": "ok"}], "has no boolean 'result' parameter"),
        ([{"name": "result", "valueBoolean": False}, {"name": "match", "part": [
            {"name": "equivalence", "valueCode": "equivalent"},
            {"name": "concept", "valueCoding": {"system": SCT, "code": "233970002"}}]}],
         "result=false but returns an acceptable match"),
        ([{"name": "result", "valueBoolean": True}, {"name": "match", "part": [
            {"name": "relationship", "valueCode": "maybe"}]}], "R5 relationship 'maybe'"),
        ([{"name": "result", "valueBoolean": True}, {"name": "match", "part": [
            {"name": "equivalence", "valueCode": "equivalent"}]}], "match 'equivalent' has no concept"),
    ],
)
def test_an_unusable_translate_answer_names_the_operation_and_the_code(
    server: TerminologyServer, parameter: list[dict], message: str
) -> None:
    server.answer = {"resourceType": "Parameters", "parameter": parameter}
    with pytest.raises(TerminologyError) as err:
        client_for(server).translate(RIVERSIDE_DX, "STEN-2")
    assert f"GET {server.base_url}/ConceptMap/$translate (system={RIVERSIDE_DX}, code=STEN-2)" in str(err.value)
    assert message in str(err.value)


# --- FactMapper fallback end to end ----------------------------------------------------------------------------------


def test_mapper_falls_back_to_the_server_only_for_codes_no_local_map_has(server: TerminologyServer) -> None:
    client = client_for(server)
    mapper = FactMapper(ConceptMaps.load([HILLCREST]), [AKI], fallback=ServerFallback(client))

    standard = mapper.map(fact(Coding(SCT, "233970002"), "site-a"))
    local = mapper.map(fact(Coding(HILLCREST_DX, "CAD-STEN"), "site-c"))  # Hillcrest's own map, at its site
    assert (standard.concept, local.concept) == (Coding(SCT, "233970002"), Coding(SCT, "233970002"))
    assert server.requests == []  # the local path never touches the server

    for _ in range(3):
        stenosis = mapper.map(fact(Coding(RIVERSIDE_DX, "STEN-2"), "site-a"))
        assert (stenosis.mapped, stenosis.concept) == (True, Coding(SCT, "233970002"))
    assert mapper.map(fact(Coding(RIVERSIDE_DX, "STEN-LAD"), "site-a")).concept == Coding(SCT, "233970002")
    creatinine = mapper.map(fact(Coding(RIVERSIDE_LAB, "CR-UMOL"), "site-a", value=88.4, unit="umol/L"))
    assert (creatinine.concept, creatinine.unit) == (Coding(LOINC, "2160-0"), "mg/dL")
    assert creatinine.value == pytest.approx(1.0, abs=1e-3)

    narrower = mapper.map(fact(Coding(RIVERSIDE_DX, "CAD-ANY"), "site-a"))
    smoker = mapper.map(fact(Coding(RIVERSIDE_DX, "SMOKER"), "site-b"))
    assert (narrower.mapped, narrower.concept, smoker.mapped) == (False, None, False)
    assert mapper.unmapped_codes == {("site-a", RIVERSIDE_DX, "CAD-ANY"): 1, ("site-b", RIVERSIDE_DX, "SMOKER"): 1}
    assert not mapper.terminology_unavailable

    asked = [r.query["code"][0] for r in server.sent("$translate")]
    assert asked == ["STEN-2", "STEN-LAD", "CR-UMOL", "CAD-ANY", "SMOKER"]  # once each: the client's cache
    for r in server.requests:  # only codes go out: no subject, encounter, resource id, site or value
        assert set(r.query) == {"system", "code"}
        for secret in ("subject-5be1c0ffee", "encounter-9d2e", "cond-7f3a", "site-a", "site-b", "88.4"):
            assert secret not in r.raw


def test_server_outage_is_counted_per_site_and_system_never_dropped_or_raised(server: TerminologyServer) -> None:
    client = client_for(server, max_retries=0, cooldown_s=30)
    mapper = FactMapper(ConceptMaps.load([HILLCREST]), [AKI], fallback=ServerFallback(client))
    assert mapper.map(fact(Coding(RIVERSIDE_DX, "STEN-2"), "site-a")).mapped  # answered, cached
    server.stop()

    outcomes = [mapper.map(fact(Coding(RIVERSIDE_DX, code), site))
                for code, site in [("STEN-LAD", "site-a"), ("SEPSIS", "site-a"), ("STEN-LAD", "site-b"),
                                   ("SMOKER", "site-b")]]
    lab = Coding(RIVERSIDE_LAB, "CR-UMOL")
    outcomes.append(mapper.map(fact(lab, "site-b", value=97.2, unit="umol/L")))
    assert [o.mapped for o in outcomes] == [False] * 5
    assert outcomes[-1].value == 97.2 and outcomes[-1].unit == "umol/L"  # kept as sent, not dropped
    assert mapper.terminology_unavailable == {("site-a", RIVERSIDE_DX): 2, ("site-b", RIVERSIDE_DX): 2,
                                              ("site-b", RIVERSIDE_LAB): 1}
    assert not mapper.unmapped_codes  # an outage is not evidence that a code does not map
    assert mapper.map(fact(Coding(RIVERSIDE_DX, "STEN-2"), "site-b")).mapped  # cached answers still serve
    assert mapper.map(fact(Coding(HILLCREST_DX, "ICA"), "site-c")).concept == Coding(SCT, "33367005")


def test_a_refusing_server_is_counted_unavailable_too() -> None:
    with TerminologyServer(required_auth="Bearer right") as server:
        mapper = FactMapper(ConceptMaps(), [AKI], fallback=ServerFallback(client_for(server)))
        assert not mapper.map(fact(Coding(RIVERSIDE_DX, "STEN-2"), "site-a")).mapped
        assert mapper.terminology_unavailable == {("site-a", RIVERSIDE_DX): 1}


def test_fallback_with_target_systems_asks_each_in_turn(server: TerminologyServer) -> None:
    fallback = ServerFallback(client_for(server, target_systems=[SCT, LOINC]))
    assert fallback(RIVERSIDE_LAB, "CR-UMOL") == [Match(LOINC, "2160-0", "equivalent", RIVERSIDE_MAP)]
    assert [r.query["targetsystem"][0] for r in server.sent("$translate")] == [SCT, LOINC]


def test_mapper_with_fallback_survives_a_checkpoint_pickle(server: TerminologyServer) -> None:
    client = TerminologyClient(TerminologyServerConfig(base_url=server.base_url))
    mapper = FactMapper(ConceptMaps(), [AKI], fallback=ServerFallback(client))
    assert mapper.map(fact(Coding(RIVERSIDE_DX, "STEN-2"), "site-a")).mapped
    restored = pickle.loads(pickle.dumps(mapper))
    assert restored.fallback.client._http is None  # no connection (nor auth header) in the checkpoint
    assert restored.map(fact(Coding(RIVERSIDE_DX, "STEN-2"), "site-a")).mapped  # cached answer, no request
    assert restored.map(fact(Coding(RIVERSIDE_DX, "STEN-LAD"), "site-a")).mapped  # a new connection is made
    assert [r.query["code"][0] for r in server.sent("$translate")] == ["STEN-2", "STEN-LAD"]
