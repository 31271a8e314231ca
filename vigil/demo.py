"""`vigil demo`: the embedded default end to end — simulate each scenario, run the pipeline on SQLite, compare the
alerts and tickets with the injected truth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson

from vigil.domain import ALL, Alert
from vigil.persist import persist
from vigil.pipeline import Pipeline, RunResult
from vigil.report import build_combined_report
from vigil.settings import DEFAULT_CONFIG, load_settings
from vigil.simulator import SCENARIOS, simulate


DEMO_STREAM_CHARTS = 6  # full control charts per device and scenario in the demo report; the rest are in its tables


def run_demo(out: Path, seed: int = 7, days: int = 180, volume: float = 1.0,
             scenarios: Sequence[str] = SCENARIOS, config: Path = DEFAULT_CONFIG,
             on_step: Callable[[str], None] = lambda _: None) -> dict:
    """Run every scenario; write ``out/summary.json`` and the surveillance report ``out/report.html`` (one section per
    scenario's store); return the summary."""
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "stores").mkdir(exist_ok=True)
    summary: dict = {"seed": seed, "days": days, "volume": volume, "alerts": [], "tickets": [],
                     "ground_truth": [], "evaluation": []}
    for scenario in scenarios:
        on_step(f"{scenario}: simulating {days} days")
        feed = out / "feeds" / scenario
        truth = simulate(scenario, feed, seed=seed, days=days, volume=volume)
        store = out / "stores" / f"{scenario}.db"
        store.unlink(missing_ok=True)
        settings = load_settings(config, store_url=f"sqlite:///{store}")
        on_step(f"{scenario}: running the pipeline")
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        result = Pipeline(settings).run_paths([feed])
        elapsed = time.perf_counter() - t0
        ids = persist(result, settings, [str(feed)], started)
        summary["config_hash"] = settings.config_hash()
        _collect(summary, scenario, truth.to_dict(), result, ids, elapsed)
    (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    on_step("writing the surveillance report")
    stores = [(f"Scenario {scenario}", f"sqlite:///{out / 'stores' / f'{scenario}.db'}") for scenario in scenarios]
    build_combined_report(stores, out / "report.html", config=config, max_stream_charts=DEMO_STREAM_CHARTS)
    return summary


def _collect(summary: dict, scenario: str, truth: dict, result: RunResult, ids: dict[str, str],
             elapsed: float) -> None:
    alerts = result.alerts.alerts
    for a in alerts:
        s = a.signal
        summary["alerts"].append({
            "scenario": scenario, "id": ids.get(a.id, a.id), "model": s.stream.model, "version": s.stream.version,
            "metric": s.stream.metric, "site": s.stream.site, "subgroup": s.stream.subgroup, "detector": s.detector,
            "severity": a.severity, "detected_at": s.detected_at.isoformat(),
            "change_estimate": s.change_estimate.isoformat(), "baseline": s.baseline, "current": s.current,
            "ci": list(s.current_ci), "n_current": s.n_current, "fire_count": a.fire_count,
        })
    for t in result.tickets:
        summary["tickets"].append({
            "scenario": scenario, "id": ids.get(t.key), "model": t.model, "category": t.category.value, "safety_overlay": t.safety_overlay,
            "cause": t.cause, "remedy": t.remedy, "matched_mod": t.matched_mod,
            "alert_ids": [ids.get(a, a) for a in t.alert_ids],
        })
    changes = truth.get("changes", [])
    for change in changes:
        summary["ground_truth"].append({"scenario": scenario, **change})
    matched: set[str] = set()
    for change in changes:
        hits = [a for a in alerts if _explains(change, a)]
        matched |= {a.id for a in hits}
        first = min(hits, key=lambda a: a.signal.detected_at) if hits else None
        change_time = datetime.fromisoformat(change["change_time"])
        categories = sorted({t.category.value for t in result.tickets if set(t.alert_ids) & {a.id for a in hits}})
        summary["evaluation"].append({
            "scenario": scenario, "model": change["model"], "site": change["site"], "subgroup": change["subgroup"],
            "change_time": change["change_time"], "detected": first is not None,
            "first_alert": ids.get(first.id) if first else None,
            "detected_at": first.signal.detected_at.isoformat() if first else None,
            "detected_where": f"{first.signal.stream.site}/{first.signal.stream.subgroup}/{first.signal.stream.metric}"
            if first else None,
            "delay_days": round((first.signal.detected_at - change_time).total_seconds() / 86400, 1) if first else None,
            "expected_category": change["expected_category"], "ticket_categories": categories,
            "category_ok": change["expected_category"] in categories,
        })
    stats = {"false_alarms": sum(a.id not in matched for a in alerts), "alerts": len(alerts),
             "cases": len(result.cases), "resources": sum(result.accepted.values()),
             "dead_letters": len(result.dead_letters), "seconds": round(elapsed, 2)}
    if changes:
        summary["evaluation"][-1].update(stats)
    else:
        summary["evaluation"].append({"scenario": scenario, **stats})


def _explains(change: dict, alert: Alert) -> bool:
    """Whether an alert lies where and after the injected change (site/subgroup "all" in the truth = anywhere)."""
    k = alert.signal.stream
    if k.model != change["model"] or alert.signal.detected_at < datetime.fromisoformat(change["change_time"]):
        return False
    site_ok = change["site"] == ALL or k.site in (change["site"], ALL)
    subgroup_ok = change["subgroup"] == ALL or change["subgroup"] in k.subgroup.split("&")
    return site_ok and subgroup_ok
