"""``flask greenpool check`` and ``flask greenpool stats``.

Both open a short-lived pool of their own (one connection per database), never the
workers' pools, and print nothing secret: connection targets are described by host,
port, database and user only, and errors come from the pool already redacted.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from time import monotonic
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from greenpool.api import GreenPool
from greenpool.cooperation import cooperation_problems
from greenpool.errors import PoolError
from greenpool.flask_ext.config import DatabaseConfig
from greenpool.flask_ext.state import AppState
from greenpool.settings import seconds


def _valid_timeout(ctx: click.Context, param: click.Parameter, value: float) -> float:
    try:
        return seconds("--timeout", value)
    except ValueError as ex:
        raise click.BadParameter(str(ex).partition(": ")[2]) from None


greenpool_cli = AppGroup("greenpool", help="Check the databases of this app's greenpool pools.")

_SERVER_INFO = (
    "SELECT current_setting('server_version'), current_user, current_database(), "
    "current_setting('max_connections')::int, "
    "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int"
)
_APP_BACKENDS = (
    "SELECT coalesce(state, 'unknown'), count(*)::int FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' AND application_name = %s "
    "AND pid <> pg_backend_pid() GROUP BY 1 ORDER BY 1"
)


@contextmanager
def _quiet() -> Iterator[None]:
    """A CLI process is not gevent-patched: keep the pool's cooperation warning quiet
    (``check`` reports cooperation itself)."""
    log = logging.getLogger("greenpool")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        log.setLevel(level)


@contextmanager
def _probe(db: DatabaseConfig, timeout: float) -> Iterator[Any]:
    """One connection to ``db`` through a throwaway one-connection pool."""
    kwargs = db.pool_kwargs()
    kwargs.update(min_size=1, max_size=1, min_idle=0, name=f"{db.pool_name}-cli", open=False)
    with _quiet():
        pool: GreenPool[Any] = GreenPool(db.conninfo, **kwargs)
        try:
            pool.open(wait=True, timeout=timeout)
            with pool.connection(timeout) as conn:
                yield conn
        finally:
            pool.close(timeout=1)


def _query(conn: Any, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    cur = conn.cursor()
    try:
        cur.execute(sql, params or None)
        return list(cur.fetchall())
    finally:
        cur.close()


def _selected(state: AppState, database: str | None) -> list[DatabaseConfig]:
    if database is None:
        return list(state.databases.values())
    key = None if database == "default" else database
    try:
        return [state.database(key)]
    except KeyError as ex:
        raise click.UsageError(str(ex.args[0])) from None


def _check_one(db: DatabaseConfig, state: AppState, timeout: float) -> dict[str, Any]:
    report: dict[str, Any] = {
        "database": db.label,
        "pool": db.pool_name,
        "target": db.describe(),
        "driver": db.driver if isinstance(db.driver, str) else type(db.driver).__name__,
        "settings": asdict(db.effective_settings()),
    }
    problems = cooperation_problems(db.driver)
    report["cooperation"] = {
        "ok": not problems,
        "problems": problems,
        "require_cooperation": state.options.require_cooperation,  # None: auto
    }
    start = monotonic()
    try:
        with _probe(db, timeout) as conn:
            version, user, dbname, max_conn, backends = _query(conn, _SERVER_INFO)[0]
    except (PoolError, OSError) as ex:
        report.update(ok=False, error=str(ex))
        return report
    report.update(
        ok=True,
        connect_seconds=round(monotonic() - start, 3),
        server_version=version,
        user=user,
        dbname=dbname,
        max_connections=max_conn,
        client_backends=backends,
    )
    return report


def _print_check(report: dict[str, Any]) -> None:
    click.echo(f"database {report['database']!r} (pool {report['pool']!r}): {report['target']}")
    if report["ok"]:
        click.echo(
            f"  connected in {report['connect_seconds']:.3f} s: PostgreSQL "
            f"{report['server_version']}, user {report['user']}, database {report['dbname']}"
        )
        click.echo(
            f"  server: {report['client_backends']} client connections (this one included) "
            f"of max_connections {report['max_connections']}"
        )
    else:
        click.echo(f"  FAILED: {report['error']}")
    settings = report["settings"]
    shown = " ".join(f"{k}={v}" for k, v in settings.items() if v is not None)
    click.echo(f"  driver {report['driver']}; pool settings: {shown}")
    coop = report["cooperation"]
    if coop["ok"]:
        click.echo("  cooperation: ok (database waits yield to other greenlets)")
    else:
        click.echo("  cooperation: not in this process (normal for a CLI command; the gevent")
        click.echo("  worker patches first and post_worker_init verifies it):")
        for problem in coop["problems"]:
            click.echo(f"    - {problem}")


@greenpool_cli.command("check")
@click.option("--database", "-d", default=None, help="Only this database (bind name).")
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    callback=_valid_timeout,
    help="Seconds to wait to connect.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check_command(database: str | None, timeout: float, as_json: bool) -> None:
    """Connect to each configured database; report server, pool settings, cooperation."""
    state: AppState = current_app.extensions["greenpool"]
    reports = [_check_one(db, state, timeout) for db in _selected(state, database)]
    if as_json:
        click.echo(json.dumps({"databases": reports}, indent=2, default=str))
    else:
        for report in reports:
            _print_check(report)
    if not all(r["ok"] for r in reports):
        raise SystemExit(1)


@greenpool_cli.command("stats")
@click.option("--database", "-d", default=None, help="Only this database (bind name).")
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    callback=_valid_timeout,
    help="Seconds to wait to connect.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def stats_command(database: str | None, timeout: float, as_json: bool) -> None:
    """Server-side view: this app's connections per state, against max_connections.

    Live per-worker pool counters are served by the stats blueprint (/stats, /metrics).
    """
    state: AppState = current_app.extensions["greenpool"]
    results: list[dict[str, Any]] = []
    failed = False
    for db in _selected(state, database):
        entry: dict[str, Any] = {"database": db.label, "pool": db.pool_name}
        entry["max_size_per_process"] = db.effective_settings().max_size
        try:
            with _probe(db, timeout) as conn:
                info = _query(conn, _SERVER_INFO)[0]
                by_state = dict(_query(conn, _APP_BACKENDS, (db.pool_name,)))
        except (PoolError, OSError) as ex:
            entry["error"] = str(ex)
            failed = True
            results.append(entry)
            continue
        entry.update(
            connections=sum(by_state.values()),
            by_state=by_state,
            server_client_backends=info[4] - 1,  # not counting this command's own
            max_connections=info[3],
        )
        results.append(entry)
    if as_json:
        click.echo(json.dumps({"databases": results}, indent=2))
    else:
        for entry in results:
            click.echo(f"database {entry['database']!r} (pool {entry['pool']!r}):")
            if "error" in entry:
                click.echo(f"  FAILED: {entry['error']}")
                continue
            states = ", ".join(f"{k} {v}" for k, v in entry["by_state"].items()) or "none"
            click.echo(
                f"  {entry['connections']} server connections with application_name "
                f"{entry['pool']!r} ({states}); max_size {entry['max_size_per_process']} "
                "per worker process"
            )
            click.echo(
                f"  server: {entry['server_client_backends']} client connections of "
                f"max_connections {entry['max_connections']}"
            )
    if failed:
        raise SystemExit(1)
