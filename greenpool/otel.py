"""OpenTelemetry metrics of greenpool pools, after the semantic conventions for database
client connection pools (``db.client.connection.*``, experimental in the conventions).

``instrument(pool)`` reports, keyed by ``db.client.connection.pool.name`` (the pool's
name, plus any ``attributes`` you pass):

- ``db.client.connection.count`` (``{connection}``): ``idle`` with state ``idle``,
  ``acquired`` with state ``used``;
- ``db.client.connection.idle.max`` and ``db.client.connection.max``: ``max_size``;
  ``db.client.connection.idle.min``: ``min_idle``;
- ``db.client.connection.pending_requests`` (``{request}``): ``waiting``;
- ``db.client.connection.timeouts`` (``{timeout}``, a counter): ``timeout_count``;
- histograms in seconds: ``db.client.connection.create_time`` (each connection the pool
  opened), ``db.client.connection.wait_time`` (each successful acquire, waiting
  included), ``db.client.connection.use_time`` (each borrow, acquire to release).

The observable instruments read ``pool.stats()`` when the SDK collects; the histograms
are fed by the pool's tracers (:mod:`greenpool.tracing`), so a pool that is not
instrumented pays nothing. Needs ``opentelemetry-api`` (``pip install
'greenpool[otel]'``) and, to export anything, an SDK ``MeterProvider`` (the global one
by default). Importing greenpool never imports this module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from greenpool.api import GreenPool

OTEL_EXTRA = "pip install 'greenpool[otel]'"
POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
#: Bucket advice (seconds) for the three histograms: the SDK's default buckets are
#: meant for milliseconds.
BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def _metrics_api() -> Any:
    try:
        from opentelemetry import metrics
    except ImportError:
        raise ImportError(
            f"greenpool's OpenTelemetry metrics need opentelemetry-api: {OTEL_EXTRA}"
        ) from None
    return metrics


class Instrumentation:
    """What :func:`instrument` installed on one pool; :meth:`remove` takes it off."""

    def __init__(
        self,
        meter: _Meter,
        pool: GreenPool[Any],
        attributes: Mapping[str, Any],
        histograms: bool = True,
    ) -> None:
        self._meter = meter
        self.pool = pool
        self.attributes: dict[str, Any] = {**attributes, POOL_NAME: pool.name}
        self._idle = {**self.attributes, STATE: "idle"}
        self._used = {**self.attributes, STATE: "used"}
        self._remove_tracers = pool.tracers.add(
            on_acquire=self._acquired if histograms else None,
            on_release=self._released if histograms else None,
            on_connect=self._connected,
        )

    def _acquired(self, pool: Any, conn: Any, seconds: float) -> None:
        self._meter.wait_time.record(seconds, self.attributes)

    def _released(self, pool: Any, conn: Any, seconds: float) -> None:
        self._meter.use_time.record(seconds, self.attributes)

    def _connected(self, pool: Any, conn: Any, seconds: float) -> None:
        self._meter.create_time.record(seconds, self.attributes)

    def remove(self) -> None:
        """Stop reporting this pool. Never switches."""
        self._remove_tracers()
        self._meter.pools.pop(id(self.pool), None)


class _Meter:
    """The instruments of one meter provider and the pools they report."""

    def __init__(self, provider: Any) -> None:
        import greenpool

        metrics = _metrics_api()
        meter = provider.get_meter("greenpool", greenpool.__version__)
        self.provider = provider
        self.pools: dict[int, Instrumentation] = {}
        observation = metrics.Observation

        def observe(*figures: tuple[str, str | None]) -> Any:
            def callback(_options: Any) -> Iterator[Any]:
                for item in list(self.pools.values()):
                    if item.pool.closed:
                        continue
                    stats = item.pool.stats()
                    settings = item.pool.settings
                    for key, state in figures:
                        value = stats[key] if key in stats else getattr(settings, key)
                        attributes = item.attributes
                        if state is not None:
                            attributes = item._idle if state == "idle" else item._used
                        yield observation(value, attributes)

            return [callback]

        counter = meter.create_observable_up_down_counter
        counter(
            "db.client.connection.count",
            callbacks=observe(("idle", "idle"), ("acquired", "used")),
            unit="{connection}",
            description="The number of connections that are currently in state described "
            "by the state attribute",
        )
        counter(
            "db.client.connection.idle.max",
            callbacks=observe(("max_size", None)),
            unit="{connection}",
            description="The maximum number of idle open connections allowed",
        )
        counter(
            "db.client.connection.idle.min",
            callbacks=observe(("min_idle", None)),
            unit="{connection}",
            description="The minimum number of idle open connections allowed",
        )
        counter(
            "db.client.connection.max",
            callbacks=observe(("max_size", None)),
            unit="{connection}",
            description="The maximum number of open connections allowed",
        )
        counter(
            "db.client.connection.pending_requests",
            callbacks=observe(("waiting", None)),
            unit="{request}",
            description="The number of current pending requests for an open connection",
        )
        meter.create_observable_counter(
            "db.client.connection.timeouts",
            callbacks=observe(("timeout_count", None)),
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool",
        )
        self.create_time = _histogram(
            meter, "db.client.connection.create_time", "The time it took to create a new connection"
        )
        self.wait_time = _histogram(
            meter,
            "db.client.connection.wait_time",
            "The time it took to obtain an open connection from the pool",
        )
        self.use_time = _histogram(
            meter,
            "db.client.connection.use_time",
            "The time between borrowing a connection and returning it to the pool",
        )


def _histogram(meter: Any, name: str, description: str) -> Any:
    try:
        return meter.create_histogram(
            name, unit="s", description=description, explicit_bucket_boundaries_advisory=BUCKETS
        )
    except TypeError:  # opentelemetry-api < 1.23: no bucket advice (configure a View)
        return meter.create_histogram(name, unit="s", description=description)


_meters: dict[int, _Meter] = {}  # id(meter provider) -> its instruments


def instrument(
    pool: GreenPool[Any],
    meter_provider: Any = None,
    *,
    attributes: Mapping[str, Any] | None = None,
    histograms: bool = True,
) -> Instrumentation:
    """Report ``pool`` through ``meter_provider`` (default: the global one, as set by
    ``opentelemetry.metrics.set_meter_provider``); ``attributes`` are added to every
    point (e.g. ``{"service.instance.id": ...}``). ``histograms=False`` leaves out
    ``wait_time`` and ``use_time``, whose two records per borrow cost tens of
    microseconds in the Python SDK; the rest costs nothing per borrow. Instrumenting a
    pool again for the same provider returns the first instrumentation. Never switches."""
    from greenpool.api import GreenPool

    metrics = _metrics_api()
    if not isinstance(pool, GreenPool) or type(pool).__name__ == "FlaskHandle":
        raise TypeError(
            "instrument() wants a pool: for a Flask app use db.get_pool(name, app=app) or "
            "GREENPOOL_OTEL = True"
        )
    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    meter = _meters.get(id(provider))
    if meter is None or meter.provider is not provider:
        meter = _meters[id(provider)] = _Meter(provider)
    found = meter.pools.get(id(pool))
    if found is not None and found.pool is pool:
        return found
    item = meter.pools[id(pool)] = Instrumentation(meter, pool, attributes or {}, histograms)
    return item


def instrument_all(meter_provider: Any = None) -> list[Instrumentation]:
    """Instrument every open pool of the process (those from :func:`greenpool.get_pool`
    and those made directly); returns their instrumentations. Pools made later need
    :func:`instrument` (or ``GREENPOOL_OTEL = True`` in a Flask app)."""
    from greenpool import fork
    from greenpool.api import GreenPool

    return [
        instrument(pool, meter_provider)
        for pool in fork.tracked()
        if isinstance(pool, GreenPool) and not pool.closed and type(pool).__name__ != "FlaskHandle"
    ]
