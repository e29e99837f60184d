"""Tests of the scale-out harness: a streaming hot standby and PgBouncer.

Later work tests failover, read replicas and transaction pooling on top of these, so
the harness itself must do what it says: replication really streams, promotion really
makes a writable primary, a paused replay really lags, PgBouncer really multiplexes.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import psycopg
import pytest
from psycopg import errors

from tests.support.pgbouncer import PgBouncer, PgBouncerError, find_pgbouncer, require_pgbouncer
from tests.support.pgcluster import APP_PASSWORD, APP_USER, PW_USER, PgCluster
from tests.support.standby import PgStandby, is_read_only, set_read_only


def _table() -> str:
    return f"scaleout_{uuid.uuid4().hex[:10]}"


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = gevent.get_hub().loop.now() + timeout
    while not predicate():
        if gevent.get_hub().loop.now() >= deadline:
            return predicate()
        gevent.sleep(0.02)
    return True


# --------------------------------------------------------------------------- standby


def test_standby_replays_a_write(standby_pair: tuple[PgCluster, PgStandby]) -> None:
    primary, standby = standby_pair
    assert standby.port != primary.port and standby.base_dir != primary.base_dir
    assert standby.run_as == primary.run_as
    assert (
        standby.is_in_recovery() and not standby.primary.execute("SELECT pg_is_in_recovery()")[0][0]
    )
    streaming = primary.execute(
        "SELECT application_name, state FROM pg_stat_replication WHERE application_name = %s",
        (standby.name,),
    )
    assert streaming == [(standby.name, "streaming")]

    table = _table()
    primary.execute(f"CREATE TABLE {table} (v text)")
    primary.execute(f"INSERT INTO {table} VALUES ('from the primary')")
    lag = standby.wait_caught_up(timeout=10)
    assert standby.execute(f"SELECT v FROM {table}") == [("from the primary",)]
    assert lag.replay_lsn is not None and not lag.paused
    with pytest.raises(errors.ReadOnlySqlTransaction):
        standby.execute(f"INSERT INTO {table} VALUES ('on the standby')")
    # the standby's primary_conninfo names a passfile, never the password
    auto_conf = (standby.data_dir / "postgresql.auto.conf").read_text()
    assert "passfile=" in auto_conf and "password=" not in auto_conf


def test_promote_makes_it_writable(standby_pair: tuple[PgCluster, PgStandby]) -> None:
    primary, standby = standby_pair
    table = _table()
    primary.execute(f"CREATE TABLE {table} (v int)")
    standby.wait_caught_up(timeout=10)
    standby.promote()
    assert not standby.is_in_recovery()
    standby.execute(f"INSERT INTO {table} VALUES (1)")
    assert standby.execute(f"SELECT count(*) FROM {table}") == [(1,)]
    assert primary.execute(f"SELECT count(*) FROM {table}") == [(0,)]  # diverged for real
    assert _wait_for(lambda: not primary.execute(
        "SELECT 1 FROM pg_stat_replication WHERE application_name = %s", (standby.name,)
    ))  # fmt: skip


def test_replay_pause_lags_measurably_and_resume_catches_up(
    standby_pair: tuple[PgCluster, PgStandby],
) -> None:
    primary, standby = standby_pair
    table = _table()
    primary.execute(f"CREATE TABLE {table} (v int)")
    standby.wait_caught_up(timeout=10)

    standby.pause_replay()
    primary.execute(f"INSERT INTO {table} SELECT generate_series(1, 5000)")
    # the WAL arrives, but is not applied
    assert _wait_for(lambda: standby.lag().bytes_unreplayed > 0), standby.lag()
    lag = standby.lag()
    assert lag.paused and lag.bytes_behind > 0 and lag.replay_age is not None
    assert standby.execute(f"SELECT count(*) FROM {table}") == [(0,)]

    standby.resume_replay()
    caught_up = standby.wait_caught_up(timeout=10)
    assert not caught_up.paused
    assert standby.execute(f"SELECT count(*) FROM {table}") == [(5000,)]
    assert caught_up.bytes_unreplayed == 0


def test_primary_read_only_toggle(standby_pair: tuple[PgCluster, PgStandby]) -> None:
    primary, standby = standby_pair
    table = _table()
    primary.execute(f"CREATE TABLE {table} (v int)")
    set_read_only(primary)
    try:
        assert primary.is_running() and is_read_only(primary)
        with pytest.raises(errors.ReadOnlySqlTransaction):
            primary.execute(f"INSERT INTO {table} VALUES (1)")
        assert primary.execute(f"SELECT count(*) FROM {table}") == [(0,)]  # reads work
    finally:
        set_read_only(primary, False)
    assert not is_read_only(primary)
    primary.execute(f"INSERT INTO {table} VALUES (1)")
    standby.wait_caught_up(timeout=10)
    assert standby.execute(f"SELECT count(*) FROM {table}") == [(1,)]


# --------------------------------------------------------------------------- pgbouncer


def _app_conn(bouncer: PgBouncer, **extra: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(
        bouncer.dsn(APP_USER, APP_PASSWORD, connect_timeout=5, **extra),
        autocommit=True,
        prepare_threshold=None,  # transaction pooling: no server-side prepared statements
    )


def test_pgbouncer_transaction_mode_shares_two_server_connections_among_20_clients(
    make_pgbouncer: Callable[..., PgBouncer],
) -> None:
    bouncer = make_pgbouncer(pool_mode="transaction", default_pool_size=2)
    assert bouncer.host == "127.0.0.1"
    pids: set[int] = set()

    def client() -> int:
        with _app_conn(bouncer) as conn:
            for _ in range(3):
                row = conn.execute("SELECT pg_backend_pid(), pg_sleep(0.03)").fetchone()
                assert row is not None
                pids.add(row[0])
        return 1

    jobs = [gevent.spawn(client) for _ in range(20)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert sum(job.value for job in jobs) == 20
    assert 1 <= len(pids) <= 2, pids
    pool = bouncer.pool("postgres", APP_USER)
    assert pool["pool_mode"] == "transaction"
    assert pool["sv_active"] + pool["sv_idle"] + pool["sv_used"] <= 2, pool
    stats = {row["database"]: row for row in bouncer.show("STATS")}
    assert stats["postgres"]["total_xact_count"] >= 60


def test_pgbouncer_session_mode_and_settings(make_pgbouncer: Callable[..., PgBouncer]) -> None:
    bouncer = make_pgbouncer(pool_mode="session", default_pool_size=3, max_client_conn=7)
    config = {row["key"]: row["value"] for row in bouncer.show("CONFIG")}
    assert (config["pool_mode"], config["default_pool_size"], config["max_client_conn"]) == (
        "session", "3", "7",
    )  # fmt: skip
    with _app_conn(bouncer) as first, _app_conn(bouncer) as second:
        pid = first.execute("SELECT pg_backend_pid()").fetchone()
        assert pid == first.execute("SELECT pg_backend_pid()").fetchone()  # pinned
        assert pid != second.execute("SELECT pg_backend_pid()").fetchone()
    bouncer.configure(default_pool_size=5)  # RELOAD
    config = {row["key"]: row["value"] for row in bouncer.show("CONFIG")}
    assert config["default_pool_size"] == "5"


def test_pgbouncer_pause_and_resume(make_pgbouncer: Callable[..., PgBouncer]) -> None:
    bouncer = make_pgbouncer(pool_mode="transaction", default_pool_size=2)
    with _app_conn(bouncer) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        bouncer.pause()
        try:
            query = gevent.spawn(lambda: conn.execute("SELECT 2").fetchone())
            assert _wait_for(lambda: bouncer.pool("postgres", APP_USER).get("cl_waiting", 0) >= 1)
            assert not query.ready()
        finally:
            bouncer.resume()
        assert query.get(timeout=10) == (2,)


def test_pgbouncer_restart_keeps_the_port(make_pgbouncer: Callable[..., PgBouncer]) -> None:
    bouncer = make_pgbouncer()
    port = bouncer.port
    bouncer.stop()
    assert not bouncer.is_running()
    with pytest.raises(psycopg.OperationalError):
        _app_conn(bouncer)
    bouncer.start()
    bouncer.restart()
    assert bouncer.port == port and bouncer.is_running()
    with _app_conn(bouncer) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)


def test_pgbouncer_auth_and_privileges(
    make_pgbouncer: Callable[..., PgBouncer], pg_cluster: PgCluster
) -> None:
    bouncer = make_pgbouncer(auth_type="md5", users=[APP_USER, "postgres"])
    userlist = (bouncer.base_dir / "userlist.txt").read_text()
    assert f'"{APP_USER}" "SCRAM-SHA-256$' in userlist and APP_PASSWORD not in userlist
    assert PW_USER not in userlist
    assert oct((bouncer.base_dir / "userlist.txt").stat().st_mode & 0o777) == "0o600"
    with _app_conn(bouncer) as conn:  # a SCRAM secret serves an md5 auth_type too
        assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(bouncer.dsn(APP_USER, "wrong", connect_timeout=5))
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(bouncer.dsn(PW_USER, "s3cret-pw", connect_timeout=5))  # not listed
    if os.geteuid() == 0:  # PgBouncer refuses root: it runs as the server's account
        assert bouncer.pid is not None and pg_cluster.run_as is not None
        status = Path(f"/proc/{bouncer.pid}/status").read_text()
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        assert uid == pwd.getpwnam(pg_cluster.run_as).pw_uid


def test_pgbouncer_max_prepared_statements_needs_1_21(
    make_pgbouncer: Callable[..., PgBouncer],
) -> None:
    bouncer = make_pgbouncer()  # a working one, for the version
    if bouncer.version >= (1, 21):
        other = make_pgbouncer(max_prepared_statements=50)
        config = {row["key"]: row["value"] for row in other.show("CONFIG")}
        assert config["max_prepared_statements"] == "50"
    else:
        with pytest.raises(PgBouncerError, match=r"needs PgBouncer 1\.21"):
            PgBouncer(bouncer.cluster, max_prepared_statements=50, binary=find_pgbouncer())


# --------------------------------------------------------------------------- cleanup

_OWNER = r"""
import sys
from tests.support.pgbouncer import PgBouncer
from tests.support.pgcluster import PgCluster
from tests.support.standby import PRIMARY_SETTINGS, PgStandby

primary = PgCluster(max_connections=20, extra_settings=PRIMARY_SETTINGS)
primary.start()
standby = PgStandby(primary)
standby.start()
bouncer = PgBouncer(primary)
bouncer.start()
for thing in (primary, standby):
    pid = (thing.data_dir / "postmaster.pid").read_text().split()[0]
    print(pid, thing.base_dir, flush=True)
print(bouncer.pid, bouncer.base_dir, flush=True)
sys.stdin.read()  # until killed
"""


def test_a_killed_owner_leaves_no_server_standby_or_pgbouncer_behind() -> None:
    require_pgbouncer()
    repo = Path(__file__).resolve().parent.parent
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, cwd=repo,
    )  # fmt: skip
    try:
        assert owner.stdout is not None
        started = [owner.stdout.readline().split() for _ in range(3)]
        assert all(len(line) == 2 for line in started), started
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
    pids = [int(pid) for pid, _ in started]
    dirs = [Path(path) for _, path in started]

    def gone() -> bool:
        alive = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.append(pid)
        return not alive and not any(d.exists() for d in dirs)

    assert _wait_for(gone, timeout=30), (pids, dirs)
