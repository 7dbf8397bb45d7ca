"""The list plans hold under skew: every page is read from an index led by user_id.

The table is built server-side in the shape that broke the plans: one owner holds
the oldest tenth of the rows (a bulk import, an early power user), everyone else
about 100 tasks. With ``user_id = :owner ORDER BY id DESC`` PostgreSQL 15 walks
``tasks_pkey`` backward for that owner and filters out every newer row of the
others; 60,000 rows are about the smallest table where it does so for the newest,
pending, done and deep pages alike (at 1M rows: about 100 ms a page against 0.05 ms).
The statements are the repository's own, compiled by the package's engine, and the
plans are checked with a row-level-security style owner predicate added too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, Select, any_, func, text
from sqlalchemy.dialects.postgresql import array
from sqlalchemy.engine import URL
from sqlmodel import Session

from tests.integration.row_security import migrated_engine
from todo_backend import repository_core as core
from todo_backend import user_scope
from todo_backend.db import CONNECTING_ROLE, own_statement
from todo_backend.models import Task

ROWS = 60_000
HEAVY = "heavy"
HEAVY_ROWS = ROWS // 10  # the oldest ids: 1 .. HEAVY_ROWS
NORMAL = "user-7"
USER_INDEXES = frozenset({"ix_tasks_user_id_id", "ix_tasks_user_id_complete_id"})

# (complete filter, before_id as a share of the owner's id range): newest, pending,
# done, deep, deep pending, deep done.
PAGES = [
    pytest.param(None, None, id="newest"),
    pytest.param(False, None, id="pending"),
    pytest.param(True, None, id="done"),
    pytest.param(None, 0.5, id="deep"),
    pytest.param(False, 0.5, id="deep-pending"),
    pytest.param(True, 0.5, id="deep-done"),
]


@pytest.fixture(scope="module")
def skewed(module_engine: Engine) -> Engine:
    """The module's tasks table: HEAVY owns the oldest tenth, the rest ~100 tasks each."""
    with module_engine.begin() as conn:
        conn.execute(text("TRUNCATE tasks RESTART IDENTITY"))
        conn.execute(
            text(
                "INSERT INTO tasks (user_id, title, complete, created_at, updated_at) "
                "SELECT :heavy, 'task ' || g, g % 2 = 0, now(), now() "
                "FROM generate_series(1, :heavy_rows) g"
            ),
            {"heavy": HEAVY, "heavy_rows": HEAVY_ROWS},
        )
        conn.execute(
            text(
                "INSERT INTO tasks (user_id, title, complete, created_at, updated_at) "
                "SELECT 'user-' || (g % :users), 'task ' || g, (g / :users) % 2 = 0, now(), now() "
                "FROM generate_series(1, :rows) g"
            ),
            {"users": (ROWS - HEAVY_ROWS) // 100, "rows": ROWS - HEAVY_ROWS},
        )
        conn.execute(text("ANALYZE tasks"))
    return module_engine


def _before_id(conn: Connection, owner: str, share: float | None) -> int | None:
    if share is None:
        return None
    low, high = conn.execute(
        text("SELECT min(id), max(id) FROM tasks WHERE user_id = :owner"), {"owner": owner}
    ).one()
    return int(low + (high - low) * share)


def _explain(conn: Connection, stmt: Select[Any], params: dict[str, Any]) -> dict[str, Any]:
    """EXPLAIN the statement as the repository sends it: compiled by the engine's dialect."""
    compiled = stmt.compile(dialect=conn.dialect)
    bound = {**compiled.params, **params}
    rows = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", bound).scalar_one()
    plan: dict[str, Any] = rows[0]["Plan"]
    return plan


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _assert_user_index_page(
    plan: dict[str, Any], *, complete: bool | None, before_id: int | None, ordered: bool
) -> None:
    """Every index read is led by user_id and bounds all conditions; *ordered*: no sort.

    A normal owner's page may also be a bitmap scan and a sort of their few rows (the
    planner's choice; cheap at any table size); the skewed owner's must be read in
    order from the index, since sorting all their rows is what a page must not cost.
    """
    nodes = list(_nodes(plan))
    assert not any(node["Node Type"] == "Seq Scan" for node in nodes), plan
    indexed = [node for node in nodes if "Index Name" in node]
    assert indexed, plan
    for node in indexed:
        assert node["Index Name"] in USER_INDEXES, plan
        if complete is not None:
            assert node["Index Name"] == "ix_tasks_user_id_complete_id", plan
        assert "user_id" in node["Index Cond"], plan
        if before_id is not None:
            # The cursor as a bound on the index's id column, after the equalities:
            # the scan starts at the cursor instead of walking down to it.
            assert f"(id < {before_id})" in node["Index Cond"], plan
    if ordered:
        # Read in order, every condition bounding the index range: nothing is read
        # only to be filtered out, nothing sorted.
        assert [node["Node Type"] for node in indexed] == ["Index Scan"], plan
        assert not any("Filter" in node for node in nodes), plan
        assert not any(node["Node Type"] in {"Sort", "Incremental Sort"} for node in nodes), plan


@pytest.mark.parametrize("owner", [HEAVY, NORMAL])
@pytest.mark.parametrize(("complete", "share"), PAGES)
def test_pages_read_an_index_led_by_user_id(
    skewed: Engine, owner: str, complete: bool | None, share: float | None
) -> None:
    """Newest, pending, done and deep pages of a skewed and a normal owner use a user_id index."""
    with skewed.connect() as conn:
        before_id = _before_id(conn, owner, share)
        call = core.list_call(owner, complete, 50, before_id)
        assert isinstance(call.stmt, Select)
        plan = _explain(conn, call.stmt, call.params)
    _assert_user_index_page(plan, complete=complete, before_id=before_id, ordered=owner == HEAVY)


@pytest.mark.parametrize(("complete", "share"), PAGES)
def test_pages_hold_with_a_row_security_predicate(
    skewed: Engine, complete: bool | None, share: float | None
) -> None:
    """With a policy's owner predicate (the documented ANY form) added, the plans still hold."""
    owner = Task.__table__.c.user_id  # type: ignore[attr-defined]
    policy = owner == any_(array([func.current_setting("app.user_id", True)]))
    with skewed.connect() as conn:
        conn.execute(text("SELECT set_config('app.user_id', :owner, true)"), {"owner": HEAVY})
        before_id = _before_id(conn, HEAVY, share)
        call = core.list_call(HEAVY, complete, 50, before_id)
        assert isinstance(call.stmt, Select)
        plan = _explain(conn, call.stmt.where(policy), call.params)
    _assert_user_index_page(plan, complete=complete, before_id=before_id, ordered=True)


@pytest.fixture(scope="module")
def skewed_with_policy(admin_url: URL) -> Iterator[Engine]:
    """The skewed table in a database migrated to head: revision 0003's policy in force.

    Loaded through the package's engine, each owner's rows inside that owner's scope
    (the policy refuses any other insert), then analysed as the connecting role.
    """
    with migrated_engine(admin_url) as engine:
        users = (ROWS - HEAVY_ROWS) // 100
        with Session(engine) as session:
            with user_scope(session, HEAVY):
                session.execute(
                    text(
                        "INSERT INTO tasks (user_id, title, complete, created_at, updated_at) "
                        "SELECT :heavy, 'task ' || g, g % 2 = 0, now(), now() "
                        "FROM generate_series(1, :heavy_rows) g"
                    ),
                    {"heavy": HEAVY, "heavy_rows": HEAVY_ROWS},
                )
            for n in range(users):
                with user_scope(session, f"user-{n}"):
                    session.execute(
                        text(
                            "INSERT INTO tasks (user_id, title, complete, created_at, updated_at) "
                            "SELECT :owner, 'task ' || g, g % 2 = 0, now(), now() "
                            "FROM generate_series(1, 100) g"
                        ),
                        {"owner": f"user-{n}"},
                    )
            session.commit()
        with engine.connect() as conn:
            conn.execute(text("ANALYZE tasks"), execution_options=CONNECTING_ROLE)
            conn.commit()
        yield engine


@pytest.mark.parametrize("owner", [HEAVY, NORMAL])
@pytest.mark.parametrize(("complete", "share"), PAGES)
def test_pages_hold_under_the_row_level_security_policy(
    skewed_with_policy: Engine, owner: str, complete: bool | None, share: float | None
) -> None:
    """Run as todo_app with revision 0003's policy, every page still reads a user_id index.

    The policy's ``user_id = (SELECT current_setting(...))`` is an InitPlan: the planner
    keeps the repository's owner in the index condition and checks the setting once.
    """
    with Session(skewed_with_policy) as session, user_scope(session, owner):
        conn = session.connection()
        assert conn.execute(text("SELECT current_user")).scalar_one() == "todo_app"
        before_id = _before_id(conn, owner, share)
        call = core.list_call(owner, complete, 50, before_id)
        assert isinstance(call.stmt, Select)
        plan = _explain(conn, call.stmt, call.params)
    assert any("InitPlan" in str(node.get("Parent Relationship", "")) for node in _nodes(plan))
    # A normal owner's page may come from either user_id index (about 100 rows either
    # way); the skewed owner's must use the one that bounds every condition.
    heavy = owner == HEAVY
    _assert_user_index_page(
        plan, complete=complete if heavy else None, before_id=before_id, ordered=heavy
    )


# -- owners of thousands of tasks, under the policy -----------------------------------

EVEN_USERS = 100
EVEN_TASKS = 1000


@pytest.fixture(scope="module")
def even_with_policy(admin_url: URL) -> Iterator[Engine]:
    """100 owners of 1000 tasks each, in a database migrated to head (the policy on).

    The shape of the HTTP benchmark, and of most real tables: no skew, owners' rows
    interleaved. Under the policy PostgreSQL multiplies the selectivities of the page's
    owner condition and the policy's, expects about ten rows, and, left alone, reads
    and sorts all 1000 (5 of these 6 pages, on PostgreSQL 15).
    """
    with migrated_engine(admin_url) as engine:
        # Owners interleaved, as tasks arrive in a shared service: each owner's rows
        # spread over the whole table. Loaded as the connecting role, past the policy.
        with engine.begin() as conn:
            conn.execution_options(**CONNECTING_ROLE)
            conn.execute(
                text(
                    "INSERT INTO tasks (user_id, title, complete, created_at, updated_at) "
                    "SELECT 'even-' || (g % :users), 'task ' || g, g % 3 = 0, now(), now() "
                    "FROM generate_series(1, :rows) g ORDER BY g"
                ),
                {"users": EVEN_USERS, "rows": EVEN_USERS * EVEN_TASKS},
            )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE tasks"))  # as the connecting role (D22)
        yield engine


@pytest.mark.parametrize(("complete", "share"), PAGES)
def test_every_owners_page_is_read_in_index_order_under_the_policy(
    even_with_policy: Engine, complete: bool | None, share: float | None
) -> None:
    """With the planner settings the list statement declares, no page is ever sorted."""
    owner = "even-7"
    with Session(even_with_policy) as session, user_scope(session, owner):
        conn = session.connection()
        before_id = _before_id(conn, owner, share)
        call = core.list_call(owner, complete, 50, before_id)
        assert isinstance(call.stmt, Select)
        own = own_statement(call.stmt.get_execution_options())
        assert own is not None
        plan_settings = own[2]
        assert plan_settings is not None
        conn.execute(text(f"SELECT {plan_settings}"))  # as the statement's own message does
        plan = _explain(conn, call.stmt, call.params)
    _assert_user_index_page(plan, complete=complete, before_id=before_id, ordered=True)
