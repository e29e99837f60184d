"""Connection budget: will every pool of every worker of every instance fit the server?

Each gunicorn worker has its own pool, so at peak the server sees
``instances x workers x max_size`` connections from the app, plus whatever else connects
(migrations, cron jobs, psql, monitoring). Ordinary roles may use ``max_connections``
minus ``superuser_reserved_connections`` minus (PostgreSQL 16+) ``reserved_connections``.

The server is read from DATABASE_URL (or --conninfo, but a password there shows in ps).

Behind PgBouncer (``--pgbouncer`` names its admin console, or ``--max-client-conn`` and
``--default-pool-size`` give its settings) two budgets apply: the app's connections must
fit PgBouncer's ``max_client_conn`` (times ``--pgbouncer-instances``), and PgBouncer's
server connections (``default_pool_size + reserve_pool_size`` per instance, for the one
database/user pair) must fit the server.

With read replicas (``--replica`` names each, or ``$GREENPOOL_REPLICAS`` lists them) every
worker also keeps a pool per replica (``--replica-max-size``, by default ``--max-size``) and
the lag monitor keeps one connection to the primary and one to each replica: each replica
server gets its own budget, and the primary counts the monitor's connection too.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from greenpool import conninfo as _ci

LIMITS_SQL = (
    "SELECT current_setting('server_version'), "
    "current_setting('max_connections')::int, "
    "current_setting('superuser_reserved_connections')::int, "
    "coalesce(current_setting('reserved_connections', true)::int, 0), "
    "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int"
)


class BudgetError(Exception):
    """The server's limits could not be read (the message holds no secret)."""


@dataclass
class ServerLimits:
    """The connection limits of one PostgreSQL server."""

    max_connections: int
    superuser_reserved_connections: int = 3
    reserved_connections: int = 0
    server_version: str | None = None
    client_connections: int | None = None  # open right now, the asking one included
    target: str | None = None  # host/port/dbname/user, never a password

    @property
    def available(self) -> int:
        """Connections ordinary (non-superuser) roles may open."""
        return (
            self.max_connections - self.superuser_reserved_connections - self.reserved_connections
        )


@dataclass
class PgBouncerLimits:
    """The settings of the PgBouncer(s) between the app and the server."""

    max_client_conn: int
    default_pool_size: int
    reserve_pool_size: int = 0
    pool_mode: str | None = None
    instances: int = 1  # PgBouncer processes in front of the server

    @property
    def server_connections(self) -> int:
        """Server connections the PgBouncers can open for one database/user pair."""
        return (self.default_pool_size + self.reserve_pool_size) * self.instances

    @property
    def client_capacity(self) -> int:
        return self.max_client_conn * self.instances


@dataclass
class ReplicaServer:
    """A read replica: its limits and the max_size of each worker's pool for it."""

    limits: ServerLimits
    max_size: int


#: Connections the replica lag monitor keeps per worker: one to the primary, one to
#: each replica (greenpool.routing), outside the pools' max_size.
MONITOR_CONNECTIONS = 1


@dataclass
class Budget:
    """The app's peak demand against a server's limits (and PgBouncer's, if any)."""

    instances: int
    workers: int
    max_size: int
    reserved: int
    limits: ServerLimits
    pgbouncer: PgBouncerLimits | None = None
    replicas: list[ReplicaServer] = field(default_factory=list)

    @property
    def _monitor(self) -> int:
        return MONITOR_CONNECTIONS if self.replicas else 0

    @property
    def app_connections(self) -> int:
        """Connections the app can open to the primary (or PgBouncer) at peak."""
        return self.instances * self.workers * (self.max_size + self._monitor)

    def replica_connections(self, replica: ReplicaServer) -> int:
        """Connections the app can open to one replica at peak."""
        return self.instances * self.workers * (replica.max_size + MONITOR_CONNECTIONS)

    @property
    def total_connections(self) -> int:
        """Connections the app can open at peak, to every server."""
        return self.app_connections + sum(self.replica_connections(r) for r in self.replicas)

    @property
    def needed(self) -> int:
        """Server connections needed at peak, those kept for other clients included: the
        app's own, or PgBouncer's server pool when PgBouncer is in front."""
        direct = (
            self.pgbouncer.server_connections
            if self.pgbouncer is not None
            else self.app_connections
        )
        return direct + self.reserved

    @property
    def spare(self) -> int:
        """Connections left over at peak (negative: over budget)."""
        return self.limits.available - self.needed

    @property
    def client_spare(self) -> int | None:
        """PgBouncer client slots left over at peak (None without PgBouncer)."""
        if self.pgbouncer is None:
            return None
        return self.pgbouncer.client_capacity - self.app_connections

    @property
    def fits(self) -> bool:
        """Whether the peak demand fits (the server, PgBouncer's clients, every replica)."""
        if self.client_spare is not None and self.client_spare < 0:
            return False
        return self.spare >= 0 and all(self.replica_spare(r) >= 0 for r in self.replicas)

    def replica_spare(self, replica: ReplicaServer) -> int:
        """Connections left over on one replica at peak (negative: over budget)."""
        return replica.limits.available - self.replica_connections(replica)

    def max_size_that_fits(self) -> int:
        """The largest per-worker max_size that would fit (0 if none)."""
        per_size = self.instances * self.workers
        if self.pgbouncer is not None:
            return max(0, self.pgbouncer.client_capacity // per_size - self._monitor)
        return max(0, (self.limits.available - self.reserved) // per_size - self._monitor)

    def replica_max_size_that_fits(self, replica: ReplicaServer) -> int:
        """The largest per-worker max_size for this replica's pools that would fit."""
        per_size = self.instances * self.workers
        return max(0, replica.limits.available // per_size - MONITOR_CONNECTIONS)

    def explain(self) -> str:
        """The verdict with its arithmetic, for people."""
        lim = self.limits
        width = 48
        lines = []
        if lim.server_version or lim.target:
            lines.append(f"PostgreSQL {lim.server_version or '?'} ({lim.target or 'given limits'})")
        lines += [
            f"  {'max_connections':<{width}}{lim.max_connections:>6}",
            f"- {'superuser_reserved_connections':<{width}}{lim.superuser_reserved_connections:>6}",
            f"- {'reserved_connections':<{width}}{lim.reserved_connections:>6}",
            f"= {'available to ordinary roles':<{width}}{lim.available:>6}",
            "",
        ]
        bouncer = self.pgbouncer
        if bouncer is not None:
            server_pool = (
                f"PgBouncer: ({bouncer.default_pool_size} + {bouncer.reserve_pool_size}) "
                f"x {bouncer.instances}"
            )
            lines += [
                f"  {self._product():<{width}}{self.app_connections:>6}",
                f"  {'PgBouncer max_client_conn x instances':<{width}}{bouncer.client_capacity:>6}",
                f"  {'clients: ' + ('fit' if (self.client_spare or 0) >= 0 else 'do NOT fit')}",
                "",
                f"  {server_pool:<{width}}{bouncer.server_connections:>6}",
            ]
        else:
            lines.append(f"  {self._product():<{width}}{self.app_connections:>6}")
        lines += [
            f"+ {'reserved for other clients (--reserved)':<{width}}{self.reserved:>6}",
            f"= {'needed at peak':<{width}}{self.needed:>6}",
            "",
        ]
        if bouncer is not None and (self.client_spare or 0) < 0:
            lines.append(
                f"no: {self.app_connections} app connections > PgBouncer's "
                f"{bouncer.client_capacity} client slots; raise max_client_conn or use "
                f"max_size {self.max_size_that_fits()}"
            )
        elif self.fits:
            lines.append(
                f"yes: {self.needed} <= {lim.available}, {self.spare} connection(s) to spare"
            )
        else:
            lines.append(
                f"no: {self.needed} > {lim.available}, {-self.spare} connection(s) short; "
                f"max_size {self.max_size_that_fits()} would fit, or put PgBouncer in front"
            )
        if lim.client_connections is not None:
            lines.append(f"(right now {lim.client_connections} client connection(s) are open)")
        for i, replica in enumerate(self.replicas):
            lines += ["", *self._explain_replica(i, replica)]
        if self.replicas:
            lines += [
                "",
                f"all servers: {self.total_connections} app connection(s) at peak; "
                + ("every server fits" if self.fits else "NOT every server fits"),
            ]
        return "\n".join(lines)

    def _explain_replica(self, index: int, replica: ReplicaServer) -> list[str]:
        lim, width = replica.limits, 48
        needed, spare = self.replica_connections(replica), self.replica_spare(replica)
        product = (
            f"{self.instances} instance(s) x {self.workers} worker(s) x "
            f"({replica.max_size} max_size + {MONITOR_CONNECTIONS} lag probe)"
        )
        lines = [
            f"replica {index}: PostgreSQL {lim.server_version or '?'} "
            f"({lim.target or 'given limits'})",
            f"  {'available to ordinary roles':<{width}}{lim.available:>6}",
            f"  {product:<{width}}{needed:>6}",
        ]
        if spare >= 0:
            lines.append(f"yes: {needed} <= {lim.available}, {spare} connection(s) to spare")
        else:
            lines.append(
                f"no: {needed} > {lim.available}, {-spare} connection(s) short; replica "
                f"max_size {self.replica_max_size_that_fits(replica)} would fit"
            )
        return lines

    def _product(self) -> str:
        pools = f"{self.max_size} max_size"
        if self._monitor:
            pools = f"({pools} + {self._monitor} lag probe)"
        return f"{self.instances} instance(s) x {self.workers} worker(s) x {pools}"

    def as_dict(self) -> dict[str, Any]:
        """The verdict and its inputs, for machines."""
        return {
            "fits": self.fits,
            "needed": self.needed,
            "available": self.limits.available,
            "spare": self.spare,
            "app_connections": self.app_connections,
            "max_size_that_fits": self.max_size_that_fits(),
            "instances": self.instances,
            "workers": self.workers,
            "max_size": self.max_size,
            "reserved": self.reserved,
            "limits": {**asdict(self.limits), "available": self.limits.available},
            "pgbouncer": (
                {
                    **asdict(self.pgbouncer),
                    "server_connections": self.pgbouncer.server_connections,
                    "client_spare": self.client_spare,
                }
                if self.pgbouncer is not None
                else None
            ),
            "total_connections": self.total_connections,
            "replicas": [
                {
                    "max_size": r.max_size,
                    "needed": self.replica_connections(r),
                    "spare": self.replica_spare(r),
                    "fits": self.replica_spare(r) >= 0,
                    "max_size_that_fits": self.replica_max_size_that_fits(r),
                    "limits": {**asdict(r.limits), "available": r.limits.available},
                }
                for r in self.replicas
            ],
        }


def _read_rows(
    conninfo: str, sql: str, timeout: float, failure: str, **connect: Any
) -> tuple[list[Any], dict[str, str]]:
    """Run ``sql`` on the server ``conninfo`` names; return its rows and libpq's reading
    of the conninfo. Raises BudgetError starting with ``failure`` (``{target}`` in it is
    the server, described without secrets), any password masked."""
    try:
        parsed = _ci.split_conninfo(conninfo)
    except ValueError as ex:
        raise BudgetError(str(ex)) from None
    redact = _ci.Redactor(_ci.secrets_of(conninfo, parsed.params, {}))
    import psycopg

    try:
        with psycopg.connect(
            parsed.conninfo, autocommit=True, connect_timeout=max(1, round(timeout)), **connect
        ) as conn:
            rows = conn.execute(sql).fetchall()
    except psycopg.Error as ex:
        text = str(ex).strip().replace("\n", " ")
        target = _ci.describe(parsed.params, {})
        raise BudgetError(redact(f"{failure.format(target=target)}: {text}")) from None
    return rows, parsed.params


def fetch_pgbouncer_limits(admin_conninfo: str, instances: int, timeout: float) -> PgBouncerLimits:
    """Read max_client_conn, default_pool_size, reserve_pool_size and pool_mode from a
    PgBouncer admin console (``dbname=pgbouncer``). Raises BudgetError without secrets."""
    rows, _ = _read_rows(
        admin_conninfo, "SHOW CONFIG", timeout, "cannot read PgBouncer's settings ({target})"
    )
    config = {str(r[0]): str(r[1]) for r in rows}
    try:
        return PgBouncerLimits(
            max_client_conn=int(config["max_client_conn"]),
            default_pool_size=int(config["default_pool_size"]),
            reserve_pool_size=int(config.get("reserve_pool_size", "0") or 0),
            pool_mode=config.get("pool_mode"),
            instances=instances,
        )
    except (KeyError, ValueError):
        raise BudgetError(
            "PgBouncer's SHOW CONFIG lacks max_client_conn/default_pool_size"
        ) from None


def fetch_limits(conninfo: str, timeout: float = 10.0) -> ServerLimits:
    """Read the connection limits of the server ``conninfo`` points at.

    Raises BudgetError, with any password masked, when it cannot connect.
    """
    rows, params = _read_rows(
        conninfo,
        LIMITS_SQL,
        timeout,
        "cannot read the server's limits",
        application_name="greenpool-budget",
    )
    row = rows[0]
    return ServerLimits(
        max_connections=row[1],
        superuser_reserved_connections=row[2],
        reserved_connections=row[3],
        server_version=row[0],
        client_connections=row[4],
        target=_ci.describe(params, {}),
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``greenpool budget``."""
    parser.add_argument(
        "--conninfo",
        help="server to ask instead of $DATABASE_URL (default: $DATABASE_URL, then libpq's "
        "PG* variables); prefer DATABASE_URL for a password: ps shows command lines",
    )
    parser.add_argument("--workers", type=_positive, required=True, help="workers per instance")
    parser.add_argument("--max-size", type=_positive, required=True, help="pool max_size")
    parser.add_argument("--instances", type=_positive, default=1, help="app instances (hosts)")
    parser.add_argument(
        "--reserved",
        type=_non_negative,
        default=0,
        help="connections to keep for other clients (migrations, cron, psql, monitoring)",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive,
        help="do not connect: use this max_connections (with --superuser-reserved)",
    )
    parser.add_argument("--superuser-reserved", type=_non_negative, default=3)
    parser.add_argument(
        "--pgbouncer",
        metavar="ADMIN_CONNINFO",
        help="PgBouncer's admin console (dbname=pgbouncer): also check its limits",
    )
    parser.add_argument("--max-client-conn", type=_positive, help="PgBouncer's max_client_conn")
    parser.add_argument(
        "--default-pool-size", type=_positive, help="PgBouncer's default_pool_size"
    )
    parser.add_argument("--reserve-pool-size", type=_non_negative, default=0)
    parser.add_argument(
        "--pgbouncer-instances", type=_positive, default=1, help="PgBouncers in front"
    )
    parser.add_argument(
        "--replica",
        action="append",
        metavar="CONNINFO",
        help="a read replica to ask (repeat for each; default: $GREENPOOL_REPLICAS, a JSON "
        "list of conninfos or of objects with 'conninfo' and 'max_size')",
    )
    parser.add_argument(
        "--replica-max-size",
        type=_positive,
        help="max_size of each worker's pool per replica (default: --max-size)",
    )
    parser.add_argument(
        "--replica-max-connections",
        action="append",
        type=_positive,
        metavar="N",
        help="do not connect: a replica with this max_connections (repeat for each)",
    )
    parser.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to connect")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _replica_specs(
    args: argparse.Namespace, environ: dict[str, str], default: int
) -> list[tuple[str, int]]:
    """(conninfo, max_size) of each replica: --replica, else $GREENPOOL_REPLICAS; a
    replica's max_size is ``default`` unless the environment gives its own."""
    if args.replica:
        return [(conninfo, default) for conninfo in args.replica]
    text = environ.get("GREENPOOL_REPLICAS", "").strip()
    if not text:
        return []
    try:
        listed = json.loads(text) if text.startswith("[") else [text]
    except ValueError as ex:
        raise BudgetError(f"GREENPOOL_REPLICAS: not a JSON list ({ex.args[0]})") from None
    specs = []
    for i, item in enumerate(listed):
        if isinstance(item, dict) and isinstance(item.get("conninfo"), str):
            size = item.get("max_size", default)
            if type(size) is not int or size < 1:
                raise BudgetError(f"GREENPOOL_REPLICAS[{i}].max_size: expected an int >= 1")
            specs.append((item["conninfo"], size))
        elif isinstance(item, str):
            specs.append((item, default))
        else:
            raise BudgetError(
                f"GREENPOOL_REPLICAS[{i}]: expected a conninfo or an object with 'conninfo'"
            )
    return specs


def _replica_servers(args: argparse.Namespace, environ: dict[str, str]) -> list[ReplicaServer]:
    """The replicas to count, their limits read from each (or given offline)."""
    size = args.replica_max_size or args.max_size
    if args.replica_max_connections:
        if args.replica:
            raise BudgetError("--replica and --replica-max-connections do not go together")
        return [
            ReplicaServer(ServerLimits(n, args.superuser_reserved), size)
            for n in args.replica_max_connections
        ]
    servers = []
    for i, (conninfo, max_size) in enumerate(_replica_specs(args, environ, size)):
        try:
            servers.append(ReplicaServer(fetch_limits(conninfo, args.timeout), max_size))
        except BudgetError as ex:
            raise BudgetError(f"replica {i}: {ex}") from None
    return servers


def run(args: argparse.Namespace, environ: dict[str, str]) -> int:
    """``greenpool budget``: print the verdict; 0 if it fits, 1 if not, 2 on error."""
    from greenpool.cli import warn_if_password

    warn_if_password("greenpool budget", args.conninfo)
    for conninfo in args.replica or ():
        warn_if_password("greenpool budget", conninfo, "--replica", "GREENPOOL_REPLICAS")
    if args.max_connections is not None:
        limits = ServerLimits(args.max_connections, args.superuser_reserved)
    else:
        conninfo = args.conninfo if args.conninfo is not None else environ.get("DATABASE_URL", "")
        try:
            limits = fetch_limits(conninfo, args.timeout)
        except BudgetError as ex:
            print(f"greenpool budget: {ex}")
            return 2
    bouncer: PgBouncerLimits | None = None
    if args.pgbouncer is not None:
        try:
            bouncer = fetch_pgbouncer_limits(
                args.pgbouncer, args.pgbouncer_instances, args.timeout
            )
        except BudgetError as ex:
            print(f"greenpool budget: {ex}")
            return 2
    elif args.max_client_conn is not None or args.default_pool_size is not None:
        if args.max_client_conn is None or args.default_pool_size is None:
            print("greenpool budget: --max-client-conn and --default-pool-size go together")
            return 2
        bouncer = PgBouncerLimits(
            args.max_client_conn,
            args.default_pool_size,
            args.reserve_pool_size,
            instances=args.pgbouncer_instances,
        )
    try:
        replicas = _replica_servers(args, environ)
    except BudgetError as ex:
        print(f"greenpool budget: {ex}")
        return 2
    budget = Budget(
        args.instances, args.workers, args.max_size, args.reserved, limits, bouncer, replicas
    )
    if args.json:
        print(json.dumps(budget.as_dict(), indent=2))
    else:
        print(budget.explain())
    return 0 if budget.fits else 1
