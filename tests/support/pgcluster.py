"""A private, throwaway PostgreSQL cluster for the test-suite.

``PgCluster`` runs ``initdb`` into a temporary directory, starts a postmaster
listening only on ``127.0.0.1`` on a free TCP port, and removes everything
again on :meth:`PgCluster.destroy`, on interpreter exit (``atexit``) and -- via
a tiny watchdog process that notices when this process dies -- even when the
test process is killed outright.

Server binaries are looked up in this order:

1. the ``bindir`` argument, or the ``GREENPOOL_PG_BINDIR`` environment variable;
2. ``pg_config --bindir``;
3. ``/usr/lib/postgresql/<version>/bin`` (newest version first);
4. ``initdb``/``pg_ctl``/``postgres`` on ``PATH``;
5. the binaries bundled in the ``pgserver`` wheel (``pip install pgserver``),
   found inside the installed package (``pgserver/pginstall/bin``) without
   importing it.

PostgreSQL refuses to run as root, so when this process is root every server
command runs as the ``postgres`` system user (or ``nobody`` when there is no
such user) and the temporary directory is handed over to that user.

The admin helpers (:meth:`PgCluster.execute`, :meth:`PgCluster.backend_count`,
...) open one short-lived superuser connection per call with plain psycopg 3,
which is gevent-cooperative when it is imported after
``gevent.monkey.patch_all()``.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

__all__ = [
    "APP_PASSWORD",
    "APP_USER",
    "PW_PASSWORD",
    "PW_USER",
    "SUPERUSER",
    "ActiveQuery",
    "PgBinariesNotFoundError",
    "PgCluster",
    "PgClusterError",
    "find_pg_bindir",
]

#: Superuser created by initdb; trusted (no password) from 127.0.0.1.
SUPERUSER = "postgres"
#: A LOGIN role that must authenticate with scram-sha-256.
PW_USER = "greenpool_pw"
PW_PASSWORD = "s3cret-pw"
#: A second LOGIN role with a password, for "application" connections.
APP_USER = "greenpool_app"
APP_PASSWORD = "app-pw"

#: Environment variable that forces a specific PostgreSQL bin directory.
BINDIR_ENV = "GREENPOOL_PG_BINDIR"

HOST = "127.0.0.1"
ADMIN_APPLICATION_NAME = "pgcluster-admin"

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
# Module-level so tests can point discovery elsewhere.
_DEBIAN_BINDIR_GLOB = "/usr/lib/postgresql/*/bin"
_PGSERVER_PACKAGE = "pgserver"

_START_TIMEOUT = 30.0
_CMD_TIMEOUT = 120.0

StopMode = Literal["smart", "fast", "immediate"]


class PgClusterError(RuntimeError):
    """The throwaway cluster could not be created, started or stopped."""


class PgBinariesNotFoundError(PgClusterError):
    """No PostgreSQL server binaries could be found on this machine."""


class ActiveQuery(NamedTuple):
    """One row of :meth:`PgCluster.active_queries`."""

    pid: int
    application_name: str
    query: str
    wait_event_type: str | None
    wait_event: str | None
    running_for: float  # seconds since query_start


# --------------------------------------------------------------------------
# binary discovery
# --------------------------------------------------------------------------


def _has_server_binaries(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _version_key(path: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin -> numeric sort key
    version = Path(path).parent.name
    return tuple(int(p) for p in re.findall(r"\d+", version)) or (0,)


def _candidate_bindirs() -> list[tuple[str, Path]]:
    candidates: list[tuple[str, Path]] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            candidates.append(("pg_config --bindir", Path(out)))
    for path in sorted(glob.glob(_DEBIAN_BINDIR_GLOB), key=_version_key, reverse=True):
        candidates.append((_DEBIAN_BINDIR_GLOB, Path(path)))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(("PATH", Path(os.path.realpath(initdb)).parent))
    spec = importlib.util.find_spec(_PGSERVER_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(("pgserver wheel", Path(location) / "pginstall" / "bin"))
    return candidates


def find_pg_bindir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return a directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Raises :class:`PgBinariesNotFoundError` with installation hints if none is
    found.
    """
    forced = explicit if explicit is not None else os.environ.get(BINDIR_ENV)
    if forced:
        path = Path(forced)
        if not _has_server_binaries(path):
            raise PgBinariesNotFoundError(
                f"{path} does not contain {', '.join(_REQUIRED_BINARIES)}"
            )
        return path
    looked: list[str] = []
    for origin, path in _candidate_bindirs():
        if _has_server_binaries(path):
            return path
        looked.append(f"{path} ({origin})")
    raise PgBinariesNotFoundError(
        "No PostgreSQL server binaries (initdb, pg_ctl, postgres) found"
        + (f"; looked in: {', '.join(looked)}" if looked else "")
        + ". Install them with `apt-get install postgresql` (Debian/Ubuntu) or "
        "`pip install pgserver` (bundles the server binaries), or point "
        f"{BINDIR_ENV} at a PostgreSQL bin directory."
    )


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _run_user() -> pwd.struct_passwd | None:
    """The unprivileged account to run the server as (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PgClusterError(
        "running as root but neither a 'postgres' nor a 'nobody' user exists; "
        "PostgreSQL refuses to run as root"
    )


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (an exited postmaster whose
    parent, pg_ctl, is gone stays a zombie until init reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _read_postmaster_pid(data_dir: Path) -> int | None:
    try:
        first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        return int(first.strip())
    except (OSError, ValueError):
        return None


# The watchdog blocks on reading its stdin, whose write end only this process
# holds. When this process dies for any reason the read returns EOF and the
# watchdog shuts the cluster down (SIGQUIT = immediate shutdown) and removes
# the directory. A normal destroy() just closes the pipe after cleaning up,
# so the watchdog then finds nothing to do. No polling while waiting.
_WATCHDOG_CODE = r"""
import os, shutil, signal, sys, time
data_dir, base_dir = sys.argv[1], sys.argv[2]
try:
    sys.stdin.buffer.read()
except BaseException:
    pass
pid = None
try:
    with open(os.path.join(data_dir, "postmaster.pid")) as f:
        pid = int(f.readline().strip())
except (OSError, ValueError):
    pass
def alive(pid):
    try:
        os.kill(pid, 0)
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except ProcessLookupError:
        return False
    except OSError:
        return True
if pid:
    try:
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.05)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
shutil.rmtree(base_dir, ignore_errors=True)
"""


# --------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------


class PgCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (see module docstring).

    Usable as a context manager (``with PgCluster() as pg: ...``): entering
    starts it, leaving destroys it.
    """

    def __init__(
        self,
        *,
        bindir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        max_connections: int = 100,
        extra_settings: dict[str, str] | None = None,
    ) -> None:
        self._bindir = find_pg_bindir(bindir)
        self._user = _run_user()
        self._port_fixed = port is not None
        self._port: int = port if port is not None else _free_port()
        self._max_connections = max_connections
        self._extra_settings = dict(extra_settings or {})
        self._owner_pid = os.getpid()
        self._base_dir: Path | None = None
        self._initialized = False
        self._provisioned = False
        self._destroyed = False
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._atexit_registered = False

    # -- context manager ----------------------------------------------------

    def __enter__(self) -> PgCluster:
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
        return f"<PgCluster {self.host}:{self._port} {state} bindir={self._bindir}>"

    # -- properties ---------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def bindir(self) -> Path:
        return self._bindir

    @property
    def run_as(self) -> str | None:
        """Name of the account the server runs as (None: this process's user)."""
        return self._user.pw_name if self._user else None

    @property
    def base_dir(self) -> Path:
        if self._base_dir is None:
            raise PgClusterError("cluster has not been created yet (call start())")
        return self._base_dir

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "sock"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postgresql.log"

    @property
    def admin_dsn(self) -> str:
        """Superuser DSN (trust auth over TCP loopback)."""
        return self.dsn(SUPERUSER)

    def dsn(
        self,
        user: str = SUPERUSER,
        password: str | None = None,
        dbname: str = "postgres",
        **extra: Any,
    ) -> str:
        """libpq ``key=value`` string for a TCP loopback connection.

        ``extra`` keys are libpq parameters (``application_name``,
        ``connect_timeout``, ...); ``host``/``port`` may be overridden too,
        e.g. to go through a :class:`~tests.support.faultproxy.FaultProxy`.
        """
        params: dict[str, Any] = {
            "host": HOST,
            "port": self._port,
            "user": user,
            "dbname": dbname,
        }
        if password is not None:
            params["password"] = password
        params.update(extra)
        return make_conninfo("", **params)

    # -- lifecycle ----------------------------------------------------------

    def is_running(self) -> bool:
        if self._base_dir is None or self._destroyed:
            return False
        pid = _read_postmaster_pid(self.data_dir)
        return pid is not None and _pid_alive(pid)

    def start(self) -> None:
        """Create (first time), start and wait until connections are accepted."""
        if self._destroyed:
            raise PgClusterError("cluster was destroyed")
        if not self._initialized:
            self._create()
        if not self.is_running():
            self._start_server()
        self._wait_ready()
        if not self._provisioned:
            self._provision()

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (``fast``: disconnect clients; ``immediate``: abort)."""
        if not self.is_running():
            return
        proc = self._run(
            [
                str(self._bindir / "pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "-t",
                str(int(_START_TIMEOUT)),
            ],
            check=False,
        )
        if proc.returncode != 0 and self.is_running():
            raise PgClusterError(
                f"pg_ctl stop -m {mode} failed ({proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}\n--- log tail ---\n{self.log_tail()}"
            )

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop then start again; the port stays the same."""
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        """Stop immediately and remove the whole temporary directory."""
        if self._destroyed:
            return
        try:
            if self._base_dir is not None:
                try:
                    if self.is_running():
                        self.stop("immediate")
                except Exception:
                    self._signal_stop()
                shutil.rmtree(self._base_dir, ignore_errors=True)
        finally:
            self._destroyed = True
            self._release_watchdog()
            if self._atexit_registered:
                atexit.unregister(self._atexit_cleanup)
                self._atexit_registered = False

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the server log (empty if there is none yet)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, PgClusterError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- admin helpers ------------------------------------------------------

    def connect_admin(self, **extra: Any) -> psycopg.Connection[tuple[Any, ...]]:
        """A new autocommit superuser connection (caller closes it)."""
        params: dict[str, Any] = {
            "application_name": ADMIN_APPLICATION_NAME,
            "connect_timeout": 10,
        }
        params.update(extra)
        return psycopg.connect(self.dsn(SUPERUSER, **params), autocommit=True)

    def execute(
        self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """Run one statement as superuser (autocommit); return its rows, if any."""
        with self.connect_admin() as conn:
            cur = conn.execute(sql.encode(), params)  # bytes: any SQL is accepted
            if cur.description is None:
                return []
            return cur.fetchall()

    def backend_count(self, application_name: str | None = None) -> int:
        """Client backends (optionally with this application_name), not counting
        the admin connection used to ask."""
        rows = self.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend'"
            " AND pid <> pg_backend_pid()"
            " AND (%(app)s::text IS NULL OR application_name = %(app)s::text)",
            {"app": application_name},
        )
        return int(rows[0][0])

    def terminate_backends(self, application_name: str) -> int:
        """pg_terminate_backend() every client backend with this
        application_name, all at once; waits (up to 5 s) until they are gone.
        Returns how many were terminated.

        pg_terminate_backend(pid, timeout) would wait for each backend in turn, polling
        every 100 ms: ten backends then die one by one over a second, which is not the
        "all at once" fault the tests mean.
        """
        rows = self.execute(
            "SELECT coalesce(array_agg(pid) FILTER (WHERE pg_terminate_backend(pid)), '{}')"
            " FROM pg_stat_activity"
            " WHERE backend_type = 'client backend'"
            " AND pid <> pg_backend_pid()"
            " AND application_name = %(app)s::text",
            {"app": application_name},
        )
        pids: list[int] = list(rows[0][0])
        deadline = time.monotonic() + 5.0
        while True:
            left = self.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%(pids)s)",
                {"pids": pids},
            )[0][0]
            if not left or time.monotonic() >= deadline:
                return len(pids) - int(left)
            time.sleep(0.01)

    def active_queries(self, application_name: str | None = None) -> list[ActiveQuery]:
        """Client backends whose state is 'active' (excluding the asking one)."""
        rows = self.execute(
            "SELECT pid, application_name, query, wait_event_type, wait_event,"
            " extract(epoch FROM clock_timestamp() - query_start)::float8"
            " FROM pg_stat_activity"
            " WHERE backend_type = 'client backend'"
            " AND state = 'active'"
            " AND pid <> pg_backend_pid()"
            " AND (%(app)s::text IS NULL OR application_name = %(app)s::text)"
            " ORDER BY query_start",
            {"app": application_name},
        )
        return [ActiveQuery(int(r[0]), r[1], r[2], r[3], r[4], float(r[5] or 0.0)) for r in rows]

    # -- internals ----------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        return env

    def _run(self, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a server command as the unprivileged user, output to temp files
        (pipes can hang when the postmaster inherits them)."""
        kwargs: dict[str, Any] = {}
        if self._user is not None:
            kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
        cwd = str(self._base_dir) if self._base_dir is not None else None
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            try:
                proc = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=self._env(),
                    cwd=cwd,
                    timeout=_CMD_TIMEOUT,
                    check=False,
                    **kwargs,
                )
            except subprocess.TimeoutExpired as exc:
                raise PgClusterError(f"{argv[0]} timed out after {_CMD_TIMEOUT}s") from exc
            out.seek(0)
            err.seek(0)
            result = subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read())
        if check and result.returncode != 0:
            raise PgClusterError(
                f"{' '.join(argv)} failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _create(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="greenpool-pg-"))
        self._base_dir = base
        self._register_cleanup()
        try:
            self._initdb()
        except BaseException:
            # leave nothing behind; a later start() may try again from scratch
            shutil.rmtree(base, ignore_errors=True)
            self._release_watchdog()
            self._base_dir = None
            raise
        self._initialized = True

    def _initdb(self) -> None:
        self._chown(self.base_dir)
        self.socket_dir.mkdir(mode=0o700)
        self._chown(self.socket_dir)
        self._run(
            [
                str(self._bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        self._write_config()

    def _write_config(self) -> None:
        settings: dict[str, str] = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self._port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": str(self._max_connections),
            "shared_buffers": "'16MB'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": "'scram-sha-256'",
            "log_min_messages": "warning",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] %q%u@%d/%a '",
            "dynamic_shared_memory_type": "posix",
            "max_wal_senders": "0",
            "wal_level": "minimal",
        }
        settings.update(self._extra_settings)
        conf = self.data_dir / "greenpool.conf"
        conf.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        self._chown(conf)
        main_conf = self.data_dir / "postgresql.conf"
        text = main_conf.read_text()
        if "include 'greenpool.conf'" not in text:
            main_conf.write_text(text + "\ninclude 'greenpool.conf'\n")
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(
            "# TYPE  DATABASE  USER  ADDRESS  METHOD\n"
            f"local   all  {SUPERUSER}  trust\n"
            "local   all  all  scram-sha-256\n"
            f"host    all  {SUPERUSER}  127.0.0.1/32  trust\n"
            "host    all  all  127.0.0.1/32  scram-sha-256\n"
        )
        # files written by us (root) must stay readable by the server user
        self._chown(hba)
        self._chown(main_conf)

    def _pg_ctl_start(self) -> subprocess.CompletedProcess[str]:
        return self._run(
            [
                str(self._bindir / "pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(int(_START_TIMEOUT)),
            ],
            check=False,
        )

    def _start_server(self) -> None:
        for _attempt in range(3):
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            proc = self._pg_ctl_start()
            if proc.returncode == 0:
                return
            try:
                with self.log_path.open(errors="replace") as f:
                    f.seek(log_size)
                    new_log = f.read()
            except OSError:
                new_log = ""
            port_taken = "could not bind" in new_log or "Address already in use" in new_log
            if port_taken and not self._port_fixed and not self._provisioned:
                # lost the race for the free port before the first start: pick another
                self._port = _free_port()
                self._write_config()
                continue
            raise PgClusterError(
                f"pg_ctl start failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
                f"\n--- log tail ({self.log_path}) ---\n{self.log_tail()}"
            )
        raise PgClusterError(f"could not find a free port:\n{self.log_tail()}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with self.connect_admin(connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error as exc:
                last_error = exc
            if not self.is_running():
                break
            time.sleep(0.1)
        raise PgClusterError(
            f"PostgreSQL on {HOST}:{self._port} did not accept connections "
            f"within {_START_TIMEOUT:.0f}s (last error: {last_error})"
            f"\n--- log tail ({self.log_path}) ---\n{self.log_tail()}"
        )

    def _provision(self) -> None:
        with self.connect_admin() as conn:
            for role, password in ((PW_USER, PW_PASSWORD), (APP_USER, APP_PASSWORD)):
                exists = conn.execute(
                    "SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)
                ).fetchone()
                verb = "ALTER" if exists else "CREATE"
                conn.execute(
                    pgsql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
                        pgsql.SQL(verb),
                        pgsql.Identifier(role),
                        pgsql.Literal(password),
                    )
                )
                conn.execute(
                    pgsql.SQL(
                        "GRANT CONNECT, TEMPORARY ON DATABASE postgres TO {0};"
                        " GRANT USAGE, CREATE ON SCHEMA public TO {0}"
                    ).format(pgsql.Identifier(role))
                )
        self._provisioned = True

    # -- cleanup ------------------------------------------------------------

    def _register_cleanup(self) -> None:
        if not self._atexit_registered:
            atexit.register(self._atexit_cleanup)
            self._atexit_registered = True
        if self._watchdog is None and self._base_dir is not None:
            try:
                self._watchdog = subprocess.Popen(
                    [sys.executable, "-c", _WATCHDOG_CODE, str(self.data_dir), str(self._base_dir)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    close_fds=True,
                    start_new_session=True,
                )
            except OSError:
                self._watchdog = None  # best effort; atexit still cleans up

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

    def _signal_stop(self) -> None:
        """Immediate shutdown by signal (no subprocess); used at exit."""
        if self._base_dir is None:
            return
        pid = _read_postmaster_pid(self.data_dir)
        if pid is None or not _pid_alive(pid):
            return
        try:
            os.kill(pid, signal.SIGQUIT)
        except OSError:
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.05)
        if _pid_alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def _atexit_cleanup(self) -> None:
        if os.getpid() != self._owner_pid or self._destroyed:
            return  # a forked child must not tear down its parent's cluster
        try:
            self._signal_stop()
            if self._base_dir is not None:
                shutil.rmtree(self._base_dir, ignore_errors=True)
        finally:
            self._destroyed = True
            self._release_watchdog()
