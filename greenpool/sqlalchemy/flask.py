"""Flask-SQLAlchemy on greenpool: pool exhaustion answered 503 with Retry-After.

    from greenpool.sqlalchemy import GreenQueuePool
    from greenpool.sqlalchemy.flask import init_app

    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"poolclass": GreenQueuePool, "pool_size": 10,
                                               "max_overflow": 0, "pool_timeout": 5}
    db.init_app(app)
    init_app(app, retry_after=2)
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify, request
from sqlalchemy import exc as sa_exc

logger = logging.getLogger("greenpool")


def init_app(app: Flask, retry_after: int = 2) -> None:
    """Answer ``503 Service Unavailable`` (``Retry-After: retry_after``) when a request
    cannot get a connection within ``pool_timeout`` (SQLAlchemy's ``TimeoutError``)."""

    @app.errorhandler(sa_exc.TimeoutError)
    def _exhausted(error: sa_exc.TimeoutError) -> Any:
        logger.warning(
            "greenpool: %s %s answered 503 (Retry-After: %d): %s",
            request.method,
            request.path,
            retry_after,
            error,
        )
        message = "The database is busy; please retry shortly."
        if request.accept_mimetypes.best == "application/json" or request.is_json:
            response = jsonify(error="service_unavailable", message=message)
        else:
            response = app.response_class(message, mimetype="text/plain")
        response.status_code = 503
        response.headers["Retry-After"] = str(retry_after)
        return response
