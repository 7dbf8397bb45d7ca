"""The README's FastAPI service, run exactly as written, for the HTTP tests.

:func:`readme_app` takes the README's Python block that uses ``todo_backend.fastapi``
and executes it with ``DATABASE_URL`` set, so the tests check the recipe a reader
copies, not a copy of it that could drift.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_recipe() -> str:
    """Return the README's Python block that builds the FastAPI service."""
    blocks = re.findall(r"^```python\n(.*?)^```$", README.read_text("utf-8"), re.DOTALL | re.M)
    recipes = [block for block in blocks if "todo_backend.fastapi" in block]
    assert len(recipes) == 1, "README.md must hold exactly one FastAPI recipe"
    return str(recipes[0])


def readme_app(monkeypatch: pytest.MonkeyPatch, database_url: str) -> tuple[FastAPI, AsyncEngine]:
    """Build the README's service on *database_url*; return its app and engine."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    namespace: dict[str, Any] = {"__name__": "readme_recipe"}
    exec(compile(readme_recipe(), str(README), "exec"), namespace)  # noqa: S102 - our README
    app, engine = namespace["app"], namespace["engine"]
    assert isinstance(app, FastAPI)
    assert isinstance(engine, AsyncEngine)
    return app, engine
