"""The example Django project on greenpool.django under a real ``gunicorn -k gevent``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.support import djangoscenarios as scenarios
from tests.support import webload

WORKERS = 2
MAX_SIZE = 4


@pytest.fixture(scope="module")
def seeded(dsn: str) -> None:
    scenarios.migrate_and_seed(dsn)


def pool_stats(server: webload.Server) -> dict[int, Any]:
    seen: dict[int, Any] = {}
    for _ in range(30):
        data = json.loads(server.request("GET", "/stats")[1])
        seen[data["pid"]] = data
        if len(seen) == WORKERS:
            break
    return seen


def stop_cleanly(server: webload.Server, dsn: str) -> None:
    assert server.stop() == 0
    assert webload.wait_no_backends(dsn, server.name) == 0  # SIGTERM left no backend
    log = server.log_text()
    assert "Traceback" not in log, log
    # Every worker that opened its pool (at its first request: a worker the load never
    # reached opens none) closed it.
    opened = re.findall(rf"pool '{server.name}' opened", log)
    assert 1 <= len(opened) <= WORKERS, log
    assert len(re.findall(rf"pool '{server.name}' closed", log)) == len(opened), log


@pytest.mark.slow
def test_load_is_bounded_by_the_cap_and_shutdown_is_clean(
    seeded: None, dsn: str, tmp_path: Path
) -> None:
    server = scenarios.start(dsn, tmp_path / "gunicorn.log", workers=WORKERS, max_size=MAX_SIZE)
    try:
        result = webload.run_load(server, dsn, scenarios.pick, clients=120, seconds=10)
        print(
            f"\ndjango e2e: {result.requests} requests ({result.rps:.0f}/s) "
            f"{dict(result.by_status)}, peak backends {result.peak_backends} "
            f"(cap {WORKERS}x{MAX_SIZE})"
        )
        assert result.failures == [], result.failures[:10]
        assert result.requests > 500, result.by_status
        assert 0 < result.peak_backends <= WORKERS * MAX_SIZE
        stats = pool_stats(server)
        assert {s["driver"] for s in stats.values()} == {"psycopg"}
        for s in stats.values():
            if s["pool"] is not None:
                assert 0 < s["pool"]["peak_acquired"] <= MAX_SIZE, s
                assert s["pool"]["timeout_count"] == 0, s
    finally:
        if server.proc.poll() is None:
            stop_cleanly(server, dsn)


@pytest.mark.slow
def test_exhaustion_answers_503_instead_of_hanging(seeded: None, dsn: str, tmp_path: Path) -> None:
    # With ATOMIC_REQUESTS the view's transaction borrows before the view runs.
    server = scenarios.start(
        dsn, tmp_path / "gunicorn.log", workers=1, max_size=2, timeout=1, atomic_requests=True
    )
    try:
        burst = webload.run_burst(server, dsn, "/slow?seconds=3", clients=10)
        print(
            f"\ndjango exhaustion: {dict(burst.statuses)}, max latency "
            f"{burst.max_latency:.2f} s, peak backends {burst.peak_backends}"
        )
        assert burst.hung == 0
        assert burst.statuses[200] == 2 and burst.statuses[503] == 8, burst.statuses
        assert burst.retry_after == {"2"}
        assert burst.max_latency < 6  # 3 s of pg_sleep; the 503s come after the 1 s timeout
        assert burst.peak_backends <= 2
        assert server.request("GET", "/accounts/1")[0] == 200  # serves again at once
    finally:
        if server.proc.poll() is None:
            assert server.stop() == 0
            assert webload.wait_no_backends(dsn, server.name) == 0


@pytest.mark.slow
def test_psycopg2_under_gunicorn(seeded: None, dsn: str, tmp_path: Path) -> None:
    server = scenarios.start(
        dsn, tmp_path / "gunicorn.log", workers=WORKERS, max_size=MAX_SIZE, psycopg2=True
    )
    try:
        result = webload.run_load(server, dsn, scenarios.pick, clients=60, seconds=5)
        print(
            f"\ndjango psycopg2: {result.requests} requests {dict(result.by_status)}, "
            f"peak backends {result.peak_backends}"
        )
        assert result.failures == [], result.failures[:10]
        assert result.requests > 200
        assert 0 < result.peak_backends <= WORKERS * MAX_SIZE
        assert {s["driver"] for s in pool_stats(server).values()} == {"psycopg2"}
    finally:
        if server.proc.poll() is None:
            stop_cleanly(server, dsn)
