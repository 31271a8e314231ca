"""``python -m vigil`` — the same as the ``vigil`` command."""

from vigil.cli import app

app()
