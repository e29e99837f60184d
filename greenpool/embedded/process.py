"""The processes of the embedded server: its port, the account it runs as, whether its
postmaster lives, and the watchdog that removes it when this process dies."""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
from pathlib import Path

from greenpool.embedded.binaries import EmbeddedPostgresError

__all__ = ["HOST", "WATCHDOG_CODE", "free_port", "pid_alive", "read_postmaster_pid", "run_user"]

#: The only address the server listens on.
HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def run_user() -> pwd.struct_passwd | None:
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


def pid_alive(pid: int) -> bool:
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


def read_postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None


# The watchdog blocks reading its stdin, whose write end only this process holds. When
# this process dies for any reason the read returns EOF, and the watchdog shuts the
# server down (SIGQUIT: immediate shutdown) and removes the directory. destroy() cleans
# up first and then closes the pipe, so the watchdog finds nothing left to do.
WATCHDOG_CODE = r"""
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
