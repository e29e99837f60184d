"""What a borrower can leave on its server session, read back in one query: the reset
tests (psycopg 3 in test_security.py, psycopg2 in test_psycopg2.py) leave each of these on
a connection and probe what the next borrower of the same backend sees."""

from __future__ import annotations

__all__ = ["PROBE_FIELDS", "probe_sql"]

#: The probe's columns after pg_backend_pid(), in order.
PROBE_FIELDS = (
    "role",
    "setting",
    "temp table",
    "prepared stmt",
    "advisory lock",
    "LISTEN",
    "cursor",
)


def probe_sql(*extra_columns: str) -> str:
    """``SELECT pg_backend_pid(), <PROBE_FIELDS>, <extra_columns>``."""
    columns = [
        "pg_backend_pid()",
        "current_user",
        "coalesce(current_setting('app.tenant', true), '')",
        "to_regclass('pg_temp.gp_private') IS NOT NULL",
        "(SELECT count(*) FROM pg_prepared_statements WHERE name = 'gp_stmt')",
        "(SELECT count(*) FROM pg_locks"
        " WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted)",
        "(SELECT count(*) FROM pg_listening_channels() AS c WHERE c = 'gp_channel')",
        "(SELECT count(*) FROM pg_cursors WHERE name = 'gp_cursor')",
        *extra_columns,
    ]
    return "SELECT " + ",\n       ".join(columns)
