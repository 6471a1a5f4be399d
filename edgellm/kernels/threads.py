"""How many threads a fused decode step should use, chosen from the step times it sees.

A fused decode step (``LlamaModel.decode_blocks_fused``) runs every block in one parallel
region with four barriers a layer: about 120 a step for SmolLM2. On an idle machine two threads
beat one. When other processes compete for the cores, a thread that reaches a barrier waits for
a partner the OS has descheduled, and each of those waits costs a time slice: measured here at a
load average of 9 on 2 cores, the default model decoded at 0.7 tok/s on 2 threads and 5.9 tok/s
on 1. This chooser keeps the configured thread count while steps run at their usual speed; when
they slow down markedly -- or on the first steps, which have no quiet time to compare with -- it
times a few steps with one thread and keeps whichever is faster, and from one thread it probes the
full count again now and then, so it returns once the load is gone.

Step times are compared only between steps of the same batch size (more sequences, more work).
The ModelRunner applies the chooser to each fused step it runs (``runner.thread_chooser``).
"""

from __future__ import annotations

import statistics
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager

WINDOW = 6           # steps in a median
SLOW = 1.6           # a step median this many times the best seen means "contended"
GAIN = 0.8           # leave the configured count when one thread's median is below this fraction
# Return to the configured count as soon as it is faster at all: on a host whose second vCPU gives
# only 1.2-1.35x (measured on this project's VM on a busy day), requiring 0.8 left decode on one
# thread, 25% slower, after a single stall.
GAIN_BACK = 0.95
PROBE_EVERY = 64     # steps between probes (after a probe, and while on the fallback)


class ThreadChooser:
    def __init__(self, max_threads: int):
        self.max_threads = max(1, int(max_threads))
        self.current = self.max_threads
        self._recent: dict[tuple[int, int], deque] = defaultdict(lambda: deque(maxlen=WINDOW))
        self._best: dict[int, float] = {}          # batch -> fastest median seen with max_threads
        self._probe: tuple[int, int, list] | None = None   # (threads, batch, times)
        self._since_probe = PROBE_EVERY     # the first slow-down may be probed at once
        self._first_probe = False           # the probe running is the one of the first steps
        self.steps_by_threads: dict[int, int] = defaultdict(int)   # what ran, for reports

    def threads(self, batch: int) -> int:
        """Threads for the next step of ``batch`` sequences."""
        if self._probe is not None and self._probe[1] == batch:
            return self._probe[0]
        return self.current

    def record(self, batch: int, threads: int, seconds: float) -> None:
        """Report how long a step of ``batch`` sequences took on ``threads`` threads."""
        self.steps_by_threads[threads] += 1
        if self.max_threads == 1:
            return
        self._since_probe += 1
        if self._probe is not None:
            self._record_probe(batch, threads, seconds)
            return
        recent = self._recent[(threads, batch)]
        recent.append(seconds)
        if len(recent) < WINDOW:
            return
        median = statistics.median(recent)
        if threads == self.max_threads:
            first = not self._best
            best = self._best.get(batch)
            self._best[batch] = median if best is None else min(best, median)
            if first:
                # The first window has no quiet time to compare with (on a machine busy from the
                # start, steps never look "slower than before"), so it is checked against one
                # thread once; if one thread loses, the next slow-down is still probed at once.
                self._start_probe(1, batch)
                self._first_probe = True
            elif median > SLOW * self._best[batch] and self._since_probe >= PROBE_EVERY:
                self._start_probe(1, batch)
        elif self._since_probe >= PROBE_EVERY:
            self._start_probe(self.max_threads, batch)

    def _start_probe(self, threads: int, batch: int) -> None:
        self._probe = (threads, batch, [])
        self._since_probe = 0

    def _record_probe(self, batch: int, threads: int, seconds: float) -> None:
        probe_threads, probe_batch, times = self._probe
        if (batch, threads) != (probe_batch, probe_threads):
            self._probe = None          # the batch changed under the probe: abandon it
            if self._first_probe:       # and try again on the next full window
                self._first_probe = False
                self._best.clear()
                self._since_probe = PROBE_EVERY
            return
        times.append(seconds)
        if len(times) < WINDOW // 2:
            return
        self._probe = None
        current = self._recent[(self.current, batch)]
        gain = GAIN_BACK if probe_threads == self.max_threads else GAIN
        if current and statistics.median(times) < gain * statistics.median(current):
            self.current = probe_threads
            self._recent[(probe_threads, batch)].clear()
            self._recent[(probe_threads, batch)].extend(times)
            if self._first_probe:
                # The first steps of an engine can be slow for reasons of their own (caches and
                # pages cold after a prefill, threads waking): seen in the bench, where one thread
                # then won the first probe on an idle machine and kept half of the 127 steps. So a
                # first win is checked against the full count again after one window, not 64 steps.
                self._since_probe = PROBE_EVERY - WINDOW
        elif self._first_probe:
            self._since_probe = PROBE_EVERY
        self._first_probe = False


def machine_busy() -> bool:
    """Whether other processes keep every core busy (1-minute load average >= the cores we may use)."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        return os.getloadavg()[0] >= cores
    except OSError:
        return False


@contextmanager
def one_thread(only_when_busy: bool = False) -> Iterator[None]:
    """Run PyTorch's CPU operations on one thread inside the block, then restore the count.

    For memory-bound copies such as loading weights: PyTorch splits even a 0.5 MB copy across its
    threads, and on a machine whose cores other processes keep busy a thread that waits for a
    descheduled partner costs a time slice. Measured here at a load average of 3 on 2 cores: a
    0.55 MB torch.cat took 16-25 ms on 2 threads and 1 ms on 1; the default model's weights loaded
    in 1.4-2.7 s instead of ~0.2 s. On an idle machine the threads help instead (the same load,
    load average 0.5: 0.1-0.2 s on 2 threads, 0.3-0.6 s on 1), hence ``only_when_busy``, which
    leaves the count alone unless :func:`machine_busy`.
    """
    import torch

    before = torch.get_num_threads()
    if before == 1 or (only_when_busy and not machine_busy()):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
