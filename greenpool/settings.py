"""Pool settings: defaults, merging with conninfo-embedded values, and validation."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

MAX_POOL_SIZE = 10_000  # far above any PostgreSQL max_connections a pool could use
MAX_DURATION = 366 * 24 * 3600.0  # a year: anything longer is a typo, not a setting


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
        ):
            _check_seconds(name, getattr(self, name))
        if self.max_lifetime_jitter is not None:
            _check_seconds("max_lifetime_jitter", self.max_lifetime_jitter)
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
        for name in ("max_lifetime", "health_check_period", "ping_timeout", "connect_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be greater than 0, got {getattr(self, name)}")
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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number of seconds, got {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name}: must be a non-negative number of seconds, got {value}")
    if value > MAX_DURATION:
        raise ValueError(f"{name}: {value} s is absurd (limit {MAX_DURATION:g} s)")


def build_settings(explicit: dict[str, Any], from_conninfo: dict[str, Any]) -> PoolSettings:
    """Merge conninfo-embedded settings with explicit keywords (explicit wins) and validate.

    A max_size left unset grows to min_size when min_size is larger than the default.
    """
    known = {f.name for f in fields(PoolSettings)}
    merged = {**from_conninfo, **{k: v for k, v in explicit.items() if v is not None}}
    unknown = set(merged) - known
    if unknown:
        raise ValueError(f"unknown pool setting(s): {', '.join(sorted(unknown))}")
    settings = PoolSettings(**merged)
    if "max_size" not in merged and "min_size" in merged:
        _check_int("min_size", settings.min_size)
        settings.max_size = max(settings.max_size, settings.min_size)
    settings.validate()
    return settings
