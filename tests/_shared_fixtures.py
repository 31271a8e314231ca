"""Expensive test inputs computed once per test session and shared by several test modules.

Why: the suite must stay within its time budget on two cores (DESIGN.md §Performance targets); the same simulated
feed run through the same real pipeline was computed by more than one module. Each function here runs the real
components exactly as the modules did before, once per session; every caller gets the same, read-only result.

Use from a test module's own fixture (tests/ has no ``__init__.py``; pytest puts tests/ on ``sys.path``)::

    from _shared_fixtures import demo_run

    @pytest.fixture(scope="module")
    def demo(tmp_path_factory):
        return demo_run(tmp_path_factory)

Plain memoised functions rather than fixtures: a fixture imported into two modules is a fixture of each module and
runs once per module, even at session scope. Callers must not modify what they get: a test that changes a store
copies it first (``copy_store``), or, where the store's own URL is part of what it checks, changes it in place inside
``restored_afterwards``.

The demo (the longest single input, about two minutes) can also be started in a background process when the modules
that need it are collected (``start_demo_in_background``), so it runs on the second core while the tests before
them run on the first; ``demo_run`` then waits for it and returns exactly what ``run_demo`` returned there.
"""

from __future__ import annotations

import atexit
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from vigil.pipeline import RunResult
    from vigil.settings import Settings

_cache: dict[str, Any] = {}

DEMO_SEED = 7
DEMO_TIMEOUT_S = 1800
# The child runs the same call as the in-process path, at a lower CPU priority so the tests running meanwhile keep
# their core, and hands back run_demo's own return value (pickled), not a re-read of summary.json.
_DEMO_CHILD = """
import os, pickle, sys
from pathlib import Path
os.nice(10)
from vigil.demo import run_demo
summary = run_demo(Path(sys.argv[1]), seed=int(sys.argv[3]))
Path(sys.argv[2]).write_bytes(pickle.dumps(summary))
"""


class _BackgroundDemo:
    """``run_demo(out, seed=7)`` in a child Python process, started now, collected by ``result``."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="vigil-test-demo-"))
        self.out, self.returned, self.log = self.root / "out", self.root / "returned.pickle", self.root / "demo.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _DEMO_CHILD, str(self.out), str(self.returned), str(DEMO_SEED)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        atexit.register(self.discard)

    def result(self) -> tuple[Path, dict]:
        try:
            code = self.process.wait(timeout=DEMO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"run_demo(seed={DEMO_SEED}) did not finish within {DEMO_TIMEOUT_S} s in its background "
                        f"process; its log: {self.log}", pytrace=False)
        if code != 0 or not self.returned.exists():
            tail = self.log.read_text(errors="replace")[-4000:]
            pytest.fail(f"run_demo(seed={DEMO_SEED}) failed in its background process (exit status {code}); "
                        f"the end of its log {self.log}:\n{tail}", pytrace=False)
        return self.out, pickle.loads(self.returned.read_bytes())

    def discard(self) -> None:
        """At interpreter exit: stop a demo nobody waited for (e.g. its tests were deselected) and remove its files."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def start_demo_in_background() -> None:
    """Start ``demo_run``'s demo now in a child process (once per session). Call it at import of a module that uses
    ``demo_run``: pytest imports every module before running the first test. Not under pytest-xdist, whose workers
    all import every module: there ``demo_run`` computes it where it is first needed."""
    if "background-demo" not in _cache and "demo" not in _cache and not os.environ.get("PYTEST_XDIST_WORKER"):
        _cache["background-demo"] = _BackgroundDemo()


def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """``vigil demo``'s embedded default with seed 7 (every scenario, 180 days, SQLite stores): (out dir, summary),
    the summary being ``run_demo``'s return value.

    Shared by test_e2e.py (what the demo finds against the injected truth) and test_report.py (the surveillance
    report built from the demo's scanner-upgrade store). Files under ``out`` must be treated as read-only.
    """
    if "demo" not in _cache:
        background = _cache.pop("background-demo", None)
        if background is not None:
            _cache["demo"] = background.result()
        else:
            from vigil.demo import run_demo

            out = tmp_path_factory.mktemp("shared-demo")
            _cache["demo"] = (out, run_demo(out, seed=DEMO_SEED))
    return _cache["demo"]


def scanner_upgrade_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, RunResult, Path]:
    """The scanner-upgrade scenario (seed 11, 150 days, change on day 60, volume 0.7) simulated and run through the
    real pipeline with the example configuration: (settings, RunResult, feed dir).

    Shared by test_persist.py and test_dashboards.py. ``vigil.persist.persist`` writes a one-shot result without
    remembering anything in it (``incremental=False``), so the same result can be stored into several stores; give
    each store its own ``settings.model_copy(update={"store_url": ...})``.
    """
    if "scanner-upgrade" not in _cache:
        from vigil.pipeline import Pipeline
        from vigil.settings import load_settings
        from vigil.simulator import simulate

        feed = tmp_path_factory.mktemp("shared-scanner-upgrade")
        simulate("scanner-upgrade", feed, seed=11, days=150, change_day=60, volume=0.7)
        settings = load_settings()
        _cache["scanner-upgrade"] = (settings, Pipeline(settings).run_paths([feed]), feed)
    return _cache["scanner-upgrade"]


def copy_store(source: Path, target_dir: Path) -> str:
    """Copy a SQLite store into ``target_dir`` and return its SQLAlchemy URL, for a test that writes to it."""
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / source.name
    _backup(source, target)
    return f"sqlite:///{target}"


@contextmanager
def restored_afterwards(store: Path, backup_dir: Path) -> Iterator[str]:
    """Yield the URL of the SQLite store ``store`` to change in place, and put its content back afterwards.

    For a module whose checks depend on the store's own URL (a run's configuration hash covers ``store_url``), so a
    copy elsewhere would not do; the store is back as it was before the next module runs, whatever the order."""
    backup_dir.mkdir(parents=True, exist_ok=True)
    saved = backup_dir / store.name
    _backup(store, saved)
    try:
        yield f"sqlite:///{store}"
    finally:
        _backup(saved, store)


def _backup(source: Path, target: Path) -> None:
    """SQLite's online backup API, not a file copy: the store runs in WAL mode, so committed pages may still sit in
    the ``-wal`` file while another connection is open."""
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
