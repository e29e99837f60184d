"""Flask integration: a pooled PostgreSQL connection per request, for gunicorn -k gevent.

::

    from greenpool import GreenPool

    db = GreenPool()

    def create_app():
        app = Flask(__name__)
        app.config["GREENPOOL_CONNINFO"] = "postgresql://app@db/app"
        db.init_app(app)
        return app

    @bp.get("/accounts/<int:id>")
    def account(id):
        with db.conn.cursor() as cur:
            ...

See docs/flask.md for configuration, hooks, errors and deployment. This module re-exports
what the integration adds: the config error, the stats blueprint and collector.
"""

from __future__ import annotations

from typing import Any

from greenpool.api import GreenPool
from greenpool.flask_ext.config import ConfigError
from greenpool.registry import close_all


def close_all_pools(timeout: float = 5.0) -> None:
    """Close every pool of this process (for gunicorn's ``worker_exit``); an alias of
    :func:`greenpool.close_all`."""
    close_all(timeout)


def stats_blueprint(name: str = "greenpool_stats", **options: Any) -> Any:
    """See :func:`greenpool.flask_ext.metrics.stats_blueprint`."""
    from greenpool.flask_ext.metrics import stats_blueprint as make

    return make(name, **options)


def __getattr__(name: str) -> Any:
    if name == "GreenPoolCollector":  # needs prometheus_client: imported on demand
        from greenpool.flask_ext.metrics import GreenPoolCollector

        return GreenPoolCollector
    raise AttributeError(name)


__all__ = [  # noqa: F822 (GreenPoolCollector comes from __getattr__)
    "ConfigError",
    "GreenPool",
    "GreenPoolCollector",
    "close_all_pools",
    "stats_blueprint",
]
