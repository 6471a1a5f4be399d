"""The decode thread chooser, fed step times (the policy only; the kernel test covers the threads)."""

from edgellm.kernels.threads import PROBE_EVERY, WINDOW, ThreadChooser


def run(chooser: ThreadChooser, seconds_for, steps: int, batch: int = 1) -> list[int]:
    used = []
    for _ in range(steps):
        n = chooser.threads(batch)
        used.append(n)
        chooser.record(batch, n, seconds_for(n))
    return used


def test_keeps_all_threads_on_an_idle_machine():
    """One thread is tried once, on the first steps (there is no quiet time to compare with yet)."""
    c = ThreadChooser(2)
    used = run(c, lambda n: 0.010 if n == 2 else 0.016, 500)
    assert used.count(1) == WINDOW // 2 and used[:WINDOW] == [2] * WINDOW and c.current == 2


def test_a_machine_busy_from_the_first_step_moves_to_one_thread():
    """Two threads stall from the start, so no step ever looks slower than an earlier one: the
    probe of the first steps finds one thread faster."""
    c = ThreadChooser(2)
    used = run(c, lambda n: 0.500 if n == 2 else 0.020, 40)
    # the full count: the first window, then once more to confirm the first probe's verdict
    assert c.current == 1 and used[-1] == 1 and used.count(2) == WINDOW + WINDOW // 2


def test_slow_first_steps_on_an_idle_machine_do_not_keep_one_thread():
    """The first window is slow (warm-up after a prefill), so one thread wins the first probe; the
    full count is tried again one window later, wins, and stays."""
    c = ThreadChooser(2)
    step = iter(range(10**6))
    used = run(c, lambda n: 0.040 if next(step) < WINDOW else (0.010 if n == 2 else 0.016), 200)
    assert used[WINDOW:WINDOW + WINDOW // 2] == [1] * (WINDOW // 2)    # the first probe won...
    assert used.count(1) <= 2 * WINDOW and c.current == 2 and used[-1] == 2   # ...but not for long


def test_falls_back_to_one_thread_under_contention_and_returns_after():
    c = ThreadChooser(2)
    run(c, lambda n: 0.010, 20)                                       # quiet: learns 10 ms
    used = run(c, lambda n: 0.080 if n == 2 else 0.020, 40)           # contended: 2 threads stall
    assert c.current == 1 and used[-1] == 1
    used = run(c, lambda n: 0.010 if n == 2 else 0.016, 3 * PROBE_EVERY)   # quiet again
    assert c.current == 2 and used[-1] == 2


def test_returns_to_all_threads_when_they_are_only_a_little_faster():
    """A host whose second vCPU adds only ~1.2x: after a stall forced one thread, the next probe
    of two threads (17 ms against 20) takes them back."""
    c = ThreadChooser(2)
    run(c, lambda n: 0.010, 20)
    run(c, lambda n: 0.080 if n == 2 else 0.020, 40)                  # a stall of the second vCPU
    assert c.current == 1
    used = run(c, lambda n: 0.017 if n == 2 else 0.020, 2 * PROBE_EVERY)
    assert c.current == 2 and used[-1] == 2


def test_a_probe_that_loses_keeps_the_current_choice():
    c = ThreadChooser(2)
    run(c, lambda n: 0.010, 20)
    run(c, lambda n: 0.030 if n == 2 else 0.050, 200)   # slower, but one thread is worse still
    assert c.current == 2


def test_batch_sizes_are_compared_separately():
    c = ThreadChooser(2)
    run(c, lambda n: 0.010, 20, batch=1)
    run(c, lambda n: 0.040, 20, batch=16)     # bigger batch, longer steps: not contention
    assert c.current == 2 and c._probe is None


def test_one_thread_configured_means_one_thread():
    c = ThreadChooser(1)
    assert set(run(c, lambda n: 0.5, 3 * WINDOW)) == {1}


def test_the_first_probe_is_tried_again_when_the_batch_changes_under_it():
    c = ThreadChooser(2)
    busy = lambda n: 0.500 if n == 2 else 0.020   # noqa: E731
    run(c, busy, WINDOW + 1, batch=4)             # the probe of the first steps has begun...
    run(c, busy, 1, batch=3)                      # ...and a sequence finished under it
    used = run(c, busy, 2 * WINDOW, batch=3)
    assert c.current == 1 and used[-1] == 1
