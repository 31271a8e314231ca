"""Panel factories: the few panel shapes vigil's dashboards are made of, all reading the vigil datasource.

Each factory takes a title, the SQL and a size; the dashboard builder places panels left to right, top to bottom.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import barchart, stat, table, timeseries
from grafana_foundation_sdk.builders.common import GraphThresholdsStyleConfig, StackingConfig
from grafana_foundation_sdk.builders.dashboard import FieldColor, ThresholdsConfig
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    GraphDrawStyle,
    GraphThresholdsStyleMode,
    StackingMode,
    TableColoredBackgroundCellOptions,
)
from grafana_foundation_sdk.models.dashboard import (
    DataTransformerConfig,
    DynamicConfigValue,
    FieldColorModeId,
    Threshold,
    ThresholdsMode,
)

from dashboards.datasource import POSTGRES, SqlQuery


def _thresholds(red_at: float | None) -> ThresholdsConfig:
    """Green below ``red_at`` and red from it; one neutral colour without it (Grafana's default turns red at 80)."""
    steps = [Threshold(value=None, color="green"), Threshold(value=red_at, color="red")] if red_at is not None \
        else [Threshold(value=None, color="blue")]
    return ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps)


def stat_panel(title: str, sql: str, *, red_at: float | None = None, unit: str = "none", width: int = 4,
               height: int = 4, description: str = "") -> stat.Panel:
    """One number; turns red at ``red_at`` so a non-zero count of open problems stands out."""
    return (stat.Panel().title(title).description(description).datasource(POSTGRES).span(width).height(height)
            .unit(unit).with_target(SqlQuery(sql)).color_mode(BigValueColorMode.BACKGROUND)
            .thresholds(_thresholds(red_at)))


def table_panel(title: str, sql: str, *, width: int = 24, height: int = 8, description: str = "") -> table.Panel:
    return (table.Panel().title(title).description(description).datasource(POSTGRES).span(width).height(height)
            .with_target(SqlQuery(sql)).filterable(True))


def matrix_panel(title: str, sql: str, *, rows: str, columns: str, value: str, width: int = 24, height: int = 10,
                 description: str = "") -> table.Panel:
    """A rows × columns grid of one value (e.g. subgroup × site), cells coloured from green (low) to red (high)."""
    grouping = DataTransformerConfig(id_val="groupingToMatrix",
                                     options={"rowField": rows, "columnField": columns, "valueField": value})
    return (table_panel(title, sql, width=width, height=height, description=description)
            .with_transformation(grouping)
            .cell_options(TableColoredBackgroundCellOptions())
            .color_scheme(FieldColor().mode(FieldColorModeId.CONTINUOUS_GR_YL_RD)))


def timeseries_panel(title: str, sql: str, *, unit: str = "none", width: int = 12, height: int = 8,
                     bars: bool = False, stacked: bool = False, description: str = "") -> timeseries.Panel:
    """Lines over time; ``sql`` returns ``time`` plus value columns, or ``time, metric, value`` rows (one series
    per distinct ``metric``)."""
    panel = (timeseries.Panel().title(title).description(description).datasource(POSTGRES).span(width)
             .height(height).unit(unit).with_target(SqlQuery(sql, "time_series")))
    if bars:
        panel = panel.draw_style(GraphDrawStyle.BARS).fill_opacity(80)
    if stacked:
        panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL))
    return panel


def with_ci_band(panel: timeseries.Panel, low: str = "ci_low", high: str = "ci_high") -> timeseries.Panel:
    """Draw the ``low``..``high`` columns as a shaded confidence band instead of two lines."""
    band = [DynamicConfigValue(id_val="custom.lineWidth", value=0),
            DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "blue"}),
            DynamicConfigValue(id_val="custom.hideFrom", value={"legend": True, "tooltip": False, "viz": False})]
    return (panel.override_by_name(low, band)
            .override_by_name(high, [*band, DynamicConfigValue(id_val="custom.fillBelowTo", value=low),
                                     DynamicConfigValue(id_val="custom.fillOpacity", value=20)]))


def with_limit_line(panel: timeseries.Panel, column: str = "threshold") -> timeseries.Panel:
    """Draw ``column`` as a dashed red control limit."""
    return panel.override_by_name(column, [
        DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
        DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
    ])


def with_reference_line(panel: timeseries.Panel, value: float, color: str = "text") -> timeseries.Panel:
    """Draw a dashed horizontal reference line at ``value`` (the ideal: O/E 1, calibration slope 1, intercept 0).

    A Grafana threshold drawn as a dashed line, so the series keep their colours and no SQL column is needed."""
    steps = [Threshold(value=None, color="transparent"), Threshold(value=value, color=color)]
    return (panel.thresholds(ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps))
            .thresholds_style(GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.DASHED)))


def barchart_panel(title: str, sql: str, *, x_field: str, width: int = 12, height: int = 8, stacked: bool = False,
                   description: str = "") -> barchart.Panel:
    """Bars per category (``x_field``), one bar (or stack segment) per other numeric column."""
    panel = (barchart.Panel().title(title).description(description).datasource(POSTGRES).span(width).height(height)
             .with_target(SqlQuery(sql)).x_field(x_field))
    return panel.stacking(StackingMode.NORMAL) if stacked else panel
