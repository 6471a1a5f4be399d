"""Small facts about this process and machine that several parts of edgellm need, in one place:
where edgellm caches files, how much memory the process holds, and sizes written by people."""

from __future__ import annotations

import gc
import math
import os
import re
import resource
import sys
from contextlib import contextmanager
from pathlib import Path

from edgellm.errors import InvalidParameterError

# ---- the garbage collector during start-up -------------------------------------------------------
# Start-up makes about a million objects that live as long as the process: torch's modules and the
# vocabulary's strings (recipes and headers read back from the cache arrive all at once). Each
# time allocations pass the collector's threshold it walks them again, looking for cycles they are
# not in: measured 0.15 s of the tokenizer's 0.25 s, and 0.1-0.3 s of importing torch. So the
# commands that load a model pause the collector before importing torch, loading keeps it paused,
# and a finished load freezes what exists (gc.freeze: never walked again, still freed by
# reference counts) and turns the collector back on.
_gc_paused_for_startup = False


def pause_gc_for_startup() -> None:
    """Pause the cyclic garbage collector until :func:`resume_gc_after_startup` (which the next
    model load calls)."""
    global _gc_paused_for_startup
    if gc.isenabled():
        gc.disable()
        _gc_paused_for_startup = True


def resume_gc_after_startup() -> None:
    """Freeze the objects made so far and turn the collector back on if start-up paused it."""
    global _gc_paused_for_startup
    if _gc_paused_for_startup:
        gc.freeze()
        _gc_paused_for_startup = False
        gc.enable()


@contextmanager
def gc_paused_while_loading():
    """The collector off while a model loads; afterwards the loaded objects frozen and the
    collector on again if it was on (or paused for start-up)."""
    pause_gc_for_startup()
    try:
        yield
    finally:
        resume_gc_after_startup()


# ---- the end of a one-shot command ----------------------------------------------------------------
def exit_now(code: int) -> None:
    """End the process with ``code`` at once, as a one-shot command that has printed everything:
    the exit handlers run and the standard streams are flushed, then ``os._exit`` skips the
    interpreter's teardown -- freeing the model, the vocabulary and torch's modules object by
    object, 0.3-0.6 s after `generate` printed its last token (measured, see docs/kernels.md).
    Returns without exiting while another non-daemon thread runs (a normal exit waits for it)."""
    import atexit
    import threading

    if any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate()):
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe or stream: nothing more can be written anyway
            pass
    os._exit(code)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/edgellm`` (``~/.cache/edgellm`` when the variable is unset or empty)."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if base else Path.home() / ".cache"
    return root / "edgellm"


# ---- memory of this process --------------------------------------------------------------------
def proc_status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MiB; NaN where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_now_mb() -> float:
    """Resident memory of this process now, in MiB (NaN where /proc is missing)."""
    return proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
    """The most resident memory this process ever held, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024   # bytes on macOS, KiB on Linux


def hwm_mb() -> float:
    """VmHWM: the peak resident memory since the process started or since :func:`reset_hwm`."""
    return proc_status_mb("VmHWM")


def reset_hwm() -> None:
    """Restart VmHWM from the current RSS (Linux), so later peaks exclude what came before."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


# ---- sizes written by people ---------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
          "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3, "gib": 1024 ** 3, "t": 1024 ** 4,
          "tb": 1024 ** 4, "tib": 1024 ** 4}


def parse_size(value: int | float | str, name: str = "size") -> int:
    """Bytes from ``512MB``, ``2GB``, ``1.5GiB``, ``65536`` or an int (K/M/G count in powers of 1024)."""
    if isinstance(value, bool):
        raise InvalidParameterError(f"{name} must be a size such as '512MB', got {value!r}",
                                    "write a number of bytes or a size with a unit: 512MB, 2GB")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise InvalidParameterError(f"{name} must be a non-negative size, got {value!r}",
                                        "write a number of bytes or a size with a unit: 512MB, 2GB")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise InvalidParameterError(f"{name} {value!r} is not a size",
                                "write a number of bytes or a size with a unit: 512MB, 2GB, 1.5GiB")


def set_threads(threads: int | None) -> None:
    """Set PyTorch's (and so the kernels') thread count; None leaves the default."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidParameterError(f"--threads must be at least 1, got {threads}", "pass a positive count")
    import torch  # here, not at the top: the CLI's --help must not wait for torch

    torch.set_num_threads(threads)


# ---- start-up trace: EDGELLM_TRACE_STARTUP=1 prints where the time to the first token went -----
_startup_marks: list[tuple[str, float]] = []


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: from /proc, 10 ms resolution), else None."""
    import time

    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")     # field 22: start time, in ticks since boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def startup_mark(phase: str) -> None:
    """Note that start-up phase ``phase`` ended now; with ``EDGELLM_TRACE_STARTUP=1`` the phases are
    printed to standard error at exit (the first call also counts the interpreter's own start)."""
    if os.environ.get("EDGELLM_TRACE_STARTUP", "0") in ("", "0"):
        return
    import time

    if not _startup_marks:
        import atexit

        age = process_age_s()
        _startup_marks.append(("", time.perf_counter() - (age or 0.0)))
        atexit.register(_print_startup)
    _startup_marks.append((phase, time.perf_counter()))


def startup_phases() -> list[tuple[str, float]]:
    """(phase, seconds) in order, for the marks made so far."""
    return [(name, t - _startup_marks[i][1]) for i, (name, t) in enumerate(_startup_marks[1:])]


def _print_startup() -> None:
    phases = startup_phases()
    total = sum(s for _, s in phases)
    parts = ", ".join(f"{name} {s:.3f}" for name, s in phases)
    print(f"edgellm start-up (s): {parts}; total {total:.3f}", file=sys.stderr)
