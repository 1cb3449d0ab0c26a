"""GPU time of a batch, split among the requests in it so that metering stays exact.

`BatchMeter` is the one place a request's share of a batch is computed; the worker tells it what happens (a member
joins, the work starts, a member's outputs are being stored, members leave, the engine's call ends) and records the
shares it answers.

Members join the batch (the job that claimed the work, then the companions it gathered), then its GPU work starts.
From then on, every interval of wall-clock time (monotonic) is shared by the rows the engine computes, in proportion to
their images; while one member's outputs are stored, that time is its alone. A member that leaves while others stay
(cancelled at a step, finished first, failed, lost) takes its share so far, rounded down to whole milliseconds; the
members that leave last share what remains of the batch's measured time, rounded up as a single job's is, by the
largest-remainder rule (ties to the lower member number). A member that leaves before the work starts used no GPU
time: its share is 0.

Where the engine cannot drop a leaving member's rows (a captured CUDA graph's fixed shapes, a scheduler with per-row
history, a video or audio pipeline's call), they run on, unused, until the engine's call ends (`free_rows`). Their
time did nothing for anyone: it is not the leaver's (closed already) nor its companions' (they never asked for it).
Each member still in is charged only its own rows, and the part of the interval that went to the vacated rows is
*wasted*, written to those members in proportion to their images so that it is recorded (unbilled) with their
attempts. Likewise time the worker writes off (`write_off`: a decode cut short by its time limit, done again).

So each member's billed share is the time of its own rows, and the shares and the wasted milliseconds are whole and
always add up to exactly the batch's measured milliseconds.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MeterReading:
    """What each member still in had been charged at one instant (`BatchMeter.reading`)."""

    charged_ms: Mapping[int, float]


class BatchMeter:
    """Shares of one batch's GPU time, for members numbered by the caller (their place in the batch).

    Thread-safe: the heartbeat reads running shares while the run goes on.
    """

    def __init__(
        self,
        weights: Sequence[int] | None = None,
        *,
        started: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`weights`: members 0..n-1 of so many images each, in a batch whose work started at `started` (the clock's
        now by default). Without them the batch is empty and waits: members `join` it, then it `start`s."""
        self._clock = clock
        self._weights: dict[int, int] = {}
        self._exact_ms: dict[int, float] = {}
        self._wasted_exact_ms: dict[int, float] = {}
        self._active: set[int] = set()
        self._allocated: dict[int, int] = {}
        self._wasted: dict[int, int] = {}
        # Images of members that left whose rows the engine still computes, unused.
        self._vacated = 0
        self._exclusive: int | None = None
        self._started: float | None = None
        self._lock = threading.Lock()
        if weights is not None:
            for member, weight in enumerate(weights):
                self.join(member, weight)
            self.start(started)

    @property
    def active(self) -> list[int]:
        with self._lock:
            return sorted(self._active)

    @property
    def allocated(self) -> dict[int, int]:
        """Whole milliseconds given to each member that has left: what it is billed for."""
        with self._lock:
            return dict(self._allocated)

    @property
    def wasted(self) -> dict[int, int]:
        """Whole milliseconds of wasted time written to each member that has left: recorded with it, never billed."""
        with self._lock:
            return dict(self._wasted)

    def join(self, member: int, weight: int) -> None:
        """`member`, of `weight` images, is in the batch from now on (from the start, if the work has not started)."""
        if weight < 1:
            raise ValueError("every member weighs at least one image")
        with self._lock:
            if member in self._weights:
                raise ValueError(f"member {member} has already joined the batch")
            if self._started is not None and not self._active:
                raise ValueError("the batch is over: every member has left it")
            self._charge(self._clock())
            self._weights[member] = weight
            self._exact_ms[member] = 0.0
            self._wasted_exact_ms[member] = 0.0
            self._active.add(member)

    def start(self, at: float | None = None) -> None:
        """The batch's GPU work starts (at `at` by the meter's clock, now by default): its time counts from here."""
        with self._lock:
            if self._started is not None:
                raise ValueError("the batch has already started")
            if not self._active:
                raise ValueError("a batch starts with at least one image")
            # Time is charged to the members up to `_mark`, from the start on.
            self._started = self._mark = self._clock() if at is None else at

    def running_ms(self, member: int) -> int:
        """The member's billed share so far (rounded up, as a heartbeat reports a single job's time)."""
        with self._lock:
            self._charge(self._clock())
            return math.ceil(self._exact_ms[member])

    def exclusive(self, member: int | None) -> None:
        """From now on, time is charged to `member` alone (its outputs being stored); None: shared again."""
        with self._lock:
            self._charge(self._clock())
            if member is not None and member not in self._active:
                raise ValueError(f"member {member} has left the batch")
            self._exclusive = member

    def free_rows(self) -> None:
        """The engine's call is over: the rows of members that had left are computed no more."""
        with self._lock:
            self._charge(self._clock())
            self._vacated = 0

    def reading(self) -> MeterReading:
        """What the members still in have been charged until now: see `write_off`."""
        with self._lock:
            self._charge(self._clock())
            return MeterReading({member: self._exact_ms[member] for member in self._active})

    def write_off(self, since: MeterReading) -> None:
        """What the members still in were charged after `since` did nothing for them (work cut short, to be done
        again): it is wasted instead, theirs to record, not to be billed."""
        with self._lock:
            self._charge(self._clock())
            for member in self._active:
                charged = self._exact_ms[member] - since.charged_ms.get(member, 0.0)
                if charged > 0:
                    self._exact_ms[member] -= charged
                    self._wasted_exact_ms[member] += charged

    def leave(self, members: Iterable[int], *, rows_stay: bool = False) -> dict[int, int]:
        """Members that are done (finished, cancelled, failed, lost): their whole-millisecond shares, now final
        (and their wasted milliseconds, in `wasted`).

        Members that finish together leave in one call: they share what is left of the batch's time. `rows_stay`:
        the engine goes on computing their rows, unused, until `free_rows`.
        """
        leaving = sorted(set(members))
        if not leaving:
            return {}
        with self._lock:
            now = self._clock()
            self._charge(now)
            unknown = [member for member in leaving if member not in self._active]
            if unknown:
                raise ValueError(f"members {unknown} are not in the batch")
            self._active.difference_update(leaving)
            if self._exclusive in leaving:
                self._exclusive = None
            if self._started is None:
                shares = dict.fromkeys(leaving, 0)  # no GPU work yet
                wasted = dict.fromkeys(leaving, 0)
            elif self._active:
                shares = {member: math.floor(self._exact_ms[member]) for member in leaving}
                wasted = {
                    member: math.floor(self._exact_ms[member] + self._wasted_exact_ms[member]) - shares[member]
                    for member in leaving
                }
                if rows_stay:
                    self._vacated += sum(self._weights[member] for member in leaving)
            else:
                # The last to leave close the batch: they share what the others were not given, so the total is
                # exactly the batch's time as a single job would be measured.
                total_ms = math.ceil((now - self._started) * 1000)
                remaining = total_ms - sum(self._allocated.values()) - sum(self._wasted.values())
                whole = largest_remainder(
                    {member: self._exact_ms[member] + self._wasted_exact_ms[member] for member in leaving}, remaining
                )
                shares = {
                    member: _billed_part(whole[member], self._exact_ms[member], self._wasted_exact_ms[member])
                    for member in leaving
                }
                wasted = {member: whole[member] - shares[member] for member in leaving}
                self._vacated = 0
            self._allocated.update(shares)
            self._wasted.update(wasted)
            return shares

    def total_ms(self) -> int:
        """The batch's measured time; final once every member has left (then it is the sum of the shares and the
        wasted milliseconds)."""
        with self._lock:
            if not self._active:
                return sum(self._allocated.values()) + sum(self._wasted.values())
            if self._started is None:
                return 0
            return math.ceil((self._clock() - self._started) * 1000)

    def _charge(self, now: float) -> None:
        if self._started is None:
            return
        elapsed_ms = max(0.0, (now - self._mark) * 1000)
        self._mark = now
        if self._exclusive is not None:
            self._exact_ms[self._exclusive] += elapsed_ms
            return
        weight = sum(self._weights[member] for member in self._active)
        if not weight:
            return
        rows = weight + self._vacated
        for member in self._active:
            self._exact_ms[member] += elapsed_ms * self._weights[member] / rows
            if self._vacated:
                # The vacated rows' part of the interval, written to those still in by their images.
                self._wasted_exact_ms[member] += elapsed_ms * self._vacated / rows * self._weights[member] / weight


def _billed_part(whole_ms: int, billed_exact: float, wasted_exact: float) -> int:
    """Of a last member's whole milliseconds, what it is billed for: its billed part rounded down, so a millisecond
    that rounding leaves between its billed and wasted time is never billed."""
    if wasted_exact <= 0:
        return whole_ms
    return math.floor(whole_ms * billed_exact / (billed_exact + wasted_exact))


def largest_remainder(exact: dict[int, float], total: int) -> dict[int, int]:
    """`total` whole units split in proportion to `exact`, each share within one unit of its exact value.

    Deterministic: the units left after rounding down go to the largest fractional parts, ties to the lower key.
    When `total` differs from the exact sum (the batch's time is rounded up), the shares are scaled to it first.
    """
    if total < 0:
        raise ValueError("cannot share a negative total")
    if not exact:
        raise ValueError("nobody to share with")
    exact_sum = sum(exact.values())
    scaled = (
        {key: total * (value / exact_sum) for key, value in exact.items()}
        if exact_sum > 0
        else {key: total / len(exact) for key in exact}
    )
    shares = {key: math.floor(value) for key, value in scaled.items()}
    left = total - sum(shares.values())
    by_remainder = sorted(scaled, key=lambda key: (-(scaled[key] - shares[key]), key))
    for index in range(left):
        shares[by_remainder[index % len(by_remainder)]] += 1
    return shares
