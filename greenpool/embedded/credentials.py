"""Secrets and connection strings of the embedded server: private files, SCRAM verifiers,
libpq password-file lines and conninfo strings."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import pwd
import re
import secrets
from pathlib import Path
from typing import Any

__all__ = ["make_conninfo", "passfile_line", "scram_secret", "write_private"]


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
