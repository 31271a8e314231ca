"""vigil: ontology step — local codes to SNOMED CT / LOINC, units to canonical, outcomes and subgroups."""

from ontology.conceptmap import STANDARD_SYSTEMS, ConceptMapError, ConceptMaps, Match
from ontology.mapper import FactMapper
from ontology.outcomes import CodeSetOutcome, LabRiseOutcome, OutcomeDefinition, definition_for
from ontology.subgroups import ETHNICITY_LABELS, RACE_LABELS, age_band, attributes, cells
from ontology.units import MOLAR_MASSES, UnitError, convert

__all__ = [
    "ETHNICITY_LABELS",
    "MOLAR_MASSES",
    "RACE_LABELS",
    "STANDARD_SYSTEMS",
    "CodeSetOutcome",
    "ConceptMapError",
    "ConceptMaps",
    "FactMapper",
    "LabRiseOutcome",
    "Match",
    "OutcomeDefinition",
    "UnitError",
    "age_band",
    "attributes",
    "cells",
    "convert",
    "definition_for",
]
