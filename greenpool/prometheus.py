"""Prometheus metrics of greenpool pools: with or without Flask, in one process or many.

``instrument(pool)`` starts recording two histograms for a pool, through its tracers
(so nothing runs on the borrow path of a pool that is not instrumented):

- ``greenpool_acquire_wait_seconds``: how long every acquire took, waiting included;
- ``greenpool_hold_seconds``: how long every borrower held its connection.

The pool's ``stats()`` (gauges and counters, named in :mod:`greenpool.stats`) are
exported beside them, with one series per host (``stats()["hosts"]``: label ``host``,
and ``role`` on ``greenpool_host_connections``) and per read replica
(``stats()["replicas"]``: label ``replica``, the replica pool's name). A figure that is
unknown (a replica's lag before it is measured, a host's role change before one is seen)
has no sample. Two modes, chosen by prometheus_client itself:

- **One process** (``PROMETHEUS_MULTIPROC_DIR`` unset): :class:`PoolCollector` reads
  ``stats()`` at scrape time. Gauges and counters carry the labels ``database``, ``pool``
  and ``pid``; the histograms ``database`` and ``pool``.
- **Many processes** (gunicorn workers; ``PROMETHEUS_MULTIPROC_DIR`` names a directory
  shared by the workers, set before they start): every instrumented pool copies its
  ``stats()`` and its buffered observations into prometheus_client's multiprocess files
  on each maintenance pass (at least once a second, and just before a scrape in the
  worker that serves it), and
  :func:`generate_latest` answers with every worker's figures through
  ``MultiProcessCollector``. Gauges keep one series per worker (``pid`` label, dropped
  when gunicorn's ``child_exit`` calls :func:`mark_process_dead`); counters and
  histograms are summed over the workers, those that exited included, so they never
  go backwards. :mod:`greenpool.gunicorn` has the hooks. The shared files cannot drop
  a series a worker wrote: a per-host gauge whose ``role`` changed stays at 0 under the
  former role, and a figure that became unknown is NaN, until the worker exits.

Needs ``prometheus_client`` (``pip install 'greenpool[prometheus]'``); importing
greenpool never imports this module.
"""

from __future__ import annotations

import os
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from greenpool.stats import (
    CLOSED_REASONS,
    COUNTERS,
    GAUGES,
    HISTOGRAMS,
    HOST_STATS,
    REPLICA_STATS,
    Stat,
)

if TYPE_CHECKING:
    from greenpool.api import GreenPool

PROMETHEUS_EXTRA = "pip install 'greenpool[prometheus]'"
#: Bucket upper bounds (seconds) of both histograms: from a fast hand-off (tens of
#: microseconds) to a request that waited out a long pool timeout.
BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
LABELS = ("database", "pool")
_CLOSED = "greenpool_connections_closed"
_CLOSED_HELP = "Connections closed by the pool, by reason."
#: Labels the per-host and per-replica series add to LABELS, by metric name.
_EXTRA_LABELS = {
    **{s.metric: ("host",) for s in HOST_STATS},
    "greenpool_host_connections": ("host", "role"),
    **{s.metric: ("replica",) for s in REPLICA_STATS},
}
#: Per-host and per-replica figures that are None while unknown: their series is left out
#: (one process) or, in multiprocess mode once a worker has written it, set to NaN.
_MAYBE_UNKNOWN = frozenset({"last_role_change", "lag_seconds"})

#: Rows a collector reports: (database label, pool).
Rows = Callable[[], Iterable[tuple[str, "GreenPool[Any]"]]]


def prometheus_client() -> Any:
    """The ``prometheus_client`` module, or ImportError naming the extra to install."""
    try:
        import prometheus_client
        import prometheus_client.core
        import prometheus_client.exposition
    except ImportError:
        raise ImportError(
            f"greenpool's Prometheus metrics need prometheus_client: {PROMETHEUS_EXTRA}"
        ) from None
    return prometheus_client


def multiprocess_mode() -> bool:
    """Whether prometheus_client keeps its values in files shared by several processes
    (``PROMETHEUS_MULTIPROC_DIR`` set)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


# ---------------------------------------------------------------------------- metrics

_histograms: dict[str, Any] = {}  # "acquire"/"release" -> Histogram (labels database, pool)
_shared: dict[str, Any] = {}  # multiprocess mode: stat key -> Gauge or Counter


def _make_histograms() -> dict[str, Any]:
    if not _histograms:
        prom = prometheus_client()
        for stat in HISTOGRAMS:
            _histograms[stat.key] = prom.Histogram(
                stat.metric, stat.help, labelnames=LABELS, buckets=BUCKETS, registry=None
            )
    return _histograms


def _make_shared() -> dict[str, Any]:
    """The Gauges and Counters ``stats()`` is copied into in multiprocess mode."""
    if not _shared:
        prom = prometheus_client()
        for stat in GAUGES:
            _shared[stat.key] = prom.Gauge(
                stat.metric, stat.help, labelnames=LABELS, multiprocess_mode="liveall",
                registry=None,
            )  # fmt: skip
        for stat in COUNTERS:
            _shared[stat.key] = prom.Counter(
                stat.metric, stat.help, labelnames=LABELS, registry=None
            )
        _shared[_CLOSED] = prom.Counter(
            _CLOSED, _CLOSED_HELP, labelnames=(*LABELS, "reason"), registry=None
        )
        for stat in (*HOST_STATS, *REPLICA_STATS):  # keyed by metric: their keys overlap
            labelnames = (*LABELS, *_EXTRA_LABELS[stat.metric])
            if stat.kind == "counter":
                _shared[stat.metric] = prom.Counter(
                    stat.metric, stat.help, labelnames=labelnames, registry=None
                )
            else:
                _shared[stat.metric] = prom.Gauge(
                    stat.metric, stat.help, labelnames=labelnames, multiprocess_mode="liveall",
                    registry=None,
                )  # fmt: skip
    return _shared


#: One per-host or per-replica sample: its Stat, the values of its extra labels (see
#: _EXTRA_LABELS), and its value (None while unknown).
Series = tuple[Stat, tuple[str, ...], "float | None"]


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _group_series(stats: dict[str, Any]) -> Iterator[Series]:
    """The per-host (``stats()["hosts"]``) and per-replica (``stats()["replicas"]``)
    samples of one pool: host strings and replica pool names only, never a conninfo or
    an error text."""
    for host, figures in sorted((stats.get("hosts") or {}).items()):
        role = str(figures.get("role") or "unknown")
        for stat in HOST_STATS:
            extra = (host, role) if stat.metric == "greenpool_host_connections" else (host,)
            yield stat, extra, _number(figures.get(stat.key))
    for figures in stats.get("replicas") or ():
        for stat in REPLICA_STATS:
            yield stat, (str(figures["name"]),), _number(figures.get(stat.key))


# ---------------------------------------------------------------------------- instrumenting


class _Buffered:
    """One histogram child, observed into plain counts and flushed into prometheus_client
    in batches: an observation then costs a bisect and two additions instead of two
    value updates (each a lock, and a file write in multiprocess mode)."""

    __slots__ = ("_child", "counts", "sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def flush(self) -> None:
        counts, self.counts = self.counts, [0] * (len(BUCKETS) + 1)
        total, self.sum = self.sum, 0.0
        buckets = self._child._buckets  # prometheus_client keeps per-bucket counts
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
        if total:
            self._child._sum.inc(total)


def _buffered(child: Any) -> _Buffered | None:
    """A buffer for ``child``, or None when prometheus_client's internals differ from what
    the buffer expects (then every observation goes straight to it)."""
    buckets = getattr(child, "_buckets", None)
    bounds = getattr(child, "_upper_bounds", None)
    if (
        isinstance(buckets, list)
        and hasattr(child, "_sum")
        and bounds is not None
        and list(bounds) == [*BUCKETS, float("inf")]
    ):
        return _Buffered(child)
    return None


class Instrumentation:
    """What :func:`instrument` installed on one pool; :meth:`remove` takes it off."""

    def __init__(self, pool: GreenPool[Any], database: str) -> None:
        self.pool = pool
        self.database = database
        self.labels = (database, pool.name)
        histograms = _make_histograms()
        wait = histograms["acquire"].labels(*self.labels)
        hold = histograms["release"].labels(*self.labels)
        self._buffers = [b for b in (_buffered(wait), _buffered(hold)) if b is not None]
        if len(self._buffers) == 2:
            self._observe_wait = self._buffers[0].observe
            self._observe_hold = self._buffers[1].observe
        else:
            self._buffers = []
            self._observe_wait, self._observe_hold = wait.observe, hold.observe
        self._synced: dict[Any, float] = {}  # counters as last copied (multiprocess mode)
        #: multiprocess mode: the per-host/per-replica gauges the last sync wrote, by
        #: (metric, extra label values). The shared files cannot forget a series: one no
        #: longer reported is set to 0 (a host whose role changed keeps its former role's
        #: series, at 0, until the worker exits), one that became unknown to NaN.
        self._written: set[tuple[str, tuple[str, ...]]] = set()
        self._shared = _make_shared() if multiprocess_mode() else None
        self._remove_tracers = pool.add_tracer(on_acquire=self._acquired, on_release=self._released)
        if self._shared is not None:
            self.sync()
            pool._maintenance.tasks.append(self.sync)

    def _acquired(self, pool: Any, conn: Any, seconds: float) -> None:
        self._observe_wait(seconds)

    def _released(self, pool: Any, conn: Any, seconds: float) -> None:
        self._observe_hold(seconds)

    def flush(self) -> None:
        """Move the buffered observations into prometheus_client (a collector does this
        before reading; multiprocess mode on every maintenance pass). Never switches."""
        for buffer in self._buffers:
            buffer.flush()

    def sync(self) -> None:
        """Multiprocess mode: copy the pool's ``stats()`` into the shared files (gauges
        set, counters advanced by what happened since the last copy). Never switches."""
        self.flush()
        shared = self._shared
        if shared is None:
            return
        stats = self.pool.stats()
        closed = self.pool.closed
        for stat in GAUGES:
            value = 0.0 if closed else float(stats.get(stat.key) or 0)
            shared[stat.key].labels(*self.labels).set(value)
        for stat in COUNTERS:
            self._advance(shared[stat.key].labels(*self.labels), stat.key, stats.get(stat.key))
        for key, reason in CLOSED_REASONS.items():
            self._advance(shared[_CLOSED].labels(*self.labels, reason), key, stats.get(key))
        written = set()
        for stat, extra, figure in _group_series(stats):
            metric = shared[stat.metric]  # .labels() writes a 0 to the files: only when due
            series = (stat.metric, extra)
            if stat.kind == "counter":
                self._advance(metric.labels(*self.labels, *extra), series, figure)
                continue
            if figure is None or (closed and stat.key in _MAYBE_UNKNOWN):
                if series in self._written:  # cannot be taken out of the shared files
                    metric.labels(*self.labels, *extra).set(float("nan"))
                    written.add(series)
                continue
            metric.labels(*self.labels, *extra).set(0.0 if closed else figure)
            written.add(series)
        for metric, extra in self._written - written:  # e.g. a host's former role
            shared[metric].labels(*self.labels, *extra).set(0.0)
        self._written = written

    def _advance(self, counter: Any, key: Any, number: Any) -> None:
        value = float(number or 0)
        delta = value - self._synced.get(key, 0.0)
        if delta > 0:
            counter.inc(delta)
        self._synced[key] = value

    def forked(self) -> None:
        """In a forked child: what the pool counted so far was the parent's (and is in
        the parent's files)."""
        stats = self.pool.stats()
        self._synced = {k: float(stats.get(k) or 0) for k in _counter_keys()}
        for stat, extra, value in _group_series(stats):
            if stat.kind == "counter":
                self._synced[(stat.metric, extra)] = value or 0.0
        self._written = set()  # the parent's series are in its own files

    def remove(self) -> None:
        """Stop recording for this pool. Never switches."""
        self._remove_tracers()
        self.flush()
        tasks = self.pool._maintenance.tasks
        if self.sync in tasks:
            tasks.remove(self.sync)
        if _instrumented.get(self.pool) is self:
            del _instrumented[self.pool]
            if self._shared is None:  # one process: forget its series
                for histogram in _histograms.values():
                    histogram.remove(*self.labels)


def _counter_keys() -> list[str]:
    return [stat.key for stat in COUNTERS] + list(CLOSED_REASONS)


_instrumented: weakref.WeakKeyDictionary[Any, Instrumentation] = weakref.WeakKeyDictionary()


def instrument(pool: GreenPool[Any], *, database: str = "default") -> Instrumentation:
    """Record ``pool``'s acquire waits and hold times and export its stats (see the module
    docstring); ``database`` is the value of the ``database`` label. Instrumenting a pool
    again returns the first instrumentation. Never switches."""
    from greenpool.api import GreenPool

    if not isinstance(pool, GreenPool) or type(pool).__name__ == "FlaskHandle":
        raise TypeError(
            "instrument() wants a pool: for a Flask app use db.get_pool(name, app=app) or "
            "GREENPOOL_PROMETHEUS = True"
        )
    found = _instrumented.get(pool)
    if found is not None:
        return found
    instrumentation = Instrumentation(pool, database)
    _instrumented[pool] = instrumentation
    return instrumentation


def instrumented() -> list[Instrumentation]:
    """The instrumentations of this process whose pool is not closed."""
    return [i for i in list(_instrumented.values()) if not i.pool.closed]


def sync() -> None:
    """Multiprocess mode: copy every instrumented pool's stats now (a worker does this
    before it answers a scrape). Never switches."""
    for instrumentation in list(_instrumented.values()):
        instrumentation.sync()


def _after_fork_in_child() -> None:
    for instrumentation in list(_instrumented.values()):
        instrumentation.forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------- collecting


class PoolCollector:
    """A prometheus_client collector for one process: ``stats()`` read at scrape time and
    the histograms of :func:`instrument`.

    ``rows()`` returns the (database label, pool) pairs to report; by default every
    instrumented pool of the process. Register it in your registry
    (``REGISTRY.register(PoolCollector())``). In multiprocess mode use
    :func:`generate_latest` (or prometheus_client's ``MultiProcessCollector``) instead.
    """

    def __init__(self, rows: Rows | None = None) -> None:
        prometheus_client()
        self._rows = rows or (lambda: [(i.database, i.pool) for i in instrumented()])

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (prometheus_client's collector protocol)."""
        core = prometheus_client().core
        pid = str(os.getpid())
        for instrumentation in list(_instrumented.values()):
            instrumentation.flush()
        rows = [
            ([database, pool.name, pid], pool.stats())
            for database, pool in self._rows()
            if not pool.closed
        ]
        labels = [*LABELS, "pid"]
        for stat in GAUGES:
            gauge = core.GaugeMetricFamily(stat.metric, stat.help, labels=labels)
            for values, stats in rows:
                gauge.add_metric(values, float(stats.get(stat.key) or 0))
            yield gauge
        for stat in COUNTERS:
            counter = core.CounterMetricFamily(stat.metric, stat.help, labels=labels)
            for values, stats in rows:
                counter.add_metric(values, float(stats.get(stat.key) or 0))
            yield counter
        closed = core.CounterMetricFamily(_CLOSED, _CLOSED_HELP, labels=[*labels, "reason"])
        for values, stats in rows:
            for key, reason in CLOSED_REASONS.items():
                closed.add_metric([*values, reason], float(stats.get(key) or 0))
        yield closed
        families = {}
        for stat in (*HOST_STATS, *REPLICA_STATS):
            family = core.CounterMetricFamily if stat.kind == "counter" else core.GaugeMetricFamily
            families[stat.metric] = family(
                stat.metric, stat.help, labels=[*labels, *_EXTRA_LABELS[stat.metric]]
            )
        for values, stats in rows:
            for stat, extra, value in _group_series(stats):
                if value is not None:  # unknown: no sample (see _MAYBE_UNKNOWN)
                    families[stat.metric].add_metric([*values, *extra], value)
        yield from families.values()
        wanted = {(values[0], values[1]) for values, _ in rows}
        for histogram in _make_histograms().values():
            for family in histogram.collect():
                family.samples = [
                    s
                    for s in family.samples
                    if (s.labels.get("database"), s.labels.get("pool")) in wanted
                ]
                yield family


def generate_latest(rows: Rows | None = None) -> tuple[bytes, str]:
    """The text exposition and its content type: every worker's figures in multiprocess
    mode (after syncing this process's pools), else :class:`PoolCollector`'s."""
    prom = prometheus_client()
    registry = prom.CollectorRegistry(auto_describe=False)
    if multiprocess_mode():
        from prometheus_client import multiprocess

        sync()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(PoolCollector(rows))
    return prom.generate_latest(registry), prom.exposition.CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Multiprocess mode: drop the gauges of a process that exited (gunicorn's
    ``child_exit``; :mod:`greenpool.gunicorn` calls it). Counters and histograms stay:
    their sums must not go backwards."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
