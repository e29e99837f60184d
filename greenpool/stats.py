"""Pool statistics: the keys of ``GreenPool.stats()`` and what each one means.

``STATS`` is the one list of keys: exporters (the Prometheus collector, OpenTelemetry)
build their metrics from it, so a key's name, kind and help text live here only.
``HISTOGRAMS`` names the distributions the exporters record through tracers (they are
not in ``stats()``: a snapshot has no distribution).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from greenpool.api import GreenPool


@dataclass(frozen=True)
class Stat:
    """One key of ``stats()``."""

    key: str
    kind: str  # "gauge", "counter" or "histogram"
    metric: str  # Prometheus metric name (counters get ``_total`` from the client library)
    help: str


GAUGES = (
    Stat("min_size", "gauge", "greenpool_min_size", "Configured minimum number of connections."),
    Stat("max_size", "gauge", "greenpool_max_size", "Configured maximum number of connections."),
    Stat("total", "gauge", "greenpool_connections", "Connections open or being opened."),
    Stat("idle", "gauge", "greenpool_connections_idle", "Idle connections."),
    Stat(
        "acquired",
        "gauge",
        "greenpool_connections_acquired",
        "Connections lent out, or held by the pool for a check or a cleaning.",
    ),
    Stat(
        "constructing", "gauge", "greenpool_connections_constructing", "Connections being opened."
    ),
    Stat("closing", "gauge", "greenpool_connections_closing", "Connections being closed."),
    Stat("waiting", "gauge", "greenpool_waiting", "Greenlets waiting for a connection."),
    Stat(
        "peak_acquired",
        "gauge",
        "greenpool_peak_acquired",
        "Most connections lent out at once since the pool opened in this process.",
    ),
    Stat("failing", "gauge", "greenpool_failing", "1 while new connections fail."),
)
COUNTERS = (
    Stat("acquire_count", "counter", "greenpool_acquires", "Connections handed out."),
    Stat("empty_acquire_count", "counter", "greenpool_acquire_waits", "Acquires that had to wait."),
    Stat(
        "canceled_acquire_count",
        "counter",
        "greenpool_acquire_canceled",
        "Acquires interrupted while waiting (greenlet killed or timed out by its caller).",
    ),
    Stat("timeout_count", "counter", "greenpool_acquire_timeouts", "Acquires that timed out."),
    Stat(
        "too_many_requests_count",
        "counter",
        "greenpool_acquire_rejected",
        "Acquires refused because the wait queue was full.",
    ),
    Stat(
        "acquire_wait_seconds_total",
        "counter",
        # not greenpool_acquire_wait_seconds: that is the histogram of every acquire
        "greenpool_acquire_waited_seconds",
        "Time spent waiting for a connection by acquires that had to wait.",
    ),
    Stat("returns_count", "counter", "greenpool_returns", "Connections given back."),
    Stat("rollback_count", "counter", "greenpool_rollbacks", "Rollbacks done on release."),
    Stat("reset_count", "counter", "greenpool_resets", "Session resets done on release."),
    Stat(
        "cancel_count",
        "counter",
        "greenpool_cancels",
        "Queries cancelled on the server because their borrower died mid-query.",
    ),
    Stat("new_conns_count", "counter", "greenpool_connections_opened", "Connections opened."),
    Stat("connect_errors", "counter", "greenpool_connect_errors", "Failed connection attempts."),
    Stat(
        "check_failed_count",
        "counter",
        "greenpool_check_failures",
        "Connections that failed a check.",
    ),
    Stat(
        "leaked_count",
        "counter",
        "greenpool_leaks",
        "Borrows held longer than leak_threshold (each logged once with its stack).",
    ),
    Stat(
        "reclaimed_count",
        "counter",
        "greenpool_reclaimed",
        "Connections reclaimed because their borrowing greenlet ended without giving "
        "them back.",
    ),
)
#: Counters of closed connections, by reason (one Prometheus metric with a label).
CLOSED_REASONS = {
    "idle_destroy_count": "idle",
    "lifetime_destroy_count": "lifetime",
    "broken_destroy_count": "broken",
}
STATS = GAUGES + COUNTERS
#: Per-host figures (``stats()["hosts"]``, keyed by ``host:port``): one series per host.
#: ``greenpool_host_connections`` also carries the ``role`` the pool last saw on the host.
HOST_STATS = (
    Stat(
        "connections",
        "gauge",
        "greenpool_host_connections",
        "Connections open to this host (idle or lent), labelled with the role the pool "
        "last saw on it.",
    ),
    Stat(
        "connect_errors",
        "counter",
        "greenpool_host_connect_errors",
        "Failed connection attempts to this host (one a connect then made on another host "
        "is not in greenpool_connect_errors).",
    ),
    Stat(
        "broken_connections",
        "counter",
        "greenpool_host_broken_connections",
        "Connections to this host found dead and closed (a failed check, a failed "
        "cleaning, given back broken); summed over hosts: connections_closed{reason=broken}.",
    ),
    Stat(
        "last_role_change",
        "gauge",
        "greenpool_host_last_role_change_timestamp_seconds",
        "When the pool first saw this host's role or saw it change (Unix time); absent "
        "until it has seen one.",
    ),
)
#: Per-replica figures (``stats()["replicas"]``, keyed by the replica pool's name).
REPLICA_STATS = (
    Stat(
        "healthy",
        "gauge",
        "greenpool_replica_healthy",
        "1 while the replica answers the monitor and is not marked down.",
    ),
    Stat(
        "lag_seconds",
        "gauge",
        "greenpool_replica_lag_seconds",
        "Replay lag the monitor last measured; absent while unknown.",
    ),
    Stat("served", "counter", "greenpool_replica_served", "Connections the replica handed out."),
    Stat("acquired", "gauge", "greenpool_replica_acquired", "Replica connections lent out."),
)
#: Distributions recorded by the exporters' tracers (seconds), keyed like the tracers.
HISTOGRAMS = (
    Stat(
        "acquire",
        "histogram",
        "greenpool_acquire_wait_seconds",
        "Time a successful acquire took, waiting included.",
    ),
    Stat(
        "release",
        "histogram",
        "greenpool_hold_seconds",
        "Time a borrower held a connection, from its acquire to its release.",
    ),
)


def snapshot(pool: GreenPool[Any]) -> dict[str, Any]:
    """Sizes and counters of ``pool`` right now, free of secrets. Never switches."""
    connector = pool._connector
    vetting = pool._vetting
    idle = pool.idle_count()
    failing = connector.failing_since is not None
    return {
        "name": pool.name,
        "state": pool._state,
        "min_size": pool.settings.min_size,
        "max_size": pool.settings.max_size,
        "total": pool._slots - pool._closing,
        "idle": idle,
        "acquired": pool.acquired_count(),
        "constructing": pool._constructing,
        "closing": pool._closing,
        "waiting": pool.waiting_count(),
        "peak_acquired": pool.peak_acquired,
        "acquire_count": pool.acquire_count,
        "empty_acquire_count": pool.empty_acquire_count,
        "canceled_acquire_count": pool.canceled_acquire_count,
        "timeout_count": pool.timeout_count,
        "too_many_requests_count": pool.too_many_count,
        "acquire_wait_seconds_total": pool.acquire_wait_total,
        "returns_count": pool.returns_count,
        "rollback_count": vetting.rollback_count,
        "reset_count": vetting.reset_count,
        "cancel_count": pool.cancel_count,
        "new_conns_count": connector.new_conns_count,
        "connect_errors": connector.connect_errors,
        "idle_destroy_count": pool._maintenance.idle_destroy_count,
        "lifetime_destroy_count": vetting.lifetime_destroy_count,
        "broken_destroy_count": vetting.broken_destroy_count,
        "check_failed_count": vetting.check_failed_count,
        "leaked_count": pool._leaks.leaked_count if pool._leaks else 0,
        "reclaimed_count": pool._leaks.reclaimed_count if pool._leaks else 0,
        "failing": failing,
        "last_error": connector.last_error if failing else None,
        "hosts": pool.hosts.snapshot(_connections_by_host(pool)),
        "replicas": pool._router.snapshot() if pool._router is not None else [],
    }


def _connections_by_host(pool: GreenPool[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rec in (*pool._idle, *pool._lent.values()):
        counts[rec.host] = counts.get(rec.host, 0) + 1
    return counts
