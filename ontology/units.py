"""UCUM unit conversion on pint, including molar ↔ mass concentration for analytes with a known molar mass.

Sites report the same analyte in different units (creatinine in mg/dL in the US, µmol/L elsewhere); outcome
definitions compare values in one canonical unit. Units arrive as UCUM codes (The Unified Code for Units of Measure,
Schadow & McDonald, https://ucum.org/ucum); the handful of UCUM spellings pint does not read directly (``10*3``,
``Cel``, ``mm[Hg]``, ``%``, annotations such as ``{cells}``, ``.`` for multiplication, ``m2`` exponents) are rewritten
first. Every value passes here, so each (unit, target, analyte) conversion is worked out once and cached as an affine
map ``value * scale + offset`` (offset is non-zero only for temperatures).
"""

from __future__ import annotations

import re
from functools import cache

import pint

MOLAR_MASSES: dict[str, float] = {
    # LOINC code -> g/mol. Creatinine C4H7N3O: 113.12 g/mol (PubChem CID 588), the factor behind 88.4 µmol/L = 1 mg/dL.
    "2160-0": 113.12,  # Creatinine [Mass/volume] in Serum or Plasma
    "14682-9": 113.12,  # Creatinine [Moles/volume] in Serum or Plasma
}


class UnitError(ValueError):
    """A unit that cannot be read, or a conversion that is impossible; the message names the units."""


_BRACKET_ATOMS = {"mm[Hg]": "mmHg", "[degF]": "degF", "[ppm]": "ppm", "%": "percent"}
_ANNOTATION_ON_ATOM = re.compile(r"(?<=[\w\]])\{[^}]*\}")  # "10*3{cells}" -> "10*3": an annotation is a factor of 1
_ANNOTATION = re.compile(r"\{[^}]*\}")
_CELSIUS = re.compile(r"(?<![A-Za-z])Cel(?![A-Za-z])")
_POWER_OF_TEN = re.compile(r"10[*^](-?\d+)")
_PRODUCT = re.compile(r"(?<=[\w\])])\.(?=[A-Za-z(\[])")
_EXPONENT = re.compile(r"(?<=[A-Za-z\]])(-?\d+)")

_factors: dict[tuple[str, str, str | None], tuple[float, float]] = {}
_failures: dict[tuple[str, str, str | None], UnitError] = {}  # a site that sends a bad unit sends it on every value


def convert(value: float, unit: str, to: str, analyte: str | None = None) -> float:
    """``value`` in UCUM ``unit`` expressed in ``to``; ``analyte`` (a LOINC code) allows molar ↔ mass conversion."""
    if unit == to:
        return value
    try:
        scale, offset = _factors[(unit, to, analyte)]
    except KeyError:
        scale, offset = _learn(unit, to, analyte)
    return value * scale + offset


def _learn(unit: str, to: str, analyte: str | None) -> tuple[float, float]:
    key = (unit, to, analyte)
    if key in _failures:
        raise _failures[key]
    try:
        factor = _factors[key] = _affine(unit, to, analyte)
    except UnitError as exc:
        _failures[key] = exc
        raise
    return factor


def _affine(unit: str, to: str, analyte: str | None) -> tuple[float, float]:
    registry = _registry()
    src, dst = _parse(unit), _parse(to)
    mw = MOLAR_MASSES.get(analyte) if analyte else None
    context = {"mw": registry.Quantity(mw, "g/mol")} if mw else None

    def at(x: float) -> float:
        q = registry.Quantity(x * src.magnitude, src.units)
        q = q.to(dst.units, "chemistry", **context) if context else q.to(dst.units)
        return q.magnitude / dst.magnitude

    try:
        one = at(1.0)
        scale = at(2.0) - one  # two points, not 0 and 1: pint's chemistry context divides by the magnitude
        return scale, one - scale
    except (pint.DimensionalityError, ZeroDivisionError):  # pint's chemistry context divides by 0 for some mismatches
        hint = ""
        if "[substance]" in f"{src.dimensionality}{dst.dimensionality}" and not mw:
            hint = (
                f"; moles ↔ mass needs a molar mass and analyte {analyte} has none in MOLAR_MASSES"
                if analyte
                else "; moles ↔ mass needs the analyte's LOINC code for its molar mass"
            )
        raise UnitError(
            f"cannot convert {unit!r} to {to!r}: {src.dimensionality} is not {dst.dimensionality}{hint}"
        ) from None


def _parse(ucum: str) -> pint.Quantity:
    try:
        return _registry().parse_expression(_pint_expression(ucum))
    except Exception as exc:  # pint raises several unrelated types (UndefinedUnitError, AssertionError, TokenError)
        raise UnitError(f"unit {ucum!r} is not a UCUM unit vigil can read (e.g. 'mg/dL', 'umol/L'): {exc}") from None


def _pint_expression(ucum: str) -> str:
    """Rewrite the UCUM spellings pint reads differently; the rest of UCUM's common units pint reads as is."""
    expr = ucum.strip().replace("µ", "u").replace("μ", "u")  # micro sign and Greek mu
    expr = _ANNOTATION.sub("1", _ANNOTATION_ON_ATOM.sub("", expr))
    for atom, name in _BRACKET_ATOMS.items():
        expr = expr.replace(atom, name)
    expr = _CELSIUS.sub("degC", expr)
    expr = _POWER_OF_TEN.sub(r"(10**\1)", expr)
    expr = _PRODUCT.sub("*", expr)
    expr = _EXPONENT.sub(r"**\1", expr)
    if not expr or expr.startswith("/"):
        expr = "1" + expr
    return expr


@cache
def _registry() -> pint.UnitRegistry:
    return pint.UnitRegistry()
