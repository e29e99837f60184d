"""HTTP endpoints of the example app.

Every view uses ``db.conn``: the request's connection, borrowed on first use, committed
when the response is a success and rolled back otherwise. ``/healthz`` never touches the
database, so it never waits for a connection.
"""

from __future__ import annotations

import os
from decimal import Decimal, InvalidOperation
from typing import Any

from flask import Blueprint, abort, jsonify, request, url_for
from flask.typing import ResponseReturnValue

from . import db
from .schema import SCHEMA

bp = Blueprint("bank", __name__)

MAX_PER_PAGE = 100
MAX_SLEEP = 5.0


def _rows(sql: str, params: tuple[Any, ...] = (), *, name: str | None = None) -> list[Any]:
    with db.get_conn(name).cursor() as cur:
        cur.execute(sql, params)
        return list(cur.fetchall())


def _account(row: tuple[Any, ...]) -> dict[str, Any]:
    return {"id": row[0], "owner": row[1], "balance": str(row[2]), "created_at": _iso(row[3])}


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _amount(value: Any, field: str) -> Decimal:
    try:
        amount = Decimal(str(value))
    except (InvalidOperation, ValueError):
        abort(400, f"{field} must be a decimal number")
    if not amount.is_finite() or amount.as_tuple().exponent < -2:  # type: ignore[operator]
        abort(400, f"{field} must have at most two decimals")
    return amount


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    value = request.args.get(name, default, type=int)
    if value is None or not low <= value <= high:
        abort(400, f"{name} must be a whole number between {low} and {high}")
    return value


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    """Liveness: answers without touching the database."""
    return {"ok": True, "pid": os.getpid()}


@bp.get("/accounts")
def list_accounts() -> ResponseReturnValue:
    """Accounts by id, paginated with ?page=N&per_page=M."""
    page = _int_arg("page", 1, 1, 1_000_000)
    per_page = _int_arg("per_page", 20, 1, MAX_PER_PAGE)
    rows = _rows(
        f"SELECT id, owner, balance, created_at FROM {SCHEMA}.accounts "
        "ORDER BY id LIMIT %s OFFSET %s",
        (per_page + 1, (page - 1) * per_page),
    )
    more = len(rows) > per_page
    return {
        "items": [_account(r) for r in rows[:per_page]],
        "page": page,
        "per_page": per_page,
        "next": url_for(".list_accounts", page=page + 1, per_page=per_page) if more else None,
    }


@bp.get("/accounts/<int:account_id>")
def get_account(account_id: int) -> ResponseReturnValue:
    """One account with its ten latest transfers."""
    rows = _rows(
        f"SELECT id, owner, balance, created_at FROM {SCHEMA}.accounts WHERE id = %s",
        (account_id,),
    )
    if not rows:
        abort(404, "no such account")
    transfers = _rows(
        f"SELECT id, from_id, to_id, amount, created_at FROM {SCHEMA}.transfers "
        "WHERE from_id = %s OR to_id = %s ORDER BY id DESC LIMIT 10",
        (account_id, account_id),
    )
    result = _account(rows[0])
    result["transfers"] = [
        {"id": t[0], "from_id": t[1], "to_id": t[2], "amount": str(t[3]), "created_at": _iso(t[4])}
        for t in transfers
    ]
    return result


@bp.post("/accounts")
def create_account() -> ResponseReturnValue:
    """Open an account: ``{"owner": "ada", "balance": "100.00"}``."""
    data = request.get_json(silent=True) or {}
    owner = data.get("owner")
    if not isinstance(owner, str) or not 0 < len(owner) <= 100:
        abort(400, "owner must be a non-empty string of at most 100 characters")
    balance = _amount(data.get("balance", "0"), "balance")
    if balance < 0:
        abort(400, "balance must not be negative")
    row = _rows(
        f"INSERT INTO {SCHEMA}.accounts (owner, balance) VALUES (%s, %s) "
        "RETURNING id, owner, balance, created_at",
        (owner, balance),
    )[0]
    response = jsonify(_account(row))
    response.status_code = 201
    response.headers["Location"] = url_for(".get_account", account_id=row[0])
    return response


@bp.post("/transfers")
def transfer() -> ResponseReturnValue:
    """Move money between two accounts in one transaction.

    ``{"from_id": 1, "to_id": 2, "amount": "12.50"}``: 201 on success, 409 when the
    balance is too low (nothing is written), 404 for an unknown account.
    """
    data = request.get_json(silent=True) or {}
    from_id, to_id = data.get("from_id"), data.get("to_id")
    if not isinstance(from_id, int) or not isinstance(to_id, int) or from_id == to_id:
        abort(400, "from_id and to_id must be two different account ids")
    amount = _amount(data.get("amount"), "amount")
    if amount <= 0:
        abort(400, "amount must be positive")
    # Lock both rows in id order, so two opposite transfers cannot deadlock.
    locked = _rows(
        f"SELECT id, balance FROM {SCHEMA}.accounts WHERE id IN (%s, %s) ORDER BY id FOR UPDATE",
        (from_id, to_id),
    )
    balances = dict(locked)
    if len(balances) != 2:
        abort(404, "no such account")
    if balances[from_id] < amount:
        return {"error": "insufficient_funds", "balance": str(balances[from_id])}, 409
    _rows(
        f"UPDATE {SCHEMA}.accounts SET balance = balance - %s WHERE id = %s RETURNING id",
        (amount, from_id),
    )
    _rows(
        f"UPDATE {SCHEMA}.accounts SET balance = balance + %s WHERE id = %s RETURNING id",
        (amount, to_id),
    )
    row = _rows(
        f"INSERT INTO {SCHEMA}.transfers (from_id, to_id, amount) VALUES (%s, %s, %s) "
        "RETURNING id, created_at",
        (from_id, to_id, amount),
    )[0]
    # Committed by the extension after this view returns (status < 400).
    return {"id": row[0], "from_id": from_id, "to_id": to_id, "amount": str(amount)}, 201


@bp.get("/slow")
def slow() -> ResponseReturnValue:
    """Hold a connection for ``?seconds=`` (default 0.2, at most 5) with pg_sleep."""
    seconds = request.args.get("seconds", 0.2, type=float)
    if seconds is None or not 0 <= seconds <= MAX_SLEEP:
        abort(400, f"seconds must be between 0 and {MAX_SLEEP}")
    _rows("SELECT pg_sleep(%s)", (seconds,))
    return {"slept": seconds}


@bp.get("/reports/summary")
def summary() -> ResponseReturnValue:
    """Totals, read from the ``reporting`` database (a replica in production)."""
    row = _rows(
        f"SELECT (SELECT count(*) FROM {SCHEMA}.accounts), "
        f"(SELECT coalesce(sum(balance), 0) FROM {SCHEMA}.accounts), "
        f"(SELECT count(*) FROM {SCHEMA}.transfers)",
        name="reporting",
    )[0]
    return {"accounts": row[0], "total_balance": str(row[1]), "transfers": row[2]}
