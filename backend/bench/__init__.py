"""Benchmarks of the data layer: ``python backend/bench/run.py`` (``nox -s bench``)."""
