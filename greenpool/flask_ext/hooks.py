"""Request hooks: the per-request connection, its commit, its release, and 503s.

- A request borrows a connection only when it first uses ``db.conn`` (stored on
  ``flask.g``), so requests that never touch the database never wait for one.
- ``after_request`` commits when the response is a success (status < 400): a failing
  COMMIT therefore still becomes a 500 instead of a success the client cannot trust.
- ``teardown_request`` gives every borrowed connection back exactly once (the table is
  popped from ``g`` first); whatever was not committed is rolled back by the pool.
  It never raises: problems are logged.
- PoolTimeout / TooManyRequests become ``503 Service Unavailable`` with ``Retry-After``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Response, current_app, g, jsonify, request
from gevent import getcurrent
from werkzeug.exceptions import ServiceUnavailable
from werkzeug.wrappers import Response as BaseResponse

from greenpool.errors import PoolError

if TYPE_CHECKING:
    from greenpool.flask_ext.state import AppState
    from greenpool.pool import GreenPool as CorePool

logger = logging.getLogger("greenpool.flask")

G_KEY = "_greenpool_borrowed"
OWNER_KEY = "greenpool.greenlet"  # in the WSGI environ: the greenlet serving the request

# libpq's PQtransactionStatus values; psycopg 3 and psycopg2 both expose them as
# ``conn.info.transaction_status``.
_INTRANS = 2
_INERROR = 3


@dataclass
class Borrowed:
    """A connection lent to the current request."""

    key: str | None
    pool: CorePool
    conn: Any
    greenlet: Any
    state: AppState


def mark_owner() -> None:
    """``before_request``: remember which greenlet serves this request.

    A copied request context (``copy_current_request_context`` in a spawned greenlet)
    shares the environ but gets its own ``g`` and no ``after_request``: its writes through
    ``db.conn`` would be silently rolled back, so :func:`check_owner` refuses them.
    """
    request.environ[OWNER_KEY] = getcurrent()


def check_owner() -> None:
    """Raise RuntimeError unless the current greenlet is the one serving the request."""
    owner = request.environ.get(OWNER_KEY)
    if owner is not None and owner is not getcurrent():
        raise RuntimeError(
            "db.conn belongs to the greenlet serving the request; a greenlet spawned by "
            "the request must use `with db.connection() as conn:`"
        )


def borrowed_table() -> dict[str | None, Borrowed]:
    """The current request's borrowed connections (created on first use)."""
    table: dict[str | None, Borrowed] | None = g.get(G_KEY)
    if table is None:
        table = {}
        setattr(g, G_KEY, table)
    return table


def _transaction_status(conn: Any) -> int:
    try:
        return int(conn.info.transaction_status)
    except Exception:
        return -1


def commit_on_success(response: Response) -> Response:
    """``after_request``: commit the request's open transactions if it succeeded."""
    table: dict[str | None, Borrowed] | None = g.get(G_KEY)
    if not table:
        return response
    state: AppState = current_app.extensions["greenpool"]
    if not state.options.commit_on_teardown or response.status_code >= 400:
        return response
    for borrowed in list(table.values()):
        status = _transaction_status(borrowed.conn)
        if status == _INTRANS:
            borrowed.conn.commit()  # raising here turns the response into a 500
        elif status == _INERROR:
            logger.warning(
                "greenpool: %s %s returned %d but its transaction on %r had failed; "
                "it is rolled back, nothing was committed",
                request.method,
                request.path,
                response.status_code,
                borrowed.state.database(borrowed.key).label,
            )
    return response


def release_connections(exc: BaseException | None = None) -> None:
    """``teardown_request``: give back every borrowed connection, exactly once."""
    table: dict[str | None, Borrowed] | None = g.pop(G_KEY, None)
    if not table:
        return
    for borrowed in table.values():
        try:
            borrowed.pool.putconn(borrowed.conn)  # rolls back whatever is still open
        except Exception:
            logger.exception(
                "greenpool: releasing the request's connection to pool %r failed",
                borrowed.pool.name,
            )
        finally:
            borrowed.state.note_released(borrowed.key)
    if exc is not None:
        logger.debug("greenpool: request failed (%s); its transaction was rolled back", exc)


def exhausted(ex: PoolError) -> BaseResponse:
    """Error handler for PoolTimeout / TooManyRequests: 503 with Retry-After."""
    state: AppState = current_app.extensions["greenpool"]
    retry_after = state.options.retry_after
    logger.warning(
        "greenpool: %s %s answered 503 (Retry-After: %d): %s",
        request.method,
        request.path,
        retry_after,
        ex,
    )
    message = "The database is busy; please retry shortly."
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    if best == "application/json" or request.is_json:
        response = jsonify(error="service_unavailable", message=message)
        response.status_code = 503
        response.headers["Retry-After"] = str(retry_after)
        return response
    return ServiceUnavailable(description=message, retry_after=retry_after).get_response()
