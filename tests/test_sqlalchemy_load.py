"""SQLAlchemy ORM sessions on GreenQueuePool under contention, kills and timeouts.

Ground truth is the server: backends for the engine's application_name, queries still
running, and every connection checked out at once at the end (each a distinct, idle,
live backend).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

import gevent
import pytest
import sqlalchemy as sa
from gevent import GreenletExit
from gevent.event import Event
from sqlalchemy import event, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from greenpool.sqlalchemy import GreenQueuePool
from tests.support.ormsupport import backend_pids, sa_url, unique_name
from tests.support.waiting import wait_for

POOL_SIZE = 10
WORKERS = 200


class Base(DeclarativeBase):
    pass


class Chaos(Base):
    __tablename__ = "sa_chaos"
    id: Mapped[int] = mapped_column(primary_key=True)
    worker: Mapped[int]


def make(dsn: str, **kwargs: Any) -> tuple[sa.engine.Engine, str]:
    app = unique_name("saload")
    engine = sa.create_engine(
        sa_url(dsn, application_name=app),
        poolclass=GreenQueuePool,
        pool_size=POOL_SIZE,
        max_overflow=0,
        **kwargs,
    )
    return engine, app


class Guard:
    """Checks every checkout: not lent to anyone else (duplicated), and clean (idle in
    no transaction, open) — the pool's promise, observed through SQLAlchemy's events."""

    def __init__(self, engine: sa.engine.Engine) -> None:
        self.holder: dict[int, int] = {}  # id(dbapi connection) -> id(record)
        self.duplicated = 0
        self.dirty = 0
        self.checkouts = 0
        event.listen(engine, "checkout", self.checkout)
        event.listen(engine, "checkin", self.checkin)

    def checkout(self, dbapi: Any, record: Any, proxy: Any) -> None:
        self.checkouts += 1
        if id(dbapi) in self.holder:
            self.duplicated += 1
        self.holder[id(dbapi)] = id(record)
        if dbapi.closed or dbapi.info.transaction_status != 0:  # 0: IDLE
            self.dirty += 1

    def checkin(self, dbapi: Any, record: Any) -> None:
        for key, rec in list(self.holder.items()):
            if rec == id(record):
                del self.holder[key]


def settle_and_check(engine: sa.engine.Engine, app: str, dsn: str, admin: Any) -> dict[str, Any]:
    pool: GreenQueuePool = engine.pool  # type: ignore[assignment]
    wait_for(lambda: pool.checkedout() == 0, timeout=10)
    gp = pool.greenpool
    wait_for(lambda: gp.stats()["constructing"] == gp.stats()["closing"] == 0)
    stats = gp.stats()
    assert stats["acquired"] == 0 and stats["acquire_count"] == stats["returns_count"], stats
    wait_for(lambda: len(backend_pids(dsn, app)) == gp.stats()["total"], timeout=10)
    wait_for(lambda: not admin.active_queries(app), timeout=10)
    # Every slot can be borrowed at once: nothing was leaked.
    held = [engine.connect() for _ in range(POOL_SIZE)]
    pids = {c.execute(text("SELECT pg_backend_pid()")).scalar() for c in held}
    assert len(pids) == POOL_SIZE and pids <= backend_pids(dsn, app)
    for c in held:
        c.close()
    assert len(backend_pids(dsn, app)) <= POOL_SIZE
    return stats


@pytest.mark.slow
def test_two_hundred_greenlets_on_ten_connections_none_starved(dsn: str, admin: Any) -> None:
    engine, app = make(dsn, pool_timeout=10)
    counts: Counter[int] = Counter()
    errors: list[str] = []
    peak = 0
    stop = Event()

    def worker(i: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                with Session(engine) as session:
                    session.execute(text("SELECT 1"))
                counts[i] += 1
            except Exception as ex:
                errors.append(repr(ex))
                return

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, len(backend_pids(dsn, app)))
            stop.wait(0.1)

    sampler = gevent.spawn(sample)
    deadline = time.monotonic() + 3.0
    workers = [gevent.spawn(worker, i, deadline) for i in range(WORKERS)]
    gevent.joinall(workers, timeout=30, raise_error=True)
    stop.set()
    sampler.get(timeout=10)
    starved = [i for i in range(WORKERS) if counts[i] == 0]
    ops = sum(counts.values())
    print(
        f"\nsqlalchemy contended: {ops} sessions in 3 s by {WORKERS} greenlets on "
        f"{POOL_SIZE} connections; starved {len(starved)}; per greenlet min "
        f"{min(counts.values(), default=0)} max {max(counts.values(), default=0)}; "
        f"peak backends {peak}"
    )
    assert errors == []
    assert starved == []
    assert 0 < peak <= POOL_SIZE
    settle_and_check(engine, app, dsn, admin)
    engine.dispose()


@pytest.mark.slow
def test_kills_and_timeouts_inside_orm_sessions(dsn: str, admin: Any) -> None:
    # A generous pool_timeout: on a machine running other work, the last of the FIFO
    # queue waited over 5 s (354 TimeoutErrors at ~33 sessions/s); the kills and timeouts
    # this test injects are its own gevent.Timeouts, not the pool's.
    engine, app = make(dsn, pool_timeout=30)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    guard = Guard(engine)
    rng = random.Random(int(time.time()))
    target_kills, target_timeouts = 1000, 1000
    kills = timeouts = ops = 0
    errors: Counter[str] = Counter()
    peak = 0
    live: dict[int, gevent.Greenlet] = {}
    stop = Event()

    def unit(i: int) -> None:
        with Session(engine) as session, session.begin():
            session.add(Chaos(worker=i))
            session.flush()
            session.execute(text("SELECT pg_sleep(:s)"), {"s": rng.choice((0, 0, 0.001, 0.003))})
            session.query(Chaos).filter(Chaos.worker == i).limit(3).all()

    def worker(i: int) -> None:
        nonlocal timeouts, ops
        while not stop.is_set():
            # Half the units run under their own gevent.Timeout, firing at a random point.
            timer = gevent.Timeout(rng.uniform(0, 0.006)) if rng.random() < 0.5 else None
            try:
                if timer is not None:
                    timer.start()
                unit(i)
                ops += 1
            except gevent.Timeout as t:
                if t is not timer:
                    raise
                timeouts += 1
            except Exception as ex:  # not expected: counted and reported
                errors[type(ex).__name__] += 1
            finally:
                if timer is not None:
                    timer.close()

    def supervise() -> None:
        nonlocal kills
        next_id = 0
        while not stop.is_set():
            while len(live) < WORKERS:
                g = gevent.spawn(worker, next_id)
                live[next_id] = g
                g.link(lambda g, i=next_id: live.pop(i, None))
                next_id += 1
            gevent.sleep(rng.uniform(0, 0.004))
            victim = live.get(rng.choice(list(live)))
            if victim is not None and not victim.dead:
                victim.kill(GreenletExit, block=False)
                kills += 1

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, len(backend_pids(dsn, app)))
            stop.wait(0.05)

    sampler = gevent.spawn(sample)
    supervisor = gevent.spawn(supervise)
    deadline = time.monotonic() + 60
    while (kills < target_kills or timeouts < target_timeouts) and time.monotonic() < deadline:
        gevent.sleep(0.1)
    stop.set()
    supervisor.get(timeout=10)
    gevent.joinall(list(live.values()), timeout=20)
    assert not live, f"{len(live)} workers did not stop"
    sampler.get(timeout=10)

    stats = settle_and_check(engine, app, dsn, admin)
    print(
        f"\nsqlalchemy chaos: {kills} kills + {timeouts} timeouts, {ops} sessions completed, "
        f"checkouts {guard.checkouts}; duplicated {guard.duplicated}, dirty {guard.dirty}, "
        f"unexpected errors {dict(errors)}; peak backends {peak}; "
        f"cancelled queries {stats['cancel_count']}, leaked 0"
    )
    assert kills + timeouts >= 2000, (kills, timeouts)
    assert guard.duplicated == 0 and guard.dirty == 0
    assert not errors, errors
    assert 0 < peak <= POOL_SIZE
    assert ops > 1000
    Base.metadata.drop_all(engine)
    engine.dispose()
    wait_for(lambda: not backend_pids(dsn, app))
