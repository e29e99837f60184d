"""Views of the example Django project; every database access goes through the ORM."""

from __future__ import annotations

import json
import os
from decimal import Decimal, InvalidOperation
from typing import Any

import gevent
from django.conf import settings
from django.db import connection, connections, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from examples.django_app.bank.models import Account, Transfer


@transaction.non_atomic_requests
def healthz(request: HttpRequest) -> HttpResponse:
    """Never touches the database: stays fast when the pool is exhausted."""
    return JsonResponse({"ok": True})


def account(request: HttpRequest, account_id: int) -> HttpResponse:
    try:
        acc = Account.objects.get(pk=account_id)
    except Account.DoesNotExist:
        return JsonResponse({"error": "not found"}, status=404)
    return JsonResponse({"id": acc.pk, "owner": acc.owner, "balance": str(acc.balance)})


@csrf_exempt
def open_account(request: HttpRequest) -> HttpResponse:
    body = _json(request)
    acc = Account.objects.create(
        owner=str(body.get("owner", "anon")), balance=Decimal(str(body.get("balance", "0")))
    )
    return JsonResponse({"id": acc.pk}, status=201)


class InsufficientFunds(Exception):
    pass


@csrf_exempt
def transfer(request: HttpRequest) -> HttpResponse:
    """Two accounts locked in id order, both updated, a transfer row: one transaction;
    409 (rolled back) when the balance is too low."""
    body = _json(request)
    try:
        source, target = int(body["from_id"]), int(body["to_id"])
        amount = Decimal(str(body["amount"]))
    except (KeyError, ValueError, InvalidOperation):
        return JsonResponse({"error": "from_id, to_id and amount are required"}, status=400)
    try:
        with transaction.atomic():
            accounts = {
                a.pk: a
                for a in Account.objects.select_for_update()
                .filter(pk__in=(source, target))
                .order_by("pk")
            }
            if len(accounts) != 2:
                return JsonResponse({"error": "no such account"}, status=404)
            accounts[source].balance -= amount
            accounts[target].balance += amount
            accounts[target].save(update_fields=["balance"])
            accounts[source].save(update_fields=["balance"])
            Transfer.objects.create(source_id=source, target_id=target, amount=amount)
            if accounts[source].balance < 0:
                raise InsufficientFunds
    except InsufficientFunds:
        return JsonResponse({"error": "insufficient funds"}, status=409)
    return JsonResponse({"ok": True}, status=201)


def slow(request: HttpRequest) -> HttpResponse:
    """Holds a connection for ``seconds`` (at most 10) inside pg_sleep."""
    seconds = min(float(request.GET.get("seconds", "0.05")), 10.0)
    with connection.cursor() as cur:
        cur.execute("SELECT pg_sleep(%s)", [seconds])
    return JsonResponse({"slept": seconds})


def spawn(request: HttpRequest) -> HttpResponse:
    """Greenlets that use the ORM and never close their connection: each borrows its own
    and gives it back when it ends."""
    n = min(int(request.GET.get("n", "3")), 20)
    hold = min(float(request.GET.get("hold", "0")), 5.0)

    def work() -> int:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), pg_sleep(%s)", [hold])
            pid = cur.fetchone()[0]
        Account.objects.count()
        return int(pid)

    greenlets = [gevent.spawn(work) for _ in range(n)]
    gevent.joinall(greenlets, raise_error=True)
    return JsonResponse({"pids": [g.value for g in greenlets]})


@csrf_exempt
def fail(request: HttpRequest) -> HttpResponse:
    """Writes, then fails: in autocommit (the default) the write stays."""
    Account.objects.create(owner=str(_json(request).get("owner", "fail")))
    raise RuntimeError("the view failed after writing")


@csrf_exempt
def atomic_fail(request: HttpRequest) -> HttpResponse:
    """Writes through an alias with ATOMIC_REQUESTS ("atomic" if configured), then fails:
    the write is rolled back."""
    alias = "atomic" if "atomic" in settings.DATABASES else "default"
    Account.objects.using(alias).create(owner=str(_json(request).get("owner", "fail")))
    raise RuntimeError("the view failed after writing")


def stats(request: HttpRequest) -> HttpResponse:
    from greenpool.django import get_pool

    pool = get_pool("default")
    return JsonResponse(
        {
            "pid": os.getpid(),
            "engine": connections["default"].settings_dict["ENGINE"],
            "driver": connection.Database.__name__,
            "pool": pool.stats() if pool is not None else None,
        }
    )


def _json(request: HttpRequest) -> dict[str, Any]:
    try:
        data = json.loads(request.body or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
