"""The example bank with Flask-SQLAlchemy's ORM on greenpool (``poolclass=GreenQueuePool``).

Same schema and endpoints as examples/flask_app, written with SQLAlchemy models and
sessions instead of raw connections. ``create_app()`` is the factory;
``examples.flask_sqlalchemy_app.wsgi:app`` is what gunicorn serves.

Configuration (environment): ``DATABASE_URL`` (a libpq key=value string or a
``postgresql://`` URL), ``ORM_NAME`` (application_name of the connections, default
``greenpool-orm-example``), ``ORM_POOL_SIZE`` (4), ``ORM_POOL_TIMEOUT`` (5 s). The
``reporting`` bind (at most 2 + 1 connections, read-only sessions) serves
``/reports/summary``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import URL, make_url
from sqlalchemy.orm import DeclarativeBase

from greenpool.sqlalchemy import GreenQueuePool, url_from_conninfo
from greenpool.sqlalchemy.flask import init_app as init_greenpool_errors


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


def database_url(text: str, application_name: str) -> URL:
    """A SQLAlchemy URL (psycopg 3 dialect) from a libpq URL or key=value string."""
    if text.startswith("postgresql+"):
        return make_url(text).update_query_dict({"application_name": application_name})
    return url_from_conninfo(text, "psycopg", application_name=application_name)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app; no connection is made until a request needs one."""
    app = Flask(__name__)
    name = os.environ.get("ORM_NAME", "greenpool-orm-example")
    dsn = os.environ.get("DATABASE_URL", "host=127.0.0.1 dbname=postgres")
    size = int(os.environ.get("ORM_POOL_SIZE", "4"))
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url(dsn, name),
        SQLALCHEMY_ENGINE_OPTIONS={
            "poolclass": GreenQueuePool,
            "pool_size": size,
            "max_overflow": 0,
            "pool_timeout": float(os.environ.get("ORM_POOL_TIMEOUT", "5")),
            "pool_logging_name": name,
        },
        SQLALCHEMY_BINDS={
            "reporting": {
                "url": database_url(dsn, f"{name}-reporting"),
                "poolclass": GreenQueuePool,
                "pool_size": 2,
                "max_overflow": 1,
                "pool_logging_name": f"{name}-reporting",
                "connect_args": {"options": "-c default_transaction_read_only=on"},
            }
        },
    )
    if config:
        app.config.update(config)
    db.init_app(app)
    init_greenpool_errors(app, retry_after=2)

    from examples.flask_sqlalchemy_app.views import bp

    app.register_blueprint(bp)
    return app
