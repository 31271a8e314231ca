"""Build vigil's Grafana dashboards as JSON models and write them where Grafana's file provider reads them.

The output is deterministic (sorted keys, panel ids by position), so rebuilding unchanged code changes no file and
the built JSON can be diffed and reviewed like code.
"""

from __future__ import annotations

import json
from pathlib import Path

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import AnnotationContainer, Dashboard, DashboardDashboardTemplating

from dashboards.boards import BOARDS


def _finish(board: Dashboard) -> Dashboard:
    """Fill in what the SDK leaves unset: a unique id per panel (rows included) in layout order, and an explicit
    (possibly empty) annotation and variable list."""
    for number, panel in enumerate(board.panels or [], start=1):
        panel.id_val = number
    if board.annotations is None or board.annotations.list_val is None:
        board.annotations = AnnotationContainer(list_val=[])
    if board.templating is None or board.templating.list_val is None:
        board.templating = DashboardDashboardTemplating(list_val=[])
    return board


def build_dashboards() -> dict[str, dict]:
    """Every vigil dashboard as a Grafana JSON model, keyed by its uid."""
    models = [json.loads(JSONEncoder().encode(_finish(make().build()))) for make in BOARDS]
    return {model["uid"]: model for model in models}


def dashboard_json(model: dict) -> str:
    """The file text of one dashboard model: stable key order and indentation, newline-terminated."""
    return json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_dashboards(out_dir: Path) -> list[Path]:
    """Write ``<uid>.json`` for every dashboard into ``out_dir`` (created if missing); return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for uid, model in sorted(build_dashboards().items()):
        path = out_dir / f"{uid}.json"
        path.write_text(dashboard_json(model), encoding="utf-8")
        written.append(path)
    return written
