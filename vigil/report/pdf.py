"""PDF of the report: headless Chromium prints the self-contained HTML (nothing is fetched)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path


def chromium_binary() -> str | None:
    """The headless browser used for PDF and the screenshot test (Debian's ``chromium``)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def print_pdf(html_path: Path, pdf_path: Path, timeout: float = 120) -> Path:
    """Print the HTML to PDF with headless Chromium (``--print-to-pdf``); the page is self-contained, so nothing is
    fetched. ``--no-sandbox`` because CI runs as root, where Chromium's sandbox refuses to start."""
    binary = chromium_binary()
    if binary is None:
        raise RuntimeError("--pdf needs Chromium (Debian package `chromium`, installed by scripts/ensure-debs.sh); "
                           "the HTML report was written without it")
    with tempfile.TemporaryDirectory(prefix="vigil-chromium-") as profile:
        done = subprocess.run(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
             "--no-pdf-header-footer", f"--print-to-pdf={pdf_path}", html_path.resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not pdf_path.exists():
        raise RuntimeError(f"Chromium could not print {html_path} to PDF (exit {done.returncode}): "
                           f"{done.stderr.strip()[-500:]}")
    return pdf_path
