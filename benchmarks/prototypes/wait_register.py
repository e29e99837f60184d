"""Prototype: stop re-registering a kept socket watcher with epoll on every wait.

``greenpool/drivers/gevent_wait.py`` keeps one libev I/O watcher per socket and sets its
``events`` before every start, which makes libev re-register the fd: one
``epoll_ctl(EPOLL_CTL_ADD)`` per wait, which fails with EEXIST (strace on a held-
connection ``SELECT 1`` loop: 2,211 epoll_ctl calls, 2,203 of them errors, for 2,200
queries; 11 without the assignment). It is there for one rare case: a socket closed and
its fd number reused by a new socket with no hub turn in between, which libev would keep
believing registered (the wait would then tick at psycopg's interval forever).

The prototype sets ``events`` only when they change, and when a wait ends on the interval
timer without the socket becoming ready: the stale case then heals at the first tick
(psycopg's interval, 0.1 s) instead of costing a syscall on every wait. It passes
``tests/test_gevent_wait.py`` (the reused-fd test waits 2 s for the socket with a 0.05 s
interval).

``python -m benchmarks.prototypes.wait_register [--dsn DSN] [--batches 40] [--per 500]``
runs held-connection ``SELECT 1`` batches in one gevent process, alternating the current
wait and the prototype (swapped in per batch), and prints the client CPU (user + system)
per query, the paired ratio, and the epoll_ctl calls per query of each (counted by
``strace -c -f``, when strace is installed, in two separate short runs).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from gevent import getcurrent

REPO = Path(__file__).resolve().parents[2]


def make_wait_kept() -> Any:
    """The prototype's ``_wait_kept`` (same signature as gevent_wait's)."""
    from greenpool.drivers import gevent_wait as gw

    def _wait_kept(hub: Any, kept: Any, fileno: int, events: int) -> int:
        io = kept.io
        if io.events != events:
            io.events = events  # a changed mask re-registers the fd anyway
        timer = kept.timer
        current_switch = getcurrent().switch
        try:
            io.start(current_switch, pass_events=True)
            if timer is not None:
                timer.again(current_switch, gw._TICK)
            result = hub.switch()
        finally:
            io.stop()
            if timer is not None:
                timer.stop()
        if result is gw._TICK:
            # Not ready within the interval: if this fd number belongs to a new socket
            # that libev still believes registered, setting the events re-registers it.
            io.events = events
        return int(gw._ready_flags(result, fileno, events))

    return _wait_kept


def _pool(dsn: str) -> Any:
    from greenpool import GreenPool

    pool = GreenPool(dsn, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False)
    pool.open(wait=True, timeout=30)
    return pool


def paired(dsn: str, batches: int, per: int) -> dict[str, Any]:
    from greenpool.drivers import gevent_wait as gw

    original = gw._wait_kept
    modes = {"current": original, "prototype": make_wait_kept()}
    pool = _pool(dsn)
    conn = pool.getconn()
    for _ in range(500):
        conn.execute("SELECT 1").fetchone()
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    ratios = []
    try:
        for i in range(batches):
            order = list(modes) if i % 2 == 0 else list(reversed(modes))
            got = {}
            for mode in order:
                gw._wait_kept = modes[mode]
                t0 = time.process_time()
                for _ in range(per):
                    conn.execute("SELECT 1").fetchone()
                got[mode] = (time.process_time() - t0) * 1e6 / per
                cpu[mode].append(got[mode])
            ratios.append(got["prototype"] / got["current"])
    finally:
        gw._wait_kept = original
        pool.putconn(conn)
        pool.close()
    return {
        "cpu_us": {m: statistics.median(v) for m, v in cpu.items()},
        "ratio": statistics.median(ratios),
    }


def single(dsn: str, mode: str, n: int) -> None:
    from greenpool.drivers import gevent_wait as gw

    if mode == "prototype":
        gw._wait_kept = make_wait_kept()
    pool = _pool(dsn)
    conn = pool.getconn()
    for _ in range(n):
        conn.execute("SELECT 1").fetchone()


def strace_epoll_ctl(dsn: str, mode: str, n: int = 2000) -> float | None:
    """epoll_ctl calls per query of ``mode`` (strace -c), start-up included, so it is an
    upper bound: start-up and connect cost about 10 calls."""
    if shutil.which("strace") is None:
        return None
    out = Path(f"/tmp/wait_register-{mode}.strace")
    subprocess.run(
        [
            "strace",
            "-f",
            "-c",
            "-o",
            str(out),
            sys.executable,
            "-m",
            "benchmarks.prototypes.wait_register",
            "--single",
            mode,
            "--dsn",
            dsn,
            "--per",
            str(n),
        ],
        cwd=REPO,
        capture_output=True,
        timeout=300,
        check=False,
    )
    for line in out.read_text().splitlines():
        if line.rstrip().endswith("epoll_ctl"):
            return int(re.split(r"\s+", line.strip())[3]) / n
    return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prototypes.wait_register")
    ap.add_argument("--dsn", default=None, help="default: a throwaway cluster")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--per", type=int, default=500)
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.single:
        single(args.dsn, args.single, args.per)
        return 0
    cluster: Any = None
    dsn = args.dsn
    if dsn is None:
        sys.path.insert(0, str(REPO))
        from tests.support.pgcluster import PgCluster

        cluster = PgCluster()
        cluster.start()
        dsn = cluster.admin_dsn
    try:
        res = paired(dsn, args.batches, args.per)
        calls = {m: strace_epoll_ctl(dsn, m) for m in ("current", "prototype")}
    finally:
        if cluster is not None:
            cluster.destroy()
    print("| wait | client CPU µs per SELECT 1 (user + sys) | epoll_ctl per query |")
    print("|---|---|---|")
    for m in ("current", "prototype"):
        c = calls[m]
        print(f"| {m} | {res['cpu_us'][m]:.2f} | {'-' if c is None else f'{c:.3f}'} |")
    print(f"\npaired ratio prototype / current: {res['ratio']:.3f} ({args.batches} batches)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
