"""Each member's share of a batch's GPU time, to the millisecond (inference/engine/batch_shares.py).

What a request in a batch is billed is its share: these pin the exact shares for given weights and leave times, not
only their total. A fake clock moves in binary fractions of a second (62.5 ms = 1/16 s...), so the meter's float
arithmetic is exact and every number below is computed by hand. No torch, no database: the meter is plain Python.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from inference.engine.batch_shares import BatchMeter, MeterReading, largest_remainder


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


def test_rows_left_behind_by_a_leaver_are_wasted_not_billed_to_those_still_in() -> None:
    clock = Clock()
    meter = BatchMeter([1, 1, 2], clock=clock)  # four images
    clock.advance(0.0625)  # 62.5 ms, 15.625 an image
    assert meter.leave([1], rows_stay=True) == {1: 15}  # its row runs on, unused, to the end of the engine's call
    assert meter.wasted == {1: 0}
    clock.advance(0.125)  # 125 ms over four rows: 31.25 to member 0, 62.5 to member 2, 31.25 to the vacated row
    assert (meter.running_ms(0), meter.running_ms(2)) == (47, 94)  # 15.625 + 31.25, 31.25 + 62.5: their own rows
    meter.free_rows()
    clock.advance(0.0625)  # 62.5 ms over their three rows: 20.833 and 41.667
    # Member 0: 67.708 of its own, 10.417 of the vacated row's time (a third: its images among those still in).
    assert meter.leave([0]) == {0: 67}
    assert meter.wasted[0] == 11  # floor(67.708 + 10.417) - 67
    # The batch took 250 ms; 157 are left for member 2: 135.417 its own, 20.833 wasted -> 136 billed (rounded down).
    assert meter.leave([2]) == {2: 136}
    assert meter.allocated == {0: 67, 1: 15, 2: 136}
    assert meter.wasted == {0: 11, 1: 0, 2: 21}
    assert meter.total_ms() == 250 == sum(meter.allocated.values()) + sum(meter.wasted.values())


def test_rows_dropped_with_their_leaver_waste_nothing() -> None:
    clock = Clock()
    meter = BatchMeter([1, 1], clock=clock)
    clock.advance(0.0625)
    assert meter.leave([0]) == {0: 31}
    clock.advance(0.0625)  # member 1 alone: 31.25 + 62.5
    assert meter.leave([1]) == {1: 94}  # ceil(125) - 31
    assert meter.wasted == {0: 0, 1: 0}


def test_the_last_member_out_ends_the_vacated_rows_with_the_batch() -> None:
    clock = Clock()
    meter = BatchMeter([1, 1], clock=clock)
    clock.advance(0.0625)
    meter.leave([0], rows_stay=True)
    # The last member leaving, its rows staying or not: the batch is over, nothing more is computed.
    assert meter.leave([1], rows_stay=True) == {1: 32}
    assert meter.wasted == {0: 0, 1: 0}
    assert meter.total_ms() == 63


def test_time_written_off_is_wasted_not_billed() -> None:
    clock = Clock()
    meter = BatchMeter([1, 3], clock=clock)
    clock.advance(0.0625)  # 62.5 ms: 15.625 and 46.875
    denoised = meter.reading()
    clock.advance(0.125)  # a decode of 125 ms, cut short: 31.25 and 93.75
    meter.write_off(denoised)
    assert (meter.running_ms(0), meter.running_ms(1)) == (16, 47)  # back to what they were charged before it
    clock.advance(0.0625)  # decoded again: 15.625 and 46.875
    # 250 ms: 62.5 and 187.5 in all -> 63 and 187 (the tie to member 0), half of each billed, rounded down.
    assert meter.leave([0, 1]) == {0: 31, 1: 93}
    assert meter.wasted == {0: 32, 1: 94}
    assert meter.total_ms() == 250


def test_the_end_of_the_engine_call_charges_the_vacated_rows_time_until_then_unread() -> None:
    """Nothing reads the meter between a leave and the engine's call ending: the time in between still ran the
    vacated rows, so its part of it is wasted, not billed to those still in."""
    clock = Clock()
    meter = BatchMeter([1, 1, 2], clock=clock)
    clock.advance(0.0625)  # 15.625 an image
    assert meter.leave([1], rows_stay=True) == {1: 15}
    clock.advance(0.125)  # over four rows: 31.25 to member 0, 62.5 to member 2, 31.25 to the vacated row
    meter.free_rows()
    clock.advance(0.0625)  # over their three rows: 20.833 and 41.667
    # The same figures as when a heartbeat read the shares before the call ended (billed 78 and 157 if this stretch
    # were charged after the rows were freed: the vacated row's 31.25 ms billed to members 0 and 2).
    assert meter.leave([0]) == {0: 67}
    assert meter.leave([2]) == {2: 136}
    assert meter.wasted == {0: 11, 1: 0, 2: 21}
    assert meter.total_ms() == 250


def test_several_vacated_rows_are_wasted_in_full() -> None:
    clock = Clock()
    meter = BatchMeter([2, 1, 1], clock=clock)
    clock.advance(0.0625)  # 31.25, 15.625, 15.625
    assert meter.leave([0], rows_stay=True) == {0: 31}  # its two rows run on, unused
    clock.advance(0.125)  # 31.25 a row: members 1 and 2 31.25 each of their own, the two vacated rows' 62.5 halved
    assert meter.leave([1]) == {1: 46}  # floor(15.625 + 31.25 = 46.875)
    assert meter.wasted[1] == 32  # floor(46.875 + 31.25 = 78.125) - 46
    clock.advance(0.0625)  # member 2 and the two vacated rows: 20.833 of its own, 41.667 wasted
    # Member 2: 67.708 of its own, 72.917 wasted; 250 - 31 - 78 = 141 left for it, 67.885 of them billed.
    assert meter.leave([2]) == {2: 67}
    assert meter.wasted == {0: 0, 1: 32, 2: 74}
    assert meter.total_ms() == 250


def test_a_write_off_under_a_millisecond_is_wasted_too() -> None:
    clock = Clock()
    meter = BatchMeter([1, 1], clock=clock)
    clock.advance(0.0625)  # 31.25 each
    denoised = meter.reading()
    clock.advance(1 / 512)  # a decode of 1.953 ms, cut short: 0.977 each
    meter.write_off(denoised)
    clock.advance(0.0625)  # decoded again: 62.5 each of their own, 0.977 wasted
    # ceil(126.953) = 127: 64 and 63 (the tie to member 0), each billed 62.5 / 63.477 of it, rounded down.
    assert meter.leave([0, 1]) == {0: 63, 1: 62}
    assert meter.wasted == {0: 1, 1: 1}


def test_the_last_member_is_not_billed_its_waste_under_a_millisecond() -> None:
    clock = Clock()
    meter = BatchMeter([1, 1], clock=clock)
    clock.advance(0.0625)
    assert meter.leave([0], rows_stay=True) == {0: 31}
    clock.advance(1 / 512)  # 1.953 ms: 0.977 of member 1's own, 0.977 of the vacated row's
    meter.free_rows()
    clock.advance(0.0625)
    # Member 1: 94.727 of its own, 0.977 wasted; 127 - 31 = 96 left for it, 95.020 of them billed.
    assert meter.leave([1]) == {1: 95}
    assert meter.wasted == {0: 0, 1: 1}
    assert meter.total_ms() == 127


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


# Time in 1024ths of a second (binary fractions keep the clock exact): sixteenths (62.5 ms), or a moment of a
# millisecond or two, so that rounding meets shares and waste under a millisecond.
TICKS = st.integers(min_value=0, max_value=40).map(lambda sixteenths: sixteenths * 64) | st.integers(1, 3)


@settings(database=None, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=1, max_value=6), min_size=2, max_size=6),
    steps=st.lists(TICKS, min_size=1, max_size=8),
    data=st.data(),
)
def test_early_shares_are_their_own_rows_rounded_down_and_all_add_up(
    weights: list[int], steps: list[int], data: st.DataObject
) -> None:
    """A member leaves after each step, its rows dropped or left to run on (several members' rows, of several
    images, at once), and the engine's call may end after a step: each early leaver is billed its own rows' time
    rounded down and its wasted time the rest of its time rounded down, to the millisecond.

    The exact times are computed here as the meter computes them, interval by interval, so their floors compare
    exactly."""
    clock = Clock()
    meter = BatchMeter(weights, clock=clock)
    exact = [0.0] * len(weights)
    wasted_exact = [0.0] * len(weights)
    active = list(range(len(weights)))
    vacated = 0
    for ticks in steps:
        elapsed_ms = ticks * 1000 / 1024
        clock.advance(ticks / 1024)
        weight = sum(weights[member] for member in active)
        rows = weight + vacated
        for member in active:
            exact[member] += elapsed_ms * weights[member] / rows
            wasted_exact[member] += elapsed_ms * vacated / rows * weights[member] / weight
        if vacated and data.draw(st.booleans(), label="the engine's call ends"):
            meter.free_rows()  # nothing read the meter since the time passed
            vacated = 0
        if len(active) > 1:
            member = data.draw(st.sampled_from(active), label="leaves")
            rows_stay = data.draw(st.booleans(), label="its rows run on")
            assert meter.leave([member], rows_stay=rows_stay) == {member: math.floor(exact[member])}
            assert meter.wasted[member] == math.floor(exact[member] + wasted_exact[member]) - math.floor(exact[member])
            active.remove(member)
            vacated += weights[member] if rows_stay else 0
    final = meter.leave(active)
    total_ms = math.ceil(sum(steps) * 1000 / 1024)
    assert sum(meter.allocated.values()) + sum(meter.wasted.values()) == meter.total_ms() == total_ms
    # The last members share what the early ones were not given, each within a millisecond of its part of it, and
    # are billed its own rows' part of theirs, rounded down.
    remaining = total_ms - sum(
        share + meter.wasted[member] for member, share in meter.allocated.items() if member not in final
    )
    left_exact = sum(exact[member] + wasted_exact[member] for member in final)
    for member, share in final.items():
        whole_ms, whole_exact = share + meter.wasted[member], exact[member] + wasted_exact[member]
        ideal = remaining * whole_exact / left_exact if left_exact else remaining / len(final)
        assert abs(whole_ms - ideal) < 1 + 1e-9
        assert share == (math.floor(whole_ms * exact[member] / whole_exact) if wasted_exact[member] else whole_ms)


def test_members_join_a_waiting_batch_and_its_time_counts_from_the_start() -> None:
    clock = Clock()
    meter = BatchMeter(clock=clock)
    meter.join(0, 1)
    clock.advance(1.0)  # the model loading: no GPU work of the batch yet
    assert (meter.running_ms(0), meter.total_ms(), meter.active) == (0, 0, [0])
    meter.join(1, 3)
    meter.start()
    clock.advance(0.125)  # 125 ms shared 1:3 -> 31.25 and 93.75
    assert (meter.running_ms(0), meter.running_ms(1), meter.total_ms()) == (32, 94, 125)
    assert meter.leave([1, 0]) == {0: 31, 1: 94}
    assert meter.total_ms() == 125


def test_a_member_that_leaves_before_the_work_starts_used_no_gpu_time() -> None:
    clock = Clock()
    meter = BatchMeter(clock=clock)
    meter.join(0, 1)
    meter.join(1, 1)
    clock.advance(0.5)
    assert meter.leave([1]) == {1: 0}
    meter.start()
    clock.advance(0.0625)  # member 0 alone
    assert meter.leave([0]) == {0: 63}
    assert meter.allocated == {0: 63, 1: 0}
    assert meter.total_ms() == 63


def test_a_batch_everyone_left_before_its_start_never_starts() -> None:
    clock = Clock()
    meter = BatchMeter(clock=clock)
    meter.join(3, 2)
    assert meter.leave([3]) == {3: 0}
    clock.advance(1.0)
    assert (meter.total_ms(), meter.active, meter.allocated) == (0, [], {3: 0})
    with pytest.raises(ValueError, match="at least one image"):
        meter.start()


def test_a_member_that_joins_a_running_batch_shares_the_time_from_then_on() -> None:
    clock = Clock()
    meter = BatchMeter([1], clock=clock)
    clock.advance(0.0625)  # 62.5 to member 0 alone
    meter.join(1, 1)
    clock.advance(0.0625)  # 31.25 each: member 0 93.75, member 1 31.25
    assert (meter.running_ms(0), meter.running_ms(1)) == (94, 32)
    assert meter.leave([1]) == {1: 31}
    clock.advance(0.0625)  # member 0 alone again
    assert meter.leave([0]) == {0: 157}  # ceil(187.5) = 188, less the 31 given
    assert meter.total_ms() == 188


def test_joins_and_starts_that_make_no_sense_are_refused() -> None:
    clock = Clock()
    meter = BatchMeter([1, 1], clock=clock)
    with pytest.raises(ValueError, match="member 1 has already joined the batch"):
        meter.join(1, 1)
    with pytest.raises(ValueError, match="at least one image"):
        meter.join(2, 0)
    with pytest.raises(ValueError, match="already started"):
        meter.start()
    clock.advance(0.0625)
    assert meter.leave([]) == {}  # nobody leaves: nothing changes
    assert meter.active == [0, 1]
    assert meter.leave([0, 1]) == {0: 32, 1: 31}
    with pytest.raises(ValueError, match="the batch is over"):
        meter.join(2, 1)
    assert meter.leave([]) == {}
    assert meter.allocated == {0: 32, 1: 31}


class BatchLife(RuleBasedStateMachine):
    """A batch under any sequence of joins, its start, time passing, outputs stored, cancels and finishes, with the
    rows of members that leave dropped by the engine or left to run on, unused, until its call ends, and work cut
    short (time written off since a reading).

    Kept here in parallel, in 1024ths of a second (`TICKS`) so the clock is exact: the time of each member's own rows
    (its images' part of the rows the engine computes, or all of it while its outputs are stored) and of the vacated
    rows while it was in. Each member is billed its own rows' time, no more (within the whole-millisecond rounding),
    and once the batch is over the shares and the wasted milliseconds add up to exactly its measured time.

    The heartbeat's read of the running shares is a rule, not an invariant: each read charges the meter up to now,
    so reading after every step would make up for a charge the meter forgot (when the engine's call ends, say).
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.meter = BatchMeter(clock=self.clock)
        self.weights: dict[int, int] = {}
        self.exact_ms: dict[int, float] = {}
        self.wasted_exact_ms: dict[int, float] = {}
        self.active: set[int] = set()
        self.shares: dict[int, int] = {}
        self.wasted: dict[int, int] = {}
        self.vacated = 0  # images of members that left whose rows the engine still computes
        self.started: float | None = None
        self.batch_ms = 0  # once it is over
        self.storing: int | None = None
        # A reading of the meter, and what the members still in had been charged then.
        self.reading: tuple[MeterReading, dict[int, float]] | None = None

    def over(self) -> bool:
        return self.started is not None and not self.active

    @precondition(lambda self: not self.over())
    @rule(weight=st.integers(min_value=1, max_value=6))
    def join(self, weight: int) -> None:
        member = len(self.weights)
        self.meter.join(member, weight)
        self.weights[member], self.exact_ms[member], self.wasted_exact_ms[member] = weight, 0.0, 0.0
        self.active.add(member)

    @precondition(lambda self: self.started is None and self.active)
    @rule()
    def start(self) -> None:
        self.meter.start()
        self.started = self.clock.now

    @rule(ticks=TICKS)
    def time_passes(self, ticks: int) -> None:
        self.clock.advance(ticks / 1024)
        if self.started is None or not self.active:
            return
        elapsed_ms = ticks * 1000 / 1024
        if self.storing is not None:
            self.exact_ms[self.storing] += elapsed_ms
            return
        weight = sum(self.weights[member] for member in self.active)
        rows = weight + self.vacated
        for member in self.active:
            self.exact_ms[member] += elapsed_ms * self.weights[member] / rows
            self.wasted_exact_ms[member] += elapsed_ms * self.vacated / rows * self.weights[member] / weight

    @precondition(lambda self: self.active)
    @rule()
    def heartbeat(self) -> None:
        """Each member's running share: its own rows' time so far, rounded up (0 before the work starts)."""
        for member in self.active:
            assert self.exact_ms[member] - 1e-6 <= self.meter.running_ms(member) < self.exact_ms[member] + 1 + 1e-6

    @precondition(lambda self: self.active)
    @rule()
    def read(self) -> None:
        self.reading = (self.meter.reading(), {member: self.exact_ms[member] for member in self.active})

    @precondition(lambda self: self.reading is not None)
    @rule()
    def write_off(self) -> None:
        """What the members still in were charged since the reading did nothing (a decode cut short)."""
        assert self.reading is not None
        reading, charged_then = self.reading
        self.meter.write_off(reading)
        for member in self.active:
            charged = self.exact_ms[member] - charged_then.get(member, 0.0)
            if charged > 0:
                self.exact_ms[member] -= charged
                self.wasted_exact_ms[member] += charged

    @rule()
    def engine_call_ends(self) -> None:
        self.meter.free_rows()
        self.vacated = 0

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def store_outputs(self, data: st.DataObject) -> None:
        member = data.draw(st.sampled_from(sorted(self.active)))
        self.meter.exclusive(member)
        self.storing = member

    @precondition(lambda self: self.storing is not None)
    @rule()
    def share_again(self) -> None:
        self.meter.exclusive(None)
        self.storing = None

    @precondition(lambda self: self.active)
    @rule(data=st.data(), rows_stay=st.booleans())
    def leave(self, data: st.DataObject, rows_stay: bool) -> None:
        """Members cancelled, failed, lost or finished: one, several together, or all that are left; their rows
        dropped or left to run on."""
        leaving = data.draw(st.sets(st.sampled_from(sorted(self.active)), min_size=1))
        given_before = sum(self.shares.values()) + sum(self.wasted.values())
        shares = self.meter.leave(leaving, rows_stay=rows_stay)
        wasted = {member: self.meter.wasted[member] for member in leaving}
        assert sorted(shares) == sorted(leaving)
        self.active -= leaving
        if self.storing in leaving:
            self.storing = None
        if self.started is None:
            assert set(shares.values()) == set(wasted.values()) == {0}
        elif self.active:
            for member, share in shares.items():  # rounded down, its own rows and its time in all
                whole_exact = self.exact_ms[member] + self.wasted_exact_ms[member]
                assert self.exact_ms[member] - 1 < share <= self.exact_ms[member] + 1e-6
                assert whole_exact - 1 < share + wasted[member] <= whole_exact + 1e-6
            if rows_stay:
                self.vacated += sum(self.weights[member] for member in leaving)
        else:
            total_ms = math.ceil((self.clock.now - self.started) * 1000)
            assert sum(shares.values()) + sum(wasted.values()) == total_ms - given_before
            self.batch_ms = total_ms
            exact = {member: self.exact_ms[member] + self.wasted_exact_ms[member] for member in leaving}
            left_exact = sum(exact.values())
            for member, share in shares.items():
                ideal = (total_ms - given_before) * (exact[member] / left_exact if left_exact else 1 / len(leaving))
                assert abs(share + wasted[member] - ideal) < 1 + 1e-6
                # Billed for no more than its own rows' part of its time.
                if exact[member]:
                    assert share <= (share + wasted[member]) * self.exact_ms[member] / exact[member] + 1e-6
            self.vacated = 0
        # Billed for its own rows, within the rounding: the last ones take what the earlier ones' rounding left,
        # under a millisecond each, and the batch's rounding up.
        for member, share in shares.items():
            assert share < self.exact_ms[member] + len(self.weights) + 1
        self.shares.update(shares)
        self.wasted.update(wasted)

    @invariant()
    def shares_add_up(self) -> None:
        assert self.meter.active == sorted(self.active)
        assert self.meter.allocated == self.shares
        assert self.meter.wasted == self.wasted
        assert all(share >= 0 for share in (*self.shares.values(), *self.wasted.values()))
        # Nothing wasted where no vacated rows ran while the member was in.
        assert all(self.wasted[member] == 0 for member in self.wasted if not self.wasted_exact_ms[member])
        if self.over():
            assert sum(self.shares.values()) + sum(self.wasted.values()) == self.meter.total_ms() == self.batch_ms
        elif self.started is None:
            assert self.meter.total_ms() == 0
        else:
            assert self.meter.total_ms() == math.ceil((self.clock.now - self.started) * 1000)

    def teardown(self) -> None:
        """Whatever happened, the batch ends: those still in it finish together and the shares are the batch's time."""
        if self.started is None or not self.active:
            return
        self.meter.leave(self.active)
        total_ms = math.ceil((self.clock.now - self.started) * 1000)
        assert sum(self.meter.allocated.values()) + sum(self.meter.wasted.values()) == self.meter.total_ms() == total_ms


def test_shares_add_up_to_the_batch_time_whatever_joins_leaves_and_cancels() -> None:
    run_state_machine_as_test(BatchLife, settings=settings(database=None, deadline=None, max_examples=200))
