"""greenpool.embedded: the throwaway server of the demo and benchmarks, and its auth.

No ``trust``: an unprivileged local account must not get in as superuser, neither to
the suite's cluster nor to the demo's (a reviewer once ran ``COPY ... FROM PROGRAM``
through the old ``host all postgres 127.0.0.1/32 trust`` line).
"""

from __future__ import annotations

import base64
import os
import pwd
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from greenpool import demo
from greenpool.embedded import EmbeddedPostgres, find_pg_bindir, make_conninfo, scram_secret
from tests.support.pgcluster import APP_PASSWORD, APP_USER, PgCluster


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(max_connections=20) as pg:
        yield pg


def test_dsn_names_a_private_passfile_never_the_password(embedded: EmbeddedPostgres) -> None:
    params = conninfo_to_dict(embedded.dsn())
    assert "password" not in params
    assert params["host"] == "127.0.0.1" and params["user"] == "postgres"
    passfile = Path(str(params["passfile"]))
    assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
    assert passfile.stat().st_uid == os.geteuid()
    with psycopg.connect(embedded.dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT current_user, current_setting('listen_addresses')").fetchone()
    assert row == ("postgres", "127.0.0.1")
    # the password is in no file the server's account wrote for initdb, nor in the repr
    assert not (embedded.base_dir / "initdb.pw").exists()
    assert embedded._password not in repr(embedded)
    assert stat.S_IMODE(embedded.socket_dir.stat().st_mode) == 0o700


def test_no_trust_and_no_password_means_no_entry(embedded: EmbeddedPostgres) -> None:
    with psycopg.connect(embedded.dsn(), autocommit=True) as conn:
        methods = conn.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules").fetchall()
    assert methods == [("scram-sha-256",)]
    no_passfile = embedded.dsn(passfile="/nonexistent", connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(no_passfile)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(embedded.dsn(password="guess", connect_timeout=5))


def test_stop_start_keeps_port_and_destroy_removes_everything() -> None:
    pg = EmbeddedPostgres(max_connections=10)
    try:
        pg.start()
        port, base = pg.port, pg.base_dir
        pg.stop()
        assert not pg.is_running()
        pg.start()
        assert pg.port == port
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pg.destroy()
    assert not base.exists() and not pg.is_running()
    pg.destroy()  # idempotent


def test_make_conninfo_quotes_what_libpq_needs() -> None:
    for value in ["plain", "with space", "it's", "back\\slash", ""]:
        text = make_conninfo({"host": "h", "password": value, "skipped": None})
        assert conninfo_to_dict(text) == {"host": "h", "password": value}


# --------------------------------------------------------------------------- intruder


def _intruder(server_user: str | None) -> pwd.struct_passwd:
    """An unprivileged local account other than the server's."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another (unprivileged) local user")
    for name in ("nobody", "daemon"):
        if name != server_user:
            try:
                return pwd.getpwnam(name)
            except KeyError:
                continue
    pytest.skip("no unprivileged account other than the server's")


def _psql_as(
    account: pwd.struct_passwd, bindir: Path, conninfo: str, sql: str, **env: str
) -> subprocess.CompletedProcess[str]:
    psql = bindir / "psql"
    if not os.access(psql, os.X_OK):
        psql = find_pg_bindir() / "psql"
    return subprocess.run(
        [str(psql), "-w", "-X", "-A", "-t", "-d", conninfo, "-c", sql],
        capture_output=True,
        text=True,
        timeout=30,
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "HOME": account.pw_dir, "LC_ALL": "C", **env},
    )


def _assert_locked_out(account: pwd.struct_passwd, bindir: Path, dsn: str) -> None:
    params = conninfo_to_dict(dsn)
    tcp = make_conninfo(
        {"host": "127.0.0.1", "port": params["port"], "user": "postgres", "dbname": "postgres"}
    )
    attempts = {
        "tcp, no password": (tcp, {}),
        "tcp, the owner's passfile": (tcp, {"PGPASSFILE": str(params["passfile"])}),
        "passfile in the dsn": (dsn, {}),
        "unix socket": (
            make_conninfo({"host": str(Path(str(params["passfile"])).parent / "sock"),
                           "port": params["port"], "user": "postgres", "dbname": "postgres"}),
            {},
        ),
    }  # fmt: skip
    for what, (conninfo, env) in attempts.items():
        result = _psql_as(account, bindir, conninfo, "COPY (SELECT 1) TO PROGRAM 'true'", **env)
        assert result.returncode != 0, f"{what}: {account.pw_name} got in as superuser"
        assert "no password supplied" in result.stderr or "Permission denied" in result.stderr, (
            f"{what}: {result.stderr}"
        )


def test_unprivileged_user_cannot_be_superuser_on_the_test_cluster(
    pg_cluster: PgCluster | None,
) -> None:
    if pg_cluster is None:
        pytest.skip("GREENPOOL_TEST_DSN names an external server")
    account = _intruder(pg_cluster.run_as)
    # control: the same account does reach the server when it has a password
    ok = _psql_as(
        account,
        pg_cluster.bindir,
        make_conninfo({"host": "127.0.0.1", "port": pg_cluster.port, "user": APP_USER,
                       "dbname": "postgres"}),
        "SELECT current_user",
        PGPASSWORD=APP_PASSWORD,
    )  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.strip() == APP_USER, ok.stderr
    _assert_locked_out(account, pg_cluster.bindir, pg_cluster.admin_dsn)


def test_unprivileged_user_cannot_be_superuser_on_the_demo_cluster() -> None:
    with demo.embedded_postgres() as dsn:
        data_dir = Path(str(conninfo_to_dict(dsn)["passfile"])).parent / "data"
        account = _intruder(pwd.getpwuid(data_dir.stat().st_uid).pw_name)
        with psycopg.connect(dsn, autocommit=True) as conn:  # the owner does get in
            row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            assert row.fetchone() == (True,)
        _assert_locked_out(account, find_pg_bindir(), dsn)


def test_scram_secret_matches_postgresql(embedded: EmbeddedPostgres) -> None:
    """The verifier we hand initdb is computed exactly as PostgreSQL computes its own."""
    with psycopg.connect(embedded.dsn(), autocommit=True) as conn:
        conn.execute("CREATE ROLE gp_scram_probe PASSWORD 'pr0be-pw'")
        try:
            row = conn.execute(
                "SELECT rolpassword FROM pg_authid WHERE rolname = 'gp_scram_probe'"
            ).fetchone()
        finally:
            conn.execute("DROP ROLE gp_scram_probe")
    assert row is not None
    theirs: str = row[0]
    iterations, salt = theirs.split("$")[1].split(":")
    assert scram_secret("pr0be-pw", int(iterations), base64.b64decode(salt)) == theirs
