"""A gevent HTTP load generator: ``python -m benchmarks.loadgen --target NAME=PORT ...``.

For every target, ``--concurrency`` greenlets share a geventhttpclient keep-alive pool of
as many connections and issue ``GET --path`` back to back. With several targets the
generator *interleaves* them: ``--cycles`` times, each target gets a burst of
``--burst`` seconds (the order rotates every cycle), so drifting background load hits
every target alike. Everything is bounded by time and by ``--max-requests`` per burst.

Per burst it records requests/s, latency percentiles and, when ``--app-pid NAME=PID``
and ``--postmaster`` are given (local processes), the CPU the app's process tree and the
database server spent per request (and its user/system split and context switches per
request, from /proc). Prints one ``BENCH_RESULT {json}`` line:
``{"targets": {name: {"bursts": [...], "p50_ms", "p99_ms", ...}}}``.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from geventhttpclient import HTTPClient  # noqa: E402

from benchmarks import common  # noqa: E402

perf = time.perf_counter


def burst(
    client: Any, path: str, concurrency: int, seconds: float, max_requests: int
) -> tuple[list[float], list[str], float]:
    """Drive one target for ``seconds``; (latencies of requests done in time, errors, s)."""
    latencies: list[float] = []
    errors: list[str] = []
    end = perf() + seconds
    budget = [max_requests]

    def one() -> None:
        while perf() < end and budget[0] > 0:
            budget[0] -= 1
            t0 = perf()
            try:
                resp = client.get(path)
                body = resp.read()
                ok = resp.status_code == 200 and body == b"1"
            except Exception as ex:
                ok = False
                if len(errors) < 1000:
                    errors.append(f"{type(ex).__name__}: {ex}")
                gevent.sleep(0.01)
            t1 = perf()
            if t1 <= end:
                if ok:
                    latencies.append(t1 - t0)
                elif len(errors) < 1000:
                    errors.append("bad response")

    started = perf()
    jobs = [gevent.spawn(one) for _ in range(concurrency)]
    gevent.joinall(jobs, timeout=seconds + 60.0)
    gevent.killall(jobs, timeout=5.0)
    return latencies, errors, min(perf() - started, seconds) or seconds


def _pairs(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        name, _, value = item.partition("=")
        out[name] = int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--target", action="append", required=True, help="NAME=PORT")
    ap.add_argument("--app-pid", action="append", default=[], help="NAME=PID (gunicorn master)")
    ap.add_argument("--postmaster", type=int, default=None)
    ap.add_argument("--path", default="/q")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--cycles", type=int, default=1)
    ap.add_argument("--burst", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0, help="per target, not counted")
    ap.add_argument("--max-requests", type=int, default=2_000_000, help="per burst")
    ap.add_argument("--cpu", type=int, default=None)
    ap.add_argument("--nice", type=int, default=None)
    ap.add_argument("--connect-timeout", type=float, default=10.0)
    ap.add_argument("--network-timeout", type=float, default=30.0)
    args = ap.parse_args(argv)
    pinned = common.pin_self(args.cpu, args.nice)
    targets = _pairs(args.target)
    app_pids = _pairs(args.app_pid)
    clients = {
        name: HTTPClient(
            args.host,
            port,
            concurrency=args.concurrency,
            connection_timeout=args.connect_timeout,
            network_timeout=args.network_timeout,
        )
        for name, port in targets.items()
    }
    names = list(targets)
    latencies: dict[str, list[float]] = {n: [] for n in names}
    bursts: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    errors: dict[str, list[str]] = {n: [] for n in names}
    try:
        if args.warmup > 0:
            for name in names:
                burst(clients[name], args.path, args.concurrency, args.warmup, args.max_requests)
        for cycle in range(args.cycles):
            shift = cycle % len(names)
            for name in names[shift:] + names[:shift]:
                app0 = common.tree_cpu_ns(app_pids.get(name))
                pg0 = common.tree_cpu_ns(args.postmaster)
                appc0 = common.tree_counters(app_pids.get(name))
                pgc0 = common.tree_counters(args.postmaster)
                own0 = time.process_time()
                lat, errs, secs = burst(
                    clients[name], args.path, args.concurrency, args.burst, args.max_requests
                )
                own1 = time.process_time()
                app1 = common.tree_cpu_ns(app_pids.get(name))
                pg1 = common.tree_cpu_ns(args.postmaster)
                appc1 = common.tree_counters(app_pids.get(name))
                pgc1 = common.tree_counters(args.postmaster)
                n = max(1, len(lat))
                lat.sort()
                rec: dict[str, Any] = {
                    "cycle": cycle,
                    "rps": len(lat) / secs,
                    "p50_ms": common.percentile(lat, 50) * 1e3,
                    "p99_ms": common.percentile(lat, 99) * 1e3,
                    "errors": len(errs),
                    "loadgen_cpu_us": (own1 - own0) * 1e6 / n,
                }
                if app0 is not None and app1 is not None:
                    rec["app_cpu_us"] = (app1 - app0) / 1e3 / n
                if pg0 is not None and pg1 is not None:
                    rec["pg_cpu_us"] = (pg1 - pg0) / 1e3 / n
                # user/system split and context switches per request
                rec.update(common.counters_delta(appc0, appc1, n, "app"))
                rec.update(common.counters_delta(pgc0, pgc1, n, "pg"))
                if "app_cpu_us" in rec and "pg_cpu_us" in rec:
                    rec["req_per_cpu_s"] = 1e6 / (rec["app_cpu_us"] + rec["pg_cpu_us"])
                bursts[name].append(rec)
                latencies[name].extend(lat)
                errors[name].extend(errs[:10])
    finally:
        for client in clients.values():
            client.close()
    out: dict[str, Any] = {}
    for name in names:
        lat = sorted(latencies[name])
        out[name] = {
            "bursts": bursts[name],
            "requests": len(lat),
            "p50_ms": common.percentile(lat, 50) * 1e3,
            "p99_ms": common.percentile(lat, 99) * 1e3,
            "max_ms": lat[-1] * 1e3 if lat else None,
            "first_error": errors[name][0] if errors[name] else None,
        }
    result = {"targets": out, "client_pinned": pinned, "concurrency": args.concurrency}
    common.emit_result(common.clean_floats(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
