"""``EmbeddedPostgres``: a throwaway PostgreSQL server (see :mod:`greenpool.embedded`)."""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from greenpool.embedded.binaries import EmbeddedPostgresError, find_pg_bindir
from greenpool.embedded.credentials import (
    make_conninfo,
    passfile_line,
    scram_secret,
    write_private,
)
from greenpool.embedded.process import (
    HOST,
    WATCHDOG_CODE,
    free_port,
    pid_alive,
    read_postmaster_pid,
    run_user,
)

__all__ = ["SUPERUSER", "EmbeddedPostgres", "StopMode"]

#: Superuser created by initdb; authenticates with the random password in ``passfile``.
SUPERUSER = "postgres"

_START_TIMEOUT = 30.0
_SCRAM_ITERATIONS = 1
_CMD_TIMEOUT = 120.0

StopMode = Literal["smart", "fast", "immediate"]


class EmbeddedPostgres:
    """A throwaway PostgreSQL server on 127.0.0.1 (see the module docstring).

    ``with EmbeddedPostgres() as pg: psycopg.connect(pg.dsn())``: entering starts it,
    leaving destroys it. The port stays the same across :meth:`stop` and :meth:`start`.
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
        self._user = run_user()
        self._port_fixed = port is not None
        self._port: int = port if port is not None else free_port()
        self._max_connections = max_connections
        self._extra_settings = dict(extra_settings or {})
        self._password = secrets.token_urlsafe(24)
        self._owner_pid = os.getpid()
        self._base_dir: Path | None = None
        self._initialized = False
        self._ready_once = False
        self._destroyed = False
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._atexit_registered = False

    # -- context manager ------------------------------------------------------

    def __enter__(self) -> EmbeddedPostgres:
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
        return f"<{type(self).__name__} {HOST}:{self._port} {state} bindir={self._bindir}>"

    # -- where things are -----------------------------------------------------

    @property
    def host(self) -> str:
        """The address the server listens on (always 127.0.0.1)."""
        return HOST

    @property
    def port(self) -> int:
        """The TCP port, kept across stop and start."""
        return self._port

    @property
    def bindir(self) -> Path:
        """The PostgreSQL bin directory in use."""
        return self._bindir

    @property
    def max_connections(self) -> int:
        """The server's max_connections."""
        return self._max_connections

    @property
    def extra_settings(self) -> dict[str, str]:
        """The settings given on top of :meth:`settings` (a copy)."""
        return dict(self._extra_settings)

    @property
    def run_as(self) -> str | None:
        """The account the server runs as (None: this process's user)."""
        return self._user.pw_name if self._user else None

    @property
    def base_dir(self) -> Path:
        """The temporary directory holding everything (removed by :meth:`destroy`)."""
        if self._base_dir is None:
            raise EmbeddedPostgresError("the server has not been created yet (call start())")
        return self._base_dir

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        """The Unix socket directory (mode 0700, owned by the server's account)."""
        return self.base_dir / "sock"

    @property
    def log_path(self) -> Path:
        """The server log."""
        return self.base_dir / "postgresql.log"

    @property
    def passfile(self) -> Path:
        """The libpq password file (mode 0600, owned by this process's user)."""
        return self.base_dir / "pgpass"

    @property
    def admin_dsn(self) -> str:
        """Superuser DSN over TCP loopback; the password comes from :attr:`passfile`."""
        return self.dsn()

    def dsn(
        self,
        user: str = SUPERUSER,
        password: str | None = None,
        dbname: str = "postgres",
        **extra: Any,
    ) -> str:
        """A libpq ``key=value`` string for a TCP loopback connection.

        Without ``password`` libpq looks in :attr:`passfile` (which knows the superuser's).
        ``extra`` keys are libpq parameters; ``host``/``port`` may be overridden too, e.g.
        to go through a proxy on 127.0.0.1.
        """
        params: dict[str, Any] = {"host": HOST, "port": self._port, "user": user}
        params["dbname"] = dbname
        if password is not None:
            params["password"] = password
        else:
            params["passfile"] = str(self.passfile)
        params.update(extra)
        return make_conninfo(params)

    # -- lifecycle ------------------------------------------------------------

    def is_running(self) -> bool:
        """Whether the postmaster is alive."""
        if self._base_dir is None or self._destroyed:
            return False
        pid = read_postmaster_pid(self.data_dir)
        return pid is not None and pid_alive(pid)

    def start(self) -> None:
        """Create (the first time), start, and wait until connections are accepted."""
        if self._destroyed:
            raise EmbeddedPostgresError("the server was destroyed")
        if not self._initialized:
            self._create()
        if not self.is_running():
            self._start_server()
        self._wait_ready()
        if not self._ready_once:
            self._first_ready()
            self._ready_once = True

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (``fast``: disconnect clients; ``immediate``: abort)."""
        if not self.is_running():
            return
        timeout = str(int(_START_TIMEOUT))
        pg_ctl = str(self._bindir / "pg_ctl")
        proc = self.run([pg_ctl, "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", timeout])
        if proc.returncode != 0 and self.is_running():
            raise EmbeddedPostgresError(
                f"pg_ctl stop -m {mode} failed ({proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}\n--- log tail ---\n{self.log_tail()}"
            )

    def destroy(self) -> None:
        """Stop at once and remove the whole temporary directory (idempotent)."""
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
        """The last lines of the server log (empty if there is none yet)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, EmbeddedPostgresError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def run(self, argv: list[str], *, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a command as the server's account, in :attr:`base_dir`, without ``PG*``
        variables; output goes through temporary files (pipes can hang when a
        postmaster inherits them)."""
        kwargs: dict[str, Any] = {}
        if self._user is not None:
            kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
        cwd = str(self._base_dir) if self._base_dir is not None else None
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            try:
                proc = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd,
                    timeout=_CMD_TIMEOUT, check=False, **kwargs,
                )  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                raise EmbeddedPostgresError(f"{argv[0]} timed out after {_CMD_TIMEOUT}s") from exc
            out.seek(0)
            err.seek(0)
            result = subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read())
        if check and result.returncode != 0:
            raise EmbeddedPostgresError(
                f"{' '.join(argv)} failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def chown(self, path: Path) -> None:
        """Give ``path`` to the server's account (when this process is root)."""
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    # -- what subclasses may extend ------------------------------------------

    def settings(self) -> dict[str, str]:
        """postgresql.conf settings (``extra_settings`` applied over these)."""
        return {
            "listen_addresses": f"'{HOST}'",
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

    def hba_lines(self) -> list[str]:
        """pg_hba.conf: a password (SCRAM) for everyone, over TCP and the socket alike."""
        return [
            "# TYPE  DATABASE     USER  ADDRESS       METHOD",
            "local   all          all                 scram-sha-256",
            f"host    all          all   {HOST}/32  scram-sha-256",
            f"host    replication  all   {HOST}/32  scram-sha-256",
        ]

    def _first_ready(self) -> None:
        """Runs once, after the first successful start (subclasses provision here)."""

    # -- internals ------------------------------------------------------------

    def _create(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="greenpool-pg-"))
        self._base_dir = base
        self._register_cleanup()
        try:
            self._initdb()
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)  # a later start() begins afresh
            self._release_watchdog()
            self._base_dir = None
            raise
        self._initialized = True

    def _initdb(self) -> None:
        self.chown(self.base_dir)
        self.socket_dir.mkdir(mode=0o700)
        self.chown(self.socket_dir)
        # initdb reads the password from a file only the server's account can read. It
        # gets the SCRAM verifier, stored as is: the password is 192 random bits, so key
        # stretching (4096 PBKDF2 rounds by default, about 12 ms of CPU per connection on
        # client and server) protects nothing here and would only slow every connect.
        pwfile = self.base_dir / "initdb.pw"
        write_private(pwfile, scram_secret(self._password, _SCRAM_ITERATIONS) + "\n", self._user)
        try:
            self.run(
                [
                    str(self._bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                    f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8",
                    "--locale=C", "--no-sync",
                ],
                check=True,
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        lines = [passfile_line(h, "*", SUPERUSER, self._password) for h in (HOST, "localhost")]
        write_private(self.passfile, "".join(lines))
        self._write_config()

    def _write_config(self) -> None:
        settings = {**self.settings(), **self._extra_settings}
        conf = self.data_dir / "greenpool.conf"
        conf.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        self.chown(conf)
        main_conf = self.data_dir / "postgresql.conf"
        text = main_conf.read_text()
        if "include 'greenpool.conf'" not in text:
            main_conf.write_text(text + "\ninclude 'greenpool.conf'\n")
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text("\n".join(self.hba_lines()) + "\n")
        self.chown(hba)  # written by us (maybe root): must stay the server's
        self.chown(main_conf)

    def _start_server(self) -> None:
        for _attempt in range(3):
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            proc = self.run(
                [
                    str(self._bindir / "pg_ctl"), "start", "-D", str(self.data_dir),
                    "-l", str(self.log_path), "-w", "-t", str(int(_START_TIMEOUT)),
                ]
            )  # fmt: skip
            if proc.returncode == 0:
                return
            try:
                with self.log_path.open(errors="replace") as f:
                    f.seek(log_size)
                    new_log = f.read()
            except OSError:
                new_log = ""
            port_taken = "could not bind" in new_log or "Address already in use" in new_log
            if port_taken and not self._port_fixed and not self._ready_once:
                # lost the race for the free port before the first start: take another
                self._port = free_port()
                self._write_config()
                continue
            raise EmbeddedPostgresError(
                f"pg_ctl start failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
                f"\n--- log tail ({self.log_path}) ---\n{self.log_tail()}"
            )
        raise EmbeddedPostgresError(f"could not find a free port:\n{self.log_tail()}")

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + _START_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(
                    self.dsn(application_name="greenpool-embedded", connect_timeout=2),
                    autocommit=True,
                ) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error as exc:
                last_error = exc
            if not self.is_running():
                break
            time.sleep(0.1)
        raise EmbeddedPostgresError(
            f"PostgreSQL on {HOST}:{self._port} did not accept connections "
            f"within {_START_TIMEOUT:.0f}s (last error: {last_error})"
            f"\n--- log tail ({self.log_path}) ---\n{self.log_tail()}"
        )

    # -- cleanup --------------------------------------------------------------

    def _register_cleanup(self) -> None:
        if not self._atexit_registered:
            atexit.register(self._atexit_cleanup)
            self._atexit_registered = True
        if self._watchdog is None and self._base_dir is not None:
            try:
                self._watchdog = subprocess.Popen(
                    [sys.executable, "-c", WATCHDOG_CODE, str(self.data_dir), str(self._base_dir)],
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
        pid = read_postmaster_pid(self.data_dir)
        if pid is None or not pid_alive(pid):
            return
        try:
            os.kill(pid, signal.SIGQUIT)
        except OSError:
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.05)
        if pid_alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def _atexit_cleanup(self) -> None:
        if os.getpid() != self._owner_pid or self._destroyed:
            return  # a forked child must not tear down its parent's server
        try:
            self._signal_stop()
            if self._base_dir is not None:
                shutil.rmtree(self._base_dir, ignore_errors=True)
        finally:
            self._destroyed = True
            self._release_watchdog()
