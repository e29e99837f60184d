"""SELECT 1 on a held connection with different psycopg wait functions.

``python -m benchmarks.prototypes.wait_bench [--dsn DSN] [--rounds N] [--no-pin]``

Each mode runs in its own process (patched by gevent first, except ``c_blocking``), modes
alternate round after round, and the medians are printed as a markdown table. Per query:
wall time, client CPU (``time.process_time``) and server CPU (the backend's
``/proc/<pid>/schedstat``, when the server is local). Modes:

- ``default``: what psycopg picks under gevent, ``waiting.wait_poll`` over gevent's
  ``select.poll`` emulation;
- ``gevent_wait``: :func:`benchmarks.prototypes.gevent_wait.wait` (hub I/O watcher + timer);
- ``gevent_wait_no_timer``: the same without the interval timer (unsafe; shows its cost);
- ``socket_wait``: a naive version on ``gevent.socket.wait_read``/``wait_write``;
- ``psycopg2``: psycopg2 + psycogreen (its wait callback uses ``gevent.socket.wait_read``);
- ``c_blocking``: psycopg's C ``wait_c`` without gevent at all (blocks the process; the
  floor for psycopg 3 on this machine).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

MODES = (
    "default",
    "gevent_wait",
    "gevent_wait_no_timer",
    "socket_wait",
    "psycopg2",
    "c_blocking",
)


def _sched_ns(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def child(mode: str, dsn: str, seconds: float, cpu: int | None, nice: int | None) -> dict[str, Any]:
    """Runs in the measured process (gevent already patched unless c_blocking)."""
    import time

    from benchmarks import common

    pinned = common.pin_self(cpu, nice)
    query: Any
    if mode == "psycopg2":
        import psycopg2
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
        conn: Any = psycopg2.connect(dsn, application_name="bench-wait")
        conn.autocommit = True

        def query() -> None:
            cur = conn.cursor()
            cur.execute("SELECT 1")
            cur.fetchall()
            cur.close()

        wait_name = "psycogreen"
    else:
        import psycopg
        from psycopg import waiting

        if mode in ("gevent_wait", "gevent_wait_no_timer"):
            from benchmarks.prototypes import gevent_wait

            variant = "wait" if mode == "gevent_wait" else "wait_no_timer"
            gevent_wait.install(variant=variant)
        elif mode == "socket_wait":
            waiting.wait = socket_wait
        conn = psycopg.connect(dsn, autocommit=True, application_name="bench-wait")

        def query() -> None:
            conn.execute("SELECT 1").fetchall()

        wait_name = getattr(waiting.wait, "__name__", repr(waiting.wait))
    backend = int(conn.info.backend_pid)
    for _ in range(300):
        query()
    n = 0
    s0, c0, t0 = _sched_ns(backend), time.process_time(), time.perf_counter()
    end = t0 + seconds
    while n < 1_000_000:
        query()
        n += 1
        if n % 64 == 0 and time.perf_counter() >= end:
            break
    t1, c1, s1 = time.perf_counter(), time.process_time(), _sched_ns(backend)
    conn.close()
    return {
        "mode": mode,
        "wait": wait_name,
        "n": n,
        "wall_us": (t1 - t0) / n * 1e6,
        "client_cpu_us": (c1 - c0) / n * 1e6,
        "server_cpu_us": (s1 - s0) / n / 1e3 if s0 is not None and s1 is not None else None,
        "pinned": pinned,
    }


PAIRED_MODES = (
    "psycopg2 held conn",
    "psycopg 3 held conn, default wait",
    "psycopg 3 held conn, gevent_wait",
    "psycopg 3 held conn, gevent_wait no timer",
    "psycopg2 pool + psycogreen: acquire+SELECT 1+release",
    "greenpool, default wait: acquire+SELECT 1+release",
    "greenpool, gevent_wait: acquire+SELECT 1+release",
    "psycopg_pool, default wait: acquire+SELECT 1+release",
    "psycopg_pool, gevent_wait: acquire+SELECT 1+release",
)


def paired(dsn: str, batches: int, batch_ops: int, cpu: int | None, nice: int | None) -> Any:
    """Every mode in one process, interleaved in short batches (order shuffled per round).

    Interference from other work then hits all modes alike, so per-round ratios are far
    steadier than comparisons across processes. Returns per-mode medians of the batch
    means and the median of per-round ratios to psycopg2 (held conn, or its pool).
    """
    import random
    import time

    import psycopg2
    from psycogreen.gevent import patch_psycopg
    from psycopg import waiting

    from benchmarks import common, contenders
    from benchmarks.prototypes import gevent_wait

    common.pin_self(cpu, nice)
    patch_psycopg()
    default_wait = waiting.wait
    c2 = psycopg2.connect(dsn, application_name="bench-paired")
    c2.autocommit = True
    import psycopg

    c3 = psycopg.connect(dsn, autocommit=True, application_name="bench-paired")
    gp = contenders.make("greenpool", dsn, 2, 2)
    pp = contenders.make("psycopg_pool", dsn, 2, 2)
    p2 = contenders.make("psycopg2", dsn, 2, 2)

    def held2() -> None:
        cur = c2.cursor()
        cur.execute("SELECT 1")
        cur.fetchall()
        cur.close()

    def held3() -> None:
        c3.execute("SELECT 1").fetchall()

    def via(c: Any) -> Any:
        def op() -> None:
            with c.connection() as conn:
                c.query(conn, "SELECT 1")

        return op

    modes: dict[str, tuple[Any, Any]] = {
        PAIRED_MODES[0]: (held2, default_wait),
        PAIRED_MODES[1]: (held3, default_wait),
        PAIRED_MODES[2]: (held3, gevent_wait.wait),
        PAIRED_MODES[3]: (held3, gevent_wait.wait_no_timer),
        PAIRED_MODES[4]: (via(p2), default_wait),
        PAIRED_MODES[5]: (via(gp), default_wait),
        PAIRED_MODES[6]: (via(gp), gevent_wait.wait),
        PAIRED_MODES[7]: (via(pp), default_wait),
        PAIRED_MODES[8]: (via(pp), gevent_wait.wait),
    }
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu_t: dict[str, list[float]] = {m: [] for m in modes}
    order = list(modes)
    for op, fn in modes.values():  # warm every path (and psycopg's prepare)
        waiting.wait = fn
        for _ in range(50):
            op()
    for _ in range(batches):
        random.shuffle(order)
        for name in order:
            op, fn = modes[name]
            waiting.wait = fn
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(batch_ops):
                op()
            t1, c1 = time.perf_counter(), time.process_time()
            wall[name].append((t1 - t0) / batch_ops * 1e6)
            cpu_t[name].append((c1 - c0) / batch_ops * 1e6)
    waiting.wait = default_wait
    for c in (gp, pp, p2):
        c.close()
    c2.close()
    c3.close()

    def ratios(name: str, ref: str) -> float:
        return common.median(a / b for a, b in zip(wall[name], wall[ref], strict=True))

    out = []
    for name in modes:
        ref = PAIRED_MODES[4] if "acquire" in name else PAIRED_MODES[0]
        out.append(
            {
                "mode": name,
                "wall_us": common.median(wall[name]),
                "client_cpu_us": common.median(cpu_t[name]),
                "ratio": ratios(name, ref),
                "ref": ref,
            }
        )
    return {"paired": out, "batches": batches, "batch_ops": batch_ops}


def socket_wait(gen: Any, fileno: int, interval: float = 0.0, timeout: float | None = None) -> Any:
    """The obvious version: gevent.socket.wait_read/wait_write per yield (no interval)."""
    from gevent.socket import wait_read, wait_readwrite, wait_write

    try:
        s = next(gen)
        while True:
            if s == 1:
                wait_read(fileno)
            elif s == 2:
                wait_write(fileno)
            else:
                wait_readwrite(fileno)
            s = gen.send(s)  # report what we waited for (a wait returning means ready)
    except StopIteration as ex:
        return ex.value


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import common

    ap = argparse.ArgumentParser(prog="python -m benchmarks.prototypes.wait_bench")
    ap.add_argument("--dsn", default=None, help="default: start a throwaway cluster")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--nice", type=int, default=None, help="see python -m benchmarks --help")
    ap.add_argument(
        "--paired",
        action="store_true",
        help="run every mode in ONE process, interleaved in short batches (steadier ratios; "
        "adds greenpool/psycopg_pool/psycopg2-pool acquire+SELECT 1+release; no c_blocking)",
    )
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-ops", type=int, default=100)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        if args.child != "c_blocking":
            from gevent import monkey

            monkey.patch_all()
        if args.child == "paired":
            res = paired(args.dsn, args.batches, args.batch_ops, args.cpu, args.nice)
        else:
            res = child(args.child, args.dsn, args.seconds, args.cpu, args.nice)
        common.emit_result(res)
        return 0

    import contextlib

    cpu = None if args.no_pin else common.pick_cpu()
    cluster: Any = None
    pinning = common.ServerPinning()
    dsn = args.dsn
    if dsn is None:
        from tests.support.pgcluster import PgCluster

        cluster = PgCluster()
        cluster.start()
        dsn = cluster.admin_dsn
        pm = int((cluster.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        if cpu is not None:
            pinning.apply(pm, cpu, args.nice)
    print(f"client pinned to CPU {cpu}; {pinning.describe()}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        if args.paired:
            return _run_paired(args, dsn, cpu)
        for rnd in range(args.rounds):
            for mode in args.modes.split(","):
                cmd = [sys.executable, "-m", "benchmarks.prototypes.wait_bench", "--child", mode]
                cmd += ["--dsn", dsn, "--seconds", str(args.seconds)]
                if cpu is not None:
                    cmd += ["--cpu", str(cpu)]
                if args.nice is not None:
                    cmd += ["--nice", str(args.nice)]
                proc = subprocess.run(
                    cmd,
                    cwd=common.REPO_ROOT,
                    env=common.worker_env(),
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=False,
                )
                res = common.parse_result(proc.stdout)
                if res is None:
                    print(f"{mode}: failed\n{proc.stderr[-2000:]}", flush=True)
                    continue
                results.setdefault(mode, []).append(res)
                print(
                    f"round {rnd + 1} {mode:22s} wall {res['wall_us']:6.1f} µs  client CPU "
                    f"{res['client_cpu_us']:6.1f} µs  "
                    f"server CPU {res['server_cpu_us'] or 0:6.1f} µs",
                    flush=True,
                )
    finally:
        pinning.restore()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.destroy()
    ref = common.median(r["wall_us"] for r in results.get("psycopg2", []))
    print()
    print("| mode | wait function | wall µs | vs psycopg2 | client CPU µs | server CPU µs |")
    print("|---|---|---|---|---|---|")
    for mode, rs in results.items():
        wall = common.median(r["wall_us"] for r in rs)
        cli = common.median(r["client_cpu_us"] for r in rs)
        srv = common.median(r["server_cpu_us"] for r in rs if r["server_cpu_us"] is not None)
        print(
            f"| {mode} | {rs[0]['wait']} | {wall:.1f} | {wall / ref:.2f}x | {cli:.1f} | {srv:.1f} |"
        )
    return 0


def _run_paired(args: argparse.Namespace, dsn: str, cpu: int | None) -> int:
    from benchmarks import common

    cmd = [sys.executable, "-m", "benchmarks.prototypes.wait_bench", "--child", "paired"]
    cmd += ["--dsn", dsn, "--batches", str(args.batches), "--batch-ops", str(args.batch_ops)]
    if cpu is not None:
        cmd += ["--cpu", str(cpu)]
    if args.nice is not None:
        cmd += ["--nice", str(args.nice)]
    proc = subprocess.run(
        cmd,
        cwd=common.REPO_ROOT,
        env=common.worker_env(),
        capture_output=True,
        text=True,
        timeout=590,
        check=False,
    )
    res = common.parse_result(proc.stdout)
    if res is None:
        print(proc.stderr[-3000:])
        return 1
    print(
        f"\n{res['batches']} rounds x {len(res['paired'])} modes x {res['batch_ops']} ops, "
        "interleaved in one process (medians of batch means; ratio = median of per-round "
        "ratios)\n"
    )
    print("| mode | wall µs/op | client CPU µs/op | ratio | to |")
    print("|---|---|---|---|---|")
    for r in res["paired"]:
        print(
            f"| {r['mode']} | {r['wall_us']:.1f} | {r['client_cpu_us']:.1f} | "
            f"{r['ratio']:.2f}x | {r['ref']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
