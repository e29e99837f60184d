"""One Prometheus scrape covers every gunicorn worker: the example app under
``gunicorn -k gevent`` with 2 workers and PROMETHEUS_MULTIPROC_DIR (prometheus_client's
multiprocess mode, greenpool.gunicorn's on_starting/child_exit hooks), under a bounded
load; the scrape is compared with each worker's own /stats."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import dashboard

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "deploy" / "gunicorn.conf.py"
WORKERS = 2
MAX_SIZE = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(port: int, path: str) -> tuple[int, bytes]:
    """One request on a connection of its own (so the kernel picks a worker each time)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def poll(what: str, condition: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not in time")
        gevent.sleep(0.1)


def samples(text: str) -> list[Any]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def series(found: list[Any], name: str, **labels: str) -> list[Any]:
    return [
        s for s in found if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def by_pid(found: list[Any]) -> dict[int, float]:
    return {int(s.labels["pid"]): s.value for s in found}


@pytest.fixture(scope="module")
def schema(dsn: str) -> None:
    from examples.flask_app.schema import setup_conninfo

    setup_conninfo(dsn)


@pytest.fixture
def server(dsn: str, schema: None, tmp_path: Path) -> Iterator[dict[str, Any]]:
    port = free_port()
    name = f"mp-{uuid.uuid4().hex[:8]}"
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    (metrics_dir / "counter_4242.db").write_bytes(b"")  # a previous run's leftover
    log = tmp_path / "gunicorn.log"
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "FLASK_GREENPOOL_NAME": name,
        "FLASK_GREENPOOL_MAX_SIZE": str(MAX_SIZE),
        "GUNICORN_NO_CONTROL_SOCKET": "1",
        "GUNICORN_MAX_REQUESTS": "0",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "PYTHONPATH": str(REPO),
    }
    argv = [
        sys.executable, "-m", "gunicorn", "--config", str(CONF), "--workers", str(WORKERS),
        "--bind", f"127.0.0.1:{port}", "examples.flask_app.wsgi:app",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"gunicorn exited:\n{log.read_text(errors='replace')}")
            try:
                return get(port, "/healthz")[0] == 200
            except OSError:
                return False

        poll("gunicorn answers", up, 30)
        yield {"port": port, "name": name, "dir": metrics_dir, "log": log, "proc": proc}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def load(port: int, clients: int, seconds: float) -> dict[int, int]:
    """``clients`` greenlets for ``seconds`` (and at most 3000 requests), a new connection
    per request; returns the count by status."""
    deadline = time.monotonic() + seconds
    statuses: dict[int, int] = {}
    budget = [3000]

    def client() -> None:
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            path = random.choice(
                ["/slow?seconds=0.03", f"/accounts/{random.randint(1, 400)}", "/accounts?page=2"]
            )
            status = get(port, path)[0]
            statuses[status] = statuses.get(status, 0) + 1

    gevent.joinall([gevent.spawn(client) for _ in range(clients)], timeout=60, raise_error=True)
    return statuses


def worker_stats(port: int) -> dict[int, dict[str, Any]]:
    """Each worker's own figures for the default database, by pid (fresh connections
    until both workers answered)."""
    seen: dict[int, dict[str, Any]] = {}

    def both() -> bool:
        body = json.loads(get(port, "/_greenpool/stats")[1])
        seen[body["pid"]] = body["databases"]["default"]
        return len(seen) == WORKERS

    poll("both workers answered /stats", both, 20)
    return seen


@pytest.mark.slow
def test_one_scrape_covers_every_worker(server: dict[str, Any]) -> None:
    port, name = server["port"], server["name"]
    assert not (server["dir"] / "counter_4242.db").exists()  # on_starting emptied it
    statuses = load(port, clients=60, seconds=4)
    assert set(statuses) == {200}, statuses
    truth = worker_stats(port)  # nothing borrows any more: the figures stay put
    assert all(w["started"] and w["acquire_count"] > 0 for w in truth.values()), truth
    acquires = sum(w["acquire_count"] for w in truth.values())
    waited = sum(w["empty_acquire_count"] for w in truth.values())
    returns = sum(w["returns_count"] for w in truth.values())
    assert acquires == sum(statuses.values()) - statuses.get(404, 0)
    assert waited > 0  # 60 clients on 2 x 4 connections: some waited

    labels = {"pool": name, "database": "default"}
    found: list[Any] = []

    def consistent() -> bool:
        # Each worker copies its stats and its batched histograms on its maintenance passes
        # (at least once a second), not necessarily both in the same pass as the last borrow.
        found[:] = samples(get(port, "/_greenpool/metrics")[1].decode())
        figures = [
            series(found, metric, **labels)
            for metric in (
                "greenpool_acquires_total",
                "greenpool_acquire_wait_seconds_count",
                "greenpool_hold_seconds_count",
            )
        ]
        return all(figures) and [f[0].value for f in figures] == [acquires, acquires, returns]

    poll("the scrape adds up the workers' acquires, waits and holds", consistent, 15)
    # gauges: one series per worker, each that worker's own figure
    gauges = by_pid(series(found, "greenpool_connections", **labels))
    assert gauges == {pid: float(w["total"]) for pid, w in truth.items()}
    peaks = by_pid(series(found, "greenpool_peak_acquired", **labels))
    assert peaks == {pid: float(w["peak_acquired"]) for pid, w in truth.items()}
    assert all(0 < peak <= MAX_SIZE for peak in peaks.values())
    # counters and histograms: summed over the workers
    [waits] = series(found, "greenpool_acquire_waits_total", **labels)
    assert waits.value == waited
    [wait_count] = series(found, "greenpool_acquire_wait_seconds_count", **labels)
    [hold_count] = series(found, "greenpool_hold_seconds_count", **labels)
    assert (wait_count.value, hold_count.value) == (acquires, returns)
    [slow_holds] = series(found, "greenpool_hold_seconds_bucket", le="0.025", **labels)
    assert slow_holds.value < hold_count.value  # the /slow requests held 30 ms or more
    print(
        f"\nmultiprocess scrape: {acquires} acquires over pids {sorted(truth)}, "
        f"{waited} waited, gauges {gauges}"
    )
    assert dashboard.problems(dashboard.load(), dashboard.exported(
        get(port, "/_greenpool/metrics")[1].decode()
    )) == []  # fmt: skip

    # A worker exits: its gauges leave the scrape, its counts stay in the sums.
    gone = min(truth)
    os.kill(gone, signal.SIGTERM)

    def replaced() -> bool:
        found[:] = samples(get(port, "/_greenpool/metrics")[1].decode())
        pids = {int(s.labels["pid"]) for s in series(found, "greenpool_connections", **labels)}
        return gone not in pids and bool(pids)

    poll("the exited worker's gauges are dropped", replaced, 30)
    [total] = series(found, "greenpool_acquires_total", **labels)
    assert total.value >= acquires
    server["proc"].send_signal(signal.SIGTERM)
    assert server["proc"].wait(30) == 0
    log = server["log"].read_text(errors="replace")
    assert "Traceback" not in log, log
