"""Generated JSON Schemas of the spec language (`python -m schemas.generate` rewrites them)."""
