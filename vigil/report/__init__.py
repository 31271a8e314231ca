"""The periodic surveillance report: one self-contained HTML file per device (``vigil report --out FILE``).

What a post-market surveillance report must let an inspector answer (21 CFR 822 / EU MDR Art. 84-86 PMS reports;
FDA, *Marketing Submission Recommendations for a PCCP for AI-Enabled Device Software Functions*, 2024): what was
monitored and on which data, what changed, where, since when and how sure (control charts with confidence bands and the
labeled claim), what people decided (acknowledgements, resolutions, comments, from the hash-chained audit log), which
changes were classified how under the PCCP and why, how complete the data was, and how to reproduce every figure
(config hash, code version, inputs, data window and the exact commands).

No identifiers: subject keys, case (prediction) ids and encounter ids are never read from the store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.orm import Session

from vigil import __version__
from vigil.report.data import StoreData, Window, available_models, load
from vigil.report.pdf import chromium_binary, print_pdf
from vigil.report.render import fmt_day, fmt_time, h, page
from vigil.report.sections import MAX_STREAM_CHARTS, Figures, figure_index, safe_url, store_section
from vigil.settings import DEFAULT_CONFIG, Settings, load_settings
from vigil.store import engine_for, upgrade

__all__ = ["ReportInfo", "build_combined_report", "build_report", "chromium_binary", "print_pdf", "safe_url"]


@dataclass(slots=True)
class ReportInfo:
    """What ``build_report`` wrote."""

    path: Path
    models: list[str]
    since: datetime | None
    until: datetime | None
    figures: int
    alerts: int
    tickets: int
    bytes: int
    sha256: str
    pdf: Path | None = None
    notes: list[str] = field(default_factory=list)


def build_report(store_url: str, out_path: Path | str, model: str | None = None, since: datetime | None = None,
                 until: datetime | None = None, *, config: Path | str = DEFAULT_CONFIG, pdf: bool = False
                 ) -> ReportInfo:
    """Write the report on the store at ``store_url`` to ``out_path`` (and ``.pdf`` next to it if ``pdf``).

    ``model`` restricts it to one device (default: every model in the store); ``since``/``until`` (UTC, ``until``
    exclusive) restrict the period. ``config`` supplies the labeled claims and is checked against the runs' hash.
    """
    return build_combined_report([("", store_url)], out_path, model, since, until, config=config, pdf=pdf)


def build_combined_report(stores: Sequence[tuple[str, str]], out_path: Path | str, model: str | None = None,
                          since: datetime | None = None, until: datetime | None = None, *,
                          config: Path | str = DEFAULT_CONFIG, pdf: bool = False,
                          max_stream_charts: int = MAX_STREAM_CHARTS) -> ReportInfo:
    """One page covering several stores, each under its label (``vigil demo`` has one store per scenario).

    At most ``max_stream_charts`` alerted streams per device get a full control chart; the rest are in the tables.
    """
    for bound, name in ((since, "since"), (until, "until")):
        if bound is not None and bound.tzinfo is None:
            raise ValueError(f"--{name} {bound.isoformat()} has no time zone; give UTC, e.g. 2026-03-01T00:00:00Z")
    settings = load_settings(config)
    window = Window(since, until)
    figures = Figures()
    sections, models, n_alerts, n_tickets, notes = [], [], 0, 0, []
    for label, url in stores:
        data = _read(url, model, window, settings)
        if not data.devices:
            notes.append(f"{label or url}: no monitored model{' ' + model if model else ''} in the store")
        models += [f"{d.model}@{d.version}" for d in data.devices]
        n_alerts += sum(len(d.alerts) for d in data.devices)
        n_tickets += sum(len(d.tickets) for d in data.devices)
        sections.append(store_section(label, url, data, settings, window, figures, model, max_stream_charts))
    title = "vigil surveillance report" + (f": {model}" if model else "")
    intro = [
        f"<h1>{h(title)}</h1>",
        f"<p>Generated {h(fmt_time(datetime.now(UTC)))} by vigil {h(__version__)}. Period: "
        f"{h(fmt_day(since) if since else 'start of data')} to "
        f"{h(fmt_day(until) + ' (exclusive)' if until else 'end of data')}. "
        "All times UTC. This report contains no patient identifiers: subject keys, case and encounter ids are never "
        "read; dead letters are shown by reason category only.</p>",
        "<p><b>Contents:</b> 1 Summary · 2 Control charts · 3 Alerts and decisions · 4 Retraining tickets · "
        "5 Data coverage · 6 How to reproduce every figure</p>",
    ]
    if notes:
        intro.append("<p class='bad'>" + "<br>".join(h(n) for n in notes) + "</p>")
    body = "\n".join(intro + sections + [figure_index(figures)])
    text = page(title, body, __version__)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    info = ReportInfo(path=out, models=models, since=since, until=until, figures=len(figures.index),
                      alerts=n_alerts, tickets=n_tickets, bytes=len(text.encode()),
                      sha256=hashlib.sha256(text.encode()).hexdigest(), notes=notes)
    if pdf:
        info.pdf = print_pdf(out, out.with_suffix(".pdf"))
    return info


def _read(url: str, model: str | None, window: Window, settings: Settings) -> StoreData:
    upgrade(url)
    engine = engine_for(url)
    try:
        with Session(engine) as session:
            models = available_models(session)
            if model is not None:
                chosen = [m for m in models if m[0] == model]
                if not chosen:
                    known = ", ".join(sorted({m for m, _ in models})) or "none"
                    raise ValueError(f"model {model!r} has no data in {safe_url(url)} (models there: {known}); "
                                     "check --model or --store")
                models = chosen
            claims = {m.id: m.claims for m in settings.models}
            return load(session, models, window, claims)
    finally:
        engine.dispose()
