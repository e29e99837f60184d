"""Migrate the example's database and seed its accounts (tests and benchmarks use it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

ACCOUNTS = 400
REPO = Path(__file__).resolve().parents[2]


def migrate_and_seed(dsn: str) -> None:
    """``manage.py migrate`` (a management command, in a process gevent never patched),
    then 400 accounts with 1000 each."""
    env = {**os.environ, "DATABASE_URL": dsn, "GP_DJANGO_NAME": "migrate"}
    env["PYTHONPATH"] = str(REPO)
    subprocess.run(
        [sys.executable, "-m", "examples.django_app.manage", "migrate", "-v", "0"],
        env=env, check=True, timeout=120, cwd=str(REPO),
    )  # fmt: skip
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Ids 1..ACCOUNTS, whatever other tests left (rolled-back inserts leave gaps).
        conn.execute(
            "INSERT INTO bank_account (id, owner, balance) "
            "SELECT n, 'user' || n, 1000 FROM generate_series(1, %s) n "
            "ON CONFLICT (id) DO NOTHING",
            (ACCOUNTS,),
        )
        conn.execute(
            "SELECT setval(pg_get_serial_sequence('bank_account', 'id'), "
            "(SELECT max(id) FROM bank_account))"
        )
