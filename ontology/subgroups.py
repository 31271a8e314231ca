"""Subgroup attributes of a prediction and the stream cells they fall into.

Performance is monitored per subgroup because a device can degrade for one population while the overall
numbers hold. Every attribute always has a value:
a missing one is "unknown", its own cell, so absent data shows up instead of vanishing from the denominators.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from functools import lru_cache

from vigil.domain import ALL, DeviceInfo, SubjectInfo
from vigil.settings import SubgroupConfig

UNKNOWN = "unknown"

RACE_LABELS: dict[str, str] = {
    # OMB race categories, CDC Race & Ethnicity code system urn:oid:2.16.840.1.113883.6.238; UNK/ASKU are NullFlavor.
    # A code not listed here is a real answer we do not have a label for, so it counts as "other", not "unknown".
    "2106-3": "white",
    "2054-5": "black",
    "2028-9": "asian",
    "1002-5": "aian",  # American Indian or Alaska Native
    "2076-8": "nhpi",  # Native Hawaiian or Other Pacific Islander
    "2131-1": "other",
    "UNK": UNKNOWN,
    "ASKU": UNKNOWN,
}
ETHNICITY_LABELS: dict[str, str] = {
    "2135-2": "hispanic",
    "2186-5": "not-hispanic",
    "UNK": UNKNOWN,
    "ASKU": UNKNOWN,
}


def age_band(birth_year: int | None, at: datetime, bands: Sequence[int]) -> str:
    """The band of ``at.year - birth_year`` for band lower bounds such as [18, 50, 65, 80] → "18-49", "50-64",
    "65-79", "80+"; "<18" below the first bound. De-identified feeds carry the birth year only, so the age can be
    one year high before the birthday; "unknown" when there is no birth year.
    """
    if not bands:
        raise ValueError("subgroups.age_bands is empty; give the lower bounds of the bands, e.g. [18, 50, 65, 80]")
    if birth_year is None:
        return UNKNOWN
    age = at.year - birth_year
    if age < bands[0]:
        return f"<{bands[0]}"
    for lower, upper in zip(bands, bands[1:]):
        if age < upper:
            return f"{lower}-{upper - 1}"
    return f"{bands[-1]}+"


def attributes(
    subject: SubjectInfo | None, scanner: DeviceInfo | None, at: datetime, cfg: SubgroupConfig
) -> dict[str, str]:
    """The configured attributes of one prediction; ``scanner`` only when the prediction names an acquisition
    device, so models without one get no scanner cells at all.
    """
    out = {}
    for name in cfg.attributes:
        if name == "scanner":
            if scanner is not None:
                out[name] = _scanner(scanner)
            continue
        reader = _SUBJECT_ATTRIBUTES.get(name)
        if reader is None:
            known = ", ".join([*_SUBJECT_ATTRIBUTES, "scanner"])
            raise ValueError(f"unknown subgroup attribute {name!r} in subgroups.attributes; known: {known}")
        out[name] = reader(subject, at, cfg) if subject is not None else UNKNOWN
    return out


def cells(attrs: dict[str, str], cfg: SubgroupConfig) -> list[str]:
    """The stream cells one prediction counts in: "all", each "key=value", then each declared intersection
    "a=x&b=y" in the order its keys are declared (an intersection needs all its keys present).

    Called for every metric a prediction is observed in, while the distinct attribute combinations are few (sex ×
    age band × race × ethnicity × scanner): the cells are memoised on the attributes and the configuration as they
    are now (BENCHMARKS.md R6). A fresh list is returned each time, so a caller may keep or change it.
    """
    layout = (tuple(cfg.attributes), tuple(map(tuple, cfg.intersections)) if cfg.intersections else ())
    return list(_cells(tuple(attrs.items()), layout))


@lru_cache(maxsize=4096)
def _cells(attrs: tuple[tuple[str, str], ...], layout: tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]
           ) -> tuple[str, ...]:
    values = dict(attrs)
    names, intersections = layout
    out = [ALL]
    out += (f"{name}={values[name]}" for name in names if name in values)
    for keys in intersections:
        if all(k in values for k in keys):
            out.append("&".join(f"{k}={values[k]}" for k in keys))
    return tuple(out)


def _scanner(device: DeviceInfo) -> str:
    name = " ".join(part for part in (device.manufacturer, device.model) if part)
    return name or UNKNOWN


_SUBJECT_ATTRIBUTES: dict[str, Callable[[SubjectInfo, datetime, SubgroupConfig], str]] = {
    "sex": lambda s, at, cfg: (s.sex or UNKNOWN).lower(),
    "age_band": lambda s, at, cfg: age_band(s.birth_year, at, cfg.age_bands),
    "race": lambda s, at, cfg: RACE_LABELS.get(s.race, "other") if s.race else UNKNOWN,
    "ethnicity": lambda s, at, cfg: ETHNICITY_LABELS.get(s.ethnicity, UNKNOWN) if s.ethnicity else UNKNOWN,
}
