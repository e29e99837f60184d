"""Run the greenpool benchmark suite: ``python -m benchmarks`` (or ``benchmarks/run.py``).

Starts a throwaway PostgreSQL (``tests/support/pgcluster.py``) unless ``--dsn`` is given,
pins it and every client process to one CPU when possible, then for each round runs one
worker process per contender (A B C ... A B C ...), each patched by gevent before any
driver is imported, and the HTTP end-to-end comparison (gunicorn -k gevent + a gevent
load generator). Writes ``benchmarks/results/<stamp>-<mode>/`` (raw JSON, summary JSON,
``report.md``, ``chart.png``, worker logs) and, with ``--out``, a copy of the report (and
the chart next to it).

``--quick`` (about a minute, for CI) runs one short round of the core contenders;
the default full mode runs 7 rounds with longer windows, plus greenpool with psycopg's own
wait function (``greenpool_pw``) to show what greenpool's gevent-native wait brings.
``--profile`` instead profiles greenpool's hot paths (SELECT 1 and contended) with
pyinstrument and writes the reports to the results directory.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make "benchmarks" importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, report

CORE = ["greenpool", "psycopg_pool", "sqla_fifo", "sqla_lifo", "psycopg2", "naive", "nopool"]
FULL = [*CORE, "greenpool_pw"]
HTTP_CORE = ["greenpool", "psycopg_pool", "nopool"]
HTTP_FULL = ["greenpool", "psycopg_pool", "nopool", "greenpool_pw", "nodb"]
#: ``--flask-http``: the Flask extension against the raw pool and psycopg_pool wired both ways.
HTTP_FLASK = ["ext", "raw", "psycopg_pool_hand", "psycopg_pool_with", "nodb"]
HTTP_ENDPOINTS = {"select1": "/q", "sleep": "/sleep", "tx": "/tx"}  # as in benchmarks.httpapp
HTTP_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS bench_http_accounts (id int PRIMARY KEY, balance bigint)",
    "INSERT INTO bench_http_accounts SELECT i, 0 FROM generate_series(1, 10000) i "
    "ON CONFLICT DO NOTHING",
)
WORKER_TIMEOUT = 300.0


def greenpool_fingerprint() -> str:
    """A short hash of greenpool's source: a run must not mix versions of the core."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((common.REPO_ROOT / "greenpool").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def greenpool_revision() -> str:
    """git HEAD (and whether greenpool/ has uncommitted changes) plus the source hash."""
    head = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(common.REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(common.REPO_ROOT), "status", "--porcelain", "greenpool"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        if dirty:
            head += " + uncommitted changes in greenpool/"
    return f"repo at {head}, greenpool source hash {greenpool_fingerprint()}"


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- server


@contextlib.contextmanager
def database(dsn: str | None, keep_log: Path) -> Iterator[tuple[str, int | None, str]]:
    """Yield (dsn, postmaster pid or None, description); own cluster when dsn is None."""
    if dsn:
        yield dsn, None, "given --dsn"
        return
    from greenpool.embedded import EmbeddedPostgres  # psycopg: fine, never patched here

    cluster = EmbeddedPostgres(max_connections=150)
    t0 = time.monotonic()
    cluster.start()
    try:
        pid_text = (cluster.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        desc = (
            f"throwaway PgCluster on 127.0.0.1:{cluster.port} (bindir {cluster.bindir}, "
            f"started in {time.monotonic() - t0:.1f} s)"
        )
        yield cluster.admin_dsn, int(pid_text.strip()), desc
    finally:
        with contextlib.suppress(Exception):
            keep_log.write_text(cluster.log_tail(200))
        cluster.destroy()


def server_info(dsn: str) -> tuple[str, int | None]:
    """(server version, backend pid) over one short connection."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, application_name="bench-admin") as conn:
        row = conn.execute("SELECT current_setting('server_version'), pg_backend_pid()").fetchone()
    assert row is not None
    return str(row[0]), int(row[1])


# --------------------------------------------------------------------------- processes


def run_worker(
    contender: str,
    dsn: str,
    args: argparse.Namespace,
    rnd: int,
    logdir: Path,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.worker",
        "--contender",
        contender,
        "--dsn",
        dsn,
        "--round",
        str(rnd),
        "--scenarios",
        args.scenarios,
    ]
    if args.quick:
        cmd.append("--quick")
    if args.cpu_pinned is not None:
        cmd += ["--cpu", str(args.cpu_pinned)]
    if args.nice is not None:
        cmd += ["--nice", str(args.nice)]
    if args.postmaster is not None:
        cmd += ["--postmaster", str(args.postmaster)]
    cmd += extra or []
    errfile = logdir / f"worker-{contender}-r{rnd}.log"
    with errfile.open("w") as err:
        try:
            proc = subprocess.run(
                cmd,
                cwd=common.REPO_ROOT,
                env=common.worker_env(),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                timeout=WORKER_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"contender": contender, "round": rnd, "metrics": {}, "errors": ["timeout"]}
    result = common.parse_result(proc.stdout)
    if result is None:
        return {
            "contender": contender,
            "round": rnd,
            "metrics": {},
            "errors": [f"worker exited {proc.returncode} without a result (see {errfile})"],
        }
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin_child(cpu: int | None, nice: int | None) -> Any:
    if cpu is None and nice is None:
        return None

    def pin() -> None:
        common.pin_self(cpu, nice)

    return pin


def http_schema(dsn: str) -> None:
    """The table of the ``/tx`` endpoint (httpapp cannot be imported here: it reads env)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, application_name="bench-admin") as conn:
        for sql in HTTP_SCHEMA:
            conn.execute(sql)


def run_http(
    variants: list[str], dsn: str, args: argparse.Namespace, logdir: Path
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Start one gunicorn -k gevent per variant, then, for each endpoint in turn, drive them
    all, interleaved, with one load generator (``--http-cycles`` bursts of
    ``--http-seconds`` each, order rotating).

    Returns {endpoint: the load generator's result ({"targets": {variant: ...}})} and
    problems.
    """
    problems: list[str] = []
    servers: dict[str, subprocess.Popen[bytes]] = {}
    ports: dict[str, int] = {}
    logs = []
    endpoints = [e for e in args.http_endpoints.split(",") if e]
    results: dict[str, dict[str, Any]] = {}
    if "tx" in endpoints:
        http_schema(dsn)
    try:
        for v in variants:
            port = _free_port()
            env = common.worker_env()
            env.update({"BENCH_DSN": dsn, "BENCH_HTTP_POOL": v, "BENCH_HTTP_MAX_SIZE": "10"})
            glog = (logdir / f"gunicorn-{v}.log").open("w")
            logs.append(glog)
            servers[v] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "-k",
                    "gevent",
                    "-w",
                    str(args.http_workers),
                    "--worker-connections",
                    "1000",
                    "--keep-alive",
                    "60",
                    "-b",
                    f"127.0.0.1:{port}",
                    "--log-level",
                    "warning",
                    "benchmarks.httpapp:create_app()",
                ],
                cwd=common.REPO_ROOT,
                env=env,
                stdout=glog,
                stderr=subprocess.STDOUT,
                preexec_fn=_pin_child(args.cpu_pinned, args.nice),  # single-threaded parent
            )
            ports[v] = port
        deadline = time.monotonic() + 60.0
        for v, port in ports.items():
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/q", timeout=2) as r:
                        if r.read() == b"1":
                            break
                except OSError:
                    pass
                if servers[v].poll() is not None or time.monotonic() > deadline:
                    problems.append(f"http {v}: gunicorn did not come up (see its log)")
                    break
                time.sleep(0.1)
        live = [v for v in variants if servers[v].poll() is None]
        if not live:
            return {}, problems
        for endpoint in endpoints:
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.loadgen",
                "--path",
                HTTP_ENDPOINTS[endpoint],
                "--concurrency",
                str(args.http_concurrency),
                "--cycles",
                str(args.http_cycles),
                "--burst",
                str(args.http_seconds),
                "--warmup",
                str(args.http_warmup),
            ]
            for v in live:
                cmd += ["--target", f"{v}={ports[v]}", "--app-pid", f"{v}={servers[v].pid}"]
            if args.postmaster is not None:
                cmd += ["--postmaster", str(args.postmaster)]
            if args.loadgen_cpu is not None:
                cmd += ["--cpu", str(args.loadgen_cpu)]
            if args.nice is not None:
                cmd += ["--nice", str(args.nice)]
            budget = len(live) * (args.http_cycles * args.http_seconds + args.http_warmup) + 120
            try:
                proc = subprocess.run(
                    cmd,
                    cwd=common.REPO_ROOT,
                    env=common.worker_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=budget,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                problems.append(f"http {endpoint}: load generator timed out")
                continue
            result = common.parse_result(proc.stdout)
            if result is None:
                problems.append(f"http {endpoint}: load generator failed: {proc.stdout[-500:]}")
                continue
            results[endpoint] = result
        return results, problems
    finally:
        for server in servers.values():
            server.send_signal(signal.SIGTERM)
        for server in servers.values():
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=5)
        for glog in logs:
            glog.close()


PAIRED_METRICS = (
    "acq_rel_us",
    "acq_rel_client_cpu_us",
    "select1_us",
    "select1_client_cpu_us",
    "contended_ops_per_s",
    "contended_ops_per_cpu_s",
    "contended_wait_p99_ms",
    "contended_cv",
    "contended_starved",
    "io_ops_per_s",
    "io_pct_of_ceiling",
)


def run_paired(
    keys: list[str], dsn: str, args: argparse.Namespace, logdir: Path
) -> tuple[dict[str, dict[str, dict[str, float]]], list[str]]:
    """The in-process interleaved cross-check; {contender: {metric: {median, ratio}}}."""
    extra = [
        "--paired",
        ",".join(keys),
        "--cycles",
        str(args.paired_cycles),
        "--window",
        str(args.paired_window),
    ]
    res = run_worker("paired", dsn, args, 0, logdir, extra)
    problems = [f"paired: {e}" for e in res.get("errors", [])]
    data: dict[str, list[dict[str, Any]]] = res.get("paired") or {}
    ref = {r["cycle"]: r for r in data.get(common.REFERENCE, [])}
    pg2 = {r["cycle"]: r for r in data.get("psycopg2", [])}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, recs in data.items():
        per: dict[str, dict[str, float]] = {}
        # The "query through greenpool vs psycopg2 + psycogreen" target, paired per cycle.
        vs2 = [
            r["select1_us"] / pg2[r["cycle"]]["select1_us"]
            for r in recs
            if r.get("select1_us") and pg2.get(r["cycle"], {}).get("select1_us")
        ]
        per["select1_vs_psycopg2"] = {"median": common.median(vs2), "ratio": math.nan}
        for metric in PAIRED_METRICS:
            vals = [r[metric] for r in recs if isinstance(r.get(metric), (int, float))]
            ratios = [
                r[metric] / ref[r["cycle"]][metric]
                for r in recs
                if isinstance(r.get(metric), (int, float))
                and r["cycle"] in ref
                and ref[r["cycle"]].get(metric)
            ]
            per[metric] = {
                "median": common.median(vals),
                "ratio": common.median(ratios),
                "max": max(vals) if vals else float("nan"),
            }
        out[key] = per
    return out, problems


def http_summary(
    result: dict[str, Any], reference: str = common.REFERENCE
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-burst records (aggregated like rounds) and pooled/paired extras per variant."""
    records: list[dict[str, Any]] = []
    extras: dict[str, Any] = {}
    targets = result.get("targets", {})
    ref = targets.get(reference, {}).get("bursts", [])
    ref_rps = {b["cycle"]: b["rps"] for b in ref if b.get("rps")}
    # Database-side CPU per request, paired: each burst minus the no-database floor's
    # burst of the same cycle (the floor itself drifts by 20-40% on a shared machine).
    floor = {
        b["cycle"]: b["app_cpu_us"]
        for b in targets.get("nodb", {}).get("bursts", [])
        if b.get("app_cpu_us") is not None
    }

    def dbside(b: dict[str, Any]) -> float | None:
        if b.get("app_cpu_us") is None or b["cycle"] not in floor:
            return None
        return float(b["app_cpu_us"] + (b.get("pg_cpu_us") or 0.0) - floor[b["cycle"]])

    ref_db = {b["cycle"]: dbside(b) for b in ref}
    for v, info in targets.items():
        ratios = []
        db: list[float] = []
        db_ratios: list[float] = []
        for b in info.get("bursts", []):
            records.append({"contender": v, "round": b["cycle"], "metrics": b})
            if ref_rps.get(b["cycle"]):
                ratios.append(b["rps"] / ref_rps[b["cycle"]])
            d, r = dbside(b), ref_db.get(b["cycle"])
            if d is not None and v != "nodb":
                db.append(d)
                if r:
                    db_ratios.append(d / r)
        extras[v] = {
            "p50_ms": info.get("p50_ms"),
            "p99_ms": info.get("p99_ms"),
            "requests": info.get("requests"),
            "rps_paired_ratio": common.median(ratios) if ratios else None,
            "dbside_us": common.median(db) if db else None,
            "dbside_paired_ratio": common.median(db_ratios) if db_ratios else None,
            "first_error": info.get("first_error"),
        }
    return records, extras


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    ap.add_argument("--quick", action="store_true", help="about a minute: CI smoke")
    ap.add_argument("--rounds", type=int, default=None, help="default: 1 quick, 7 full")
    ap.add_argument("--dsn", default=None, help="use this server instead of a throwaway one")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    ap.add_argument("--contenders", default=None, help="comma-separated keys")
    ap.add_argument("--scenarios", default=None, help="comma-separated worker scenarios")
    ap.add_argument("--http", default=None, help="comma-separated HTTP variants ('' = none)")
    ap.add_argument("--http-seconds", type=float, default=None, help="burst length")
    ap.add_argument("--http-cycles", type=int, default=None, help="bursts per variant")
    ap.add_argument(
        "--paired-cycles",
        type=int,
        default=None,
        help="cycles of the in-process interleaved cross-check (0: skip; default 3 quick, 25 full)",
    )
    ap.add_argument("--paired-window", type=float, default=0.15, help="seconds per window")
    ap.add_argument("--http-concurrency", type=int, default=50)
    ap.add_argument(
        "--http-endpoints",
        default=None,
        help="comma-separated: select1 (/q), sleep (pg_sleep 5 ms), tx (short transaction); "
        "default select1, all three with --flask-http",
    )
    ap.add_argument("--http-workers", type=int, default=1, help="gunicorn workers per app")
    ap.add_argument(
        "--flask-http",
        action="store_true",
        help="only the HTTP comparison of the Flask extension (ext) with the raw pool, "
        "psycopg_pool wired by hand and with `with pool.connection()`, and the no-database "
        "floor, on every endpoint (with --quick: a CI smoke under a minute)",
    )
    ap.add_argument(
        "--loadgen-cpu",
        type=int,
        default=None,
        help="CPU for the HTTP load generator (default: one other than the apps' CPU)",
    )
    ap.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: last one)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin anything")
    ap.add_argument(
        "--nice",
        type=int,
        default=None,
        help="also give the server and every client process this nice value (e.g. -10, "
        "needs root): on a machine shared with other work it keeps them off the pinned CPU "
        "(the server's old value is restored afterwards)",
    )
    ap.add_argument(
        "--pin-server",
        action="store_true",
        help="with --dsn: pin that server too (found via a backend's parent pid; restored "
        "afterwards). The throwaway server is always pinned unless --no-pin.",
    )
    ap.add_argument("--profile", action="store_true", help="profile greenpool's hot paths")
    ap.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
    args = ap.parse_args(argv)
    scenarios = common.SCENARIOS
    if args.flask_http:
        if args.contenders is None:
            args.contenders = ""
        if args.http is None:
            args.http = ",".join(HTTP_FLASK)
        if args.http_endpoints is None:
            args.http_endpoints = ",".join(HTTP_ENDPOINTS)
        if args.paired_cycles is None:
            args.paired_cycles = 0
        if args.http_cycles is None:
            args.http_cycles = 2 if args.quick else 10
    if args.http_endpoints is None:
        args.http_endpoints = "select1"
    if args.rounds is None:
        args.rounds = 1 if args.quick else 7
    if args.contenders is None:
        args.contenders = ",".join(CORE if args.quick else FULL)
    if args.scenarios is None:
        args.scenarios = ",".join(scenarios)
    if args.http is None:
        args.http = ",".join(HTTP_CORE if args.quick else HTTP_FULL)
    if args.http_seconds is None:
        args.http_seconds = 0.5 if args.quick else 1.5
    if args.paired_cycles is None:
        args.paired_cycles = 2 if args.quick else 25
    if args.http_cycles is None:
        args.http_cycles = 3 if args.quick else 20
    args.http_warmup = 0.5 if args.quick else 1.0
    if args.flask_http and args.quick:
        args.http_warmup = 0.3
    unknown = set(filter(None, args.contenders.split(","))) - set(common.CONTENDERS)
    if unknown:
        ap.error(f"unknown contender(s): {', '.join(sorted(unknown))}")
    unknown = set(filter(None, args.scenarios.split(","))) - set(scenarios)
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    unknown = set(filter(None, args.http.split(","))) - set(report.HTTP_LABELS)
    if unknown:
        ap.error(f"unknown HTTP variant(s): {', '.join(sorted(unknown))}")
    unknown = set(filter(None, args.http_endpoints.split(","))) - set(HTTP_ENDPOINTS)
    if unknown:
        ap.error(f"unknown HTTP endpoint(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.greenpool_rev = greenpool_revision()
    mode = "quick" if args.quick else "full"
    if args.flask_http:
        mode = f"flask-http-{mode}"
    if args.profile:
        mode = "profile"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = args.results_dir / f"{stamp}-{mode}"
    logdir = outdir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load_before = os.getloadavg()

    cpu = None if args.no_pin else common.pick_cpu(args.cpu)
    args.cpu_pinned = cpu
    # The HTTP load generator costs about as much CPU per request as the app: on the apps'
    # CPU it would take that much from them and dilute every difference between them.
    if args.loadgen_cpu is None and cpu is not None:
        args.loadgen_cpu = common.other_cpu(cpu)
    client_note = (
        f"client processes pinned to CPU {cpu}" if cpu is not None else "clients NOT pinned"
    )
    if args.nice is not None:
        client_note += f", nice {args.nice}"
    if args.loadgen_cpu is not None:
        client_note += f"; HTTP load generator on CPU {args.loadgen_cpu}"
    pinning = common.ServerPinning()
    problems: list[str] = []
    log(f"results: {outdir}")
    with database(args.dsn, logdir / "postgresql.log") as (dsn, postmaster, server_desc):
        version, backend = server_info(dsn)
        # The postmaster, when the server runs on this machine: for pinning and CPU time.
        pm = postmaster if postmaster is not None else common.local_postmaster(backend)
        if pm is not None and common.tree_cpu_ns(pm) is None:
            pm = None
        args.postmaster = pm
        if cpu is not None and (args.dsn is None or args.pin_server):
            pinning.apply(pm, cpu, args.nice)
        elif cpu is not None:
            pinning.reason = "--dsn given without --pin-server"
        pin_text = f"{client_note}; {pinning.describe()}"
        log(f"server: PostgreSQL {version}, {server_desc}")
        log(f"pinning: {pin_text}")
        try:
            if args.profile:
                return profile(dsn, args, outdir, logdir)
            runs: list[dict[str, Any]] = []
            http_runs: list[dict[str, Any]] = []
            http_extras: dict[str, Any] = {}
            endpoint_agg: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
            endpoint_runs: dict[str, list[dict[str, Any]]] = {}
            paired_agg: dict[str, dict[str, dict[str, float]]] = {}
            contenders = [c for c in args.contenders.split(",") if c]
            variants = [v for v in args.http.split(",") if v]
            seen_sources = {greenpool_fingerprint()}
            for rnd in range(args.rounds):
                for c in contenders:
                    seen_sources.add(greenpool_fingerprint())
                    t0 = time.monotonic()
                    res = run_worker(c, dsn, args, rnd, logdir)
                    runs.append(res)
                    m = res.get("metrics", {})
                    log(
                        f"round {rnd + 1}/{args.rounds} {c:13s} {time.monotonic() - t0:5.1f} s  "
                        f"acq+rel {m.get('acq_rel_us', float('nan')):8.2f} µs  "
                        f"select1 {m.get('select1_us', float('nan')):7.1f} µs  "
                        f"contended {m.get('contended_ops_per_s', float('nan')):8.0f}/s  "
                        f"io {m.get('io_pct_of_ceiling', float('nan')):5.1f}%  "
                        f"spike {m.get('spike_ms', float('nan')):6.1f} ms"
                    )
                    for e in res.get("errors", []):
                        problems.append(f"{c} round {rnd + 1}: {e}")
                        log(f"  ERROR {e}")
            paired_keys = [c for c in contenders if c != "nopool"]
            if args.paired_cycles > 0 and len(paired_keys) > 1:
                t0 = time.monotonic()
                paired_agg, paired_problems = run_paired(paired_keys, dsn, args, logdir)
                problems.extend(paired_problems)
                for k, m in paired_agg.items():
                    log(
                        f"paired {k:13s} acq+rel {m['acq_rel_us']['median']:7.2f} µs "
                        f"({m['acq_rel_us']['ratio']:.2f}x)  select1 "
                        f"{m['select1_us']['median']:6.1f} µs ({m['select1_us']['ratio']:.2f}x)  "
                        f"contended {m['contended_ops_per_s']['median']:7.0f}/s "
                        f"({m['contended_ops_per_s']['ratio']:.2f}x)"
                    )
                log(f"paired phase: {time.monotonic() - t0:.1f} s")
            seen_sources.add(greenpool_fingerprint())
            if len(seen_sources) > 1:
                problems.append(
                    "greenpool's source changed during the run "
                    f"({len(seen_sources)} versions seen): the results mix versions; rerun"
                )
                log(f"  WARNING {problems[-1]}")
            if variants:
                t0 = time.monotonic()
                http_by_ep, http_problems = run_http(variants, dsn, args, logdir)
                problems.extend(http_problems)
                for e in http_problems:
                    log(f"  ERROR {e}")
                http_ref = report.http_reference(variants)
                for endpoint, result in http_by_ep.items():
                    recs, extras = http_summary(result, http_ref)
                    endpoint_agg[endpoint] = report.aggregate(recs)
                    report.merge_http_extras(endpoint_agg[endpoint], extras)
                    endpoint_runs[endpoint] = recs
                    for v, extra in extras.items():
                        if extra.get("first_error"):
                            problems.append(f"http {endpoint} {v}: {extra['first_error']}")
                    if endpoint == "select1" and not args.flask_http:
                        http_runs, http_extras = recs, extras
                    for v, info in result.get("targets", {}).items():
                        rps = [b["rps"] for b in info.get("bursts", [])]
                        log(
                            f"http {endpoint:7s} {v:17s} median {common.median(rps):8.0f} req/s "
                            f"over {len(rps)} bursts  p50 {info.get('p50_ms') or 0:6.2f} ms  "
                            f"p99 {info.get('p99_ms') or 0:6.2f} ms"
                        )
                log(f"http phase: {time.monotonic() - t0:.1f} s")
        finally:
            pinning.restore()

    agg = report.aggregate(runs)
    http_agg = report.aggregate(http_runs)
    report.merge_http_extras(http_agg, http_extras)
    targets = report.evaluate_targets(agg, http_agg, paired_agg)
    waits = sorted({f"{r['contender']}={r.get('psycopg_wait', '?')}" for r in runs})
    meta = {
        "mode": mode,
        "when": dt.datetime.now().isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "versions": f"{versions()}; {args.greenpool_rev}",
        "server": f"PostgreSQL {version}, {server_desc}",
        "pinning": pin_text,
        "wait_funcs": ", ".join(waits),
        "http_concurrency": args.http_concurrency,
        "paired": f"{args.paired_cycles} cycles, windows of {args.paired_window:g} s "
        f"({2 * args.paired_window:g} s contended)",
        "http_bursts": f"{args.http_cycles} cycles of {args.http_seconds:g} s bursts per app, "
        f"after {args.http_warmup:g} s of warm-up each",
        "http_workers": args.http_workers,
        "problems": problems,
        "elapsed_s": round(time.monotonic() - started, 1),
        "load": f"1-min load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after "
        f"(other work on this machine shares the CPUs)",
    }
    chart_path: Path | None = outdir / "chart.png"
    assert chart_path is not None
    try:
        if agg or http_agg:
            report.chart(
                agg, http_agg, chart_path, f"greenpool benchmark, {mode} mode, {meta['when']}"
            )
        else:  # --flask-http: the tables say it all
            chart_path = None
    except Exception as ex:  # a report without a chart beats no report
        problems.append(f"chart: {type(ex).__name__}: {ex}")
        chart_path = None
    md = report.markdown(
        agg,
        http_agg,
        targets,
        meta,
        chart_path.name if chart_path is not None else None,
        paired_agg,
        endpoint_agg,
    )
    (outdir / "report.md").write_text(md)
    (outdir / "raw.json").write_text(
        json.dumps(
            common.clean_floats({"runs": runs, "http": http_runs, "http_endpoints": endpoint_runs}),
            indent=1,
        )
    )
    (outdir / "summary.json").write_text(
        json.dumps(
            common.clean_floats(
                {
                    "meta": meta,
                    "medians": agg,
                    "http": http_agg,
                    "http_endpoints": endpoint_agg,
                    "paired": paired_agg,
                    "targets": [t.__dict__ for t in targets],
                }
            ),
            indent=1,
        )
    )
    for name in ("report.md", "chart.png"):
        src = outdir / name
        if src.exists():
            shutil.copyfile(src, args.results_dir / f"latest-{mode}-{name}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out_md = md
        if chart_path is not None:
            chart_copy = args.out.with_suffix(".png")
            shutil.copyfile(chart_path, chart_copy)
            out_md = md.replace(f"]({chart_path.name})", f"]({chart_copy.name})")
        args.out.write_text(out_md)
        log(f"report copied to {args.out}")
    print()
    print(md)
    log(f"done in {meta['elapsed_s']} s; results in {outdir}")
    return 0


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in ("greenpool", "gevent", "psycopg", "psycopg-pool", "psycopg2-binary", "SQLAlchemy"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    return ", ".join(parts)


def profile(dsn: str, args: argparse.Namespace, outdir: Path, logdir: Path) -> int:
    """pyinstrument reports of select1 and contended for greenpool (and comparisons)."""
    keys = [c for c in args.contenders.split(",") if c] if args.contenders else []
    wanted = [k for k in ("greenpool", "greenpool_pw", "psycopg_pool") if not keys or k in keys]
    for key in wanted:
        res = run_worker(key, dsn, args, 0, logdir, ["--profile", str(outdir / "profiles")])
        for e in res.get("errors", []):
            log(f"  ERROR {key}: {e}")
        for scen, info in (res.get("profile") or {}).items():
            us = info.get("select1_us")
            ops = info.get("contended_ops_per_s")
            shown = f"{us:.1f} µs/op" if us else f"{ops:.0f} ops/s" if ops else ""
            log(f"{key:13s} {scen:10s} {shown:>14s} (under the profiler)  {info.get('report')}")
    log(f"profiles in {outdir / 'profiles'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
