"""Connection strings: pool settings embedded pgxpool-style, and redaction of secrets.

A conninfo may be a URL (``postgresql://user:pw@host/db?pool_max_conns=10``) or a libpq
key=value string (``host=db pool_max_conns=10``). Pool settings (``pool_*``) are stripped
before libpq sees the string. Nothing here ever puts a password in a message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

# pgxpool's parameter name -> GreenPool keyword, and whether it is a duration.
POOL_PARAMS: dict[str, tuple[str, bool]] = {
    "pool_max_conns": ("max_size", False),
    "pool_min_conns": ("min_size", False),
    "pool_min_idle_conns": ("min_idle", False),
    "pool_max_conn_lifetime": ("max_lifetime", True),
    "pool_max_conn_lifetime_jitter": ("max_lifetime_jitter", True),
    "pool_max_conn_idle_time": ("max_idle", True),
    "pool_health_check_period": ("health_check_period", True),
}

SECRET_KEYS = frozenset({"password", "sslpassword"})
_SAFE_KEYS = ("host", "hostaddr", "port", "dbname", "user", "application_name")

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_duration(text: str, *, name: str) -> float:
    """Parse ``90s``, ``1h30m``, ``250ms`` or a plain number of seconds into seconds.

    Raises ValueError naming the parameter when the text is not a duration.
    """
    s = text.strip()
    if _PLAIN_NUMBER.fullmatch(s):
        return float(s)
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos == 0 or pos != len(s):
        raise ValueError(
            f"{name}: {text!r} is not a duration (use e.g. '90s', '1h30m', '250ms' or seconds)"
        )
    return total


def _parse_int(text: str, *, name: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a whole number") from None


@dataclass
class ParsedConninfo:
    """A conninfo split into what libpq gets and the pool settings it carried."""

    conninfo: str
    pool_settings: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


def _take_pool_param(key: str, value: str, settings: dict[str, Any]) -> None:
    if key not in POOL_PARAMS:
        known = ", ".join(sorted(POOL_PARAMS))
        raise ValueError(f"unknown pool parameter {key!r} in conninfo (known: {known})")
    kwarg, is_duration = POOL_PARAMS[key]
    settings[kwarg] = (
        parse_duration(value, name=key) if is_duration else _parse_int(value, name=key)
    )


def _split_url(conninfo: str) -> ParsedConninfo:
    parts = urlsplit(conninfo)
    settings: dict[str, Any] = {}
    kept: list[tuple[str, str]] = []
    params: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key.startswith("pool_"):
            _take_pool_param(key, value, settings)
        else:
            kept.append((key, value))
            params[key] = value
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password is not None:
        params["password"] = unquote(parts.password)
    if parts.hostname:
        params["host"] = parts.hostname
    try:
        port = parts.port
    except ValueError:
        raise ValueError("conninfo: the URL's port is not a number") from None
    if port is not None:
        params["port"] = str(port)
    if parts.path.strip("/"):
        params["dbname"] = unquote(parts.path.lstrip("/"))
    clean = urlunsplit(parts._replace(query=urlencode(kept)))
    return ParsedConninfo(clean, settings, params)


def _tokenize_keyvalue(conninfo: str) -> Iterable[tuple[str, str]]:
    """Yield (key, value) pairs of a libpq key=value string (quotes and backslashes)."""
    i, n = 0, len(conninfo)
    while True:
        while i < n and conninfo[i].isspace():
            i += 1
        if i >= n:
            return
        start = i
        while i < n and conninfo[i] != "=" and not conninfo[i].isspace():
            i += 1
        key = conninfo[start:i]
        while i < n and conninfo[i].isspace():
            i += 1
        if i >= n or conninfo[i] != "=" or not key:
            raise ValueError(f"conninfo: missing '=' after parameter {key!r}")
        i += 1
        while i < n and conninfo[i].isspace():
            i += 1
        chars: list[str] = []
        if i < n and conninfo[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise ValueError(f"conninfo: unterminated quoted value for {key!r}")
                c = conninfo[i]
                if c == "\\" and i + 1 < n:
                    chars.append(conninfo[i + 1])
                    i += 2
                elif c == "'":
                    i += 1
                    break
                else:
                    chars.append(c)
                    i += 1
        else:
            while i < n and not conninfo[i].isspace():
                if conninfo[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(conninfo[i])
                i += 1
        yield key, "".join(chars)


def _quote(value: str) -> str:
    if value and not any(c.isspace() or c in "'\\" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def make_keyvalue(params: Mapping[str, str]) -> str:
    """Build a libpq key=value string from a mapping."""
    return " ".join(f"{k}={_quote(v)}" for k, v in params.items())


def split_conninfo(conninfo: str) -> ParsedConninfo:
    """Strip pool settings from a conninfo; raise ValueError naming what is wrong."""
    if not isinstance(conninfo, str):
        raise ValueError(f"conninfo: expected a string, got {type(conninfo).__name__}")
    if conninfo.startswith(("postgresql://", "postgres://")):
        return _split_url(conninfo)
    if "://" in conninfo.split(" ", 1)[0]:
        scheme = conninfo.split("://", 1)[0]
        raise ValueError(f"conninfo: unsupported URL scheme {scheme!r} (use postgresql://)")
    settings: dict[str, Any] = {}
    params: dict[str, str] = {}
    for key, value in _tokenize_keyvalue(conninfo):
        if key.startswith("pool_"):
            _take_pool_param(key, value, settings)
        else:
            params[key] = value
    return ParsedConninfo(make_keyvalue(params), settings, params)


class Redactor:
    """Masks known secret values in any text before it leaves the pool."""

    MASK = "********"

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first so a secret containing another is masked whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, self.MASK)
        return text


def secrets_of(params: Mapping[str, Any], kwargs: Mapping[str, Any]) -> list[str]:
    """The secret values present in parsed conninfo params and connect kwargs."""
    found = [str(v) for k, v in params.items() if k in SECRET_KEYS and v]
    found += [str(v) for k, v in kwargs.items() if k in SECRET_KEYS and v]
    return found


def describe(params: Mapping[str, Any], kwargs: Mapping[str, Any]) -> str:
    """A short, secret-free description such as ``host=db port=5432 dbname=app user=web``."""
    merged = {**params, **{k: str(v) for k, v in kwargs.items()}}
    shown = [f"{k}={merged[k]}" for k in _SAFE_KEYS if merged.get(k)]
    return " ".join(shown) or "(libpq defaults)"
