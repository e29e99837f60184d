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

import hashlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
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
    """Background-error allowances and restart skips by marker; the side-by-side runs
    (marker ``side_by_side``) only when asked for by ``-m``."""
    if "side_by_side" not in (config.option.markexpr or ""):
        keep = [item for item in items if item.get_closest_marker("side_by_side") is None]
        if len(keep) != len(items):
            config.hook.pytest_deselected(items=[i for i in items if i not in keep])
            items[:] = keep
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
    # Cut to fit application_name, plus a hash of the whole id: parametrised runs of one
    # test must not share a name (their backends are found by it).
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:6]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    base = f"gp_{name[:40]}_{digest}"

    def factory(conninfo: str | None = None, **kwargs: Any) -> GreenPool[Any]:
        kwargs.setdefault("name", f"{base}_{len(pools)}")
        pool: GreenPool[Any] = GreenPool(dsn if conninfo is None else conninfo, **kwargs)
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
