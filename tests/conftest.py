"""Test setup: gevent patching first, then one private PostgreSQL cluster per session.

``GREENPOOL_TEST_DSN`` points the suite at an existing server instead; tests that must
stop or restart the server (marked ``needs_restart``) are skipped then.
"""

from gevent import monkey

monkey.patch_all()

import hashlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import psycopg  # noqa: E402
import pytest  # noqa: E402

from greenpool import GreenPool  # noqa: E402
from tests.support.pgcluster import PgCluster  # noqa: E402

EXTERNAL_DSN = os.environ.get("GREENPOOL_TEST_DSN", "")


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
    # Cut to fit application_name, plus a hash of the whole id: parametrised runs of one
    # test must not share a name (their backends are found by it).
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:6]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    base = f"gp_{name[:40]}_{digest}"

    def factory(conninfo: str | None = None, **kwargs: Any) -> GreenPool:
        kwargs.setdefault("name", f"{base}_{len(pools)}")
        pool = GreenPool(dsn if conninfo is None else conninfo, **kwargs)
        pools.append(pool)
        return pool

    yield factory
    for pool in pools:
        pool.close(timeout=1)


# --------------------------------------------------------------------------- scale-out


@pytest.fixture(scope="module")
def pg_primary() -> Iterator[PgCluster]:
    """A cluster of its own (not the session's) that standbys can stream from."""
    from tests.support.pgcluster import PgBinariesNotFoundError
    from tests.support.standby import PRIMARY_SETTINGS

    try:
        cluster = PgCluster(max_connections=50, extra_settings=PRIMARY_SETTINGS)
    except PgBinariesNotFoundError as ex:
        pytest.skip(f"no PostgreSQL server binaries: {ex}")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def make_standby(pg_primary: PgCluster) -> Iterator[Callable[..., Any]]:
    """Factory for hot standbys of ``pg_primary``; at teardown they are destroyed and the
    primary is made writable again (tests use tables of their own names)."""
    from tests.support.standby import PgStandby, set_read_only

    standbys: list[PgStandby] = []

    def factory(name: str = "standby") -> PgStandby:
        standby = PgStandby(pg_primary, name=f"{name}{len(standbys)}")
        standbys.append(standby)
        standby.start()
        return standby

    try:
        yield factory
    finally:
        for standby in standbys:
            standby.destroy()
        if pg_primary.is_running():
            set_read_only(pg_primary, False)


@pytest.fixture
def standby_pair(pg_primary: PgCluster, make_standby: Callable[..., Any]) -> tuple[PgCluster, Any]:
    """(primary, hot standby streaming from it); a fresh standby per test."""
    return pg_primary, make_standby()


@pytest.fixture
def make_pgbouncer(pg_cluster: PgCluster | None) -> Iterator[Callable[..., Any]]:
    """Factory for PgBouncers (in front of the session cluster unless ``cluster=`` is
    given); skips when pgbouncer is not installed; every one destroyed at teardown."""
    from tests.support.pgbouncer import PgBouncer, require_pgbouncer

    require_pgbouncer()
    bouncers: list[PgBouncer] = []

    def factory(cluster: PgCluster | None = None, **settings: Any) -> PgBouncer:
        target = cluster or pg_cluster
        if target is None:
            pytest.skip("PgBouncer needs a private cluster (GREENPOOL_TEST_DSN is set)")
        bouncer = PgBouncer(target, **settings)
        bouncers.append(bouncer)
        bouncer.start()
        return bouncer

    try:
        yield factory
    finally:
        for bouncer in bouncers:
            bouncer.destroy()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The side-by-side runs (marker ``side_by_side``) only when asked for by ``-m``."""
    if "side_by_side" in (config.option.markexpr or ""):
        return
    keep = [item for item in items if item.get_closest_marker("side_by_side") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
