"""Connection strings reach libpq exactly as libpq reads them, minus the pool_* keys.

The property tests build conninfos (key=value and URL) whose values hold what tripped the
old re-tokeniser: Unicode spaces (``\\x1c``-``\\x1f``, NBSP, U+2028, U+3000), quotes,
backslashes, ``=``, ``%``, ``+`` and ``&``; pool_* keys are mixed in. What greenpool hands
libpq must parse (by libpq itself) to exactly the non-pool parameters.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from greenpool.conninfo import Redactor, secrets_of, split_conninfo

TRICKY = "\x1c\x1d\x1e\x1f\x85\xa0\u2028\u3000 \t'\\=%+&?/@:,"
value_text = st.text(
    alphabet=st.sampled_from(list(TRICKY) + list("abcXYZ019_-.")), min_size=0, max_size=12
)
KEYS = ("dbname", "user", "application_name", "options", "sslrootcert", "password")
params_st = st.dictionaries(st.sampled_from(KEYS), value_text, min_size=1, max_size=5)
pool_st = st.dictionaries(
    st.sampled_from(["pool_max_conns", "pool_min_conns"]),
    st.integers(min_value=0, max_value=5).map(str),
    max_size=2,
)
space = st.text(alphabet=" \t\n", min_size=1, max_size=3)


@settings(max_examples=300, deadline=None)
@given(params=params_st, pools=pool_st, sep=space, pos=st.integers(0, 5))
def test_keyvalue_reaches_libpq_as_written(
    params: dict[str, str], pools: dict[str, str], sep: str, pos: int
) -> None:
    tokens = [make_conninfo("", **{k: v}) for k, v in params.items()]
    pool_tokens = [f"{k}={v}" for k, v in pools.items()]
    for token in pool_tokens:
        tokens.insert(min(pos, len(tokens)), token)
    text = sep.join(tokens)
    parsed = split_conninfo(text)
    assert conninfo_to_dict(parsed.conninfo) == params
    assert parsed.params == params
    assert {k: str(v) for k, v in _pool_params(parsed.pool_settings).items()} == pools


def _pool_params(settings: dict[str, int]) -> dict[str, int]:
    names = {"max_size": "pool_max_conns", "min_size": "pool_min_conns"}
    return {names[k]: v for k, v in settings.items()}


@settings(max_examples=300, deadline=None)
@given(params=params_st, pools=pool_st)
def test_url_query_reaches_libpq_as_written(params: dict[str, str], pools: dict[str, str]) -> None:
    query = [f"{quote(k)}={quote(v, safe='')}" for k, v in params.items()]
    query += [f"{k}={v}" for k, v in pools.items()]
    text = "postgresql://127.0.0.1:5432/?" + "&".join(query)
    parsed = split_conninfo(text)
    expected = {"host": "127.0.0.1", "port": "5432", **params}
    assert conninfo_to_dict(parsed.conninfo) == expected


def test_a_unicode_separator_cannot_inject_parameters() -> None:
    """A tenant's database name inside a template: libpq reads it as one value."""
    tenant = "postgres\x1cport=5433\x1csslmode=disable"
    template = "host=127.0.0.1 port=1 sslmode=require dbname='{}' pool_max_conns=3"
    escaped = tenant.replace("\\", "\\\\").replace("'", "\\'")
    parsed = split_conninfo(template.format(escaped))
    assert parsed.params == {
        "host": "127.0.0.1",
        "port": "1",
        "sslmode": "require",
        "dbname": tenant,
    }
    unquoted = split_conninfo(f"host=127.0.0.1 port=1 sslmode=require dbname={tenant}")
    assert unquoted.params["port"] == "1" and unquoted.params["sslmode"] == "require"


def test_url_escapes_are_libpqs_not_form_encoding() -> None:
    parsed = split_conninfo(
        "postgresql://h/db?options=-c%20statement_timeout%3D5s"
        "&sslrootcert=/etc/ssl/my%20ca.pem&application_name=a+b&pool_max_conns=4"
    )
    assert parsed.params["options"] == "-c statement_timeout=5s"
    assert parsed.params["sslrootcert"] == "/etc/ssl/my ca.pem"
    assert parsed.params["application_name"] == "a+b"  # libpq does not decode '+'
    assert parsed.pool_settings == {"max_size": 4}


def test_multi_host_urls_are_accepted() -> None:
    parsed = split_conninfo("postgresql://app@h1:5432,h2:5433/db?target_session_attrs=read-write")
    assert parsed.params["host"] == "h1,h2" and parsed.params["port"] == "5432,5433"
    assert parsed.params["target_session_attrs"] == "read-write"


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://u:Qz9@Xk7@host/db",  # a raw '@' in the password
        "postgresql://u:Qz9@Xk7@host:5432,other/db",
    ],
)
def test_a_raw_at_sign_in_a_url_password_is_refused_without_echoing_it(text: str) -> None:
    with pytest.raises(ValueError) as info:
        split_conninfo(text)
    message = str(info.value)
    assert "Qz9" not in message and "Xk7" not in message


def test_secrets_are_what_libpq_uses_and_what_was_written() -> None:
    text = "postgresql://u:p%40ss%2Fw@h/db?sslpassword=k3y&oauth_client_secret=oc"
    parsed = split_conninfo(text)
    redact = Redactor(secrets_of(text, parsed.params, {"password": "kw-pw"}))
    masked = redact(f"{text} p@ss/w kw-pw k3y oc")
    for secret in ("p%40ss%2Fw", "p@ss/w", "kw-pw", "k3y", "oc"):
        assert secret not in masked
