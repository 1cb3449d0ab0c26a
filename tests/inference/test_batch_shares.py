"""Each member's share of a batch's GPU time, to the millisecond (inference/engine/metering.py).

What a request in a batch is billed is its share: these pin the exact shares for given weights and leave times, not
only their total. A fake clock moves in binary fractions of a second (62.5 ms = 1/16 s...), so the meter's float
arithmetic is exact and every number below is computed by hand. No torch, no database: the meter is plain Python.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.engine.metering import BatchMeter, largest_remainder


class Clock:
    """A monotonic clock the test moves by hand, in seconds."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_an_early_leaver_takes_its_share_rounded_down_and_the_last_share_the_rest() -> None:
    clock = Clock()
    meter = BatchMeter([1, 2, 1], clock=clock)  # four images in all
    clock.advance(0.0625)  # 62.5 ms shared 1:2:1 -> 15.625, 31.25, 15.625
    assert [meter.running_ms(member) for member in (0, 1, 2)] == [16, 32, 16]  # running shares round up
    assert meter.total_ms() == 63  # ceil(62.5)
    assert meter.leave([0]) == {0: 15}  # floor(15.625)
    assert meter.active == [1, 2]
    clock.advance(0.125)  # 125 ms shared 2:1 by those left -> 1: 31.25 + 83.33 = 114.583, 2: 15.625 + 41.67 = 57.292
    # The batch took ceil(187.5) = 188 ms; 188 - 15 = 173 are left for 1 and 2, in proportion 114.583 : 57.292 (2:1):
    # 115.333 and 57.667 -> floors 115 + 57 = 172, the spare millisecond to the larger remainder (member 2).
    assert meter.leave([2, 1]) == {1: 115, 2: 58}
    assert meter.allocated == {0: 15, 1: 115, 2: 58}
    assert meter.total_ms() == 188 == sum(meter.allocated.values())
    assert meter.active == []
    clock.advance(5.0)  # once every member has left, the total is final
    assert meter.total_ms() == 188


def test_equal_remainders_go_to_the_earlier_member() -> None:
    clock = Clock()
    meter = BatchMeter([1, 1], clock=clock)
    clock.advance(0.0625)  # 62.5 ms -> ceil 63, 31.5 each: the spare millisecond to member 0, whatever the leave order
    assert meter.leave([1, 0]) == {0: 32, 1: 31}

    clock = Clock()
    meter = BatchMeter([1, 1, 1], clock=clock)
    clock.advance(0.03125)  # 31.25 ms, 10.417 each
    assert meter.leave([0]) == {0: 10}
    clock.advance(0.03125)  # 15.625 more each for 1 and 2: 26.042 each; 63 - 10 = 53 left: 26.5 each
    assert meter.leave([2, 1]) == {1: 27, 2: 26}  # the tie goes to member 1, the earlier of the two
    assert meter.total_ms() == 63


def test_time_storing_one_members_outputs_is_that_members_alone() -> None:
    clock = Clock()
    meter = BatchMeter([1, 1], clock=clock)
    clock.advance(0.125)  # 62.5 each
    meter.exclusive(1)
    clock.advance(0.0625)  # 62.5 to member 1 alone: 125
    meter.exclusive(None)
    assert meter.leave([1]) == {1: 125}
    clock.advance(0.125)  # member 0 alone from here: 62.5 + 125 = 187.5
    assert meter.leave([0]) == {0: 188}  # the last: ceil(312.5) = 313, less the 125 given
    assert meter.total_ms() == 313


def test_a_member_that_leaves_while_storing_gives_the_time_back_to_the_others() -> None:
    clock = Clock()
    meter = BatchMeter([1, 1, 1], clock=clock)
    clock.advance(0.0625)  # 20.833 each
    meter.exclusive(0)
    clock.advance(0.0625)  # member 0: 83.333
    assert meter.leave([0]) == {0: 83}
    clock.advance(0.125)  # shared again by 1 and 2: 20.833 + 62.5 = 83.333 each
    assert meter.leave([1]) == {1: 83}
    assert meter.leave([2]) == {2: 84}  # ceil(250) - 83 - 83
    with pytest.raises(ValueError, match="has left the batch"):
        meter.exclusive(0)


def test_a_second_of_batch_time_is_a_thousand_milliseconds() -> None:
    clock = Clock()
    meter = BatchMeter([3], clock=clock)
    clock.advance(1.0)
    assert (meter.total_ms(), meter.running_ms(0)) == (1_000, 1_000)
    clock.advance(2.5)
    assert meter.leave([0]) == {0: 3_500}


def test_time_before_the_meter_was_made_counts_from_started() -> None:
    clock = Clock(10.0)
    meter = BatchMeter([1, 3], started=9.875, clock=clock)
    assert meter.total_ms() == 125
    assert meter.running_ms(1) == 94  # ceil(125 * 3/4 = 93.75)
    clock.advance(0.125)  # 62.5 and 187.5 of 250: floors 62 + 187, the tie to member 0
    assert meter.leave([0, 1]) == {0: 63, 1: 187}


def test_a_clock_that_goes_back_charges_nothing() -> None:
    clock = Clock(5.0)
    meter = BatchMeter([1, 1], clock=clock)
    clock.advance(0.125)  # 62.5 each
    assert meter.running_ms(0) == 63
    clock.advance(-0.0625)  # never for a monotonic clock; no time is taken back
    assert meter.leave([0]) == {0: 62}
    clock.advance(0.125)
    assert meter.leave([1]) == {1: 126}  # ceil((5.1875 - 5.0) * 1000) = 188, less 62


def test_members_must_weigh_something_and_be_in_the_batch() -> None:
    for weights in ([], [1, 0], [2, -1]):
        with pytest.raises(ValueError, match="at least one image"):
            BatchMeter(weights, clock=Clock())
    meter = BatchMeter([1, 1], clock=Clock())
    meter.leave([0])
    with pytest.raises(ValueError, match=r"members \[0\] are not in the batch"):
        meter.leave([0, 1])
    assert meter.active == [1]  # a refused leave changes nothing


def test_largest_remainder_shares_whole_units() -> None:
    assert largest_remainder({0: 1.0, 1: 1.0, 2: 1.0}, 100) == {0: 34, 1: 33, 2: 33}
    assert largest_remainder({4: 1.0, 2: 1.0}, 3) == {2: 2, 4: 1}  # ties to the lower key, not the first given
    assert largest_remainder({0: 0.0, 1: 0.0, 2: 0.0}, 5) == {0: 2, 1: 2, 2: 1}  # nothing measured: equal shares
    assert largest_remainder({0: 10.0, 1: 30.0}, 8) == {0: 2, 1: 6}  # scaled to the total: 2 and 6 exactly
    assert largest_remainder({0: 0.2, 1: 0.7, 2: 0.1}, 0) == {0: 0, 1: 0, 2: 0}
    assert largest_remainder({0: 0.25, 1: 0.75}, 4) == {0: 1, 1: 3}  # under a millisecond measured: still 1:3
    assert largest_remainder({7: 2.5}, 9) == {7: 9}
    with pytest.raises(ValueError, match="negative"):
        largest_remainder({0: 1.0}, -1)
    with pytest.raises(ValueError, match="nobody"):
        largest_remainder({}, 1)


@settings(database=None, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=1, max_value=6), min_size=2, max_size=6),
    # Sixteenths of a second: 62.5 ms steps keep the meter's arithmetic exact.
    steps=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=8),
    leavers=st.data(),
)
def test_early_shares_are_their_exact_share_rounded_down_and_all_add_up(
    weights: list[int], steps: list[int], leavers: st.DataObject
) -> None:
    clock = Clock()
    meter = BatchMeter(weights, clock=clock)
    exact = [0.0] * len(weights)
    active = list(range(len(weights)))
    for sixteenths in steps:
        elapsed_ms = sixteenths * 62.5
        clock.advance(sixteenths / 16)
        weight = sum(weights[member] for member in active)
        for member in active:
            exact[member] += elapsed_ms * weights[member] / weight
        if len(active) > 1:
            member = leavers.draw(st.sampled_from(active))
            assert meter.leave([member]) == {member: math.floor(exact[member])}
            active.remove(member)
    final = meter.leave(active)
    total_ms = math.ceil(sum(steps) * 62.5)
    assert sum(meter.allocated.values()) == meter.total_ms() == total_ms
    # The last members share what the early ones were not given, each within a millisecond of its part of it.
    remaining = total_ms - sum(share for member, share in meter.allocated.items() if member not in final)
    left_exact = sum(exact[member] for member in final)
    for member, share in final.items():
        ideal = remaining * exact[member] / left_exact if left_exact else remaining / len(final)
        assert abs(share - ideal) < 1 + 1e-9
