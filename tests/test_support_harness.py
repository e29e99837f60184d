"""Tests for the test-support harness: PgCluster and FaultProxy.

Expects ``gevent.monkey.patch_all()`` to have run before psycopg was imported
(the project's conftest does that), so that psycopg waits cooperatively and
the in-process FaultProxy greenlets can run while a client is blocked.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import psycopg
import pytest
from gevent.server import StreamServer

from greenpool import embedded
from tests.support import pgcluster
from tests.support.faultproxy import FaultProxy
from tests.support.hygiene import outcome
from tests.support.pgcluster import (
    APP_PASSWORD,
    APP_USER,
    PW_PASSWORD,
    PW_USER,
    SUPERUSER,
    PgBinariesNotFoundError,
    PgCluster,
)
from tests.support.waiting import wait_for

APP = "harness-test"


# These tests make, stop and restart clusters of their own.
pytestmark = pytest.mark.needs_restart


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    """This module's own cluster (it stops and restarts it), shadowing the
    conftest's session cluster on purpose."""
    with PgCluster() as pg:
        yield pg


@pytest.fixture
def proxy(cluster: PgCluster) -> Iterator[FaultProxy]:
    with FaultProxy(cluster.host, cluster.port) as fp:
        yield fp


def _proxied_dsn(cluster: PgCluster, proxy: FaultProxy, **extra: Any) -> str:
    return cluster.dsn(
        APP_USER,
        APP_PASSWORD,
        host=proxy.host,
        port=proxy.port,
        application_name=APP,
        connect_timeout=5,
        sslmode="disable",
        **extra,
    )


def _select_one(conn: psycopg.Connection[tuple[object, ...]]) -> object:
    row = conn.execute("SELECT 1").fetchone()
    assert row is not None
    return row[0]


# --------------------------------------------------------------------------
# PgCluster
# --------------------------------------------------------------------------


def test_cluster_basics(cluster: PgCluster) -> None:
    assert cluster.is_running()
    assert cluster.host == "127.0.0.1"
    assert "host=127.0.0.1" in cluster.admin_dsn
    assert cluster.log_path.parent == cluster.base_dir
    with psycopg.connect(cluster.admin_dsn) as conn:
        row = conn.execute("SELECT current_user, inet_server_addr()::text").fetchone()
        assert row is not None
        assert row[0] == SUPERUSER
        assert row[1].startswith("127.0.0.1")
    settings = dict(
        cluster.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
            (["max_connections", "fsync", "listen_addresses", "port"],),
        )
    )
    assert settings == {
        "max_connections": "100",
        "fsync": "off",
        "listen_addresses": "127.0.0.1",
        "port": str(cluster.port),
    }
    assert cluster.execute("CREATE TEMP TABLE t (x int)") == []


def test_password_roles(cluster: PgCluster) -> None:
    for user, password in ((PW_USER, PW_PASSWORD), (APP_USER, APP_PASSWORD)):
        with psycopg.connect(cluster.dsn(user, password)) as conn:
            row = conn.execute("SELECT current_user").fetchone()
            assert row == (user,)


def test_wrong_password_fails(cluster: PgCluster) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(cluster.dsn(PW_USER, "wrong-password"))
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(cluster.dsn(PW_USER))  # none supplied


def test_backend_count_and_terminate(cluster: PgCluster) -> None:
    app = "harness-count"
    assert cluster.backend_count(app) == 0
    conns = [
        psycopg.connect(cluster.dsn(APP_USER, APP_PASSWORD, application_name=app)) for _ in range(3)
    ]
    try:
        assert cluster.backend_count(app) == 3
        assert cluster.backend_count() >= 3
        assert cluster.terminate_backends(app) == 3
        assert cluster.backend_count(app) == 0
        with pytest.raises(psycopg.OperationalError):
            conns[0].execute("SELECT 1")
    finally:
        for conn in conns:
            conn.close()


def test_active_queries(cluster: PgCluster) -> None:
    app = "harness-active"
    conn = psycopg.connect(cluster.dsn(APP_USER, APP_PASSWORD, application_name=app))
    try:
        sleeper = gevent.spawn(outcome, conn.execute, "SELECT pg_sleep(30)")
        wait_for(lambda: len(cluster.active_queries(app)) == 1)
        (active,) = cluster.active_queries(app)
        assert "pg_sleep" in active.query
        assert active.application_name == app
        assert cluster.terminate_backends(app) == 1
        assert isinstance(sleeper.get(timeout=5), psycopg.OperationalError)
        assert cluster.active_queries(app) == []
    finally:
        conn.close()


def test_stop_start_keeps_port(cluster: PgCluster) -> None:
    port = cluster.port
    cluster.stop()
    assert not cluster.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(cluster.admin_dsn, connect_timeout=2)
    cluster.start()
    assert cluster.is_running()
    assert cluster.port == port
    cluster.restart()
    assert cluster.port == port
    with psycopg.connect(cluster.dsn(PW_USER, PW_PASSWORD)) as conn:  # roles survive
        assert _select_one(conn) == 1


def test_context_manager_destroys() -> None:
    with PgCluster() as pg:
        base = pg.base_dir
        assert pg.is_running()
    assert not pg.is_running()
    assert not base.exists()
    pg.destroy()  # idempotent


def test_missing_binaries_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(embedded.BINDIR_ENV, raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(
        embedded.binaries, "_DEBIAN_BINDIR_GLOB", str(tmp_path / "none" / "*" / "bin")
    )
    monkeypatch.setattr(embedded.binaries, "_PGSERVER_PACKAGE", "no_such_pgserver_pkg")
    with pytest.raises(PgBinariesNotFoundError, match="pip install pgserver"):
        embedded.find_pg_bindir()
    with pytest.raises(PgBinariesNotFoundError):
        embedded.find_pg_bindir(tmp_path)


def test_pgserver_layout_discovery(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A fake installed `pgserver` package with the wheel's layout.
    package = tmp_path / "fake_pgserver_pkg"
    bindir = package / "pginstall" / "bin"
    bindir.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    for name in ("initdb", "pg_ctl", "postgres"):
        exe = bindir / name
        exe.write_text("#!/bin/sh\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.delenv(embedded.BINDIR_ENV, raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(
        embedded.binaries, "_DEBIAN_BINDIR_GLOB", str(tmp_path / "none" / "*" / "bin")
    )
    monkeypatch.setattr(embedded.binaries, "_PGSERVER_PACKAGE", "fake_pgserver_pkg")
    assert embedded.find_pg_bindir() == bindir
    assert "fake_pgserver_pkg" not in sys.modules
    monkeypatch.setenv(embedded.BINDIR_ENV, str(bindir))
    assert embedded.find_pg_bindir() == bindir


# --------------------------------------------------------------------------
# FaultProxy
# --------------------------------------------------------------------------


def test_proxy_forwards(cluster: PgCluster, proxy: FaultProxy) -> None:
    assert proxy.host == "127.0.0.1"
    assert proxy.port not in (0, cluster.port)
    with psycopg.connect(_proxied_dsn(cluster, proxy)) as conn:
        row = conn.execute("SELECT current_user, repeat('x', 200000)").fetchone()
        assert row is not None
        assert row[0] == APP_USER
        assert len(row[1]) == 200000
        assert proxy.connection_count == 1
        assert proxy.total_connections == 1
        assert cluster.backend_count(APP) == 1
    wait_for(lambda: proxy.connection_count == 0)
    assert proxy.total_connections == 1


def test_proxy_latency(cluster: PgCluster, proxy: FaultProxy) -> None:
    with psycopg.connect(_proxied_dsn(cluster, proxy)) as conn:
        t0 = time.monotonic()
        _select_one(conn)
        base = time.monotonic() - t0
        proxy.set_latency(0.2)
        t0 = time.monotonic()
        _select_one(conn)
        slow = time.monotonic() - t0
        assert 0.4 <= slow < 3.0, slow  # 0.2 s each way
        proxy.set_latency(0)
        t0 = time.monotonic()
        _select_one(conn)
        assert time.monotonic() - t0 < base + 0.2


def test_proxy_latency_preserves_order(cluster: PgCluster, proxy: FaultProxy) -> None:
    proxy.set_latency(0.05)
    with psycopg.connect(_proxied_dsn(cluster, proxy)) as conn:
        proxy.set_latency(0.01)  # later chunks must not overtake earlier ones
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int", (i,)) for i in range(20)]
        assert [c.fetchone() for c in curs] == [(i,) for i in range(20)]


@pytest.fixture
def echo_server() -> Iterator[StreamServer]:
    def echo(sock: socket.socket, _addr: object) -> None:
        while data := sock.recv(65536):
            sock.sendall(data)

    server = StreamServer(("127.0.0.1", 0), echo)
    server.start()
    yield server
    server.stop(timeout=1)


def test_proxy_raw_latency_order_and_half_close(echo_server: StreamServer) -> None:
    with FaultProxy("127.0.0.1", echo_server.server_port) as fp:
        with socket.create_connection((fp.host, fp.port), timeout=5) as sock:
            t0 = time.monotonic()
            fp.set_latency(0.3)
            sock.sendall(b"first;")
            gevent.sleep(0.05)  # let the proxy read it (latency is sampled on read)
            fp.set_latency(0.0)  # a later, faster chunk must not overtake it
            sock.sendall(b"second;")
            gevent.sleep(0.05)
            sock.shutdown(socket.SHUT_WR)  # half-close is propagated...
            received = b""
            while chunk := sock.recv(65536):  # ...and so is the echo's EOF
                received += chunk
            elapsed = time.monotonic() - t0
        assert received == b"first;second;"
        assert 0.3 <= elapsed < 2.0, elapsed
        wait_for(lambda: fp.connection_count == 0)


def test_proxy_blackhole(cluster: PgCluster, proxy: FaultProxy) -> None:
    conn = psycopg.connect(_proxied_dsn(cluster, proxy))
    try:
        proxy.blackhole()
        with pytest.raises(gevent.Timeout), gevent.Timeout(1):
            conn.execute("SELECT 1")
        assert proxy.connection_count == 1  # socket kept open
        # new connections are accepted but black-holed as well
        with pytest.raises(gevent.Timeout), gevent.Timeout(1):
            psycopg.connect(_proxied_dsn(cluster, proxy))
        assert proxy.total_connections == 2
        assert cluster.backend_count(APP) == 1  # nothing reached the server
    finally:
        conn.close()
    proxy.heal()
    with psycopg.connect(_proxied_dsn(cluster, proxy)) as conn2:
        assert _select_one(conn2) == 1


def test_proxy_blackhole_holds_data_until_heal(cluster: PgCluster, proxy: FaultProxy) -> None:
    with psycopg.connect(_proxied_dsn(cluster, proxy)) as conn:
        proxy.blackhole()
        heal = gevent.spawn_later(0.3, proxy.heal)
        t0 = time.monotonic()
        assert _select_one(conn) == 1  # delivered after heal, stream intact
        assert time.monotonic() - t0 >= 0.25
        heal.join()


def test_proxy_reset_all(cluster: PgCluster, proxy: FaultProxy) -> None:
    conn = psycopg.connect(_proxied_dsn(cluster, proxy))
    try:
        assert _select_one(conn) == 1
        assert proxy.reset_all() == 1
        assert proxy.connection_count == 0
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    wait_for(lambda: cluster.backend_count(APP) == 0)
    with psycopg.connect(_proxied_dsn(cluster, proxy)) as conn2:  # not sticky
        assert _select_one(conn2) == 1


def test_proxy_refuse(cluster: PgCluster, proxy: FaultProxy) -> None:
    port = proxy.port
    proxy.refuse(True)
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(_proxied_dsn(cluster, proxy))
    assert time.monotonic() - t0 < 2.0
    assert proxy.total_connections == 0
    proxy.refuse(False)
    assert proxy.port == port
    with psycopg.connect(_proxied_dsn(cluster, proxy)) as conn:
        assert _select_one(conn) == 1


def test_proxy_heal_restores_everything(cluster: PgCluster, proxy: FaultProxy) -> None:
    proxy.set_latency(0.5)
    proxy.blackhole()
    proxy.refuse(True)
    proxy.heal()
    assert proxy.latency == 0 and not proxy.is_blackholed and not proxy.is_refusing
    t0 = time.monotonic()
    with psycopg.connect(_proxied_dsn(cluster, proxy)) as conn:
        assert _select_one(conn) == 1
    assert time.monotonic() - t0 < 1.0


def test_proxy_upstream_down(cluster: PgCluster) -> None:
    with FaultProxy(cluster.host, pgcluster._free_port()) as fp:
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(_proxied_dsn(cluster, fp))
        assert time.monotonic() - t0 < 2.0
        wait_for(lambda: fp.connection_count == 0)


def test_proxy_stop_kills_everything(cluster: PgCluster) -> None:
    fp = FaultProxy(cluster.host, cluster.port)
    fp.start()
    conn = psycopg.connect(_proxied_dsn(cluster, fp))
    try:
        fp.set_latency(0.01)
        assert _select_one(conn) == 1
        assert fp.greenlet_count > 0
        fp.stop()
        assert fp.greenlet_count == 0
        assert fp.connection_count == 0
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(_proxied_dsn(cluster, fp))
    finally:
        conn.close()
        fp.stop()


def test_fd_hygiene(cluster: PgCluster) -> None:
    """Repeated proxy use does not leak sockets."""
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with FaultProxy(cluster.host, cluster.port) as fp:
            for _ in range(3):
                with psycopg.connect(_proxied_dsn(cluster, fp)) as conn:
                    _select_one(conn)
            fp.reset_all()
    assert len(os.listdir("/proc/self/fd")) <= before + 2
