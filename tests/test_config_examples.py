"""The commented examples in examples/vigil.yaml (stream sources, routing, ticket feed, terminology server) are valid
configuration: uncommented, the file loads and every example reaches its typed config."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from vigil.settings import EXAMPLES_DIR, load_settings

_EXAMPLE_LINE = re.compile(r"^(\s*)# (- \{kind|   [a-z_]|routing:|  [a-z_ -]|ticket_feed:|terminology:)")


def test_the_commented_examples_in_the_example_config_load(tmp_path: Path) -> None:
    lines = [line.replace("# ", "", 1) if _EXAMPLE_LINE.match(line) and "Stream" not in line and "See README" not in line
             else line for line in (EXAMPLES_DIR / "vigil.yaml").read_text().splitlines()]
    shutil.copytree(EXAMPLES_DIR, tmp_path, dirs_exist_ok=True)
    (tmp_path / "vigil.yaml").write_text("\n".join(lines) + "\n")
    shutil.copy(EXAMPLES_DIR / "vigil.yaml", tmp_path / "plain.yaml")
    settings = load_settings(tmp_path / "vigil.yaml")
    assert [s.kind for s in settings.sources] == ["files", "kafka", "fhir-rest", "fhir-bulk-export", "bulk-directory"]
    assert [r.name for r in settings.routing.receivers] == ["alertmanager", "safety-officers"]
    assert settings.ticket_feed.topic == "vigil.retraining-requests"
    assert settings.terminology.base_url.startswith("https://")
    # where data comes from and goes to is not analysis; which terminology server maps codes is
    plain = load_settings(tmp_path / "plain.yaml")
    assert settings.model_copy(update={"terminology": None}).analysis_hash() == plain.analysis_hash()
    assert settings.analysis_hash() != plain.analysis_hash()
