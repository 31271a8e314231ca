"""The PostgreSQL datasource every panel reads, and raw-SQL targets for it.

grafana-foundation-sdk has no PostgreSQL query builder, so SQL targets and SQL annotations are built here.
The datasource uid is fixed: provisioning (provisioning/datasources/vigil.yaml) creates it under the same uid.
"""

from __future__ import annotations

from typing import Literal

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.runtime import UnknownDataquery
from grafana_foundation_sdk.models.dashboard import AnnotationQuery, AnnotationTarget, DataSourceRef

POSTGRES_UID = "vigil-postgres"
POSTGRES_TYPE = "grafana-postgresql-datasource"
POSTGRES = DataSourceRef(type_val=POSTGRES_TYPE, uid=POSTGRES_UID)

Format = Literal["time_series", "table"]


def sql_target(sql: str, fmt: Format, ref_id: str) -> dict[str, object]:
    """The JSON of one raw-SQL query against the vigil datasource, as Grafana saves it in code mode."""
    return {
        "datasource": {"type": POSTGRES_TYPE, "uid": POSTGRES_UID},
        "editorMode": "code",
        "format": fmt,
        "rawQuery": True,
        "rawSql": sql,
        "refId": ref_id,
    }


class SqlQuery(cogbuilder.Builder[cogvariants.Dataquery]):
    """A panel target: raw SQL in code mode; ``time_series`` needs a ``time`` column, ``table`` takes any rows."""

    def __init__(self, sql: str, fmt: Format = "table", ref_id: str = "A") -> None:
        self._target = sql_target(sql, fmt, ref_id)

    def build(self) -> UnknownDataquery:
        return UnknownDataquery(dict(self._target))


class _SqlAnnotationTarget(AnnotationTarget):
    """Grafana stores a SQL annotation's query as a normal target; the SDK only models the built-in one."""

    def __init__(self, sql: str) -> None:
        super().__init__()
        self.sql = sql

    def to_json(self) -> dict[str, object]:
        return sql_target(self.sql, "table", "Anno")


class SqlAnnotation(cogbuilder.Builder[AnnotationQuery]):
    """Dashboard annotations from SQL: columns ``time``, optional ``timeend`` (a region), ``text`` and ``tags``."""

    def __init__(self, name: str, sql: str, color: str) -> None:
        self._query = AnnotationQuery(name=name, datasource=POSTGRES, enable=True, icon_color=color,
                                      target=_SqlAnnotationTarget(sql))

    def build(self) -> AnnotationQuery:
        return self._query
