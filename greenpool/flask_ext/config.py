"""Reading and validating the ``GREENPOOL_*`` keys of a Flask ``app.config``.

Everything is checked when ``init_app`` runs, without connecting: unknown keys, wrong
types, out-of-range sizes and conninfos libpq would refuse (bad syntax, unknown keywords:
libpq's own parser reads them) raise :class:`ConfigError` naming the offending key, never
quoting a value. Values are never echoed (a conninfo or bind may carry a password).
"""

from __future__ import annotations

import difflib
import importlib
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from greenpool import conninfo as _ci
from greenpool import pooler
from greenpool.errors import PoolError
from greenpool.settings import PoolSettings, build_settings

PREFIX = "GREENPOOL_"
DEFAULT = "default"  # display name of the database configured at the top level
KNOWN_DRIVERS = ("psycopg", "psycopg3", "psycopg2")

_HINTS = typing.get_type_hints(PoolSettings)
#: Pool settings (PoolSettings fields) and whether each is a whole number.
POOL_SETTINGS: dict[str, bool] = {f.name: _HINTS[f.name] is int for f in fields(PoolSettings)}
#: Per-database keys besides the numeric pool settings.
DATABASE_KEYS = (
    "conninfo",
    "kwargs",
    "driver",
    "name",
    "configure",
    "check",
    "reset",
    "before_connect",
    "pooler_mode",
    "replicas",
    "max_replica_lag",
    "replica_fallback",
)
DATABASE_CALLBACKS = ("configure", "check", "reconnect_failed", "before_connect")
#: Keys a bind inherits from the top level when it does not set them itself.
INHERITED = (
    *POOL_SETTINGS,
    "driver",
    "configure",
    "check",
    "reset",
    "reconnect_failed",
    "before_connect",
    "pooler_mode",
)
#: Keys that only make sense at the top level.
EXTENSION_KEYS = (
    "binds",
    "commit_on_success",
    "require_cooperation",
    "retry_after",
    "handle_exhaustion",
    "prometheus",
    "otel",
)
#: Keys that were renamed: old -> new.
RENAMED = {"commit_on_teardown": "commit_on_success"}
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,63}")
_TOP_LEVEL = (*POOL_SETTINGS, *DATABASE_KEYS, "reconnect_failed", *EXTENSION_KEYS)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(PoolError, ValueError):
    """The Flask configuration of greenpool is invalid; the message names the key."""


@dataclass
class DatabaseConfig:
    """Everything needed to build one core pool, validated."""

    key: str | None  # None for the default database, else the bind name
    conninfo: str
    pool_name: str
    driver: str = "psycopg"
    kwargs: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # explicit pool settings
    configure: Callable[[Any], None] | None = None
    check: Callable[[Any], None] | None = None
    reset: Callable[[Any], None] | str | None = "default"
    reconnect_failed: Callable[[Any], None] | None = None
    before_connect: Callable[[dict[str, Any]], None] | None = None
    pooler_mode: str | None = None
    replicas: dict[str, Any] = field(default_factory=dict)  # replicas= and friends

    def __repr__(self) -> str:
        # Never the conninfo or kwargs: they may carry a password, and this object is a
        # local in request-path frames that error reporters record.
        return f"<DatabaseConfig {self.label!r} pool={self.pool_name!r} {self.describe()}>"

    @property
    def label(self) -> str:
        """``default`` or the bind name."""
        return self.key or DEFAULT

    def pool_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`greenpool.GreenPool` / :func:`greenpool.get_pool`."""
        return {
            **self.settings,
            "driver": self.driver,
            "name": self.pool_name,
            "kwargs": self.kwargs,
            "configure": self.configure,
            "check": self.check,
            "reset": self.reset,
            "reconnect_failed": self.reconnect_failed,
            "before_connect": self.before_connect,
            "pooler_mode": self.pooler_mode,
            **self.replicas,
        }

    def effective_settings(self) -> PoolSettings:
        """The pool settings after merging those embedded in the conninfo."""
        return build_settings(self.settings, _ci.split_conninfo(self.conninfo).pool_settings)

    def describe(self) -> str:
        """Host, port, database and user: never the password."""
        parsed = _ci.split_conninfo(self.conninfo)
        return _ci.describe(
            parsed.params, {k: v for k, v in self.kwargs.items() if k != "password"}
        )


@dataclass
class ExtensionOptions:
    """Request-level behaviour of the extension."""

    commit_on_success: bool = True  # commit in after_request when the status is < 400
    require_cooperation: bool | None = None  # None: "auto", see docs/flask.md
    retry_after: int = 1
    handle_exhaustion: bool = True
    #: Histograms for Prometheus: None (auto: on once stats_blueprint is registered or a
    #: GreenPoolCollector made), True, False.
    prometheus: bool | None = None
    #: OpenTelemetry metrics: False, True (the global meter provider) or a MeterProvider.
    otel: Any = False


@dataclass
class ParsedConfig:
    """The validated configuration of one app."""

    databases: dict[str | None, DatabaseConfig]
    options: ExtensionOptions
    top: dict[str, Any]  # top-level settings, inherited by databases added later
    base_name: str  # prefix of pool names


# ---------------------------------------------------------------------------- coercion


_INT = re.compile(r"-?[0-9]{1,9}")


def _as_int(label: str, value: Any) -> int:
    if isinstance(value, str):
        if _INT.fullmatch(value.strip()):
            return int(value.strip())
        raise ConfigError(f"{label}: expected a whole number of at most 9 ASCII digits")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{label}: expected a whole number, got {type(value).__name__}")
    return value


def _as_seconds(label: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            return _ci.parse_duration(value, name=label)
        except ValueError as ex:
            raise ConfigError(str(ex)) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"{label}: expected seconds or a duration like '30s', got {type(value).__name__}"
        )
    return float(value)


def _as_bool(label: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{label}: expected true or false")


def _as_tristate(label: str, value: Any) -> bool | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    return _as_bool(label, value)


def _require(label: str, module: str, extra: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{label}: needs {module}: pip install 'greenpool[{extra}]'") from None


def _unknown(label: str, key: str, known: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"{label}: unknown greenpool setting{hint}")


# ---------------------------------------------------------------------------- databases


class _Labels:
    """How keys of one database are called in error messages."""

    def __init__(self, bind: str | None) -> None:
        self.bind = bind

    def __call__(self, key: str) -> str:
        if self.bind is None:
            return PREFIX + key.upper()
        return f"{PREFIX}BINDS[{self.bind!r}][{key!r}]"


def _database(
    key: str | None, raw: Mapping[str, Any], pool_name: str, labels: _Labels
) -> DatabaseConfig:
    conninfo = raw.get("conninfo")
    if not isinstance(conninfo, str):
        raise ConfigError(
            f"{labels('conninfo')}: expected a connection string, got {type(conninfo).__name__}"
        )
    try:
        parsed = _ci.split_conninfo(conninfo)
    except ValueError as ex:
        raise ConfigError(f"{labels('conninfo')}: {ex}") from None
    settings: dict[str, Any] = {}
    for name, is_int in POOL_SETTINGS.items():
        value = raw.get(name)
        if value is not None:
            convert = _as_int if is_int else _as_seconds
            settings[name] = convert(labels(name), value)
    try:
        build_settings(settings, parsed.pool_settings)
    except ValueError as ex:
        name, _, rest = str(ex).partition(": ")
        where = labels(name) if name in settings else f"{labels('conninfo')} ({name})"
        raise ConfigError(f"{where}: {rest or ex}") from None
    driver = raw.get("driver") or "psycopg"
    if driver not in KNOWN_DRIVERS and not hasattr(driver, "connect"):
        raise ConfigError(
            f"{labels('driver')}: unknown driver (use 'psycopg' or 'psycopg2')"
        )
    kwargs = raw.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"{labels('kwargs')}: expected a dict of connect() keyword arguments")
    for name in DATABASE_CALLBACKS:
        value = raw.get(name)
        if value is not None and not callable(value):
            raise ConfigError(f"{labels(name)}: expected a callable, got {type(value).__name__}")
    try:
        pooler_mode = pooler.mode(raw.get("pooler_mode"), parsed.pooler_mode)
    except ValueError as ex:
        raise ConfigError(f"{labels('pooler_mode')}: {str(ex).partition(': ')[2]}") from None
    try:
        pooler.reset_policy(pooler_mode, raw.get("reset", "default"))
    except ValueError as ex:
        raise ConfigError(f"{labels('reset')}: {str(ex).partition(': ')[2] or ex}") from None
    name = raw.get("name") or pool_name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"{labels('name')}: a pool name must be 1-63 ASCII letters, digits, '_', '.' or '-'"
        )
    return DatabaseConfig(
        key=key,
        conninfo=conninfo,
        pool_name=name,
        driver=driver,
        kwargs=dict(kwargs),
        settings=settings,
        configure=raw.get("configure"),
        check=raw.get("check"),
        reset=raw.get("reset", "default"),
        reconnect_failed=raw.get("reconnect_failed"),
        before_connect=raw.get("before_connect"),
        pooler_mode=pooler_mode,
        replicas=_replicas(raw, labels),
    )


def _replicas(raw: Mapping[str, Any], labels: _Labels) -> dict[str, Any]:
    """``replicas``, ``max_replica_lag`` and ``replica_fallback``, validated."""
    result: dict[str, Any] = {}
    replicas = raw.get("replicas")
    if replicas is None:
        return result
    if isinstance(replicas, str):
        replicas = [replicas]
    if not isinstance(replicas, (list, tuple)) or not all(
        isinstance(r, str) or (isinstance(r, Mapping) and isinstance(r.get("conninfo"), str))
        for r in replicas
    ):
        raise ConfigError(
            f"{labels('replicas')}: expected a list of conninfos (or dicts with 'conninfo')"
        )
    for i, replica in enumerate(replicas):
        text = replica if isinstance(replica, str) else replica["conninfo"]
        try:
            _ci.split_conninfo(text)
        except ValueError as ex:
            raise ConfigError(f"{labels('replicas')}[{i}]: {ex}") from None
    result["replicas"] = list(replicas)
    if raw.get("max_replica_lag") is not None:
        result["max_replica_lag"] = _as_seconds(labels("max_replica_lag"), raw["max_replica_lag"])
    fallback = raw.get("replica_fallback")
    if fallback is not None:
        if fallback not in ("primary", "fail"):
            raise ConfigError(f"{labels('replica_fallback')}: expected 'primary' or 'fail'")
        result["replica_fallback"] = fallback
    return result


def database_from(
    bind: Any, spec: Any, top: Mapping[str, Any], base_name: str
) -> DatabaseConfig:
    """A named database (a bind, or one added at run time) from its settings or its
    conninfo, inheriting what the top level sets and it does not."""
    label = PREFIX + "BINDS"
    if not isinstance(bind, str) or not _NAME.fullmatch(bind) or bind == DEFAULT:
        raise ConfigError(
            f"{label}: a bind name must be 1-63 ASCII letters, digits, '_', '.' or '-' "
            f"(and not {DEFAULT!r})"
        )
    labels = _Labels(bind)
    if isinstance(spec, str):
        spec = {"conninfo": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{label}[{bind!r}]: expected a dict of settings or a conninfo")
    known = (*POOL_SETTINGS, *DATABASE_KEYS, "reconnect_failed")
    for key in spec:
        if key not in known:
            raise _unknown(labels(key), str(key), known)
    if "conninfo" not in spec:
        raise ConfigError(f"{labels('conninfo')}: every bind needs a conninfo")
    merged = {k: top[k] for k in INHERITED if top.get(k) is not None}
    merged.update({k: v for k, v in spec.items() if v is not None})
    return _database(bind, merged, f"{base_name}-{bind}"[:63], labels)


def _binds(value: Any, top: Mapping[str, Any], base_name: str) -> dict[str | None, DatabaseConfig]:
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{PREFIX}BINDS: expected a dict of name -> settings, got {type(value).__name__}"
        )
    return {bind: database_from(bind, spec, top, base_name) for bind, spec in value.items()}


# ---------------------------------------------------------------------------- entry point


def parse_config(
    config: Mapping[str, Any], app_name: str, own_pool: str | None = None
) -> ParsedConfig:
    """Validate ``app.config`` and return the databases and options it configures.

    ``own_pool`` is the name of the pool the extension object is itself (created with a
    conninfo): it then serves the default database, which the config must not set."""
    top: dict[str, Any] = {}
    for full_key, value in config.items():
        if not isinstance(full_key, str) or not full_key.startswith(PREFIX):
            continue
        key = full_key[len(PREFIX) :].lower()
        if key in RENAMED:
            raise ConfigError(f"{full_key} was renamed {PREFIX}{RENAMED[key].upper()}")
        if key not in _TOP_LEVEL:
            known = tuple(PREFIX + k.upper() for k in _TOP_LEVEL)
            raise _unknown(full_key, full_key, known)
        top[key] = value

    options = ExtensionOptions()
    if "commit_on_success" in top:
        options.commit_on_success = _as_bool(PREFIX + "COMMIT_ON_SUCCESS", top["commit_on_success"])
    if "handle_exhaustion" in top:
        options.handle_exhaustion = _as_bool(PREFIX + "HANDLE_EXHAUSTION", top["handle_exhaustion"])
    if "require_cooperation" in top:
        options.require_cooperation = _as_tristate(
            PREFIX + "REQUIRE_COOPERATION", top["require_cooperation"]
        )
    if "prometheus" in top:
        options.prometheus = _as_tristate(PREFIX + "PROMETHEUS", top["prometheus"])
        if options.prometheus:
            _require(PREFIX + "PROMETHEUS", "prometheus_client", "prometheus")
    if "otel" in top:
        value = top["otel"]
        options.otel = value if hasattr(value, "get_meter") else _as_bool(PREFIX + "OTEL", value)
        if options.otel:
            _require(PREFIX + "OTEL", "opentelemetry.metrics", "otel")
    if top.get("retry_after") is not None:
        options.retry_after = _as_int(PREFIX + "RETRY_AFTER", top["retry_after"])
        if options.retry_after < 0:
            raise ConfigError(f"{PREFIX}RETRY_AFTER: must not be negative")

    name = top.get("name")
    if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
        raise ConfigError(
            f"{PREFIX}NAME: a pool name must be 1-63 ASCII letters, digits, '_', '.' or '-'"
        )
    base_name = name or (re.sub(r"[^A-Za-z0-9_.-]", "_", app_name)[:50] or "app")
    databases: dict[str | None, DatabaseConfig] = {}
    conninfo = top.get("conninfo")
    if own_pool is not None:
        if conninfo is not None:
            raise ConfigError(
                f"{PREFIX}CONNINFO: the extension object is the pool {own_pool!r}, created "
                "with its own conninfo; remove the key, or create GreenPool() without one"
            )
    elif conninfo is None:
        conninfo = config.get("DATABASE_URL")
    if conninfo is not None and own_pool is None:
        raw = {**top, "conninfo": conninfo}
        databases[None] = _database(None, raw, base_name, _Labels(None))
    if top.get("binds"):
        databases.update(_binds(top["binds"], top, base_name))
    if not databases and own_pool is None:
        raise ConfigError(
            f"{PREFIX}CONNINFO: no database configured; set {PREFIX}CONNINFO or DATABASE_URL "
            "(an empty string uses libpq's PG* environment variables) or "
            f"{PREFIX}BINDS"
        )
    return ParsedConfig(databases, options, top, base_name)
