"""The report's HTML: one self-contained page (inline CSS and SVG, no scripts, fonts or external URLs).

Every value from the store passes through ``html.escape`` (``h``) before it reaches the page; the only unescaped
markup is this module's own and the SVG that matplotlib wrote. (jinja2 is not installed here, so ``string.Template``
carries the page skeleton.)
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from datetime import datetime
from string import Template
from typing import Any

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="vigil $version">
<title>$title</title>
<style>
body { font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1b1b1b; background: #ffffff; font-size: 14px; line-height: 1.4; }
h1 { font-size: 24px; border-bottom: 3px solid #1f5fa8; padding-bottom: 6px; }
h2 { font-size: 19px; margin-top: 32px; border-bottom: 1px solid #cccccc; }
h3 { font-size: 16px; margin-top: 22px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 12.5px; }
th, td { border: 1px solid #d0d0d0; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #eef3f9; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 12px 0 22px; page-break-inside: avoid; }
figcaption { font-size: 12px; color: #444444; }
figure svg { max-width: 100%; height: auto; }
code, pre { font-family: "DejaVu Sans Mono", monospace; font-size: 12px; background: #f4f4f4; }
pre { padding: 8px; white-space: pre-wrap; }
.wide { overflow-x: auto; }
.muted { color: #666666; }
.bad { color: #c0392b; font-weight: bold; }
.good { color: #2e7d32; font-weight: bold; }
.kpi { display: inline-block; border: 1px solid #d0d0d0; padding: 6px 12px; margin: 0 8px 8px 0; }
.kpi b { display: block; font-size: 20px; }
@media print { h2 { page-break-before: auto; } }
</style>
</head>
<body>
$body
</body>
</html>
""")


def h(value: Any) -> str:
    """Escape any value for HTML text or attribute context."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def fmt_day(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d") if value else "-"


def fmt_num(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Iterable[int] = ()) -> str:
    """An HTML table; every cell is escaped. Columns in ``numeric`` are right-aligned."""
    nums = set(numeric)
    head = "".join(f"<th>{h(col)}</th>" for col in headers)
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{h(v)}</td>' if i in nums else f"<td>{h(v)}</td>"
                        for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(headers)}" class="muted">none</td></tr>')
    return f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def kpi(label: str, value: Any) -> str:
    return f'<span class="kpi"><b>{h(value)}</b>{h(label)}</span>'


def figure(number: int, svg: str, caption: str, anchor: str) -> str:
    """A numbered figure; ``svg`` is trusted matplotlib output, ``caption`` is escaped."""
    return (f'<figure id="{h(anchor)}">{svg}<figcaption><b>Figure {number}.</b> {h(caption)}</figcaption>'
            "</figure>")


def page(title: str, body: str, version: str) -> str:
    return PAGE.substitute(title=h(title), body=body, version=h(version))
