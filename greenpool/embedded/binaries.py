"""Where the PostgreSQL server binaries are, and the errors of the embedded server.

Looked up in this order: the ``bindir`` argument or ``$GREENPOOL_PG_BINDIR``;
``pg_config --bindir``; ``/usr/lib/postgresql/<version>/bin`` (newest first); ``initdb``
on ``PATH``; the binaries bundled in the ``pgserver`` wheel (found inside the installed
package, without importing it).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["BINDIR_ENV", "EmbeddedPostgresError", "PgBinariesNotFoundError", "find_pg_bindir"]

#: Environment variable that forces a PostgreSQL bin directory.
BINDIR_ENV = "GREENPOOL_PG_BINDIR"

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
# Module-level so tests can point discovery elsewhere.
_DEBIAN_BINDIR_GLOB = "/usr/lib/postgresql/*/bin"
_PGSERVER_PACKAGE = "pgserver"


class EmbeddedPostgresError(RuntimeError):
    """The throwaway server could not be created, started or stopped."""


class PgBinariesNotFoundError(EmbeddedPostgresError):
    """No PostgreSQL server binaries were found on this machine."""


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
