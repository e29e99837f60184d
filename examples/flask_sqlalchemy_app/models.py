"""ORM models over the example schema (examples/flask_app/schema.py creates it)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import ForeignKey, Numeric
from sqlalchemy.orm import Mapped, mapped_column

from examples.flask_app.schema import SCHEMA
from examples.flask_sqlalchemy_app import db


class Account(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "accounts"
    __table_args__ = {"schema": SCHEMA}

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str]
    balance: Mapped[Decimal] = mapped_column(Numeric(14, 2))
    created_at: Mapped[datetime] = mapped_column(server_default=db.func.now())


class Transfer(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "transfers"
    __table_args__ = {"schema": SCHEMA}

    id: Mapped[int] = mapped_column(primary_key=True)
    from_id: Mapped[int] = mapped_column(ForeignKey(f"{SCHEMA}.accounts.id"))
    to_id: Mapped[int] = mapped_column(ForeignKey(f"{SCHEMA}.accounts.id"))
    amount: Mapped[Decimal] = mapped_column(Numeric(14, 2))
    created_at: Mapped[datetime] = mapped_column(server_default=db.func.now())
