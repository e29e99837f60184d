"""Prototype of two hot-path changes, measured without editing the core (both adopted in
GreenPool by commit c809b53; kept to rerun the A/B against an older core).

1. ``with pool.connection()`` releases through a fast path. Today ``__exit__`` reads the
   connection state (to decide on commit), then ``putconn`` reads it again, and both
   compare it against ``ConnState`` members (an attribute lookup on the enum class each
   time) inside a ``try/finally``. When the block ended without an exception and the
   connection is IDLE with no reset policy - the common case - the context can pop the
   record and ``_recycle`` it directly: one state read, no second method call. Every
   other case (an exception, a transaction left open, a reset policy, a connection this
   pool did not lend) takes the existing path unchanged.
2. ``_grow`` returns at once when the pool is full. Every greenlet that queues in
   ``_wait`` calls ``_grow``, which computes ``_deficit`` (a dozen attribute reads and a
   ``max``/``min``) only to find nothing to do when ``total + closing >= max_size`` -
   which is exactly when greenlets queue under load. The early return is equivalent:
   ``_deficit`` is at most ``max_size - closing - total`` (``wanted`` is capped at
   ``max_size - closing``), so it is <= 0 whenever the check fires.

``python -m benchmarks.prototypes.fast_release [DSN]`` compares GreenPool and
FastGreenPool in one process, interleaved (acquire+release, and contended SELECT 1
windows), and prints medians and paired ratios. Written against greenpool 11f944f; the
subclass touches pool internals and will need refreshing when the core changes.
"""

from __future__ import annotations

from typing import Any

from greenpool.drivers.base import ConnState
from greenpool.pool import GreenPool, _ConnectionContext

_IDLE = ConnState.IDLE


class FastContext(_ConnectionContext):
    __slots__ = ()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            pool, conn = self._pool, self._conn
            if pool._driver.state(conn) is _IDLE and not pool._reset_policy.needed:
                rec = pool._lent.pop(id(conn), None)
                if rec is not None:
                    self._conn = None
                    pool._busy += 1
                    pool._returns_count += 1
                    pool._recycle(rec)
                    return
        super().__exit__(exc_type, exc, tb)


class FastGreenPool(GreenPool):
    def connection(self, timeout: float | None = None) -> _ConnectionContext:
        return FastContext(self, timeout)

    def _grow(self) -> None:
        if (
            len(self._idle) + len(self._lent) + self._busy + self._constructing + self._closing
            >= self.settings.max_size
        ):
            return
        super()._grow()


def _main() -> int:  # pragma: no cover - measurement entry point
    import random
    import statistics
    import sys
    import time

    from gevent import monkey

    monkey.patch_all()
    from benchmarks import common, worker
    from benchmarks.contenders import query3

    cluster: Any = None
    if len(sys.argv) > 1:
        dsn = sys.argv[1]
    else:
        from tests.support.pgcluster import PgCluster

        cluster = PgCluster()
        cluster.start()
        dsn = cluster.admin_dsn
    common.pin_self(common.pick_cpu())

    class _Wrap:
        driver = "psycopg"

        def __init__(self, pool: GreenPool, name: str) -> None:
            self.pool, self.name, self.query = pool, name, query3

        def connection(self) -> Any:
            return self.pool.connection()

        def close(self) -> None:
            self.pool.close()

    try:
        pools = {
            "GreenPool": _Wrap(
                GreenPool(dsn, min_size=10, max_size=10, kwargs={"autocommit": True}), "a"
            ),
            "FastGreenPool": _Wrap(
                FastGreenPool(dsn, min_size=10, max_size=10, kwargs={"autocommit": True}), "b"
            ),
        }
        for w in pools.values():
            w.pool.wait()
        acq: dict[str, list[float]] = {k: [] for k in pools}
        ops: dict[str, list[float]] = {k: [] for k in pools}
        order = list(pools)
        for _ in range(30):
            random.shuffle(order)
            for name in order:
                w = pools[name]
                t0 = time.perf_counter()
                for _ in range(20000):
                    with w.connection():
                        pass
                acq[name].append((time.perf_counter() - t0) / 20000 * 1e6)
                worker._contended(w, "SELECT 1", 200, 0.05)
                ops[name].append(worker._contended(w, "SELECT 1", 200, 0.3)["ops_per_s"])
        for name in pools:
            r_acq = statistics.median(
                a / b for a, b in zip(acq[name], acq["GreenPool"], strict=True)
            )
            r_ops = statistics.median(
                a / b for a, b in zip(ops[name], ops["GreenPool"], strict=True)
            )
            print(
                f"{name:14s} acquire+release {statistics.median(acq[name]):5.2f} µs "
                f"({r_acq:.2f}x)   contended SELECT 1 {statistics.median(ops[name]):7.0f} "
                f"ops/s ({r_ops:.2f}x)"
            )
        for w in pools.values():
            w.close()
    finally:
        if cluster is not None:
            cluster.destroy()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
