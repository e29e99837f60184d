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
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import glob
import hashlib
import hmac
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

__all__ = [
    "BINDIR_ENV",
    "HOST",
    "SUPERUSER",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "PgBinariesNotFoundError",
    "find_pg_bindir",
    "free_port",
    "make_conninfo",
    "passfile_line",
    "scram_secret",
    "write_private",
]

#: Superuser created by initdb; authenticates with the random password in ``passfile``.
SUPERUSER = "postgres"
#: Environment variable that forces a PostgreSQL bin directory.
BINDIR_ENV = "GREENPOOL_PG_BINDIR"
#: The only address the server listens on.
HOST = "127.0.0.1"

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
# Module-level so tests can point discovery elsewhere.
_DEBIAN_BINDIR_GLOB = "/usr/lib/postgresql/*/bin"
_PGSERVER_PACKAGE = "pgserver"

_START_TIMEOUT = 30.0
_SCRAM_ITERATIONS = 1
_CMD_TIMEOUT = 120.0

StopMode = Literal["smart", "fast", "immediate"]


class EmbeddedPostgresError(RuntimeError):
    """The throwaway server could not be created, started or stopped."""


class PgBinariesNotFoundError(EmbeddedPostgresError):
    """No PostgreSQL server binaries were found on this machine."""


# --------------------------------------------------------------------------- binaries


def _has_server_binaries(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.name  # /usr/lib/postgresql/<version>/bin
    return tuple(int(p) for p in re.findall(r"\d+", version)) or (0,)


def _candidate_bindirs() -> list[tuple[str, Path]]:
    candidates: list[tuple[str, Path]] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
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
    spec = importlib.util.find_spec(_PGSERVER_PACKAGE)  # finds, does not import
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(("pgserver wheel", Path(location) / "pginstall" / "bin"))
    return candidates


def find_pg_bindir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """A directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Raises :class:`PgBinariesNotFoundError`, with installation hints, when there is none.
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


# --------------------------------------------------------------------------- helpers


def free_port(host: str = HOST) -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _run_user() -> pwd.struct_passwd | None:
    """The unprivileged account the server runs as (None: this process's user)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise EmbeddedPostgresError(
        "running as root but neither a 'postgres' nor a 'nobody' user exists; "
        "PostgreSQL refuses to run as root"
    )


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
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
        return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None


def write_private(path: Path, text: str, owner: pwd.struct_passwd | None = None) -> None:
    """Create ``path`` with mode 0600 (never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def scram_secret(password: str, iterations: int = 4096, salt: bytes | None = None) -> str:
    """A SCRAM-SHA-256 verifier for ``password``, as PostgreSQL stores it (RFC 5802/7677).

    Given as a role's password, PostgreSQL stores it as is; the iteration count in it is
    what the client must spend on every connection.
    """
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def passfile_line(host: str, port: int | str, user: str, password: str) -> str:
    """One ``~/.pgpass`` line, escaping ``:`` and ``\\`` as libpq expects."""

    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")

    return f"{esc(host)}:{esc(str(port))}:*:{esc(user)}:{esc(password)}\n"


def make_conninfo(params: dict[str, Any]) -> str:
    """A libpq ``key=value`` string; None values are left out, others quoted as needed."""
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        text = str(value)
        if not text or re.search(r"[\s'\\]", text):
            text = "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
        parts.append(f"{key}={text}")
    return " ".join(parts)


# The watchdog blocks reading its stdin, whose write end only this process holds. When
# this process dies for any reason the read returns EOF, and the watchdog shuts the
# server down (SIGQUIT: immediate shutdown) and removes the directory. destroy() cleans
# up first and then closes the pipe, so the watchdog finds nothing left to do.
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


# --------------------------------------------------------------------------- server


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
        self._user = _run_user()
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
        pid = _read_postmaster_pid(self.data_dir)
        return pid is not None and _pid_alive(pid)

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
            return  # a forked child must not tear down its parent's server
        try:
            self._signal_stop()
            if self._base_dir is not None:
                shutil.rmtree(self._base_dir, ignore_errors=True)
        finally:
            self._destroyed = True
            self._release_watchdog()
