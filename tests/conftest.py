"""Test setup: gevent patching first, then one private PostgreSQL cluster per session.

``GREENPOOL_TEST_DSN`` (a superuser DSN) points the suite at an existing server instead;
tests that stop or restart a server (marked ``needs_restart``) are skipped then, by
marker, and only those.

With ``CI`` set a skipped test fails the run (see :func:`pytest_sessionfinish`): CI must
not report success for tests that never ran. ``./scripts/test`` installs what tests need.

Every test also fails on a greenlet's exception reaching the hub and on ERROR records of
the ``greenpool`` logger (``tests/support/hygiene.py``).
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from greenpool import GreenPool, PoolError  # noqa: E402
from tests.support.hygiene import background_errors  # noqa: E402, F401  (autouse fixture)
from tests.support.pgcluster import PgCluster  # noqa: E402
from tests.support.server import ExternalServer  # noqa: E402

EXTERNAL_DSN = os.environ.get("GREENPOOL_TEST_DSN", "")

# Tests (in files maintained elsewhere) that provoke a background error on purpose and
# assert on it themselves; every other test fails on one (see tests/support/hygiene.py).
EXPECTED_BACKGROUND_ERRORS = {
    "tests/test_flask.py::test_teardown_never_raises": pytest.mark.allow_pool_errors(
        r"releasing the request's connection to pool .* failed"
    ),
    "tests/test_flask.py::test_request_connection_refused_to_other_greenlets": (
        pytest.mark.allow_greenlet_errors(types=(RuntimeError,))
    ),
    "tests/test_flask.py::test_pools_belong_to_one_thread": pytest.mark.allow_greenlet_errors(
        types=(PoolError,)
    ),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    restart_skip = pytest.mark.skip(
        reason="stops or restarts the server: needs the private cluster (GREENPOOL_TEST_DSN)"
    )
    for item in items:
        mark = EXPECTED_BACKGROUND_ERRORS.get(item.nodeid)
        if mark is not None:
            item.add_marker(mark)
        if EXTERNAL_DSN and item.get_closest_marker("needs_restart") is not None:
            item.add_marker(restart_skip)


# --------------------------------------------------------------------------- skips in CI

_SKIPPED: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        if hasattr(report, "wasxfail"):
            reason = f"xfail: {report.wasxfail}"
        _SKIPPED.append((report.nodeid, reason))


def _skips_fail() -> bool:
    return bool(os.environ.get("CI")) and bool(_SKIPPED)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skips_fail() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if _skips_fail():
        terminalreporter.section("skipped tests fail the run in CI", red=True)
        for nodeid, reason in _SKIPPED:
            terminalreporter.line(f"SKIPPED {nodeid}: {reason}")
        terminalreporter.line(
            f"{len(_SKIPPED)} test(s) skipped with CI set: install what they need "
            "(./scripts/test does) or unset GREENPOOL_TEST_DSN"
        )


# --------------------------------------------------------------------------- the server


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster | None]:
    """The private cluster, or None when GREENPOOL_TEST_DSN names a server."""
    if EXTERNAL_DSN:
        yield None
        return
    cluster = PgCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def dsn(pg_cluster: PgCluster | None) -> str:
    """A superuser key=value DSN over TCP loopback."""
    if pg_cluster is None:
        return EXTERNAL_DSN
    return pg_cluster.admin_dsn


@pytest.fixture(scope="session")
def admin(pg_cluster: PgCluster | None, dsn: str) -> PgCluster | ExternalServer:
    """The server's admin helpers (backend_count, terminate_backends, active_queries,
    execute) and connection strings (``dsn(user, password, **extra)``, host, port)."""
    if pg_cluster is not None:
        return pg_cluster
    server = ExternalServer(dsn)
    server.provision()
    return server


@pytest.fixture
def cluster(
    pg_cluster: PgCluster | None, admin: PgCluster | ExternalServer
) -> Iterator[PgCluster | ExternalServer]:
    """The server, as ``admin``; a private cluster a test stopped is started again.
    Tests that stop or restart it are marked ``needs_restart``."""
    yield admin
    if pg_cluster is not None and not pg_cluster.is_running():
        pg_cluster.start()


@pytest.fixture
def make_pool(dsn: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., GreenPool[Any]]]:
    """Factory for pools named after the test (so backends can be found by
    application_name); every pool is closed at teardown."""
    pools: list[GreenPool[Any]] = []
    base = "gp_" + request.node.name.replace("[", "_").replace("]", "")[:40]

    def factory(conninfo: str | None = None, **kwargs: Any) -> GreenPool[Any]:
        kwargs.setdefault("name", f"{base}_{len(pools)}")
        pool: GreenPool[Any] = GreenPool(dsn if conninfo is None else conninfo, **kwargs)
        pools.append(pool)
        return pool

    yield factory
    for pool in pools:
        pool.close(timeout=1)
