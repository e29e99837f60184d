"""Connection strings: pool settings embedded pgxpool-style, and redaction of secrets.

A conninfo may be a URL (``postgresql://user:pw@host/db?pool_max_conns=10``) or a libpq
key=value string (``host=db pool_max_conns=10``). The ``pool_*`` settings are cut out of
the text exactly where they stand and every other character reaches libpq untouched: the
tokeniser below follows libpq's own rules (ASCII whitespace only, single quotes and
backslashes; ``&``-separated, percent-decoded URL parameters with no ``+`` decoding), and
what remains is parsed by libpq itself (``psycopg.conninfo.conninfo_to_dict``), which
also rejects unknown keywords. Nothing here ever puts a password or a conninfo value in a
message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from greenpool.hosts import Attempt, host_attempts

# pgxpool's parameter name -> GreenPool keyword, and whether it is a duration.
POOL_PARAMS: dict[str, tuple[str, bool]] = {
    "pool_max_conns": ("max_size", False),
    "pool_min_conns": ("min_size", False),
    "pool_min_idle_conns": ("min_idle", False),
    "pool_max_conn_lifetime": ("max_lifetime", True),
    "pool_max_conn_lifetime_jitter": ("max_lifetime_jitter", True),
    "pool_max_conn_idle_time": ("max_idle", True),
    "pool_health_check_period": ("health_check_period", True),
    "pool_pooler_mode": ("pooler_mode", False),
}

SECRET_KEYS = frozenset({"password", "sslpassword", "oauth_client_secret"})
_SAFE_KEYS = ("host", "hostaddr", "port", "dbname", "user", "application_name")
_URL_PREFIXES = ("postgresql://", "postgres://")
_HOST_KEYS = ("host", "hostaddr", "port", "target_session_attrs", "load_balance_hosts")
_LIBPQ_SPACE = " \t\n\r\f\v"  # C isspace() in libpq: ASCII only

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")
_PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_WHOLE_NUMBER = re.compile(r"[0-9]{1,9}")


def parse_duration(text: str, *, name: str) -> float:
    """Parse ``90s``, ``1h30m``, ``250ms`` or a plain number of seconds into seconds.

    Raises ValueError naming the parameter (never quoting the text) when it is not one.
    """
    s = text.strip()
    if _PLAIN_NUMBER.fullmatch(s) and len(s) <= 30:
        return float(s)
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos == 0 or pos != len(s) or len(s) > 60:
        raise ValueError(
            f"{name}: not a duration (use e.g. '90s', '1h30m', '250ms' or seconds)"
        )
    return total


def parse_whole_number(text: str, *, name: str) -> int:
    """Parse ASCII digits (at most nine) into an int; ValueError naming the parameter."""
    s = text.strip()
    if not _WHOLE_NUMBER.fullmatch(s):
        raise ValueError(f"{name}: not a whole number of at most 9 ASCII digits")
    return int(s)


@dataclass
class ParsedConninfo:
    """A conninfo split into what libpq gets and the pool settings it carried.

    ``conninfo`` is the user's text with the ``pool_*`` settings cut out; ``params`` is
    libpq's own reading of it (secrets included: never print it).
    """

    conninfo: str
    pool_settings: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    pooler_mode: str | None = None  # pool_pooler_mode, if the conninfo set it

    def __repr__(self) -> str:
        return f"ParsedConninfo({describe(self.params, {})!r}, pool_settings={self.pool_settings})"


def _take_pool_param(key: str, value: str, settings: dict[str, Any]) -> None:
    if key not in POOL_PARAMS:
        known = ", ".join(sorted(POOL_PARAMS))
        raise ValueError(f"conninfo: unknown pool parameter {key!r} (known: {known})")
    kwarg, is_duration = POOL_PARAMS[key]
    if kwarg == "pooler_mode":
        settings[kwarg] = value.strip()
    elif is_duration:
        settings[kwarg] = parse_duration(value, name=key)
    else:
        settings[kwarg] = parse_whole_number(value, name=key)


def _keyvalue_tokens(text: str) -> Iterator[tuple[str, str, int, int]]:
    """Yield (key, value, start, end) for each parameter of a key=value string, the span
    covering the parameter and the whitespace before it, by libpq's conninfo_parse rules."""
    i, n = 0, len(text)
    previous = ""
    while True:
        start = i
        while i < n and text[i] in _LIBPQ_SPACE:
            i += 1
        if i >= n:
            return
        key_start = i
        while i < n and text[i] != "=" and text[i] not in _LIBPQ_SPACE:
            i += 1
        key = text[key_start:i]
        while i < n and text[i] in _LIBPQ_SPACE:
            i += 1
        if i >= n or text[i] != "=":
            # Never quote the text: an unquoted "password=abc def" makes "def" a key.
            where = f"after {previous!r}" if previous else "first"
            raise ValueError(f"conninfo: the parameter {where} has no '=' (key=value syntax)")
        i += 1
        while i < n and text[i] in _LIBPQ_SPACE:
            i += 1
        chars: list[str] = []
        if i < n and text[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise ValueError("conninfo: unterminated quoted value")
                c = text[i]
                if c == "\\":
                    i += 1
                    if i < n:
                        chars.append(text[i])
                        i += 1
                elif c == "'":
                    i += 1
                    break
                else:
                    chars.append(c)
                    i += 1
        else:
            while i < n and text[i] not in _LIBPQ_SPACE:
                if text[i] == "\\":
                    i += 1
                    if i < n:
                        chars.append(text[i])
                        i += 1
                else:
                    chars.append(text[i])
                    i += 1
        previous = key
        yield key, "".join(chars), start, i


def _split_keyvalue(text: str, settings: dict[str, Any]) -> str:
    kept: list[str] = []
    pos = 0
    for key, value, start, end in _keyvalue_tokens(text):
        if key.startswith("pool_"):
            _take_pool_param(key, value, settings)
            kept.append(text[pos:start])
            pos = end
    kept.append(text[pos:])
    return "".join(kept)


def _split_url(text: str, settings: dict[str, Any]) -> str:
    base, sep, query = text.partition("?")
    if not sep:
        return text
    kept: list[str] = []
    for segment in query.split("&"):
        key, eq, value = segment.partition("=")
        decoded = unquote(key, errors="strict")
        if eq and decoded.startswith("pool_"):
            _take_pool_param(decoded, unquote(value, errors="strict"), settings)
        else:
            kept.append(segment)
    return base + ("?" + "&".join(kept) if kept else "")


def libpq_parse(conninfo: str) -> dict[str, str]:
    """libpq's own reading of a conninfo (``PQconninfoParse``), through psycopg 3, or
    through psycopg2 where psycopg 3 cannot be imported; the driver's error is raised."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        from psycopg2.extensions import parse_dsn

        return {k: str(v) for k, v in parse_dsn(conninfo).items() if v is not None}
    return {k: str(v) for k, v in conninfo_to_dict(conninfo).items() if v is not None}


def _libpq_params(conninfo: str) -> dict[str, str]:
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(conninfo)
    except Error as ex:
        # libpq quotes the offending fragment, which may be a password: say less.
        reason = "unknown parameter" if "invalid connection option" in str(ex) else "bad syntax"
        raise ValueError(
            f"conninfo: libpq cannot parse the connection string ({reason}); check its "
            "key=value pairs or URL syntax"
        ) from None
    return {k: str(v) for k, v in params.items()}


def split_conninfo(conninfo: str) -> ParsedConninfo:
    """Cut the pool settings out of a conninfo and have libpq parse the rest.

    Raises ValueError naming what is wrong, without quoting any value.
    """
    if not isinstance(conninfo, str):
        raise ValueError(f"conninfo: expected a string, got {type(conninfo).__name__}")
    if "\x00" in conninfo:
        raise ValueError("conninfo: contains a NUL character")
    settings: dict[str, Any] = {}
    is_url = conninfo.startswith(_URL_PREFIXES)
    if not is_url and "://" in conninfo.split("=", 1)[0]:
        raise ValueError("conninfo: unsupported URL scheme (use postgresql://)")
    try:
        clean = _split_url(conninfo, settings) if is_url else _split_keyvalue(conninfo, settings)
    except UnicodeDecodeError:
        raise ValueError("conninfo: a URL parameter is not valid percent-encoded UTF-8") from None
    params = _libpq_params(clean) if clean.strip() else {}
    for port in params.get("port", "").split(","):
        if port.strip() and not (port.strip().isascii() and port.strip().isdigit()):
            raise ValueError("conninfo: port is not a number (or a comma-separated list)")
    if is_url and "@" in params.get("host", ""):
        raise ValueError(
            "conninfo: a host name contains '@'; percent-encode '@' in the URL's user name or "
            "password as %40"
        )
    pooler_mode = settings.pop("pooler_mode", None)
    return ParsedConninfo(clean, settings, params, pooler_mode)


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

    def add(self, secrets: Iterable[str]) -> None:
        """Mask these too from now on (secrets made at run time: rotated passwords)."""
        new = {s for s in secrets if s} - set(self._secrets)
        if new:
            self._secrets = sorted({*self._secrets, *new}, key=len, reverse=True)

    def __repr__(self) -> str:
        return f"<Redactor of {len(self._secrets)} secret(s)>"


def secrets_of(conninfo: str, params: Mapping[str, Any], kwargs: Mapping[str, Any]) -> list[str]:
    """The secret values libpq will use, as parsed and as written in the conninfo text."""
    found = [str(v) for k, v in params.items() if k in SECRET_KEYS and v]
    found += [str(v) for k, v in kwargs.items() if k in SECRET_KEYS and v]
    if conninfo.startswith(_URL_PREFIXES):
        from urllib.parse import quote

        found += [quote(s, safe="") for s in list(found)]
        authority = conninfo.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
        userinfo, at, _ = authority.rpartition("@")
        if at and ":" in userinfo:
            found.append(userinfo.split(":", 1)[1])  # the raw text, whatever libpq made of it
    return found


def describe(params: Mapping[str, Any], kwargs: Mapping[str, Any]) -> str:
    """A short, secret-free description such as ``host=db port=5432 dbname=app user=web``."""
    merged = {**params, **{k: str(v) for k, v in kwargs.items()}}
    shown = [f"{k}={merged[k]}" for k in _SAFE_KEYS if merged.get(k)]
    return " ".join(shown) or "(libpq defaults)"


def without_pool_keys(conninfo: str) -> str:
    """The conninfo as libpq should get it (pool settings removed), for dedicated
    connections opened outside the pool."""
    return split_conninfo(conninfo).conninfo


class ConninfoText(str):
    """A conninfo whose repr masks its secrets; ``str()`` is the real text for libpq."""

    def __new__(cls, text: str, redact: Redactor) -> ConninfoText:
        obj = super().__new__(cls, text)
        obj._redact = redact
        return obj

    _redact: Redactor

    def __repr__(self) -> str:
        return repr(self._redact(str(self)))


@dataclass
class Target:
    """Where and how a pool connects: what libpq gets, and how to talk about it safely."""

    conninfo: str  # pool settings removed
    kwargs: dict[str, Any]  # connect() keyword arguments (application_name added)
    params: dict[str, str]  # libpq's reading of conninfo (secrets included)
    redact: Redactor
    description: str  # host, port, dbname, user: never a secret
    #: One bounded attempt per host when the conninfo lists several (see greenpool.hosts);
    #: each attempt's conninfo names its host, and ``attempt_kwargs`` leave them out.
    attempts: list[Attempt] | None = None
    attempt_kwargs: dict[str, Any] | None = None
    target_session_attrs: str | None = None
    pooler_mode: str | None = None  # pool_pooler_mode from the conninfo

    def __repr__(self) -> str:
        return f"<Target {self.description}>"


_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")


def libpq_connect_timeout(text: str) -> float:
    """``connect_timeout`` as libpq reads it: whole seconds per host; zero or negative
    means no bound of its own (inf: the pool's connect_timeout still bounds the connect);
    1 is taken as 2 (libpq's minimum). ValueError for anything but an integer, which
    libpq would refuse when connecting."""
    if len(text) > 20 or not _INTEGER.fullmatch(text):
        raise ValueError(
            f"connect_timeout: libpq reads a whole number of seconds, not {text[:20]!r}"
        )
    seconds = int(text)
    if seconds <= 0:
        return math.inf
    return float(max(seconds, 2))


def make_target(
    conninfo: str, kwargs: Mapping[str, Any], application_name: str
) -> tuple[Target, dict[str, Any]]:
    """Parse ``conninfo`` and return the connection target and the pool settings it
    carried (``connect_timeout`` among them: libpq ignores it in async mode, so the pool
    enforces it). Raises ValueError naming what is wrong."""
    parsed = split_conninfo(conninfo)
    settings = dict(parsed.pool_settings)
    merged = dict(parsed.params)
    merged.update({k: str(kwargs[k]) for k in _HOST_KEYS if kwargs.get(k) is not None})
    timeout_param = parsed.params.get("connect_timeout") or kwargs.get("connect_timeout")
    per_host = None
    if timeout_param is not None:
        # libpq's connect_timeout bounds each host; the pool's connect_timeout all of them.
        per_host = libpq_connect_timeout(str(timeout_param))
    attempts = host_attempts(merged, per_host)
    if per_host is not None and per_host != math.inf:
        settings["connect_timeout"] = per_host * (len(attempts) if attempts else 1)
    connect_kwargs = dict(kwargs)
    if "application_name" not in parsed.params and "application_name" not in kwargs:
        connect_kwargs["application_name"] = application_name
    target = Target(
        conninfo=parsed.conninfo,
        kwargs=connect_kwargs,
        params=parsed.params,
        redact=Redactor(secrets_of(conninfo, parsed.params, kwargs)),
        description=describe(
            parsed.params, {k: v for k, v in kwargs.items() if k not in SECRET_KEYS}
        ),
        attempts=attempts,
        attempt_kwargs=(
            {k: v for k, v in connect_kwargs.items() if k not in _HOST_KEYS}
            if attempts
            else None
        ),
        target_session_attrs=merged.get("target_session_attrs"),
        pooler_mode=parsed.pooler_mode,
    )
    return target, settings
