"""Chart the pool's Prometheus metrics as they move under load (docs/ops-chart.png).

    .venv/bin/python scripts/ops_chart.py [--out docs/ops-chart.png] [--seconds 36]

Serves the example app under ``gunicorn -k gevent`` (2 workers, ``max_size`` 4 each,
prometheus_client's multiprocess mode: one scrape covers both workers) against
``DATABASE_URL`` or an embedded throwaway PostgreSQL, drives a bounded load in four
phases (light, busy, overloaded, light), scrapes ``/_greenpool/metrics`` every half
second, and draws from those scrapes alone: connections by state, waiters (all workers
and per worker), acquire-wait percentiles (from the histogram's buckets, as PromQL's
``histogram_quantile`` over ``rate(...[2s])``) and throughput. Prints the figures the
chart shows. Loopback only; the load stops by itself (time and request budget).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import http.client  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
POOL = "ops-demo"
MAX_SIZE = 4
WORKERS = 2
#: (seconds, concurrent clients): light, busy, overloaded, light again.
PHASES = ((6, 4), (10, 24), (12, 120), (8, 4))
SCRAPE_EVERY = 0.5
WINDOW = 4  # scrapes per rate window (2 s)
MAX_REQUESTS = 200_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def database() -> Iterator[str]:
    """DATABASE_URL, or an embedded PostgreSQL for the run."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    from greenpool.embedded import EmbeddedPostgres

    cluster = EmbeddedPostgres(max_connections=100)
    cluster.start()
    try:
        yield cluster.dsn()
    finally:
        cluster.destroy()


@contextlib.contextmanager
def gunicorn(dsn: str, workdir: Path) -> Iterator[int]:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "FLASK_GREENPOOL_NAME": POOL,
        "FLASK_GREENPOOL_MAX_SIZE": str(MAX_SIZE),
        "FLASK_GREENPOOL_MIN_SIZE": "1",
        "GUNICORN_NO_CONTROL_SOCKET": "1",
        "GUNICORN_MAX_REQUESTS": "0",
        "GUNICORN_LOGLEVEL": "warning",
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prometheus"),
        "PYTHONPATH": str(REPO),
    }
    argv = [
        sys.executable, "-m", "gunicorn", "--config", "python:greenpool.gunicorn",
        "--workers", str(WORKERS), "--bind", f"127.0.0.1:{port}", "examples.flask_app.wsgi:app",
    ]  # fmt: skip
    with (workdir / "gunicorn.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gunicorn did not start; see {workdir / 'gunicorn.log'}")
            try:
                if request(port, "/healthz") == 200:
                    break
            except OSError:
                gevent.sleep(0.1)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def request(port: int, path: str, conn: http.client.HTTPConnection | None = None) -> int:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        if own:
            conn.close()


def scrape(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/_greenpool/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


class Load:
    """Clients that each keep a connection (reconnecting every 20 requests, so the kernel
    spreads them over the workers) and send a mix of quick and slow requests."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent = 0
        self.statuses: dict[int, int] = {}

    def client(self, until: float) -> None:
        conn = None
        n = 0
        while time.monotonic() < until and self.sent < MAX_REQUESTS:
            if conn is None or n % 20 == 0:
                if conn is not None:
                    conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            n += 1
            self.sent += 1
            roll = random.random()
            if roll < 0.5:
                path = f"/accounts/{random.randint(1, 400)}"
            elif roll < 0.8:
                path = "/slow?seconds=0.02"
            else:
                path = f"/accounts?page={random.randint(1, 20)}"
            try:
                status = request(self.port, path, conn)
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = None
            self.statuses[status] = self.statuses.get(status, 0) + 1
            gevent.sleep(random.uniform(0, 0.01))
        if conn is not None:
            conn.close()


def figures(text: str) -> dict[str, Any]:
    """The pool's series from one scrape."""
    out: dict[str, Any] = {"by_pid": {}, "wait_buckets": {}, "hold_buckets": {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("pool") != POOL:
                continue
            if s.name == "greenpool_acquire_wait_seconds_bucket":
                out["wait_buckets"][float(s.labels["le"])] = s.value
            elif s.name == "greenpool_hold_seconds_bucket":
                out["hold_buckets"][float(s.labels["le"])] = s.value
            elif "pid" in s.labels:
                pid = int(s.labels["pid"])
                out["by_pid"].setdefault(pid, {})[s.name] = s.value
            else:
                out[s.name] = s.value
    for name in (
        "greenpool_connections_idle", "greenpool_connections_acquired",
        "greenpool_connections_constructing", "greenpool_waiting", "greenpool_max_size",
    ):  # fmt: skip
        out[name] = sum(v.get(name, 0.0) for v in out["by_pid"].values())
    return out


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """PromQL's histogram_quantile over the bucket increases between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def run(out: Path, last_scrape: Path | None = None) -> None:
    sys.path.insert(0, str(REPO))
    from examples.flask_app.schema import setup_conninfo

    samples: list[tuple[float, dict[str, Any]]] = []
    with database() as dsn, tempfile.TemporaryDirectory(prefix="ops-chart-") as tmp:
        setup_conninfo(dsn)
        with gunicorn(dsn, Path(tmp)) as port:
            load = Load(port)
            t0 = time.monotonic()
            end = t0 + sum(seconds for seconds, _ in PHASES)

            def scraper() -> None:
                while time.monotonic() < end + 2:
                    with contextlib.suppress(OSError):
                        samples.append((time.monotonic() - t0, figures(scrape(port))))
                    gevent.sleep(SCRAPE_EVERY)

            watcher = gevent.spawn(scraper)
            start = t0
            clients: list[Any] = []
            for seconds, count in PHASES:
                until = start + seconds
                clients += [gevent.spawn(load.client, until) for _ in range(count)]
                gevent.sleep(max(0.0, until - time.monotonic()))
                start = until
            gevent.joinall(clients, timeout=60)
            watcher.join(timeout=10)
            if last_scrape is not None:
                last_scrape.write_text(scrape(port))
    draw(samples, load, out)


def draw(samples: list[tuple[float, dict[str, Any]]], load: Load, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] for s in samples]
    f = [s[1] for s in samples]
    used = [x["greenpool_connections_acquired"] for x in f]
    idle = [x["greenpool_connections_idle"] for x in f]
    opening = [x["greenpool_connections_constructing"] for x in f]
    cap = [x["greenpool_max_size"] for x in f]
    waiting = [x["greenpool_waiting"] for x in f]
    pids = sorted({pid for x in f for pid in x["by_pid"]})
    rt, p50, p95, p99, rps, hold95 = [], [], [], [], [], []
    for i in range(WINDOW, len(f)):
        a, b = f[i - WINDOW], f[i]
        span = t[i] - t[i - WINDOW]
        rt.append(t[i])
        p50.append(quantile(0.5, a["wait_buckets"], b["wait_buckets"]))
        p95.append(quantile(0.95, a["wait_buckets"], b["wait_buckets"]))
        p99.append(quantile(0.99, a["wait_buckets"], b["wait_buckets"]))
        hold95.append(quantile(0.95, a["hold_buckets"], b["hold_buckets"]))
        done = b.get("greenpool_acquires_total", 0.0) - a.get("greenpool_acquires_total", 0.0)
        rps.append(done / span if span > 0 else 0.0)

    fig, axes = plt.subplots(4, 1, figsize=(12, 11), sharex=True)
    ax = axes[0]
    ax.stackplot(t, used, idle, opening, labels=["used", "idle", "opening"], alpha=0.7)
    ax.plot(t, cap, "k--", label=f"max_size ({WORKERS} workers x {MAX_SIZE})")
    ax.set_ylabel("connections")
    ax.set_title(f"greenpool under load: pool {POOL!r}, {WORKERS} gunicorn workers, one scrape")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax = axes[1]
    ax.plot(t, waiting, "k", label="all workers")
    for pid in pids:
        ax.plot(t, [x["by_pid"].get(pid, {}).get("greenpool_waiting", 0) for x in f],
                lw=0.8, label=f"worker pid {pid}")  # fmt: skip
    ax.set_ylabel("waiters")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax = axes[2]
    for series, label in ((p50, "p50"), (p95, "p95"), (p99, "p99")):
        ax.plot(rt, [v * 1000 if v is not None else None for v in series], label=f"wait {label}")
    ax.plot(rt, [v * 1000 if v is not None else None for v in hold95], ":", label="hold p95")
    ax.set_yscale("log")
    ax.set_ylabel("ms (2 s windows)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax = axes[3]
    ax.plot(rt, rps, label="acquires/s (all workers)")
    ax.set_ylabel("acquires / s")
    ax.set_xlabel("seconds")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    edge = 0.0
    for seconds, count in PHASES:
        for a in axes:
            a.axvline(edge, color="grey", lw=0.5)
        axes[0].text(edge + 0.2, max(cap or [1]) * 1.02, f"{count} clients", fontsize=8)
        edge += seconds
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)

    def peak(values: list[Any]) -> float:
        return max((v for v in values if v is not None), default=0.0)

    print(f"chart: {out}")
    print(f"requests: {load.sent} sent, by status {dict(sorted(load.statuses.items()))}")
    print(f"scrapes: {len(samples)} over {t[-1]:.0f} s, worker pids {pids}")
    edge = 0.0
    for seconds, count in PHASES:
        inside = [i for i, x in enumerate(rt) if edge + 2 <= x < edge + seconds]
        raw = [i for i, x in enumerate(t) if edge + 1 <= x < edge + seconds]
        print(
            f"  {count:>3} clients ({edge:>4.0f}-{edge + seconds:.0f} s): "
            f"used max {peak([used[i] for i in raw]):.0f}/{cap[-1]:.0f}, "
            f"waiters max {peak([waiting[i] for i in raw]):.0f}, "
            f"wait p50 {1000 * peak([p50[i] for i in inside]):.1f} ms "
            f"p99 {1000 * peak([p99[i] for i in inside]):.1f} ms (worst window), "
            f"hold p95 {1000 * peak([hold95[i] for i in inside]):.1f} ms, "
            f"{peak([rps[i] for i in inside]):.0f} acquires/s"
        )
        edge += seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "ops-chart.png")
    parser.add_argument("--last-scrape", type=Path, help="write the last /metrics answer here")
    args = parser.parse_args(argv)
    run(args.out, args.last_scrape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
