"""The engines' row-level security statements, built without a server."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from todo_backend.db import (
    APP_ROLE,
    BOUNDED,
    CONNECTING_ROLE,
    UNBOUNDED,
    StatementPrefixes,
    _marks,
    _rls_warnings,
    _Transaction,
    owned_by,
    role_error,
    user_call,
)
from todo_backend.errors import ConfigurationError

BOUNDS = "SELECT set_config('statement_timeout', '1', true)"


def test_a_transaction_starts_with_bounds_role_and_user() -> None:
    """The first statement carries bounds, role switch and user; the same user sends nothing."""
    prefixes, tx = StatementPrefixes(BOUNDS), _Transaction()
    first = prefixes.in_transaction(tx, "alice", as_app=True)
    assert first is not None
    assert first.startswith(BOUNDS + ", set_config('role', CASE WHEN ")
    assert first.endswith(user_call("alice"))
    assert prefixes.in_transaction(tx, "alice", as_app=True) is None
    assert prefixes.in_transaction(tx, "bob", as_app=True) == "SELECT " + user_call("bob")
    assert prefixes.in_transaction(tx, None, as_app=True) == "SELECT " + user_call(None)


def test_rollback_to_a_savepoint_makes_the_user_unknown() -> None:
    """After ROLLBACK TO SAVEPOINT the user is sent again, even an unchanged one."""
    prefixes, tx = StatementPrefixes(BOUNDS), _Transaction()
    prefixes.in_transaction(tx, "alice", as_app=True)
    tx.follow("SAVEPOINT sa_1")
    assert prefixes.in_transaction(tx, "alice", as_app=True) is None
    tx.follow("ROLLBACK TO SAVEPOINT sa_1")
    assert prefixes.in_transaction(tx, "alice", as_app=True) == "SELECT " + user_call("alice")


def test_the_connecting_role_gets_the_bounds_only() -> None:
    """CONNECTING_ROLE transactions and autocommit statements never switch role."""
    prefixes = StatementPrefixes(BOUNDS)
    assert prefixes.in_transaction(_Transaction(), None, as_app=False) == BOUNDS
    assert prefixes.autocommitted("SELECT 1", True, "a", as_app=False) == BOUNDS + "; SELECT 1"
    assert prefixes.autocommitted("SELECT 1", False, None, as_app=False) == "SELECT 1"


@pytest.mark.parametrize(
    "statement",
    ["VACUUM tasks", "  create unique index concurrently ix on t (a)", "BEGIN", "COMMIT"],
)
def test_statements_refusing_a_block_go_as_written(statement: str) -> None:
    """VACUUM, CONCURRENTLY and transaction control get no prefix in autocommit."""
    assert StatementPrefixes(BOUNDS).autocommitted(statement, False, None, as_app=True) == statement


def test_a_callers_autocommit_statement_runs_unscoped_as_the_app_role() -> None:
    """A caller's autocommitted SELECT gets the role switch and no user, but no bounds."""
    sent = StatementPrefixes(BOUNDS).autocommitted("SELECT 1", False, None, as_app=True)
    assert sent.startswith("SELECT set_config('role', ")
    assert sent.endswith(user_call(None) + "; SELECT 1")
    assert "statement_timeout" not in sent
    own = StatementPrefixes(BOUNDS).autocommitted("SELECT 1", True, "bob", as_app=True)
    assert own.startswith(BOUNDS)
    assert own.endswith(user_call("bob") + "; SELECT 1")


def test_marks_read_the_owner_from_the_named_parameter() -> None:
    """A package statement's owner is the value of the parameter its options name."""
    assert _marks(owned_by("owner"), {"owner": "alice"}) == (True, "alice", True)
    assert _marks(owned_by("owner"), [{"owner": "alice"}]) == (True, None, True)
    assert _marks(owned_by("owner"), {"owner": 5}) == (True, None, True)
    assert _marks(BOUNDED, {"owner": "alice"}) == (True, None, True)
    assert _marks({**owned_by("owner"), **UNBOUNDED}, {"owner": "a"}) == (False, None, True)
    assert _marks(CONNECTING_ROLE, {}) == (False, None, False)


class _DriverError(Exception):
    """A driver error with a SQLSTATE, as psycopg2 raises one."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.pgcode = code


def _wrapped(code: str, message: str) -> Exception:
    err = Exception("wrapped")
    err.orig = _DriverError(code, message)  # type: ignore[attr-defined]
    return err


def test_a_failed_role_switch_is_a_configuration_error() -> None:
    """Not a member of todo_app, or the role gone: ConfigurationError naming the GRANT."""
    for err in (
        _wrapped("42501", f'permission denied to set role "{APP_ROLE}"'),
        _wrapped("22023", f'role "{APP_ROLE}" does not exist'),
    ):
        translated = role_error(err)
        assert isinstance(translated, ConfigurationError)
        assert f"GRANT {APP_ROLE} TO" in str(translated)
    assert role_error(_wrapped("42501", "permission denied for table tasks")) is None
    assert role_error(ValueError("x")) is None


def _health_row(state: str, *, bypasses: bool, member: bool | None) -> SimpleNamespace:
    return SimpleNamespace(
        row_security=state, bypasses=bypasses, app_member=member, role_name="neondb_owner"
    )


def test_warnings_name_what_weakens_row_security() -> None:
    """A bypassing role, a role that cannot switch, a policy not forced: each warned of."""
    assert _rls_warnings(_health_row("forced", bypasses=False, member=True)) == ()
    [bypass] = _rls_warnings(_health_row("forced", bypasses=True, member=True))
    assert "neondb_owner bypasses row-level security" in bypass
    [cannot] = _rls_warnings(_health_row("forced", bypasses=False, member=None))
    assert f"GRANT {APP_ROLE} TO neondb_owner" in cannot
    [weak] = _rls_warnings(_health_row("on", bypasses=False, member=True))
    assert "not forced" in weak
    assert _rls_warnings(_health_row("off", bypasses=True, member=None)) == ()
