"""Time one Q4_1 matmul of prefill size four ways, interleaved, medians: the exact path
(dequantise + BLAS), int8's prefill path (rounding + BLAS), the int8 integer kernel and the exact
decode kernel. For deciding whether int8 prefill should take the integer kernel
(docs/fast-modes.md). Usage: python scripts/int8_matmul_timing.py [rows] [threads]"""

import statistics
import sys
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from edgellm.kernels import NATIVE_FORMATS, native
from edgellm.quant.gguf_weights import GGUFBlockWeight


def interleaved_medians(ways: dict, rounds: int = 15) -> dict[str, float]:
    """Median seconds of each callable, after one warm-up call each, the calls taking turns."""
    times = {name: [] for name in ways}
    for f in ways.values():
        f()
    for _ in range(rounds):
        for name, f in ways.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def random_q4_1(n: int, k: int) -> torch.Tensor:
    """The raw Q4_1 blocks (gguf package) of a seeded random [n, k] matrix, as [n, bytes a row]."""
    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    return torch.from_numpy(quants.quantize(w, GGMLQuantizationType.Q4_1).view(np.uint8).reshape(n, -1))


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    ext = native()
    n, k = 3072, 576    # SmolLM2's gate|up matrix
    raw = random_q4_1(n, k)
    exact = GGUFBlockWeight(raw, "Q4_1", k)
    rounded = GGUFBlockWeight(raw, "Q4_1", k)
    rounded.int8_activations = True
    x = torch.randn(rows, k)
    code = NATIVE_FORMATS["Q4_1"]
    ways = {"exact: dequantise + BLAS": lambda: exact.matmul(x),
            "int8 prefill: rounding + BLAS": lambda: rounded.matmul(x),
            "int8 integer kernel": lambda: ext.block_matmul_q8(x, raw, code, n),
            "exact decode kernel": lambda: ext.block_matmul(x, raw, code, n)}
    for name, s in interleaved_medians(ways).items():
        print(f"{name:32s} {s * 1e3:8.2f} ms  {2 * rows * n * k / s / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
