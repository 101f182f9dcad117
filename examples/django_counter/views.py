"""GET /lite/get?counter=NAME and POST /lite/inc (counter, by): lite's JSON and statuses.

400 for a bad parameter, 404 for an unknown counter, 405 for a wrong
method, 503 + Retry-After when the database cannot be reached within the
lock budget (Django's OperationalError, e.g. "database is locked").
"""

import re

from django.db import OperationalError, transaction
from django.db.models import F
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from django_counter.models import Counter

COUNTER_NAME = re.compile(r"[a-z0-9_-]{1,64}\Z")
BY = re.compile(r"[1-9][0-9]{0,6}\Z")
MAX_BY = 1_000_000
RETRY_AFTER_S = 1


@require_GET
def get_counter(request: HttpRequest) -> JsonResponse:
    name = request.GET.get("counter", "hits")
    if not COUNTER_NAME.match(name):
        return _error(400, "counter: use 1-64 of a-z, 0-9, _ and -")
    try:
        value = Counter.objects.filter(name=name).values_list("value", flat=True).first()
    except OperationalError:
        return _unavailable()
    if value is None:
        return _error(404, f"no counter {name!r}")
    return JsonResponse({"counter": name, "value": value})


@csrf_exempt  # an API for clients that are not browsers; lite_app checks Origin instead
@require_POST
def increment(request: HttpRequest) -> JsonResponse:
    unknown = sorted(set(request.POST) - {"counter", "by"})
    if unknown:
        return _error(400, f"unknown parameter {unknown[0]!r}: use counter, by")
    name = request.POST.get("counter", "hits")
    by = request.POST.get("by", "1")
    if not COUNTER_NAME.match(name):
        return _error(400, "counter: use 1-64 of a-z, 0-9, _ and -")
    if not BY.match(by) or int(by) > MAX_BY:
        return _error(400, f"by: a whole number from 1 to {MAX_BY}")
    try:
        # IMMEDIATE: the write lock is taken at BEGIN, before the read below.
        with transaction.atomic():
            updated = Counter.objects.filter(name=name).update(value=F("value") + int(by))
            value = Counter.objects.filter(name=name).values_list("value", flat=True).first()
    except OperationalError:
        return _unavailable()
    if not updated:
        return _error(404, f"no counter {name!r}")
    return JsonResponse({"counter": name, "value": value})


def _error(status: int, reason: str) -> JsonResponse:
    return JsonResponse({"error": reason}, status=status)


def _unavailable() -> JsonResponse:
    response = _error(503, "database busy, retry later")
    response["Retry-After"] = str(RETRY_AFTER_S)
    return response
