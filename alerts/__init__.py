"""vigil: alerts step."""
