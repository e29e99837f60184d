"""Instructions per request in a gunicorn worker under HTTP load (callgrind).

``python -m benchmarks.http_instructions [--variants nodb,ext,raw,psycopg_pool_hand]
[--path /q] [--requests 2000] [--dsn DSN]``

The in-process count (``benchmarks.flask_instructions``) runs one request after the other
in one greenlet: it leaves out gunicorn (HTTP parsing, the response, keep-alive) and the
hub's work when 50 requests are in flight at once (more loop turns, switches, timers). Here
the real worker runs under valgrind's callgrind while ``benchmarks.loadgen`` drives it with
50 keep-alive connections: instrumentation is switched on (``callgrind_control -i on -z``)
only around a run of exactly ``--requests`` requests (the load generator stops issuing
after that many and waits for every answer), then dumped. Under valgrind the worker is
about 50 times slower, so it is saturated with all 50 requests queued, as a CPU-bound
worker is in the wall-clock benchmark. User-space instructions only: the kernel's socket
and epoll work is in the ``perf`` view of ``benchmarks.profile_http``.
"""

from __future__ import annotations

import argparse
import os
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


def _control(args: list[str]) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, timeout=120, check=False)


def _totals(path: Path) -> int | None:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    return None


def measure(variant: str, dsn: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port = _free_port()
    env = common.worker_env()
    env.update(
        {
            "BENCH_DSN": dsn,
            "BENCH_HTTP_POOL": variant,
            "BENCH_HTTP_MAX_SIZE": "10",
            "PYTHONHASHSEED": "0",
        }
    )
    out = workdir / f"{variant}.%p.out"
    log = (workdir / f"{variant}.log").open("w")
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
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
                raise RuntimeError(f"{variant}: gunicorn under valgrind exited (see its log)")
        workers = common.children_of(proc.pid)
        # taskset execs valgrind in place; valgrind runs gunicorn's master in this pid
        worker = workers[0] if workers else None
        if worker is None:
            raise RuntimeError(f"{variant}: no worker")

        def drive(n: int, warmup: float) -> dict[str, Any]:
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
                    "600",
                    "--warmup",
                    str(warmup),
                    "--max-requests",
                    str(n),
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
            info: dict[str, Any] = res.get("targets", {}).get("app", {})
            return info

        drive(args.warmup_requests, 0.0)  # the pool full, psycopg's statements prepared
        _control(["-i", "on", str(worker)])
        _control(["-z", str(worker)])
        info = drive(args.requests, 0.0)
        _control(["-d", str(worker)])
        _control(["-i", "off", str(worker)])
        dumps = sorted(workdir.glob(f"{variant}.{worker}.out.*"), key=lambda p: p.stat().st_mtime)
        total = _totals(dumps[-1]) if dumps else None
        done = int(info.get("requests") or 0)
        return {
            "variant": variant,
            "requests": done,
            "errors": info.get("first_error"),
            "instructions": total,
            "k_per_request": total / done / 1000 if total and done else None,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.http_instructions")
    ap.add_argument("--variants", default="nodb,ext,raw_hand,raw,psycopg_pool_hand")
    ap.add_argument("--path", default="/q")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup-requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--dsn", default=None)
    ap.add_argument("--cpu", type=int, default=None)
    args = ap.parse_args(argv)
    args.cpu = common.pick_cpu(args.cpu)
    args.loadgen_cpu = common.other_cpu(args.cpu)
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="greenpool-httpcg-") as tmp,
        database(args.dsn, Path(tmp) / "postgresql.log") as (dsn, _pm, _desc),
    ):
        http_schema(dsn)
        for v in [v for v in args.variants.split(",") if v]:
            row = measure(v, dsn, args, Path(tmp))
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
