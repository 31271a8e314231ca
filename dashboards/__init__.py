"""vigil: dashboards step."""
