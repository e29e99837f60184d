"""Read replicas: a primary pool composed with one pool per replica.

``GreenPool(primary, replicas=[...], max_replica_lag=5.0)`` keeps a pool per replica (each
with its own ``max_size``) and a monitor greenlet that, every ``replica_check_period``,
measures each replica's replay lag against the primary over two dedicated connections
(one to the primary, one to the replica, never taken from the pools): a replica whose
last replayed WAL position has reached the primary's current one lags 0 s; otherwise it
lags by how long ago the monitor first saw the primary at a WAL position the replica has
still not replayed (to within ``replica_check_period``). Only when the primary cannot be
measured does it fall back to the age of the replica's last replayed commit
(``pg_last_xact_replay_timestamp()``, which overstates the lag after a quiet spell).

``getconn(read_only=True)`` / ``connection(read_only=True)`` borrow from the healthy
replica with the fewest connections in use whose lag is within ``max_replica_lag``; with
none, they fall back to the primary (``replica_fallback="primary"``, the default) or raise
PoolTimeout (``"fail"``). A replica whose probe fails is marked down and probed again
with backoff (1 s doubling to 30 s). ``after=`` (a commit token from
:meth:`Router.commit_token`) only accepts a replica that has replayed that commit,
waiting for one up to the borrower's timeout before falling back. The primary pool's own
borrow and give-back do not pass through here.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Any

import gevent

from greenpool.errors import PoolTimeout
from greenpool.pool import OPEN
from greenpool.settings import seconds
from greenpool.vetting import describe_error

if TYPE_CHECKING:
    from greenpool.api import GreenPool

logger = logging.getLogger("greenpool")

FALLBACKS = ("primary", "fail")
_PRIMARY_SQL = "SELECT pg_current_wal_lsn()::text"
_REPLICA_SQL = (
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, "
    "extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8"
)
TOKEN_SQL = "SELECT pg_current_wal_insert_lsn()::text"
_DOWN_MIN, _DOWN_MAX = 1.0, 30.0


def _share_in_use(replica: Replica) -> float:
    """Least-loaded means the smallest share of the replica pool's own max_size."""
    return replica.pool.acquired_count() / replica.pool.settings.max_size


def parse_lsn(text: str | None) -> int | None:
    """``'16/B374D848'`` -> an int that orders as the WAL does."""
    if not text:
        return None
    high, sep, low = text.partition("/")
    try:
        if not sep:
            raise ValueError
        return (int(high, 16) << 32) + int(low, 16)
    except ValueError:
        raise ValueError(f"not a WAL position such as '16/B374D848': {text!r}") from None


@dataclass
class Replica:
    """One replica: its pool and what the monitor last measured."""

    pool: GreenPool[Any]
    probe: Any = None  # a dedicated connection to the replica
    lag: float | None = None  # seconds; None until measured
    replay_lsn: int | None = None
    healthy: bool = False
    down_until: float = 0.0
    down_for: float = 0.0
    last_error: str | None = None


class Router:
    """Routes read-only borrows to replicas (see the module docstring)."""

    def __init__(
        self,
        primary: GreenPool[Any],
        replicas: list[GreenPool[Any]],
        max_lag: float,
        fallback: str,
        check_period: float,
    ) -> None:
        if fallback not in FALLBACKS:
            raise ValueError(f"replica_fallback: expected one of {FALLBACKS}")
        self._primary = primary
        self.replicas = [Replica(pool) for pool in replicas]
        self.max_lag = max_lag
        self.fallback = fallback
        self.check_period = check_period
        #: id(conn) -> the replica pool that lent it: the primary's own table, so that its
        #: putconn hands the connection to that pool with no call through the router.
        self._lent: dict[int, Any] = primary._foreign
        self._primary_probe: Any = None
        self._primary_lsn: int | None = None
        #: (primary WAL position, when the monitor saw it), oldest first, for lag times.
        self._history: deque[tuple[int, float]] = deque(maxlen=10_000)
        self._monitor: gevent.Greenlet | None = None
        self.fallback_count = 0
        #: Replicas that qualify now (healthy, within max_lag); kept by the monitor.
        self._candidates: list[Replica] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the replica pools and start the monitor. Never switches."""
        for replica in self.replicas:
            if replica.pool.closed:
                replica.pool.open()
        self._monitor = gevent.spawn(self._run)

    def close(self, timeout: float) -> None:
        """Stop the monitor, close the probes and the replica pools. Switches."""
        if self._monitor is not None:
            self._monitor.kill(block=False)
            self._monitor = None
        for conn in (self._primary_probe, *(r.probe for r in self.replicas)):
            if conn is not None:
                self._primary._driver.close(conn)
        self._primary_probe = None
        for replica in self.replicas:
            replica.probe = None
            replica.pool.close(timeout)

    # ------------------------------------------------------------------ borrowing

    def getconn(self, timeout: float | None, after: str | None = None) -> Any:
        """A connection from the best replica, or per the fallback. Switches."""
        if after is None:
            # The common case, kept short: the monitor keeps the qualifying replicas.
            candidates = self._candidates
            if candidates:
                replica: Replica = (
                    candidates[0] if len(candidates) == 1 else min(candidates, key=_share_in_use)
                )
                pool = replica.pool
                if pool._state == OPEN and pool._connector.failing_since is None:
                    try:
                        conn = pool.getconn(timeout)
                    except PoolTimeout:
                        if self.fallback == "fail":
                            raise
                        # Saturated for the borrower's whole timeout: the primary may
                        # serve at once, but the borrower must not wait a second time.
                        return self._fallback(0.0, None)
                    self._lent[id(conn)] = pool
                    return conn
            return self._fallback(timeout, None)
        limit = self._primary.settings.timeout if timeout is None else seconds("timeout", timeout)
        deadline = monotonic() + limit
        if not isinstance(after, str) or not after:
            raise TypeError(f"after: expected a commit token (str), got {after!r}")
        try:
            wanted = parse_lsn(after)
        except ValueError as ex:
            raise ValueError(f"after: {ex}") from None
        while True:
            chosen = self._choose(wanted)
            if chosen is not None:
                try:
                    conn = chosen.pool.getconn(max(0.0, deadline - monotonic()))
                except PoolTimeout:
                    pass  # that replica is saturated: the primary may still serve
                else:
                    if wanted is None or self._caught_up(chosen, conn, wanted):
                        self._lent[id(conn)] = chosen.pool
                        return conn
                    chosen.pool.putconn(conn)
            if monotonic() + 0.02 < deadline and self._may_catch_up():
                gevent.sleep(0.01)  # bounded wait for a replica to replay the commit
                continue
            break
        return self._fallback(timeout, deadline)

    def _fallback(self, timeout: float | None, deadline: float | None) -> Any:
        if self.fallback == "fail":
            raise PoolTimeout(
                f"pool {self._primary.name!r}: no healthy replica within max_replica_lag "
                f"{self.max_lag:g} s (replica_fallback='fail')"
            )
        self.fallback_count += 1
        if deadline is not None:
            timeout = max(0.0, deadline - monotonic())
        return self._primary.getconn(timeout)

    def _choose(self, wanted: int | None) -> Replica | None:
        now = monotonic()
        best: Replica | None = None
        best_load = 2.0
        for replica in self.replicas:
            if not replica.healthy or replica.down_until > now or replica.pool.closed:
                continue
            if replica.lag is None or replica.lag > self.max_lag:
                continue
            if replica.pool._connector.failing_since is not None:
                continue
            if wanted is not None and (replica.replay_lsn or 0) < wanted:
                continue
            load = _share_in_use(replica)
            if load < best_load:
                best, best_load = replica, load
        return best

    def _may_catch_up(self) -> bool:
        return any(r.healthy and r.lag is not None for r in self.replicas)

    def _caught_up(self, replica: Replica, conn: Any, wanted: int) -> bool:
        driver = replica.pool._driver
        try:
            rows = driver.query(conn, "SELECT pg_last_wal_replay_lsn()::text")
        except Exception:
            return False
        replayed = parse_lsn(rows[0][0]) if rows else None
        if replayed is not None:
            replica.replay_lsn = max(replica.replay_lsn or 0, replayed)
        return replayed is not None and replayed >= wanted

    def commit_token(self, conn: Any) -> str:
        """After a commit on the primary: the WAL position a replica must have replayed
        to show it (pass it as ``after=``). One round trip. Switches."""
        rows = self._primary._driver.query(conn, TOKEN_SQL)
        return str(rows[0][0])

    # ------------------------------------------------------------------ the monitor

    def _run(self) -> None:
        while True:
            try:
                self.measure()
            except Exception:
                logger.exception("pool %r: replica monitor error (continuing)", self._primary.name)
            gevent.sleep(self.check_period)

    def measure(self) -> None:
        """Measure the primary's WAL position and every replica's lag now. Switches."""
        bound = self._primary.settings.ping_timeout
        try:
            with gevent.Timeout(bound):
                if self._primary_probe is None or self._primary_probe.closed:
                    self._primary_probe = self._dedicated(self._primary)
                rows = self._primary._driver.query(self._primary_probe, _PRIMARY_SQL)
            self._primary_lsn = parse_lsn(rows[0][0])
            history = self._history
            if self._primary_lsn is not None and (
                not history or self._primary_lsn > history[-1][0]
            ):
                history.append((self._primary_lsn, monotonic()))
        except BaseException as ex:
            if not isinstance(ex, (Exception, gevent.Timeout)):
                raise
            self._primary_lsn = None  # lag unknown: judge replicas by replay time alone
            self._drop_probe_primary()
            self._history.clear()
        for replica in self.replicas:
            if replica.down_until <= monotonic():
                self._measure_replica(replica, bound)
        self._candidates = [
            r
            for r in self.replicas
            if r.healthy and r.lag is not None and r.lag <= self.max_lag
        ]
        replayed = [r.replay_lsn for r in self.replicas if r.replay_lsn is not None]
        if replayed and len(replayed) == len(self.replicas):
            oldest = min(replayed)  # samples every replica has replayed are not needed
            while len(self._history) > 1 and self._history[1][0] <= oldest:
                self._history.popleft()

    def _measure_replica(self, replica: Replica, bound: float) -> None:
        try:
            with gevent.Timeout(bound):
                if replica.probe is None or replica.probe.closed:
                    replica.probe = self._dedicated(replica.pool)
                rows = replica.pool._driver.query(replica.probe, _REPLICA_SQL)
        except BaseException as ex:
            if not isinstance(ex, (Exception, gevent.Timeout)):
                raise
            self._mark_down(replica, ex)
            return
        in_recovery, replay, age = rows[0]
        replica.replay_lsn = parse_lsn(replay)
        if not in_recovery:
            replica.lag = 0.0  # promoted: it is a primary now, never behind itself
        elif (
            self._primary_lsn is not None
            and replica.replay_lsn is not None
            and replica.replay_lsn >= self._primary_lsn
        ):
            replica.lag = 0.0
        elif self._primary_lsn is not None and replica.replay_lsn is not None:
            replica.lag = self._behind_for(replica.replay_lsn)
        else:
            replica.lag = float(age) if age is not None else None
        if not replica.healthy:
            logger.info("pool %r: replica %r is up", self._primary.name, replica.pool.name)
        replica.healthy = True
        replica.down_for = 0.0
        replica.last_error = None

    def _behind_for(self, replayed: int) -> float:
        """Seconds since the monitor first saw the primary past ``replayed``."""
        now = monotonic()
        for lsn, seen in self._history:
            if lsn > replayed:
                return now - seen
        return 0.0

    def _mark_down(self, replica: Replica, ex: BaseException) -> None:
        if replica.probe is not None:
            replica.pool._driver.close(replica.probe)
            replica.probe = None
        replica.down_for = min(_DOWN_MAX, replica.down_for * 2 or _DOWN_MIN)
        replica.down_until = monotonic() + replica.down_for
        if replica in self._candidates:
            self._candidates = [r for r in self._candidates if r is not replica]
        replica.last_error = replica.pool.target.redact(describe_error(ex))
        if replica.healthy:
            logger.warning(
                "pool %r: replica %r is down (probing again in %.0f s): %s",
                self._primary.name,
                replica.pool.name,
                replica.down_for,
                replica.last_error,
            )
        replica.healthy = False

    def _drop_probe_primary(self) -> None:
        if self._primary_probe is not None:
            self._primary._driver.close(self._primary_probe)
            self._primary_probe = None

    @staticmethod
    def _dedicated(pool: GreenPool[Any]) -> Any:
        conn = pool.connect_dedicated()
        conn.autocommit = True
        return conn

    # ------------------------------------------------------------------ stats

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {
                "name": r.pool.name,
                "healthy": r.healthy and r.down_until <= monotonic(),
                "lag_seconds": r.lag,
                "served": r.pool.acquire_count,
                "last_error": r.last_error,
                "acquired": r.pool.acquired_count(),
                "max_size": r.pool.settings.max_size,
            }
            for r in self.replicas
        ]


def replica_specs(replicas: Any) -> list[tuple[str, dict[str, Any]]]:
    """``replicas=`` as (conninfo, settings) pairs; ValueError for anything else."""
    if replicas is None:
        return []
    if isinstance(replicas, (str, Mapping)):
        raise ValueError("replicas: expected a list of conninfos (or dicts with 'conninfo')")
    specs: list[tuple[str, dict[str, Any]]] = []
    for item in replicas:
        if isinstance(item, str):
            specs.append((item, {}))
        elif isinstance(item, Mapping) and isinstance(item.get("conninfo"), str):
            settings = {k: v for k, v in item.items() if k != "conninfo"}
            specs.append((item["conninfo"], settings))
        else:
            raise ValueError("replicas: each replica is a conninfo or a dict with 'conninfo'")
    return specs
