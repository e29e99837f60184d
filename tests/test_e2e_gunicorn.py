"""End to end: the example app under ``gunicorn -k gevent`` with deploy/gunicorn.conf.py
(which is ``from greenpool.gunicorn import *``).

The load test drives 120 concurrent keep-alive clients (greenlets over patched
http.client) for a bounded time while sampling pg_stat_activity, then stops gunicorn
with SIGTERM and checks that every worker closed its pools.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import runpy
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import gevent
import psycopg
import pytest
from gevent.event import Event

from greenpool import CooperationError
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "deploy" / "gunicorn.conf.py"
WORKERS = 2
MAX_SIZE = 4
REPORTING_MAX_SIZE = 3  # the example app's reporting bind


@pytest.fixture(scope="module")
def schema(dsn: str) -> None:
    from examples.flask_app.schema import setup_conninfo

    setup_conninfo(dsn)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Gunicorn:
    proc: subprocess.Popen[bytes]
    port: int
    name: str
    log: Path

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            payload = json.dumps(body) if body is not None else None
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def gunicorn(dsn: str, schema: None, tmp_path: Path) -> Iterator[Any]:
    started: list[Gunicorn] = []

    def start(config: str = str(CONF), workers: int = WORKERS, **env: str) -> Gunicorn:
        port = free_port()
        name = f"e2e-{uuid.uuid4().hex[:8]}"
        log = tmp_path / f"gunicorn-{len(started)}.log"
        full_env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "FLASK_GREENPOOL_NAME": name,
            "FLASK_GREENPOOL_MAX_SIZE": str(MAX_SIZE),
            "GUNICORN_NO_CONTROL_SOCKET": "1",
            "PYTHONPATH": str(REPO),
            **env,
        }
        argv = [
            sys.executable, "-m", "gunicorn", "--config", config,
            "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
            "examples.flask_app.wsgi:app",
        ]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO
            )
        server = Gunicorn(proc, port, name, log)
        started.append(server)

        def serving() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"gunicorn exited:\n{server.log_text()}")
            try:
                return server.request("GET", "/healthz")[0] == 200
            except OSError:
                return False

        try:
            wait_for(serving, 30, interval=0.1, what="gunicorn to serve")
        except AssertionError as ex:
            raise AssertionError(f"{ex}; its log:\n{server.log_text()}") from None
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


def backends_by_app(conn: psycopg.Connection[Any], prefix: str) -> dict[str, int]:
    rows = conn.execute(
        "SELECT application_name, count(*) FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND application_name LIKE %s GROUP BY 1",
        (prefix + "%",),
    ).fetchall()
    return {name: int(n) for name, n in rows}


@dataclass
class Load:
    port: int
    requests: int = 0
    failures: list[Any] = field(default_factory=list)
    by_status: dict[int, int] = field(default_factory=dict)

    def pick(self) -> tuple[str, str, Any, tuple[int, ...]]:
        roll = random.random()
        account = random.randint(1, 400)
        if roll < 0.30:
            return "GET", f"/accounts?page={random.randint(1, 20)}", None, (200,)
        if roll < 0.50:
            return "GET", f"/accounts/{account}", None, (200,)
        if roll < 0.70:
            other = account % 400 + 1
            body = {"from_id": account, "to_id": other, "amount": "1.25"}
            return "POST", "/transfers", body, (201, 409)
        if roll < 0.80:
            return "GET", "/slow?seconds=0.05", None, (200,)
        if roll < 0.90:
            return "GET", "/reports/summary", None, (200,)
        return "GET", "/healthz", None, (200,)

    def client(self, deadline: float) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = 0
        while time.monotonic() < deadline:
            sent += 1
            if sent % 20 == 0:  # reconnect now and then, as clients behind a balancer do,
                conn.close()  # so that the kernel spreads them over the workers
            method, path, body, ok = self.pick()
            try:
                headers = {"Content-Type": "application/json"} if body else {}
                conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.requests += 1
                self.by_status[response.status] = self.by_status.get(response.status, 0) + 1
                if response.status not in ok:
                    self.failures.append((method, path, response.status, data[:200]))
            except Exception as ex:
                self.failures.append((method, path, repr(ex)))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.close()


@pytest.mark.slow
def test_load_bounded_connections_and_clean_shutdown(gunicorn: Any, dsn: str) -> None:
    server: Gunicorn = gunicorn()
    peaks: dict[str, int] = {}
    stop = Event()

    def sample() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                for app, n in backends_by_app(conn, server.name).items():
                    peaks[app] = max(peaks.get(app, 0), n)
                stop.wait(0.1)

    sampler = gevent.spawn(sample)
    load = Load(server.port)
    deadline = time.monotonic() + 10
    clients = [gevent.spawn(load.client, deadline) for _ in range(120)]
    gevent.joinall(clients, timeout=60, raise_error=True)
    stop.set()
    sampler.get(timeout=10)

    print(f"\ne2e load: {load.requests} requests {load.by_status}, backend peaks {peaks}")
    assert load.failures == [], load.failures[:10]
    assert load.requests > 500, load.by_status
    assert 0 < peaks.get(server.name, 0) <= WORKERS * MAX_SIZE, peaks
    assert peaks.get(f"{server.name}-reporting", 0) <= WORKERS * REPORTING_MAX_SIZE, peaks

    # the pools really were the bottleneck: per-worker peak at most max_size
    seen: dict[int, Any] = {}
    for _ in range(20):
        snapshot = json.loads(server.request("GET", "/_greenpool/stats")[1])
        seen[snapshot["pid"]] = snapshot["databases"]["default"]
        if len(seen) == WORKERS:
            break
    started = [s for s in seen.values() if s["started"]]
    assert started and all(0 < s["peak_acquired"] <= MAX_SIZE for s in started), seen
    assert all(s["timeout_count"] == 0 for s in started), seen

    assert server.stop() == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        wait_for(
            lambda: backends_by_app(conn, server.name) == {},
            10,
            interval=0.05,
            what="every worker's backends to go",
        )
    log = server.log_text()
    assert len(re.findall(rf"pool '{server.name}' closed", log)) == WORKERS, log
    assert "Traceback" not in log, log


def test_preload_opens_pools_only_in_the_workers(gunicorn: Any) -> None:
    server: Gunicorn = gunicorn(GUNICORN_PRELOAD="1")
    for i in range(30):
        status, _ = server.request("GET", f"/accounts/{i % 10 + 1}")
        assert status == 200
    master = server.proc.pid
    starts = [int(p) for p in re.findall(r"started in process (\d+)", server.log_text())]
    assert starts and master not in starts
    assert server.stop() == 0
    log = server.log_text()
    assert "CooperationError" not in log and "Traceback" not in log, log


# ---------------------------------------------------------------------------- hooks


class FakeLog:
    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []

    def _add(self, level: str, msg: str, *args: Any) -> None:
        self.records.append((level, msg % args if args else msg))

    def critical(self, msg: str, *args: Any) -> None:
        self._add("critical", msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self._add("warning", msg, *args)


@pytest.fixture(scope="module")
def hooks() -> dict[str, Any]:
    return runpy.run_path(str(CONF))


def test_deploy_config_is_greenpool_gunicorn(hooks: dict[str, Any]) -> None:
    import greenpool.gunicorn as module

    for name in module.__all__:
        assert hooks[name] == getattr(module, name), name


# Run in a fresh interpreter: what loading the config in gunicorn's master imports.
_IMPORTS = r"""
import sys
import greenpool.gunicorn
from gevent import monkey
print(sorted({m.split(".")[0] for m in sys.modules} & {"psycopg", "psycopg2", "flask",
      "examples", "prometheus_client"}), monkey.is_module_patched("socket"))
"""


@pytest.mark.parametrize("preload", [False, True], ids=["plain", "preload"])
def test_loading_the_config_imports_no_driver_and_patches_only_to_preload(
    preload: bool, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUNICORN_")}
    if preload:
        env["GUNICORN_PRELOAD"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTS], capture_output=True, text=True, timeout=60,
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", str(preload)], result.stdout + result.stderr


def test_boots_and_cooperates_when_psycopg_was_imported_before_patching(
    gunicorn: Any, tmp_path: Path
) -> None:
    """psycopg imported in the master (here by the config, as an app's settings module
    might) picks its blocking C wait before the worker patches. greenpool's gevent wait,
    installed by post_worker_init's driver preparation, cures that: the worker boots and
    four slow requests on one worker overlap instead of running one after another."""
    conf = tmp_path / "early_psycopg.conf.py"
    conf.write_text(
        "import psycopg  # noqa: F401  imported in the master, unpatched\n"
        "from greenpool.gunicorn import *  # noqa: F403\n"
    )
    server: Gunicorn = gunicorn(config=str(conf), workers=1)
    seconds = 0.8

    def slow_round() -> float:
        t0 = time.monotonic()
        jobs = [
            gevent.spawn(server.request, "GET", f"/slow?seconds={seconds}") for _ in range(MAX_SIZE)
        ]
        gevent.joinall(jobs, timeout=30, raise_error=True)
        assert [job.value[0] for job in jobs] == [200] * MAX_SIZE
        return time.monotonic() - t0

    slow_round()  # opens the pool's connections
    elapsed = slow_round()
    assert elapsed < MAX_SIZE * seconds * 0.75, f"requests ran one after another: {elapsed:.2f}s"
    assert server.stop() == 0
    log = server.log_text()
    assert "CooperationError" not in log and "Traceback" not in log, log


def fake_worker(app: Any) -> Any:
    return SimpleNamespace(
        wsgi=app, log=FakeLog(), pid=os.getpid(), cfg=SimpleNamespace(timeout=30)
    )


def test_config_values(hooks: dict[str, Any]) -> None:
    assert hooks["worker_class"] == "gevent"
    assert hooks["worker_connections"] >= 100
    assert hooks["max_requests"] > 0 and hooks["max_requests_jitter"] > 0
    assert hooks["graceful_timeout"] <= hooks["timeout"]
    modules = [v.__name__ for v in hooks.values() if isinstance(v, ModuleType)]
    assert not [m for m in modules if m.startswith(("examples", "flask", "greenpool"))]


def test_post_worker_init_refuses_uncooperative_drivers(
    hooks: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flask import Flask

    from greenpool.flask import GreenPool
    from greenpool.flask_ext.state import AppState

    app = Flask("hooktest")
    app.config["DATABASE_URL"] = "dbname=x"
    GreenPool(app)
    worker = fake_worker(app)
    hooks["post_worker_init"](worker)  # cooperative here: nothing happens
    assert worker.log.records == []

    monkeypatch.setattr(AppState, "cooperation_problems", lambda self: ["psycopg waits in C"])
    with pytest.raises(CooperationError, match="psycopg waits in C"):
        hooks["post_worker_init"](worker)
    assert worker.log.records[-1][0] == "critical"

    app.extensions["greenpool"].options.require_cooperation = False
    hooks["post_worker_init"](worker)
    assert worker.log.records[-1][0] == "warning"


def test_worker_exit_closes_pools_and_abort_dumps_greenlets(
    hooks: dict[str, Any], dsn: str
) -> None:
    from flask import Flask

    from greenpool.flask import GreenPool

    app = Flask("exittest")
    app.config.update(GREENPOOL_CONNINFO=dsn, GREENPOOL_MIN_SIZE=1)
    db: Any = GreenPool(app)  # init_app turns it into the app's Flask pool
    pool = db.get_pool(app=app)
    pool.wait(10)
    worker = fake_worker(app)
    hooks["worker_exit"](None, worker)
    assert pool.closed

    gevent.spawn(gevent.sleep, 5)
    hooks["worker_abort"](worker)
    level, text = worker.log.records[-1]
    assert level == "critical" and "greenlets and threads" in text
    assert "Greenlet" in text
