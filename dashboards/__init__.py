"""vigil: dashboards step. Grafana dashboards as code (grafana-foundation-sdk), read from the store's PostgreSQL.

``build_dashboards()`` gives the JSON models by uid; ``write_dashboards(dir)`` writes them for Grafana's file
provider (``provisioning/``). The SQL views the panels read are in ``views.sql``.
"""

from dashboards.build import build_dashboards, write_dashboards

__all__ = ["build_dashboards", "write_dashboards"]
