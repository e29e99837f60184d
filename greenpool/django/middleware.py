"""Pool exhaustion as ``503 Service Unavailable`` with ``Retry-After``, not a 500.

Put it first in ``MIDDLEWARE``. A view (or ``ATOMIC_REQUESTS``' transaction) that cannot
get a connection within the pool's ``timeout`` raises ``greenpool.PoolTimeout`` (or
``TooManyRequests`` when ``max_waiting`` greenlets already wait); this middleware answers
503 with ``Retry-After: GREENPOOL_RETRY_AFTER`` seconds (default 1), in JSON when the
client asked for it. Exhaustion raised elsewhere (another middleware) becomes a 503 too.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.signals import got_request_exception
from django.http import HttpRequest, HttpResponse, JsonResponse

import greenpool

logger = logging.getLogger("greenpool")

EXHAUSTED = (greenpool.PoolTimeout, greenpool.TooManyRequests)
_MARK = "_greenpool_exhausted"


def service_unavailable(request: HttpRequest, error: BaseException) -> HttpResponse:
    """The 503 answer for a request that found the pool exhausted."""
    retry_after = int(getattr(settings, "GREENPOOL_RETRY_AFTER", 1))
    logger.warning(
        "greenpool: %s %s answered 503 (Retry-After: %d): %s",
        request.method,
        request.path,
        retry_after,
        error,
    )
    message = "The database is busy; please retry shortly."
    accept = request.headers.get("Accept", "")
    response: HttpResponse
    if "application/json" in accept or request.content_type == "application/json":
        response = JsonResponse({"error": "service_unavailable", "message": message}, status=503)
    else:
        response = HttpResponse(message, status=503, content_type="text/plain")
    response["Retry-After"] = str(retry_after)
    return response


def _note_exhaustion(sender: Any, request: HttpRequest | None = None, **kwargs: Any) -> None:
    error = sys.exc_info()[1]
    if request is not None and isinstance(error, EXHAUSTED):
        setattr(request, _MARK, error)


got_request_exception.connect(_note_exhaustion, dispatch_uid="greenpool-exhaustion")


class PoolExhaustedMiddleware:
    """Turns pool exhaustion into 503 + Retry-After (put it first in MIDDLEWARE)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        error = getattr(request, _MARK, None)
        if error is not None and response.status_code == 500:
            return service_unavailable(request, error)
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> Any:
        if isinstance(exception, EXHAUSTED):
            return service_unavailable(request, exception)
        return None
