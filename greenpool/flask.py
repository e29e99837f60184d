"""Flask extension: a pooled PostgreSQL connection per request, for gunicorn -k gevent.

::

    from greenpool.flask import GreenPool

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

See docs/flask.md for configuration, hooks, errors and deployment.
"""

from __future__ import annotations

from greenpool.flask_ext import (
    ConfigError,
    FlaskGreenPool,
    GreenPoolCollector,
    close_all_pools,
    stats_blueprint,
)

GreenPool = FlaskGreenPool

__all__ = [
    "ConfigError",
    "FlaskGreenPool",
    "GreenPool",
    "GreenPoolCollector",
    "close_all_pools",
    "stats_blueprint",
]
