"""Errors nobody would see otherwise fail the test that caused them.

gevent's hub prints an exception that kills a greenlet and carries on, and the pool's
maintenance loop logs its own errors and survives them: a connector, a checker or a
test-side greenlet can crash and every assert still pass. The autouse fixture
:func:`background_errors` (imported by ``tests/conftest.py``) fails a test when, during
it:

- a greenlet died with an exception that reached the hub (``hub.handle_error``; a
  ``GreenletExit`` is a normal death and does not count), or
- the ``greenpool`` logger (or a child, e.g. ``greenpool.flask``) logged at ERROR or
  above.

A test that provokes either on purpose says so, narrowly:
``@pytest.mark.allow_greenlet_errors(types=(PoolClosed, ...))`` (those exception types
only; a keyword, because a mark called with one class would decorate the class) and
``@pytest.mark.allow_pool_errors(r"regex", ...)`` (records whose message matches; no
pattern: any). Test greenlets whose failure is the point should rather catch and return
it (see :func:`outcome`), and tests ``.get()`` or ``joinall(raise_error=True)`` their
greenlets so that a failed assert inside one fails the test.

Errors that arrive between tests (a greenlet outliving its test) are reported by the
next test's teardown, labelled as such.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import gevent
import pytest

__all__ = ["background_errors", "outcome"]

T = TypeVar("T")

ALLOW_GREENLET = "allow_greenlet_errors"
ALLOW_LOG = "allow_pool_errors"

#: ERROR records every test may cause: the exhaustion alert (greenpool.alerts) reports
#: acquires that timed out or were refused, each of which already raised PoolTimeout or
#: TooManyRequests to its caller, where the test expects it or fails on it.
ALWAYS_ALLOWED = (re.compile(r"^pool '[^']*' is exhausted: "),)


@dataclass
class _GreenletError:
    context: str
    exc: BaseException
    text: str


@dataclass
class _Bucket:
    label: str
    greenlet_errors: list[_GreenletError] = field(default_factory=list)
    records: list[logging.LogRecord] = field(default_factory=list)


class _State:
    current: _Bucket = _Bucket("between tests")  # where errors go right now
    stray: _Bucket = current  # errors arriving after the last test's teardown
    installed_on: Any = None


class _Handler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        _State.current.records.append(record)


def _install() -> None:
    """Once per hub: wrap handle_error (record, then let gevent print as usual) and hang a
    handler on the greenpool logger."""
    hub = gevent.get_hub()
    if _State.installed_on is hub:
        return
    original = hub.handle_error
    not_error = hub.NOT_ERROR

    def handle_error(
        context: Any, type_: type[BaseException], value: BaseException, tb: TracebackType | None
    ) -> Any:
        if type_ is not None and not issubclass(type_, not_error):
            if value is None:
                value = type_()
            text = "".join(traceback.format_exception(type_, value, tb))
            _State.current.greenlet_errors.append(_GreenletError(repr(context), value, text))
        return original(context, type_, value, tb)

    hub.handle_error = handle_error
    if _State.installed_on is None:
        logging.getLogger("greenpool").addHandler(_Handler())
    _State.installed_on = hub


def _allowed_types(node: pytest.Item) -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = []
    for mark in node.iter_markers(ALLOW_GREENLET):
        types.extend(mark.args)
        types.extend(mark.kwargs.get("types", ()))
    return tuple(types)


def _allowed_patterns(node: pytest.Item) -> list[re.Pattern[str]] | None:
    """None: no ERROR record allowed; [] : any; else those matching."""
    marks = list(node.iter_markers(ALLOW_LOG))
    if not marks:
        return None
    return [re.compile(p) for mark in marks for p in mark.args]


def _problems(bucket: _Bucket, node: pytest.Item, where: str) -> list[str]:
    allowed_types = _allowed_types(node)
    patterns = _allowed_patterns(node)
    out = []
    for err in bucket.greenlet_errors:
        if allowed_types and isinstance(err.exc, allowed_types):
            continue
        out.append(f"a greenlet died with an exception{where}: {err.context}\n{err.text}")
    for record in bucket.records:
        message = record.getMessage()
        if any(p.search(message) for p in ALWAYS_ALLOWED):
            continue
        if patterns is not None and (not patterns or any(p.search(message) for p in patterns)):
            continue
        text = f"{record.name} logged {record.levelname}{where}: {message}"
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))
        out.append(text)
    return out


@pytest.fixture(autouse=True)
def background_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test on a greenlet's exception reaching the hub, or an ERROR record of the
    greenpool logger, unless the test's markers allow it (see the module docstring)."""
    _install()
    node = request.node
    earlier = _State.stray
    _State.stray = _Bucket("between tests")
    bucket = _State.current = _Bucket(node.nodeid)
    try:
        yield
    finally:
        _State.current = _State.stray
    problems = _problems(bucket, node, "") + _problems(
        earlier, node, " (before this test started: left over by an earlier one)"
    )
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


def outcome(func: Callable[..., T], *args: Any, **kwargs: Any) -> T | BaseException:
    """Call ``func`` and return its result, or the exception it raised (GreenletExit
    included): for test greenlets whose failure is the expected outcome, so that it does
    not count as a crash. ``gevent.spawn(outcome, pool.getconn, 5)``."""
    try:
        return func(*args, **kwargs)
    except BaseException as ex:  # the point: hand it back
        return ex
