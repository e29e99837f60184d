"""Pool statistics over HTTP: JSON and the Prometheus text format.

``app.register_blueprint(stats_blueprint(), url_prefix="/_greenpool")`` serves
``/_greenpool/stats`` (JSON) and ``/_greenpool/metrics`` (Prometheus). Neither touches
the database or starts a pool. Each gunicorn worker has its own pools, so each answer
describes the worker that served it (its ``pid`` is in the JSON and in every metric's
labels). Protect these routes as you would any internal endpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app, jsonify

from greenpool.flask_ext.state import AppState

if TYPE_CHECKING:
    from prometheus_client.core import Metric

# prometheus_client is optional: only the Prometheus endpoint and collector need it.
_MISSING_PROMETHEUS = (
    "the Prometheus metrics need prometheus_client: pip install 'greenpool[prometheus]'"
)


def _require_prometheus() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError as ex:
        raise ImportError(_MISSING_PROMETHEUS) from ex


_LABELS = ["database", "pool", "pid"]

# stats() key -> (metric name, help)
_GAUGES = {
    "max_size": ("greenpool_max_size", "Configured maximum number of connections."),
    "min_size": ("greenpool_min_size", "Configured minimum number of connections."),
    "total": ("greenpool_connections", "Connections open or being opened."),
    "idle": ("greenpool_connections_idle", "Idle connections."),
    "acquired": ("greenpool_connections_acquired", "Connections lent out or being checked."),
    "constructing": ("greenpool_connections_constructing", "Connections being opened."),
    "waiting": ("greenpool_waiting", "Greenlets waiting for a connection."),
    "peak_acquired": (
        "greenpool_peak_acquired",
        "Most connections lent through the Flask extension at once since the worker started.",
    ),
    "failing": ("greenpool_failing", "1 while new connections fail."),
}
_COUNTERS = {
    "acquire_count": ("greenpool_acquires", "Connections handed out."),
    "empty_acquire_count": ("greenpool_acquire_waits", "Acquires that had to wait."),
    "timeout_count": ("greenpool_acquire_timeouts", "Acquires that timed out."),
    "too_many_requests_count": (
        "greenpool_acquire_rejected",
        "Acquires refused because the wait queue was full.",
    ),
    "canceled_acquire_count": ("greenpool_acquire_canceled", "Acquires interrupted."),
    "acquire_wait_seconds_total": (
        "greenpool_acquire_wait_seconds",
        "Time spent waiting for a connection.",
    ),
    "new_conns_count": ("greenpool_connections_opened", "Connections opened."),
    "connect_errors": ("greenpool_connect_errors", "Failed connection attempts."),
    "returns_count": ("greenpool_returns", "Connections given back."),
    "rollback_count": ("greenpool_rollbacks", "Rollbacks done on release."),
    "check_failed_count": ("greenpool_check_failures", "Connections that failed a check."),
}
_CLOSED_REASONS = {
    "idle_destroy_count": "idle",
    "lifetime_destroy_count": "lifetime",
    "broken_destroy_count": "broken",
}


class GreenPoolCollector:
    """A prometheus_client collector reading the pools of one Flask app.

    Register it in your own registry to merge greenpool's metrics with the app's:
    ``REGISTRY.register(GreenPoolCollector(app))``. Only started pools are reported.
    Raises ImportError naming the extra to install when prometheus_client is missing.
    """

    def __init__(self, app: Flask) -> None:
        _require_prometheus()
        self._app = app

    def collect(self) -> Iterator[Metric]:
        """The pools' figures as Prometheus metric families."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state: AppState = self._app.extensions["greenpool"]
        snapshot = state.snapshot()
        pid = str(snapshot["pid"])
        rows = [
            ([label, stats["pool"], pid], stats)
            for label, stats in snapshot["databases"].items()
            if stats["started"]
        ]
        for key, (name, doc) in _GAUGES.items():
            gauge = GaugeMetricFamily(name, doc, labels=_LABELS)
            for labels, stats in rows:
                gauge.add_metric(labels, float(stats.get(key, 0)))
            yield gauge
        for key, (name, doc) in _COUNTERS.items():
            counter = CounterMetricFamily(name, doc, labels=_LABELS)
            for labels, stats in rows:
                counter.add_metric(labels, float(stats.get(key, 0)))
            yield counter
        closed = CounterMetricFamily(
            "greenpool_connections_closed",
            "Connections closed by the pool, by reason.",
            labels=[*_LABELS, "reason"],
        )
        for labels, stats in rows:
            for key, reason in _CLOSED_REASONS.items():
                closed.add_metric([*labels, reason], float(stats.get(key, 0)))
        yield closed


def _stats() -> Response:
    state: AppState = current_app.extensions["greenpool"]
    return jsonify(state.snapshot())


def _metrics() -> Response:
    try:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.exposition import CONTENT_TYPE_LATEST
    except ImportError:
        return Response(_MISSING_PROMETHEUS + "\n", status=501, mimetype="text/plain")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GreenPoolCollector(current_app._get_current_object()))  # type: ignore[attr-defined]
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def stats_blueprint(name: str = "greenpool_stats", **options: Any) -> Blueprint:
    """A blueprint with ``GET /stats`` (JSON) and ``GET /metrics`` (Prometheus).

    Register it with a prefix: ``app.register_blueprint(stats_blueprint(),
    url_prefix="/_greenpool")``; ``options`` go to :class:`flask.Blueprint`.
    """
    bp = Blueprint(name, __name__, **options)
    bp.add_url_rule("/stats", "stats", _stats, methods=["GET"])
    bp.add_url_rule("/metrics", "metrics", _metrics, methods=["GET"])
    return bp
