"""Ingest: read uploads' headers, classify frames, register cameras and nights, plan tasks."""
