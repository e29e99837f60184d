"""Conninfo parsing, pool settings from the conninfo, validation and redaction."""

from __future__ import annotations

from typing import Any

import pytest

from greenpool import GreenPool
from greenpool.conninfo import Redactor, parse_duration, split_conninfo


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("1h30m", 5400), ("250ms", 0.25), ("1.5h", 5400), ("12", 12), ("0", 0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, name="x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "ten", "5 minutes", "1h30", "-1s", "1d"])
def test_bad_durations_name_the_parameter(text: str) -> None:
    with pytest.raises(ValueError, match="pool_max_conn_lifetime"):
        parse_duration(text, name="pool_max_conn_lifetime")


def test_pool_settings_are_stripped_from_keyvalue_and_url() -> None:
    kv = split_conninfo(
        "host=db port=5433 password='p w\\'x' pool_max_conns=7 pool_max_conn_lifetime=1h30m"
    )
    assert kv.pool_settings == {"max_size": 7, "max_lifetime": 5400.0}
    assert "pool_" not in kv.conninfo and kv.params["password"] == "p w'x"
    url = split_conninfo(
        "postgresql://u:s%40cret@db:5433/app?sslmode=require&pool_min_conns=2"
        "&pool_health_check_period=30s"
    )
    assert url.pool_settings == {"min_size": 2, "health_check_period": 30.0}
    assert url.conninfo == "postgresql://u:s%40cret@db:5433/app?sslmode=require"
    assert url.params["password"] == "s@cret" and url.params["dbname"] == "app"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"min_size": 5, "max_size": 2}, "min_size"),
        ({"min_size": -1}, "min_size"),
        ({"max_size": 0}, "max_size"),
        ({"max_size": 10**6}, "max_size"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"max_idle": -5}, "max_idle"),
        ({"max_lifetime": 0}, "max_lifetime"),
        ({"health_check_period": 10**12}, "health_check_period"),
        ({"max_waiting": 1.5}, "max_waiting"),
        ({"driver": "mysql"}, "driver"),
        ({"reset": "scrub"}, "reset"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_parameter(
    kwargs: dict[str, object], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        GreenPool("host=127.0.0.1", open=False, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("conninfo", "name"),
    [
        ("host=x pool_max_connections=3", "pool_max_connections"),
        ("host=x pool_max_conn_lifetime=soon", "pool_max_conn_lifetime"),
        ("host=x pool_max_conns=lots", "pool_max_conns"),
        ("host=x password", "parameter after 'host' has no '='"),
        ("mysql://x/y", "scheme"),
        ("host=x bogus_option=1", "conninfo"),
    ],
)
def test_bad_conninfo_is_refused_at_construction(conninfo: str, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        GreenPool(conninfo, open=False)


def test_password_never_in_repr_or_errors() -> None:
    secret = "hunter2-xyzzy"
    url = f"postgresql://app:{secret}@127.0.0.1:1/db"
    pool: GreenPool[Any] = GreenPool(url, open=False, name="p")
    assert secret not in repr(pool) and secret not in str(pool.stats())
    with pytest.raises(ValueError) as info:
        GreenPool(f"host=x password={secret} junk", open=False)
    assert secret not in str(info.value)
    kw: GreenPool[Any] = GreenPool("host=127.0.0.1", kwargs={"password": secret}, open=False)
    assert secret not in repr(kw)
    assert Redactor([secret])(f"failed for {secret}!") == "failed for ********!"


def test_connect_timeout_from_the_conninfo_is_enforced_by_the_pool() -> None:
    pool: GreenPool[Any] = GreenPool("host=127.0.0.1 connect_timeout=3", open=False)
    assert pool.settings.connect_timeout == 3.0
    explicit: GreenPool[Any] = GreenPool(
        "host=127.0.0.1 connect_timeout=3", connect_timeout=1, open=False
    )
    assert explicit.settings.connect_timeout == 1.0
    with pytest.raises(ValueError, match="connect_timeout"):
        GreenPool("host=127.0.0.1 connect_timeout=soon", open=False)
