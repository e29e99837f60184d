"""What replica routing costs per borrow: ``python -m benchmarks.routing [--dsn DSN]``.

Routing composes pools and must not tax the primary's own borrow. Measured in one
process, rounds alternating, medians of the per-round means (µs per acquire+release of
an autocommit connection, no query):

- ``plain``: a pool without replicas, ``getconn()``/``putconn()``;
- ``primary``: a pool with a replica, its primary's ``getconn()`` (the path every write
  takes: routing must add nothing here);
- ``routed``: the same pool's ``getconn(read_only=True)`` (the router picks the replica and
  remembers which pool lent the connection);
- ``replica direct``: a plain pool on the replica's conninfo (what ``routed`` would cost
  without routing).

The "replica" is the same server under another pool name: its monitor sees a server that
is not in recovery (lag 0), which is all routing needs. Target: ``routed`` at most 1 µs
over ``replica direct``; ``primary`` equal to ``plain`` within noise.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from greenpool import GreenPool  # noqa: E402


def _per_op(acquire: Callable[[], Any], release: Callable[[Any], None], ops: int) -> float:
    start = time.perf_counter()
    for _ in range(ops):
        release(acquire())
    return (time.perf_counter() - start) / ops * 1e6


def measure(dsn: str, rounds: int, ops: int, only: str | None = None) -> dict[str, float]:
    common = {"min_size": 1, "max_size": 1, "reset": None, "kwargs": {"autocommit": True}}
    plain: GreenPool[Any] = GreenPool(dsn, name="bench-route-plain", **common)
    routed: GreenPool[Any] = GreenPool(
        dsn,
        name="bench-route-primary",
        replicas=[{"conninfo": dsn, "min_size": 1, "max_size": 1}],
        replica_check_period=0.2,
        **common,
    )
    direct: GreenPool[Any] = GreenPool(dsn, name="bench-route-replica", **common)
    for pool in (plain, routed, direct):
        pool.wait(30)
    deadline = time.monotonic() + 30
    while not routed.stats()["replicas"][0]["healthy"]:
        if time.monotonic() > deadline:
            raise SystemExit("the replica was never measured healthy")
        time.sleep(0.05)
    cases: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
        "plain": (plain.getconn, plain.putconn),
        "primary": (routed.getconn, routed.putconn),
        # partial, not a lambda: the harness must not add a Python call that the user's
        # own `pool.getconn(read_only=True)` does not make.
        "routed": (functools.partial(routed.getconn, read_only=True), routed.putconn),
        "replica direct": (direct.getconn, direct.putconn),
    }
    if only is not None:  # one case, once (for callgrind: instructions, not time)
        cases = {only: cases[only]}
        rounds = 1
    for acquire, release in cases.values():
        _per_op(acquire, release, ops // 10)  # warm
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (acquire, release) in cases.items():
            samples[name].append(_per_op(acquire, release, ops))
    if only in (None, "routed"):
        assert routed._router is not None and routed._router.fallback_count == 0, "fell back"
    for pool in (plain, routed, direct):
        pool.close()
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--dsn", help="a server to use (default: a throwaway embedded one)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--ops", type=int, default=20_000)
    ap.add_argument(
        "--only",
        choices=["plain", "primary", "routed", "replica direct"],
        help="run one case once (run under callgrind twice with different --ops and "
        "subtract: instructions per acquire+release, immune to the machine's load)",
    )
    args = ap.parse_args()
    if args.dsn:
        result = measure(args.dsn, args.rounds, args.ops, args.only)
    else:
        from greenpool.embedded import EmbeddedPostgres

        with EmbeddedPostgres() as pg:
            result = measure(pg.dsn(), args.rounds, args.ops, args.only)
    print(f"{'case':<16}{'µs per acquire+release':>24}")
    for name, value in result.items():
        print(f"{name:<16}{value:>24.2f}")
    if args.only:
        return
    extra = result["routed"] - result["replica direct"]
    print(f"\nrouting over a direct replica pool: {extra:+.2f} µs")
    print(f"primary path with replicas vs plain: {result['primary'] - result['plain']:+.2f} µs")


if __name__ == "__main__":
    main()
