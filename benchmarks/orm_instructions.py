"""Client instructions per SQLAlchemy operation, GreenQueuePool against QueuePool.

``python -m benchmarks.orm_instructions [--dsn DSN] [--ops 400] [--cases a,b]``

The wall-clock ratios of ``benchmarks.orm`` move by tens of percent between runs on a
shared machine; callgrind's instruction count of the client process does not. Each case
runs in its own gevent-patched process under ``valgrind --tool=callgrind`` with
instrumentation off during start-up and warm-up; ``callgrind_control -i on`` counts
``--ops`` operations only (as ``benchmarks.flask_instructions`` does). User-space
instructions of the client only: the kernel's socket work and the server's are not in it.

Cases, ``<pool>_<op>`` with pool ``green`` (GreenQueuePool, greenpool's wait functions)
or ``queue`` (QueuePool, psycopg's own wait, as each runs on its own), and op:

- ``checkout``: ``engine.connect().close()``, one greenlet;
- ``select1``: Core ``SELECT 1`` on an autocommit engine, one greenlet;
- ``session``: ORM ``Session`` + query + close (BEGIN, SELECT, ROLLBACK), one greenlet;
- ``select1c`` / ``sessionc``: the same with 200 greenlets sharing 10 connections
  (``--ops`` operations in all).
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--child" in sys.argv:  # measured process: patch first
    from gevent import monkey

    monkey.patch_all()

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.callgrind import count_marked, have_valgrind, parse_cases, server

WARMUP = 300
POOLS = {"green": "sa_greenpool", "queue": "sa_queuepool"}
OPS = ("checkout", "select1", "session", "select1c", "sessionc")
CASES = tuple(f"{p}_{o}" for o in OPS for p in POOLS)
REPO = Path(__file__).resolve().parents[1]
GREENLETS = 200


def _op(case: str, dsn: str) -> Callable[[], None]:
    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from benchmarks.orm import _sa_engine
    from greenpool.drivers import gevent_wait

    pool, op = case.split("_", 1)
    engine = _sa_engine(POOLS[pool], dsn, f"instr-{case}", autocommit=not op.startswith("session"))
    if pool == "queue":
        gevent_wait.uninstall()
    select = text("SELECT id, name FROM bench_items WHERE id = 1")
    if op == "checkout":
        return lambda: engine.connect().close()
    if op.startswith("select1"):

        def select1() -> None:
            with engine.connect() as c:
                c.execute(text("SELECT 1"))

        return select1

    def session() -> None:
        with Session(engine) as s:
            s.execute(select).first()

    return session


def _runner(case: str, op: Callable[[], None]) -> Callable[[int], None]:
    if not case.endswith("c"):

        def serial(n: int) -> None:
            for _ in range(n):
                op()

        return serial
    import gevent

    def contended(n: int) -> None:
        left = [n]

        def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                op()

        gevent.joinall([gevent.spawn(worker) for _ in range(GREENLETS)], raise_error=True)

    return contended


def child(case: str, dsn: str, ops: int) -> None:
    import gc

    run = _runner(case, _op(case, dsn))
    run(WARMUP)
    gc.collect()
    gc.freeze()
    print("READY", flush=True)
    sys.stdin.readline()
    run(ops)
    print("DONE", flush=True)
    sys.stdin.readline()


def callgrind(case: str, dsn: str, ops: int, workdir: Path) -> int:
    """Instructions of ``ops`` operations of ``case`` (instrumented loop only)."""
    child = ["-m", "benchmarks.orm_instructions", "--child", case, "--dsn", dsn,
             "--ops", str(ops)]  # fmt: skip
    return count_marked(case, child, workdir / f"{case}.out", workdir / f"{case}.err")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.orm_instructions")
    ap.add_argument("--dsn", default=None, help="default: start a throwaway cluster")
    ap.add_argument("--ops", type=int, default=400)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--keep", default=None, help="keep callgrind output files in this dir")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.dsn, args.ops)
        return 0
    if not have_valgrind():
        return 2
    cases = parse_cases(ap, args.cases, CASES)
    sys.path.insert(0, str(REPO))
    from benchmarks.orm import prepare

    with server(args.dsn) as dsn:
        prepare(dsn)
        results: dict[str, float] = {}
        with tempfile.TemporaryDirectory(prefix="greenpool-callgrind-") as tmp:
            workdir = Path(args.keep) if args.keep else Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            for case in cases:
                results[case] = callgrind(case, dsn, args.ops, workdir) / args.ops / 1000.0
                print(f"{case:16s} {results[case]:8.1f}k instructions per op", flush=True)
        print("\n| op | GreenQueuePool | QueuePool | green / queue |\n|---|---|---|---|")
        for op in OPS:
            g, q = results.get(f"green_{op}"), results.get(f"queue_{op}")
            if g is not None and q is not None:
                print(f"| {op} | {g:.1f}k | {q:.1f}k | {g / q:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
