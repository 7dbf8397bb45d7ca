"""A copy of the package's migrations with one extra revision, for migration tests."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Final

import pytest

from todo_backend import migrate

# The newest revision the package ships, and the one a test adds on top of it.
HEAD: Final = str(migrate.head_revision())
NEXT: Final = f"{int(HEAD) + 1:04d}"


def scripts_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upgrade_body: str) -> Path:
    """Point :mod:`todo_backend.migrate` at a copy of its scripts plus a revision NEXT.

    The copy lives in *tmp_path*; revision NEXT revises HEAD, runs *upgrade_body*
    (Python statements using ``op`` and ``sa``) and downgrades as a no-op. Returns the
    copied script directory; *monkeypatch* undoes the redirection after the test.
    """
    scripts = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    body = textwrap.indent(textwrap.dedent(upgrade_body).strip(), "    ")
    (scripts / "versions" / f"{NEXT}_test_change.py").write_text(
        '"""A change made by a test."""\n\n'
        "import sqlalchemy as sa\nfrom alembic import op\n\n"
        f'revision = "{NEXT}"\ndown_revision = "{HEAD}"\n'
        "branch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade() -> None:\n{body}\n\n\n"
        "def downgrade() -> None:\n    pass\n"
    )
    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", scripts)
    return scripts
