"""The process registry (greenpool.get_pool / close_all) and the growth rules that the
architecture review found broken: try-now calls grow, min_idle refills on checkout."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest

import greenpool
from greenpool import GreenPool, PoolTimeout
from greenpool.registry import registered_pools
from tests.support.fakedriver import FakeDriver
from tests.support.waiting import wait_for


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    yield
    greenpool.close_all(timeout=1)


class SlowPrepareDriver(FakeDriver):
    """Its first-time set-up yields to the hub, as psycopg's does."""

    def __init__(self) -> None:
        super().__init__()
        self.prepared = 0

    def prepare(self) -> None:
        self.prepared += 1
        gevent.sleep(0.01)


def test_same_arguments_same_pool_others_differ(fresh_registry: None) -> None:
    driver = FakeDriver()
    a = greenpool.get_pool("", driver=driver, name="reg_a", max_size=2)
    b = greenpool.get_pool("", driver=driver, name="reg_a", max_size=2)
    c = greenpool.get_pool("", driver=driver, name="reg_a", max_size=3)
    assert a is b and a is not c
    assert not a.closed and not c.closed
    assert {a, c} <= set(registered_pools())


def test_racing_first_users_open_one_pool_once(fresh_registry: None) -> None:
    driver = SlowPrepareDriver()
    greenlets = [
        gevent.spawn(greenpool.get_pool, "", driver=driver, name="reg_race") for _ in range(20)
    ]
    gevent.joinall(greenlets, timeout=5, raise_error=True)
    pools = {g.value for g in greenlets}
    assert len(pools) == 1
    assert driver.prepared == 1, "opened more than once"
    assert not pools.pop().closed


def test_a_closed_pool_is_replaced_and_close_all_closes_everything(
    fresh_registry: None,
) -> None:
    driver = FakeDriver()
    first = greenpool.get_pool("", driver=driver, name="reg_close")
    direct: GreenPool[Any] = GreenPool("", driver=driver, name="reg_direct", open=True)
    first.close()
    second = greenpool.get_pool("", driver=driver, name="reg_close")
    assert second is not first and not second.closed
    unopened: GreenPool[Any] = GreenPool()  # e.g. a Flask extension before init_app
    greenpool.close_all(timeout=1)
    assert second.closed and direct.closed
    assert driver.open_conns() == []
    assert unopened.state == "new"  # nothing to close; init_app can still use it
    from flask import Flask

    app = Flask("after_close_all")
    app.config["GREENPOOL_CONNINFO"] = "host=127.0.0.1 dbname=nothing"
    unopened.init_app(app)  # no connection is made until a request borrows


def test_unhashable_setting_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="get_pool: setting 'check' is not hashable"):
        greenpool.get_pool("", check=[1, {2}])


def test_forked_child_gets_its_own_connections(fresh_registry: None, dsn: str, admin: Any) -> None:
    pool = greenpool.get_pool(dsn, name="reg_fork", min_size=1, max_size=2)
    with pool.connection() as conn:
        parent_backend = conn.info.backend_pid
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            again = greenpool.get_pool(dsn, name="reg_fork", min_size=1, max_size=2)
            with again.connection(timeout=5) as conn:
                os.write(write_end, f"{int(again is pool)} {conn.info.backend_pid}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    with os.fdopen(read_end) as pipe:
        same, child_backend = pipe.read().split()
    assert same == "1"  # the registry keeps the object; it forgot the parent's connections
    assert int(child_backend) != parent_backend
    with pool.connection() as conn:  # the parent's session survived the child's exit
        assert conn.info.backend_pid == parent_backend


# ---------------------------------------------------------------------------- growth


def test_try_now_acquire_on_an_empty_pool_fails_at_once_but_starts_growing() -> None:
    driver = FakeDriver(connect_delay=0.001)
    pool: GreenPool[Any] = GreenPool("", driver=driver, min_size=0, max_size=2, open=True)
    try:
        start = time.monotonic()
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0)
        assert time.monotonic() - start < 0.5
        wait_for(lambda: pool.stats()["idle"] >= 1, timeout=2)
        conn = pool.getconn(timeout=0)
        pool.putconn(conn)
    finally:
        pool.close(timeout=0)


def test_min_idle_is_refilled_by_the_checkout_not_the_next_tick() -> None:
    driver = FakeDriver(connect_delay=0.001)
    pool: GreenPool[Any] = GreenPool(
        "", driver=driver, min_size=0, max_size=5, min_idle=2, open=True
    )
    try:
        wait_for(lambda: pool.stats()["idle"] == 2, timeout=2)
        gevent.sleep(0)  # let the maintenance greenlet settle into its 1 s wait
        start = time.monotonic()
        held = pool.getconn(timeout=1)
        wait_for(lambda: pool.stats()["idle"] == 2, timeout=2)
        refill = time.monotonic() - start
        # The maintenance greenlet would take up to its 1 s interval.
        assert refill < 0.5, f"refilled after {refill:.3f} s: by the maintenance tick"
        pool.putconn(held)
    finally:
        pool.close(timeout=0)


def test_a_check_that_always_fails_backs_off_instead_of_churning() -> None:
    """Every checkout pings (check_idle_after=0) and the check always raises: each
    connection is replaced, but replacements back off after three failures in a row."""

    def failing_check(conn: Any) -> None:
        raise OSError("the check always fails")

    driver = FakeDriver()
    pool: GreenPool[Any] = GreenPool(
        "",
        driver=driver,
        min_size=1,
        max_size=1,
        check=failing_check,
        check_idle_after=0,
        open=True,
    )
    try:
        deadline = time.monotonic() + 1.0
        attempts = 0
        while time.monotonic() < deadline and attempts < 10_000:
            attempts += 1
            with pytest.raises(PoolTimeout):
                pool.getconn(timeout=0.05)
        opened = len(driver.conns)
        assert opened <= 25, f"{opened} connections opened in 1 s: no backoff"
        assert pool.stats()["check_failed_count"] >= 3
    finally:
        pool.close(timeout=0)


@pytest.mark.parametrize("name", ["", "x" * 64, "a\x00b", "new\nline", "caf\u00e9"])
def test_pool_names_are_validated(name: str) -> None:
    if name == "":
        assert GreenPool("", driver=FakeDriver(), name=name).name == "greenpool"
        return
    with pytest.raises(ValueError, match="name: expected 1-63 printable ASCII"):
        GreenPool("", driver=FakeDriver(), name=name)
