"""What every `vigil` sub-command module shares: the ``--store``/``--json`` options, the store lookup and JSON output.

Kept apart from ``vigil.cli`` so that sub-apps (``cli_alerts``, ``cli_serve``, ``cli_calibrate``) can use them without
importing the top-level app, which imports them (a circular import otherwise).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from vigil.settings import Settings

DEFAULT_STORE_URL: str = Settings.model_fields["store_url"].default
"""``sqlite:///vigil.db`` in the working directory (DESIGN.md §Contracts), from the one place it is defined."""

console = Console()
err = Console(stderr=True)

StoreOpt = Annotated[str | None, typer.Option("--store", envvar="VIGIL_STORE_URL",
                                              help="Store URL (default sqlite:///vigil.db in the working directory).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", envvar="VIGIL_CONFIG",
                                         help="Config YAML (env VIGIL_CONFIG; default: the embedded example).")]


def store_url(store: str | None) -> str:
    """The store URL to use: the option (or ``VIGIL_STORE_URL``), else the default."""
    return store or DEFAULT_STORE_URL


def existing_store(store: str | None) -> str:
    """The store URL for a command that reads it; a missing SQLite file is an error, not a new empty store."""
    url = store_url(store)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise typer.BadParameter(f"no vigil store at {url}: run `vigil ingest` (or `vigil demo`) first, or pass "
                                 "--store / VIGIL_STORE_URL", param_hint="--store")
    return url


def print_json(obj: Any) -> None:
    """Indented JSON on stdout (datetimes as ISO 8601), for scripts."""
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode() + "\n")
