"""GET /lite/get?counter=NAME and POST /lite/inc (counter, by): lite's JSON and statuses.

400 for a bad parameter, 404 for an unknown counter, 405 for a wrong
method, 503 + Retry-After when the database cannot be reached within the
lock budget (Django's OperationalError, e.g. "database is locked"):
lite_counters' input rules, and its answers (answer_for) from one place,
the decorator `answers_lite_errors`.
"""

import functools
from collections.abc import Callable

from django.db import OperationalError, transaction
from django.db.models import F
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

import lite_counters
import lite_db
from django_counter.models import Counter

DEFAULT_COUNTER = "hits"  # the counter a request that names none means

View = Callable[[HttpRequest], JsonResponse]


def answers_lite_errors(view: View) -> View:
    """The one place lite's errors become answers, as lite_counters.answer_for says."""

    @functools.wraps(view)
    def answering(request: HttpRequest) -> JsonResponse:
        try:
            return view(request)
        except OperationalError as exc:  # lite_django's lite_db.Unavailable: nothing was written
            answer = lite_counters.answer_for(lite_db.Unavailable(str(exc)))
        except lite_counters.ERRORS as exc:
            answer = lite_counters.answer_for(exc)
        status, error, headers = answer
        return JsonResponse({"error": error}, status=status, headers=headers)

    return answering


@require_GET
@answers_lite_errors
def get_counter(request: HttpRequest) -> JsonResponse:
    name = lite_counters.counter_name_from(request.GET.getlist("counter")) or DEFAULT_COUNTER
    value = Counter.objects.filter(name=name).values_list("value", flat=True).first()
    if value is None:
        raise lite_counters.NoSuchCounter(name)
    return JsonResponse({"counter": name, "value": value})


@csrf_exempt  # an API for clients that are not browsers; lite_app checks Origin instead
@require_POST
@answers_lite_errors
def increment(request: HttpRequest) -> JsonResponse:
    unknown = sorted(set(request.POST) - {"counter", "by"})
    if unknown:
        raise lite_counters.BadInput(f"unknown parameter {unknown[0]!r}: use counter, by")
    name = lite_counters.counter_name_from(request.POST.getlist("counter")) or DEFAULT_COUNTER
    by = lite_counters.step_from(request.POST.getlist("by"))
    # IMMEDIATE: the write lock is taken at BEGIN, before the read below.
    with transaction.atomic():
        updated = Counter.objects.filter(name=name).update(value=F("value") + by)
        value = Counter.objects.filter(name=name).values_list("value", flat=True).first()
    if not updated:
        raise lite_counters.NoSuchCounter(name)
    return JsonResponse({"counter": name, "value": value})
