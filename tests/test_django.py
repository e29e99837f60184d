"""Django on greenpool (``"ENGINE": "greenpool.django"``), in this gevent-patched process.

The example project's models and views (examples/django_app) run against the real
server; ground truth comes from pg_stat_activity (backends of the pool's
application_name) and from a separate admin connection (what was committed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import gevent
import psycopg
import pytest
from gevent.event import Event

from tests.support.ormsupport import backend_pids, repo_root
from tests.support.waiting import wait_for

APP = f"gpdj-{uuid.uuid4().hex[:6]}"
MAX_SIZE = 3
_configured: dict[str, Any] = {}


def _database(dsn: str, app: str = APP, **extra: Any) -> dict[str, Any]:
    from greenpool.django import database_from_conninfo

    return {
        "ENGINE": "greenpool.django",
        **database_from_conninfo(
            dsn,
            application_name=app,
            # 2 s: the first connection must fit in it on a busy machine too.
            pool={"min_size": 1, "max_size": MAX_SIZE, "timeout": 2, "name": app},
        ),
        **extra,
    }


@pytest.fixture(scope="module")
def django_app(dsn: str) -> Iterator[Any]:
    """Django configured once for this process, with the example project's app, urls
    and middleware; its tables created by ``migrate`` through the pool."""
    import django
    from django.conf import settings

    if not _configured:
        settings.configure(
            DATABASES={
                "default": _database(dsn),
                "atomic": _database(dsn, APP + "-atomic", ATOMIC_REQUESTS=True),
            },
            INSTALLED_APPS=["examples.django_app.bank"],
            ROOT_URLCONF="examples.django_app.urls",
            MIDDLEWARE=["greenpool.django.middleware.PoolExhaustedMiddleware"],
            ALLOWED_HOSTS=["*"],
            USE_TZ=True,
            SECRET_KEY="test",
            DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
            GREENPOOL_RETRY_AFTER=3,
        )
        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)  # a management command, through the pool
        _configured["ok"] = True
    from django.db import connections

    connections.close_all()
    yield settings
    connections.close_all()


def pool() -> Any:
    from greenpool.django import get_pool

    p = get_pool("default")
    assert p is not None
    return p


def settle() -> dict[str, Any]:
    wait_for(lambda: pool().stats()["acquired"] == 0, timeout=5)
    return dict(pool().stats())


def committed(dsn: str, owner: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM bank_account WHERE owner = %s", (owner,))
        return int(row.fetchone()[0])  # type: ignore[index]


class WSGIClient:
    """Requests through Django's real WSGI handler, each in its own greenlet (as under
    gunicorn -k gevent), so request_started/request_finished run as in production
    (Django's test Client disconnects close_old_connections)."""

    def __init__(self) -> None:
        from django.core.handlers.wsgi import WSGIHandler
        from werkzeug.test import Client

        self._client = Client(WSGIHandler())

    def _open(self, method: str, path: str, **kwargs: Any) -> Any:
        # buffered: the response is read and closed, so request_finished fires.
        call = gevent.spawn(self._client.open, path, method=method, buffered=True, **kwargs)
        return call.get(timeout=30)

    def get(self, path: str, **headers: str) -> Any:
        return self._open("GET", path, headers=headers)

    def post(self, path: str, body: Any = None, **headers: str) -> Any:
        return self._open(
            "POST",
            path,
            data=json.dumps(body or {}),
            content_type="application/json",
            headers=headers,
        )


def client() -> WSGIClient:
    return WSGIClient()


def test_request_borrows_at_first_query_and_gives_back_at_end(django_app: Any, dsn: str) -> None:
    from examples.django_app.bank.models import Account

    acc = Account.objects.create(owner="first", balance=10)
    from django.db import connection

    connection.close()
    before = pool().stats()
    assert client().get("/healthz").status_code == 200
    assert pool().stats()["acquire_count"] == before["acquire_count"]  # no query, no borrow
    response = client().get(f"/accounts/{acc.pk}")
    assert response.status_code == 200 and response.get_json()["balance"] == "10.00"
    stats = settle()
    assert stats["acquire_count"] == before["acquire_count"] + 1
    assert stats["returns_count"] == stats["acquire_count"]
    assert 1 <= len(backend_pids(dsn, APP)) <= MAX_SIZE


def test_each_greenlet_has_its_own_connection(django_app: Any, dsn: str) -> None:
    from django.db import DatabaseError, connection, connections

    release = Event()
    pids: list[int] = []
    wrappers: list[Any] = []

    def work() -> None:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            pids.append(cur.fetchone()[0])
        wrappers.append(connections["default"])  # this greenlet's DatabaseWrapper
        release.wait(5)
        connection.close()

    greenlets = [gevent.spawn(work) for _ in range(MAX_SIZE)]
    wait_for(lambda: len(pids) == MAX_SIZE)
    assert len(set(pids)) == MAX_SIZE  # three greenlets, three distinct backends
    assert set(pids) <= backend_pids(dsn, APP)
    assert len({id(w) for w in wrappers}) == MAX_SIZE
    # Django refuses to let another greenlet use a greenlet's connection.
    with pytest.raises(DatabaseError, match="can only be used in that same thread"):
        wrappers[0].cursor()
    release.set()
    gevent.joinall(greenlets, timeout=5, raise_error=True)
    settle()


def test_exhaustion_is_a_503_with_retry_after_not_a_hang(django_app: Any, dsn: str) -> None:
    from django.db import connection

    hold = Event()
    holding: list[int] = []

    def holder() -> None:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
        holding.append(1)
        hold.wait(10)
        connection.close()

    holders = [gevent.spawn(holder) for _ in range(MAX_SIZE)]
    wait_for(lambda: len(holding) == MAX_SIZE)
    start = time.monotonic()
    response = client().get("/accounts/1", Accept="application/json")
    waited = time.monotonic() - start
    assert response.status_code == 503, response.content
    assert response.headers["Retry-After"] == "3"
    assert response.get_json()["error"] == "service_unavailable"
    assert 1.5 < waited < 6, waited  # the pool's timeout (2 s), not a hang
    assert client().get("/healthz").status_code == 200  # no database, no wait
    assert len(backend_pids(dsn, APP)) <= MAX_SIZE
    hold.set()
    gevent.joinall(holders, timeout=5, raise_error=True)
    assert client().get("/accounts/1").status_code in (200, 404)
    settle()


def test_exhaustion_inside_atomic_requests_is_a_503_too(django_app: Any) -> None:
    from django.db import connections

    hold = Event()
    holding: list[int] = []

    def holder() -> None:
        conn = connections["atomic"]
        conn.ensure_connection()
        holding.append(1)
        hold.wait(10)
        conn.close()

    holders = [gevent.spawn(holder) for _ in range(MAX_SIZE)]
    wait_for(lambda: len(holding) == MAX_SIZE)
    # ATOMIC_REQUESTS opens the transaction (and borrows) before the view runs.
    response = client().post("/atomic-fail")
    assert response.status_code == 503, response.content
    hold.set()
    gevent.joinall(holders, timeout=5, raise_error=True)
    settle()


def test_commits_and_rollbacks_land_as_django_promises(django_app: Any, dsn: str) -> None:
    owner = f"o-{uuid.uuid4().hex[:6]}"
    # Autocommit (the default): the write before the failure is committed.
    response = client().post("/fail", {"owner": owner})
    assert response.status_code == 500
    assert committed(dsn, owner) == 1
    # ATOMIC_REQUESTS: the failing view's write is rolled back.
    owner2 = owner + "-atomic"
    response = client().post("/atomic-fail", {"owner": owner2})
    assert response.status_code == 500
    assert committed(dsn, owner2) == 0
    # transaction.atomic() in a view: commit, and a 409 rolled back as a whole.
    a = client().post("/accounts", {"balance": "5"}).get_json()
    b = client().post("/accounts", {"balance": "0"}).get_json()
    ok = {"from_id": a["id"], "to_id": b["id"], "amount": "4"}
    assert client().post("/transfers", ok).status_code == 201
    too_much = {**ok, "amount": "2"}
    assert client().post("/transfers", too_much).status_code == 409
    with psycopg.connect(dsn, autocommit=True) as conn:
        balances: dict[Any, Any] = dict(
            conn.execute(
                "SELECT id, balance::text FROM bank_account WHERE id IN (%s, %s)",
                (a["id"], b["id"]),
            ).fetchall()
        )
        transfers = conn.execute(
            "SELECT count(*) FROM bank_transfer WHERE source_id = %s", (a["id"],)
        ).fetchone()
    assert balances == {a["id"]: "1.00", b["id"]: "4.00"}
    assert transfers == (1,)
    stats = settle()
    assert stats["acquired"] == 0
    with psycopg.connect(dsn, autocommit=True) as conn:  # nothing left in a transaction
        idle_in_tx = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND state LIKE 'idle in transaction%%'",
            (APP,),
        ).fetchone()
    assert idle_in_tx == (0,)


def test_spawned_greenlets_give_their_connections_back(django_app: Any, dsn: str) -> None:
    response = client().get("/spawn?n=3&hold=0.2")
    assert response.status_code == 200
    pids = response.get_json()["pids"]
    assert len(set(pids)) == 3  # three greenlets held three connections at once
    settle()  # ... and each gave its own back when it ended
    assert len(backend_pids(dsn, APP)) <= MAX_SIZE


def test_killed_greenlet_inside_a_transaction_is_rolled_back(django_app: Any, dsn: str) -> None:
    from django.db import transaction

    from examples.django_app.bank.models import Account

    owner = f"k-{uuid.uuid4().hex[:6]}"
    wrote = Event()

    def writer() -> None:
        with transaction.atomic():
            Account.objects.create(owner=owner)
            wrote.set()
            gevent.sleep(30)

    g = gevent.spawn(writer)
    assert wrote.wait(5)
    g.kill(timeout=5)
    settle()
    assert committed(dsn, owner) == 0


def test_greenlet_ending_inside_a_transaction_gives_back_a_rolled_back_connection(
    django_app: Any, dsn: str
) -> None:
    from django.db import transaction

    from examples.django_app.bank.models import Account

    owner = f"e-{uuid.uuid4().hex[:6]}"
    rollbacks = pool().stats()["rollback_count"]

    def forgetful() -> None:
        transaction.set_autocommit(False)
        Account.objects.create(owner=owner)  # never committed, never closed

    gevent.spawn(forgetful).get(timeout=5)
    settle()  # given back as the greenlet ended ...
    assert pool().stats()["rollback_count"] == rollbacks + 1  # ... and rolled back
    assert committed(dsn, owner) == 0


def test_close_old_connections_gives_back(django_app: Any) -> None:
    from django.db import close_old_connections, connection

    with connection.cursor() as cur:
        cur.execute("SELECT 1")
    assert pool().stats()["acquired"] >= 1
    close_old_connections()
    assert connection.connection is None
    settle()


def test_iterator_named_cursor_on_a_pooled_connection(django_app: Any) -> None:
    """QuerySet.iterator() uses a named (server-side) cursor, WITH HOLD in autocommit:
    Django 4.2 declares it with server-side binding, later releases (5.2 and 6.x here)
    with client-side binding (their ServerSideCursor). Either way it runs on the borrowed
    connection and is closed before the connection goes back."""
    from django.db import connection

    from examples.django_app.bank.models import Account

    owner = f"it-{uuid.uuid4().hex[:6]}"

    def iterate() -> list[int]:
        try:
            Account.objects.bulk_create(Account(owner=owner, balance=i) for i in range(5))
            rows = Account.objects.filter(owner=owner).order_by("balance")
            return [int(a.balance) for a in rows.iterator(chunk_size=2)]
        finally:
            connection.close()

    assert gevent.spawn(iterate).get(timeout=10) == [0, 1, 2, 3, 4]
    settle()


def test_time_zone_changes_reach_pooled_connections(django_app: Any) -> None:
    """A TIME_ZONE/USE_TZ change (override_settings) applies to connections borrowed after
    it: Django sets the session's zone at every borrow (init_connection_state). Django >=
    5.1's ensure_timezone() also closes the alias's pool (close_pool), 4.2's does not."""
    import datetime

    from django.db import connection
    from django.test.utils import override_settings

    def zone_and_now() -> tuple[str, datetime.datetime]:
        try:
            with connection.cursor() as cur:
                cur.execute("SELECT current_setting('TimeZone'), now()")
                row = cur.fetchone()
                return str(row[0]), row[1]
        finally:
            connection.close()

    zone, now = gevent.spawn(zone_and_now).get(timeout=10)
    assert zone == "UTC" and now.utcoffset() == datetime.timedelta(0)
    with override_settings(USE_TZ=False, TIME_ZONE="Asia/Tokyo"):
        zone, now = gevent.spawn(zone_and_now).get(timeout=10)
        assert zone == "Asia/Tokyo" and now.tzinfo is None  # naive, in Tokyo time
    zone, now = gevent.spawn(zone_and_now).get(timeout=10)
    assert zone == "UTC" and now.utcoffset() == datetime.timedelta(0)
    settle()


def test_bad_pool_options_name_the_setting(django_app: Any, dsn: str) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from greenpool.django.base import DatabaseWrapper

    def wrapper(**changes: Any) -> Any:
        settings_dict = {**_database(dsn), "CONN_MAX_AGE": 0, "ATOMIC_REQUESTS": False}
        settings_dict.update(changes)
        return DatabaseWrapper(settings_dict, "bad")

    with pytest.raises(ImproperlyConfigured, match=r"\['pool'\]: unknown setting\(s\) max_conns"):
        wrapper(OPTIONS={"pool": {"max_conns": 4}})
    with pytest.raises(ImproperlyConfigured, match=r"\['pool'\]: expected True or a dict"):
        wrapper(OPTIONS={"pool": 4})
    with pytest.raises(ImproperlyConfigured, match=r"CONN_MAX_AGE'\]: must be 0"):
        wrapper(CONN_MAX_AGE=60)
    with pytest.raises(ImproperlyConfigured, match=r"\['pool'\]: max_size: must not be negative"):
        wrapper(OPTIONS={"pool": {"max_size": -1}})
    with pytest.raises(ImproperlyConfigured, match=r"\['pool'\]: min_size: 5 is greater than max"):
        wrapper(OPTIONS={"pool": {"min_size": 5, "max_size": 2}})


def run_python(argv: list[str], env: dict[str, str]) -> str:
    """Run this interpreter with ``argv`` in the checkout; its stdout (it must succeed)."""
    out = subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=60,
        cwd=repo_root(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_without_gevent_the_backend_connects_as_django_does(dsn: str) -> None:
    """``manage.py`` in a process gevent never patched: Django's own per-thread
    connections (the threaded runserver too), no pool, no warning."""
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "GP_DJANGO_NAME": APP + "-cli",
        "PYTHONPATH": repo_root(),
    }
    code = (
        "import os, django; os.environ['DJANGO_SETTINGS_MODULE']='examples.django_app.settings';"
        "django.setup(); from django.core.management import call_command;"
        "call_command('migrate', verbosity=0);"
        "from examples.django_app.bank.models import Account; print(Account.objects.count());"
        "from greenpool.django import get_pool; print(get_pool('default'))"
    )
    lines = run_python(["-W", "error::RuntimeWarning", "-c", code], env).split()
    assert int(lines[0]) >= 0 and lines[1] == "None"


PSYCOPG2_SCRIPT = """
from gevent import monkey

monkey.patch_all()
import json, os
import django

django.setup()  # the example project's settings; GP_DJANGO_PSYCOPG2=1 hides psycopg 3
import gevent
from gevent.event import Event
from django.core.management import call_command
from django.db import connection, transaction
from examples.django_app.bank.models import Account
from greenpool.django import get_pool
from tests.support.waiting import wait_for

call_command("migrate", verbosity=0)
connection.close()  # the main greenlet's, back to the pool
owner = os.environ["OWNER"]
pids, modules = [], set()
all_in, release = Event(), Event()

def hold():
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pids.append(cur.fetchone()[0])
    modules.add(type(connection.connection).__module__.split(".")[0])
    if len(pids) == 3:
        all_in.set()
    release.wait(10)
    connection.close()

holders = [gevent.spawn(hold) for _ in range(3)]
assert all_in.wait(10), pids
release.set()
gevent.joinall(holders, timeout=10, raise_error=True)

def commit():
    with transaction.atomic():
        Account.objects.create(owner=owner + "-ok")
    connection.close()

started = Event()

def killed():
    with transaction.atomic():
        Account.objects.create(owner=owner + "-killed")
        started.set()
        gevent.sleep(30)

gevent.spawn(commit).get(timeout=10)
victim = gevent.spawn(killed)
assert started.wait(10)
victim.kill(timeout=10)
counts = [Account.objects.filter(owner=owner + suffix).count() for suffix in ("-ok", "-killed")]
connection.close()
pool = get_pool("default")
# The killed greenlet's connection goes back from a greenlet its end spawned.
wait_for(lambda: pool.stats()["acquired"] == 0, timeout=10, what="every connection back")
print(json.dumps({
    "database": connection.Database.__name__,
    "modules": sorted(modules),
    "pids": len(set(pids)),
    "ok": counts[0],
    "killed": counts[1],
    "stats": pool.stats(),
}))
"""


def test_psycopg2_backend_under_gevent(dsn: str) -> None:
    """The backend on psycopg2 (psycopg 3 hidden, as the example project does with
    GP_DJANGO_PSYCOPG2=1), gevent-patched: a pooled connection per greenlet, a committed
    transaction, a killed one rolled back, everything given back."""
    owner = f"p2-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "DJANGO_SETTINGS_MODULE": "examples.django_app.settings",
        "GP_DJANGO_NAME": APP + "-p2",
        "GP_DJANGO_PSYCOPG2": "1",
        "GP_DJANGO_MAX_SIZE": "3",
        "OWNER": owner,
        "PYTHONPATH": repo_root(),
    }
    result = json.loads(run_python(["-c", PSYCOPG2_SCRIPT], env).strip().splitlines()[-1])
    assert result["database"] == "psycopg2" and result["modules"] == ["psycopg2"]
    assert result["pids"] == 3  # three greenlets, three pooled backends at once
    assert (result["ok"], result["killed"]) == (1, 0)
    stats = result["stats"]
    assert stats["acquired"] == 0
    # migrate's, three holders', commit's, the killed greenlet's, the counts'
    assert stats["returns_count"] == stats["acquire_count"] >= 7
    assert committed(dsn, owner + "-ok") == 1 and committed(dsn, owner + "-killed") == 0
