"""Endpoints: the same small bank as examples/flask_app, through the ORM."""

from __future__ import annotations

import os
from decimal import Decimal, InvalidOperation
from typing import Any

from flask import Blueprint, abort, request
from sqlalchemy import func, select, text

from examples.flask_sqlalchemy_app import db
from examples.flask_sqlalchemy_app.models import Account, Transfer

bp = Blueprint("bank", __name__)


@bp.get("/healthz")
def healthz() -> Any:
    """Never touches the database."""
    return {"ok": True}


@bp.get("/accounts/<int:account_id>")
def account(account_id: int) -> Any:
    acc = db.session.get(Account, account_id)
    if acc is None:
        abort(404)
    latest = db.session.scalars(
        select(Transfer)
        .where((Transfer.from_id == account_id) | (Transfer.to_id == account_id))
        .order_by(Transfer.id.desc())
        .limit(10)
    ).all()
    return {
        "id": acc.id,
        "owner": acc.owner,
        "balance": str(acc.balance),
        "transfers": [{"id": t.id, "amount": str(t.amount)} for t in latest],
    }


@bp.post("/transfers")
def transfer() -> Any:
    """Lock both accounts in id order, move the money, record it: one transaction; 409
    (rolled back) when the balance is too low."""
    body = request.get_json(silent=True) or {}
    try:
        source, target = int(body["from_id"]), int(body["to_id"])
        amount = Decimal(str(body["amount"]))
    except (KeyError, ValueError, InvalidOperation):
        return {"error": "from_id, to_id and amount are required"}, 400
    accounts = {
        a.id: a
        for a in db.session.scalars(
            select(Account)
            .where(Account.id.in_((source, target)))
            .order_by(Account.id)
            .with_for_update()
        )
    }
    if len(accounts) != 2:
        db.session.rollback()
        return {"error": "no such account"}, 404
    if accounts[source].balance < amount:
        db.session.rollback()
        return {"error": "insufficient funds"}, 409
    accounts[source].balance -= amount
    accounts[target].balance += amount
    db.session.add(Transfer(from_id=source, to_id=target, amount=amount))
    db.session.commit()
    return {"ok": True}, 201


@bp.get("/slow")
def slow() -> Any:
    seconds = min(float(request.args.get("seconds", "0.05")), 5.0)
    db.session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
    return {"slept": seconds}


@bp.get("/reports/summary")
def summary() -> Any:
    """Through the ``reporting`` bind (read-only sessions)."""
    engine = db.engines["reporting"]
    count, total = db.session.execute(
        select(func.count(Account.id), func.coalesce(func.sum(Account.balance), 0)),
        bind_arguments={"bind": engine},
    ).one()
    return {"accounts": count, "total": str(total)}


@bp.get("/stats")
def stats() -> Any:
    return {
        "pid": os.getpid(),
        "pools": {
            str(key): engine.pool.greenpool.stats() for key, engine in db.engines.items()
        },
    }
