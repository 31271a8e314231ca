"""Template variables that pick one stream: model → model_version → metric, site, subgroup.

Each variable is single-valued and queried from ``stream_state``, so a dashboard offers only streams that exist.
"all" is a real site and subgroup value (every site / every subgroup), listed first.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import QueryVariable
from grafana_foundation_sdk.models.dashboard import VariableRefresh

from dashboards.datasource import POSTGRES

_SCOPE = "WHERE model = '$model' AND model_version = '$model_version'"

_VARIABLES: dict[str, tuple[str, str]] = {
    "model": ("Model", "SELECT DISTINCT model FROM stream_state ORDER BY 1"),
    "model_version": ("Version", "SELECT DISTINCT model_version FROM stream_state WHERE model = '$model' ORDER BY 1"),
    "metric": ("Metric", f"SELECT DISTINCT metric FROM stream_state {_SCOPE} ORDER BY 1"),
    "site": ("Site", f"SELECT site FROM stream_state {_SCOPE} GROUP BY site ORDER BY site <> 'all', site"),
    "subgroup": ("Subgroup",
                 f"SELECT subgroup FROM stream_state {_SCOPE} GROUP BY subgroup ORDER BY subgroup <> 'all', subgroup"),
}

STREAM = ("model", "model_version", "metric", "site", "subgroup")
"""The variables that select one stream, in dependency order."""


def variable(name: str) -> QueryVariable:
    """A single-valued variable refreshed on load, so new models, sites and subgroups appear without a rebuild."""
    try:
        label, sql = _VARIABLES[name]
    except KeyError:
        raise ValueError(f"unknown dashboard variable {name!r}; known: {', '.join(_VARIABLES)}") from None
    return (QueryVariable(name).label(label).datasource(POSTGRES).query(sql)
            .refresh(VariableRefresh.ON_DASHBOARD_LOAD))

