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

_Target = tuple[Coding, str | None]  # standard concept, canonical unit when it is an outcome's analyte
_UNSEEN: object = object()


class FactMapper:
    """Maps one fact at a time; translations and unit factors are cached because every fact passes here.

    Counters for the data-quality view: ``unit_errors[(site, unit)]`` for values whose unit cannot be converted
    (an empty unit means the value came without one) and ``unmapped_codes[(site, system, code)]`` for facts whose
    codings all failed to map, keyed by their first coding.
    """

    def __init__(self, maps: ConceptMaps, outcomes: Sequence[OutcomeConfig]) -> None:
        self._maps = maps
        self._units = _canonical_units(outcomes)
        self._targets: dict[tuple[str, str, str | None], _Target | None] = {}
        self.unit_errors: Counter[tuple[str | None, str]] = Counter()
        self.unmapped_codes: Counter[tuple[str | None, str, str]] = Counter()

    def map(self, fact: Fact) -> OutcomeFact:
        site = fact.site
        target = None
        for coding in fact.codings:
            key = (coding.system, coding.code, site)
            target = self._targets.get(key, _UNSEEN)
            if target is _UNSEEN:
                target = self._targets[key] = self._resolve(coding.system, coding.code, site)
            if target is not None:
                break
        if target is None:
            if fact.codings:
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

    def _resolve(self, system: str, code: str, site: str | None) -> _Target | None:
        """The standard concept for a coding and, when it is an outcome's analyte, that outcome's unit."""
        if system in STANDARD_SYSTEMS:
            concept = Coding(system, code)
        else:
            matches = self._maps.translate(system, code, site)
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
