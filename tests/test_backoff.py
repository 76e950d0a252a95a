"""The one exponential-backoff helper every retry loop uses (pure logic)."""

from __future__ import annotations

import pytest

from celery_consul_lock.backoff import Backoff


def test_delays_double_from_first_up_to_the_maximum_and_start_over_on_reset():
    backoff = Backoff(0.1, 0.5)
    assert backoff.peek() == 0.1
    assert [backoff.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert backoff.peek() == 0.5
    backoff.reset()
    assert backoff.next() == 0.1 and backoff.peek() == 0.2


@pytest.mark.parametrize(("first", "maximum"), [(0, 1), (-1, 1), (2, 1)])
def test_bounds_out_of_order_are_refused_naming_both(first, maximum):
    with pytest.raises(ValueError, match=f"first={first} maximum={maximum}"):
        Backoff(first, maximum)
