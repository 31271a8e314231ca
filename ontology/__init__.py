"""vigil: ontology step."""
