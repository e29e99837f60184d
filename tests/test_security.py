"""Security and hygiene: session state between borrowers, secrets, TLS pass-through.

- Reset policies (``reset=None | "client" | "light" | "session" | "discard"``, the default
  being "session"): what one borrower's session leaves behind for the next borrower of the
  same backend (max_size=1, same pid asserted), client-side attributes, buffered
  notifications, settings made by ``configure``, and what each policy costs per release
  (reported to the fault results file).
- Secrets: the password never shows in logs (DEBUG), reprs, stats or error messages
  (tracebacks included), whatever the way it was given and whatever went wrong.
- TLS: ``sslmode`` and friends reach libpq unchanged; ``verify-full`` against a private
  TLS-enabled cluster with a throwaway CA (needs the ``openssl`` command).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from greenpool import ConnectError, GreenPool, PoolError
from tests.support.loadgen import record_result
from tests.support.pgcluster import (
    APP_PASSWORD,
    APP_USER,
    PW_PASSWORD,
    PW_USER,
    PgBinariesNotFoundError,
    PgCluster,
)
from tests.support.sessionprobe import PROBE_FIELDS, probe_sql

Factory = Callable[..., GreenPool]

# --------------------------------------------------------------------------- reset


SESSION_PROBE = probe_sql("pg_temp.gp_lastval_known()")
FIELDS = (*PROBE_FIELDS, "lastval")

# What the next borrower of the same backend sees, per policy ("default": none given).
#            role        tenant      temp   prepared advisory listen cursor lastval
LEAKED = (APP_USER, "tenant-1", True, 1, 1, 1, 1, True)
EXPECTED: dict[str | None, tuple[str, str, bool, int, int, int, int, bool]] = {
    None: LEAKED,
    "client": LEAKED,
    "light": ("postgres", "", True, 1, 0, 0, 0, False),
    "session": ("postgres", "", False, 1, 0, 0, 0, False),
    "discard": ("postgres", "", False, 0, 0, 0, 0, False),
    "default": ("postgres", "", False, 1, 0, 0, 0, False),
}
POLICIES = list(EXPECTED)


def _pool(make_pool: Factory, policy: str | None, **kw: Any) -> GreenPool:
    if policy == "default":
        return make_pool(min_size=1, max_size=1, **kw)
    return make_pool(min_size=1, max_size=1, reset=policy, **kw)


def leave_session_state(conn: psycopg.Connection[Any]) -> int:
    """Everything a borrower can leave on its session; returns the backend pid."""
    conn.execute(f"SET ROLE {APP_USER}")
    conn.execute(
        "CREATE FUNCTION pg_temp.gp_lastval_known() RETURNS bool LANGUAGE plpgsql AS "
        "$$BEGIN PERFORM lastval(); RETURN true; EXCEPTION WHEN others THEN RETURN false; "
        "END$$"
    )
    conn.execute("CREATE TEMP SEQUENCE gp_seq")
    conn.execute("SELECT nextval('gp_seq')")
    conn.execute("CREATE TEMP TABLE gp_private (secret text)")
    conn.execute("INSERT INTO gp_private VALUES ('tenant-1 data')")
    conn.execute("PREPARE gp_stmt AS SELECT secret FROM gp_private")
    conn.execute("SELECT pg_advisory_lock(4242)")
    conn.execute("LISTEN gp_channel")
    conn.execute("DECLARE gp_cursor CURSOR WITH HOLD FOR SELECT 1")
    conn.execute("SET app.tenant = 'tenant-1'")
    return int(conn.info.backend_pid)


@pytest.mark.parametrize("policy", POLICIES, ids=[str(p).lower() for p in POLICIES])
def test_session_state_seen_by_the_next_borrower(make_pool: Factory, policy: str | None) -> None:
    pool = _pool(make_pool, policy)
    with pool.connection() as conn:  # committed: the SETs, LISTEN and cursor persist
        pid = leave_session_state(conn)
    with pool.connection() as conn:
        if EXPECTED[policy][2] is False:  # the temp function went with DISCARD TEMP
            leave_probe_function(conn)
        row = conn.execute(SESSION_PROBE).fetchone()
    assert row is not None
    assert row[0] == pid, "not the same backend: the test proves nothing"
    seen = (row[1], row[2], bool(row[3]), row[4], row[5], row[6], row[7], row[8])
    assert seen == EXPECTED[policy], dict(zip(FIELDS, seen, strict=True))


def leave_probe_function(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "CREATE FUNCTION pg_temp.gp_lastval_known() RETURNS bool LANGUAGE plpgsql AS "
        "$$BEGIN PERFORM lastval(); RETURN true; EXCEPTION WHEN others THEN RETURN false; "
        "END$$"
    )


@pytest.mark.parametrize("policy", POLICIES, ids=[str(p).lower() for p in POLICIES])
def test_client_side_attributes_are_restored_unless_reset_is_none(
    make_pool: Factory, policy: str | None
) -> None:
    """psycopg attributes live in the client, where no server-side reset reaches: the
    pool puts back what the connection had when it was new (None alone keeps them)."""
    from psycopg import IsolationLevel
    from psycopg.rows import dict_row

    pool = _pool(make_pool, policy)
    conn = pool.getconn()
    pid = conn.info.backend_pid
    conn.autocommit = True
    conn.read_only = True
    conn.isolation_level = IsolationLevel.SERIALIZABLE
    conn.row_factory = dict_row  # type: ignore[assignment]
    conn.prepare_threshold = None
    conn.add_notice_handler(lambda diag: None)
    pool.putconn(conn)
    conn = pool.getconn()
    assert conn.info.backend_pid == pid, "not the same connection: the test proves nothing"
    seen = (
        conn.autocommit,
        conn.read_only,
        conn.isolation_level,
        conn.row_factory is dict_row,
        conn.prepare_threshold,
        len(conn._notice_handlers),
    )
    pool.putconn(conn)
    if policy is None:
        assert seen == (True, True, IsolationLevel.SERIALIZABLE, True, None, 1)
    else:
        assert seen == (False, None, None, False, 5, 0)


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_buffered_notifications_do_not_reach_the_next_borrower(
    make_pool: Factory, admin: PgCluster, driver: str
) -> None:
    pool = make_pool(min_size=1, max_size=1, driver=driver)
    conn = pool.getconn()
    cur = conn.cursor()
    cur.execute("LISTEN gp_note")
    conn.commit()
    admin.execute("NOTIFY gp_note, 'tenant-1 secret'")
    cur.execute("SELECT 1")  # the notification arrives with this result and is buffered
    conn.commit()
    buffered = list(conn.notifies) if driver == "psycopg2" else list(conn._notifies_backlog)
    assert buffered, "no notification was buffered: the test proves nothing"
    pool.putconn(conn)
    conn = pool.getconn()
    try:
        left = list(conn.notifies) if driver == "psycopg2" else list(conn._notifies_backlog)
        assert left == []
    finally:
        pool.putconn(conn)


def test_settings_made_by_configure_survive_the_reset(make_pool: Factory) -> None:
    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET statement_timeout = '7s'")
        conn.commit()

    pool = make_pool(min_size=1, max_size=1, configure=configure)
    with pool.connection() as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("7s",)
        conn.execute("SET statement_timeout = '1min'")
        conn.execute("SET work_mem = '77MB'")
    with pool.connection() as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("7s",)
        assert conn.execute("SHOW work_mem").fetchone() != ("77MB",)


@pytest.mark.parametrize("autocommit", [False, True], ids=["transaction", "autocommit"])
@pytest.mark.parametrize("policy", ["light", "session", "discard"])
def test_reset_keeps_psycopg_prepared_statement_cache_consistent(
    make_pool: Factory, policy: str, autocommit: bool
) -> None:
    """psycopg prepares a query server-side after 5 executions; DISCARD ALL drops it on
    the server, and psycopg must notice so the next borrower's executions still work
    (also when no rollback on release made psycopg forget them: an autocommit borrower)."""
    pool = _pool(make_pool, policy)
    query = "SELECT %s::int + 1"
    pids = []
    for _borrower in range(2):
        with pool.connection() as conn:
            conn.autocommit = autocommit
            pids.append(conn.info.backend_pid)
            for i in range(10):
                row = conn.execute(query, [i]).fetchone()
                assert row == (i + 1,)
            prepared = conn.execute(
                "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '_pg3_%%'"
            ).fetchone()
            assert prepared is not None and prepared[0] >= 1, "psycopg did not auto-prepare"
    assert pids[0] == pids[1]


def test_reset_cost_per_release(make_pool: Factory) -> None:
    rounds = 300
    figures: dict[str, dict[str, float]] = {}
    for policy in (None, "client", "light", "session", "discard"):
        pool = make_pool(min_size=1, max_size=1, reset=policy)
        pool.putconn(pool.getconn())  # warm
        samples = []
        for _ in range(rounds):
            conn = pool.getconn()
            conn.autocommit = True
            conn.execute("SELECT 1")  # a used session (an untouched one skips the reset)
            t0 = time.perf_counter_ns()
            pool.putconn(conn)
            samples.append((time.perf_counter_ns() - t0) / 1e3)
        samples.sort()
        figures[str(policy).lower()] = {
            "p50_us": round(statistics.median(samples), 1),
            "p99_us": round(samples[int(rounds * 0.99) - 1], 1),
            "mean_us": round(statistics.fmean(samples), 1),
        }
        pool.close()
    assert figures["none"]["p50_us"] < figures["light"]["p50_us"]
    assert figures["none"]["p50_us"] < figures["session"]["p50_us"]
    assert figures["none"]["p50_us"] < figures["discard"]["p50_us"]
    record_result(
        "reset cost per release",
        {"rounds": rounds, "loopback": True, **figures},
        guarantee="each reset policy clears what RELIABILITY.md lists",
        headline=", ".join(f"{k} {v['p50_us']:.0f} µs" for k, v in figures.items())
        + " per release (p50, loopback)",
        rerun="python -m pytest -q tests/test_security.py::test_reset_cost_per_release -s",
    )


# --------------------------------------------------------------------------- secrets

SECRET = "Sup3r-S3cret pa'ss@w:rd/%zz"
MARKERS = (SECRET, quote(SECRET, safe=""), "Sup3r-S3cret")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there once the socket is closed


def _texts_of_error(ex: BaseException) -> list[str]:
    texts = [str(ex), repr(ex), "".join(traceback.format_exception(ex))]
    for arg in ex.args:
        texts.append(repr(arg))
    return texts


def _texts_of_pool(pool: GreenPool) -> list[str]:
    return [
        str(pool),
        repr(pool),
        json.dumps(pool.stats(), default=str),
        repr(pool.settings),
        pool.name,
    ]


def _assert_clean(
    texts: list[str], caplog: pytest.LogCaptureFixture, markers: tuple[str, ...] = MARKERS
) -> None:
    texts = list(texts)
    texts.append(caplog.text)
    for record in caplog.records:
        texts.append(record.getMessage())
        if record.exc_info:
            texts.append("".join(traceback.format_exception(*record.exc_info)))
    for text in texts:
        for marker in markers:
            assert marker not in text, f"secret leaked: {text!r}"


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)  # every logger: greenpool's, psycopg's, gevent's
    return caplog


def _url(cluster: PgCluster, password: str, *, port: int | None = None) -> str:
    return (
        f"postgresql://{PW_USER}:{quote(password, safe='')}@{cluster.host}:"
        f"{port or cluster.port}/postgres?connect_timeout=5"
    )


WRONG_PASSWORD_CASES: dict[str, Callable[[PgCluster], tuple[str, dict[str, Any]]]] = {
    "keyvalue": lambda c: (c.dsn(PW_USER, SECRET), {}),
    "url": lambda c: (_url(c, SECRET), {}),
    "kwargs": lambda c: (c.dsn(PW_USER), {"password": SECRET}),
    "unreachable-keyvalue": lambda c: (c.dsn(PW_USER, SECRET, port=_closed_port()), {}),
    "unreachable-url": lambda c: (_url(c, SECRET, port=_closed_port()), {}),
    "unreachable-kwargs": lambda c: (c.dsn(PW_USER, port=_closed_port()), {"password": SECRET}),
}


@pytest.mark.parametrize("case", sorted(WRONG_PASSWORD_CASES))
def test_password_never_leaks_on_connection_failure(
    cluster: PgCluster, make_pool: Factory, debug_logs: pytest.LogCaptureFixture, case: str
) -> None:
    conninfo, kwargs = WRONG_PASSWORD_CASES[case](cluster)
    pool = make_pool(conninfo, kwargs=kwargs, open=False, min_size=1)
    texts = _texts_of_pool(pool)
    with pytest.raises(ConnectError) as info:
        pool.open(wait=True, timeout=10)
    message = str(info.value)
    assert ("password authentication failed" in message) or ("refused" in message), message
    texts += _texts_of_error(info.value) + _texts_of_pool(pool)
    # A pool left retrying in the background: its timeouts and logs too.
    retrying = make_pool(conninfo, kwargs=kwargs, open=False, min_size=1)
    retrying.open()
    with pytest.raises(PoolError) as timeout_info:
        retrying.getconn(timeout=0.5)
    texts += _texts_of_error(timeout_info.value) + _texts_of_pool(retrying)
    retrying.close()
    _assert_clean(texts, debug_logs)


MALFORMED: dict[str, str] = {
    "missing-equals": f"host=127.0.0.1 password='{SECRET.replace(chr(39), '')}' port",
    "unterminated-quote": f"host=127.0.0.1 password='{SECRET}",
    "unknown-option": f"host=127.0.0.1 password='{SECRET.replace(chr(39), '')}' bogus=1",
    "unknown-pool-option": f"host=127.0.0.1 password='{SECRET.replace(chr(39), '')}' pool_x=1",
    "url-bad-port": f"postgresql://u:{quote(SECRET, safe='')}@127.0.0.1:notaport/db",
    "url-bad-percent": "postgresql://u:Sup3r-S3cret%zz@127.0.0.1/db",
    "url-bad-option": f"postgresql://u:{quote(SECRET, safe='')}@127.0.0.1/db?bogus=1",
    "url-bad-host": f"postgresql://u:{quote(SECRET, safe='')}@[::1/db",
    "url-bad-pool-value": f"postgresql://u:{quote(SECRET, safe='')}@h/db?pool_max_conns=x",
    # An unquoted password with a space: libpq reads "S3cret" as the next key.
    "unquoted-space": "host=127.0.0.1 password=Sup3r S3cret",
    # A raw '@' in a URL password: libpq would take the tail for the host name.
    "url-raw-at": "postgresql://u:Sup3r@S3cret@127.0.0.1/db",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_password_never_leaks_from_malformed_conninfo(
    debug_logs: pytest.LogCaptureFixture, case: str
) -> None:
    with pytest.raises(ValueError) as info:
        GreenPool(MALFORMED[case], name="malformed")
    assert str(info.value), "an error without a message is not a clear error"
    _assert_clean(_texts_of_error(info.value), debug_logs)


def test_connect_error_cause_is_redacted(
    cluster: PgCluster, make_pool: Factory, debug_logs: pytest.LogCaptureFixture
) -> None:
    """The driver's own error is chained as ``__cause__`` (same type) with secrets masked,
    even when libpq's message happens to contain the secret."""
    port = _closed_port()
    secret = f"{port}"  # libpq's "port NNNN failed" message contains it
    pool = make_pool(cluster.dsn(PW_USER, secret, port=port), open=False, min_size=1)
    with pytest.raises(ConnectError) as info:
        pool.open(wait=True, timeout=10)
    cause = info.value.__cause__
    assert isinstance(cause, psycopg.OperationalError), cause
    assert secret not in str(cause) and secret not in repr(cause) and "********" in str(cause)


def test_libpq_18_oauth_secret_is_masked(
    make_pool: Factory, debug_logs: pytest.LogCaptureFixture
) -> None:
    oauth = "oauth-Zq7x-secret"
    pool = make_pool(
        f"host=127.0.0.1 port={_closed_port()} oauth_client_id=x oauth_client_secret={oauth}",
        open=False,
    )
    texts = [*_texts_of_pool(pool), repr(pool.target)]
    with pytest.raises(ConnectError) as info:
        pool.open(wait=True, timeout=10)
    _assert_clean(texts + _texts_of_error(info.value), debug_logs, (oauth,))


def test_password_never_leaks_in_normal_operation(
    cluster: PgCluster, make_pool: Factory, debug_logs: pytest.LogCaptureFixture
) -> None:
    pools = [
        make_pool(cluster.dsn(APP_USER, APP_PASSWORD), min_size=2),
        make_pool(_url(cluster, PW_PASSWORD)),
        make_pool(cluster.dsn(APP_USER), kwargs={"password": APP_PASSWORD}),
    ]
    texts: list[str] = []
    for pool in pools:
        pool.wait(10)
        with pool.connection() as conn:
            conn.execute("SELECT 1")
            texts += [repr(conn), conn.info.dsn]
        pool.check()
        texts += _texts_of_pool(pool)
    # drain() to a wrong password: the new secret is masked as well.
    with pytest.raises(ConnectError) as info:
        pools[0].drain(timeout=5, conninfo=cluster.dsn(APP_USER, SECRET))
    texts += _texts_of_error(info.value) + _texts_of_pool(pools[0])
    for pool in pools:
        pool.close()
    _assert_clean(texts, debug_logs, (*MARKERS, APP_PASSWORD, PW_PASSWORD))


# --------------------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_certs(directory: Path) -> None:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=greenpool test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=directory)  # fmt: skip
    _openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=some other CA",
             "-keyout", "other.key", "-out", "other.crt", cwd=directory)  # fmt: skip
    _openssl("req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
             "-out", "server.csr", cwd=directory)  # fmt: skip
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.crt",
             cwd=directory)  # fmt: skip


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[tuple[PgCluster, Path]]:
    """A private cluster with ssl=on and a certificate for 127.0.0.1 from a test CA."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    directory = Path(tempfile.mkdtemp(prefix="greenpool-tls-"))
    try:
        _make_certs(directory)
        settings = {
            "ssl": "on",
            "ssl_cert_file": f"'{directory / 'server.crt'}'",
            "ssl_key_file": f"'{directory / 'server.key'}'",
        }
        try:
            cluster = PgCluster(extra_settings=settings)
        except PgBinariesNotFoundError:
            pytest.skip("no PostgreSQL server binaries")
        if cluster.run_as is not None:  # the server runs as another user: let it read
            user = pwd.getpwnam(cluster.run_as)
            os.chmod(directory, 0o755)
            for name in ("server.crt", "server.key"):
                os.chown(directory / name, user.pw_uid, user.pw_gid)
        os.chmod(directory / "server.key", 0o600)
        with cluster:
            yield cluster, directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize(
    ("sslmode", "in_use"), [("disable", False), ("require", True), ("prefer", True)]
)
def test_sslmode_reaches_the_connection(
    tls_cluster: tuple[PgCluster, Path], make_pool: Factory, sslmode: str, in_use: bool
) -> None:
    cluster, _ = tls_cluster
    for conninfo in (
        cluster.dsn(sslmode=sslmode, tcp_user_timeout=5000, keepalives_idle=30),
        f"postgresql://postgres@{cluster.host}:{cluster.port}/postgres"
        f"?sslmode={sslmode}&tcp_user_timeout=5000&keepalives_idle=30"
        f"&passfile={quote(str(cluster.passfile), safe='')}",
    ):
        pool = make_pool(conninfo, min_size=1)
        with pool.connection() as conn:
            params = conn.info.get_parameters()
            assert params.get("sslmode", "prefer") == sslmode  # libpq omits its default
            assert params["tcp_user_timeout"] == "5000" and params["keepalives_idle"] == "30"
            assert conn.pgconn.ssl_in_use is in_use
            on_server = conn.execute(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
            assert on_server == (in_use,)
        pool.close()


def test_sslmode_require_without_tls_on_the_server_fails_clearly(
    cluster: PgCluster, make_pool: Factory
) -> None:
    pool = make_pool(cluster.dsn(sslmode="require"), open=False)
    with pytest.raises(ConnectError, match="does not support SSL"):
        pool.open(wait=True, timeout=10)


def test_sslmode_verify_full(tls_cluster: tuple[PgCluster, Path], make_pool: Factory) -> None:
    cluster, certs = tls_cluster
    good = cluster.dsn(sslmode="verify-full", sslrootcert=str(certs / "ca.crt"))
    pool = make_pool(good, min_size=1)
    with pool.connection() as conn:
        assert conn.pgconn.ssl_in_use
    pool.close()
    failures = {
        "unknown CA": cluster.dsn(sslmode="verify-full", sslrootcert=str(certs / "other.crt")),
        "wrong host name": cluster.dsn(
            host="localhost",
            hostaddr="127.0.0.1",
            sslmode="verify-full",
            sslrootcert=str(certs / "ca.crt"),
        ),
    }
    messages = {}
    for what, conninfo in failures.items():
        pool = make_pool(conninfo, open=False)
        t0 = time.monotonic()
        with pytest.raises(ConnectError) as info:
            pool.open(wait=True, timeout=10)
        assert time.monotonic() - t0 < 2
        messages[what] = str(info.value).split("): ", 1)[-1]
    assert "certificate verify failed" in messages["unknown CA"], messages
    assert "does not match host name" in messages["wrong host name"], messages


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_reset_round_trip_skipped_only_when_the_borrower_sent_nothing(
    make_pool: Factory, driver: str
) -> None:
    """A borrower that sent nothing (the TCP socket's count of bytes written did not
    move) leaves the session as it found it: its release restores the client side only.
    Any byte sent (a SET, a ping, a rollback) means a full reset; the next borrower
    never sees the SET."""
    pool = _pool(make_pool, "session", driver=driver)

    def resets() -> int:
        return int(pool.stats()["reset_count"])

    conn = pool.getconn()
    pid = conn.info.backend_pid
    conn.autocommit = True  # client side only: no byte sent
    pool.putconn(conn)
    assert resets() == 0
    conn = pool.getconn()
    assert conn.autocommit is False  # restored all the same
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SET work_mem = '77MB'")
    cur.close()
    pool.putconn(conn)
    assert resets() == 1
    for expected in (1, 1):  # untouched again after the reset: the mark moved with it
        conn = pool.getconn()
        pool.putconn(conn)
        assert resets() == expected
    conn = pool.getconn()
    cur = conn.cursor()
    cur.execute("SELECT current_setting('work_mem'), pg_backend_pid()")
    row = cur.fetchone()
    cur.close()
    assert row is not None and row[0] != "77MB" and row[1] == pid
    pool.putconn(conn)  # in a transaction: rollback and reset
    assert resets() == 2


def test_sent_marker_unknown_on_a_unix_socket_and_moved_by_the_pools_pings(
    make_pool: Factory,
) -> None:
    """No count on a Unix socket (None: such a pool resets on every release, and the fd
    stays open); the pool's own pings move the mark without dirtying the session, so an
    untouched borrow still skips the reset with check_idle_after=0."""
    from greenpool.drivers.common import tcp_sent_marker

    a, b = socket.socketpair()
    with a, b:
        assert tcp_sent_marker(a.fileno()) is None
        assert a.fileno() >= 0  # borrowed, not closed
    pinged = _pool(make_pool, "session", check_idle_after=0.0)
    for _ in range(3):
        pinged.putconn(pinged.getconn())  # pinged at each checkout, nothing sent by us
    assert pinged.stats()["reset_count"] == 0
