"""Instructions per request in a gunicorn worker under HTTP load (callgrind).

``python -m benchmarks.http_instructions [--variants nodb,ext,raw,psycopg_pool_hand]
[--path /q] [--requests 2000] [--dsn DSN]``

The in-process count (``benchmarks.flask_instructions``) runs one request after the other
in one greenlet: it leaves out gunicorn (HTTP parsing, the response, keep-alive) and the
hub's work when 50 requests are in flight at once (more loop turns, switches, timers). Here
the real worker runs under valgrind's callgrind while ``benchmarks.loadgen`` drives it with
50 keep-alive connections, exactly ``N`` requests (the load generator stops issuing after
that many and waits for every answer). Each variant runs twice, with ``--warmup-requests``
and with ``--warmup-requests + --requests`` requests; the difference of the worker's
lifetime counts divided by ``--requests`` is one request (``callgrind_control`` does not
reach a forked worker, so the count cannot be switched on around the window). Under
valgrind the worker is about 50 times slower, so it is saturated with all 50 requests
queued, as a CPU-bound worker is in the wall-clock benchmark. User-space instructions
only: the kernel's socket and epoll work is in the ``perf`` view of
``benchmarks.profile_http``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.run import _free_port, database, http_schema


def _one_run(
    variant: str, dsn: str, args: argparse.Namespace, workdir: Path, n: int
) -> tuple[int, int]:
    """Start gunicorn under callgrind, serve ``n`` requests (after the readiness probe),
    stop it; (instructions the worker executed in its whole life, requests served)."""
    port = _free_port()
    env = common.worker_env()
    env.update(
        {
            "BENCH_DSN": dsn,
            "BENCH_HTTP_POOL": variant,
            "BENCH_HTTP_MAX_SIZE": "10",
            "BENCH_HTTP_POOL_TIMEOUT": "3600",  # 50x slower: waits exceed the usual 30 s
            "PYTHONHASHSEED": "0",
        }
    )
    logpath = workdir / f"{variant}.{n}.log"
    log = logpath.open("w")
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={workdir / f'{variant}.{n}.%p.out'}",
        sys.executable,
        "-m",
        "gunicorn",
        "-k",
        "gevent",
        "-w",
        "1",
        "--timeout",
        "900",
        "--worker-connections",
        "1000",
        "--keep-alive",
        "600",
        "-b",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        "benchmarks.httpapp:create_app()",
    ]
    if args.cpu is not None:
        cmd = ["taskset", "-c", str(args.cpu), *cmd]
    proc = subprocess.Popen(cmd, cwd=common.REPO_ROOT, env=env, stdout=log, stderr=log)
    done = 0
    worker = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{args.path}", timeout=60) as r:
                    if r.read() == b"1":
                        break
            except OSError:
                time.sleep(1)
            if proc.poll() is not None:
                raise RuntimeError(f"{variant}: gunicorn under valgrind exited (see {logpath})")
        workers = common.children_of(proc.pid)
        worker = workers[0] if workers else None
        gen = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.loadgen",
                "--target",
                f"app={port}",
                "--path",
                args.path,
                "--concurrency",
                str(args.concurrency),
                "--cycles",
                "1",
                "--burst",
                "1200",
                "--warmup",
                "0",
                "--max-requests",
                str(n),
                "--connect-timeout",
                "600",
                "--network-timeout",
                "600",
                *(["--cpu", str(args.loadgen_cpu)] if args.loadgen_cpu is not None else []),
            ],
            cwd=common.REPO_ROOT,
            env=common.worker_env(),
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        res = common.parse_result(gen.stdout) or {}
        info = res.get("targets", {}).get("app", {})
        done = int(info.get("requests") or 0)
        if info.get("first_error"):
            raise RuntimeError(f"{variant}: {info['first_error']}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    found = re.search(rf"=={worker}== Collected : (\d+)", logpath.read_text())
    if worker is None or not found:
        raise RuntimeError(f"{variant}: no count for the worker in {logpath}")
    return int(found.group(1)), done


def measure(variant: str, dsn: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Two lives of the worker, ``--warmup-requests`` and ``--warmup-requests +
    --requests`` requests: the difference per request cancels start-up, connect, the
    first requests and shutdown."""
    small, n_small = _one_run(variant, dsn, args, workdir, args.warmup_requests)
    large, n_large = _one_run(variant, dsn, args, workdir, args.warmup_requests + args.requests)
    diff = n_large - n_small
    return {
        "variant": variant,
        "requests": diff,
        "errors": None,
        "instructions": large - small,
        "k_per_request": (large - small) / diff / 1000 if diff > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.http_instructions")
    ap.add_argument("--variants", default="nodb,ext,raw_hand,raw,psycopg_pool_hand")
    ap.add_argument("--path", default="/q")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup-requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--dsn", default=None)
    ap.add_argument("--cpu", type=int, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="keep callgrind files here")
    args = ap.parse_args(argv)
    args.cpu = common.pick_cpu(args.cpu)
    args.loadgen_cpu = common.other_cpu(args.cpu)
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="greenpool-httpcg-") as tmp,
        database(args.dsn, Path(tmp) / "postgresql.log") as (dsn, _pm, _desc),
    ):
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        http_schema(dsn)
        for v in [v for v in args.variants.split(",") if v]:
            row = measure(v, dsn, args, workdir)
            rows.append(row)
            k = row["k_per_request"]
            print(
                f"{v:20s} {args.path:6s} {row['requests']:6d} requests  "
                f"{'-' if k is None else f'{k:8.1f}k'} instructions per request"
                f"{'  ERROR ' + str(row['errors']) if row['errors'] else ''}",
                flush=True,
            )
    floor = next((r["k_per_request"] for r in rows if r["variant"] == "nodb"), None)
    print()
    print(
        f"| variant ({args.path}, {args.concurrency} connections) | k instructions / request "
        "| above nodb |"
    )
    print("|---|---|---|")
    for r in rows:
        k = r["k_per_request"]
        above = f"{k - floor:.1f}" if k and floor and r["variant"] != "nodb" else "-"
        print(f"| {r['variant']} | {'-' if k is None else f'{k:.1f}'} | {above} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
