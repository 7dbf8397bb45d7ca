"""Unit tests: in-memory SQLite, no server needed."""
