"""Pool settings: defaults, merging with conninfo-embedded values, and validation."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

MAX_POOL_SIZE = 1_000  # above any PostgreSQL max_connections one process's pool could use
MAX_DURATION = 366 * 24 * 3600.0  # a year: anything longer is a typo, not a setting
# Floors: shorter values would make the pool churn connections (hundreds per second).
# Largest max_size a conninfo may ask for (pool_max_conns): whoever controls a conninfo
# (a tenant's database name in a template, say) must not size the pool.
MAX_CONNINFO_POOL_SIZE = 100
MIN_LIFETIME = 0.5
MIN_IDLE_TIME = 0.1
MIN_HEALTH_CHECK_PERIOD = 0.1


@dataclass
class PoolSettings:
    """Numeric settings of a pool; see the README's configuration table."""

    min_size: int = 1
    max_size: int = 10
    min_idle: int = 0
    timeout: float = 30.0
    max_waiting: int = 0
    max_idle: float = 600.0
    max_lifetime: float = 3600.0
    max_lifetime_jitter: float | None = None
    health_check_period: float = 60.0
    reconnect_timeout: float = 300.0
    check_idle_after: float = 1.0
    ping_timeout: float = 5.0
    connect_timeout: float = 10.0
    max_connecting: int = 2
    leak_threshold: float | None = None  # log connections held longer (off by default)
    saturation_warning_after: float = 30.0  # warn after this long at >= 90 % in use

    def lifetime_jitter(self) -> float:
        """Jitter in seconds: explicit, or 5% of max_lifetime."""
        if self.max_lifetime_jitter is not None:
            return self.max_lifetime_jitter
        return self.max_lifetime * 0.05

    def validate(self) -> None:
        """Raise ValueError naming the first parameter that is out of range."""
        for name in ("min_size", "max_size", "min_idle", "max_waiting", "max_connecting"):
            _check_int(name, getattr(self, name))
        for name in (
            "timeout",
            "max_idle",
            "max_lifetime",
            "health_check_period",
            "reconnect_timeout",
            "check_idle_after",
            "ping_timeout",
            "connect_timeout",
            "saturation_warning_after",
        ):
            _check_seconds(name, getattr(self, name))
        for name in ("max_lifetime_jitter", "leak_threshold"):
            if getattr(self, name) is not None:
                _check_seconds(name, getattr(self, name))
        if self.leak_threshold is not None and self.leak_threshold <= 0:
            raise ValueError(f"leak_threshold: must be greater than 0, got {self.leak_threshold}")
        if self.max_size < 1:
            raise ValueError(f"max_size: must be at least 1, got {self.max_size}")
        if self.max_size > MAX_POOL_SIZE:
            raise ValueError(f"max_size: {self.max_size} is absurd (limit {MAX_POOL_SIZE})")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size: {self.min_size} is greater than max_size {self.max_size}")
        if self.min_idle > self.max_size:
            raise ValueError(f"min_idle: {self.min_idle} is greater than max_size {self.max_size}")
        if self.max_connecting < 1:
            raise ValueError(f"max_connecting: must be at least 1, got {self.max_connecting}")
        for name in ("ping_timeout", "connect_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be greater than 0, got {getattr(self, name)}")
        for name, floor in (
            ("max_lifetime", MIN_LIFETIME),
            ("max_idle", MIN_IDLE_TIME),
            ("health_check_period", MIN_HEALTH_CHECK_PERIOD),
        ):
            if getattr(self, name) < floor:
                raise ValueError(
                    f"{name}: {getattr(self, name):g} s is too short (at least {floor:g} s; "
                    "shorter values churn connections)"
                )
        if self.lifetime_jitter() > self.max_lifetime:
            raise ValueError(
                f"max_lifetime_jitter: {self.lifetime_jitter()} exceeds max_lifetime "
                f"{self.max_lifetime}"
            )


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected a whole number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name}: must not be negative, got {value}")


def _check_seconds(name: str, value: Any) -> None:
    seconds(name, value)


def seconds(name: str, value: Any) -> float:
    """Validate a duration argument (a setting or a call's timeout) and return it as float.

    NaN, infinities, negative numbers, booleans, non-numbers and values above a year get
    a ValueError naming ``name``: a NaN timer corrupts libev's timer heap (no greenlet runs
    again) and an infinite one waits forever, so neither may reach gevent. Never switches.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number of seconds, got {type(value).__name__}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name}: must be a non-negative number of seconds, got {value}")
    if value > MAX_DURATION:
        raise ValueError(f"{name}: {value:g} s is absurd (limit {MAX_DURATION:g} s)")
    return float(value)


def build_settings(explicit: dict[str, Any], from_conninfo: dict[str, Any]) -> PoolSettings:
    """Merge conninfo-embedded settings with explicit keywords (explicit wins) and validate.

    A max_size left unset grows to min_size when min_size is larger than the default.
    """
    known = {f.name for f in fields(PoolSettings)}
    merged = {**from_conninfo, **{k: v for k, v in explicit.items() if v is not None}}
    unknown = set(merged) - known
    if unknown:
        raise ValueError(f"unknown pool setting(s): {', '.join(sorted(unknown))}")
    for key, param in (("max_size", "pool_max_conns"), ("min_size", "pool_min_conns")):
        value = from_conninfo.get(key)
        if explicit.get(key) is None and isinstance(value, int) and value > MAX_CONNINFO_POOL_SIZE:
            raise ValueError(
                f"{param}: {value} is above what a conninfo may set ({MAX_CONNINFO_POOL_SIZE}); "
                f"pass {key}= explicitly"
            )
    settings = PoolSettings(**merged)
    if "max_size" not in merged and "min_size" in merged:
        _check_int("min_size", settings.min_size)
        settings.max_size = max(settings.max_size, settings.min_size)
    settings.validate()
    return settings
