"""Example app: accounts and transfers on PostgreSQL through greenpool's Flask extension.

``create_app()`` is the factory; ``wsgi:app`` is what gunicorn serves
(``greenpool.examples.flask_app.wsgi:app`` when installed from the wheel).
Configuration: ``DATABASE_URL`` plus any ``FLASK_GREENPOOL_*`` environment variable
(``FLASK_GREENPOOL_MAX_SIZE=4`` sets ``GREENPOOL_MAX_SIZE``), or a mapping passed to
``create_app``. ``REPORTING_DATABASE_URL`` points the ``reporting`` bind at a replica;
without it the bind uses the primary through read-only sessions. The pool statistics
(``/_greenpool/stats``, ``/_greenpool/metrics``) answer loopback clients only, or those
sending ``X-Stats-Token`` equal to ``STATS_TOKEN`` (``FLASK_STATS_TOKEN``).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from typing import Any

import click
from flask import Flask, current_app, request

from greenpool import GreenPool
from greenpool.flask import stats_blueprint

db = GreenPool()

_LOOPBACK = ("127.0.0.1", "::1")


def stats_allowed() -> bool:
    """Who may read /_greenpool/stats and /metrics: clients on this machine (the demo, a
    local Prometheus agent), or whoever sends ``X-Stats-Token`` equal to STATS_TOKEN."""
    token = current_app.config.get("STATS_TOKEN")
    sent = request.headers.get("X-Stats-Token", "")
    if token and hmac.compare_digest(sent.encode(), str(token).encode()):
        return True
    return request.remote_addr in _LOOPBACK


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app; no database connection is made until a request needs one."""
    app = Flask(__name__)
    app.config.update(
        DATABASE_URL=os.environ.get("DATABASE_URL", ""),
        GREENPOOL_NAME="greenpool-example",
        GREENPOOL_MIN_SIZE=2,
        GREENPOOL_MAX_SIZE=10,
        # A request that cannot get a connection within 10 s gets a 503, not a hang.
        GREENPOOL_TIMEOUT=10,
        GREENPOOL_RETRY_AFTER=2,
    )
    app.config.from_prefixed_env()  # FLASK_GREENPOOL_MAX_SIZE=4 -> GREENPOOL_MAX_SIZE
    if config:
        app.config.update(config)
    if "GREENPOOL_BINDS" not in app.config:
        primary = app.config.get("GREENPOOL_CONNINFO", app.config["DATABASE_URL"])
        app.config["GREENPOOL_BINDS"] = {
            "reporting": {
                "conninfo": os.environ.get("REPORTING_DATABASE_URL", primary),
                "kwargs": {"options": "-c default_transaction_read_only=on"},
                "min_size": 0,
                "max_size": 3,
            }
        }
    db.init_app(app)

    from .views import bp

    app.register_blueprint(bp)
    app.register_blueprint(stats_blueprint(authorize=stats_allowed), url_prefix="/_greenpool")

    @app.cli.command("init-db")
    @click.option("--accounts", default=1000, show_default=True, help="Accounts to seed.")
    @click.option("--reset", is_flag=True, help="Drop the example schema first.")
    def init_db(accounts: int, reset: bool) -> None:
        """Create the example schema (idempotent)."""
        from .schema import SCHEMA, setup

        with db.connection() as conn:  # CLI commands borrow explicitly
            count = setup(conn, accounts=accounts, reset=reset)
        click.echo(f"schema {SCHEMA} ready: {count} accounts")

    return app
