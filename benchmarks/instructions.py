"""Client instructions per query, counted by valgrind: a measure other load cannot move.

``python -m benchmarks.instructions [--dsn DSN] [--ops 4000]``

Wall-clock and even CPU-time ratios swing by 10-30% between runs on a shared 2-CPU machine.
``valgrind --tool=callgrind`` counts the instructions the client process executes, which
stays put whatever else runs. Each case runs twice under callgrind, with ``--ops`` and with
``5 * --ops`` iterations after the same warm-up; the difference divided by ``4 * --ops`` is
the cost of one iteration with start-up, connect and warm-up cancelled out. It counts
user-space instructions only: the kernel's socket work and the server's are not in it (the
wall-clock suite has them), so it answers "what does the client's Python cost", not "how
fast". Needs ``valgrind`` on PATH; takes about two minutes.

Cases (all ``SELECT 1``, autocommit, one greenlet, gevent-patched), built from the
suite's own contenders (``benchmarks/contenders.py``) so they run the code it times:

- ``pg2_held`` / ``pg2_pool``: psycopg2 + psycogreen on a held connection / through
  ``ThreadedConnectionPool`` behind a gevent ``BoundedSemaphore`` (as in the suite);
- ``pg3_held``: psycopg 3 on a held connection with greenpool's gevent-native wait;
- ``pg3_held_psycopg_wait``: the same with psycopg's own wait;
- ``pg3_cursor_reused``: psycopg 3, one cursor reused instead of ``conn.execute``;
- ``greenpool``: ``with pool.connection() as conn: conn.execute(...)``;
- ``greenpool_acq_rel``: ``with pool.connection(): pass``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--child" in sys.argv:  # measured process: patch first
    from gevent import monkey

    monkey.patch_all()

import argparse
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.callgrind import have_valgrind, parse_cases, server

WARMUP = 300


#: case -> (contender key of benchmarks.contenders, what one iteration does).
_SHAPES = {
    "pg2_held": ("psycopg2", "held"),
    "pg2_pool": ("psycopg2", "borrow_query"),
    "pg3_held": ("greenpool", "held"),
    "pg3_held_psycopg_wait": ("greenpool_pw", "held"),
    "pg3_cursor_reused": ("greenpool", "cursor_reused"),
    "greenpool": ("greenpool", "borrow_query"),
    "greenpool_acq_rel": ("greenpool", "borrow"),
}


def _case_body(case: str, dsn: str) -> Callable[[], None]:
    """The measured callable, built from the suite's own contenders (runs after patching)."""
    from benchmarks.contenders import make

    key, shape = _SHAPES[case]
    c = make(key, dsn, 1, 1)
    query = c.query
    if shape == "borrow":

        def borrow() -> None:
            with c.connection():
                pass

        return borrow
    if shape == "borrow_query":

        def borrow_query() -> None:
            with c.connection() as conn:
                query(conn, "SELECT 1")

        return borrow_query
    conn = c.connection().__enter__()  # held for the life of this process
    if shape == "cursor_reused":
        cur = conn.cursor()

        def reused() -> None:
            cur.execute("SELECT 1")
            cur.fetchall()

        return reused
    return lambda: query(conn, "SELECT 1")


CASES = tuple(_SHAPES)


def child(case: str, dsn: str, ops: int) -> None:
    body = _case_body(case, dsn)
    for _ in range(WARMUP + ops):
        body()


def _callgrind(case: str, dsn: str, ops: int, workdir: Path) -> int:
    out = workdir / f"{case}.{ops}.out"
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "benchmarks.instructions",
        "--child",
        case,
        "--dsn",
        dsn,
        "--ops",
        str(ops),
    ]
    proc = subprocess.run(
        cmd,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{case}: callgrind run failed:\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def measure(dsn: str, ops: int, cases: list[str]) -> dict[str, float]:
    """Instructions per iteration of each case (thousands)."""
    per_op: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="greenpool-callgrind-") as tmp:
        for case in cases:
            small = _callgrind(case, dsn, ops, Path(tmp))
            large = _callgrind(case, dsn, 5 * ops, Path(tmp))
            per_op[case] = (large - small) / (4 * ops) / 1000.0
            print(f"{case:24s} {per_op[case]:7.1f}k instructions per iteration", flush=True)
    return per_op


def report(k: dict[str, float]) -> str:
    def ratio(a: str, b: str) -> str:
        return f"{k[a] / k[b]:.2f}x" if a in k and b in k and k[b] else "-"

    lines = [
        "| case | k instructions / op | vs psycopg2 same shape |",
        "|---|---|---|",
    ]
    pairs = {
        "pg2_held": "pg2_held",
        "pg2_pool": "pg2_pool",
        "pg3_held": "pg2_held",
        "pg3_held_psycopg_wait": "pg2_held",
        "pg3_cursor_reused": "pg2_held",
        "greenpool": "pg2_pool",
    }
    for case, value in k.items():
        ref = pairs.get(case)
        lines.append(f"| {case} | {value:.1f} | {ratio(case, ref) if ref else '-'} |")
    if {"greenpool", "pg3_held", "pg2_pool", "pg2_held"} <= k.keys():
        lines += [
            "",
            f"Pool share (borrow + give back around the query): greenpool "
            f"{k['greenpool'] - k['pg3_held']:.1f}k, psycopg2's pool + semaphore "
            f"{k['pg2_pool'] - k['pg2_held']:.1f}k instructions.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.instructions")
    ap.add_argument("--dsn", default=None, help="default: start a throwaway cluster")
    ap.add_argument("--ops", type=int, default=1000)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.dsn, args.ops)
        return 0
    if not have_valgrind():
        return 2
    cases = parse_cases(ap, args.cases, CASES)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with server(args.dsn) as dsn:
        print(report(measure(dsn, args.ops, cases)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
