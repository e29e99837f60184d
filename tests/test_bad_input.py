"""Bad input is refused with a clear error and changes nothing.

Every case here is a row of the table in ``docs/errors.md`` (same id, same exception):
``test_errors_md_lists_every_case`` keeps the two in step. For input errors the pool's
stats, settings, state and server-side backends are compared before and after; runtime
errors (timeouts, a full queue, ...) only have their exception and message checked.
"""

from __future__ import annotations

import contextlib
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import psycopg
import pytest

from greenpool import (
    ConnectError,
    CooperationError,
    GreenPool,
    PoolClosed,
    PoolError,
    PoolTimeout,
    TooManyRequests,
)
from tests.support.pgcluster import PgCluster

ERRORS_MD = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
NEW = "gp_bad_input_new"  # name of pools the construction cases try to make


@dataclass
class Env:
    dsn: str
    pool: GreenPool  # open, min_size=1, max_size=2
    make_pool: Callable[..., GreenPool]
    admin: PgCluster | None
    returned: Any = None  # a connection already given back (putconn-twice)

    def snapshot(self) -> tuple[Any, ...]:
        backends = (
            (self.admin.backend_count(self.pool.name), self.admin.backend_count(NEW))
            if self.admin is not None
            else ()
        )
        return (self.pool.stats(), dict(vars(self.pool.settings)), self.pool.closed, backends)

    def new(self, conninfo: str | None = None, **kwargs: Any) -> GreenPool:
        """Construct a pool the way a user would (not through the test factory)."""
        kwargs.setdefault("name", NEW)
        pool = GreenPool(self.dsn if conninfo is None else conninfo, **kwargs)
        pool.close()  # only reached when construction wrongly succeeded
        return pool

    def closed_pool(self) -> GreenPool:
        pool = self.make_pool(min_size=0)
        pool.close()
        return pool


@dataclass(frozen=True)
class Case:
    raises: type[BaseException]
    match: str
    run: Callable[[Env], object]
    input_error: bool = True  # False: a runtime error; no "changes nothing" comparison
    bug: str | None = None  # an open pool bug: the case is xfail(strict) until fixed
    prepare: Callable[[Env], None] | None = None  # runs before the "before" snapshot


def _putconn_foreign(env: Env) -> None:
    conn = psycopg.connect(env.dsn)
    try:
        env.pool.putconn(conn)
    finally:
        conn.close()


def _putconn_other_pool(env: Env) -> None:
    other = env.make_pool(min_size=0, max_size=1)
    conn = other.getconn()
    try:
        env.pool.putconn(conn)
    finally:
        assert other.stats()["acquired"] == 1, "the lending pool lost track of it"
        other.putconn(conn)


def _borrow_and_return(env: Env) -> None:
    env.returned = env.pool.getconn()
    env.pool.putconn(env.returned)


def _drain_bad_conninfo(env: Env) -> None:
    pool = env.make_pool(env.dsn + " pool_max_conns=5", min_size=1)
    pool.wait(10)
    try:
        pool.drain(timeout=5, conninfo=env.dsn + " pool_max_conns=3 no_such_option=1")
    finally:
        assert pool.max_size == 5, f"the refused conninfo changed max_size to {pool.max_size}"


def _queue_full(env: Env) -> None:
    pool = env.make_pool(min_size=0, max_size=1, max_waiting=1)
    held = pool.getconn()
    waiter = gevent.spawn(pool.getconn, 5)
    try:
        gevent.sleep(0)  # the waiter queues
        pool.getconn()
    finally:
        waiter.kill()
        pool.putconn(held)


def _acquire_timeout(env: Env) -> None:
    pool = env.make_pool(min_size=0, max_size=1)
    held = pool.getconn()
    try:
        pool.getconn(timeout=0.05)
    finally:
        pool.putconn(held)


def _failed_transaction(env: Env) -> None:
    # The error is swallowed inside the block, which therefore ends normally.
    with env.pool.connection() as conn, contextlib.suppress(psycopg.Error):
        conn.execute("SELECT 1/0")


def _connect_failure(env: Env) -> None:
    pool = env.make_pool(env.dsn + " port=1", open=False)
    pool.open(wait=True, timeout=10)


_NOT_COOPERATIVE = (
    "import os\n"
    "os.environ['GREENPOOL_PSYCOPG_WAIT'] = 'psycopg'\n"  # keep psycopg's own wait...
    "import psycopg\n"  # ...imported before gevent patches select: its C wait stays
    "from gevent import monkey\n"
    "monkey.patch_all()\n"
    "import greenpool\n"
    "greenpool.check_cooperation()\n"
)


def _not_cooperative(env: Env) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _NOT_COOPERATIVE], capture_output=True, text=True, timeout=60
    )
    last = (out.stderr.strip().splitlines() or [""])[-1]
    prefix = "greenpool.errors.CooperationError: "
    if last.startswith(prefix):
        raise CooperationError(last[len(prefix) :])
    raise AssertionError(f"expected CooperationError, got: {out.stderr[-500:]}")


CASES: dict[str, Case] = {
    # --- constructing a pool
    "conninfo-syntax": Case(
        ValueError, "conninfo: the parameter after 'host' has no '='",
        lambda e: e.new("host=127.0.0.1 port")),
    "conninfo-quote": Case(
        ValueError, "conninfo: unterminated quoted value",
        lambda e: e.new("host='127.0.0.1")),
    "conninfo-libpq": Case(
        ValueError, "conninfo: libpq cannot parse the connection string",
        lambda e: e.new("host=127.0.0.1 no_such_option=1")),
    "conninfo-scheme": Case(
        ValueError, "conninfo: unsupported URL scheme",
        lambda e: e.new("mysql://app@db/app")),
    "conninfo-url-port": Case(
        ValueError, "conninfo: port is not a number",
        lambda e: e.new("postgresql://app@db:five/app")),
    "conninfo-type": Case(
        ValueError, "conninfo: expected a string, got bytes",
        lambda e: e.new(b"host=db")),  # type: ignore[arg-type]
    "conninfo-pool-param": Case(
        ValueError, "conninfo: unknown pool parameter 'pool_max_size'",
        lambda e: e.new("host=db pool_max_size=5")),
    "conninfo-pool-value": Case(
        ValueError, "pool_max_conns: not a whole number",
        lambda e: e.new("host=db pool_max_conns=ten")),
    "conninfo-duration": Case(
        ValueError, "pool_max_conn_lifetime: not a duration",
        lambda e: e.new("host=db pool_max_conn_lifetime=forever")),
    "conninfo-connect-timeout": Case(
        ValueError, "connect_timeout: not a duration",
        lambda e: e.new("host=db connect_timeout=soon")),
    "unknown-parameter": Case(
        TypeError, "unexpected keyword argument 'max_szie'",
        lambda e: e.new(max_szie=5)),
    "size-zero": Case(
        ValueError, "max_size: must be at least 1, got 0",
        lambda e: e.new(max_size=0)),
    "size-negative": Case(
        ValueError, "min_size: must not be negative, got -1",
        lambda e: e.new(min_size=-1)),
    "size-absurd": Case(
        ValueError, r"max_size: 1000000 is absurd \(limit 1000\)",
        lambda e: e.new(max_size=1_000_000)),
    "size-float": Case(
        ValueError, "max_size: expected a whole number, got 2.5",
        lambda e: e.new(max_size=2.5)),
    "size-bool": Case(
        ValueError, "max_size: expected a whole number, got True",
        lambda e: e.new(max_size=True)),
    "size-string": Case(
        ValueError, "max_size: expected a whole number, got '10'",
        lambda e: e.new(max_size="10")),
    "size-min-above-max": Case(
        ValueError, "min_size: 5 is greater than max_size 2",
        lambda e: e.new(min_size=5, max_size=2)),
    "min-idle-above-max": Case(
        ValueError, "min_idle: 20 is greater than max_size 2",
        lambda e: e.new(min_idle=20, max_size=2)),
    "timeout-negative": Case(
        ValueError, "timeout: must be a non-negative number of seconds, got -1",
        lambda e: e.new(timeout=-1)),
    "timeout-nan": Case(
        ValueError, "timeout: must be a non-negative number of seconds, got nan",
        lambda e: e.new(timeout=math.nan)),
    "timeout-infinite": Case(
        ValueError, "timeout: inf s is absurd",
        lambda e: e.new(timeout=math.inf)),
    "timeout-string": Case(
        ValueError, "timeout: expected a number of seconds, got str",
        lambda e: e.new(timeout="5")),
    "ping-timeout-zero": Case(
        ValueError, "ping_timeout: must be greater than 0, got 0",
        lambda e: e.new(ping_timeout=0)),
    "jitter-above-lifetime": Case(
        ValueError, "max_lifetime_jitter: 20 exceeds max_lifetime 10",
        lambda e: e.new(max_lifetime=10, max_lifetime_jitter=20)),
    "max-connecting-zero": Case(
        ValueError, "max_connecting: must be at least 1, got 0",
        lambda e: e.new(max_connecting=0)),
    "reset-unknown": Case(
        ValueError, "reset: unknown policy 'clean'",
        lambda e: e.new(reset="clean")),
    "reset-type": Case(
        ValueError, "reset: expected a policy name, a callable or None, got int",
        lambda e: e.new(reset=42)),
    "driver-unknown": Case(
        ValueError, "driver: unknown driver 'mysql'",
        lambda e: e.new(driver="mysql")),
    # --- using an open pool wrongly
    "getconn-timeout-negative": Case(
        ValueError, "timeout: must be a non-negative number of seconds, got -1",
        lambda e: e.pool.getconn(timeout=-1)),
    "getconn-timeout-nan": Case(
        ValueError, "timeout: must be a non-negative number of seconds, got nan",
        lambda e: e.pool.getconn(timeout=math.nan)),
    "getconn-timeout-string": Case(
        ValueError, "timeout: expected a number of seconds, got str",
        lambda e: e.pool.getconn(timeout="1")),
    "putconn-foreign": Case(
        PoolError, "did not lend this object or it was already returned",
        _putconn_foreign),
    "putconn-other-pool": Case(
        PoolError, "did not lend this object or it was already returned",
        _putconn_other_pool),
    "putconn-twice": Case(
        PoolError, "did not lend this object or it was already returned",
        lambda e: e.pool.putconn(e.returned), prepare=_borrow_and_return),
    "putconn-not-a-connection": Case(
        PoolError, r"did not lend this object .*\(expected a connection",
        lambda e: e.pool.putconn(42)),
    "resize-invalid": Case(
        ValueError, "min_size: 5 is greater than max_size 2",
        lambda e: e.pool.resize(5, 2)),
    "configure-open-pool": Case(
        PoolError, r"is open: use drain\(conninfo=...\) to change it",
        lambda e: e.pool.configure_conninfo(e.dsn)),
    "drain-bad-conninfo": Case(
        ValueError, "conninfo: libpq cannot parse the connection string",
        _drain_bad_conninfo),
    # --- a pool that is not open
    "never-opened": Case(
        PoolClosed, "is not open yet",
        lambda e: GreenPool(name=NEW).getconn()),
    "closed-getconn": Case(
        PoolClosed, "is closed",
        lambda e: e.closed_pool().getconn()),
    "closed-connection": Case(
        PoolClosed, "is closed",
        lambda e: e.closed_pool().connection().__enter__()),
    "closed-open": Case(
        PoolClosed, "was closed; create a new pool",
        lambda e: e.closed_pool().open()),
    "closed-check": Case(
        PoolClosed, "is closed",
        lambda e: e.closed_pool().check()),
    "closed-drain": Case(
        PoolClosed, "is closed",
        lambda e: e.closed_pool().drain()),
    "closed-resize": Case(
        PoolClosed, "is closed",
        lambda e: e.closed_pool().resize(1, 3)),
    # --- runtime errors
    "acquire-timeout": Case(
        PoolTimeout, r"no connection available after 0\.0\d+ s \(total=1 ",
        _acquire_timeout, input_error=False),
    "queue-full": Case(
        TooManyRequests, r"1 greenlets already waiting \(max_waiting=1\)",
        _queue_full, input_error=False),
    "connect-failure": Case(
        ConnectError, "could not connect .*: OperationalError: connection failed",
        _connect_failure, input_error=False),
    "failed-transaction": Case(
        PoolError, "the transaction failed inside the 'with pool.connection\\(\\)' block",
        _failed_transaction, input_error=False),
    "not-cooperative": Case(
        CooperationError, "psycopg was imported before gevent patched select",
        _not_cooperative, input_error=False),
}  # fmt: skip


@pytest.fixture
def env(
    dsn: str, pg_cluster: PgCluster | None, make_pool: Callable[..., GreenPool]
) -> Iterator[Env]:
    pool = make_pool(min_size=1, max_size=2)
    pool.wait(10)
    yield Env(dsn, pool, make_pool, pg_cluster)


def _params() -> list[Any]:
    params = []
    for case_id, case in CASES.items():
        marks = [pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else []
        params.append(pytest.param(case_id, marks=marks, id=case_id))
    return params


@pytest.mark.parametrize("case_id", _params())
def test_refused_with_a_clear_error_and_nothing_changes(env: Env, case_id: str) -> None:
    case = CASES[case_id]
    if case.prepare is not None:
        case.prepare(env)
    before = env.snapshot()
    with pytest.raises(case.raises, match=case.match):
        case.run(env)
    if case.input_error:
        assert env.snapshot() == before


def _doc_rows() -> dict[str, str]:
    """``{case id: exception name}`` from the table rows of docs/errors.md."""
    rows = {}
    for line in ERRORS_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([a-z0-9-]+)`", cells[0]) if len(cells) >= 4 else None
        if match:
            rows[match.group(1)] = cells[2].strip("`")
    return rows


def test_errors_md_lists_every_case() -> None:
    rows = _doc_rows()
    assert sorted(rows) == sorted(CASES), set(rows) ^ set(CASES)
    for case_id, case in CASES.items():
        assert rows[case_id] == case.raises.__name__, case_id
