"""A small throwaway PostgreSQL server, for ``greenpool demo`` and the benchmarks.

``EmbeddedPostgres`` runs ``initdb`` into a fresh temporary directory, starts a
postmaster listening only on ``127.0.0.1`` on a free TCP port (and on a Unix socket in a
``0700`` directory), and removes everything on :meth:`~EmbeddedPostgres.destroy`, at
interpreter exit, and -- through a tiny watchdog process that notices when this process
dies -- even when this process is killed outright.

Nobody gets in without a password: every ``pg_hba.conf`` line is ``scram-sha-256``. The
superuser's random password is written to a ``0600`` libpq password file, and the DSNs
name that file (``passfile=...``), so the password itself never appears in a DSN, a
process list or a log line.

Server binaries are looked up in this order: the ``bindir`` argument or
``$GREENPOOL_PG_BINDIR``; ``pg_config --bindir``; ``/usr/lib/postgresql/<version>/bin``
(newest first); ``initdb`` on ``PATH``; the binaries bundled in the ``pgserver`` wheel
(found inside the installed package, without importing it).

PostgreSQL refuses to run as root, so when this process is root the server commands run
as the ``postgres`` system user (or ``nobody``), which then owns the temporary directory.

psycopg is imported only when a connection is made, so importing this module never
decides psycopg's wait function before ``gevent.monkey.patch_all()``.

The parts: :mod:`~greenpool.embedded.server` (the server), :mod:`~greenpool.embedded.binaries`
(finding the binaries), :mod:`~greenpool.embedded.process` (port, account, watchdog) and
:mod:`~greenpool.embedded.credentials` (SCRAM verifiers, password files, conninfo strings).
"""

from __future__ import annotations

from greenpool.embedded.binaries import (
    BINDIR_ENV,
    EmbeddedPostgresError,
    PgBinariesNotFoundError,
    find_pg_bindir,
)
from greenpool.embedded.credentials import (
    make_conninfo,
    passfile_line,
    scram_secret,
    write_private,
)
from greenpool.embedded.process import HOST, free_port
from greenpool.embedded.server import SUPERUSER, EmbeddedPostgres, StopMode

__all__ = [
    "BINDIR_ENV",
    "HOST",
    "SUPERUSER",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "PgBinariesNotFoundError",
    "StopMode",
    "find_pg_bindir",
    "free_port",
    "make_conninfo",
    "passfile_line",
    "scram_secret",
    "write_private",
]
