"""The history checker's rule for config resets: it must catch a version applied twice."""

import pytest
from history import check_runs


def test_one_reset_to_a_value_far_above_gives_two_runs_apart():
    check_runs([11, 12, 13, 1001, 1002], starts=[10, 1000], final=1002)


def test_a_touch_gives_two_overlapping_runs_from_the_same_start():
    check_runs([1, 2, 3, 4, 1, 2], starts=[0, 0], final=2)


def test_no_increment_after_the_last_reset():
    check_runs([1, 2, 3], starts=[0, 500], final=500)


@pytest.mark.parametrize(
    ("values", "starts", "final"),
    [
        ([11, 12, 1001, 1002, 1001], [10, 1000], 1001),  # 1000 applied twice
        ([1, 2, 1, 2, 1], [0, 0], 1),  # a touch applied twice
        ([11, 12, 14, 1001], [10, 1000], 1001),  # 13 missing: a lost increment
        ([11, 12, 12, 1001], [10, 1000], 1001),  # 12 acknowledged twice
        ([11, 1001], [10, 1000], 1002),  # the final value was never acknowledged
    ],
    ids=["applied-twice", "touch-applied-twice", "gap", "duplicate", "final-not-acked"],
)
def test_what_no_single_application_explains_is_refused(values, starts, final):
    with pytest.raises(AssertionError):
        check_runs(values, starts, final)
