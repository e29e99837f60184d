"""Streaming replication for the tests: a primary PgCluster and hot standbys of it.

``primary = PgCluster(extra_settings=PRIMARY_SETTINGS)`` is a cluster that can feed
standbys (``wal_level=replica``, WAL senders, WAL kept for late standbys, quick WAL
flushes so replicas see commits within milliseconds). ``PgStandby(primary)`` is a real
hot standby: ``pg_basebackup -R`` copies the primary into the standby's own temporary
directory (streaming the WAL written meanwhile), and it runs on its own free port as the
same unprivileged account, streaming from the primary. It has every PgCluster helper,
plus:

- :meth:`PgStandby.promote` (``pg_ctl promote``, for real: it becomes a writable primary);
- :meth:`PgStandby.pause_replay` / :meth:`PgStandby.resume_replay`
  (``pg_wal_replay_pause()``: WAL keeps arriving but is not applied);
- :meth:`PgStandby.lag` (received/replayed LSNs against the primary's current LSN, and
  the age of the last replayed commit from ``pg_last_xact_replay_timestamp()``) and
  :meth:`PgStandby.wait_caught_up`.

:func:`set_read_only` makes a running primary refuse writes in new transactions
(``ALTER SYSTEM SET default_transaction_read_only = on`` and a reload), and back.

The replication connection logs in as the superuser with a passfile the server's
account owns (in the standby's directory); ``pg_basebackup -R`` records its name, never
the password, in ``primary_conninfo``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg

from greenpool.embedded import (
    HOST,
    SUPERUSER,
    EmbeddedPostgresError,
    make_conninfo,
    passfile_line,
    write_private,
)
from tests.support.pgcluster import PgCluster

__all__ = ["PRIMARY_SETTINGS", "Lag", "PgStandby", "is_read_only", "set_read_only"]

#: extra_settings for a PgCluster that standbys can stream from.
PRIMARY_SETTINGS: dict[str, str] = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "wal_keep_size": "'256MB'",
    # synchronous_commit is off in these clusters: the WAL writer flushes commits, and
    # WAL senders only send flushed WAL, so flush often for replicas to follow quickly.
    "wal_writer_delay": "'10ms'",
    "hot_standby_feedback": "on",
}

_WAIT = 30.0


@dataclass(frozen=True)
class Lag:
    """How far a standby is behind its primary, at one moment."""

    primary_lsn: str  # pg_current_wal_lsn() on the primary
    receive_lsn: str | None  # pg_last_wal_receive_lsn() on the standby
    replay_lsn: str | None  # pg_last_wal_replay_lsn() on the standby
    bytes_behind: int  # WAL the primary wrote that the standby has not replayed
    bytes_unreplayed: int  # WAL the standby received but has not replayed
    replay_age: float | None  # seconds since the last replayed commit's timestamp
    paused: bool


class PgStandby(PgCluster):
    """A hot standby of ``primary``, streaming from it (see the module docstring).

    Created by :meth:`start` (``pg_basebackup -R``); the primary must be running and
    configured with :data:`PRIMARY_SETTINGS`.
    """

    def __init__(
        self, primary: PgCluster, *, port: int | None = None, name: str = "standby"
    ) -> None:
        super().__init__(
            bindir=primary.bindir,
            port=port,
            max_connections=primary.max_connections,
            extra_settings=primary.extra_settings,
        )
        self.primary = primary
        self.name = name
        self._password = primary._password  # the same catalog: the same superuser

    def __repr__(self) -> str:
        return f"<PgStandby {self.name} {HOST}:{self.port} of {self.primary.port}>"

    # -- replication ----------------------------------------------------------

    def is_in_recovery(self) -> bool:
        """True while it is a standby (False once promoted)."""
        return bool(self.execute("SELECT pg_is_in_recovery()")[0][0])

    def promote(self) -> None:
        """Promote to a writable primary (``pg_ctl promote -w``), then wait until it
        accepts writes."""
        pg_ctl = str(self.bindir / "pg_ctl")
        self.run([pg_ctl, "promote", "-D", str(self.data_dir), "-w", "-t", str(int(_WAIT))],
                 check=True)  # fmt: skip
        self._poll(lambda: not self.is_in_recovery(), "promotion to finish")

    def pause_replay(self) -> None:
        """Stop applying WAL (it keeps being received); returns once replay is paused."""
        self.execute("SELECT pg_wal_replay_pause()")
        self._poll(lambda: self._pause_state() == "paused", "replay to pause")

    def resume_replay(self) -> None:
        """Apply WAL again."""
        self.execute("SELECT pg_wal_replay_resume()")
        self._poll(lambda: self._pause_state() == "not paused", "replay to resume")

    def _pause_state(self) -> str:
        return str(self.execute("SELECT pg_get_wal_replay_pause_state()")[0][0])

    def lag(self) -> Lag:
        """The standby's position against the primary's current WAL position."""
        primary_lsn = str(self.primary.execute("SELECT pg_current_wal_lsn()")[0][0])
        row = self.execute(
            "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text,"
            " pg_wal_lsn_diff(%(p)s::pg_lsn, pg_last_wal_replay_lsn())::bigint,"
            " pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint,"
            " extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8,"
            " pg_get_wal_replay_pause_state() <> 'not paused'",
            {"p": primary_lsn},
        )[0]
        return Lag(
            primary_lsn=primary_lsn,
            receive_lsn=row[0],
            replay_lsn=row[1],
            bytes_behind=max(0, int(row[2] or 0)),
            bytes_unreplayed=max(0, int(row[3] or 0)),
            replay_age=None if row[4] is None else float(row[4]),
            paused=bool(row[5]),
        )

    def wait_caught_up(self, timeout: float = _WAIT) -> Lag:
        """Wait until the standby replayed everything the primary had written when this
        was called; returns the lag measured then (bytes_behind may be > 0 again if the
        primary kept writing)."""
        target = str(self.primary.execute("SELECT pg_current_wal_lsn()")[0][0])
        self._poll(
            lambda: bool(
                self.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,))[0][0]
            ),
            f"replay to reach {target}",
            timeout,
        )
        return self.lag()

    def _poll(self, done: Any, what: str, timeout: float = _WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() >= deadline:
                raise EmbeddedPostgresError(f"{self!r}: timed out waiting for {what}")
            time.sleep(0.02)

    # -- creation -------------------------------------------------------------

    def _initdb(self) -> None:
        """Instead of initdb: a base backup of the primary, set up to stream from it."""
        if not self.primary.is_running():
            raise EmbeddedPostgresError("the primary must be running to make a standby")
        basebackup = self.bindir / "pg_basebackup"
        if not basebackup.exists():
            raise EmbeddedPostgresError(
                f"{basebackup} not found: install the PostgreSQL client package "
                "(apt-get install postgresql-client)"
            )
        self.chown(self.base_dir)
        self.socket_dir.mkdir(mode=0o700)
        self.chown(self.socket_dir)
        # the walreceiver (the server's account) reads this one; ours is for clients
        server_pass = self.base_dir / "replication.pgpass"
        write_private(server_pass, passfile_line(HOST, "*", SUPERUSER, self._password), None)
        self.chown(server_pass)
        source = make_conninfo(
            {
                "host": HOST,
                "port": self.primary.port,
                "user": SUPERUSER,
                "passfile": str(server_pass),
                "application_name": self.name,
            }
        )
        self.run(
            [
                str(basebackup), "-D", str(self.data_dir), "-d", source, "-R",
                "-X", "stream", "-c", "fast", "--no-sync",
            ],
            check=True,
        )  # fmt: skip
        lines = [passfile_line(h, "*", SUPERUSER, self._password) for h in (HOST, "localhost")]
        write_private(self.passfile, "".join(lines))
        self._write_config()  # this standby's port and socket, over the primary's copy

    def _first_ready(self) -> None:
        """The roles came with the base backup (and a standby is read-only)."""


def set_read_only(cluster: PgCluster, read_only: bool = True) -> None:
    """Make new transactions on a running server read-only (or writable again), with
    ``ALTER SYSTEM`` and a reload; returns once new connections see the change."""
    with cluster.connect_admin(options="-c default_transaction_read_only=off") as conn:
        if read_only:
            conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        else:
            conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
        conn.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + _WAIT
    while is_read_only(cluster) != read_only:
        if time.monotonic() >= deadline:
            raise EmbeddedPostgresError(f"{cluster!r}: the reload did not take effect")
        time.sleep(0.02)


def is_read_only(cluster: PgCluster) -> bool:
    """Whether a new session's transactions are read-only by default."""
    with psycopg.connect(cluster.dsn(connect_timeout=5), autocommit=True) as conn:
        return bool(conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",))
