"""Schema of the example app: accounts and transfers in the ``greenpool_demo`` schema.

Idempotent (``CREATE ... IF NOT EXISTS``, seeding only an empty table) and safe to run
from several processes at once (an advisory lock serialises it). Run it with
``python -m examples.flask_app.schema [--conninfo ...] [--accounts N] [--reset]`` or
``flask --app examples.flask_app init-db``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

SCHEMA = "greenpool_demo"
LOCK_ID = 0x67726565  # pg_advisory_xact_lock key: "gree"

DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.accounts (
    id         bigserial PRIMARY KEY,
    owner      text NOT NULL,
    balance    numeric(14, 2) NOT NULL DEFAULT 0 CHECK (balance >= 0),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.transfers (
    id         bigserial PRIMARY KEY,
    from_id    bigint NOT NULL REFERENCES {SCHEMA}.accounts (id),
    to_id      bigint NOT NULL REFERENCES {SCHEMA}.accounts (id),
    amount     numeric(14, 2) NOT NULL CHECK (amount > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (from_id <> to_id)
);
CREATE INDEX IF NOT EXISTS transfers_from_idx ON {SCHEMA}.transfers (from_id, id DESC);
CREATE INDEX IF NOT EXISTS transfers_to_idx ON {SCHEMA}.transfers (to_id, id DESC);
"""

SEED = f"""
INSERT INTO {SCHEMA}.accounts (owner, balance)
SELECT 'user' || n, 1000 FROM generate_series(1, %s) AS n
"""


def setup(conn: Any, *, accounts: int = 1000, reset: bool = False) -> int:
    """Create the schema on a DB-API connection (psycopg or psycopg2) and commit.

    Seeds ``accounts`` accounts when the table is empty; returns how many accounts exist.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
        if reset:
            cur.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        cur.execute(DDL)
        cur.execute(f"SELECT count(*) FROM {SCHEMA}.accounts")
        count = int(cur.fetchone()[0])
        if count == 0 and accounts > 0:
            cur.execute(SEED, (accounts,))
            count = accounts
    conn.commit()
    return count


def setup_conninfo(conninfo: str, *, accounts: int = 1000, reset: bool = False) -> int:
    """:func:`setup` over a fresh psycopg connection (pool settings in it are ignored)."""
    import psycopg

    from greenpool.conninfo import split_conninfo

    with psycopg.connect(split_conninfo(conninfo).conninfo, connect_timeout=10) as conn:
        return setup(conn, accounts=accounts, reset=reset)


def main(argv: list[str] | None = None) -> int:
    """Command line: create (or with --reset re-create) the example schema."""
    parser = argparse.ArgumentParser(prog="python -m examples.flask_app.schema")
    parser.add_argument("--conninfo", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--accounts", type=int, default=1000, help="accounts to seed")
    parser.add_argument("--reset", action="store_true", help="drop the schema first")
    args = parser.parse_args(argv)
    count = setup_conninfo(args.conninfo, accounts=args.accounts, reset=args.reset)
    print(f"schema {SCHEMA} ready: {count} accounts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
