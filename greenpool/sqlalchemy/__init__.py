"""SQLAlchemy (and Flask-SQLAlchemy) on greenpool: ``poolclass=GreenQueuePool``.

    from greenpool.sqlalchemy import GreenQueuePool
    engine = create_engine("postgresql+psycopg://app@db/app", poolclass=GreenQueuePool,
                           pool_size=10, max_overflow=0, pool_timeout=5)

Import this after ``gevent.monkey.patch_all()`` (gunicorn -k gevent does it first).
See docs/sqlalchemy.md.
"""

from __future__ import annotations

from greenpool.sqlalchemy.pool import GreenQueuePool
from greenpool.sqlalchemy.url import url_from_conninfo

__all__ = ["GreenQueuePool", "url_from_conninfo"]
