"""The error tree: every deliberate error is a TodoBackendError and survives pickling."""

from __future__ import annotations

import pickle

import pytest

from todo_backend.errors import (
    DatabaseConflictError,
    DatabaseStatementError,
    DatabaseTimeoutError,
    TodoBackendError,
)


def test_timeout_error_is_in_the_tree_and_keeps_its_bound_across_pickle() -> None:
    """A DatabaseTimeoutError is a TodoBackendError and keeps message and bound when pickled."""
    err = DatabaseTimeoutError("waited too long", bound="DB_LOCK_TIMEOUT")
    assert isinstance(err, TodoBackendError)
    copy = pickle.loads(pickle.dumps(err))  # noqa: S301 - our own object, round-tripped
    assert (type(copy), str(copy), copy.bound) == (
        DatabaseTimeoutError,
        "waited too long",
        err.bound,
    )


@pytest.mark.parametrize("kind", [DatabaseConflictError, DatabaseStatementError])
def test_sqlstate_errors_keep_their_code_across_pickle(
    kind: type[DatabaseConflictError] | type[DatabaseStatementError],
) -> None:
    """A conflict or statement error is a TodoBackendError and keeps its sqlstate when pickled."""
    err = kind("refused", sqlstate="40P01")
    assert isinstance(err, TodoBackendError)
    copy = pickle.loads(pickle.dumps(err))  # noqa: S301 - our own object, round-tripped
    assert (type(copy), str(copy), copy.sqlstate) == (kind, "refused", "40P01")
