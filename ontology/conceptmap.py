"""Local FHIR R4 ConceptMaps with ``$translate`` semantics (interop.md §4.2), no terminology server.

Sites send their own codes; a ConceptMap per site (scoped by ``useContext`` venue = site) says which standard
SNOMED CT / LOINC concept each local code stands for. Only positive equivalences count as a match: ``unmatched`` and
``disjoint`` are explicit statements that a code does *not* map, and they suppress ``group.unmapped`` fallbacks, as
the R4 spec requires.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fhir.resources.R4B.conceptmap import ConceptMap, ConceptMapGroup, ConceptMapGroupElement
from pydantic import ValidationError

STANDARD_SYSTEMS = frozenset({"http://snomed.info/sct", "http://loinc.org"})
"""Codes in these systems are already standard: they pass through as mapped, with no translation."""

ACCEPTABLE = frozenset({"equivalent", "equal", "wider", "subsumes"})
"""Equivalences that make a target usable for outcome measurement (interop.md §4.2)."""

NEGATIVE = frozenset({"unmatched", "disjoint"})
EQUIVALENCES = ACCEPTABLE | NEGATIVE | {"relatedto", "narrower", "specializes", "inexact"}
"""Every R4 ConceptMap equivalence code; fhir.resources checks structure, not code values, so vigil checks these."""
UNMAPPED_MODES = ("provided", "fixed", "other-map")

USAGE_CONTEXT_TYPE = "http://terminology.hl7.org/CodeSystem/usage-context-type"
SITE_SYSTEM = "https://vigil.dev/fhir/CodeSystem/site"

# Equivalence reported for group.unmapped fallbacks, which R4 leaves unspecified: "provided" reuses the source
# code unchanged (equal), "fixed" names a catch-all concept that is broader than the source (wider).
_UNMAPPED_EQUIVALENCE = {"provided": "equal", "fixed": "wider"}
_RANK = {"equal": 0, "equivalent": 1, "wider": 2, "subsumes": 3}


@dataclass(frozen=True, slots=True)
class Match:
    system: str
    code: str
    equivalence: str
    map_url: str


@dataclass(frozen=True, slots=True)
class _Target:
    system: str
    code: str
    equivalence: str


@dataclass(frozen=True, slots=True)
class _Unmapped:
    mode: str  # provided | fixed | other-map
    code: str | None  # fixed
    url: str | None  # other-map


@dataclass(frozen=True, slots=True)
class _Group:
    source: str
    target: str | None
    elements: dict[str, tuple[_Target, ...]]  # source code -> every target, negatives too
    unmapped: _Unmapped | None


@dataclass(frozen=True, slots=True)
class _Map:
    url: str
    sites: frozenset[str]  # empty: applies to every site
    groups: tuple[_Group, ...]

    def applies_at(self, site: str | None) -> bool:
        return not self.sites or site in self.sites


class ConceptMapError(ValueError):
    """A ConceptMap file that cannot be used; the message names the file and what to fix."""


class TerminologyUnavailable(RuntimeError):
    """A translation source beyond the local maps (a terminology server) could not answer for now: the fact is
    a counted data-quality event ('terminology unavailable'), neither mapped nor unmapped, and is never dropped.
    """


class ConceptMaps:
    """Every loaded map; ``translate`` answers like ``ConceptMap/$translate`` over all maps that apply at a site.

    A map scoped to sites applies only there; when the site of a fact is unknown (``site=None``) only unscoped maps
    apply, because a site's local code must not be read with another site's dictionary.
    """

    def __init__(self, maps: Iterable[_Map] = (), accept: frozenset[str] = ACCEPTABLE) -> None:
        self._maps = tuple(maps)
        self._by_url = {m.url: m for m in self._maps}
        self._accept = accept

    @classmethod
    def load(cls, paths: Iterable[Path], accept: frozenset[str] = ACCEPTABLE) -> ConceptMaps:
        maps: dict[str, _Map] = {}
        where: dict[str, Path] = {}
        for path in map(Path, paths):
            m = _read(path)
            if m.url in maps:
                raise ConceptMapError(f"{path}: ConceptMap url {m.url} is also used by {where[m.url]}; make it unique")
            maps[m.url], where[m.url] = m, path
        return cls(maps.values(), accept)

    def translate(self, system: str, code: str, site: str | None = None) -> list[Match]:
        """Acceptable targets for ``system#code`` at ``site``, best equivalence first; [] when it does not map."""
        found: dict[tuple[str, str], Match] = {}
        for m in self._maps:
            if m.applies_at(site):
                for match in self._in_map(m, system, code, depth=0):
                    found.setdefault((match.system, match.code), match)
        return sorted(found.values(), key=lambda x: _RANK.get(x.equivalence, len(_RANK)))

    def _in_map(self, m: _Map, system: str, code: str, depth: int) -> list[Match]:
        out: list[Match] = []
        for group in m.groups:
            if group.source != system:
                continue
            targets = group.elements.get(code)
            if targets is not None:  # the group has the code: its targets decide, negatives too; no fallback
                out += (Match(t.system, t.code, t.equivalence, m.url) for t in targets if t.equivalence in self._accept)
            elif group.unmapped is None:
                continue
            elif group.unmapped.mode == "other-map":
                other = self._by_url.get(group.unmapped.url or "")
                if other is not None and depth < len(self._maps):  # an unknown map or a cycle gives nothing
                    out += self._in_map(other, system, code, depth + 1)
            elif (equivalence := _UNMAPPED_EQUIVALENCE[group.unmapped.mode]) in self._accept:
                target_code = code if group.unmapped.mode == "provided" else group.unmapped.code
                out.append(Match(group.target or system, target_code or "", equivalence, m.url))
        return out


def _read(path: Path) -> _Map:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConceptMapError(f"ConceptMap file not found: {path} (check concept_maps in the config)") from None
    except json.JSONDecodeError as exc:
        raise ConceptMapError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(raw, dict) or raw.get("resourceType") != "ConceptMap":
        found = raw.get("resourceType") if isinstance(raw, dict) else type(raw).__name__
        raise ConceptMapError(f"{path}: expected a FHIR R4 ConceptMap, found {found!r}")
    try:
        cm = ConceptMap.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ConceptMapError(f"{path}: not a valid FHIR R4 ConceptMap: {problems}") from None
    if not cm.url:
        raise ConceptMapError(f"{path}: ConceptMap has no url; give it a canonical url so matches can cite it")
    groups = []
    for i, group in enumerate(cm.group or []):
        if not group.source:
            raise ConceptMapError(f"{path}: group[{i}] has no source system; set group.source to the local code system")
        elements: dict[str, tuple[_Target, ...]] = {}
        for element in group.element or []:
            elements[element.code] = elements.get(element.code, ()) + tuple(_targets(path, i, group, element))
        unmapped = _unmapped(path, i, group) if group.unmapped is not None else None
        groups.append(_Group(group.source, group.target, elements, unmapped))
    return _Map(url=cm.url, sites=_sites(cm), groups=tuple(groups))


def _targets(path: Path, i: int, group: ConceptMapGroup, element: ConceptMapGroupElement) -> list[_Target]:
    if not element.code:
        raise ConceptMapError(f"{path}: group[{i}] has an element without a code; every element maps one source code")
    out = []
    for target in element.target or []:
        if target.equivalence not in EQUIVALENCES:
            raise ConceptMapError(
                f"{path}: group[{i}] element {element.code!r} has equivalence {target.equivalence!r}; "
                f"use one of the R4 codes: {', '.join(sorted(EQUIVALENCES))}"
            )
        if target.equivalence not in NEGATIVE and not (group.target and target.code):
            raise ConceptMapError(
                f"{path}: group[{i}] element {element.code!r} maps to a target without a system or code; "
                "set group.target and target.code, or use equivalence 'unmatched'"
            )
        out.append(_Target(group.target or "", target.code or "", target.equivalence))
    return out


def _unmapped(path: Path, i: int, group: ConceptMapGroup) -> _Unmapped:
    u = group.unmapped
    if u.mode not in UNMAPPED_MODES:
        raise ConceptMapError(f"{path}: group[{i}].unmapped mode {u.mode!r} is not one of {', '.join(UNMAPPED_MODES)}")
    if u.mode == "fixed" and not u.code:
        raise ConceptMapError(f"{path}: group[{i}].unmapped mode 'fixed' needs a code")
    if u.mode == "other-map" and not u.url:
        raise ConceptMapError(f"{path}: group[{i}].unmapped mode 'other-map' needs the url of the other map")
    return _Unmapped(mode=u.mode, code=u.code, url=u.url)


def _sites(cm: ConceptMap) -> frozenset[str]:
    sites = set()
    for ctx in cm.useContext or []:
        if ctx.code.system == USAGE_CONTEXT_TYPE and ctx.code.code == "venue" and ctx.valueCodeableConcept:
            sites.update(c.code for c in ctx.valueCodeableConcept.coding or [] if c.system == SITE_SYSTEM and c.code)
    return frozenset(sites)
