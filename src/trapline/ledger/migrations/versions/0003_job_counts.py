"""counts kept by triggers; an index of each job's alerts; SQLite planner statistics

Reading a job's counts was a GROUP BY over its images, and its latest warnings a scan
of its log: both grew with the job. Triggers now keep ``job_counts`` in the same
transaction as every change of an image's state, whoever makes it.

SQLite plans without statistics until someone runs ANALYZE, and then takes an index
on ``state`` (four values over a whole job) for ``… WHERE id IN (…) AND state IN (…)``:
a scan of every open image per result post. The statistics written here say what a
big job looks like; a later ANALYZE replaces them with measured ones.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ALERTS_WHERE = "image_id IS NULL AND level IN ('WARNING', 'ERROR', 'CRITICAL')"
NAMES = ("queued", "reserved", "done", "failed", "detections")

# Rows per key prefix of a 1,000,000-image ledger: 10 jobs, 4 states, unique images.
SQLITE_STATS = {
    ("job_images", ("job_id", "image_id")): "1000000 100000 1",
    ("job_images", ("job_id", "state")): "1000000 100000 25000",
    ("job_images", ("job_id", "msg_seq")): "1000000 100000 1",
    ("job_images", ("state", "lease_deadline")): "1000000 250000 1",
    ("job_events", ("job_id", "image_id")): "3000000 300000 3",
    ("job_counts", ("job_id", "name")): "50 5 1",
}

SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER job_counts_job_added AFTER INSERT ON jobs BEGIN
        INSERT INTO job_counts (job_id, name, n) VALUES
        {", ".join(f"(NEW.id, '{name}', 0)" for name in NAMES)};
    END""",
    """CREATE TRIGGER job_counts_image_added AFTER INSERT ON job_images BEGIN
        UPDATE job_counts SET n = n + 1 WHERE job_id = NEW.job_id AND name = NEW.state;
    END""",
    """CREATE TRIGGER job_counts_image_moved AFTER UPDATE OF state ON job_images
    WHEN OLD.state IS NOT NEW.state BEGIN
        UPDATE job_counts SET n = n - 1 WHERE job_id = OLD.job_id AND name = OLD.state;
        UPDATE job_counts SET n = n + 1, changed_at = CASE
            WHEN changed_at IS NULL OR changed_at < NEW.updated_at THEN NEW.updated_at
            ELSE changed_at END
        WHERE job_id = NEW.job_id AND name = NEW.state;
    END""",
    """CREATE TRIGGER job_counts_image_removed AFTER DELETE ON job_images BEGIN
        UPDATE job_counts SET n = n - 1 WHERE job_id = OLD.job_id AND name = OLD.state;
    END""",
    """CREATE TRIGGER job_counts_result_added AFTER INSERT ON image_results BEGIN
        UPDATE job_counts SET n = n + NEW.detections_count
        WHERE job_id = NEW.job_id AND name = 'detections';
    END""",
]

# PostgreSQL: once per statement, one delta row per (job, name) it changed; concurrent
# transactions each insert their own rows instead of queueing on one counter row.
PG_FUNCTIONS = {
    "job_counts_images_added": """
        INSERT INTO job_counts (job_id, name, n)
        SELECT job_id, state, count(*) FROM new_rows GROUP BY job_id, state;""",
    "job_counts_images_moved": """
        INSERT INTO job_counts (job_id, name, n, changed_at)
        SELECT job_id, name, sum(d), max(at) FROM (
            SELECT job_id, state AS name, -1 AS d, NULL::timestamptz AS at FROM old_rows
            UNION ALL SELECT job_id, state, 1, updated_at FROM new_rows
        ) moves GROUP BY job_id, name HAVING sum(d) <> 0;""",
    "job_counts_images_removed": """
        INSERT INTO job_counts (job_id, name, n)
        SELECT o.job_id, o.state, -count(*) FROM old_rows o
        WHERE EXISTS (SELECT 1 FROM jobs WHERE jobs.id = o.job_id)
        GROUP BY o.job_id, o.state;""",
    "job_counts_results_added": """
        INSERT INTO job_counts (job_id, name, n)
        SELECT job_id, 'detections', sum(detections_count) FROM new_rows
        GROUP BY job_id HAVING sum(detections_count) <> 0;""",
}
PG_TRIGGERS = [
    ("job_counts_images_added", "INSERT", "job_images", "NEW TABLE AS new_rows"),
    (
        "job_counts_images_moved",
        "UPDATE",
        "job_images",
        "OLD TABLE AS old_rows NEW TABLE AS new_rows",
    ),
    ("job_counts_images_removed", "DELETE", "job_images", "OLD TABLE AS old_rows"),
    ("job_counts_results_added", "INSERT", "image_results", "NEW TABLE AS new_rows"),
]


def upgrade() -> None:
    op.create_table(
        "job_counts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=16), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_job_counts_job_name", "job_counts", ["job_id", "name"])
    op.create_index(
        "ix_job_events_job_alerts",
        "job_events",
        ["job_id", "id"],
        sqlite_where=sa.text(ALERTS_WHERE),
        postgresql_where=sa.text(ALERTS_WHERE),
    )
    _backfill()
    if op.get_bind().dialect.name == "postgresql":
        _postgresql_triggers()
    else:
        for trigger in SQLITE_TRIGGERS:
            op.execute(trigger)
        _sqlite_stats()


def _backfill() -> None:
    """Counts of the jobs already there; on SQLite a row for every name of every job."""
    op.execute(
        "INSERT INTO job_counts (job_id, name, n, changed_at) "
        "SELECT job_id, state, count(*), max(updated_at) FROM job_images GROUP BY job_id, state"
    )
    op.execute(
        "INSERT INTO job_counts (job_id, name, n) "
        "SELECT job_id, 'detections', sum(detections_count) FROM image_results GROUP BY job_id"
    )
    if op.get_bind().dialect.name == "sqlite":
        for name in NAMES:
            op.execute(
                "INSERT INTO job_counts (job_id, name, n) "
                f"SELECT id, '{name}', 0 FROM jobs WHERE NOT EXISTS ("
                f"SELECT 1 FROM job_counts c WHERE c.job_id = jobs.id AND c.name = '{name}')"
            )


def _postgresql_triggers() -> None:
    for function, body in PG_FUNCTIONS.items():
        op.execute(
            f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN {body} RETURN NULL; END $$"
        )
    for function, event, table, referencing in PG_TRIGGERS:
        op.execute(
            f"CREATE TRIGGER {function} AFTER {event} ON {table} REFERENCING {referencing} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        )


def _sqlite_stats() -> None:
    bind = op.get_bind()
    op.execute("ANALYZE sqlite_schema")  # creates sqlite_stat1 if it is not there yet
    for (table, columns), stat in SQLITE_STATS.items():
        index = _sqlite_index(bind, table, columns)
        op.execute(
            sa.text("DELETE FROM sqlite_stat1 WHERE tbl = :t AND idx = :i").bindparams(
                t=table, i=index
            )
        )
        op.execute(
            sa.text("INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES (:t, :i, :s)").bindparams(
                t=table, i=index, s=stat
            )
        )
    op.execute("ANALYZE sqlite_schema")  # loads them into this connection's planner


def _sqlite_index(bind: sa.Connection, table: str, columns: tuple[str, ...]) -> str:
    """The name SQLite gave the index on ``columns`` (unique constraints get made-up ones)."""
    indexes = bind.exec_driver_sql(f"PRAGMA index_list('{table}')").all()
    for row in indexes:
        name = row[1]
        cols = tuple(r[2] for r in bind.exec_driver_sql(f"PRAGMA index_info('{name}')").all())
        if cols == columns:
            return str(name)
    raise RuntimeError(f"no index on {table}{columns}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for function, _event, table, _ref in PG_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {function} ON {table}")
        for function in PG_FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {function}()")
    else:
        for name in (
            "job_counts_job_added",
            "job_counts_image_added",
            "job_counts_image_moved",
            "job_counts_image_removed",
            "job_counts_result_added",
        ):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_index("ix_job_events_job_alerts", table_name="job_events")
    op.drop_table("job_counts")
