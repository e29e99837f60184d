"""Where a request's CPU goes in one gunicorn worker under HTTP load.

``python -m benchmarks.profile_http [--variants ext,psycopg_pool_hand,raw,nodb]
[--endpoints select1] [--seconds 8] [--dsn DSN] [--nice -10]``

The HTTP benchmark's app (``benchmarks/httpapp.py`` under ``gunicorn -k gevent -w 1``, 50
keep-alive connections from ``benchmarks.loadgen``), with one difference: the app's worker
has a CPU to itself, and PostgreSQL, the load generator and the observers share the other
(the issue's "app and server on separate CPUs"). Sharing its CPU with PostgreSQL, the
worker is preempted by the backend it just woke inside ``send()``, and a wall-clock
sampler such as py-spy (which counts a runnable-but-preempted thread as active) would
charge the server's time to the frame that sent the query. For each variant and endpoint,
one burst of load per view:

1. ``py-spy record --nonblocking --format raw`` (no ``--idle``: only samples where the
   worker is on a CPU, so the shares are shares of its CPU time) of the worker; the
   stacks are folded into areas (gunicorn, Flask, the extension's hooks, the pool, psycopg,
   the wait, gevent's hub...) and scaled to µs per request with the worker's CPU per
   request measured over the same burst;
2. ``perf record -e cpu-clock`` of the worker: the share in the kernel, in the Python
   interpreter, in libev/gevent's compiled modules, in libpq...;
3. ``perf trace -s`` of the worker: syscalls per request, by syscall.

Writes everything to ``benchmarks/results/<stamp>-profile-http/`` (raw stacks, perf
reports, ``breakdown.md``, ``breakdown.json``). Needs py-spy (``pip install py-spy``) and
perf; steps whose tool is missing are skipped.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.run import HTTP_ENDPOINTS, _free_port, _pin_child, database, http_schema

#: (area, rule) in order: the innermost frame matching a rule decides a sample's area.
#: A rule is (substring of the file, function name (without its class) or None for any).
AREAS: list[tuple[str, list[tuple[str, str | None]]]] = [
    (
        "pool: waiting for a connection (park, hand-over)",
        [
            ("greenpool/waiters.py", None),
            ("greenpool/pool.py", "_wait"),
            ("psycopg_pool/pool.py", "wait"),
            ("psycopg_pool/pool.py", "_get_ready"),
        ],
    ),
    ("psycopg_pool (its own code, locks, condition)", [("psycopg_pool/", None)]),
    ("greenpool core pool (getconn, putconn, release)", [("greenpool/pool.py", None)]),
    (
        "psycopg wait (watchers, switch to the hub)",
        [
            ("greenpool/drivers/gevent_wait.py", None),
            ("psycopg/waiting.py", None),
            ("gevent/select.py", None),
        ],
    ),
    ("greenpool driver adapter", [("greenpool/drivers/", None)]),
    ("psycopg (query path, results)", [("psycopg/", None)]),
    ("extension hooks (flask_ext)", [("greenpool/flask_ext/", None)]),
    ("the view (benchmarks/httpapp.py)", [("benchmarks/httpapp.py", None)]),
    ("Flask and Werkzeug", [("flask/", None), ("werkzeug/", None)]),
    (
        "gunicorn: HTTP socket I/O (gevent sockets)",
        [
            ("gevent/_socket", None),
            ("gevent/_socketcommon", None),
            ("gevent/socket", None),
            ("socket.py", None),
        ],
    ),
    ("gunicorn (worker, HTTP parsing, response)", [("gunicorn/", None)]),
    (
        "gevent hub: libev loop, epoll, callbacks",
        [("gevent/hub.py", None), ("gevent/_hub", None), ("gevent/greenlet", None)],
    ),
    ("gevent, other", [("gevent/", None)]),
]
OTHER = "other (stdlib, interpreter)"


def _frames(stack: str) -> list[tuple[str, str]]:
    """py-spy raw: ``func (file:line);func (file:line);...`` root first -> [(func, file)]."""
    out = []
    for part in stack.split(";"):
        m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", part.strip())
        if m:
            out.append((m.group(1), m.group(2)))
        else:
            out.append((part.strip(), ""))
    return out


def classify(stack: str) -> str:
    frames = _frames(stack)
    for func, path in reversed(frames):
        for area, rules in AREAS:
            for fragment, name in rules:
                if fragment in path and (name is None or func.rsplit(".", 1)[-1] == name):
                    return area
    return OTHER


def fold(raw: Path) -> tuple[dict[str, int], collections.Counter[str], int]:
    """Samples per area, self samples per leaf function, total samples."""
    areas: dict[str, int] = collections.defaultdict(int)
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        areas[classify(stack)] += n
        frames = _frames(stack)
        if frames:
            func, path = frames[-1]
            leaves[f"{func} ({path.split('site-packages/')[-1]})"] += n
    return dict(areas), leaves, total


def inclusive(raw: Path, names: list[str]) -> dict[str, int]:
    """Samples whose stack contains a frame of each function name (``func (file``)."""
    out = dict.fromkeys(names, 0)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        for name in names:
            if name in stack:
                out[name] += int(count)
    return out


def worker_pid(master: int, limit: float = 30.0) -> int | None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        kids = common.children_of(master)
        if kids:
            return kids[0]
        time.sleep(0.1)
    return None


def start_app(variant: str, dsn: str, args: argparse.Namespace, logdir: Path) -> Any:
    port = _free_port()
    env = common.worker_env()
    env.update({"BENCH_DSN": dsn, "BENCH_HTTP_POOL": variant, "BENCH_HTTP_MAX_SIZE": "10"})
    log = (logdir / f"gunicorn-{variant}.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            "gevent",
            "-w",
            "1",
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
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_pin_child(args.cpu, args.nice),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/q", timeout=2) as r,
        ):
            if r.read() == b"1":
                break
        if proc.poll() is not None:
            raise RuntimeError(f"{variant}: gunicorn exited (see {log.name})")
        time.sleep(0.1)
    return proc, port, log


def loadgen(
    port: int, path: str, seconds: float, args: argparse.Namespace, app_pid: int, pm: int | None
) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.loadgen",
        "--target",
        f"app={port}",
        "--app-pid",
        f"app={app_pid}",
        "--path",
        path,
        "--concurrency",
        str(args.concurrency),
        "--cycles",
        "1",
        "--burst",
        str(seconds),
        "--warmup",
        "1.0",
    ]
    if pm is not None:
        cmd += ["--postmaster", str(pm)]
    if args.loadgen_cpu is not None:
        cmd += ["--cpu", str(args.loadgen_cpu)]
    if args.nice is not None:
        cmd += ["--nice", str(args.nice)]
    return subprocess.Popen(
        cmd,
        cwd=common.REPO_ROOT,
        env=common.worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _observer(cmd: list[str], cpu: int | None) -> list[str]:
    return (
        ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []
    ) + cmd


def observe(
    tool: str,
    variant: str,
    endpoint: str,
    port: int,
    master: int,
    worker: int,
    pm: int | None,
    args: argparse.Namespace,
    outdir: Path,
    rnd: int = 0,
) -> dict[str, Any]:
    """One burst of load with one observer attached to the worker for ``--seconds``."""
    secs = args.seconds
    gen = loadgen(port, HTTP_ENDPOINTS[endpoint], secs + 1.0, args, master, pm)
    time.sleep(1.5)  # the load generator's warm-up, and a little of the burst
    stem = outdir / f"{variant}-{endpoint}"
    info: dict[str, Any] = {}
    if tool == "pyspy":
        raw = stem.with_suffix(f".r{rnd}.pyspy.txt")
        subprocess.run(
            _observer(
                [
                    args.py_spy,
                    "record",
                    "--pid",
                    str(worker),
                    "--rate",
                    str(args.rate),
                    "--duration",
                    str(int(secs - 1)),
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                ],
                args.loadgen_cpu,
            ),
            capture_output=True,
            text=True,
            timeout=secs + 60,
            check=False,
        )
        info["raw"] = raw.name
    elif tool == "perf":
        data = stem.with_suffix(".perf.data")
        subprocess.run(
            _observer(
                [
                    "perf",
                    "record",
                    "-e",
                    "cpu-clock",
                    "-F",
                    "999",
                    "-p",
                    str(worker),
                    "-o",
                    str(data),
                    "--",
                    "sleep",
                    str(secs - 1),
                ],
                args.loadgen_cpu,
            ),
            capture_output=True,
            text=True,
            timeout=secs + 60,
            check=False,
        )
        for sort in ("dso", "dso,sym"):
            rep = subprocess.run(
                [
                    "perf",
                    "report",
                    "-i",
                    str(data),
                    "--sort",
                    sort,
                    "--stdio",
                    "--percent-limit",
                    "0.3",
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            suffix = sort.replace(",", "-")
            stem.with_suffix(f".perf-{suffix}.txt").write_text(rep.stdout)
        info["perf_dso"] = _perf_dso(stem.with_suffix(".perf-dso.txt"))
        data.unlink(missing_ok=True)
    elif tool == "trace":
        out = stem.with_suffix(".trace.txt")
        proc = subprocess.run(
            _observer(
                ["perf", "trace", "-s", "-p", str(worker), "--", "sleep", str(secs - 1)],
                args.loadgen_cpu,
            ),
            capture_output=True,
            text=True,
            timeout=secs + 60,
            check=False,
        )
        out.write_text(proc.stdout + proc.stderr)
        info["syscalls"] = _trace_counts(proc.stdout + proc.stderr)
        info["trace_seconds"] = secs - 1
    stdout, _ = gen.communicate(timeout=secs + 120)
    res = common.parse_result(stdout) or {}
    burst = (res.get("targets", {}).get("app", {}).get("bursts") or [{}])[0]
    info["burst"] = burst
    return info


def _perf_dso(path: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s+([\d.]+)%\s+(\S.*?)\s*$", line)
        if m:
            out[m.group(2)] = float(m.group(1))
    return out


def _trace_counts(text: str) -> dict[str, int]:
    counts: dict[str, int] = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s+(\w+)\s+(\d+)\s+\d+\s+[\d.]+", line)
        if m and m.group(1) not in ("syscall",):
            counts[m.group(1)] += int(m.group(2))
    return dict(counts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_http")
    ap.add_argument("--variants", default="ext,psycopg_pool_hand,raw,nodb")
    ap.add_argument("--endpoints", default="select1")
    ap.add_argument("--tools", default="pyspy,perf,trace")
    ap.add_argument("--seconds", type=float, default=8.0, help="observed seconds per view")
    ap.add_argument("--rate", type=int, default=400, help="py-spy samples per second")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="py-spy windows per variant, alternating")
    ap.add_argument("--dsn", default=None)
    ap.add_argument("--cpu", type=int, default=None)
    ap.add_argument("--nice", type=int, default=None)
    ap.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
    args = ap.parse_args(argv)
    args.py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    tools = [t for t in args.tools.split(",") if t]
    if "pyspy" in tools and not Path(args.py_spy).exists():
        print("py-spy not found: pip install py-spy (skipping it)")
        tools.remove("pyspy")
    if shutil.which("perf") is None:
        tools = [t for t in tools if t == "pyspy"]
    args.cpu = common.pick_cpu(args.cpu)
    args.loadgen_cpu = common.other_cpu(args.cpu)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = args.results_dir / f"{stamp}-profile-http"
    logdir = outdir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    pinning = common.ServerPinning()
    with database(args.dsn, logdir / "postgresql.log") as (dsn, postmaster, _desc):
        pm = postmaster
        if args.dsn is None:  # the server shares the load generator's CPU, not the app's
            pinning.apply(pm, args.loadgen_cpu, args.nice)
        http_schema(dsn)
        try:
            variants = [v for v in args.variants.split(",") if v]
            apps: dict[str, Any] = {}
            try:
                for variant in variants:  # all up at once: the rounds alternate between them
                    proc, port, log = start_app(variant, dsn, args, logdir)
                    apps[variant] = (proc, port, log, worker_pid(proc.pid))
                    assert apps[variant][3] is not None, f"{variant}: no gunicorn worker"
                for rnd in range(args.rounds):
                    for endpoint in [e for e in args.endpoints.split(",") if e]:
                        order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
                        for variant in order:
                            proc, port, _log, worker = apps[variant]
                            key = f"{variant}/{endpoint}"
                            per_tool = results.setdefault(key, {})
                            # py-spy every round; perf's two views once (first round)
                            for tool in tools if rnd == 0 else [t for t in tools if t == "pyspy"]:
                                info = observe(
                                    tool,
                                    variant,
                                    endpoint,
                                    port,
                                    proc.pid,
                                    worker,
                                    pm,
                                    args,
                                    outdir,
                                    rnd,
                                )
                                per_tool.setdefault(tool, []).append(info)
                                b = info.get("burst", {})
                                print(
                                    f"round {rnd} {key:28s} {tool:6s} "
                                    f"{b.get('rps', 0):7.0f} req/s  "
                                    f"app CPU {b.get('app_cpu_us', 0):6.1f} µs/req",
                                    flush=True,
                                )
            finally:
                for proc, _port, _log, _worker in apps.values():
                    proc.terminate()
                for proc, _port, log, _worker in apps.values():
                    proc.wait(timeout=15)
                    log.close()
        finally:
            pinning.restore()
    (outdir / "breakdown.json").write_text(json.dumps(common.clean_floats(results), indent=1))
    md = breakdown_markdown(results, outdir)
    (outdir / "breakdown.md").write_text(md)
    print(md)
    print(f"results in {outdir}")
    return 0


def _cpu_per_request(infos: list[dict[str, Any]]) -> float:
    """The worker's CPU per request over several bursts (weighted by their requests)."""
    num = sum((i["burst"].get("app_cpu_us") or 0.0) * (i["burst"].get("rps") or 0.0) for i in infos)
    den = sum(i["burst"].get("rps") or 0.0 for i in infos)
    return num / den if den else 0.0


def breakdown_markdown(results: dict[str, Any], outdir: Path) -> str:
    lines: list[str] = []
    keys = list(results)
    # py-spy areas, in µs per request (share of samples x worker CPU per request)
    table: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = {}
    tops: dict[str, list[tuple[str, int]]] = {}
    samples: dict[str, int] = {}
    for key in keys:
        infos = [i for i in results[key].get("pyspy", []) if (outdir / i["raw"]).exists()]
        if not infos:
            continue
        areas: dict[str, int] = collections.defaultdict(int)
        leaves: collections.Counter[str] = collections.Counter()
        total = 0
        for info in infos:
            a, lv, t = fold(outdir / info["raw"])
            for name, n in a.items():
                areas[name] += n
            leaves.update(lv)
            total += t
        cpu = _cpu_per_request(infos)
        totals[key] = cpu
        table[key] = {a: n / total * cpu for a, n in areas.items()} if total else {}
        tops[key] = leaves.most_common(25)
        samples[key] = total
    if table:
        names = [a for a, _ in AREAS] + [OTHER]
        lines += [
            "### py-spy: the worker's CPU per request by area (µs; share of on-CPU samples "
            "x the worker's CPU per request over the same bursts, all rounds)",
            "",
            "| area | " + " | ".join(table) + " |",
            "|---|" + "---|" * len(table),
        ]
        for area in names:
            if any(table[k].get(area, 0) for k in table):
                lines.append(
                    f"| {area} | "
                    + " | ".join(f"{table[k].get(area, 0.0):.1f}" for k in table)
                    + " |"
                )
        lines.append(
            "| **worker CPU per request** | "
            + " | ".join(f"**{totals[k]:.1f}**" for k in table)
            + " |"
        )
        lines.append("| samples | " + " | ".join(str(samples[k]) for k in table) + " |")
        lines.append("")
        for key, top in tops.items():
            total = samples.get(key, 1) or 1
            lines += [f"Top self frames, {key}:", ""]
            lines += [f"- {n / total * 100:.1f}% {name}" for name, n in top[:15]]
            lines.append("")
    perf_rows = {k: results[k]["perf"][0] for k in keys if results[k].get("perf")}
    if perf_rows:
        dsos: list[str] = []
        for info in perf_rows.values():
            for d in info.get("perf_dso", {}):
                if d not in dsos:
                    dsos.append(d)
        lines += [
            "### perf (cpu-clock): the worker's CPU by binary (µs per request)",
            "",
            "| binary | " + " | ".join(perf_rows) + " |",
            "|---|" + "---|" * len(perf_rows),
        ]
        for d in dsos:
            cells = []
            for info in perf_rows.values():
                pct = info.get("perf_dso", {}).get(d, 0.0)
                cpu = info["burst"].get("app_cpu_us") or 0.0
                cells.append(f"{pct * cpu / 100:.1f} ({pct:.0f}%)")
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
    trace_rows = {k: results[k]["trace"][0] for k in keys if results[k].get("trace")}
    if trace_rows:
        calls: list[str] = []
        for info in trace_rows.values():
            for c, _n in sorted(info.get("syscalls", {}).items(), key=lambda kv: -kv[1]):
                if c not in calls:
                    calls.append(c)
        lines += [
            "### perf trace: syscalls per request in the worker",
            "",
            "| syscall | " + " | ".join(trace_rows) + " |",
            "|---|" + "---|" * len(trace_rows),
        ]
        per_req: dict[str, float] = {}
        for k, info in trace_rows.items():
            per_req[k] = (info["burst"].get("rps") or 0.0) * info.get("trace_seconds", 1.0)
        for c in calls[:15]:
            lines.append(
                f"| {c} | "
                + " | ".join(
                    f"{info.get('syscalls', {}).get(c, 0) / max(1.0, per_req[k]):.2f}"
                    for k, info in trace_rows.items()
                )
                + " |"
            )
        lines.append(
            "| all | "
            + " | ".join(
                f"{sum(info.get('syscalls', {}).values()) / max(1.0, per_req[k]):.2f}"
                for k, info in trace_rows.items()
            )
            + " |"
        )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
