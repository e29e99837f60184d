"""ORM benchmarks: SQLAlchemy (Core and ORM) and Django views on greenpool, side by side.

    python -m benchmarks.orm              # 3 rounds (~4 minutes)
    python -m benchmarks.orm --quick      # 1 short round (~1 minute)
    python -m benchmarks.orm --rounds 5 --out benchmarks/ORM_RESULTS.md

Contenders, each in its own process that patches gevent first (as ``gunicorn -k gevent``
does), rounds alternating A B C ... A B C, medians over rounds, ratios in the same run:

- SQLAlchemy: ``create_engine(..., poolclass=GreenQueuePool)`` against SQLAlchemy's
  default ``QueuePool``, same ``pool_size=10, max_overflow=0``.
  Core: autocommit connections (``isolation_level="AUTOCOMMIT"``: ``SELECT 1`` is one
  round trip, as in the main suite); ORM: ``Session`` with its usual transaction, a
  query on a small mapped table.
- Django: the example project's ``GET /accounts/<id>`` view through Django's WSGI handler
  (request_started / request_finished included), pool cap 10, on greenpool.django,
  django-db-geventpool 4.0.8 (``MAX_CONNS=10``) and Django's own pool (psycopg_pool).

Scenarios: *uncontended* (one greenlet: checkout + return, µs per op, lower is better)
and *contended* (200 greenlets sharing 10 connections for a fixed time: ops/s, higher is
better; *starved* greenlets that never completed an operation; peak server backends).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    ServerPinning,
    clean_floats,
    emit_result,
    local_postmaster,
    median,
    parse_result,
    percentile,
    pick_cpu,
    pin_self,
    worker_env,
)

POOL = 10
GREENLETS = 200

SA_CONTENDERS = {"sa_greenpool": "GreenQueuePool", "sa_queuepool": "QueuePool"}
SA_SCENARIOS = (
    "pool_contended",
    "core_checkout",
    "core_select1",
    "core_contended",
    "orm_session",
    "orm_contended",
)
DJ_CONTENDERS = {
    "dj_greenpool": "greenpool.django",
    "dj_geventpool": "django-db-geventpool",
    "dj_django": "Django's pool (psycopg_pool)",
}
DJ_SCENARIOS = ("view_uncontended", "view_contended")


# =========================================================================== worker side


def _sa_engine(contender: str, dsn: str, app: str, autocommit: bool) -> Any:
    import sqlalchemy as sa
    from sqlalchemy.pool import QueuePool

    from greenpool.sqlalchemy import GreenQueuePool
    from greenpool.sqlalchemy import url_from_conninfo as sa_url

    kwargs: dict[str, Any] = {"pool_size": POOL, "max_overflow": 0, "pool_timeout": 30}
    if autocommit:
        kwargs["isolation_level"] = "AUTOCOMMIT"
    poolclass = GreenQueuePool if contender == "sa_greenpool" else QueuePool
    engine = sa.create_engine(sa_url(dsn, application_name=app), poolclass=poolclass, **kwargs)
    # Warm: POOL connections open, dialect initialised.
    held = [engine.connect() for _ in range(POOL)]
    for c in held:
        c.exec_driver_sql("SELECT 1")
        c.close()
    return engine


def _timed_loop(op: Any, n: int) -> float:
    for _ in range(min(200, n)):
        op()
    start = time.perf_counter()
    for _ in range(n):
        op()
    return (time.perf_counter() - start) / n * 1e6


def _contended(op: Any, seconds: float, dsn: str, app: str) -> dict[str, Any]:
    import gevent
    import psycopg
    from gevent.event import Event

    counts = [0] * GREENLETS
    latencies: list[float] = []
    errors: dict[str, int] = {}
    peak = 0
    stop = Event()

    def sample() -> None:
        nonlocal peak
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
                ).fetchone()
                peak = max(peak, int(row[0]) if row else 0)
                stop.wait(0.05)

    def worker(i: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                op()
            except Exception as ex:
                errors[type(ex).__name__] = errors.get(type(ex).__name__, 0) + 1
                gevent.sleep(0.01)
                continue
            latencies.append(time.perf_counter() - t0)
            counts[i] += 1

    sampler = gevent.spawn(sample)
    start = time.monotonic()
    deadline = start + seconds
    greenlets = [gevent.spawn(worker, i, deadline) for i in range(GREENLETS)]
    done = gevent.joinall(greenlets, timeout=seconds + 15)
    elapsed = time.monotonic() - start
    hung = GREENLETS - len(done)
    gevent.killall([g for g in greenlets if not g.dead], block=False)
    stop.set()
    sampler.join(timeout=5)
    latencies.sort()
    ops = sum(counts)
    return {
        "seconds": elapsed,
        "ops_per_s": ops / min(elapsed, seconds) if ops else 0.0,
        "ops": ops,
        "starved": sum(1 for c in counts if c == 0),
        "p99_ms": percentile(latencies, 99) * 1e3 if latencies else math.nan,
        "errors": errors,
        "hung": hung,
        "peak_backends": peak,
    }


def run_sa(contender: str, dsn: str, seconds: float, n: int) -> dict[str, Any]:
    import sqlalchemy as sa
    from sqlalchemy import text
    from sqlalchemy.orm import Session

    app = f"bench-{contender}"
    out: dict[str, Any] = {}
    core = _sa_engine(contender, dsn, app, autocommit=True)

    def checkout() -> None:
        core.connect().close()

    def select1() -> None:
        with core.connect() as c:
            c.execute(text("SELECT 1"))

    def pool_select1() -> None:
        raw = core.pool.connect()  # SQLAlchemy's pool API, as the main suite uses it
        try:
            cur = raw.cursor()
            cur.execute("SELECT 1")
            cur.fetchall()
            cur.close()
        finally:
            raw.close()

    out["pool_contended"] = _contended(pool_select1, seconds, dsn, app)
    out["core_checkout"] = {"us_per_op": _timed_loop(checkout, n)}
    out["core_select1"] = {"us_per_op": _timed_loop(select1, n)}
    out["core_contended"] = _contended(select1, seconds, dsn, app)
    core.dispose()

    orm = _sa_engine(contender, dsn, app, autocommit=False)
    meta = sa.MetaData()
    items = sa.Table("bench_items", meta, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("name", sa.Text))  # fmt: skip
    query = sa.select(items).where(items.c.id == 1)

    def session() -> None:
        with Session(orm) as s:
            s.execute(query).first()

    out["orm_session"] = {"us_per_op": _timed_loop(session, n)}
    out["orm_contended"] = _contended(session, seconds, dsn, app)
    orm.dispose()
    return out


def run_sa_paired(dsn: str, cycles: int, window: float, n: int) -> dict[str, Any]:
    """Both SQLAlchemy pools in one process, interleaved in short windows (order shuffled
    each cycle), so background load that drifts over seconds hits both alike. Each pool
    waits with what it would use on its own: psycopg's wait for QueuePool, greenpool's
    for GreenQueuePool (switched per window)."""
    import random

    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from greenpool.drivers import gevent_wait

    rng = random.Random(7)
    ops: dict[str, dict[str, Any]] = {}
    for contender in SA_CONTENDERS:
        app = f"bench-paired-{contender}"
        core = _sa_engine(contender, dsn, app, autocommit=True)
        orm = _sa_engine(contender, dsn, app, autocommit=False)

        def checkout(core: Any = core) -> None:
            core.connect().close()

        def select1(core: Any = core) -> None:
            with core.connect() as c:
                c.execute(text("SELECT 1"))

        def session(orm: Any = orm) -> None:
            with Session(orm) as s:
                s.execute(text("SELECT id, name FROM bench_items WHERE id = 1")).first()

        def pool_select1(core: Any = core) -> None:
            raw = core.pool.connect()
            try:
                cur = raw.cursor()
                cur.execute("SELECT 1")
                cur.fetchall()
                cur.close()
            finally:
                raw.close()

        ops[contender] = {
            "app": app,
            "checkout": checkout,
            "select1": select1,
            "session": session,
            "pool_select1": pool_select1,
        }
    timed = {"core_checkout": "checkout", "core_select1": "select1", "orm_session": "session"}
    contended = {
        "pool_contended": "pool_select1",
        "core_contended": "select1",
        "orm_contended": "session",
    }
    totals: dict[str, dict[str, list[float]]] = {
        c: {k: [0.0, 0.0, 0.0] for k in (*timed, *contended)} for c in SA_CONTENDERS
    }
    for _ in range(cycles):
        order = list(SA_CONTENDERS)
        rng.shuffle(order)
        for contender in order:
            if contender == "sa_greenpool":
                gevent_wait.install()
            else:
                gevent_wait.uninstall()
            for scenario, op in timed.items():
                count = n if scenario == "core_checkout" else max(n // 10, 20)
                us = _timed_loop(ops[contender][op], count)
                totals[contender][scenario][0] += us * count
                totals[contender][scenario][1] += count
            for scenario, op in contended.items():
                r = _contended(ops[contender][op], window, dsn, ops[contender]["app"])
                totals[contender][scenario][0] += r["ops"]
                totals[contender][scenario][1] += min(window, r["seconds"])
                totals[contender][scenario][2] = max(totals[contender][scenario][2], r["starved"])
    out: dict[str, Any] = {}
    for contender, per in totals.items():
        out[contender] = {}
        for scenario, (a, b, starved) in per.items():
            if scenario in timed:
                out[contender][scenario] = {"us_per_op": a / b if b else math.nan}
            else:
                out[contender][scenario] = {"ops_per_s": a / b if b else math.nan,
                                            "starved_per_window": starved}  # fmt: skip
    return out


def run_django(contender: str, dsn: str, seconds: float, n: int) -> dict[str, Any]:
    import io
    import random

    import django
    from django.conf import settings

    from greenpool.django import database_from_conninfo

    app = f"bench-{contender}"
    db: dict[str, Any] = {
        **database_from_conninfo(dsn, application_name=app),
        "CONN_MAX_AGE": 0,
    }
    if contender == "dj_greenpool":
        db["ENGINE"] = "greenpool.django"
        db["OPTIONS"]["pool"] = {"min_size": POOL, "max_size": POOL, "timeout": 30}
    elif contender == "dj_geventpool":
        db["ENGINE"] = "django_db_geventpool.backends.postgresql_psycopg3"
        db["OPTIONS"].update(MAX_CONNS=POOL, REUSE_CONNS=POOL)
    else:
        db["ENGINE"] = "django.db.backends.postgresql"
        db["OPTIONS"]["pool"] = {"min_size": POOL, "max_size": POOL, "timeout": 30}
    settings.configure(
        DATABASES={"default": db},
        INSTALLED_APPS=["examples.django_app.bank"],
        ROOT_URLCONF="examples.django_app.urls",
        MIDDLEWARE=["greenpool.django.middleware.PoolExhaustedMiddleware"],
        ALLOWED_HOSTS=["*"],
        USE_TZ=True,
        SECRET_KEY="bench",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        LOGGING_CONFIG=None,
    )
    django.setup()
    from django.core.handlers.wsgi import WSGIHandler

    handler = WSGIHandler()
    rng = random.Random(1)

    def view() -> None:
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": f"/accounts/{rng.randint(1, 400)}",
            "QUERY_STRING": "",
            "SERVER_NAME": "bench",
            "SERVER_PORT": "80",
            "wsgi.input": io.BytesIO(),
            "wsgi.url_scheme": "http",
        }
        status: list[str] = []
        body = handler(environ, lambda s, h, exc_info=None: status.append(s))
        for _ in body:
            pass
        body.close()  # request_finished: the connection goes back
        if not status or not status[0].startswith("200"):
            raise RuntimeError(f"status {status[:1]}")

    out: dict[str, Any] = {"view_uncontended": {"us_per_op": _timed_loop(view, max(n // 4, 50))}}
    out["view_contended"] = _contended(view, seconds, dsn, app)
    return out


def worker_main(args: argparse.Namespace) -> None:
    from gevent import monkey

    monkey.patch_all()
    pin_self(args.cpu, args.nice)
    if args.worker == "sa_paired":
        result = run_sa_paired(args.dsn, args.paired_cycles, args.paired_window, args.n)
    else:
        runner = run_sa if args.worker in SA_CONTENDERS else run_django
        result = runner(args.worker, args.dsn, args.seconds, args.n)
    emit_result(clean_floats({"contender": args.worker, "results": result}))


# =========================================================================== orchestrator


def prepare(dsn: str) -> None:
    """Tables for both suites: the example Django project's (migrate) and bench_items."""
    import psycopg

    from examples.django_app.seed import migrate_and_seed

    migrate_and_seed(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_items (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO bench_items VALUES (1, 'one') ON CONFLICT DO NOTHING")


def _postmaster(dsn: str) -> int | None:
    """The server's postmaster pid (asked while the backend is alive)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        return local_postmaster(int(row[0]) if row else None)


def run_worker(contender: str, dsn: str, args: argparse.Namespace, cpu: int | None) -> Any:
    argv = [
        sys.executable, "-m", "benchmarks.orm", "--worker", contender, "--dsn", dsn,
        "--seconds", str(args.seconds), "--n", str(args.n),
        "--paired-cycles", str(args.paired_cycles), "--paired-window", str(args.paired_window),
    ]  # fmt: skip
    if cpu is not None:
        argv += ["--cpu", str(cpu)]
    if args.nice is not None:
        argv += ["--nice", str(args.nice)]
    proc = subprocess.run(
        argv,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=args.seconds * 4 + 240 + args.paired_cycles * (args.paired_window * 4 + 10),
    )
    result = parse_result(proc.stdout)
    if result is None:
        tail = (proc.stderr or proc.stdout)[-2000:]
        print(f"   {contender}: no result (exit {proc.returncode})\n{tail}", flush=True)
    return result


def summarise(raw: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Median of every figure over rounds, per contender and scenario."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for contender, rounds in raw.items():
        out[contender] = {}
        scenarios = {s for r in rounds for s in r}
        for scenario in scenarios:
            runs = [r[scenario] for r in rounds if scenario in r]
            keys = {k for run in runs for k, v in run.items() if isinstance(v, (int, float))}
            merged: dict[str, Any] = {k: median(run.get(k, math.nan) for run in runs) for k in keys}
            merged["max_starved"] = max((run.get("starved", 0) for run in runs), default=0)
            merged["max_peak_backends"] = max(
                (run.get("peak_backends", 0) for run in runs), default=0
            )
            merged["hung_total"] = sum(run.get("hung", 0) for run in runs)
            errors: dict[str, int] = {}
            for run in runs:
                for k, v in (run.get("errors") or {}).items():
                    errors[k] = errors.get(k, 0) + v
            merged["errors"] = errors
            out[contender][scenario] = merged
    return out


def _fmt(value: Any, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "us":
        return f"{value:,.0f} µs" if value >= 100 else f"{value:.1f} µs"
    return f"{value:,.0f}"


def report(
    summary: dict[str, dict[str, dict[str, Any]]],
    meta: dict[str, Any],
    paired: dict[str, Any] | None = None,
) -> str:
    lines = [
        "# ORM benchmark results",
        "",
        f"{meta['rounds']} round(s), {meta['seconds']:g} s per contended run, pool of {POOL}, "
        f"{GREENLETS} greenlets when contended; {meta['versions']}. Medians over rounds; "
        "ratios are greenpool's figure over the other's in the same run (time: lower is "
        "better, throughput: higher is better). Pinning: " + meta["pinning"] + ".",
        "",
    ]

    def table(title: str, contenders: dict[str, str], rows: list[tuple[str, str, str]],
              reference: str) -> None:  # fmt: skip
        present = [c for c in contenders if c in summary]
        if not present:
            return
        lines.extend([f"## {title}", ""])
        lines.append("| | " + " | ".join(contenders[c] for c in present) + " |")
        lines.append("|---|" + "---|" * len(present))
        for label, scenario, unit in rows:
            cells = []
            for c in present:
                data = summary[c].get(scenario, {})
                key = "us_per_op" if unit == "us" else "ops_per_s"
                value = data.get(key)
                text = _fmt(value, unit) + ("/s" if unit == "ops" else "")
                if c != reference and reference in summary and value:
                    ref = summary[reference].get(scenario, {}).get(key)
                    if ref:
                        ratio = value / ref if unit == "us" else ref / value
                        text += f" (greenpool {ratio:.2f}x)"
                if unit == "ops":
                    text += (
                        f"; starved {data.get('max_starved', 0)}, p99 "
                        f"{_fmt(data.get('p99_ms'), 'n')} ms, peak backends "
                        f"{data.get('max_peak_backends', 0)}"
                    )
                    if data.get("hung_total"):
                        text += f", **hung {data['hung_total']}**"
                    if data.get("errors"):
                        text += f", errors {data['errors']}"
                cells.append(text)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")

    table(
        "SQLAlchemy: GreenQueuePool against QueuePool",
        SA_CONTENDERS,
        [
            ("pool.connect() + SELECT 1 + close(), 200 greenlets on 10", "pool_contended", "ops"),
            ("Core: engine.connect() + close(), one greenlet", "core_checkout", "us"),
            ("Core: connect + SELECT 1 + close, one greenlet", "core_select1", "us"),
            ("Core: contended SELECT 1, 200 greenlets on 10", "core_contended", "ops"),
            ("ORM: Session + query + close, one greenlet", "orm_session", "us"),
            ("ORM: contended Session + query, 200 greenlets on 10", "orm_contended", "ops"),
        ],
        "sa_greenpool",
    )
    table(
        "Django: GET /accounts/<id> through the WSGI handler",
        DJ_CONTENDERS,
        [
            ("one greenlet, per request", "view_uncontended", "us"),
            ("200 greenlets on 10 connections", "view_contended", "ops"),
        ],
        "dj_greenpool",
    )
    if paired and all(c in paired for c in SA_CONTENDERS):
        g, q = paired["sa_greenpool"], paired["sa_queuepool"]
        lines.extend(
            [
                "## SQLAlchemy, paired (both pools in one process, interleaved)",
                "",
                f"{meta['paired_cycles']} cycles; each cycle runs every scenario on both pools "
                f"in shuffled order ({meta['paired_window']:g} s per contended window), so "
                "load that drifts over seconds hits both alike. Each pool waits with the "
                "wait function it would use on its own.",
                "",
                "| | GreenQueuePool | QueuePool | greenpool's advantage |",
                "|---|---|---|---|",
            ]
        )
        for label, key in (
            ("Core: engine.connect() + close()", "core_checkout"),
            ("Core: connect + SELECT 1 + close", "core_select1"),
            ("ORM: Session + query + close", "orm_session"),
        ):
            a, b = g[key]["us_per_op"], q[key]["us_per_op"]
            lines.append(f"| {label} | {_fmt(a, 'us')} | {_fmt(b, 'us')} | {b / a:.2f}x |")
        for label, key in (
            ("pool.connect() + SELECT 1 + close(), 200 greenlets on 10", "pool_contended"),
            ("Core: contended SELECT 1, 200 greenlets on 10", "core_contended"),
            ("ORM: contended Session + query, 200 greenlets on 10", "orm_contended"),
        ):
            a, b = g[key]["ops_per_s"], q[key]["ops_per_s"]
            lines.append(
                f"| {label} | {a:,.0f}/s (starved per window, max "
                f"{g[key]['starved_per_window']:.0f}) | {b:,.0f}/s (max "
                f"{q[key]['starved_per_window']:.0f}) | {a / b:.2f}x |"
            )
        lines.append("")
    lines.append(
        "Ratios in parentheses: greenpool's time or throughput relative to that contender "
        "(for times, >1x means greenpool is faster; for ops/s, >1x means greenpool does more)."
    )
    return "\n".join(lines) + "\n"


def versions() -> str:
    from importlib.metadata import version

    parts = []
    for dist in ("SQLAlchemy", "Django", "django-db-geventpool", "psycopg", "psycopg-pool",
                 "gevent"):  # fmt: skip
        try:
            parts.append(f"{dist} {version(dist)}")
        except Exception:
            continue
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.orm", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 round, 1.5 s runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per contended run")
    parser.add_argument("--n", type=int, default=2000, help="operations per uncontended run")
    parser.add_argument("--contenders", default=",".join([*SA_CONTENDERS, *DJ_CONTENDERS]))
    parser.add_argument("--dsn", default="", help="an existing server (else a private one)")
    parser.add_argument("--cpu", type=int, default=None, help="pin workers to this CPU")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--out", default="", help="also write the report to this file")
    parser.add_argument("--paired-cycles", type=int, default=20, help="0: no paired run")
    parser.add_argument("--paired-window", type=float, default=0.5)
    parser.add_argument("--nice", type=int, default=None, help="nice value (root only)")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    if args.quick:
        args.rounds, args.seconds, args.n, args.paired_cycles = 1, 1.5, 500, 4
    contenders = [c for c in args.contenders.split(",") if c]
    unknown = set(contenders) - set(SA_CONTENDERS) - set(DJ_CONTENDERS)
    if unknown:
        parser.error(f"unknown contender(s): {', '.join(sorted(unknown))}")
    cpu = None if args.no_pin else pick_cpu(args.cpu)

    cluster = None
    dsn = args.dsn
    if not dsn:
        from greenpool.embedded import EmbeddedPostgres

        cluster = EmbeddedPostgres(max_connections=200)
        cluster.start()
        dsn = cluster.dsn()
    raw: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
    pinning = ServerPinning()
    pin_text = "none"
    paired: dict[str, Any] | None = None
    try:
        prepare(dsn)
        if cpu is not None and cluster is not None:
            # The server's processes on the client's CPU, as in the main suite: a round
            # trip is then a direct hand-over, not a wait for another CPU's scheduler.
            pinning.apply(_postmaster(dsn), cpu, args.nice)
        pin_text = f"client CPU {cpu}; {pinning.describe()}" if cpu is not None else "none"
        for rnd in range(args.rounds):
            order = contenders if rnd % 2 == 0 else list(reversed(contenders))
            print(f"round {rnd + 1}/{args.rounds}: {', '.join(order)}", flush=True)
            for contender in order:
                result = run_worker(contender, dsn, args, cpu)
                if result is not None:
                    raw[contender].append(result["results"])
        if args.paired_cycles and any(c in SA_CONTENDERS for c in contenders):
            print(f"paired: {args.paired_cycles} cycles of {args.paired_window:g} s", flush=True)
            result = run_worker("sa_paired", dsn, args, cpu)
            paired = result["results"] if result is not None else None
    finally:
        pinning.restore()
        if cluster is not None:
            cluster.destroy()
    summary = summarise({c: r for c, r in raw.items() if r})
    meta = {
        "rounds": args.rounds,
        "seconds": args.seconds,
        "versions": versions(),
        "pinning": pin_text,
        "paired_cycles": args.paired_cycles,
        "paired_window": args.paired_window,
    }
    text = report(summary, meta, paired)
    print("\n" + text)
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS_DIR / f"orm-{stamp}.json").write_text(
        json.dumps(
            clean_floats({"meta": meta, "raw": raw, "summary": summary, "paired": paired}),
            indent=1,
        )
    )
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
