"""greenpool.hosts.host_attempts without a server: how a multi-host conninfo is split into
one bounded attempt per host, in libpq's order (see
https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-MULTIPLE-HOSTS), and
how the connector walks those attempts under one overall deadline."""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from typing import Any, cast

import pytest
from psycopg.conninfo import conninfo_to_dict

from greenpool import connector as connector_module
from greenpool.connector import Connector
from greenpool.conninfo import make_target, split_conninfo
from greenpool.hosts import DEFAULT_ATTEMPT_TIMEOUT, Attempt, HostTable, host_attempts


def libpq_view(attempt: Attempt) -> dict[str, Any]:
    """What libpq would read from one attempt's conninfo."""
    return dict(conninfo_to_dict(attempt.conninfo))


def test_a_single_host_needs_no_split() -> None:
    assert host_attempts({"host": "db", "port": "5432"}, None) is None
    assert host_attempts({"hostaddr": "10.0.0.1"}, 5.0) is None
    assert host_attempts({}, None) is None


def test_each_host_gets_the_default_bound_when_connect_timeout_is_unset() -> None:
    # libpq waits indefinitely when connect_timeout is unset (psycopg 3: 130 s per host);
    # greenpool gives each host a short bound of its own instead.
    assert DEFAULT_ATTEMPT_TIMEOUT == 3.0
    attempts = host_attempts({"host": "a,b,c", "dbname": "app"}, None)
    assert attempts is not None
    assert [a.timeout for a in attempts] == [DEFAULT_ATTEMPT_TIMEOUT] * 3
    assert [libpq_view(a) for a in attempts] == [
        {"host": h, "dbname": "app"} for h in ("a", "b", "c")
    ]
    # Through make_target: no connect_timeout, so the pool's own setting is left alone.
    target, settings = make_target("host=a,b,c dbname=app", {}, "app")
    assert target.attempts is not None
    assert [libpq_view(a) for a in target.attempts] == [libpq_view(a) for a in attempts]
    assert [a.timeout for a in target.attempts] == [DEFAULT_ATTEMPT_TIMEOUT] * 3
    assert "connect_timeout" not in settings


@pytest.mark.parametrize(
    ("conninfo", "kwargs"),
    [
        ("host=a,b dbname=app connect_timeout=4", {}),
        ("host=a,b dbname=app", {"connect_timeout": 4}),
    ],
)
def test_connect_timeout_bounds_each_host_and_the_pool_all_of_them(
    conninfo: str, kwargs: dict[str, Any]
) -> None:
    # libpq: "This timeout applies separately to each host name or IP address".
    target, settings = make_target(conninfo, kwargs, "app")
    assert target.attempts is not None
    assert [a.timeout for a in target.attempts] == [4.0, 4.0]
    assert settings["connect_timeout"] == 8.0  # two hosts, 4 s each


def test_one_port_applies_to_every_host() -> None:
    attempts = host_attempts({"host": "a,b,c", "port": "6432"}, None)
    assert attempts is not None
    assert [a.host for a in attempts] == ["a:6432", "b:6432", "c:6432"]
    assert [libpq_view(a)["port"] for a in attempts] == ["6432"] * 3


def test_one_port_per_host_pairs_up_in_order() -> None:
    attempts = host_attempts({"host": "a,b", "port": "5432,5433"}, None)
    assert attempts is not None
    assert [a.host for a in attempts] == ["a:5432", "b:5433"]


def test_hostaddr_pairs_with_host_and_may_stand_alone() -> None:
    attempts = host_attempts({"host": "a,b", "hostaddr": "10.0.0.1,10.0.0.2"}, None)
    assert attempts is not None
    assert [libpq_view(a) for a in attempts] == [
        {"host": "a", "hostaddr": "10.0.0.1"},
        {"host": "b", "hostaddr": "10.0.0.2"},
    ]
    assert [a.host for a in attempts] == ["a:", "b:"]  # labelled by host name, no port
    attempts = host_attempts({"hostaddr": "10.0.0.1,10.0.0.2", "port": "5433"}, None)
    assert attempts is not None
    assert [a.host for a in attempts] == ["10.0.0.1:5433", "10.0.0.2:5433"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"host": "a,b,c", "hostaddr": "10.0.0.1,10.0.0.2"},
            "conninfo: hostaddr lists a different number of hosts than host",
        ),
        (
            {"host": "a,b", "hostaddr": "10.0.0.1,10.0.0.2,10.0.0.3"},
            "conninfo: hostaddr lists a different number of hosts than host",
        ),
        (
            {"host": "a,b,c", "port": "5432,5433"},
            "conninfo: port lists a different number of ports than hosts",
        ),
        (
            {"hostaddr": "10.0.0.1,10.0.0.2", "port": "1,2,3"},
            "conninfo: port lists a different number of ports than hosts",
        ),
        (  # one host, two addresses: libpq refuses it when connecting
            {"host": "a", "hostaddr": "10.0.0.1,10.0.0.2"},
            "conninfo: hostaddr lists a different number of hosts than host",
        ),
        (
            {"host": "a", "port": "5432,5433"},
            "conninfo: port lists a different number of ports than hosts",
        ),
    ],
)
def test_lists_that_do_not_line_up_are_refused(params: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        host_attempts(params, None)
    assert str(info.value) == message
    # The same message when a pool is configured (make_target runs at GreenPool()).
    conninfo = " ".join(f"{k}={v}" for k, v in params.items())
    with pytest.raises(ValueError, match=message):
        make_target(conninfo, {}, "app")


def test_prefer_standby_looks_for_a_standby_on_every_host_then_takes_any() -> None:
    # libpq: "first try to find a standby server, but if none of the listed hosts is a
    # standby server, try again in any mode".
    attempts = host_attempts(
        {"host": "a,b", "port": "5432,5433", "target_session_attrs": "prefer-standby"}, 2.0
    )
    assert attempts is not None
    assert [(a.host, libpq_view(a)["target_session_attrs"]) for a in attempts] == [
        ("a:5432", "standby"),
        ("b:5433", "standby"),
        ("a:5432", "any"),
        ("b:5433", "any"),
    ]
    assert [a.timeout for a in attempts] == [2.0] * 4


@pytest.mark.parametrize("attrs", ["read-write", "primary", "standby", "any", "read-only"])
def test_other_target_session_attrs_reach_each_attempt_in_one_pass(attrs: str) -> None:
    attempts = host_attempts({"host": "a,b", "target_session_attrs": attrs}, None)
    assert attempts is not None
    assert [(a.host, libpq_view(a)["target_session_attrs"]) for a in attempts] == [
        ("a:", attrs),
        ("b:", attrs),
    ]


def test_load_balance_hosts_random_shuffles_the_hosts_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shuffled: list[list[str]] = []

    def reverse(items: list[dict[str, str]]) -> None:
        shuffled.append([s["host"] for s in items])
        items.reverse()

    monkeypatch.setattr(random, "shuffle", reverse)
    params = {"host": "a,b,c", "load_balance_hosts": "random"}
    attempts = host_attempts(params, None)
    assert attempts is not None
    assert shuffled == [["a", "b", "c"]]
    assert [a.host for a in attempts] == ["c:", "b:", "a:"]
    # The keyword is greenpool's business: no single-host attempt carries it to libpq.
    assert all("load_balance_hosts" not in libpq_view(a) for a in attempts)
    # prefer-standby: both passes walk the same shuffled order (libpq shuffles once).
    attempts = host_attempts({**params, "target_session_attrs": "prefer-standby"}, None)
    assert attempts is not None
    assert [a.host for a in attempts] == ["c:", "b:", "a:", "c:", "b:", "a:"]
    assert len(shuffled) == 2


def test_load_balance_hosts_random_tries_every_host_once_in_some_order() -> None:
    orders = set()
    for _ in range(50):
        attempts = host_attempts({"host": "a,b,c", "load_balance_hosts": "random"}, None)
        assert attempts is not None
        order = tuple(a.host for a in attempts)
        assert sorted(order) == ["a:", "b:", "c:"]
        orders.add(order)
    assert len(orders) > 1


def test_load_balance_hosts_disable_keeps_the_written_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(items: list[Any]) -> None:
        raise AssertionError("shuffled without load_balance_hosts=random")

    monkeypatch.setattr(random, "shuffle", refuse)
    attempts = host_attempts({"host": "a,b,c", "load_balance_hosts": "disable"}, None)
    assert attempts is not None
    assert [a.host for a in attempts] == ["a:", "b:", "c:"]
    assert all("load_balance_hosts" not in libpq_view(a) for a in attempts)


@pytest.mark.parametrize(
    ("keyvalue", "url"),
    [
        (
            "host=a,b port=5432,5433 dbname=app user=web password=pw "
            "target_session_attrs=read-write",
            "postgresql://web:pw@a:5432,b:5433/app?target_session_attrs=read-write",
        ),
        (
            "host=a,b port=6432 dbname=app target_session_attrs=prefer-standby",
            "postgresql://a,b/app?port=6432&target_session_attrs=prefer-standby",
        ),
        (
            "host=a,b port=5432,5433 dbname=app pool_max_conns=3",
            "postgresql://a:5432,b:5433/app?pool_max_conns=3",
        ),
    ],
)
def test_keyvalue_and_url_forms_give_the_same_attempts(keyvalue: str, url: str) -> None:
    from_keyvalue = host_attempts(split_conninfo(keyvalue).params, None)
    from_url = host_attempts(split_conninfo(url).params, None)
    assert from_keyvalue is not None
    assert from_url is not None
    assert [libpq_view(a) for a in from_keyvalue] == [libpq_view(a) for a in from_url]
    assert [(a.host, a.timeout) for a in from_keyvalue] == [(a.host, a.timeout) for a in from_url]
    kv_target, kv_settings = make_target(keyvalue, {}, "app")
    url_target, url_settings = make_target(url, {}, "app")
    assert kv_target.attempts == from_keyvalue
    assert url_target.attempts == from_url
    assert kv_settings == url_settings
    assert kv_target.attempt_kwargs == url_target.attempt_kwargs == {"application_name": "app"}


def test_a_url_port_belongs_to_the_host_before_it() -> None:
    # libpq's URL syntax: "a,b:6432" gives a the default port and b 6432 (not one port for
    # both, as "host=a,b port=6432" does); the empty port reaches libpq as such.
    attempts = host_attempts(split_conninfo("postgresql://a,b:6432/app").params, None)
    assert attempts is not None
    assert [a.host for a in attempts] == ["a:", "b:6432"]
    assert [libpq_view(a).get("port") for a in attempts] == ["", "6432"]


def test_connect_keywords_for_the_hosts_are_split_too() -> None:
    target, _ = make_target(
        "dbname=app",
        {"host": "a,b", "port": 5433, "target_session_attrs": "read-write", "sslmode": "disable"},
        "app",
    )
    assert target.attempts is not None
    assert [libpq_view(a) for a in target.attempts] == [
        {"dbname": "app", "host": h, "port": "5433", "target_session_attrs": "read-write"}
        for h in ("a", "b")
    ]
    # Host keywords live in each attempt's conninfo; the rest stay connect keywords.
    assert target.attempt_kwargs == {"sslmode": "disable", "application_name": "app"}
    assert target.target_session_attrs == "read-write"


@pytest.mark.parametrize("value", ["0", "-5", " 0 "])
def test_connect_timeout_zero_or_negative_means_no_bound_of_its_own_as_in_libpq(
    value: str,
) -> None:
    """libpq: zero or negative waits indefinitely. Per host that is no bound of its own;
    the pool's connect_timeout (10 s unless set) still bounds the whole connect."""
    target, settings = make_target(f"host=a,b dbname=app connect_timeout={value}", {}, "app")
    assert target.attempts is not None
    assert all(a.timeout == math.inf for a in target.attempts)
    assert "connect_timeout" not in settings  # the pool's own bound stays in force
    _, settings = make_target(f"host=a dbname=app connect_timeout={value}", {}, "app")
    assert "connect_timeout" not in settings


def test_connect_timeout_of_one_second_is_two_as_in_libpq() -> None:
    target, settings = make_target("host=a,b dbname=app connect_timeout=1", {}, "app")
    assert target.attempts is not None
    assert [a.timeout for a in target.attempts] == [2.0, 2.0]
    assert settings["connect_timeout"] == 4.0


@pytest.mark.parametrize("value", ["5s", "2.5", "1e3", "soon", "²", "9" * 30])
def test_connect_timeout_that_libpq_would_refuse_is_refused_at_once(value: str) -> None:
    with pytest.raises(ValueError, match="connect_timeout: libpq reads a whole number"):
        make_target("host=a,b dbname=app", {"connect_timeout": value}, "app")


# ---------------------------------------------------------------------------- the walk


class FakeDriver:
    """Records each connect; the hosts listed in ``refuse`` fail at once, those in
    ``black_hole`` use up their whole bound on the fake clock first."""

    def __init__(
        self, refuse: Collection[str], black_hole: Collection[str], clock: list[float]
    ) -> None:
        self.refuse = refuse
        self.black_hole = black_hole
        self.clock = clock
        self.calls: list[tuple[str, float]] = []

    def connect(self, conninfo: str, kwargs: dict[str, Any], timeout: float) -> str:
        host = str(conninfo_to_dict(conninfo)["host"])
        self.calls.append((host, timeout))
        if host in self.black_hole:
            self.clock[0] += timeout
            raise TimeoutError(f"connect timed out after {timeout:g} s")
        if host in self.refuse:
            raise ConnectionRefusedError(f"{host} refused")
        return f"conn to {host}"


class FakeConnector:
    def __init__(self, driver: FakeDriver) -> None:
        self._driver = driver
        self.hosts = HostTable(None)


def walk(
    monkeypatch: pytest.MonkeyPatch,
    attempts: list[Attempt],
    timeout: float,
    refuse: Collection[str] = (),
    black_hole: Collection[str] = (),
) -> tuple[Any, FakeConnector]:
    clock = [1000.0]
    monkeypatch.setattr(connector_module, "monotonic", lambda: clock[0])
    connector = FakeConnector(FakeDriver(refuse, black_hole, clock))
    conn = Connector._try_hosts(cast(Connector, connector), attempts, {}, timeout)
    return conn, connector


def test_the_walk_stops_at_the_first_host_that_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = host_attempts({"host": "a,b,c"}, 1.5)
    assert attempts is not None
    conn, connector = walk(monkeypatch, attempts, 10.0, refuse={"a"})
    assert conn == "conn to b"
    assert connector._driver.calls == [("a", 1.5), ("b", 1.5)]  # each within its own bound
    assert connector.hosts.snapshot({})["a:"]["connect_errors"] == 1
    assert "b:" not in connector.hosts.hosts


def test_the_walk_is_bounded_by_the_overall_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = host_attempts({"host": "a,b,c", "port": "1"}, 1.5)
    assert attempts is not None
    with pytest.raises(ConnectionError) as info:
        walk(monkeypatch, attempts, 2.0, black_hole={"a", "b", "c"})
    # a gets its 1.5 s, b what is left of the 2 s, c is never tried.
    assert str(info.value) == (
        "no host accepted the connection: a:1: TimeoutError: connect timed out after 1.5 s; "
        "b:1: TimeoutError: connect timed out after 0.5 s; "
        "c:1: not tried (connect_timeout reached)"
    )
