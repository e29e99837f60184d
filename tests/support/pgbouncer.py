"""A private PgBouncer in front of a :class:`~tests.support.pgcluster.PgCluster`.

``PgBouncer(cluster, pool_mode="transaction", default_pool_size=2)`` writes a config into
a temporary directory and runs Debian's ``pgbouncer`` binary in the foreground, listening
only on ``127.0.0.1`` on a free port (kept by :meth:`PgBouncer.stop` /
:meth:`PgBouncer.start`). When this process is root it runs as the cluster's server
account (PgBouncer refuses to run as root).

Authentication goes through a userlist file holding the cluster's own secrets, read from
``pg_authid``: SCRAM verifiers (or md5 hashes, for a role stored that way), never a
plaintext password. With a SCRAM verifier PgBouncer also logs in to the server for the
client (SCRAM pass-through). The superuser is an ``admin_users`` entry: the admin console
(database ``pgbouncer``) answers ``SHOW POOLS``, ``PAUSE``, ``RESUME``, ``RELOAD``... over
:meth:`PgBouncer.admin`, which authenticates with the cluster's passfile.

The process is stopped and the directory removed by :meth:`PgBouncer.destroy`, at
interpreter exit, and by a watchdog process when this process dies. Without the binary,
:func:`find_pgbouncer` raises :class:`PgBouncerNotFound`; :func:`require_pgbouncer` turns
that into a pytest skip naming the package to install.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import psycopg

from greenpool.embedded import HOST, SUPERUSER, free_port, make_conninfo
from tests.support.pgcluster import PgCluster

__all__ = [
    "PGBOUNCER_ENV",
    "PgBouncer",
    "PgBouncerError",
    "PgBouncerNotFound",
    "find_pgbouncer",
    "pgbouncer_version",
    "require_pgbouncer",
]

#: Environment variable naming a pgbouncer binary to use.
PGBOUNCER_ENV = "GREENPOOL_PGBOUNCER"
INSTALL_HINT = "pgbouncer not installed: apt-get install pgbouncer"

PoolMode = Literal["session", "transaction", "statement"]
AuthType = Literal["scram-sha-256", "md5"]

_START_TIMEOUT = 15.0


class PgBouncerError(RuntimeError):
    """PgBouncer could not be configured, started or stopped."""


class PgBouncerNotFound(PgBouncerError):
    """No pgbouncer binary on this machine."""


def find_pgbouncer() -> Path:
    """The pgbouncer binary: ``$GREENPOOL_PGBOUNCER``, ``PATH``, then ``/usr/sbin``."""
    candidates = [os.environ.get(PGBOUNCER_ENV), shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise PgBouncerNotFound(INSTALL_HINT)


def require_pgbouncer() -> Path:
    """:func:`find_pgbouncer`, or skip the calling test with the install hint."""
    import pytest

    try:
        return find_pgbouncer()
    except PgBouncerNotFound:
        pytest.skip(INSTALL_HINT)


def pgbouncer_version(binary: Path) -> tuple[int, ...]:
    """``(1, 18, 0)`` from ``pgbouncer --version``."""
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out)
    if match is None:
        raise PgBouncerError(f"cannot read the version of {binary}: {out!r}")
    return tuple(int(part or 0) for part in match.groups())


# The watchdog blocks reading its stdin, whose write end only this process holds; on EOF
# (this process died, or destroy() is done) it stops the pgbouncer whose pid is in the
# pid file and removes the directory.
_WATCHDOG_CODE = r"""
import os, shutil, signal, sys, time
pidfile, base_dir = sys.argv[1], sys.argv[2]
try:
    sys.stdin.buffer.read()
except BaseException:
    pass
try:
    with open(pidfile) as f:
        pid = int(f.read().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        os.kill(pid, 0)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
except (OSError, ValueError):
    pass
shutil.rmtree(base_dir, ignore_errors=True)
"""


class PgBouncer:
    """PgBouncer on 127.0.0.1 in front of ``cluster`` (see the module docstring).

    ``users``: the roles PgBouncer lets in (default: every LOGIN role with a password).
    ``max_prepared_statements`` needs PgBouncer 1.21 or later (:class:`PgBouncerError`
    otherwise). ``settings``: more ``[pgbouncer]`` settings, written as given.
    """

    def __init__(
        self,
        cluster: PgCluster,
        *,
        pool_mode: PoolMode = "transaction",
        default_pool_size: int = 2,
        max_client_conn: int = 100,
        max_prepared_statements: int | None = None,
        auth_type: AuthType = "scram-sha-256",
        users: Sequence[str] | None = None,
        settings: dict[str, str] | None = None,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.binary = Path(binary) if binary is not None else find_pgbouncer()
        self.version = pgbouncer_version(self.binary)
        if max_prepared_statements is not None and self.version < (1, 21):
            raise PgBouncerError(
                f"max_prepared_statements needs PgBouncer 1.21 or later; "
                f"{self.binary} is {'.'.join(map(str, self.version))}"
            )
        self.settings: dict[str, str] = {
            "pool_mode": pool_mode,
            "default_pool_size": str(default_pool_size),
            "max_client_conn": str(max_client_conn),
            "auth_type": auth_type,
        }
        if max_prepared_statements is not None:
            self.settings["max_prepared_statements"] = str(max_prepared_statements)
        self.settings.update(settings or {})
        self._users = list(users) if users is not None else None
        self._port = free_port()
        self._owner_pid = os.getpid()
        self._base_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._destroyed = False
        atexit.register(self._atexit_cleanup)

    # -- context manager ------------------------------------------------------

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<PgBouncer {HOST}:{self._port} {state} -> {self.cluster.host}:{self.cluster.port}>"

    # -- where ----------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_dir(self) -> Path:
        if self._base_dir is None:
            raise PgBouncerError("PgBouncer has not been started yet")
        return self._base_dir

    @property
    def log_path(self) -> Path:
        return self.base_dir / "pgbouncer.log"

    @property
    def ini_path(self) -> Path:
        return self.base_dir / "pgbouncer.ini"

    def dsn(
        self,
        user: str = SUPERUSER,
        password: str | None = None,
        dbname: str = "postgres",
        **extra: Any,
    ) -> str:
        """A libpq key=value string through PgBouncer (the cluster's passfile when no
        password is given; its entries match any port)."""
        return self.cluster.dsn(user, password, dbname, host=HOST, port=self._port, **extra)

    # -- lifecycle ------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The running pgbouncer's process id (None when stopped)."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Write the config (first time) and start; returns once it accepts connections."""
        if self._destroyed:
            raise PgBouncerError("PgBouncer was destroyed")
        if self.is_running():
            return
        if self._base_dir is None:
            self._create()
        self.write_config()
        log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
        kwargs: dict[str, Any] = {}
        if self.cluster.run_as is not None:  # we are root: the server's account
            user = pwd.getpwnam(self.cluster.run_as)
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        self._proc = subprocess.Popen(
            [str(self.binary), str(self.ini_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.base_dir,
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
            start_new_session=True,
            **kwargs,
        )
        self._wait_ready(log_size)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop at once (SIGTERM: immediate shutdown; SIGINT would wait for clients)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # immediate shutdown
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stop and remove the directory (idempotent)."""
        if self._destroyed:
            return
        try:
            self.stop()
            if self._base_dir is not None:
                shutil.rmtree(self._base_dir, ignore_errors=True)
        finally:
            self._destroyed = True
            self._release_watchdog()
            atexit.unregister(self._atexit_cleanup)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, PgBouncerError):
            return ""

    # -- configuration --------------------------------------------------------

    def write_config(self) -> None:
        """(Re)write pgbouncer.ini and the userlist from the current settings and the
        cluster's secrets; :meth:`reload` applies them to a running PgBouncer."""
        base = self.base_dir
        target = make_conninfo({"host": self.cluster.host, "port": self.cluster.port})
        settings = {
            "listen_addr": HOST,
            "listen_port": str(self._port),
            "unix_socket_dir": "",
            "auth_file": str(base / "userlist.txt"),
            "admin_users": SUPERUSER,
            "stats_users": SUPERUSER,
            "logfile": str(self.log_path),
            "pidfile": str(base / "pgbouncer.pid"),
            "ignore_startup_parameters": "extra_float_digits,options",
            "server_login_retry": "1",
            **self.settings,
        }
        ini = ["[databases]", f"* = {target}", "", "[pgbouncer]"]
        ini += [f"{key} = {value}" for key, value in settings.items()]
        self._write_private(self.ini_path, "\n".join(ini) + "\n")
        self._write_private(base / "userlist.txt", self._userlist())

    def configure(self, **settings: Any) -> None:
        """Change ``[pgbouncer]`` settings and RELOAD (e.g. ``default_pool_size=5``)."""
        self.settings.update({k: str(v) for k, v in settings.items()})
        self.write_config()
        if self.is_running():
            self.reload()

    def _userlist(self) -> str:
        rows = self.cluster.execute(
            "SELECT rolname, rolpassword FROM pg_authid"
            " WHERE rolcanlogin AND rolpassword IS NOT NULL"
            " AND (%(users)s::text[] IS NULL OR rolname = ANY(%(users)s::text[]))"
            " ORDER BY rolname",
            {"users": self._users},
        )

        def quoted(text: str) -> str:
            return '"' + text.replace('"', '""') + '"'

        return "".join(f"{quoted(name)} {quoted(secret)}\n" for name, secret in rows)

    def _write_private(self, path: Path, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.cluster.chown(path)

    # -- admin console --------------------------------------------------------

    @contextlib.contextmanager
    def admin(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """A connection to the admin console (simple query protocol, autocommit)."""
        conn = psycopg.connect(
            self.dsn(SUPERUSER, dbname="pgbouncer", connect_timeout=5),
            autocommit=True,
            cursor_factory=psycopg.ClientCursor,
            prepare_threshold=None,
        )
        try:
            yield conn
        finally:
            conn.close()

    def command(self, statement: str) -> list[dict[str, Any]]:
        """Run one admin console command (``SHOW POOLS``, ``PAUSE postgres``...); rows as
        dicts keyed by column name."""
        with self.admin() as conn:
            cur = conn.execute(statement.encode())
            if cur.description is None:
                return []
            names = [c.name for c in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` (POOLS, CLIENTS, SERVERS, DATABASES, STATS...)."""
        if not re.fullmatch(r"[A-Za-z_]+", what):
            raise ValueError(f"not a SHOW item: {what!r}")
        return self.command(f"SHOW {what.upper()}")

    def pool(self, database: str = "postgres", user: str = SUPERUSER) -> dict[str, Any]:
        """The ``SHOW POOLS`` row of one database/user pair (empty dict if none)."""
        for row in self.show("POOLS"):
            if row["database"] == database and row["user"] == user:
                return row
        return {}

    def pause(self, database: str | None = None) -> None:
        """PAUSE (all databases, or one): waits until server connections are released."""
        self.command("PAUSE" if database is None else self._with_db("PAUSE", database))

    def resume(self, database: str | None = None) -> None:
        self.command("RESUME" if database is None else self._with_db("RESUME", database))

    def reload(self) -> None:
        """RELOAD: re-read pgbouncer.ini and the userlist."""
        self.command("RELOAD")

    @staticmethod
    def _with_db(verb: str, database: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_]+", database):
            raise ValueError(f"not a plain database name: {database!r}")
        return f"{verb} {database}"

    # -- internals ------------------------------------------------------------

    def _create(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="greenpool-pgbouncer-"))
        self.cluster.chown(base)
        self._base_dir = base
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG_CODE, str(base / "pgbouncer.pid"), str(base)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,
            )
        except OSError:
            self._watchdog = None  # best effort; atexit still cleans up

    def _wait_ready(self, log_size: int) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                break
            try:
                self.command("SHOW VERSION")
                return
            except psycopg.Error as exc:
                last_error = exc
            time.sleep(0.05)
        try:
            with self.log_path.open(errors="replace") as f:
                f.seek(log_size)
                log = f.read()[-3000:]
        except OSError:
            log = ""
        self.stop()
        raise PgBouncerError(
            f"pgbouncer on {HOST}:{self._port} did not start (exit code "
            f"{self._proc.returncode if self._proc else None}, last error: {last_error})"
            f"\n--- log ---\n{log}"
        )

    def _release_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        try:
            if watchdog.stdin is not None:
                watchdog.stdin.close()
            watchdog.wait(timeout=20)
        except Exception:
            watchdog.kill()

    def _atexit_cleanup(self) -> None:
        if os.getpid() == self._owner_pid:
            self.destroy()
