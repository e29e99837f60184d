"""Several hosts: one bounded attempt per host, and what the pool learns about each host.

libpq reads ``host=h1,h2 port=5432,5433`` (or ``postgresql://h1:5432,h2:5433/db``) as a
list of servers to try in order, keeping the first that accepts and satisfies
``target_session_attrs``. Under gevent that is not bounded: psycopg 3 gives every host
the whole ``connect_timeout`` (130 s when unset) and psycopg2 in asynchronous mode
ignores it, so a black-holed first host hangs the connect. :func:`host_attempts` splits
the list the way libpq does (``hostaddr`` pairs, one port for all or one per host,
``load_balance_hosts=random``, the two passes of ``prefer-standby``) so that the driver
adapter gives each host its own bound and the pool's ``connect_timeout`` bounds them all.

:class:`HostTable` keeps, per ``host:port``, the connections, connect errors, connections
found broken, the role the pool last saw (primary, read-only), and when it changed. A
pool that asked for a read-write server (``target_session_attrs=read-write`` or
``primary``) never lends a connection to a host it has learned is read-only (a demoted
primary that still answers, or ``default_transaction_read_only`` switched on): it evicts
all of them and reconnects.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Per-host bound when the conninfo sets no ``connect_timeout`` (libpq's is per host).
DEFAULT_ATTEMPT_TIMEOUT = 3.0
#: target_session_attrs values that mean "a server that accepts writes".
WRITABLE = frozenset({"read-write", "primary"})
#: The SQLSTATE a write on a read-only server gets (read_only_sql_transaction).
READ_ONLY_SQLSTATE = "25006"


@dataclass(frozen=True)
class Attempt:
    """One host to try: the conninfo for it alone, and its time bound."""

    conninfo: str
    timeout: float
    host: str  # "host:port", for messages and the host table


def _split(value: str | None) -> list[str] | None:
    return None if value is None else value.split(",")


def host_attempts(params: Mapping[str, str], timeout: float | None) -> list[Attempt] | None:
    """The attempts libpq would make for ``params`` (libpq's parse of a conninfo, connect
    keywords merged), or None when there is a single host (nothing to split).

    Raises ValueError when the lists do not line up (libpq would refuse them too).
    """
    hosts = _split(params.get("host"))
    addrs = _split(params.get("hostaddr"))
    count = len(hosts) if hosts is not None else (len(addrs) if addrs is not None else 1)
    if addrs is not None and len(addrs) != count:
        raise ValueError("conninfo: hostaddr lists a different number of hosts than host")
    ports = _split(params.get("port"))
    if ports is not None and len(ports) not in (1, count):
        raise ValueError("conninfo: port lists a different number of ports than hosts")
    if count <= 1:
        return None
    from psycopg.conninfo import make_conninfo

    per_host = timeout if timeout is not None else DEFAULT_ATTEMPT_TIMEOUT
    singles: list[dict[str, str]] = []
    for i in range(count):
        single = dict(params)
        if hosts is not None:
            single["host"] = hosts[i]
        if addrs is not None:
            single["hostaddr"] = addrs[i]
        if ports is not None:
            single["port"] = ports[i] if len(ports) > 1 else ports[0]
        singles.append(single)
    if params.get("load_balance_hosts") == "random":
        random.shuffle(singles)
    passes = [singles]
    if params.get("target_session_attrs") == "prefer-standby":
        # libpq: first look for a standby on every host, then take any.
        passes = [
            [{**s, "target_session_attrs": "standby"} for s in singles],
            [{**s, "target_session_attrs": "any"} for s in singles],
        ]
    attempts = []
    for group in passes:
        for single in group:
            single.pop("load_balance_hosts", None)
            label = f"{single.get('host') or single.get('hostaddr', '')}:{single.get('port', '')}"
            attempts.append(Attempt(make_conninfo("", **single), per_host, label))
    return attempts


@dataclass
class HostState:
    """What the pool knows about one server."""

    connect_errors: int = 0
    broken_connections: int = 0  # found dead (check, cleaning, given back broken)
    role: str = "unknown"  # "primary", "read-only" or "unknown"
    last_role_change: float | None = None  # time.time() of the last change seen


class HostTable:
    """Per-host figures and roles of one pool. Never switches."""

    def __init__(self, target_session_attrs: str | None) -> None:
        self.wants_writable = target_session_attrs in WRITABLE
        self.hosts: dict[str, HostState] = {}

    def _get(self, host: str) -> HostState:
        state = self.hosts.get(host)
        if state is None:
            state = self.hosts[host] = HostState()
        return state

    def role(self, host: str) -> str:
        state = self.hosts.get(host)
        return state.role if state is not None else "unknown"

    def connect_failed(self, host: str) -> None:
        self._get(host).connect_errors += 1

    def connection_broken(self, host: str) -> None:
        self._get(host).broken_connections += 1

    def saw_role(self, host: str, read_only: bool) -> bool:
        """Record the role seen on ``host``; True when it changed."""
        state = self._get(host)
        role = "read-only" if read_only else "primary"
        if state.role == role:
            return False
        changed = state.role != "unknown"
        state.role = role
        state.last_role_change = time.time()
        return changed

    def snapshot(self, connections: Mapping[str, int]) -> dict[str, dict[str, Any]]:
        """Per-host figures; ``connections`` counts the pool's open ones by host."""
        return {
            host: {
                "connections": connections.get(host, 0),
                "connect_errors": s.connect_errors,
                "broken_connections": s.broken_connections,
                "role": s.role,
                "last_role_change": s.last_role_change,
            }
            for host, s in self.hosts.items()
        }
