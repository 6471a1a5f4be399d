"""Measurements on this machine, placed next to the roofline's predictions.

Two parts:

* :func:`measure_local` — a micro-benchmark of this machine (a few seconds): memory bandwidth from a
  large tensor copy (bytes read + bytes written per second) and matrix-multiply peaks in fp32, bf16
  and int8 (``torch._int_mm``, where it runs), with torch's current thread count. The result is in
  the hardware-file format of :mod:`edgellm.roofline.hardware`, which caches it.
* :class:`MeasuredRates` — achieved ops/s and bytes/s and the fraction of the roofline reached,
  for a measured row: :func:`edgellm.roofline.analyze.compare` (measured per-layer times from
  another engine's profiler) and :mod:`edgellm.roofline.profile` (``edgellm analyze --measure``:
  edgellm's own engine, whose ops fuse several analyzer layers) build their rows on it.

Nothing from the rest of :mod:`edgellm.roofline` is imported here: :mod:`~edgellm.roofline.hardware`
calls the micro-benchmark, and the analysis reads the rates.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from typing import Callable


# ---- the micro-benchmark ------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8e9


def machine_fingerprint() -> dict:
    """What a cached measurement depends on: re-measure when any of it changes."""
    import torch

    return {"cpu": _cpu_model(), "host": platform.node(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def _best_time(fn: Callable[[], object], budget_s: float, min_runs: int = 3, max_runs: int = 50) -> float:
    """Smallest wall time of ``fn`` over repeated runs within ``budget_s`` (after one warm-up)."""
    fn()
    best = float("inf")
    start = time.perf_counter()
    runs = 0
    while runs < max_runs and (runs < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def measure_bandwidth(budget_s: float = 0.8, n_bytes: int = 128 * 2**20) -> float:
    """Bytes/s of a ``n_bytes`` tensor copy, counting the bytes read and the bytes written."""
    import torch

    src = torch.ones(n_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = _best_time(lambda: dst.copy_(src), budget_s)
    return 2 * n_bytes / best


def measure_matmul(dtype_name: str, budget_s: float = 0.6, n: int = 1024) -> float | None:
    """Ops/s (2 per multiply-add) of an n x n x n matrix multiply; None if the dtype does not run here."""
    import torch

    try:
        if dtype_name == "int8":
            a = torch.randint(-64, 64, (n, n), dtype=torch.int8)
            b = torch.randint(-64, 64, (n, n), dtype=torch.int8)
            fn = lambda: torch._int_mm(a, b)  # noqa: E731
        else:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
            a = torch.randn(n, n).to(dtype)
            b = torch.randn(n, n).to(dtype)
            fn = lambda: torch.mm(a, b)  # noqa: E731
        t0 = time.perf_counter()
        fn()
        if time.perf_counter() - t0 > budget_s:      # far too slow (emulated): one run is the measure
            t0 = time.perf_counter()
            fn()
            return 2 * n ** 3 / (time.perf_counter() - t0)
        best = _best_time(fn, budget_s)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    return 2 * n ** 3 / best


def measure_local(budget_s: float = 3.0) -> dict:
    """Measure this machine; returns a hardware-file dictionary (see :mod:`edgellm.roofline.hardware`)."""
    import torch

    share = budget_s / 4
    bw = measure_bandwidth(share)
    peaks: dict[str, float] = {}
    for prec in ("fp32", "bf16", "int8"):
        ops = measure_matmul(prec, share)
        if ops:
            peaks[prec] = ops / 1e12
    threads = torch.get_num_threads()
    cpu = _cpu_model()
    return {
        "name": f"local: {cpu} ({threads} thread{'' if threads == 1 else 's'})",
        "kind": "this machine (measured)",
        "peak_TOPS": peaks,
        "memory_bandwidth_GBps": bw / 1e9,
        "memory_GB": _memory_bytes() / 1e9,
        "source": (f"measured by edgellm on {_dt.date.today().isoformat()}: 128 MiB tensor copy (bytes read + "
                   f"written per second); 1024^3 torch matmul (fp32, bf16; int8 via torch._int_mm); best of runs"),
        "notes": "measured peaks are what torch reaches, not the chip's datasheet peak",
        "measured": {"fingerprint": machine_fingerprint(), "budget_s": budget_s,
                     "date": _dt.datetime.now().isoformat(timespec="seconds")},
    }


# ---- the rates of a measured row ------------------------------------------------------------------
class MeasuredRates:
    """Achieved rates of something with ``ops``, ``memory_bytes``, ``predicted_s`` and ``measured_s``."""

    @property
    def achieved_ops_per_s(self) -> float:
        return self.ops / self.measured_s if self.measured_s > 0 else 0.0

    @property
    def achieved_bytes_per_s(self) -> float:
        return self.memory_bytes / self.measured_s if self.measured_s > 0 else 0.0

    @property
    def roofline_fraction(self) -> float:
        """Predicted (roofline) time / measured time: 1.0 means the layer runs at the roofline."""
        return self.predicted_s / self.measured_s if self.measured_s > 0 else 0.0
