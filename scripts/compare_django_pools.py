"""Side by side: the example Django project on greenpool.django, django-db-geventpool and
Django's own pool (psycopg_pool), each under gunicorn -k gevent against a private
PostgreSQL. Prints the Markdown table of RELIABILITY.md's Django section.

    python scripts/compare_django_pools.py [--engines greenpool,geventpool,django]

Scenarios (same settings for every pool; pool cap 4 per worker, timeout 5 s):
1. load: 2 workers, 120 keep-alive clients for 10 s (reads, transfers, slow requests,
   spawned greenlets); failures, requests/s, peak server backends against 2 x 4.
   1a: the same without the requests that spawn greenlets.
2. exhaustion: 1 worker, cap 2, timeout 1 s, 10 simultaneous 3-second requests; a
   client gives up after 15 s (counted as hung).
3. spawned greenlets that never close their connection: 20 requests that each spawn 3.
4. SIGTERM: backends left on the server 10 s after gunicorn stopped.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import djangoscenarios as scenarios  # noqa: E402
from tests.support import webload  # noqa: E402
from tests.support.pgcluster import PgCluster  # noqa: E402

LABELS = {
    "greenpool": "greenpool.django",
    "geventpool": "django-db-geventpool 4.0.8",
    "django": "Django's pool (psycopg_pool)",
}


def stop(server: webload.Server, dsn: str) -> int:
    server.stop(timeout=30)
    return webload.wait_no_backends(dsn, server.name, timeout=10)


def load(dsn: str, engine: str, logs: Path, pick: Any = scenarios.pick) -> dict[str, Any]:
    server = scenarios.start(dsn, logs / f"{engine}-load.log", engine=engine, workers=2)
    try:
        r = webload.run_load(server, dsn, pick, clients=120, seconds=10, seed=1)
    finally:
        left = stop(server, dsn)
    kinds: dict[str, int] = {}
    for f in r.failures:
        key = str(f[2])[:40]
        kinds[key] = kinds.get(key, 0) + 1
    return {
        "requests": r.requests,
        "rps": r.rps,
        "failures": len(r.failures),
        "failure_kinds": kinds,
        "peak": r.peak_backends,
        "left_after_sigterm": left,
    }


def exhaustion(dsn: str, engine: str, logs: Path) -> dict[str, Any]:
    server = scenarios.start(
        dsn, logs / f"{engine}-exhaustion.log", engine=engine, workers=1, max_size=2, timeout=1
    )
    try:
        b = webload.run_burst(server, dsn, "/slow?seconds=3", clients=10, give_up=15)
    finally:
        stop(server, dsn)
    return {
        "statuses": dict(b.statuses),
        "max_latency": b.max_latency,
        "hung": b.hung,
        "peak": b.peak_backends,
    }


def spawned(dsn: str, engine: str, logs: Path) -> dict[str, Any]:
    server = scenarios.start(dsn, logs / f"{engine}-spawn.log", engine=engine, workers=1)
    statuses: dict[int | str, int] = {}
    peak = 0
    try:
        for _ in range(20):
            try:
                status = server.request("GET", "/spawn?n=3", timeout=15)[0]
            except TimeoutError:
                status = "hung"
            statuses[status] = statuses.get(status, 0) + 1
            peak = max(peak, webload.backend_count(dsn, server.name))
            if statuses.get("hung", 0) >= 2:  # stuck for good: no need to wait 15 s more
                break
        time.sleep(1)
        after = webload.backend_count(dsn, server.name)
    finally:
        stop(server, dsn)
    return {"statuses": statuses, "peak": peak, "after": after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="greenpool,geventpool,django")
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    logs = Path(tempfile.mkdtemp(prefix="gp-django-compare-"))
    results: dict[str, dict[str, Any]] = {}
    with PgCluster() as pg:
        scenarios.migrate_and_seed(pg.admin_dsn)
        for engine in engines:
            print(f"== {engine}", flush=True)
            row: dict[str, Any] = {}
            for name, scenario in (
                ("load_plain", lambda d, e, lg: load(d, e, lg, scenarios.pick_plain)),
                ("load", load),
                ("exhaustion", exhaustion),
                ("spawn", spawned),
            ):
                try:
                    row[name] = scenario(pg.admin_dsn, engine, logs)
                except AssertionError as ex:  # gunicorn did not start
                    row[name] = {"error": str(ex).splitlines()[-1][:120]}
                print(f"   {name}: {row[name]}", flush=True)
            results[engine] = row
    print(f"\nlogs: {logs}\n")
    print("| Scenario | " + " | ".join(LABELS[e] for e in engines) + " |")
    print("|---|" + "---|" * len(engines))

    def cell(engine: str, scenario: str, fmt: Any) -> str:
        data = results[engine][scenario]
        return data["error"] if "error" in data else fmt(data)

    def failures(d: dict[str, Any]) -> str:
        kinds = d["failure_kinds"] or ""
        return f"{d['failures']} / {d['requests']} ({d['rps']:.0f}/s) {kinds}"

    rows = [
        ("1a. load, no spawned greenlets: failures / requests", "load_plain", failures),
        ("1a. load, no spawned greenlets: peak backends (cap 8)", "load_plain",
         lambda d: str(d["peak"])),
        ("1. load: failures / requests, req/s", "load", failures),
        ("1. load: peak backends (cap 2 x 4 = 8)", "load", lambda d: str(d["peak"])),
        ("2. exhaustion: answers to 10 x 3 s requests, cap 2", "exhaustion",
         lambda d: f"{d['statuses']}, slowest {d['max_latency']:.1f} s, hung {d['hung']}"),
        ("2. exhaustion: peak backends (cap 2)", "exhaustion", lambda d: str(d["peak"])),
        ("3. spawned greenlets: answers / peak backends / left after (cap 4)", "spawn",
         lambda d: f"{d['statuses']} / {d['peak']} / {d['after']}"),
        ("4. SIGTERM: backends left", "load", lambda d: str(d["left_after_sigterm"])),
    ]  # fmt: skip
    for label, scenario, fmt in rows:
        print(f"| {label} | " + " | ".join(cell(e, scenario, fmt) for e in engines) + " |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GREENPOOL_LOG_LEVEL", "INFO")
    sys.exit(main())
