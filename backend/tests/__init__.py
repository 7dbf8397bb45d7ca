"""Tests of todo_backend."""
