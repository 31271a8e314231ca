-- Views the Grafana dashboards read (dashboards/boards.py). PostgreSQL dialect.
-- Idempotent (CREATE OR REPLACE), so a migration can run this file again after changing a view.
-- Grafana's read-only role needs SELECT on these views and on the tables they read.

-- Alerts that still need a person: firing or acknowledged (resolved and silenced ones do not).
CREATE OR REPLACE VIEW v_open_alerts AS
SELECT id, model, model_version, metric, site, subgroup, detector, state, severity,
       detected_at, change_estimate, baseline, current, ci_low, ci_high, n_baseline, n_current,
       fire_count, last_fired_at, acked_by, acked_at, ticket_id,
       model || '@' || model_version || ' ' || metric || ' site=' || site || ' ' || subgroup AS stream
FROM alerts
WHERE state IN ('firing', 'acknowledged');

-- One row per stream (model, version, metric, site, subgroup): its newest daily point, its baseline, the status of
-- each detector on it, and how many alerts on it are open. Streams with no point yet still appear (value NULL).
CREATE OR REPLACE VIEW v_stream_cells AS
WITH detectors AS (
    SELECT model, model_version, metric, site, subgroup,
           max(baseline) AS baseline,
           max(baseline_n) AS baseline_n,
           bool_or(status = 'alarmed') AS alarmed,
           bool_and(status = 'insufficient_data') AS insufficient_data,
           string_agg(detector || ': ' || status, ', ' ORDER BY detector) AS detectors,
           max(updated_at) AS updated_at
    FROM stream_state
    GROUP BY model, model_version, metric, site, subgroup
), latest AS (
    SELECT DISTINCT ON (model, model_version, metric, site, subgroup)
           model, model_version, metric, site, subgroup, period_start, n, value, ci_low, ci_high
    FROM metric_points
    ORDER BY model, model_version, metric, site, subgroup, period_start DESC
), open_alerts AS (
    SELECT model, model_version, metric, site, subgroup, count(*) AS open_alerts
    FROM v_open_alerts
    GROUP BY model, model_version, metric, site, subgroup
)
SELECT d.model, d.model_version, d.metric, d.site, d.subgroup,
       l.period_start AS latest_day, l.n, l.value, l.ci_low, l.ci_high,
       d.baseline, d.baseline_n, l.value - d.baseline AS change,
       d.alarmed, d.insufficient_data, d.detectors, coalesce(o.open_alerts, 0) AS open_alerts, d.updated_at
FROM detectors d
LEFT JOIN latest l USING (model, model_version, metric, site, subgroup)
LEFT JOIN open_alerts o USING (model, model_version, metric, site, subgroup);

-- Dead letters with a short reason class for grouping: the resource reference ("Type/id: ", "Type (no id): ") and
-- any detail after a further ": " or " (" are dropped, so "RiskAssessment/r7: missing element subject" and
-- "invalid JSON: Expecting value at line 3 column 1" become "missing element subject" and "invalid JSON".
CREATE OR REPLACE VIEW v_dead_letters AS
SELECT id, source, position, reason, resource_type, resource_id, created_at,
       split_part(split_part(regexp_replace(reason, '^[A-Za-z]+(/[^:]*| \(no id\)): ', ''), ': ', 1), ' (', 1)
           AS reason_class
FROM dead_letters;

-- Retraining tickets with the alerts they bundle: how many, how many still open, and where.
CREATE OR REPLACE VIEW v_tickets AS
SELECT t.id, t.model, t.model_version, t.category, t.safety_overlay, t.matched_mod, t.cause, t.cause_confidence,
       t.remedy, t.status, t.created_at, t.updated_at,
       count(a.id) AS alerts,
       count(a.id) FILTER (WHERE a.state IN ('firing', 'acknowledged')) AS open_alerts,
       string_agg(DISTINCT a.metric, ', ') AS metrics,
       string_agg(DISTINCT a.site, ', ') AS sites,
       string_agg(DISTINCT a.subgroup, ', ') AS subgroups
FROM tickets t
LEFT JOIN alerts a ON a.ticket_id = t.id
GROUP BY t.id;
