"""Test setup: gevent patching first, then one private PostgreSQL cluster per session.

``GREENPOOL_TEST_DSN`` points the suite at an existing server instead; tests that must
stop or restart the server (marked ``needs_restart``) are skipped then.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import psycopg  # noqa: E402
import pytest  # noqa: E402

from greenpool import GreenPool, PoolError  # noqa: E402
from tests.support.hygiene import background_errors  # noqa: E402, F401  (autouse fixture)
from tests.support.pgcluster import PgCluster  # noqa: E402

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
    for item in items:
        mark = EXPECTED_BACKGROUND_ERRORS.get(item.nodeid)
        if mark is not None:
            item.add_marker(mark)


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


class ExternalServer:
    """The admin helpers of PgCluster, for a server named by GREENPOOL_TEST_DSN."""

    execute = PgCluster.execute
    backend_count = PgCluster.backend_count
    terminate_backends = PgCluster.terminate_backends
    active_queries = PgCluster.active_queries

    def __init__(self, dsn: str) -> None:
        self.admin_dsn = dsn

    def connect_admin(self, **extra: Any) -> psycopg.Connection[Any]:
        extra.setdefault("application_name", "pgcluster-admin")
        return psycopg.connect(self.admin_dsn, autocommit=True, **extra)


@pytest.fixture(scope="session")
def admin(pg_cluster: PgCluster | None, dsn: str) -> PgCluster | ExternalServer:
    """Admin helpers (backend_count, terminate_backends, active_queries, execute)."""
    return pg_cluster if pg_cluster is not None else ExternalServer(dsn)


@pytest.fixture
def cluster(pg_cluster: PgCluster | None) -> Iterator[PgCluster]:
    """The private cluster for tests that stop/restart it; running again afterwards."""
    if pg_cluster is None:
        pytest.skip("needs the private cluster (GREENPOOL_TEST_DSN is set)")
    yield pg_cluster
    if not pg_cluster.is_running():
        pg_cluster.start()


@pytest.fixture
def make_pool(dsn: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., GreenPool]]:
    """Factory for pools named after the test (so backends can be found by
    application_name); every pool is closed at teardown."""
    pools: list[GreenPool] = []
    base = "gp_" + request.node.name.replace("[", "_").replace("]", "")[:40]

    def factory(conninfo: str | None = None, **kwargs: Any) -> GreenPool:
        kwargs.setdefault("name", f"{base}_{len(pools)}")
        pool = GreenPool(dsn if conninfo is None else conninfo, **kwargs)
        pools.append(pool)
        return pool

    yield factory
    for pool in pools:
        pool.close(timeout=1)
