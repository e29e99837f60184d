"""Flask-SQLAlchemy on greenpool: SQLALCHEMY_ENGINE_OPTIONS = {"poolclass": GreenQueuePool},
binds included, in process and in the example app under a real gunicorn -k gevent."""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent.event import Event

from tests.support import webload
from tests.support.ormsupport import backend_pids, unique_name
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def schema(dsn: str) -> None:
    from examples.flask_app.schema import setup_conninfo

    setup_conninfo(dsn)


@pytest.fixture
def orm_app(dsn: str, schema: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from examples.flask_sqlalchemy_app import create_app, db

    name = unique_name("fsa")
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("ORM_NAME", name)
    monkeypatch.setenv("ORM_POOL_SIZE", "2")
    monkeypatch.setenv("ORM_POOL_TIMEOUT", "2")
    app = create_app()
    app.config["APP_NAME"] = name
    yield app
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()


def test_engines_and_binds_run_on_greenqueuepool(orm_app: Any, dsn: str) -> None:
    from examples.flask_sqlalchemy_app import db
    from greenpool.sqlalchemy import GreenQueuePool

    name = orm_app.config["APP_NAME"]
    client = orm_app.test_client()
    assert client.get("/accounts/1").status_code == 200
    summary = client.get("/reports/summary")
    assert summary.status_code == 200 and summary.get_json()["accounts"] >= 1
    with orm_app.app_context():
        engines = dict(db.engines)
        assert set(engines) == {None, "reporting"}
        assert all(isinstance(e.pool, GreenQueuePool) for e in engines.values())
        pools = [e.pool for e in engines.values() if isinstance(e.pool, GreenQueuePool)]
        assert [p.checkedout() for p in pools] == [0, 0]  # given back
        reporting = engines["reporting"].pool
        assert isinstance(reporting, GreenQueuePool) and reporting.greenpool.max_size == 3
    assert 1 <= len(backend_pids(dsn, name)) <= 2
    assert 1 <= len(backend_pids(dsn, f"{name}-reporting")) <= 3
    ok = client.post("/transfers", json={"from_id": 1, "to_id": 2, "amount": "0.01"})
    assert ok.status_code == 201
    too_much = client.post("/transfers", json={"from_id": 1, "to_id": 2, "amount": "1e9"})
    assert too_much.status_code == 409


def test_exhaustion_answers_503(orm_app: Any, dsn: str) -> None:
    from examples.flask_sqlalchemy_app import db

    with orm_app.app_context():
        engine = db.engine
    hold = Event()
    held: list[int] = []

    def holder() -> None:
        with engine.connect():
            held.append(1)
            hold.wait(10)

    holders = [gevent.spawn(holder) for _ in range(2)]
    wait_for(lambda: len(held) == 2)
    start = time.monotonic()
    response = orm_app.test_client().get("/accounts/1", headers={"Accept": "application/json"})
    assert response.status_code == 503 and response.headers["Retry-After"] == "2"
    assert response.get_json()["error"] == "service_unavailable"
    assert 1.5 < time.monotonic() - start < 6  # pool_timeout (2 s), not a hang
    assert orm_app.test_client().get("/healthz").status_code == 200
    hold.set()
    gevent.joinall(holders, timeout=5, raise_error=True)
    assert orm_app.test_client().get("/accounts/1").status_code == 200


def pick(rng: random.Random) -> tuple[str, str, Any, tuple[int, ...]]:
    roll = rng.random()
    account = rng.randint(1, 400)
    if roll < 0.35:
        return "GET", f"/accounts/{account}", None, (200,)
    if roll < 0.65:
        body = {"from_id": account, "to_id": account % 400 + 1, "amount": "1.25"}
        return "POST", "/transfers", body, (201, 409)
    if roll < 0.75:
        return "GET", "/slow?seconds=0.05", None, (200,)
    if roll < 0.85:
        return "GET", "/reports/summary", None, (200,)
    return "GET", "/healthz", None, (200,)


@pytest.mark.slow
def test_orm_app_under_gunicorn(dsn: str, schema: None, tmp_path: Path) -> None:
    workers, size = 2, 4
    name = unique_name("fsa-e2e")
    server = webload.start(
        "examples.flask_sqlalchemy_app.wsgi:app",
        name,
        tmp_path / "gunicorn.log",
        {"DATABASE_URL": dsn, "ORM_NAME": name, "ORM_POOL_SIZE": str(size)},
        workers=workers,
    )
    try:
        peak_reporting = 0
        stop = Event()

        def sample_reporting() -> None:
            nonlocal peak_reporting
            while not stop.is_set():
                n = webload.backend_count(dsn, f"{name}-reporting")
                peak_reporting = max(peak_reporting, n)
                stop.wait(0.1)

        sampler = gevent.spawn(sample_reporting)
        result = webload.run_load(server, dsn, pick, clients=120, seconds=10)
        stop.set()
        sampler.join(timeout=10)
        print(
            f"\nflask-sqlalchemy e2e: {result.requests} requests ({result.rps:.0f}/s) "
            f"{dict(result.by_status)}, peak backends {result.peak_backends} "
            f"(cap {workers}x{size}), reporting {peak_reporting} (cap {workers}x3)"
        )
        assert result.failures == [], result.failures[:10]
        assert result.requests > 500
        assert 0 < result.peak_backends <= workers * size
        assert peak_reporting <= workers * 3
        seen: dict[int, Any] = {}
        for _ in range(30):
            data = json.loads(server.request("GET", "/stats")[1])
            seen[data["pid"]] = data["pools"]
            if len(seen) == workers:
                break
        for pools in seen.values():
            assert pools["None"]["peak_acquired"] <= size, pools
            assert pools["None"]["timeout_count"] == 0, pools
    finally:
        code = server.stop()
    assert code == 0
    assert webload.wait_no_backends(dsn, name) == 0
    assert webload.wait_no_backends(dsn, f"{name}-reporting") == 0
    log = server.log_text()
    assert "Traceback" not in log and "Invalid switch" not in log, log
    assert len(re.findall(rf"pool '{name}' closed", log)) == workers, log
