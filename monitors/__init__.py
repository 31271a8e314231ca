"""vigil: monitors step."""
