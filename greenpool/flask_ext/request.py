"""The per-request connection: borrowed on first use, committed on success, given back.

- A request borrows a connection only when it first uses ``db.conn`` (the table of
  borrowed connections lives in the request's WSGI environ, not on ``flask.g``, which
  requests share when a test pushes an app context around them), so requests that never
  touch the database never wait for one.
- ``after_request`` commits when the response is a success (status < 400), by the rule of
  ``with pool.connection()``: an open transaction is committed (a failing COMMIT turns the
  response into a 500), and a transaction that failed while the view swallowed the error
  turns it into a 500 too instead of pretending the work was saved. After it, ``db.conn``
  is refused (a streamed body must not borrow late).
- ``teardown_request`` gives every borrowed connection back exactly once; whatever was not
  committed is rolled back and the session reset by the pool. It never raises.
- ``db.release()`` gives them back early (commit first), e.g. before streaming.
- PoolTimeout / TooManyRequests become ``503 Service Unavailable`` with ``Retry-After``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from flask import Response, current_app, has_request_context, jsonify, request
from gevent import getcurrent
from werkzeug.exceptions import ServiceUnavailable
from werkzeug.wrappers import Response as BaseResponse

from greenpool.drivers.base import ConnState
from greenpool.errors import PoolError

if TYPE_CHECKING:
    from greenpool.api import GreenPool
    from greenpool.flask_ext.state import AppState

logger = logging.getLogger("greenpool.flask")

TABLE_KEY = "greenpool.request"  # in the WSGI environ: the request's RequestConns
OWNER_KEY = "greenpool.greenlet"  # in the WSGI environ: the greenlet serving the request
EXTENSION_KEY = "greenpool"


class RequestConns:
    """The connections lent to the current request, keyed by database (None: default)."""

    __slots__ = ("borrowed", "done", "state")

    def __init__(self, state: AppState | None) -> None:
        self.state = state
        self.borrowed: dict[str | None, tuple[GreenPool[Any], Any]] = {}
        self.done: str | None = None  # why db.conn is refused now


_AFTER_VIEW_MESSAGE = (
    "db.conn is not available after the view returned (e.g. in a streamed response): "
    "borrow before returning, and call db.release() before streaming"
)
#: Stands for "the view returned" in requests that borrowed nothing (shared, never mutated).
_AFTER_VIEW = RequestConns(None)
_AFTER_VIEW.done = _AFTER_VIEW_MESSAGE


def mark_owner() -> None:
    """``before_request``: remember which greenlet serves this request.

    A copied request context (``copy_current_request_context`` in a spawned greenlet)
    shares the environ but gets its own ``g`` and no ``after_request``: its writes through
    ``db.conn`` would be silently rolled back, so :func:`request_conn` refuses them.
    """
    request.environ[OWNER_KEY] = getcurrent()


def request_conn(db: GreenPool[Any], name: str | None) -> Any:
    """The current request's connection to database ``name``, borrowed on first use.

    Switches only while borrowing (waiting for a connection)."""
    table: RequestConns | None = (
        request.environ.get(TABLE_KEY) if has_request_context() else None
    )
    if table is None:
        table = _start(db)
    else:
        borrowed = table.borrowed.get(name)
        if borrowed is not None and table.done is None:
            _check_owner()
            return borrowed[1]
    if table.done is not None:
        raise RuntimeError(table.done)
    _check_owner()
    pool = table.state.pool(name)  # type: ignore[union-attr]
    conn = pool.getconn()
    table.borrowed[name] = (pool, conn)
    return conn


READ_KEY = "greenpool.read"  # the request's replica connection, in its table


def request_read_conn(db: GreenPool[Any]) -> Any:
    """The current request's connection for reads: a replica's (borrowed on first use),
    or the request's primary connection once it used ``db.conn`` (read-your-writes: it
    sees what the request wrote). Switches only while borrowing."""
    table: RequestConns | None = (
        request.environ.get(TABLE_KEY) if has_request_context() else None
    )
    if table is None:
        table = _start(db)
    if table.done is not None:
        raise RuntimeError(table.done)
    _check_owner()
    for key in (None, READ_KEY):
        borrowed = table.borrowed.get(key)
        if borrowed is not None:
            return borrowed[1]
    pool = table.state.pool(None)  # type: ignore[union-attr]
    conn = pool.getconn(read_only=True)
    table.borrowed[READ_KEY] = (pool, conn)
    return conn


def _start(db: GreenPool[Any]) -> RequestConns:
    if not has_request_context():
        raise RuntimeError(
            "db.conn is a per-request connection and there is no request here; "
            "use `with db.connection() as conn:` in CLI commands and background jobs"
        )
    state = state_of(None)
    table = RequestConns(state)
    request.environ[TABLE_KEY] = table
    return table


def _check_owner() -> None:
    """Refuse a greenlet other than the one serving the request (see mark_owner); with no
    owner recorded (``app.test_request_context()`` runs no before_request), any."""
    owner = request.environ.get(OWNER_KEY)
    if owner is None or owner is getcurrent():
        return
    raise RuntimeError(
        "db.conn belongs to the greenlet serving the request; a greenlet spawned by the "
        "request must use `with db.connection() as conn:`"
    )


def state_of(app: Any) -> AppState:
    """The extension state of ``app`` (default: the current app)."""
    target = app if app is not None else current_app
    try:
        state: AppState = target.extensions[EXTENSION_KEY]
    except KeyError:
        raise RuntimeError(
            f"greenpool is not registered on app {target.name!r}: call db.init_app(app)"
        ) from None
    return state


def _commit_all(table: RequestConns) -> None:
    """Commit every open transaction of the request, by ``pool.connection()``'s rule."""
    for key, (pool, conn) in table.borrowed.items():
        driver = pool._driver
        state = driver.state(conn)
        if state is ConnState.IN_TRANSACTION:
            driver.commit(conn)
        elif state is ConnState.IN_ERROR and key != READ_KEY:
            label = "default" if key is None else key
            raise PoolError(
                f"greenpool: the transaction on database {label!r} failed during the request "
                "(an error was caught in the view) and was rolled back: nothing was committed"
            )


def commit_on_success(response: Response) -> Response:
    """``after_request``: commit the request's open transactions if it succeeded; from now
    on ``db.conn`` is refused (a streamed body must not borrow after the view)."""
    environ = request.environ
    table: RequestConns | None = environ.get(TABLE_KEY)
    if table is None:
        environ[TABLE_KEY] = _AFTER_VIEW
        return response
    if table.done is None:
        table.done = _AFTER_VIEW_MESSAGE
    if table.borrowed and response.status_code < 400 and table.state.options.commit_on_success:  # type: ignore[union-attr]
        _commit_all(table)  # raising here turns the response into a 500
    return response


def release_connections(exc: BaseException | None = None) -> None:
    """``teardown_request``: give back every borrowed connection, exactly once.

    The environ keeps the "view returned" mark: Flask >= 3.1 pops the request context
    (running this) before a ``stream_with_context`` body runs, then pushes it again for
    the body, which must not borrow."""
    environ = request.environ
    table: RequestConns | None = environ.get(TABLE_KEY)
    if table is None or table is _AFTER_VIEW:
        return
    owner = environ.get(OWNER_KEY)
    if owner is not None and owner is not getcurrent():
        return  # a copied request context ending in a spawned greenlet: not its to give
    environ[TABLE_KEY] = _AFTER_VIEW
    _give_back(table)
    if exc is not None:
        logger.debug("greenpool: request failed (%s); its transaction was rolled back", exc)


def _give_back(table: RequestConns) -> None:
    borrowed, table.borrowed = table.borrowed, {}
    for pool, conn in borrowed.values():
        try:
            pool.putconn(conn)  # rolls back whatever is still open, resets the session
        except Exception:
            logger.exception(
                "greenpool: releasing the request's connection to pool %r failed", pool.name
            )


def release_early(db: GreenPool[Any]) -> None:
    """``db.release()``: commit (by the ``pool.connection()`` rule, when the extension
    commits on success) and give back the request's connections now; ``db.conn`` is
    refused for the rest of the request."""
    if not has_request_context():
        raise RuntimeError("db.release() gives back a request's connections; no request here")
    table: RequestConns | None = request.environ.get(TABLE_KEY)
    if table is None:
        table = _start(db)
    if table is _AFTER_VIEW:
        return  # nothing was borrowed, and db.conn is refused already
    try:
        if table.borrowed and table.state.options.commit_on_success:  # type: ignore[union-attr]
            _commit_all(table)
    finally:
        _give_back(table)
        table.done = "db.release() gave this request's connections back; db.conn is refused now"


def exhausted(ex: PoolError) -> BaseResponse:
    """Error handler for PoolTimeout / TooManyRequests: 503 with Retry-After."""
    state = state_of(None)
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
