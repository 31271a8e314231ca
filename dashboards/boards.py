"""vigil's five dashboards: what each shows and the SQL behind every panel.

Panels read the store's tables and the views in ``views.sql``. Uids are stable (links and provisioning key on them).
A "cell" is one stream: model, version, metric, site and subgroup, chosen with the template variables.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard, DashboardLink, Row
from grafana_foundation_sdk.builders.timeseries import Panel as TimeseriesPanel
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, DashboardLinkType

from dashboards.datasource import SqlAnnotation
from dashboards.panels import (
    barchart_panel,
    matrix_panel,
    stat_panel,
    table_panel,
    timeseries_panel,
    with_ci_band,
    with_limit_line,
    with_reference_line,
)
from dashboards.variables import STREAM, variable

TAG = "vigil"
_VERSION = "model = '$model' AND model_version = '$model_version'"
_METRIC = f"{_VERSION} AND metric = '$metric'"
_CELL = f"{_METRIC} AND site = '$site' AND subgroup = '$subgroup'"


def _dashboard(uid: str, title: str, description: str, variables: tuple[str, ...] = ()) -> Dashboard:
    """Common settings: read-only (provisioned from code), UTC, last 90 days, links to the other vigil dashboards."""
    board = (Dashboard(title).uid(uid).description(description).tags([TAG]).readonly().timezone("utc")
             .time("now-90d", "now").refresh("5m").tooltip(DashboardCursorSync.CROSSHAIR)
             .link(DashboardLink("vigil").type(DashboardLinkType.DASHBOARDS).tags([TAG]).as_dropdown(True)
                   .include_vars(True).keep_time(True)))
    for name in variables:
        board = board.with_variable(variable(name))
    return board


def _cell_value() -> TimeseriesPanel:
    return with_ci_band(timeseries_panel(
        "$metric at site $site, $subgroup (95% CI)",
        f"SELECT period_start AS time, value, ci_low, ci_high FROM metric_points "
        f"WHERE {_CELL} AND $__timeFilter(period_start) ORDER BY 1",
        width=24, height=9, description="Daily value of the selected stream; the band is its 95% confidence interval."))


_WINDOW = f"{_VERSION} AND subgroup = '$subgroup'"
"""Window points (``vigil/performance.py``) are per model version, site and subgroup; their metric is fixed."""


def _window_cell(metric: str, title: str, description: str, reference: float | None = None) -> TimeseriesPanel:
    """One window metric of the selected site and subgroup with its 95% CI band (and the ideal value dashed)."""
    panel = with_ci_band(timeseries_panel(
        title,
        f"SELECT period_start AS time, value AS {metric}, ci_low, ci_high FROM metric_points "
        f"WHERE {_WINDOW} AND site = '$site' AND metric = '{metric}' AND $__timeFilter(period_start) ORDER BY 1",
        description=description))
    return panel if reference is None else with_reference_line(panel, reference)


def _window_by_site(metric: str, title: str, description: str, reference: float | None = None) -> TimeseriesPanel:
    """One window metric of the selected subgroup, one line per site ("all" included)."""
    panel = timeseries_panel(
        title,
        f"SELECT period_start AS time, site AS metric, value FROM metric_points "
        f"WHERE {_WINDOW} AND metric = '{metric}' AND $__timeFilter(period_start) ORDER BY 1",
        description=description)
    return panel if reference is None else with_reference_line(panel, reference)


_WINDOW_NOTE = ("Each point is one window of settled cases (label window closed) starting at its time; cells below "
                "the minimum n, or with only one outcome, have no point (insufficient data).")


def overview() -> Dashboard:
    return (
        _dashboard("vigil-overview", "vigil · Overview",
                   "What needs attention now across every monitored device: open alerts, tickets, feed errors.")
        .with_row(Row("Now"))
        .with_panel(stat_panel("Open alerts", "SELECT count(*) AS open_alerts FROM v_open_alerts", red_at=1))
        .with_panel(stat_panel("Critical", "SELECT count(*) AS critical FROM v_open_alerts WHERE severity = 'critical'",
                               red_at=1))
        .with_panel(stat_panel("Not acknowledged",
                               "SELECT count(*) AS firing FROM v_open_alerts WHERE state = 'firing'", red_at=1))
        .with_panel(stat_panel("Open tickets", "SELECT count(*) AS open_tickets FROM tickets WHERE status <> 'closed'"))
        .with_panel(stat_panel("Alarmed streams", "SELECT count(*) AS alarmed FROM v_stream_cells WHERE alarmed",
                               red_at=1))
        .with_panel(stat_panel("Insufficient data", "SELECT count(*) AS cells FROM v_stream_cells "
                               "WHERE insufficient_data",
                               description="Streams whose cells are below the minimum n: reported, not monitored."))
        .with_row(Row("Where"))
        .with_panel(barchart_panel(
            "Open alerts by site and severity",
            "SELECT site, count(*) FILTER (WHERE severity = 'critical') AS critical, "
            "count(*) FILTER (WHERE severity = 'warning') AS warning FROM v_open_alerts GROUP BY site ORDER BY site",
            x_field="site", stacked=True))
        .with_panel(barchart_panel(
            "Retraining tickets by PCCP category",
            "SELECT category, count(*) FILTER (WHERE status <> 'closed') AS open, "
            "count(*) FILTER (WHERE status = 'closed') AS closed FROM tickets GROUP BY category ORDER BY category",
            x_field="category", stacked=True,
            description="C0 monitor · C1 data quality · C2 within PCCP · C2-F failed acceptance · C3 document · "
                        "C4 deviation risk · C5 new submission"))
        .with_panel(timeseries_panel(
            "Dead letters per day",
            "SELECT $__timeGroupAlias(created_at,'1d'), count(*) AS dead_letters FROM dead_letters "
            "WHERE $__timeFilter(created_at) GROUP BY 1 ORDER BY 1",
            width=24, height=6, bars=True))
        .with_row(Row("Open alerts"))
        .with_panel(table_panel(
            "Open alerts",
            "SELECT severity, state, model, model_version, metric, site, subgroup, detector, change_estimate, "
            "detected_at, baseline, current, ci_low, ci_high, n_current, fire_count, acked_by, ticket_id, id "
            "FROM v_open_alerts ORDER BY severity = 'critical' DESC, detected_at DESC",
            height=10))
    )


def performance() -> Dashboard:
    return (
        _dashboard("vigil-performance", "vigil · Performance by site × subgroup",
                   "One metric of one model version, by site and subgroup, with confidence intervals.", STREAM)
        .with_panel(_cell_value())
        .with_panel(timeseries_panel(
            "$metric by site ($subgroup)",
            f"SELECT period_start AS time, site AS metric, value FROM metric_points "
            f"WHERE {_METRIC} AND subgroup = '$subgroup' AND $__timeFilter(period_start) ORDER BY 1"))
        .with_panel(timeseries_panel(
            "$metric by subgroup at site $site",
            f"SELECT period_start AS time, subgroup AS metric, value FROM metric_points "
            f"WHERE {_METRIC} AND site = '$site' AND $__timeFilter(period_start) ORDER BY 1"))
        .with_panel(matrix_panel(
            "Latest $metric: subgroup × site",
            f"SELECT DISTINCT ON (site, subgroup) subgroup, site, value FROM metric_points "
            f"WHERE {_METRIC} AND $__timeFilter(period_start) ORDER BY site, subgroup, period_start DESC",
            rows="subgroup", columns="site", value="value",
            description="Each cell is the newest daily value in the time range; 'all' is every site or subgroup."))
        .with_panel(table_panel(
            "Cells: latest value against baseline",
            f"SELECT site, subgroup, latest_day, n, value, ci_low, ci_high, baseline, change, detectors, open_alerts "
            f"FROM v_stream_cells WHERE {_METRIC} ORDER BY alarmed DESC, abs(change) DESC NULLS LAST, site, subgroup",
            height=10))
        .with_panel(timeseries_panel(
            "Cases per day at site $site, $subgroup",
            f"SELECT period_start AS time, n FROM metric_points WHERE {_CELL} AND $__timeFilter(period_start) "
            f"ORDER BY 1",
            width=24, height=6, bars=True, description="How many cases each daily value rests on."))
        .with_row(Row("Discrimination and calibration ($model $model_version, 30-day windows)"))
        .with_panel(_window_cell(
            "auroc", "AUROC at site $site, $subgroup (95% CI)",
            f"Area under the ROC curve with DeLong's 95% CI. {_WINDOW_NOTE}"))
        .with_panel(_window_by_site(
            "auroc", "AUROC by site ($subgroup)", f"Area under the ROC curve per site. {_WINDOW_NOTE}"))
        .with_panel(_window_cell(
            "oe_ratio", "Observed / expected events at site $site, $subgroup (95% CI)",
            f"Observed events over the sum of predicted risks, exact Poisson CI; 1 = calibrated in the large, "
            f"> 1 = risks too low. {_WINDOW_NOTE}", reference=1.0))
        .with_panel(_window_by_site(
            "oe_ratio", "Observed / expected by site ($subgroup)",
            f"Observed over expected events per site; dashed: 1. {_WINDOW_NOTE}", reference=1.0))
        .with_panel(_window_cell(
            "calibration_slope", "Calibration slope at site $site, $subgroup (95% CI)",
            f"Slope of the logistic recalibration on logit(risk): 1 = ideal, < 1 = risks too extreme, > 1 = too "
            f"moderate. {_WINDOW_NOTE}", reference=1.0))
        .with_panel(_window_cell(
            "calibration_intercept", "Calibration intercept at site $site, $subgroup (95% CI)",
            f"Calibration in the large (logistic recalibration with slope fixed at 1): 0 = ideal, > 0 = risks too "
            f"low. {_WINDOW_NOTE}", reference=0.0))
        .with_panel(table_panel(
            "Window metrics at site $site, $subgroup",
            f"SELECT period_start AS window_start, metric, n, value, ci_low, ci_high FROM metric_points "
            f"WHERE {_WINDOW} AND site = '$site' AND metric IN ('auroc', 'oe_ratio', 'brier', 'calibration_slope', "
            f"'calibration_intercept') AND $__timeFilter(period_start) ORDER BY period_start DESC, metric",
            height=8, description=f"Every window metric of the cell, incl. the Brier score. {_WINDOW_NOTE}"))
    )


def control_charts() -> Dashboard:
    return (
        _dashboard("vigil-control-charts", "vigil · Control charts",
                   "Each detector's statistic against its calibrated threshold; alerts are marked from the estimated "
                   "change time to detection.", STREAM)
        .annotation(SqlAnnotation(
            "Alerts",
            f"SELECT change_estimate AS time, detected_at AS timeend, "
            f"severity || ' ' || detector || ' alert ' || id || ' (' || state || '): ' || metric || ' ' "
            f"|| round(baseline::numeric, 4) || ' → ' || round(current::numeric, 4) AS text, "
            f"severity || ',' || detector AS tags "
            f"FROM alerts WHERE {_CELL} AND $__timeFilter(detected_at)",
            color="red"))
        .with_panel(with_limit_line(timeseries_panel(
            "Detector statistic vs threshold: $metric at site $site, $subgroup",
            f"SELECT period_start AS time, statistic, threshold FROM metric_points "
            f"WHERE {_CELL} AND $__timeFilter(period_start) ORDER BY 1",
            width=24, height=10)))
        .with_panel(_cell_value())
        .with_panel(table_panel(
            "Detectors on this stream",
            f"SELECT detector, status, baseline, baseline_n, n, statistic, threshold, arl0, updated_at "
            f"FROM stream_state WHERE {_CELL} ORDER BY detector",
            height=6))
        .with_panel(table_panel(
            "Alerts on this stream",
            f"SELECT id, detector, state, severity, change_estimate, detected_at, baseline, current, ci_low, ci_high, "
            f"n_baseline, n_current, fire_count, acked_by, ack_comment, resolved_by, resolved_at, ticket_id "
            f"FROM alerts WHERE {_CELL} ORDER BY detected_at DESC"))
    )


def feed_health() -> Dashboard:
    return (
        _dashboard("vigil-feed-health", "vigil · Feed health",
                   "Is the data arriving, parseable and mapped? Rejected input, unmapped codes, volumes, label lag.",
                   ("model", "model_version"))
        .with_row(Row("Rejected input"))
        .with_panel(timeseries_panel(
            "Dead letters per day by reason",
            "SELECT $__timeGroupAlias(created_at,'1d'), reason_class AS metric, count(*) AS value "
            "FROM v_dead_letters WHERE $__timeFilter(created_at) GROUP BY 1, 2 ORDER BY 1",
            bars=True, stacked=True))
        .with_panel(timeseries_panel(
            "Dead letters per day by source",
            "SELECT $__timeGroupAlias(created_at,'1d'), source AS metric, count(*) AS value "
            "FROM dead_letters WHERE $__timeFilter(created_at) GROUP BY 1, 2 ORDER BY 1",
            bars=True, stacked=True))
        .with_panel(table_panel(
            "Top dead-letter reasons",
            "SELECT reason_class, resource_type, source, count(*) AS dead_letters, min(created_at) AS first_seen, "
            "max(created_at) AS last_seen FROM v_dead_letters WHERE $__timeFilter(created_at) "
            "GROUP BY reason_class, resource_type, source ORDER BY dead_letters DESC LIMIT 50",
            width=12))
        .with_panel(table_panel(
            "Latest dead letters",
            "SELECT created_at, source, position, resource_type, resource_id, reason FROM dead_letters "
            "WHERE $__timeFilter(created_at) ORDER BY created_at DESC LIMIT 200",
            width=12))
        .with_row(Row("$model $model_version"))
        .with_panel(timeseries_panel(
            "Unmapped outcome codes by site",
            f"SELECT period_start AS time, site AS metric, value FROM metric_points "
            f"WHERE {_VERSION} AND metric = 'unmapped_rate' AND subgroup = 'all' AND $__timeFilter(period_start) "
            f"ORDER BY 1",
            unit="percentunit",
            description="Share of outcome facts whose local code has no mapping: a data-quality cause, not a model "
                        "problem."))
        .with_panel(timeseries_panel(
            "Unmapped outcome codes by site and code system",
            f"SELECT period_start AS time, site || ' · ' || substr(subgroup, 13) AS metric, value FROM metric_points "
            f"WHERE {_VERSION} AND metric = 'unmapped_rate' AND subgroup LIKE 'code_system=%' AND site <> 'all' "
            f"AND $__timeFilter(period_start) ORDER BY 1",
            unit="percentunit",
            description="The same share per code system the site sends (LOINC, SNOMED CT, its local systems): which "
                        "system broke. A system first seen after the baseline has no chart (insufficient data) — "
                        "see the stream table of the Control charts dashboard."))
        .with_panel(timeseries_panel(
            "Predictions without follow-up by site",
            f"SELECT period_start AS time, site AS metric, value FROM metric_points "
            f"WHERE {_VERSION} AND metric = 'no_followup_rate' AND subgroup = 'all' AND $__timeFilter(period_start) "
            f"ORDER BY 1",
            unit="percentunit",
            description="Share of predictions whose label window closed with no follow-up in the feed (no "
                        "measurement the outcome could use, or no fact about the patient at all): a site whose "
                        "outcome feed stopped shows here, not as better specificity."))
        .with_panel(timeseries_panel(
            "Predictions per day by site",
            f"SELECT $__timeGroupAlias(predicted_at,'1d'), coalesce(site, 'unknown') AS metric, count(*) AS value "
            f"FROM cases WHERE {_VERSION} AND $__timeFilter(predicted_at) GROUP BY 1, 2 ORDER BY 1",
            bars=True, stacked=True))
        .with_panel(stat_panel(
            "Labeled",
            f"SELECT avg((label IN ('positive', 'negative'))::int) AS labeled FROM cases "
            f"WHERE {_VERSION} AND $__timeFilter(predicted_at)",
            unit="percentunit", width=12,
            description="Share of predictions in range with a ground-truth label (recent ones may still be inside "
                        "their label window)."))
        .with_panel(stat_panel(
            "Median label delay",
            f"SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM labeled_at - predicted_at)) "
            f"AS delay FROM cases WHERE {_VERSION} AND label IN ('positive', 'negative') "
            f"AND $__timeFilter(predicted_at)",
            unit="s", width=12, description="Time from prediction to the outcome that labeled it."))
        .with_row(Row("Runs"))
        .with_panel(table_panel(
            "Pipeline runs",
            "SELECT id, started_at, finished_at, extract(epoch FROM finished_at - started_at) AS seconds, "
            "code_version, config_hash, counts::text AS counts FROM runs WHERE $__timeFilter(started_at) "
            "ORDER BY started_at DESC LIMIT 50"))
    )


def tickets() -> Dashboard:
    return (
        _dashboard("vigil-tickets", "vigil · Retraining tickets",
                   "Retraining tickets, their PCCP category and the alerts behind them.")
        .with_panel(stat_panel("Open tickets", "SELECT count(*) AS open FROM tickets WHERE status <> 'closed'",
                               width=6))
        .with_panel(stat_panel("New submission needed (C5)",
                               "SELECT count(*) AS c5 FROM tickets WHERE status <> 'closed' AND category = 'C5'",
                               red_at=1, width=6))
        .with_panel(stat_panel("PCCP deviation risk (C4)",
                               "SELECT count(*) AS c4 FROM tickets WHERE status <> 'closed' AND category = 'C4'",
                               red_at=1, width=6))
        .with_panel(stat_panel("Safety overlay",
                               "SELECT count(*) AS safety FROM tickets WHERE status <> 'closed' AND safety_overlay",
                               red_at=1, width=6))
        .with_panel(table_panel(
            "Tickets",
            "SELECT id, status, category, safety_overlay, model, model_version, cause, cause_confidence, remedy, "
            "matched_mod, alerts, open_alerts, metrics, sites, subgroups, created_at, updated_at "
            "FROM v_tickets ORDER BY status = 'closed', created_at DESC",
            height=12))
        .with_panel(table_panel(
            "Rationale and required actions",
            "SELECT id, category, rationale::text AS rationale, required_actions::text AS required_actions, "
            "evidence::text AS evidence FROM tickets ORDER BY created_at DESC",
            height=10))
        .with_panel(table_panel(
            "Alerts by ticket",
            "SELECT ticket_id, id AS alert_id, state, severity, metric, site, subgroup, detector, change_estimate, "
            "detected_at FROM alerts WHERE ticket_id IS NOT NULL ORDER BY ticket_id, detected_at"))
    )


BOARDS = (overview, performance, control_charts, feed_health, tickets)
