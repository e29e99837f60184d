"""One contender, one round: ``python -m benchmarks.worker --contender KEY --dsn DSN``.

gevent patches everything first thing, before any driver or pool library is imported
(that is what decides psycopg 3's wait function and makes the pools' locks cooperative).
Then the worker pins itself to ``--cpu``, runs the requested scenarios against one warm
pool (and fresh cold pools for the spike), and prints one ``BENCH_RESULT {json}`` line.
Every loop is bounded by a count and a time limit.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.contenders import APP_PREFIX, Contender, Counter, make  # noqa: E402

perf = time.perf_counter

#: Root of the server's process tree (the postmaster) when it runs here; set by --postmaster.
SERVER_ROOT: int | None = None

SCENARIOS = common.SCENARIOS


@dataclass
class Params:
    """Sizes and bounds of every scenario (quick or full)."""

    max_size: int = 10
    greenlets: int = 200
    micro_ops: int = 100_000  # upper bound on iterations of the one-greenlet loops
    micro_seconds: float = 1.0  # ... and on their duration
    micro_warmup: int = 500
    connect_ops: int = 40
    connect_seconds: float = 2.0
    contended_seconds: float = 2.0
    contended_warmup: float = 0.5
    io_seconds: float = 3.0
    io_sleep: float = 0.005
    ceiling_calls: int = 60
    spike_requests: int = 100
    spike_repeats: int = 5
    coop_greenlets: int = 10
    coop_sleep: float = 0.2

    @classmethod
    def quick(cls) -> Params:
        return cls(
            micro_ops=20_000,
            micro_seconds=0.4,
            micro_warmup=200,
            connect_ops=10,
            connect_seconds=0.5,
            contended_seconds=1.0,
            contended_warmup=0.2,
            io_seconds=1.0,
            ceiling_calls=20,
            spike_repeats=1,
        )


# --------------------------------------------------------------------------- helpers


def _loop(body: Callable[[], None], max_ops: int, max_seconds: float) -> tuple[float, int]:
    """Run ``body`` until max_ops or max_seconds; return (seconds, iterations)."""
    count = 0
    start = perf()
    end = start + max_seconds
    now = start
    while count < max_ops:
        body()
        count += 1
        now = perf()
        if now >= end:
            break
    return now - start, count


def _admin_backends(dsn: str, app: str) -> int:
    """Client backends with this application_name right now (own connection, not counted)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, application_name="bench-admin") as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchone()
    return int(row[0]) if row else 0


def _wait_backends_gone(dsn: str, app: str, limit: float = 3.0) -> None:
    deadline = perf() + limit
    while perf() < deadline and _admin_backends(dsn, app) > 0:
        gevent.sleep(0.05)


# --------------------------------------------------------------------------- scenarios


def _measure(prefix: str, body: Callable[[], None], p: Params) -> dict[str, Any]:
    """Warm up, then time ``body`` (bounded); wall and CPU (client, server) per op."""
    _loop(body, p.micro_warmup, p.micro_seconds)
    meter = common.CpuMeter(SERVER_ROOT).start()
    seconds, n = _loop(body, p.micro_ops, p.micro_seconds)
    client, server = meter.stop().per_op_us(n)
    return {
        f"{prefix}_us": seconds / n * 1e6,
        f"{prefix}_n": n,
        f"{prefix}_client_cpu_us": client,
        f"{prefix}_server_cpu_us": server,
    }


def acquire_release(c: Contender, p: Params) -> dict[str, Any]:
    def body() -> None:
        with c.connection():
            pass

    return _measure("acq_rel", body, p)


def select1(c: Contender, p: Params) -> dict[str, Any]:
    query = c.query

    def body() -> None:
        with c.connection() as conn:
            query(conn, "SELECT 1")

    return _measure("select1", body, p)


def held_select1(c: Contender, p: Params) -> dict[str, Any]:
    query = c.query
    with c.connection() as conn:

        def body() -> None:
            query(conn, "SELECT 1")

        return _measure("held_select1", body, p)


def connect_close(c: Contender, p: Params, dsn: str) -> dict[str, Any]:
    """Raw driver connect + close, no pool (the cost a pool amortises)."""
    if c.driver == "psycopg2":
        import psycopg2

        def body() -> None:
            psycopg2.connect(dsn, application_name=APP_PREFIX + "raw").close()

    else:
        import psycopg

        def body() -> None:
            psycopg.connect(dsn, autocommit=True, application_name=APP_PREFIX + "raw").close()

    body()
    seconds, n = _loop(body, p.connect_ops, p.connect_seconds)
    return {"connect_close_ms": seconds / n * 1e3}


def _contended(c: Contender, sql: str, greenlets: int, seconds: float) -> dict[str, Any]:
    """``greenlets`` loop acquire + ``sql`` + release for ``seconds``; stats of the window."""
    query = c.query
    counts = [0] * greenlets
    waits: list[float] = []
    errors: list[str] = []
    meter = common.CpuMeter(SERVER_ROOT).start()
    begin = perf()
    end = begin + seconds

    def run(i: int) -> None:
        while perf() < end:
            t0 = perf()
            try:
                use = c.connection()
                conn = use.__enter__()
            except Exception as ex:
                errors.append(f"acquire: {type(ex).__name__}: {ex}")
                gevent.sleep(0.001)
                continue
            waits.append(perf() - t0)
            try:
                query(conn, sql)
            except Exception as ex:
                errors.append(f"query: {type(ex).__name__}: {ex}")
            finally:
                use.__exit__(None, None, None)
            if perf() <= end:
                counts[i] += 1

    jobs = [gevent.spawn(run, i) for i in range(greenlets)]
    gevent.joinall(jobs, timeout=seconds + 90.0)
    client, server = meter.stop().per_op_us(len(waits))
    stuck = sum(1 for j in jobs if not j.dead)
    gevent.killall(jobs, timeout=5.0)
    waits.sort()
    total = sum(counts)
    return {
        "ops_per_s": total / seconds,
        "ops": total,
        "wait_p50_ms": common.percentile(waits, 50) * 1e3,
        "wait_p99_ms": common.percentile(waits, 99) * 1e3,
        "wait_max_ms": (waits[-1] if waits else math.nan) * 1e3,
        "cv": common.coefficient_of_variation(counts),
        "starved": sum(1 for n in counts if n == 0),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "stuck": stuck,
        # CPU per operation, over every operation including the drain after the window;
        # "per CPU-second" is what the work would reach with a CPU of its own.
        "client_cpu_us": client,
        "server_cpu_us": server,
        "ops_per_cpu_s": 1e6 / (client + server) if server is not None else None,
    }


def contended(c: Contender, p: Params) -> dict[str, Any]:
    _contended(c, "SELECT 1", p.greenlets, p.contended_warmup)
    r = _contended(c, "SELECT 1", p.greenlets, p.contended_seconds)
    return {f"contended_{k}": v for k, v in r.items()}


def io_bound(c: Contender, p: Params) -> dict[str, Any]:
    """pg_sleep under contention against its ceiling: 10 connections / one call's time.

    One call is timed on a held connection both before and after the window (the median of
    all), so a drift of the machine's speed during the round moves the ceiling with it.
    """
    sql = f"SELECT pg_sleep({p.io_sleep})"
    query = c.query
    calls: list[float] = []

    def time_calls(n: int) -> None:
        with c.connection() as conn:
            query(conn, sql)
            deadline = perf() + 10.0
            for _ in range(n):
                t0 = perf()
                query(conn, sql)
                calls.append(perf() - t0)
                if perf() > deadline:
                    break

    _contended(c, sql, p.greenlets, p.contended_warmup)  # every connection used, queue formed
    time_calls(p.ceiling_calls // 2)
    r = _contended(c, sql, p.greenlets, p.io_seconds)
    time_calls(p.ceiling_calls - p.ceiling_calls // 2)
    one_call = common.median(calls)
    ceiling = p.max_size / one_call
    return {
        "io_one_call_ms": one_call * 1e3,
        "io_ceiling": ceiling,
        "io_ops_per_s": r["ops_per_s"],
        "io_pct_of_ceiling": 100.0 * r["ops_per_s"] / ceiling,
        "io_errors": r["errors"],
        "io_cv": r["cv"],
        "io_starved": r["starved"],
    }


def cooperation(c: Contender, p: Params) -> dict[str, Any]:
    sql = f"SELECT pg_sleep({p.coop_sleep})"
    query = c.query

    def one() -> None:
        with c.connection() as conn:
            query(conn, sql)

    t0 = perf()
    jobs = [gevent.spawn(one) for _ in range(p.coop_greenlets)]
    gevent.joinall(jobs, timeout=p.coop_greenlets * p.coop_sleep * 5 + 30)
    wall = perf() - t0
    failed = sum(1 for j in jobs if not j.successful())
    gevent.killall(jobs, timeout=5.0)
    return {"coop_wall_ms": wall * 1e3, "coop_failed": failed}


def spike(key: str, dsn: str, p: Params) -> dict[str, Any]:
    """A cold pool (min 0, max ``max_size``) hit by ``spike_requests`` greenlets at once."""
    times: list[float] = []
    peaks: list[int] = []
    opened: list[int] = []
    failures = 0
    for _ in range(p.spike_repeats):
        _wait_backends_gone(dsn, APP_PREFIX + key)
        Counter.reset()
        c = make(key, dsn, 0, p.max_size)
        query = c.query

        def one(c: Contender = c, query: Callable[[Any, str], None] = query) -> None:
            with c.connection() as conn:
                query(conn, "SELECT 1")

        t0 = perf()
        jobs = [gevent.spawn(one) for _ in range(p.spike_requests)]
        gevent.joinall(jobs, timeout=60.0)
        times.append(perf() - t0)
        failures += sum(1 for j in jobs if not j.successful())
        gevent.killall(jobs, timeout=5.0)
        peaks.append(Counter.peak)
        opened.append(Counter.opened)
        c.close()
    return {
        "spike_ms": common.median(times) * 1e3,
        "spike_peak_backends": max(peaks),
        "spike_opened": max(opened),
        "spike_failed": failures,
    }


# --------------------------------------------------------------------------- profiling


def _area(function: str, path: str) -> str:
    """Which part of the stack a profiled function belongs to (for the summary)."""
    if function in ("_send_query_prepared", "_execute_send", "send_query_params"):
        # libpq writes the query here; with the server pinned to the same CPU, the kernel
        # usually switches to the backend right away, so its work is sampled here too.
        return "libpq send (+ the server's work, same CPU)"
    if path.startswith("greenpool/drivers/gevent_wait"):
        return "psycopg wait path (greenpool's gevent-native wait)"
    if path.startswith("greenpool/"):
        return "greenpool (pool logic)"
    if path.startswith(("psycopg/waiting", "gevent/select", "gevent/timeout", "gevent/event")):
        return "psycopg wait path (psycopg waiting + gevent select/Timeout/Event)"
    if path.startswith("gevent/_abstract_linkable"):
        return "psycopg wait path (psycopg waiting + gevent select/Timeout/Event)"
    if path.startswith("gevent/hub") and function == "run":
        return "hub loop (epoll_wait, callbacks)"
    if path.startswith(("psycopg_pool/", "sqlalchemy/", "psycopg2/", "queue")):
        return "other pool libraries"
    if path.startswith(("threading", "gevent/thread", "gevent/lock")):
        return "locks (psycopg's connection lock, patched threading)"
    if path.startswith("psycopg/"):
        return "psycopg Python (cursor, query, adaptation, results)"
    if path.startswith("benchmarks/"):
        return "benchmark harness"
    if path.startswith("gevent/"):
        return "gevent other (greenlet switches, waiters)"
    return "other"


def function_table(root: Any, top: int = 45) -> str:
    """Self and inclusive time per function of a pyinstrument frame tree, as text."""
    self_t: dict[str, float] = {}
    incl_t: dict[str, float] = {}
    total = root.time or 1.0

    def key(frame: Any) -> str:
        path = frame.file_path_short or frame.file_path or "?"
        return f"{frame.function} ({path}:{frame.line_no})"

    stack: list[tuple[Any, frozenset[str]]] = [(root, frozenset())]
    while stack:
        frame, above = stack.pop()
        if frame.is_synthetic:
            stack.extend((child, above) for child in frame.children)
            continue
        k = key(frame)
        self_t[k] = self_t.get(k, 0.0) + frame.total_self_time
        if k not in above:
            incl_t[k] = incl_t.get(k, 0.0) + frame.time
        below = above | {k}
        stack.extend((child, below) for child in frame.children)
    areas: dict[str, float] = {}
    for k, v in self_t.items():
        function, _, rest = k.partition(" (")
        area = _area(function, rest.rsplit(":", 1)[0])
        areas[area] = areas.get(area, 0.0) + v
    lines = [f"total sampled: {total:.3f} s", "", "self time by area:"]
    for area, v in sorted(areas.items(), key=lambda kv: -kv[1]):
        lines.append(f"{100 * v / total:6.1f}%  {v:8.3f} s  {area}")
    lines += ["", "self time:"]
    for k, v in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * v / total:6.1f}%  {v:8.3f} s  {k}")
    lines += ["", "inclusive time:"]
    for k, v in sorted(incl_t.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * v / total:6.1f}%  {v:8.3f} s  {k}")
    return "\n".join(lines) + "\n"


def profile(c: Contender, p: Params, out_dir: Path) -> dict[str, Any]:
    """Run select1 and contended under pyinstrument; write text and HTML reports."""
    from pyinstrument import Profiler

    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}
    for name, func in (("select1", select1), ("contended", contended)):
        func(c, Params.quick())  # warm up
        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
        metrics = func(c, p)
        profiler.stop()
        stem = out_dir / f"{c.name}-{name}"
        stem.with_suffix(".txt").write_text(
            profiler.output_text(unicode=True, color=False, show_all=True, short_mode=False)
        )
        stem.with_suffix(".html").write_text(profiler.output_html())
        session = profiler.last_session
        if session is not None:
            root = session.root_frame(trim_stem=False)
            if root is not None:
                (out_dir / f"{c.name}-{name}-functions.txt").write_text(function_table(root))
        written[name] = {"report": str(stem.with_suffix(".txt")), **metrics}
    return written


# --------------------------------------------------------------------------- main


# --------------------------------------------------------------------------- paired


def paired(keys: list[str], dsn: str, cycles: int, window: float) -> dict[str, Any]:
    """All contenders in this one process, interleaved in short windows (order shuffled).

    A cross-check for the process-per-contender rounds: background load that drifts over
    seconds hits every contender alike, so per-cycle ratios are much steadier. Each cycle
    runs, per contender: acquire+release, acquire+SELECT 1+release (one greenlet), the
    contended SELECT 1 and the I/O-bound pg_sleep (200 greenlets, 10 connections), for
    about ``window`` seconds each (twice that for the 200-greenlet ones).
    psycopg's wait function is switched per contender: greenpool's gevent-native one for
    greenpool, psycopg's own for every other pool.
    """
    import random

    from psycopg import waiting

    from greenpool.drivers import gevent_wait

    default_wait = waiting.wait  # psycopg's own choice (wait_poll under gevent)
    built: dict[str, Contender] = {}
    waits: dict[str, Any] = {}
    for key in keys:
        built[key] = make(key, dsn, 10, 10)
        # greenpool installs its gevent-native wait process-wide when opened: give it that
        # one, and psycopg's own to every other pool (and to greenpool_pw).
        waits[key] = waiting.wait if key == "greenpool" else default_wait
        if key == "greenpool" and waiting.wait is default_wait:
            waits[key] = gevent_wait.wait  # not installed (opted out): greenpool's own anyway
    waiting.wait = default_wait
    p = Params(micro_ops=1_000_000, micro_seconds=window, micro_warmup=20)
    io_sql = f"SELECT pg_sleep({p.io_sleep})"
    calls = []
    with built[keys[0]].connection() as conn:  # the ceiling, once: 10 / one call's time
        for _ in range(30):
            t0 = perf()
            built[keys[0]].query(conn, io_sql)
            calls.append(perf() - t0)
    ceiling = p.max_size / common.median(calls)
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    order = list(keys)
    try:
        for cycle in range(cycles):
            random.shuffle(order)
            for key in order:
                c = built[key]
                waiting.wait = waits[key]
                rec: dict[str, Any] = {"cycle": cycle}
                rec.update(acquire_release(c, p))
                rec.update(select1(c, p))
                _contended(c, "SELECT 1", 200, 0.05)  # let the queue form
                r = _contended(c, "SELECT 1", 200, window * 2)
                rec.update({f"contended_{k}": v for k, v in r.items()})
                io = _contended(c, io_sql, 200, window * 2)
                rec["io_ops_per_s"] = io["ops_per_s"]
                rec["io_pct_of_ceiling"] = 100.0 * io["ops_per_s"] / ceiling
                out[key].append(rec)
    finally:
        waiting.wait = default_wait
        for c in built.values():
            c.close()
    return {"paired": out, "cycles": cycles, "window": window}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    ap.add_argument("--contender", required=True)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cpu", type=int, default=None)
    ap.add_argument("--nice", type=int, default=None)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--profile", type=Path, default=None, help="profile into this directory")
    ap.add_argument("--round", type=int, default=0)
    ap.add_argument("--postmaster", type=int, default=None, help="server pid, for CPU time")
    ap.add_argument("--paired", default=None, help="KEY,KEY,...: the paired cross-check")
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--window", type=float, default=0.15)
    args = ap.parse_args(argv)
    global SERVER_ROOT
    SERVER_ROOT = args.postmaster
    if args.paired:
        common.pin_self(args.cpu, args.nice)
        res = paired(args.paired.split(","), args.dsn, args.cycles, args.window)
        common.emit_result(common.clean_floats(res))
        return 0

    pinned = common.pin_self(args.cpu, args.nice)
    p = Params.quick() if args.quick else Params()
    import psycopg
    from psycopg import waiting

    result: dict[str, Any] = {
        "contender": args.contender,
        "round": args.round,
        "pid": os.getpid(),
        "client_pinned": pinned,
        "cpu": args.cpu,
        "params": asdict(p),
        "metrics": {},
        "errors": [],
    }
    wanted = [s for s in args.scenarios.split(",") if s]
    warm: Contender | None = None
    try:
        warm = make(args.contender, args.dsn, p.max_size, p.max_size)
        # Read after the contender is built: the prototype contender installs its wait then.
        result["psycopg_wait"] = (
            f"{getattr(waiting.wait, '__module__', '?')}.{getattr(waiting.wait, '__name__', '?')}"
        )
        result["psycopg"] = psycopg.__version__
        result["gevent"] = gevent.__version__
        if args.profile is not None:
            result["profile"] = profile(warm, p, args.profile)
            wanted = []
        for name in wanted:
            t0 = perf()
            try:
                if name == "spike":
                    continue  # after the warm pool is closed
                if name == "connect_close":
                    metrics = connect_close(warm, p, args.dsn)
                else:
                    metrics = globals()[name](warm, p)
                result["metrics"].update(metrics)
            except Exception as ex:
                result["errors"].append(f"{name}: {type(ex).__name__}: {ex}")
                traceback.print_exc()
            print(f"  {args.contender} {name}: {perf() - t0:.1f} s", file=sys.stderr)
    except Exception as ex:
        result["errors"].append(f"setup: {type(ex).__name__}: {ex}")
        traceback.print_exc()
    finally:
        if warm is not None:
            warm.close()
    if "spike" in wanted:
        try:
            result["metrics"].update(spike(args.contender, args.dsn, p))
        except Exception as ex:
            result["errors"].append(f"spike: {type(ex).__name__}: {ex}")
            traceback.print_exc()
    common.emit_result(common.clean_floats(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
