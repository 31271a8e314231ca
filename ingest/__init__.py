"""vigil: ingest step."""
