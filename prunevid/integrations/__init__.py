"""Adapters that plug PruneVid into other tools (each imports its tool lazily: optional extras)."""
