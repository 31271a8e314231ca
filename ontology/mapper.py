"""Facts in a site's own codes and units → OutcomeFacts in standard concepts and each analyte's canonical unit.

An unmapped code is kept and flagged (``mapped=False``), never dropped: a site that starts sending a code no map
covers is a data-quality cause the monitors must see (the ``unmapped_rate`` metric), not silently fewer outcomes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ontology.conceptmap import STANDARD_SYSTEMS, ConceptMaps
from ontology.units import UnitError, convert
from vigil.domain import Coding, Fact, OutcomeFact
from vigil.settings import OutcomeConfig


class FactMapper:
    """Maps one fact at a time; translations and unit factors are cached because every fact passes here.

    Counters for the data-quality view: ``unit_errors[(site, unit)]`` for values whose unit cannot be converted
    (an empty unit means the value came without one) and ``unmapped_codes[(site, system, code)]`` for facts whose
    codings all failed to map, keyed by their first coding.
    """

    def __init__(self, maps: ConceptMaps, outcomes: Sequence[OutcomeConfig]) -> None:
        self._maps = maps
        self._units = _canonical_units(outcomes)
        self._concepts: dict[tuple[str, str, str | None], Coding | None] = {}
        self.unit_errors: Counter[tuple[str | None, str]] = Counter()
        self.unmapped_codes: Counter[tuple[str | None, str, str]] = Counter()

    def map(self, fact: Fact) -> OutcomeFact:
        concept = None
        for coding in fact.codings:
            concept = self._concept(coding.system, coding.code, fact.site)
            if concept is not None:
                break
        if concept is None:
            if fact.codings:
                first = fact.codings[0]
                self.unmapped_codes[(fact.site, first.system, first.code)] += 1
            return OutcomeFact(fact=fact, concept=None, value=fact.value, unit=fact.unit, mapped=False)
        unit = self._units.get((concept.system, concept.code))
        if unit is None or fact.value is None:
            return OutcomeFact(fact=fact, concept=concept, value=fact.value, unit=unit or fact.unit, mapped=True)
        try:
            value = convert(fact.value, fact.unit or "", unit, analyte=concept.code)
        except UnitError:
            self.unit_errors[(fact.site, fact.unit or "")] += 1
            return OutcomeFact(fact=fact, concept=concept, value=None, unit=unit, mapped=True)
        return OutcomeFact(fact=fact, concept=concept, value=value, unit=unit, mapped=True)

    def _concept(self, system: str, code: str, site: str | None) -> Coding | None:
        key = (system, code, site)
        try:
            return self._concepts[key]
        except KeyError:
            pass
        if system in STANDARD_SYSTEMS:
            concept: Coding | None = Coding(system, code)
        else:
            matches = self._maps.translate(system, code, site)
            concept = Coding(matches[0].system, matches[0].code) if matches else None
        self._concepts[key] = concept
        return concept


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
