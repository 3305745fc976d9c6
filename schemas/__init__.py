"""JSON Schemas of the WKVQuant artifact (package data: ``artifact.schema.json``)."""
