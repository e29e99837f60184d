"""``greenpool budget``: the arithmetic, and the limits read from the real server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from greenpool.budget import Budget, ServerLimits, fetch_limits
from greenpool.cli import main
from tests.support.pgcluster import PW_USER, PgCluster
from tests.support.server import Server


def test_arithmetic() -> None:
    limits = ServerLimits(max_connections=100, superuser_reserved_connections=3)
    fits = Budget(instances=2, workers=4, max_size=10, reserved=5, limits=limits)
    assert (limits.available, fits.app_connections, fits.needed) == (97, 80, 85)
    assert fits.fits and fits.spare == 12
    assert "yes: 85 <= 97, 12 connection(s) to spare" in fits.explain()

    over = Budget(instances=2, workers=8, max_size=10, reserved=5, limits=limits)
    assert not over.fits and over.spare == -68
    assert over.max_size_that_fits() == 5  # (97 - 5) // 16
    assert "no: 165 > 97, 68 connection(s) short; max_size 5 would fit" in over.explain()


def test_pg16_reserved_connections_count() -> None:
    limits = ServerLimits(100, superuser_reserved_connections=3, reserved_connections=7)
    assert limits.available == 90
    assert Budget(1, 9, 10, 0, limits).fits
    assert not Budget(1, 9, 10, 1, limits).fits


def test_fetch_limits_from_the_server(dsn: str, pg_cluster: PgCluster | None) -> None:
    limits = fetch_limits(dsn)
    assert limits.max_connections >= 1
    assert limits.superuser_reserved_connections >= 0
    assert limits.server_version
    assert limits.client_connections is not None and limits.client_connections >= 1
    if pg_cluster is not None:
        assert limits.max_connections == 100  # PgCluster's default


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["budget", *argv])
    return code, capsys.readouterr().out


def test_cli_yes_and_no_against_the_server(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    available = fetch_limits(dsn).available
    code, out = _run(capsys, "--conninfo", dsn, "--workers", "1", "--max-size", "1")
    assert code == 0
    assert any(
        line.startswith("= available to ordinary roles") and line.split()[-1] == str(available)
        for line in out.splitlines()
    )
    assert "yes:" in out and "max_connections" in out

    too_many = str(available + 1)
    code, out = _run(
        capsys, "--conninfo", dsn, "--workers", too_many, "--max-size", "1", "--reserved", "0"
    )
    assert code == 1
    assert f"no: {too_many} > {available}" in out

    code, out = _run(
        capsys, "--conninfo", dsn, "--workers", "2", "--max-size", "3", "--instances", "2", "--json"
    )
    assert code == 0
    data = json.loads(out)
    assert data["needed"] == 12 and data["available"] == available and data["fits"] is True


def test_cli_uses_database_url(
    dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", dsn)
    code, out = _run(capsys, "--workers", "1", "--max-size", "2")
    assert code == 0 and "PostgreSQL" in out


def test_cli_offline(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(
        capsys, "--max-connections", "50", "--workers", "4", "--max-size", "12", "--reserved", "2"
    )
    assert code == 1
    assert "no: 50 > 47" in out


def test_cli_connection_error_hides_the_password(
    cluster: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "wrong-secret-77"
    url = f"postgresql://{PW_USER}:{secret}@{cluster.host}:{cluster.port}/postgres"
    code, out = _run(capsys, "--conninfo", url, "--workers", "1", "--max-size", "1")
    assert code == 2
    assert "cannot read the server's limits" in out
    assert secret not in out


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["budget", "--workers", "0", "--max-size", "1", "--max-connections", "10"])
    assert info.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "soon"])
def test_cli_timeout_must_be_a_finite_positive_number(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A usage error (2), not "does not fit" (1), and never a traceback."""
    with pytest.raises(SystemExit) as info:
        main(["budget", "--workers", "1", "--max-size", "1", f"--timeout={value}"])
    assert info.value.code == 2
    assert "argument --timeout" in capsys.readouterr().err


def test_cli_warns_about_a_password_on_the_command_line(
    dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "Sup3r-S3cret-budget"
    url = f"postgresql://someone:{secret}@127.0.0.1:1/db"
    code = main(["budget", "--conninfo", url, "--workers", "1", "--max-size", "1"])
    captured = capsys.readouterr()
    assert code == 2  # nothing listens on port 1
    assert "--conninfo holds a password" in captured.err and "DATABASE_URL" in captured.err
    assert secret not in captured.out + captured.err
    # the same server in DATABASE_URL, or --conninfo without a password: no warning
    monkeypatch.setenv("DATABASE_URL", url)
    assert main(["budget", "--workers", "1", "--max-size", "1"]) == 2
    assert main(["budget", "--conninfo", dsn, "--workers", "1", "--max-size", "1"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_cli_help_prefers_database_url(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["budget", "--help"])
    assert "prefer DATABASE_URL" in " ".join(capsys.readouterr().out.split())


def test_pgbouncer_budget_against_a_real_pgbouncer(
    make_pgbouncer: Any, dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Behind PgBouncer the app's connections must fit max_client_conn, and PgBouncer's
    server pool the server."""
    bouncer = make_pgbouncer(pool_mode="transaction", default_pool_size=4, max_client_conn=50)
    admin = bouncer.dsn(dbname="pgbouncer")
    code, out = _run(
        capsys, "--conninfo", dsn, "--pgbouncer", admin, "--workers", "4", "--max-size", "10"
    )
    assert code == 0, out  # 40 clients <= 50; 4 server connections fit the server
    assert "PgBouncer max_client_conn x instances" in out and "clients: fit" in out
    code, out = _run(
        capsys, "--conninfo", dsn, "--pgbouncer", admin,
        "--workers", "4", "--max-size", "10", "--instances", "2",
    )  # fmt: skip
    assert code == 1, out  # 80 clients > 50
    assert "max_size 6 would fit" not in out and "client slots" in out
    code, out = _run(
        capsys, "--workers", "2", "--max-size", "10", "--max-connections", "20",
        "--max-client-conn", "100", "--default-pool-size", "30",
    )  # fmt: skip
    assert code == 1 and "needed at peak" in out, out  # 30 server connections > 17


def test_replicas_each_get_a_budget_and_the_monitor_counts() -> None:
    """Each replica's pools (their own max_size) and the lag monitor's connection (one to
    the primary, one per replica, per worker) are counted; every server must fit."""
    from greenpool.budget import ReplicaServer

    primary = ServerLimits(max_connections=100, superuser_reserved_connections=3)
    small = ReplicaServer(ServerLimits(40, 3), max_size=4)
    big = ReplicaServer(ServerLimits(200, 3), max_size=10)
    budget = Budget(2, 4, 10, 0, primary, replicas=[small, big])
    assert budget.app_connections == 2 * 4 * (10 + 1)  # 88 <= 97
    assert budget.replica_connections(small) == 40 and budget.replica_spare(small) == -3
    assert budget.replica_connections(big) == 88 and budget.replica_spare(big) == 109
    assert budget.total_connections == 88 + 40 + 88
    assert not budget.fits  # the small replica is short
    assert budget.replica_max_size_that_fits(small) == 3  # 37 // 8 - 1
    assert budget.max_size_that_fits() == 11  # 97 // 8 - 1
    text = budget.explain()
    assert "replica 0:" in text and "no: 40 > 37, 3 connection(s) short" in text
    assert "replica max_size 3 would fit" in text
    assert "all servers: 216 app connection(s) at peak; NOT every server fits" in text
    data = budget.as_dict()
    assert data["total_connections"] == 216 and data["fits"] is False
    assert [r["fits"] for r in data["replicas"]] == [False, True]
    assert Budget(2, 4, 10, 0, primary, replicas=[big]).fits


def test_cli_replicas_read_from_each_server(
    dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--replica (and $GREENPOOL_REPLICAS, with a max_size per replica) reads each
    replica's limits from the server itself."""
    available = fetch_limits(dsn).available
    code, out = _run(
        capsys, "--conninfo", dsn, "--replica", dsn, "--workers", "2", "--max-size", "3",
        "--replica-max-size", "5", "--json",
    )  # fmt: skip
    data = json.loads(out)
    assert code == 0, out
    assert data["app_connections"] == 2 * (3 + 1)
    (replica,) = data["replicas"]
    assert replica["limits"]["available"] == available and replica["needed"] == 2 * (5 + 1)
    monkeypatch.setenv("GREENPOOL_REPLICAS", json.dumps([{"conninfo": dsn, "max_size": 7}, dsn]))
    code, out = _run(capsys, "--conninfo", dsn, "--workers", "1", "--max-size", "2", "--json")
    assert code == 0, out
    assert [r["needed"] for r in json.loads(out)["replicas"]] == [8, 3]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[not json", "GREENPOOL_REPLICAS: not a JSON list"),
        ('[{"conninfo": "host=x", "max_size": 0}]', "GREENPOOL_REPLICAS[0].max_size"),
        ("[42]", "GREENPOOL_REPLICAS[0]: expected a conninfo"),
        ('["host=/nonexistent-dir port=1"]', "replica 0: cannot read the server's limits"),
    ],
)
def test_cli_bad_replicas_are_named(
    value: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GREENPOOL_REPLICAS", value)
    code, out = _run(capsys, "--max-connections", "50", "--workers", "1", "--max-size", "1")
    assert code == 2 and message in out, out


def test_cli_replicas_offline_and_their_password_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = _run(
        capsys, "--max-connections", "100", "--workers", "4", "--max-size", "10",
        "--replica-max-connections", "30", "--replica-max-connections", "60",
    )  # fmt: skip
    assert code == 1, out  # 4 x (10 + 1) = 44 > 27 on the first replica
    assert "no: 44 > 27" in out and "yes: 44 <= 57" in out
    code = main(
        ["budget", "--max-connections", "100", "--workers", "1", "--max-size", "1",
         "--replica", "host=/nonexistent-dir password=hunter2-secret"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    assert "--replica holds a password" in captured.err and "GREENPOOL_REPLICAS" in captured.err
    assert "hunter2-secret" not in captured.out + captured.err
