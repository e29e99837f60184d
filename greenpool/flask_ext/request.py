"""The per-request connection: borrowed on first use, committed on success, given back.

- ``before_request`` puts one :class:`RequestConns` in the request's WSGI environ (not on
  ``flask.g``, which requests share when a test pushes an app context around them): the
  greenlet serving the request and the app's state, bound at ``init_app``. A request
  borrows a connection only when it first uses ``db.conn``, so requests that never touch
  the database never wait for one.
- ``after_request`` commits when the response is a success (status < 400), by the rule of
  ``with pool.connection()``: an open transaction is committed (a failing COMMIT turns the
  response into a 500), and a transaction that failed while the view swallowed the error
  turns it into a 500 too instead of pretending the work was saved. After it, ``db.conn``
  is refused (a streamed body must not borrow late).
- ``teardown_request`` gives every borrowed connection back exactly once; whatever was not
  committed is rolled back and the session reset by the pool. It never raises, and a
  copied request context ending in a spawned greenlet leaves the request's connections
  alone.
- ``db.release()`` gives them back early (commit first), e.g. before streaming.
- PoolTimeout / TooManyRequests become ``503 Service Unavailable`` with ``Retry-After``.

The hot path (``db.conn`` on a connection already borrowed) is one ContextVar read, one
dict lookup and an identity check.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, current_app, jsonify, request
from gevent import getcurrent
from werkzeug.exceptions import ServiceUnavailable
from werkzeug.wrappers import Response as BaseResponse

from greenpool.drivers.base import ConnState
from greenpool.errors import PoolError

if TYPE_CHECKING:
    from greenpool.api import GreenPool
    from greenpool.flask_ext.state import AppState

try:  # Flask >= 2.3: the request context's ContextVar, read without werkzeug's LocalProxy
    from flask.globals import _cv_request
except ImportError:  # pragma: no cover - other Flask versions: the public proxy
    _cv_request = None  # type: ignore[assignment]

logger = logging.getLogger("greenpool.flask")

TABLE_KEY = "greenpool.request"  # in the WSGI environ: the request's RequestConns
READ_KEY = "greenpool.read"  # the request's replica connection, in its table
EXTENSION_KEY = "greenpool"
_AFTER_VIEW = (
    "db.conn is not available after the view returned (e.g. in a streamed response): "
    "borrow before returning, and call db.release() before streaming"
)


class RequestConns:
    """What the extension keeps for one request (see the module docstring)."""

    __slots__ = ("borrowed", "conn", "done", "owner", "state")

    def __init__(self, state: AppState, owner: Any) -> None:
        self.state = state
        self.owner = owner  # the greenlet serving the request (None: any)
        self.conn: Any = None  # the default database's connection, once borrowed
        self.borrowed: dict[str | None, tuple[GreenPool[Any], Any]] = {}
        self.done: str | None = None  # why db.conn is refused now


def install(app: Flask, state: AppState) -> None:
    """Register the request hooks, bound to ``state``."""

    def open_request() -> None:
        _environ()[TABLE_KEY] = RequestConns(state, getcurrent())

    app.before_request(open_request)
    app.after_request(commit_on_success)
    app.teardown_request(release_connections)


def _environ() -> dict[str, Any]:
    """The current request's WSGI environ; RuntimeError outside a request."""
    if _cv_request is not None:
        ctx = _cv_request.get(None)
        if ctx is None:
            raise RuntimeError("outside a request")
        return ctx.request.environ
    return request.environ  # pragma: no cover


def _table(db: GreenPool[Any]) -> RequestConns:
    try:
        environ = _environ()
    except RuntimeError:
        raise RuntimeError(
            "db.conn is a per-request connection and there is no request here; "
            "use `with db.connection() as conn:` in CLI commands and background jobs"
        ) from None
    table: RequestConns | None = environ.get(TABLE_KEY)
    if table is None:  # no before_request ran (app.test_request_context())
        table = environ[TABLE_KEY] = RequestConns(state_of(None), None)
    return table


def request_conn(db: GreenPool[Any], name: str | None) -> Any:
    """The current request's connection to database ``name``, borrowed on first use.

    Switches only while borrowing (waiting for a connection)."""
    table = _table(db)
    owner = table.owner
    if owner is not None and owner is not getcurrent():
        _refuse_other_greenlet()
    if name is None and table.conn is not None and table.done is None:
        return table.conn
    if table.done is not None:
        raise RuntimeError(table.done)
    borrowed = table.borrowed.get(name)
    if borrowed is not None:
        return borrowed[1]
    pool = table.state.pool(name)
    conn = pool.getconn()
    table.borrowed[name] = (pool, conn)
    if name is None:
        table.conn = conn
    return conn


def request_read_conn(db: GreenPool[Any]) -> Any:
    """The current request's connection for reads: a replica's (borrowed on first use),
    or the request's primary connection once it used ``db.conn`` (read-your-writes: it
    sees what the request wrote). Switches only while borrowing."""
    table = _table(db)
    owner = table.owner
    if owner is not None and owner is not getcurrent():
        _refuse_other_greenlet()
    if table.done is not None:
        raise RuntimeError(table.done)
    for key in (None, READ_KEY):
        borrowed = table.borrowed.get(key)
        if borrowed is not None:
            return borrowed[1]
    pool = table.state.pool(None)
    conn = pool.getconn(read_only=True)
    table.borrowed[READ_KEY] = (pool, conn)
    return conn


def _refuse_other_greenlet() -> None:
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
    table: RequestConns | None = _environ().get(TABLE_KEY)
    if table is None:
        return response
    if table.done is None:
        table.done = _AFTER_VIEW
    if table.borrowed and response.status_code < 400 and table.state.options.commit_on_success:
        _commit_all(table)  # raising here turns the response into a 500
    return response


def release_connections(exc: BaseException | None = None) -> None:
    """``teardown_request``: give back every borrowed connection, exactly once.

    The table stays, marked "view returned": Flask >= 3.1 pops the request context
    (running this) before a ``stream_with_context`` body runs, then pushes it again for
    the body, which must not borrow."""
    table: RequestConns | None = _environ().get(TABLE_KEY)
    if table is None or not table.borrowed:
        return
    owner = table.owner
    if owner is not None and owner is not getcurrent():
        return  # a copied request context ending in a spawned greenlet: not its to give
    table.done = table.done or _AFTER_VIEW
    _give_back(table)
    if exc is not None:
        logger.debug("greenpool: request failed (%s); its transaction was rolled back", exc)


def _give_back(table: RequestConns) -> None:
    borrowed, table.borrowed = table.borrowed, {}
    table.conn = None
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
    try:
        table = _table(db)
    except RuntimeError:
        raise RuntimeError(
            "db.release() gives back a request's connections; no request here"
        ) from None
    try:
        if table.borrowed and table.state.options.commit_on_success:
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

