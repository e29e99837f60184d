"""The Flask integration of greenpool; import it as :mod:`greenpool.flask`."""

from __future__ import annotations

from greenpool.flask_ext.config import ConfigError
from greenpool.flask_ext.extension import FlaskGreenPool
from greenpool.flask_ext.metrics import GreenPoolCollector, stats_blueprint
from greenpool.flask_ext.state import close_all_pools

__all__ = [
    "ConfigError",
    "FlaskGreenPool",
    "GreenPoolCollector",
    "close_all_pools",
    "stats_blueprint",
]
