"""Pool statistics over HTTP: JSON and the Prometheus text format.

``app.register_blueprint(stats_blueprint(authorize=check), url_prefix="/_greenpool")``
serves ``/_greenpool/stats`` (JSON) and ``/_greenpool/metrics`` (Prometheus). Neither
touches the database or starts a pool. ``/stats`` describes the worker that served it
(its ``pid`` is in the JSON). ``/metrics`` does too, unless prometheus_client runs in
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, see :mod:`greenpool.prometheus` and
:mod:`greenpool.gunicorn`): then any worker answers for all of them.

Registering the blueprint (or creating a :class:`GreenPoolCollector`) turns on the
acquire-wait and hold-time histograms of the app's pools (tracers on every borrow);
``GREENPOOL_PROMETHEUS = False`` keeps them off, ``True`` turns them on without the
blueprint.

The endpoints reveal pool names, sizes and load: ``stats_blueprint`` wants an
``authorize`` callable (return True to serve the request) or an explicit ``public=True``.
Connection error text (server addresses, users, FATAL messages) stays out of the JSON
unless ``include_errors=True``. The Prometheus part needs ``prometheus_client``
(``pip install 'greenpool[prometheus]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, abort, current_app, jsonify
from flask.blueprints import BlueprintSetupState

from greenpool.flask_ext.request import EXTENSION_KEY, state_of
from greenpool.prometheus import PoolCollector

if TYPE_CHECKING:
    from greenpool.api import GreenPool
    from greenpool.flask_ext.state import AppState

PROMETHEUS_EXTRA = "pip install 'greenpool[prometheus]'"


def _prometheus() -> Any:
    from greenpool.prometheus import prometheus_client

    return prometheus_client()


def _rows(state: AppState) -> Callable[[], Iterable[tuple[str, GreenPool[Any]]]]:
    def rows() -> list[tuple[str, GreenPool[Any]]]:
        found = []
        for key, db in state.databases.items():
            pool = state.started_pool(key)
            if pool is not None:
                found.append((db.label, pool))
        return found

    return rows


def _enable(app: Flask) -> None:
    """Turn the histograms on for ``app`` (when prometheus_client is installed)."""
    state = app.extensions.get(EXTENSION_KEY)
    if state is None:
        return
    try:
        _prometheus()
    except ImportError:
        return
    state.enable_prometheus()


class GreenPoolCollector(PoolCollector):
    """A prometheus_client collector reading the pools of one Flask app (one process).

    Register it in your own registry to merge greenpool's metrics with the app's:
    ``REGISTRY.register(GreenPoolCollector(app))``. Only started pools are reported.
    Creating it turns on the app's histograms (unless ``GREENPOOL_PROMETHEUS = False``).
    In multiprocess mode serve :func:`greenpool.prometheus.generate_latest` instead.
    """

    def __init__(self, app: Flask) -> None:
        super().__init__(_rows(state_of(app)))
        _enable(app)


def stats_blueprint(
    name: str = "greenpool_stats",
    *,
    authorize: Callable[[], bool] | None = None,
    public: bool = False,
    include_errors: bool = False,
    **options: Any,
) -> Blueprint:
    """A blueprint with ``GET /stats`` (JSON) and ``GET /metrics`` (Prometheus).

    ``authorize()`` runs before each request (inside the request context: check a token
    header, the client address, ``flask_login.current_user`` ...) and a false answer gets
    403; ``public=True`` serves everyone (behind your own network protection). One of them
    is required. ``include_errors`` puts the last connection error text in the JSON.
    ``options`` go to :class:`flask.Blueprint`. Registering it turns on the app's
    acquire-wait and hold-time histograms (see the module docstring).
    """
    if authorize is None and not public:
        raise ValueError(
            "stats_blueprint: pass authorize=<callable returning True to serve a request> or "
            "public=True; the endpoints show the pools' names, sizes and load"
        )
    if authorize is not None and not callable(authorize):
        raise ValueError("stats_blueprint: authorize must be a callable")
    bp = Blueprint(name, __name__, **options)

    def _registered(setup: BlueprintSetupState) -> None:
        _enable(setup.app)  # type: ignore[arg-type]

    bp.record_once(_registered)

    if authorize is not None:
        check = authorize

        @bp.before_request
        def _authorize() -> None:
            if not check():
                abort(403)

    def stats() -> Response:
        return jsonify(state_of(None).snapshot(errors=include_errors))

    def metrics() -> Response:
        try:
            from greenpool import prometheus

            prometheus.prometheus_client()
        except ImportError as ex:
            return Response(f"{ex}\n", status=501, mimetype="text/plain")
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        _enable(app)  # registered before init_app: on from the first scrape
        body, content_type = prometheus.generate_latest(_rows(state_of(app)))
        return Response(body, mimetype=content_type)

    bp.add_url_rule("/stats", "stats", stats, methods=["GET"])
    bp.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])
    return bp
