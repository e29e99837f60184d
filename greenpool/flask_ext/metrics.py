"""Pool statistics over HTTP: JSON and the Prometheus text format.

``app.register_blueprint(stats_blueprint(authorize=check), url_prefix="/_greenpool")``
serves ``/_greenpool/stats`` (JSON) and ``/_greenpool/metrics`` (Prometheus). Neither
touches the database or starts a pool. Each gunicorn worker has its own pools, so each
answer describes the worker that served it (its ``pid`` is in the JSON and in every
metric's labels).

The endpoints reveal pool names, sizes and load: ``stats_blueprint`` wants an
``authorize`` callable (return True to serve the request) or an explicit ``public=True``.
Connection error text (server addresses, users, FATAL messages) stays out of the JSON
unless ``include_errors=True``. The Prometheus part needs ``prometheus_client``
(``pip install 'greenpool[prometheus]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Flask, Response, abort, current_app, jsonify

from greenpool.flask_ext.request import state_of
from greenpool.stats import CLOSED_REASONS, COUNTERS, GAUGES

_LABELS = ["database", "pool", "pid"]
PROMETHEUS_EXTRA = "pip install 'greenpool[prometheus]'"


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
        import prometheus_client.exposition
    except ImportError:
        raise ImportError(
            f"greenpool's Prometheus metrics need prometheus_client: {PROMETHEUS_EXTRA}"
        ) from None
    return prometheus_client


def _rows(app: Flask) -> tuple[list[tuple[list[str], dict[str, Any]]], str]:
    snapshot = state_of(app).snapshot(errors=False)
    pid = str(snapshot["pid"])
    rows = [
        ([label, stats["pool"], pid], stats)
        for label, stats in snapshot["databases"].items()
        if stats["started"]
    ]
    return rows, pid


class GreenPoolCollector:
    """A prometheus_client collector reading the pools of one Flask app.

    Register it in your own registry to merge greenpool's metrics with the app's:
    ``REGISTRY.register(GreenPoolCollector(app))``. Only started pools are reported.
    """

    def __init__(self, app: Flask) -> None:
        _prometheus()
        self._app = app

    def collect(self) -> Iterator[Any]:
        core = _prometheus().core
        rows, _pid = _rows(self._app)
        for stat in GAUGES:
            gauge = core.GaugeMetricFamily(stat.metric, stat.help, labels=_LABELS)
            for labels, stats in rows:
                gauge.add_metric(labels, float(stats.get(stat.key, 0)))
            yield gauge
        for stat in COUNTERS:
            counter = core.CounterMetricFamily(stat.metric, stat.help, labels=_LABELS)
            for labels, stats in rows:
                counter.add_metric(labels, float(stats.get(stat.key, 0)))
            yield counter
        closed = core.CounterMetricFamily(
            "greenpool_connections_closed",
            "Connections closed by the pool, by reason.",
            labels=[*_LABELS, "reason"],
        )
        for labels, stats in rows:
            for key, reason in CLOSED_REASONS.items():
                closed.add_metric([*labels, reason], float(stats.get(key, 0)))
        yield closed


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
    ``options`` go to :class:`flask.Blueprint`.
    """
    if authorize is None and not public:
        raise ValueError(
            "stats_blueprint: pass authorize=<callable returning True to serve a request> or "
            "public=True; the endpoints show the pools' names, sizes and load"
        )
    if authorize is not None and not callable(authorize):
        raise ValueError("stats_blueprint: authorize must be a callable")
    bp = Blueprint(name, __name__, **options)

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
            prometheus = _prometheus()
        except ImportError as ex:
            return Response(f"{ex}\n", status=501, mimetype="text/plain")
        registry = prometheus.CollectorRegistry(auto_describe=False)
        registry.register(GreenPoolCollector(current_app._get_current_object()))  # type: ignore[attr-defined]
        return Response(
            prometheus.generate_latest(registry),
            mimetype=prometheus.exposition.CONTENT_TYPE_LATEST,
        )

    bp.add_url_rule("/stats", "stats", stats, methods=["GET"])
    bp.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])
    return bp
