"""What the Flask extension costs over the raw pool, in instructions per request.

``python -m benchmarks.flask_instructions [--dsn DSN] [--ops 500] [--repeats 3]
[--path /borrow|/q] [--cases a,b]``

The HTTP benchmark cannot resolve a few microseconds per request: its CPU figures move by
10% between runs. Here the benchmark app (``benchmarks/httpapp.py``, the very app gunicorn
serves) is built in-process and called as a WSGI app, one request after the other in one
greenlet (gevent-patched), under valgrind's callgrind. Start-up, connect and
warm-up run uninstrumented (``--instr-atstart=no``, fast); ``callgrind_control -i on``
switches instrumentation on for ``--ops`` requests only (the child waits on a handshake),
so the count divided by ``--ops`` is the cost of one request. User-space instructions of
the client process only (no kernel socket work, no server).

Cases, each serving ``GET /borrow`` (borrow the request's connection, answer without a
query) by default, or ``GET /q`` (``SELECT 1``) with ``--path /q``. ``/borrow`` is the
precise measure of the borrowing path: the round trip of ``/q`` is the same in every case
but its hub wake-ups make a case's count move by a few percent (10-40k instructions)
between runs, more than the differences sought. Autocommit connections everywhere:

- ``nodb``: the same app answering without a database (the floor);
- ``ext``: the Flask extension, ``db.conn`` in the view;
- ``raw_hand``: the core pool, ``getconn`` in the view (on first use, kept on ``g``) and
  ``putconn`` in a ``teardown_request`` hook: the extension's job without the extension;
- ``raw``: the core pool, ``with pool.connection()`` in the view;
- ``psycopg_pool_hand``: psycopg_pool wired like ``raw_hand``.

``ext - raw_hand`` is the extension's own cost per request. To turn instructions into
time, the ``nodb`` case is also timed natively (no valgrind, no I/O: its CPU time is user
time of the same kind of Python code as the extension's) and the machine's instructions per
microsecond are taken from it; the µs figures are that conversion, an estimate.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--child" in sys.argv:  # measured process: patch first
    from gevent import monkey

    monkey.patch_all()

import argparse
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.callgrind import count_marked, have_valgrind, parse_cases, server

WARMUP = 300
CASES = ("nodb", "ext", "ext_noreset", "raw_hand", "raw", "psycopg_pool_hand")
PATH = "/borrow"  # borrow and give back, no query: see the module docstring
REPO = Path(__file__).resolve().parents[1]


def request_loop(case: str, dsn: str, path: str = PATH) -> Callable[[], None]:
    """One WSGI request to the benchmark app of ``case`` (built here, patched process)."""
    from werkzeug.test import EnvironBuilder

    from benchmarks.httpapp import create_app

    app = create_app(case, dsn, max_size=2)
    base = EnvironBuilder(path=path, method="GET").get_environ()
    status: list[str] = []

    def start_response(s: str, headers: Any, exc_info: Any = None) -> Any:
        status.append(s)
        return None

    def one() -> None:
        status.clear()
        out = app(dict(base), start_response)
        body = b"".join(out)
        close = getattr(out, "close", None)
        if close is not None:
            close()
        if body != b"1" or not status or not status[0].startswith("200"):
            raise RuntimeError(f"{case}: unexpected response {status} {body!r}")

    return one


def child(case: str, dsn: str, ops: int, path: str = PATH) -> None:
    """Warm up, then run ``ops`` requests between two handshakes on stdin/stdout: the
    parent switches callgrind's instrumentation on and off around them."""
    import gc

    one = request_loop(case, dsn, path)
    for _ in range(WARMUP):
        one()
    # Collections stay on (a request's cyclic garbage is part of its cost), but the objects
    # of start-up no longer make each full collection's cost depend on what was imported.
    gc.collect()
    gc.freeze()
    print("READY", flush=True)
    sys.stdin.readline()
    for _ in range(ops):
        one()
    print("DONE", flush=True)
    sys.stdin.readline()


def time_child(case: str, dsn: str, ops: int, repeats: int, path: str = PATH) -> None:
    """Natively: CPU µs per request of ``case`` (user and total), printed as one line."""
    import resource

    one = request_loop(case, dsn, path)
    for _ in range(WARMUP * 3):
        one()
    user, total = [], []
    for _ in range(repeats):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        for _ in range(ops):
            one()
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        user.append((r1.ru_utime - r0.ru_utime) * 1e6 / ops)
        total.append((t1 - t0) * 1e6 / ops)
    print(f"TIMED {statistics.median(user):.3f} {statistics.median(total):.3f} {min(total):.3f}")


def _run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def _callgrind(case: str, dsn: str, ops: int, workdir: Path, path: str = PATH) -> int:
    """Instructions of ``ops`` requests: start-up and warm-up run uninstrumented (fast),
    and ``callgrind_control`` switches instrumentation on for the measured loop only."""
    child = ["-m", "benchmarks.flask_instructions", "--child", case, "--dsn", dsn,
             "--ops", str(ops), "--path", path]  # fmt: skip
    return count_marked(
        case, child, workdir / f"{case}.{ops}.out", workdir / f"{case}.{ops}.err"
    )


def measure(
    dsn: str, ops: int, cases: list[str], path: str = PATH, repeats: int = 1
) -> dict[str, float]:
    """Instructions per request of each case (thousands; median of ``repeats`` runs, the
    cases alternating)."""
    runs: dict[str, list[float]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory(prefix="greenpool-callgrind-") as tmp:
        for _ in range(repeats):
            for case in cases:
                k = _callgrind(case, dsn, ops, Path(tmp), path) / ops / 1000.0
                runs[case].append(k)
                print(f"{case:20s} {path:8s} {k:8.2f}k instructions per request", flush=True)
    return {c: statistics.median(v) for c, v in runs.items()}


def timed(case: str, dsn: str, ops: int = 5000, repeats: int = 7) -> tuple[float, float]:
    """(user µs, total CPU µs) per request of ``case``, natively (medians of repeats)."""
    proc = _run(
        [
            sys.executable,
            "-m",
            "benchmarks.flask_instructions",
            "--child",
            case,
            "--dsn",
            dsn,
            "--ops",
            str(ops),
            "--timed",
            str(repeats),
        ]
    )
    found = re.search(r"TIMED ([\d.]+) ([\d.]+)", proc.stdout)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{case}: timed run failed:\n{proc.stderr[-2000:]}")
    return float(found.group(1)), float(found.group(2))


def report(k: dict[str, float], per_us: float | None, nodb_us: tuple[float, float] | None) -> str:
    lines = ["| case | k instructions / request | above nodb |", "|---|---|---|"]
    for case, value in k.items():
        above = f"{value - k['nodb']:.2f}" if "nodb" in k and case != "nodb" else "-"
        lines.append(f"| {case} | {value:.2f} | {above} |")
    if per_us and nodb_us:
        lines += [
            "",
            f"Calibration: the nodb request runs {k['nodb']:.2f}k instructions in "
            f"{nodb_us[0]:.2f} µs of user CPU ({nodb_us[1]:.2f} µs total) natively: "
            f"{per_us:.0f} instructions per µs on this machine.",
        ]
    if "ext" in k and "raw_hand" in k:
        diff = (k["ext"] - k["raw_hand"]) * 1000
        est = f" ≈ {diff / per_us:.2f} µs" if per_us else ""
        lines += [
            "",
            f"**Extension's cost over the raw pool wired by hand: {diff:,.0f} instructions "
            f"per request{est}** (ext {k['ext']:.2f}k - raw_hand {k['raw_hand']:.2f}k).",
        ]
    if "raw" in k and "raw_hand" in k and per_us:
        diff = (k["raw_hand"] - k["raw"]) * 1000
        lines.append(
            f"Hand wiring (g + teardown hook) over `with pool.connection()` in the view: "
            f"{diff:,.0f} instructions ≈ {diff / per_us:.2f} µs."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.flask_instructions")
    ap.add_argument("--dsn", default=None, help="default: start a throwaway cluster")
    ap.add_argument("--ops", type=int, default=500)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--path", default=PATH, help="/borrow (default) or /q (with SELECT 1)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per case (median)")
    ap.add_argument("--no-timing", action="store_true", help="skip the native calibration")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        if args.timed:
            time_child(args.child, args.dsn, args.ops, args.timed, args.path)
        else:
            child(args.child, args.dsn, args.ops, args.path)
        return 0
    if not have_valgrind():
        return 2
    cases = parse_cases(ap, args.cases, CASES)
    sys.path.insert(0, str(REPO))
    with server(args.dsn) as dsn:
        k = measure(dsn, args.ops, cases, args.path, args.repeats)
        per_us = nodb_us = None
        if not args.no_timing and "nodb" in k:
            nodb_us = timed("nodb", dsn)
            per_us = k["nodb"] * 1000 / nodb_us[0]
        print(report(k, per_us, nodb_us))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
