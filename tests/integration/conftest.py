"""Integration tests share the database fixtures of tests/conftest.py."""
