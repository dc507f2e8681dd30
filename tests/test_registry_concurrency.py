"""Registry: concurrent writers wait and retry instead of failing (issue 11, Registry).

8 processes x 50 `ldfleet budget set`-equivalent writes (``Registry.set_policy`` on one class, the
call the command makes), started together on an empty database, on SQLite and on PostgreSQL:
nothing fails, nothing is lost, and the class's versions stay unique and gap-free.
"""

from __future__ import annotations

import json
import subprocess
import sys

from ldfleet.server.registry import Registry

from control_fixtures import db_url, pg_admin, pg_url  # noqa: F401 - pytest fixtures

WRITERS, WRITES = 8, 50

WRITER = r"""
import json, sys
from ldfleet.server.registry import Registry, RegistryError
url, me, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ok, failed = 0, []
with Registry(url) as reg:
    for j in range(n):
        try:
            reg.set_policy("rpi4", keep=0.25 + 0.5 * (j % 2), create_class=True, issued_by=f"writer-{me}", comment=f"{me}-{j}")
            ok += 1
        except RegistryError as exc:
            failed.append(str(exc))
print(json.dumps({"ok": ok, "failed": failed}))
"""


def test_eight_writers_times_fifty_lose_nothing_and_fail_nothing(db_url):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, db_url, str(i), str(WRITES)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(WRITERS)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["failed"] == [] for r in results), [r["failed"][:2] for r in results if r["failed"]]
    assert sum(r["ok"] for r in results) == WRITERS * WRITES
    with Registry(db_url) as reg:
        rows = reg.policy_history("rpi4")
    assert len(rows) == WRITERS * WRITES
    assert sorted(r.version for r in rows) == list(range(1, WRITERS * WRITES + 1))  # unique and gap-free
    assert {r.comment for r in rows} == {f"{i}-{j}" for i in range(WRITERS) for j in range(WRITES)}  # none lost
    by_id = {r.id: r for r in rows}
    assert all(r.previous_id is None if r.version == 1 else by_id[r.previous_id].version == r.version - 1 for r in rows)


def test_a_postgresql_serialization_failure_is_retried_by_its_sqlstate(pg_url):
    """A real SQLSTATE 40001 (two SERIALIZABLE transactions on one row) is retried; a real unique
    violation is not, unless the write asks for it."""
    import pytest
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    from ldfleet.server.registry.retry import retry_write, transient_reason

    with Registry(pg_url) as reg:
        with reg.engine.begin() as c:
            c.execute(text("CREATE TABLE counter (id int primary key, n int)"))
            c.execute(text("INSERT INTO counter VALUES (1, 0)"))
        attempts = []

        def bump() -> int:
            attempts.append(1)
            with reg.engine.connect() as a:
                a = a.execution_options(isolation_level="SERIALIZABLE")
                with a.begin():
                    n = a.execute(text("SELECT n FROM counter WHERE id = 1")).scalar_one()
                    if len(attempts) == 1:  # another writer commits in between, the first time only
                        with reg.engine.begin() as b:
                            b.execute(text("UPDATE counter SET n = n + 10 WHERE id = 1"))
                    a.execute(text("UPDATE counter SET n = :n WHERE id = 1"), {"n": n + 1})
            return n + 1

        assert retry_write(bump, what="bump the counter") == 11
        assert len(attempts) == 2
        with reg.engine.begin() as c:
            with pytest.raises(IntegrityError) as info:
                c.execute(text("INSERT INTO counter VALUES (1, 5)"))
        assert transient_reason(info.value) is None
        assert transient_reason(info.value, integrity=True) == "a concurrent writer took the same key"


def test_a_round_metric_written_while_another_writer_commits_is_not_lost(tmp_path):
    """Read-then-write on SQLite (WAL): the metric's transaction holds the write lock from its first
    read, so a writer that commits in between waits instead of making the insert fail "database is
    locked" (a stale read snapshot cannot be upgraded to a write; the busy timeout does not apply)."""
    import sqlite3

    from sqlalchemy import event

    path = tmp_path / "registry.db"
    with Registry(f"sqlite:///{path}") as reg:
        round_id = reg.start_round("run-1", 1).id
        other = []

        def write_from_another_connection(conn, cursor, statement, *args):
            if statement.lstrip().upper().startswith("INSERT INTO ROUND_METRICS") and not other:
                con = sqlite3.connect(path, timeout=0.2, isolation_level=None)
                try:
                    con.execute("INSERT INTO device_classes (name, created_at) VALUES ('late', '2026-01-01 00:00:00')")
                    other.append("committed")
                except sqlite3.OperationalError as exc:
                    other.append(str(exc))
                finally:
                    con.close()

        event.listen(reg.engine, "before_cursor_execute", write_from_another_connection)
        reg.record_round_metric(round_id, "dev-1", phase="eval", k=2, accuracy=0.5)
        event.remove(reg.engine, "before_cursor_execute", write_from_another_connection)
        assert other == ["database is locked"]  # the other writer had to wait: this one held the lock
        assert [(m.device_id, m.accuracy) for _, m in reg.round_metrics("run-1")] == [("dev-1", 0.5)]
