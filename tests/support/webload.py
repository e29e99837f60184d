"""Serve an example app with ``gunicorn -k gevent`` (deploy/gunicorn.conf.py) and load it.

Shared by the Django and Flask-SQLAlchemy end-to-end tests and by
``scripts/compare_django_pools.py``. Every loop is bounded in count and time; server
backends are sampled from pg_stat_activity (ground truth) while the load runs.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import psycopg
from gevent.event import Event

from tests.support.ormsupport import free_port, repo_root

CONF = Path(repo_root()) / "deploy" / "gunicorn.conf.py"

Pick = Callable[[random.Random], tuple[str, str, Any, tuple[int, ...]]]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    name: str
    log: Path

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 10
    ) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            payload = json.dumps(body) if body is not None else None
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            return response.status, response.read(), dict(response.getheaders())
        finally:
            conn.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return -9

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start(app: str, name: str, log: Path, env: dict[str, str], workers: int = 2) -> Server:
    """gunicorn -k gevent serving ``app``; returns once /healthz answers 200."""
    port = free_port()
    full_env = {
        **os.environ,
        "GUNICORN_NO_CONTROL_SOCKET": "1",
        "PYTHONPATH": repo_root(),
        **env,
    }
    argv = [
        sys.executable, "-m", "gunicorn", "--config", str(CONF),
        "--workers", str(workers), "--bind", f"127.0.0.1:{port}", app,
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    server = Server(proc, port, name, log)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited:\n{server.log_text()}")
        try:
            if server.request("GET", "/healthz")[0] == 200:
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            raise AssertionError(f"gunicorn did not start:\n{server.log_text()}")
        gevent.sleep(0.1)


def backend_count(dsn: str, application_name: str) -> int:
    with psycopg.connect(dsn, autocommit=True, application_name="webload-admin") as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND application_name = %s",
            (application_name,),
        ).fetchone()
    return int(row[0]) if row else 0


@dataclass
class LoadResult:
    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    failures: list[Any] = field(default_factory=list)
    peak_backends: int = 0
    seconds: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run_load(
    server: Server,
    dsn: str,
    pick: Pick,
    *,
    clients: int = 120,
    seconds: float = 10.0,
    seed: int | None = None,
) -> LoadResult:
    """``clients`` keep-alive clients for ``seconds``, sampling the server's backends."""
    result = LoadResult()
    rng = random.Random(seed)
    stop = Event()

    def sample() -> None:
        while not stop.is_set():
            result.peak_backends = max(result.peak_backends, backend_count(dsn, server.name))
            stop.wait(0.1)

    def client(deadline: float) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        sent = 0
        while time.monotonic() < deadline:
            sent += 1
            if sent % 20 == 0:  # reconnect now and then so the kernel spreads clients
                conn.close()
            method, path, body, ok = pick(rng)
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                conn.request(
                    method,
                    path,
                    body=json.dumps(body) if body is not None else None,
                    headers=headers,
                )
                response = conn.getresponse()
                data = response.read()
                result.requests += 1
                result.by_status[response.status] += 1
                if response.status not in ok:
                    result.failures.append((method, path, response.status, data[:200]))
            except Exception as ex:
                result.failures.append((method, path, repr(ex)))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.close()

    sampler = gevent.spawn(sample)
    start_time = time.monotonic()
    deadline = start_time + seconds
    greenlets = [gevent.spawn(client, deadline) for _ in range(clients)]
    gevent.joinall(greenlets, timeout=seconds + 60)
    result.seconds = time.monotonic() - start_time
    for g in greenlets:
        if not g.dead:
            g.kill(block=False)
            result.failures.append(("client", "did not finish", "HUNG"))
    stop.set()
    sampler.join(timeout=10)
    return result


@dataclass
class BurstResult:
    statuses: Counter[Any] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    retry_after: set[str] = field(default_factory=set)
    hung: int = 0
    peak_backends: int = 0

    @property
    def max_latency(self) -> float:
        return max(self.latencies, default=0.0)


def run_burst(
    server: Server, dsn: str, path: str, *, clients: int, give_up: float = 15.0
) -> BurstResult:
    """``clients`` simultaneous requests to ``path``; a request still unanswered after
    ``give_up`` seconds counts as hung (its client gives up)."""
    result = BurstResult()
    stop = Event()

    def sample() -> None:
        while not stop.is_set():
            result.peak_backends = max(result.peak_backends, backend_count(dsn, server.name))
            stop.wait(0.1)

    def one() -> None:
        start_time = time.monotonic()
        try:
            status, _, headers = server.request("GET", path, timeout=give_up)
        except TimeoutError:
            result.hung += 1
            result.statuses["hung"] += 1
            return
        except OSError as ex:
            result.statuses[type(ex).__name__] += 1
            return
        result.latencies.append(time.monotonic() - start_time)
        result.statuses[status] += 1
        if "Retry-After" in headers:
            result.retry_after.add(headers["Retry-After"])

    sampler = gevent.spawn(sample)
    gevent.joinall([gevent.spawn(one) for _ in range(clients)], timeout=give_up + 30)
    stop.set()
    sampler.join(timeout=10)
    return result


def wait_no_backends(dsn: str, application_name: str, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = backend_count(dsn, application_name)
        if n == 0 or time.monotonic() > deadline:
            return n
        gevent.sleep(0.05)
