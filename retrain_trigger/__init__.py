"""vigil: retrain_trigger step."""
