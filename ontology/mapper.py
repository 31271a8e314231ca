"""Facts in a site's own codes and units → OutcomeFacts in standard concepts and each analyte's canonical unit.

An unmapped code is kept and flagged (``mapped=False``), never dropped: a site that starts sending a code no map
covers is a data-quality cause the monitors must see (the ``unmapped_rate`` metric), not silently fewer outcomes.

Local ConceptMaps decide first and stay the fast path. Only a code they do not map is handed to the optional
``fallback`` (a licensed terminology server, ``ontology.terminology.ServerFallback``); when it cannot answer, the fact
is counted as 'terminology unavailable' for its site and code system — a data-quality event of its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from enum import Enum

from ontology.conceptmap import STANDARD_SYSTEMS, ConceptMaps, Match, TerminologyUnavailable
from ontology.units import UnitError, convert
from vigil.domain import Coding, Fact, OutcomeFact
from vigil.settings import OutcomeConfig

_Target = tuple[Coding, str | None]  # standard concept, canonical unit when it is an outcome's analyte
_UNSEEN: object = object()


class _Ask(Enum):
    """A marker kept in the translation cache; an Enum so it is still the same object after a checkpoint's pickle."""

    FALLBACK = "no local map has the code: ask the fallback (it caches, with a time to live)"


_ASK_FALLBACK = _Ask.FALLBACK

Fallback = Callable[[str, str, str | None], Sequence[Match]]
"""(system, code, site) → acceptable matches, best first; [] = the source says it does not map; raises
``TerminologyUnavailable`` when it cannot say."""


class FactMapper:
    """Maps one fact at a time; translations and unit factors are cached because every fact passes here.

    Counters for the data-quality view: ``unit_errors[(site, unit)]`` for values whose unit cannot be converted
    (an empty unit means the value came without one), ``unmapped_codes[(site, system, code)]`` for facts whose
    codings all failed to map, keyed by their first coding, and ``terminology_unavailable[(site, system)]`` for facts
    left unmapped only because the fallback could not answer (keyed by the first coding it was asked about).
    ``fallback`` may be set after construction, e.g. re-attached to a mapper restored from a checkpoint.
    """

    def __init__(
        self, maps: ConceptMaps, outcomes: Sequence[OutcomeConfig], fallback: Fallback | None = None
    ) -> None:
        self._maps = maps
        self._units = _canonical_units(outcomes)
        self.fallback = fallback
        self._targets: dict[tuple[str, str, str | None], _Target | _Ask | None] = {}
        self.unit_errors: Counter[tuple[str | None, str]] = Counter()
        self.unmapped_codes: Counter[tuple[str | None, str, str]] = Counter()
        self.terminology_unavailable: Counter[tuple[str | None, str]] = Counter()

    def __setstate__(self, state: dict) -> None:
        """A checkpoint written before the fallback existed restores without one (the pipeline re-attaches it)."""
        state.setdefault("fallback", None)
        state.setdefault("terminology_unavailable", Counter())
        self.__dict__.update(state)

    def map(self, fact: Fact) -> OutcomeFact:
        site = fact.site
        target = None
        unavailable = None  # the system of the first coding the fallback could not answer for
        for coding in fact.codings:
            key = (coding.system, coding.code, site)
            target = self._targets.get(key, _UNSEEN)
            if target is _UNSEEN:
                target = self._targets[key] = self._resolve(coding.system, coding.code, site)
            if target is _ASK_FALLBACK:
                try:
                    target = self._ask(coding.system, coding.code, site)
                except TerminologyUnavailable:
                    target, unavailable = None, unavailable or coding.system
            if target is not None:
                break
        if target is None:
            if unavailable is not None:
                self.terminology_unavailable[(site, unavailable)] += 1
            elif fact.codings:
                first = fact.codings[0]
                self.unmapped_codes[(site, first.system, first.code)] += 1
            return OutcomeFact(fact, None, fact.value, fact.unit, False)
        concept, unit = target
        value = fact.value
        if unit is None or value is None:
            return OutcomeFact(fact, concept, value, unit or fact.unit, True)
        try:
            value = convert(value, fact.unit or "", unit, concept.code)
        except UnitError:
            self.unit_errors[(site, fact.unit or "")] += 1
            value = None
        return OutcomeFact(fact, concept, value, unit, True)

    def _resolve(self, system: str, code: str, site: str | None) -> _Target | _Ask | None:
        """The standard concept for a coding and, when it is an outcome's analyte, that outcome's unit;
        ``_ASK_FALLBACK`` when no local map has it and a fallback is configured.
        """
        if system in STANDARD_SYSTEMS:
            concept = Coding(system, code)
        else:
            matches = self._maps.translate(system, code, site)
            if not matches:
                return None if self.fallback is None else _ASK_FALLBACK
            concept = Coding(matches[0].system, matches[0].code)
        return concept, self._units.get((concept.system, concept.code))

    def _ask(self, system: str, code: str, site: str | None) -> _Target | None:
        """The fallback's answer, asked every time: it caches with a time to live, so a map fixed on the server is
        picked up, and an outage is retried once the server is back."""
        matches = self.fallback(system, code, site)
        if not matches:
            return None
        concept = Coding(matches[0].system, matches[0].code)
        return concept, self._units.get((concept.system, concept.code))


def _canonical_units(outcomes: Sequence[OutcomeConfig]) -> dict[tuple[str, str], str]:
    """Analyte (system, code) → the unit its outcome compares values in; two outcomes must agree on it."""
    units: dict[tuple[str, str], tuple[str, str]] = {}
    for cfg in outcomes:
        if cfg.analyte is None or cfg.unit is None:
            continue
        key = (cfg.analyte.system, cfg.analyte.code)
        if key in units and units[key][0] != cfg.unit:
            other_unit, other_ref = units[key]
            raise ValueError(
                f"outcomes {other_ref} and {cfg.ref} both measure {key[1]} but in {other_unit!r} and {cfg.unit!r}; "
                "give every outcome on one analyte the same unit"
            )
        units[key] = (cfg.unit, cfg.ref)
    return {key: unit for key, (unit, _) in units.items()}


SHORT_SYSTEM_NAMES = {
    "http://loinc.org": "loinc",
    "http://snomed.info/sct": "snomed",
    "http://hl7.org/fhir/sid/icd-10-cm": "icd10cm",
    "http://hl7.org/fhir/sid/icd-10": "icd10",
    "http://www.ama-assn.org/go/cpt": "cpt",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "rxnorm",
}


def code_system_cell(fact: Fact) -> str:
    """The stream cell of a fact's code system ("code_system=loinc"; a local system by its URI), so mapping
    coverage is followed per site *and* code system: a site whose lab system changes its codes shows there."""
    system = fact.codings[0].system if fact.codings else "none"
    return f"code_system={SHORT_SYSTEM_NAMES.get(system, system)}"
