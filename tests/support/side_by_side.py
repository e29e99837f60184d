"""Fault scenarios 1, 2, 3 and 5 against greenpool or psycopg_pool, for the side-by-side.

Run as ``python -m tests.support.side_by_side POOL SCENARIO [--workers N] [--seed S]`` in
a process of its own (``tests/test_side_by_side.py`` does, one per pool and scenario):
it patches gevent first thing, starts its own throwaway PostgreSQL, drives the pool with
the load generator (200 greenlets, max_size 10) and records the figures in the fault
results file (pool "greenpool-compare" or "psycopg_pool"). Both pools get the same
settings; psycopg_pool gets ``check=ConnectionPool.check_connection`` where greenpool
pings connections at checkout, so both verify connections before lending.
"""

from __future__ import annotations

if __name__ == "__main__":
    from gevent import monkey  # first thing, before anything imports socket

    monkey.patch_all()

import argparse
import sys
import time
from typing import Any

POOLS = ("greenpool", "psycopg_pool")
SCENARIOS = {
    "1": "1. server restart under load",
    "2": "2. backends terminated (idle, then busy)",
    "3": "3. black hole under load",
    "5": "5. kills and timeouts at random points",
}
LABEL = {"greenpool": "greenpool-compare", "psycopg_pool": "psycopg_pool"}


def record_outside(pool: str, scenario: str, what: str) -> None:
    """Record a run that did not finish (from the process that ran it)."""
    from tests.support.loadgen import record_result

    record_result(SCENARIOS[scenario], {"error": what}, pool=LABEL[pool], headline=what)


def child(pool_name: str, scenario: str, workers: int, seed: int) -> int:
    """Run one scenario on one pool against a fresh cluster; record its figures."""
    from tests.support.pgcluster import PgCluster

    cluster = PgCluster(max_connections=200)
    cluster.start()
    try:
        runner = _Runner(pool_name, cluster, workers, seed)
        figures, headline = getattr(runner, f"scenario_{scenario}")()
    finally:
        cluster.destroy()
    from tests.support.loadgen import record_result

    record_result(SCENARIOS[scenario], figures, pool=LABEL[pool_name], headline=headline)
    return 0


class _Runner:
    """The scenarios, written once for both pools."""

    MAX = 10

    def __init__(self, pool_name: str, cluster: Any, workers: int, seed: int) -> None:
        self.pool_name = pool_name
        self.cluster = cluster
        self.workers = workers
        self.seed = seed
        self.count = 0

    # -- pools --------------------------------------------------------------------

    def make(self, conninfo: str, *, check: bool = False, **opts: Any) -> Any:
        self.count += 1
        name = f"cmp_{self.pool_name}_{self.count}"
        if self.pool_name == "greenpool":
            from greenpool import GreenPool

            if check:
                opts.setdefault("check_idle_after", 0)
            opts.pop("max_lifetime_jitter", None)
            pool: Any = GreenPool(conninfo, name=name, **opts)
        else:
            from psycopg_pool import ConnectionPool

            kw: dict[str, Any] = {"application_name": name}
            if "connect_timeout" in opts:
                kw["connect_timeout"] = max(1, round(opts.pop("connect_timeout")))
            opts.pop("ping_timeout", None)
            opts.pop("check_idle_after", None)
            opts.pop("max_lifetime_jitter", None)
            pool = ConnectionPool(
                conninfo,
                name=name,
                kwargs=kw,
                check=ConnectionPool.check_connection if check else None,
                open=True,
                **opts,
            )
        pool.app_name = name
        return pool

    def size(self, pool: Any) -> int:
        if self.pool_name == "greenpool":
            return int(pool.stats()["total"])
        return int(pool.get_stats()["pool_size"])

    def close(self, pool: Any) -> None:
        import gevent

        with gevent.Timeout(10, False):
            pool.close(timeout=1)

    def lost(self, pool: Any) -> dict[str, Any]:
        """After the load: how many of max_size can still be borrowed at once?"""
        import gevent

        from tests.support.waiting import wait_for

        name = pool.app_name
        got: list[Any] = []

        def borrow() -> None:
            got.append(pool.getconn(timeout=5))

        greenlets = [gevent.spawn(borrow) for _ in range(self.MAX)]
        gevent.joinall(greenlets, timeout=15)
        for conn in got:
            pool.putconn(conn)
        active = -1
        try:
            wait_for(lambda: not self.cluster.active_queries(name), 5)
            active = 0
        except AssertionError:
            active = len(self.cluster.active_queries(name))
        return {
            "borrowable_of_max": len(got),
            "lost": self.MAX - len(got),
            "server_backends": self.cluster.backend_count(name),
            "queries_left_running": active,
        }

    @staticmethod
    def stop(lg: Any, timeout: float) -> str:
        try:
            lg.stop(timeout=timeout)
        except AssertionError as ex:
            return str(ex)
        return ""

    def loadgen(self, pool: Any, **kw: Any) -> Any:
        from tests.support.loadgen import LoadGen

        kw.setdefault("workers", self.workers)
        kw.setdefault("seed", self.seed)
        return LoadGen(pool, **kw)

    # -- 1. restart ---------------------------------------------------------------

    def scenario_1(self) -> tuple[dict[str, Any], str]:
        from tests.support.waiting import wait_for

        cluster, timeout = self.cluster, 1.0
        pool = self.make(
            cluster.dsn(connect_timeout=2), min_size=2, max_size=self.MAX, timeout=timeout
        )
        pool.wait(10)
        lg = self.loadgen(pool, timeout=timeout, duration=60, guard=25).start()
        try:
            wait_for(lambda: lg.outcomes()["ok"] >= 1000, 20, what="steady load")
            lg.phase = "outage"
            cluster.stop("fast")
            import gevent

            gevent.sleep(2.0)  # the outage
            lg.phase = "recovering"
            lg.arm()
            cluster.start()
            t_up = time.monotonic()
            first_ok = lg.wait_ok(20)
            lg.phase = "after"
            gevent.sleep(2.0)
        finally:
            lg.stop()
        recovery = None if first_ok is None else round(max(0.0, first_ok - t_up), 2)
        lost = self.lost(pool)
        self.close(pool)
        figures = {
            "outcomes": dict(lg.outcomes()),
            "wait": lg.wait_hist().summary(),
            "recovery_s": recovery,
            "after_outcomes": dict(lg.outcomes("after")),
            **lost,
        }
        headline = (
            f"recovery {recovery} s; max acquire {lg.wait_hist().max:.2f} s "
            f"(timeout {timeout:g}); hung {lg.outcomes()['HUNG']}; lost {lost['lost']}"
        )
        return figures, headline

    # -- 2. terminated ------------------------------------------------------------

    def scenario_2(self) -> tuple[dict[str, Any], str]:
        import gevent

        from tests.support.waiting import wait_for

        cluster = self.cluster
        pool = self.make(cluster.dsn(), check=True, min_size=self.MAX, max_size=self.MAX, timeout=5)
        pool.wait(10)
        wait_for(lambda: cluster.backend_count(pool.app_name) == self.MAX, 10)
        cluster.terminate_backends(pool.app_name)
        idle = self.loadgen(pool, timeout=5, duration=30, max_ops=10).run()
        idle_errors = idle.ops - idle.outcomes()["ok"]

        def query(conn: Any) -> None:
            conn.execute("SELECT pg_sleep(0.02)")

        lg = self.loadgen(pool, timeout=5, duration=60, query=query).start()
        try:
            wait_for(lambda: lg.outcomes()["ok"] >= 500, 20)
            lg.phase = "terminated"
            killed = cluster.terminate_backends(pool.app_name)
            gevent.sleep(3.0)
        finally:
            lg.stop()
        busy_errors = lg.ops - lg.outcomes()["ok"]
        lost = self.lost(pool)
        self.close(pool)
        figures = {
            "idle_terminated_errors": idle_errors,
            "idle_outcomes": dict(idle.outcomes()),
            "busy_terminated": killed,
            "busy_errors": busy_errors,
            "max_errors_per_worker": max(lg.per_worker_errors.values(), default=0),
            "busy_outcomes": dict(lg.outcomes()),
            **lost,
        }
        headline = (
            f"idle terminated: {idle_errors} errors; busy: {busy_errors} errors for "
            f"{killed} terminated; lost {lost['lost']}"
        )
        return figures, headline

    # -- 3. black hole --------------------------------------------------------------

    def scenario_3(self) -> tuple[dict[str, Any], str]:
        import gevent

        from tests.support.faultproxy import FaultProxy
        from tests.support.loadgen import HUNG
        from tests.support.waiting import wait_for

        cluster = self.cluster
        timeout = query_timeout = 1.0
        with FaultProxy(cluster.host, cluster.port) as proxy:
            conninfo = cluster.dsn(host=proxy.host, port=proxy.port)
            # (a) one acquire from a warm pool whose connections are black-holed
            pool = self.make(
                conninfo,
                check=True,
                min_size=2,
                max_size=2,
                timeout=timeout,
                ping_timeout=1.0,
                connect_timeout=1,
            )
            pool.wait(10)
            gevent.sleep(0.1)
            proxy.blackhole()
            t0 = time.monotonic()
            single = "still blocked after 25 s (given up)"
            with gevent.Timeout(25, False):
                try:
                    with pool.connection(timeout=timeout):
                        single = "got a connection"
                except Exception as ex:
                    single = type(ex).__name__
            t_single = time.monotonic() - t0
            proxy.heal()
            self.close(pool)

            # (b) under load, each borrower's own work bounded by gevent.Timeout
            pool = self.make(
                conninfo,
                min_size=2,
                max_size=self.MAX,
                timeout=timeout,
                ping_timeout=0.5,
                connect_timeout=1,
            )
            pool.wait(10)
            lg = self.loadgen(
                pool, timeout=timeout, query_timeout=query_timeout, duration=90, guard=30
            ).start()
            try:
                wait_for(lambda: lg.outcomes()["ok"] >= 1000, 20)
                lg.phase = "blackhole"
                proxy.blackhole()
                gevent.sleep(3.0)
                lg.phase = "healed"
                lg.arm()
                t_heal = time.monotonic()
                proxy.heal()
                first_ok = lg.wait_ok(40)
                gevent.sleep(2.0)
            finally:
                stuck = self.stop(lg, 40)
            recovery = None if first_ok is None else round(first_ok - t_heal, 2)
            lost = self.lost(pool)
            self.close(pool)
        figures = {
            "single_acquire": single,
            "single_acquire_s": round(t_single, 2),
            "outcomes": dict(lg.outcomes()),
            "wait": lg.wait_hist().summary(),
            "latency": lg.latency_hist().summary(),
            "hung_over_30s": lg.outcomes()[HUNG],
            "workers_stuck_after_stop": stuck,
            "recovery_s": recovery,
            **lost,
        }
        headline = (
            f"one acquire: {single} after {t_single:.1f} s; under load max acquire "
            f"{lg.wait_hist().max:.1f} s, hung {lg.outcomes()[HUNG]}, served {recovery} s "
            f"after heal; lost {lost['lost']}"
        )
        return figures, headline

    # -- 5. kills -------------------------------------------------------------------

    def scenario_5(self) -> tuple[dict[str, Any], str]:
        import random

        import gevent

        cluster = self.cluster
        rng = random.Random(self.seed)
        pool = self.make(
            cluster.dsn(), check=True, min_size=2, max_size=self.MAX, timeout=0.5, max_lifetime=2.0
        )
        pool.wait(10)

        def query(conn: Any) -> None:
            if rng.random() < 0.5:
                conn.execute("SELECT 1")
            else:
                conn.execute("SELECT pg_sleep(%s)", [rng.uniform(0.001, 0.01)])

        lg = self.loadgen(
            pool,
            timeout=0.5,
            duration=40,
            query=query,
            cut=lambda r: r.uniform(0, 0.03) if r.random() < 0.3 else None,
        )
        lg.start()
        kills = swallowed = 0
        t_end = time.monotonic() + 8.0
        try:
            for _ in range(100_000):
                if time.monotonic() >= t_end:
                    break
                gevent.sleep(rng.uniform(0, 0.004))
                i = rng.randrange(lg.workers)
                victim = lg.greenlet(i)
                if not victim.dead:
                    victim.kill(block=True, timeout=0.5)
                    kills += 1
                    if not victim.dead:
                        swallowed += 1  # the kill did not end it: it runs on, kept
                        continue
                lg.spawn_worker(i)
        finally:
            stuck = self.stop(lg, 30)
        lost = self.lost(pool)
        self.close(pool)
        figures = {
            "kills": kills,
            "kills_swallowed": swallowed,
            "workers_stuck_after_stop": stuck,
            "timeouts_fired": lg.outcomes()["Cut"],
            "outcomes": dict(lg.outcomes()),
            "duplicated": lg.duplicated,
            "bad_state": lg.bad_state,
            **lost,
        }
        headline = (
            f"{kills} kills + {lg.outcomes()['Cut']} timeouts: lost {lost['lost']} of "
            f"{self.MAX}, duplicated {lg.duplicated}, dirty {lg.bad_state}, "
            f"kills swallowed {swallowed}, queries left running {lost['queries_left_running']}"
        )
        return figures, headline


# =========================================================================== main


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("pool", choices=POOLS)
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--workers", type=int, default=200)
    ap.add_argument("--seed", type=int, default=20240601)
    args = ap.parse_args(argv)
    return child(args.pool, args.scenario, args.workers, args.seed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
