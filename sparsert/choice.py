"""Per call, whether a plan runs its ops split between the threads or all of them on one: whichever recent
calls measured faster.

Splitting an op's work makes each thread read what the other one wrote in the op before. On a machine
whose two cores share a cache that costs little; on this VM the host places the two vCPUs on one die or on
two for seconds to minutes at a time (`bench/core_roundtrip.c`: a cache line's round trip 55 ns or 330 ns),
and on two dies a batch-1 ResNet whose every op is split ran 1.3-1.9x slower than on one thread
(torchvision resnet18 per-layer 98%: 0.19 ms serial in both states, 0.19 split on one die, 0.37 on two;
bench/RESULTS.md). No setting fits both states, and which one holds cannot be known in advance, so a plan
that has both tables times its calls and keeps the faster, trying the other one now and then.
"""
from __future__ import annotations

from collections import deque

SPLIT, SERIAL = 0, 1
SETTLE = 3              # calls a table gets before any comparison (the first ones fault pages in)
WINDOW = 8              # recent calls of each table a comparison takes the median of
PROBE_SECONDS = 0.02    # time between two tries of the other table ...
MAX_PROBE_SECONDS = 0.2  # ... doubled after each try that loses by LOSS_MARGIN, up to this: the host keeps a
                         # placement for seconds or more, and a clear loss costs (ratio - 1) x one call per interval
MIN_CALLS_BETWEEN = 32  # and never before this many calls of the chosen table (long calls: a batch of 64)
SWITCH_MARGIN = 0.95    # the other table takes over when its median is this much of the chosen one's
LOSS_MARGIN = 1.25      # a try this much slower backs off
DRIFT = 1.2             # the chosen table's median this much above its last comparison's: try the other as soon
                        # as MIN_CALLS_BETWEEN allows


class SplitChoice:
    """Which op table (SPLIT or SERIAL) the next call runs (`next`); `record` its time. Times are seconds of
    time.perf_counter (passed in, so a test can play any sequence). Not thread-safe: the plan calls it only
    under its arena lock (a concurrent caller runs the chosen table untimed). ~1 us a call."""

    def __init__(self):
        self.chosen = SPLIT
        self.times = (deque(maxlen=WINDOW), deque(maxlen=WINDOW))
        self.calls = [0, 0]        # per table, calls run (a report: how often each won)
        self.probe_seconds = PROBE_SECONDS
        self._next_probe = 0.0     # when to try the other table again
        self._since_probe = 0      # calls of the chosen table since the other one last ran
        self._reference = None     # the chosen table's median at the last comparison
        self._drifted = False

    def next(self, now: float) -> int:
        other = 1 - self.chosen
        if 0 < len(self.times[other]) < SETTLE:
            return other  # a table with too few tries for a comparison gets them in a row
        if self._since_probe >= max(MIN_CALLS_BETWEEN, SETTLE) and (self._drifted or now >= self._next_probe):
            return other
        return self.chosen

    def record(self, table: int, seconds: float, now: float) -> None:
        self.calls[table] += 1
        times = self.times[table]
        times.append(seconds)
        if table == self.chosen:
            self._since_probe += 1
            # Slower than at the last comparison (the host moved the cores?): try the other table soon.
            if self._reference is not None and self._since_probe % SETTLE == 0 and \
                    _median(times) > DRIFT * self._reference:
                self._drifted = True
            return
        self._since_probe, self._drifted = 0, False
        if len(times) < SETTLE:
            return
        # Its last SETTLE tries against the chosen table's recent calls: a try from before the host moved the
        # cores is outvoted by newer ones.
        theirs, mine = _median(list(times)[-SETTLE:]), _median(self.times[self.chosen])
        if theirs < SWITCH_MARGIN * mine:
            # The old table's calls are about to grow stale: its next tries start afresh, SETTLE in a row.
            self.times[self.chosen].clear()
            self.chosen, self._reference, self.probe_seconds = table, theirs, PROBE_SECONDS
        else:
            self._reference = mine
            self.probe_seconds = min(2 * self.probe_seconds, MAX_PROBE_SECONDS) if theirs > LOSS_MARGIN * mine \
                else PROBE_SECONDS
        self._next_probe = now + self.probe_seconds


def _median(values) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]  # the upper one of an even count: cheaper than statistics.median, as good here
