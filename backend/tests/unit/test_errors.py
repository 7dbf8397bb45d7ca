"""The error tree: every deliberate error is a TodoBackendError and survives pickling."""

from __future__ import annotations

import pickle

from todo_backend.errors import DatabaseTimeoutError, TodoBackendError


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
