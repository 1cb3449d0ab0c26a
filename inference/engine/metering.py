"""GPU time of a batch, split among the requests in it so that metering stays exact.

While the batch runs, every interval of wall-clock time (monotonic) is shared by the requests still in it, in
proportion to their images. A request that leaves early (cancelled at a step) takes its share so far, rounded down
to whole milliseconds; the requests that leave last share what remains of the batch's measured time, rounded up as
a single job's is, by the largest-remainder rule (ties to the earlier request). So the shares are whole
milliseconds and always add up to exactly the batch's measured milliseconds.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence


class BatchMeter:
    """Shares of one batch's GPU time. Members are numbered 0..n-1 in batch order.

    Thread-safe: the heartbeat reads running shares while the run goes on.
    """

    def __init__(
        self, weights: Sequence[int], *, started: float | None = None, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        if not weights or any(weight < 1 for weight in weights):
            raise ValueError("every member weighs at least one image")
        self._clock = clock
        self._weights = list(weights)
        self._started = clock() if started is None else started
        self._mark = self._started
        self._exact_ms = [0.0] * len(weights)
        self._active = set(range(len(weights)))
        self._allocated: dict[int, int] = {}
        self._exclusive: int | None = None
        self._lock = threading.Lock()

    @property
    def active(self) -> list[int]:
        with self._lock:
            return sorted(self._active)

    @property
    def allocated(self) -> dict[int, int]:
        """Whole milliseconds given to each member that has left."""
        with self._lock:
            return dict(self._allocated)

    def running_ms(self, member: int) -> int:
        """The member's share so far (rounded up, as a heartbeat reports a single job's time)."""
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

    def leave(self, members: Iterable[int]) -> dict[int, int]:
        """Members that are done (finished, cancelled, failed): their whole-millisecond shares, now final."""
        leaving = sorted(set(members))
        with self._lock:
            now = self._clock()
            self._charge(now)
            unknown = [member for member in leaving if member not in self._active]
            if unknown:
                raise ValueError(f"members {unknown} are not in the batch")
            self._active.difference_update(leaving)
            if self._exclusive in leaving:
                self._exclusive = None
            if self._active:
                shares = {member: math.floor(self._exact_ms[member]) for member in leaving}
            else:
                # The last to leave close the batch: they share what the others were not given, so the total is
                # exactly the batch's time as a single job would be measured.
                total_ms = math.ceil((now - self._started) * 1000)
                remaining = total_ms - sum(self._allocated.values())
                shares = largest_remainder({member: self._exact_ms[member] for member in leaving}, remaining)
            self._allocated.update(shares)
            return shares

    def total_ms(self) -> int:
        """The batch's measured time; final once every member has left (then it is the sum of the shares)."""
        with self._lock:
            if not self._active:
                return sum(self._allocated.values())
            return math.ceil((self._clock() - self._started) * 1000)

    def _charge(self, now: float) -> None:
        elapsed_ms = max(0.0, (now - self._mark) * 1000)
        self._mark = now
        if not self._active or not elapsed_ms:
            return
        if self._exclusive is not None:
            self._exact_ms[self._exclusive] += elapsed_ms
            return
        weight = sum(self._weights[member] for member in self._active)
        for member in self._active:
            self._exact_ms[member] += elapsed_ms * self._weights[member] / weight


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
