"""The report's sections, as escaped HTML: summary, control charts, alerts and decisions, tickets, data coverage,
and how to reproduce every figure."""

from __future__ import annotations

import shlex

from sqlalchemy.engine import make_url

from vigil import __version__
from vigil.domain import ALL, PccpCategory
from vigil.report import charts
from vigil.report.data import DeviceData, StoreData, Window, claim_lines
from vigil.report.render import fmt_day, fmt_num, fmt_time, h, kpi, table
from vigil.report.render import figure as figure_html
from vigil.settings import DEFAULT_CONFIG, Settings, load_settings
from vigil.store import ALERT_STATES, SEVERITIES

#: Alerted streams drawn as full control charts per device; the rest of the alerted streams are in the alerts table.
MAX_STREAM_CHARTS = 40
GRID_METRICS = ("error_rate", "fnr", "fpr", "outcome_rate", "score_mean", "calibration_oe", "unmapped_rate",
                "no_followup_rate")


class Figures:
    """Numbers figures across the whole page and keeps the index for the reproduction section."""

    def __init__(self) -> None:
        self.index: list[tuple[int, str, str]] = []  # number, anchor, what data it shows

    def add(self, svg: str, caption: str, source: str) -> str:
        number = len(self.index) + 1
        anchor = f"fig{number}"
        self.index.append((number, anchor, source))
        return figure_html(number, svg, caption, anchor)


def safe_url(url: str) -> str:
    """The store URL with any password masked, fit for the report and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: show nothing of it rather than risk a secret
        return "(unparseable store URL)"



def store_section(label: str, url: str, data: StoreData, settings: Settings, window: Window, figures: Figures,
                   model: str | None, max_stream_charts: int) -> str:
    parts = []
    if label:
        parts.append(f"<h1>{h(label)}</h1>")
    parts.append(f"<p class='muted'>Store: <code>{h(safe_url(url))}</code></p>")
    for d in data.devices:
        name = settings.model(d.model).name if settings.model(d.model) else d.model
        parts.append(f"<h2 id='{h(_anchor(label, d.model, d.version))}'>{h(name)} "
                     f"<span class='muted'>({h(d.model)} version {h(d.version)})</span></h2>")
        parts += [_summary(d), _charts(d, figures, label, max_stream_charts), _alerts(d), _tickets(d)]
    parts.append(_coverage(data))
    parts.append(_reproduce(label, url, data, settings, window, model))
    return "\n".join(parts)


def _anchor(*parts: str) -> str:
    return "-".join("".join(ch if ch.isalnum() else "_" for ch in p) for p in parts if p)


def _summary(d: DeviceData) -> str:
    cases = sum(n for _, n, _ in d.cases_by_site)
    streams = sum(d.streams_by_status.values())
    out = ["<h3>1 Summary</h3>",
           f"<p>Data from {h(fmt_day(d.first_day))} to {h(fmt_day(d.last_day))}.</p>",
           "<div>", kpi("sites", len(d.sites)), kpi("monitored streams", streams), kpi("predictions", f"{cases:,}"),
           kpi("alerts", len(d.alerts)), kpi("retraining tickets", len(d.tickets)), "</div>",
           f"<p>Sites: {h(', '.join(d.sites) or 'none')}. Labels: "
           f"{h(', '.join(f'{k} {v:,}' for k, v in sorted(d.labels.items())) or 'none')}. Streams by status: "
           f"{h(', '.join(f'{k} {v:,}' for k, v in sorted(d.streams_by_status.items())) or 'none')} "
           "(insufficient_data: fewer than the minimum events; reported, not skipped).</p>",
           "<p><b>Alerts by state and severity</b></p>",
           table(["state", *SEVERITIES, "total"],
                 [[s, *(d.alerts_matrix.get((s, sev), 0) for sev in SEVERITIES),
                   sum(d.alerts_matrix.get((s, sev), 0) for sev in SEVERITIES)] for s in ALERT_STATES],
                 numeric=range(1, len(SEVERITIES) + 2)),
           "<p><b>Retraining tickets by PCCP category</b></p>",
           table(["category", "meaning", "tickets"],
                 [[c.value, c.title, d.tickets_by_category.get(c.value, 0)] for c in PccpCategory], numeric=[2])]
    return "\n".join(out)


def _stream_name(key: tuple[str, str, str, str, str]) -> str:
    return f"{key[2]} · site {key[3]} · subgroup {key[4]}"


def _charts(d: DeviceData, figures: Figures, label: str, max_stream_charts: int) -> str:
    claims = claim_lines(d.claims)
    out = ["<h3>2 Control charts</h3>",
           "<p>Each chart: the daily value with its 95% confidence band (blue), the labeled claim where the device "
           "has one (green dashed; fnr = 1 - sensitivity, fpr = 1 - specificity), the alert's baseline (dotted); "
           "below, the detector statistic against its threshold h. The orange dash-dot line is the estimated change "
           "time, the red line the moment the alert was raised.</p>"]
    alerted = sorted(d.alerted.items(), key=lambda kv: (min(a.detected_at for a in kv[1]), kv[0]))
    for key, alerts in alerted[:max_stream_charts]:
        series = d.series.get(key)
        ids = ", ".join(a.id for a in alerts)
        if series is None or not series.days:
            out.append(f"<p class='muted'>{h(_stream_name(key))} ({h(ids)}): no daily points in the period.</p>")
            continue
        first = alerts[0]
        caption = (f"{_stream_name(key)} - alert {ids} ({first.detector}, {first.severity}): change estimated "
                   f"{fmt_day(first.change_estimate)}, raised {fmt_day(first.detected_at)}; baseline "
                   f"{first.baseline:.3f}, current {first.current:.3f} (95% CI {first.ci_low:.3f}-{first.ci_high:.3f}, "
                   f"n={first.n_current}).")
        svg = charts.stream_chart(series, alerts, claims.get(key[2]), _stream_name(key))
        out.append(figures.add(svg, caption, _source(label, d, key)))
    if len(alerted) > max_stream_charts:
        out.append(f"<p>{len(alerted) - max_stream_charts} further alerted streams are listed in section 3 and "
                   "shown by `vigil alerts show`.</p>")
    metrics = [m for m in GRID_METRICS if any(k[2] == m for k in d.series)]
    metrics += sorted({k[2] for k in d.series} - set(metrics))
    sites = sorted({k[3] for k in d.series if k[4] == ALL}, key=lambda s: (s != ALL, s))
    cells = {(k[2], k[3]): s for k, s in d.series.items() if k[4] == ALL}
    alarmed = {(k[2], k[3]) for k in d.alerted if k[4] == ALL}
    if cells:
        svg = charts.grid_chart(cells, metrics, sites, claims, alarmed)
        out.append(figures.add(
            svg, f"Every site-level stream (subgroup all) of {d.model}@{d.version}, one panel per metric, one line "
                 "per site (weekly n-weighted means of the daily values; 'all' in black; green dashed: labeled "
                 "claim); red titles name the sites with an alert.", _source(label, d, (d.model, d.version, "*", "*", ALL))))
    out.append("<p><b>Subgroup streams</b> (site x subgroup cells other than 'all'), by metric and status:</p>")
    out.append(table(["metric", "status", "streams"], d.subgroup_streams, numeric=[2]))
    return "\n".join(out)


def _source(label: str, d: DeviceData, key: tuple[str, str, str, str, str]) -> str:
    where = f"model={key[0]}, model_version={key[1]}, metric={key[2]}, site={key[3]}, subgroup={key[4]}"
    alerts = "; alerts of that stream" if "*" not in key else " (* = every value)"
    return f"{label + ': ' if label else ''}metric_points where {where}{alerts}"


def _alert_decision(a) -> str:
    parts = []
    if a.acked_by:
        parts.append(f"acknowledged by {a.acked_by} {fmt_time(a.acked_at)}"
                     + (f': "{a.ack_comment}"' if a.ack_comment else ""))
    if a.silenced_by:
        parts.append(f"silenced by {a.silenced_by} until {fmt_time(a.silenced_until)}"
                     + (f': "{a.silence_reason}"' if a.silence_reason else ""))
    if a.escalated_at:
        parts.append(f"escalated {fmt_time(a.escalated_at)}")
    if a.resolved_by:
        parts.append(f"resolved by {a.resolved_by} {fmt_time(a.resolved_at)}")
    return "; ".join(parts) or "-"


def _alerts(d: DeviceData) -> str:
    rows = [[a.id, a.state, a.severity, f"{a.metric} · {a.site} · {a.subgroup}", a.detector,
             fmt_day(a.change_estimate), fmt_time(a.detected_at), fmt_num(a.baseline),
             f"{a.current:.3f} ({a.ci_low:.3f}-{a.ci_high:.3f})", f"{a.n_baseline:,}/{a.n_current:,}",
             a.fire_count, a.ticket_id or "-", _alert_decision(a)] for a in d.alerts]
    decisions = [[fmt_time(x.at), x.entity_id, x.action, x.actor, x.comment or ""] for x in d.decisions
                 if x.action not in ("alert.fired", "alert.refired")]
    return "\n".join([
        "<h3>3 Alerts and decisions</h3>",
        table(["alert", "state", "severity", "metric · site · subgroup", "detector", "change est.", "raised",
               "baseline", "current (95% CI)", "n base/cur", "fired", "ticket", "decisions"], rows, numeric=[7, 10]),
        "<p><b>Decisions</b> (from the hash-chained audit log and alert comments; the pipeline's own firings are "
        "in the table above):</p>",
        table(["when", "alert / ticket", "action", "who", "comment"], decisions),
    ])


def _tickets(d: DeviceData) -> str:
    out = ["<h3>4 Retraining tickets</h3>"]
    if not d.tickets:
        out.append("<p class='muted'>No retraining ticket.</p>")
    for t in d.tickets:
        category = PccpCategory(t.category)
        out.append(f"<p><b>{h(t.id)}</b> - PCCP category <b>{h(t.category)}</b> ({h(category.title)})"
                   f"{' + U (urgent safety overlay)' if t.safety_overlay else ''}; status {h(t.status)}; cause "
                   f"{h(t.cause)} (confidence {t.cause_confidence:.2f}); remedy {h(t.remedy)}; PCCP modification "
                   f"{h(t.matched_mod or '-')}; alerts {h(', '.join(a.id for a in t.alerts) or '-')}; opened "
                   f"{h(fmt_time(t.created_at))}.</p>")
        out.append(table(["rule", "finding", "citation"], [[*map(str, r)] + [""] * (3 - len(r)) for r in t.rationale]))
        if t.required_actions:
            out.append("<ul>" + "".join(f"<li>{h(x)}</li>" for x in t.required_actions) + "</ul>")
    return "\n".join(out)


def _coverage(data: StoreData) -> str:
    out = ["<h2>5 Data coverage</h2>", "<p><b>Predictions per site</b> (labeled = outcome known or censored):</p>"]
    for d in data.devices:
        out.append(f"<p>{h(d.model)}@{h(d.version)}</p>")
        out.append(table(["site", "predictions", "labeled"], d.cases_by_site, numeric=[1, 2]))
        if d.unmapped_by_site:
            out.append(table(["site", "outcome facts", "share with an unmapped local code"],
                             [[s, f"{n:,}", f"{r:.2%}"] for s, n, r in d.unmapped_by_site], numeric=[1, 2]))
    out.append("<p><b>Resources ingested</b>, over all runs in the store:</p>")
    out.append(table(["resource type", "accepted"], sorted(data.accepted.items()), numeric=[1]))
    out.append("<p><b>Dead letters</b> by reason category and resource type (all in the store; they carry no data "
               "time):</p>")
    out.append(table(["reason", "resource type", "count"], data.dead_letters, numeric=[2]))
    if data.stripped:
        out.append("<p><b>Identifier elements stripped</b> on the way in (de-identification):</p>")
        out.append(table(["element", "count"], sorted(data.stripped.items()), numeric=[1]))
    out.append("<p class='muted'>Unmapped local codes are not stored individually; their share per site is the "
               "unmapped_rate metric above.</p>")
    return "\n".join(out)


def _reproduce(label: str, url: str, data: StoreData, settings: Settings, window: Window,
               model: str | None) -> str:
    store = safe_url(url)
    config_path = settings.config_path or DEFAULT_CONFIG
    runs = []
    hashes = set()
    for r in data.runs:
        hashes.add(r.config_hash)
        counts = r.counts or {}
        runs.append([r.id, fmt_time(r.started_at), fmt_time(r.finished_at), r.config_hash, r.code_version,
                     "; ".join(map(str, r.inputs)), counts.get("cases", "-"), counts.get("alerts", "-"),
                     counts.get("tickets", "-")])
    # Settings.config_hash() covers store_url too: hash the configuration as it was run, i.e. against this store.
    current = load_settings(config_path, store_url=url).config_hash()
    if not hashes:
        match = "<p class='bad'>The store records no run.</p>"
    elif hashes == {current}:
        match = (f"<p class='good'>The configuration {h(config_path)} has hash {h(current)}, the same as every run "
                 "above: the claims and settings shown here are the ones the runs used.</p>")
    else:
        match = (f"<p class='bad'>The configuration given to this report ({h(config_path)}, hash {h(current)}) is "
                 f"not the one the runs used ({h(', '.join(sorted(hashes)))}): reproduce with the configuration "
                 "whose hash matches.</p>")
    audit_line = (f"<p class='good'>Audit log intact: {data.audit_checked:,} entries verified, head hash "
                  f"<code>{h(data.audit_head)}</code>.</p>" if data.audit_ok else
                  f"<p class='bad'>Audit log BROKEN: {h(data.audit_problem)}</p>")
    inputs = sorted({str(i) for r in data.runs for i in r.inputs})
    q = shlex.quote
    report_cmd = ["vigil", "report", "--out", "report.html", "--store", store]
    if model:
        report_cmd += ["--model", model]
    if window.since:
        report_cmd += ["--since", window.since.isoformat()]
    if window.until:
        report_cmd += ["--until", window.until.isoformat()]
    commands = [
        "# 1. rebuild the store from the same inputs (same inputs + same config => same alerts)",
        " ".join(["vigil", "ingest", *map(q, inputs or ["INPUT..."]), "--config", q(str(config_path)),
                  "--store", q("sqlite:///reproduced.db")]),
        "# 2. check the audit chain of the original store",
        " ".join(["vigil", "audit", "verify", "--store", q(store)]),
        "# 3. regenerate this report (figures are drawn from the metric_points and alerts tables)",
        " ".join(q(x) for x in report_cmd),
    ]
    return "\n".join([
        f"<h2>6 How to reproduce every figure{h(' (' + label + ')') if label else ''}</h2>",
        f"<p>Report code: vigil {h(__version__)}. Configuration hash now: <code>{h(current)}</code>.</p>",
        table(["run", "started", "finished", "config hash", "code version", "inputs", "cases", "alerts",
               "tickets"], runs, numeric=[0, 6, 7, 8]),
        match, audit_line, f"<pre>{h(chr(10).join(commands))}</pre>",
    ])


def figure_index(figures: Figures) -> str:
    return "\n".join(["<h2>Figure index</h2>",
                      "<p>Every figure and the stored rows it is drawn from:</p>",
                      table(["figure", "data"], [[f"Figure {n}", src] for n, _, src in figures.index])])


