"""Bad input is refused with a clear error and changes nothing.

Every case here is a row of the table in ``docs/errors.md`` (same id, same exception):
``test_errors_md_lists_every_case`` keeps the two in step. For input errors, every pool
the case acts on (its stats, settings, state, target and sessions on the server), and
any pool a construction case might have made after all, are compared before and after;
runtime errors (timeouts, a full queue, ...) only have their exception and message
checked.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
    fork,
)
from tests.support.invariants import backend_starts
from tests.support.server import Server
from tests.support.waiting import wait_for

ERRORS_MD = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
NEW = "gp_bad_input_new"  # name of pools the construction cases try to make


@dataclass
class Env:
    dsn: str
    pool: GreenPool[Any]  # open, min_size=1, max_size=2
    make_pool: Callable[..., GreenPool[Any]]
    admin: Server
    subjects: list[GreenPool[Any]] = field(default_factory=list)  # what the case acts on
    returned: Any = None  # a connection already given back (putconn-twice)
    borrowed: Any = None  # a connection lent by another pool (putconn-other-pool)

    @property
    def subject(self) -> GreenPool[Any]:
        return self.subjects[0]

    def snapshot(self) -> tuple[Any, ...]:
        """Everything the case could change: each pool it acts on (counts, settings,
        state, target, and its sessions on the server), and pools that construction
        cases might have made after all (tracked by greenpool, or on the server)."""
        gc.collect()  # earlier tests' garbage must not vanish between the two snapshots
        pools = [
            (
                p.stats(),
                dict(vars(p.settings)),
                p.closed,
                repr(p),
                p.target.conninfo,
                backend_starts(self.admin, p.name),
            )
            for p in self.subjects
        ]
        made = sorted(repr(p) for p in fork.tracked() if p.name == NEW)
        return (pools, made, backend_starts(self.admin, NEW))

    def new(self, conninfo: str | None = None, **kwargs: Any) -> GreenPool[Any]:
        """Construct a pool the way a user would (not through the test factory)."""
        kwargs.setdefault("name", NEW)
        pool: GreenPool[Any] = GreenPool(self.dsn if conninfo is None else conninfo, **kwargs)
        pool.close()  # only reached when construction wrongly succeeded
        return pool

    def closed_pool(self) -> list[GreenPool[Any]]:
        pool = self.make_pool(min_size=1)
        pool.wait(10)
        pool.close()
        return [pool]


def _the_pool(env: Env) -> list[GreenPool[Any]]:
    return [env.pool]


def _nothing(env: Env) -> list[GreenPool[Any]]:
    return []  # construction cases: no pool exists; the snapshot covers pools made anyway


@dataclass(frozen=True)
class Case:
    raises: type[BaseException]
    match: str
    run: Callable[[Env], object]
    # The pools the case acts on, made before the "before" snapshot; None: a runtime
    # error, whose exception and message are checked but not the "nothing changes" half.
    subject: Callable[[Env], list[GreenPool[Any]]] | None = _the_pool
    cleanup: Callable[[Env], None] | None = None  # runs after the "after" snapshot


def _putconn_foreign(env: Env) -> None:
    conn = psycopg.connect(env.dsn)
    try:
        env.pool.putconn(conn)
    finally:
        conn.close()


def _lent_by_another_pool(env: Env) -> list[GreenPool[Any]]:
    other = env.make_pool(min_size=0, max_size=1)
    env.borrowed = other.getconn()
    return [env.pool, other]  # neither may change: the lending pool still lends it


def _give_back_to_its_pool(env: Env) -> None:
    env.subjects[1].putconn(env.borrowed)


def _borrow_and_return(env: Env) -> list[GreenPool[Any]]:
    env.returned = env.pool.getconn()
    env.pool.putconn(env.returned)
    return [env.pool]


def _pool_with_max_5(env: Env) -> list[GreenPool[Any]]:
    pool = env.make_pool(env.dsn + " pool_max_conns=5", min_size=1)
    pool.wait(10)
    return [pool]


def _never_opened(env: Env) -> list[GreenPool[Any]]:
    return [GreenPool(name=NEW)]


def _queue_full(env: Env) -> None:
    pool = env.make_pool(min_size=0, max_size=1, max_waiting=1)
    held = pool.getconn()
    waiter = gevent.spawn(pool.getconn, 5)
    try:
        wait_for(lambda: pool.stats()["waiting"] == 1, what="the waiter to queue")
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
        lambda e: e.new("host=127.0.0.1 port"), subject=_nothing),
    "conninfo-quote": Case(
        ValueError, "conninfo: unterminated quoted value",
        lambda e: e.new("host='127.0.0.1"), subject=_nothing),
    "conninfo-libpq": Case(
        ValueError, "conninfo: libpq cannot parse the connection string",
        lambda e: e.new("host=127.0.0.1 no_such_option=1"), subject=_nothing),
    "conninfo-scheme": Case(
        ValueError, "conninfo: unsupported URL scheme",
        lambda e: e.new("mysql://app@db/app"), subject=_nothing),
    "conninfo-url-port": Case(
        ValueError, "conninfo: port is not a number",
        lambda e: e.new("postgresql://app@db:five/app"), subject=_nothing),
    "conninfo-type": Case(
        ValueError, "conninfo: expected a string, got bytes",
        lambda e: e.new(b"host=db"), subject=_nothing),  # type: ignore[arg-type]
    "conninfo-pool-param": Case(
        ValueError, "conninfo: unknown pool parameter 'pool_max_size'",
        lambda e: e.new("host=db pool_max_size=5"), subject=_nothing),
    "conninfo-pool-value": Case(
        ValueError, "pool_max_conns: not a whole number",
        lambda e: e.new("host=db pool_max_conns=ten"), subject=_nothing),
    "conninfo-duration": Case(
        ValueError, "pool_max_conn_lifetime: not a duration",
        lambda e: e.new("host=db pool_max_conn_lifetime=forever"), subject=_nothing),
    "conninfo-connect-timeout": Case(
        ValueError, "connect_timeout: libpq reads a whole number of seconds",
        lambda e: e.new("host=db connect_timeout=soon"), subject=_nothing),
    "conninfo-size-cap": Case(
        ValueError,
        r"pool_max_conns: 500 is above what a conninfo may set \(100\); pass max_size= explicitly",
        lambda e: e.new("host=db pool_max_conns=500"), subject=_nothing),
    "conninfo-lifetime-too-short": Case(
        ValueError, r"max_lifetime: 1e-09 s is too short \(at least 0\.5 s",
        lambda e: e.new("host=db pool_max_conn_lifetime=1ns"), subject=_nothing),
    "unknown-parameter": Case(
        TypeError, "unexpected keyword argument 'max_szie'",
        lambda e: e.new(max_szie=5), subject=_nothing),
    "size-zero": Case(
        ValueError, "max_size: must be at least 1, got 0",
        lambda e: e.new(max_size=0), subject=_nothing),
    "size-negative": Case(
        ValueError, "min_size: must not be negative, got -1",
        lambda e: e.new(min_size=-1), subject=_nothing),
    "size-absurd": Case(
        ValueError, r"max_size: 1000000 is absurd \(limit 1000\)",
        lambda e: e.new(max_size=1_000_000), subject=_nothing),
    "size-float": Case(
        ValueError, "max_size: expected a whole number, got 2.5",
        lambda e: e.new(max_size=2.5), subject=_nothing),
    "size-bool": Case(
        ValueError, "max_size: expected a whole number, got True",
        lambda e: e.new(max_size=True), subject=_nothing),
    "size-string": Case(
        ValueError, "max_size: expected a whole number, got '10'",
        lambda e: e.new(max_size="10"), subject=_nothing),
    "size-min-above-max": Case(
        ValueError, "min_size: 5 is greater than max_size 2",
        lambda e: e.new(min_size=5, max_size=2), subject=_nothing),
    "min-idle-above-max": Case(
        ValueError, "min_idle: 20 is greater than max_size 2",
        lambda e: e.new(min_idle=20, max_size=2), subject=_nothing),
    "timeout-negative": Case(
        ValueError, "timeout: must be a non-negative number of seconds, got -1",
        lambda e: e.new(timeout=-1), subject=_nothing),
    "timeout-nan": Case(
        ValueError, "timeout: must be a non-negative number of seconds, got nan",
        lambda e: e.new(timeout=math.nan), subject=_nothing),
    "timeout-infinite": Case(
        ValueError, "timeout: inf s is absurd",
        lambda e: e.new(timeout=math.inf), subject=_nothing),
    "timeout-string": Case(
        ValueError, "timeout: expected a number of seconds, got str",
        lambda e: e.new(timeout="5"), subject=_nothing),
    "ping-timeout-zero": Case(
        ValueError, "ping_timeout: must be greater than 0, got 0",
        lambda e: e.new(ping_timeout=0), subject=_nothing),
    "lifetime-too-short": Case(
        ValueError, r"max_lifetime: 1e-09 s is too short \(at least 0\.5 s; shorter values churn",
        lambda e: e.new(max_lifetime=1e-9), subject=_nothing),
    "jitter-above-lifetime": Case(
        ValueError, "max_lifetime_jitter: 20 exceeds max_lifetime 10",
        lambda e: e.new(max_lifetime=10, max_lifetime_jitter=20), subject=_nothing),
    "max-connecting-zero": Case(
        ValueError, "max_connecting: must be at least 1, got 0",
        lambda e: e.new(max_connecting=0), subject=_nothing),
    "reset-unknown": Case(
        ValueError, "reset: unknown policy 'clean'",
        lambda e: e.new(reset="clean"), subject=_nothing),
    "reset-type": Case(
        ValueError, "reset: expected a policy name, a callable or None, got int",
        lambda e: e.new(reset=42), subject=_nothing),
    "driver-unknown": Case(
        ValueError, "driver: unknown driver 'mysql'",
        lambda e: e.new(driver="mysql"), subject=_nothing),
    # --- using an open pool wrongly
    "getconn-timeout-negative": Case(
        ValueError, "timeout: must be a non-negative number of seconds, got -1",
        lambda e: e.subject.getconn(timeout=-1)),
    "getconn-timeout-nan": Case(
        ValueError, "timeout: must be a non-negative number of seconds, got nan",
        lambda e: e.subject.getconn(timeout=math.nan)),
    "getconn-timeout-string": Case(
        ValueError, "timeout: expected a number of seconds, got str",
        lambda e: e.subject.getconn(timeout="1")),  # type: ignore[arg-type]
    "putconn-foreign": Case(
        PoolError, "did not lend this object or it was already returned",
        _putconn_foreign),
    "putconn-other-pool": Case(
        PoolError, "did not lend this object or it was already returned",
        lambda e: e.pool.putconn(e.borrowed), subject=_lent_by_another_pool,
        cleanup=_give_back_to_its_pool),
    "putconn-twice": Case(
        PoolError, "did not lend this object or it was already returned",
        lambda e: e.pool.putconn(e.returned), subject=_borrow_and_return),
    "putconn-not-a-connection": Case(
        PoolError, r"did not lend this object .*\(expected a connection",
        lambda e: e.subject.putconn(42)),
    "resize-invalid": Case(
        ValueError, "min_size: 5 is greater than max_size 2",
        lambda e: e.subject.resize(5, 2)),
    "configure-open-pool": Case(
        PoolError, r"is open: use drain\(conninfo=...\) to change it",
        lambda e: e.subject.configure_conninfo(e.dsn)),
    "drain-bad-conninfo": Case(
        ValueError, "conninfo: libpq cannot parse the connection string",
        lambda e: e.subject.drain(timeout=5, conninfo=e.dsn + " pool_max_conns=3 no_such_option=1"),
        subject=_pool_with_max_5),
    # --- a pool that is not open
    "never-opened": Case(
        PoolClosed, "is not open yet",
        lambda e: e.subject.getconn(), subject=_never_opened),
    "closed-getconn": Case(
        PoolClosed, "is closed",
        lambda e: e.subject.getconn(), subject=Env.closed_pool),
    "closed-connection": Case(
        PoolClosed, "is closed",
        lambda e: e.subject.connection().__enter__(), subject=Env.closed_pool),
    "closed-open": Case(
        PoolClosed, "was closed; create a new pool",
        lambda e: e.subject.open(), subject=Env.closed_pool),
    "closed-check": Case(
        PoolClosed, "is closed",
        lambda e: e.subject.check(), subject=Env.closed_pool),
    "closed-drain": Case(
        PoolClosed, "is closed",
        lambda e: e.subject.drain(), subject=Env.closed_pool),
    "closed-resize": Case(
        PoolClosed, "is closed",
        lambda e: e.subject.resize(1, 3), subject=Env.closed_pool),
    # --- runtime errors
    "acquire-timeout": Case(
        PoolTimeout, r"no connection available after 0\.0\d+ s \(total=1 ",
        _acquire_timeout, subject=None),
    "queue-full": Case(
        TooManyRequests, r"1 greenlets already waiting \(max_waiting=1\)",
        _queue_full, subject=None),
    "connect-failure": Case(
        ConnectError, "could not connect .*: OperationalError: connection failed",
        _connect_failure, subject=None),
    "failed-transaction": Case(
        PoolError, "the transaction failed inside the 'with pool.connection\\(\\)' block",
        _failed_transaction, subject=None),
    "not-cooperative": Case(
        CooperationError, "psycopg was imported before gevent patched select",
        _not_cooperative, subject=None),
}  # fmt: skip


@pytest.fixture
def env(dsn: str, admin: Server, make_pool: Callable[..., GreenPool[Any]]) -> Iterator[Env]:
    pool = make_pool(min_size=1, max_size=2)
    pool.wait(10)
    yield Env(dsn, pool, make_pool, admin)


@pytest.mark.parametrize("case_id", list(CASES))
def test_refused_with_a_clear_error_and_nothing_changes(env: Env, case_id: str) -> None:
    case = CASES[case_id]
    if case.subject is not None:
        env.subjects = case.subject(env)
        before = env.snapshot()
    with pytest.raises(case.raises, match=case.match):
        case.run(env)
    if case.subject is not None:
        assert env.snapshot() == before
    if case.cleanup is not None:
        case.cleanup(env)


def test_every_input_case_checks_what_it_acts_on() -> None:
    """The "nothing changes" half compares the pools each case acts on: a case that acts
    on a pool of its own must name it as its subject, or it compares an untouched one."""
    for case_id, case in CASES.items():
        if case.subject is _the_pool:
            source = inspect.getsource(case.run)
            assert "e.make_pool" not in source and "closed_pool" not in source, case_id


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
