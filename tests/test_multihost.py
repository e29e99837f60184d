"""Several hosts in one conninfo: each host gets its own bound, the pool's connect_timeout
bounds them all, for psycopg 3 and psycopg2 alike (libpq in async mode ignores
connect_timeout, and psycopg 3 gives each host 130 s when it is unset)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from greenpool import ConnectError, GreenPool
from tests.support.faultproxy import FaultProxy
from tests.support.pgcluster import PgCluster

Factory = Callable[..., GreenPool[Any]]


@pytest.fixture
def dead_first_host(cluster: PgCluster) -> Iterator[FaultProxy]:
    with FaultProxy(cluster.host, cluster.port) as fp:
        fp.blackhole()
        yield fp


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
@pytest.mark.parametrize("form", ["keyvalue", "url"])
def test_a_black_holed_first_host_costs_one_attempt_bound(
    cluster: PgCluster, dead_first_host: FaultProxy, make_pool: Factory, driver: str, form: str
) -> None:
    hole = dead_first_host
    if form == "keyvalue":
        conninfo = (
            f"host={hole.host},{cluster.host} port={hole.port},{cluster.port} "
            f"user=postgres dbname=postgres connect_timeout=1"
        )
    else:
        conninfo = (
            f"postgresql://postgres@{hole.host}:{hole.port},{cluster.host}:{cluster.port}"
            "/postgres?connect_timeout=1"
        )
    start = time.monotonic()
    pool = make_pool(_with_auth(cluster, conninfo), driver=driver, min_size=1, open=False)
    pool.open(wait=True, timeout=15)
    took = time.monotonic() - start
    assert 0.9 <= took < 5, f"connected after {took:.2f} s"
    with pool.connection() as conn:
        port = conn.info.port
        assert int(port) == cluster.port
    hosts = pool.stats()["hosts"]
    assert hosts[f"{hole.host}:{hole.port}"]["connect_errors"] >= 1
    assert hosts[f"{cluster.host}:{cluster.port}"]["connections"] >= 1


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_no_host_answering_fails_within_the_pools_connect_timeout(
    cluster: PgCluster, dead_first_host: FaultProxy, make_pool: Factory, driver: str
) -> None:
    hole = dead_first_host
    conninfo = f"host={hole.host},{hole.host} port={hole.port},{hole.port} user=postgres"
    pool = make_pool(_with_auth(cluster, conninfo), driver=driver, connect_timeout=1.5, open=False)
    start = time.monotonic()
    with pytest.raises(ConnectError, match="no host accepted the connection"):
        pool.open(wait=True, timeout=15)
    assert time.monotonic() - start < 4


def _with_auth(cluster: PgCluster, conninfo: str) -> str:
    """Add what the cluster's DSN needs to authenticate (e.g. a passfile)."""
    from psycopg.conninfo import conninfo_to_dict

    extra = {
        k: v
        for k, v in conninfo_to_dict(cluster.dsn()).items()
        if k in ("passfile", "password", "sslmode")
    }
    if not extra:
        return conninfo
    if conninfo.startswith("postgresql://"):
        from urllib.parse import quote

        sep = "&" if "?" in conninfo else "?"
        return conninfo + sep + "&".join(f"{k}={quote(str(v), safe='')}" for k, v in extra.items())
    return conninfo + "".join(f" {k}={v}" for k, v in extra.items())
