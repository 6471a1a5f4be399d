"""Time one Q4_1 matmul of prefill size, interleaved, medians: the exact path (dequantise to float32
+ sgemm), --dtype bfloat16 as this CPU runs it (edgellm.quant.bf16: oneDNN's bf16 GEMM where the
CPU has AVX512_BF16/AMX, else float32 emulation), and both bf16 ways forced; then the whole prefill
of a ``rows``-token prompt of the default model, exact and bf16 (prefill attention in float32 and
in bf16, EDGELLM_BF16_ATTENTION) taking turns. For the figures of
docs/fast-modes.md. Usage: python scripts/bf16_matmul_timing.py [rows] [threads]"""

import os
import statistics
import sys

import torch
from int8_matmul_timing import interleaved_medians, random_q4_1  # scripts/: on sys.path when run as a script

from edgellm.quant.bf16 import bf16_slab_matmul, cpu_multiplies_bf16
from edgellm.quant.gguf_weights import GGUFBlockWeight


def time_matrix(n: int, k: int, rows: int, label: str) -> None:
    raw = random_q4_1(n, k)
    exact = GGUFBlockWeight(raw, "Q4_1", k)
    bf16 = GGUFBlockWeight(raw, "Q4_1", k)
    bf16.bf16_mode = True
    x = torch.randn(rows, k)
    ways = {"exact: dequantise + sgemm": lambda: exact.matmul(x),
            "--dtype bfloat16 (as chosen here)": lambda: bf16.matmul(x),
            "bf16 GEMM, float32 slab rounded": lambda: bf16_slab_matmul(x, n, bf16._step, bf16._dequant_slab,
                                                                         native_bf16=True),
            "bf16 GEMM, blocks straight to bf16": lambda: bf16_slab_matmul(x, n, bf16._step, bf16._dequant_slab,
                                                                            bf16._dequant_slab_bf16, native_bf16=True),
            "float32 emulation forced": lambda: bf16_slab_matmul(x, n, bf16._step, bf16._dequant_slab,
                                                                 native_bf16=False)}
    medians = interleaved_medians(ways)
    print(f"{label} {n} x {k}:")
    for name, s in medians.items():
        print(f"  {name:36s} {s * 1e3:8.2f} ms  {2 * rows * n * k / s / 1e9:6.1f} GFLOP/s")


def time_prefill(rows: int, threads: int, rounds: int = 9) -> None:
    from edgellm.llm import LLM
    from edgellm.quality import read_corpus
    from edgellm.sampling import SamplingParams

    models = {"exact": LLM(None, threads=threads)}
    for attention in ("0", "1"):   # the mode's prefill attention in float32, then in bf16 (read at load)
        os.environ["EDGELLM_BF16_ATTENTION"] = attention
        models[f"bf16, {'bf16' if attention == '1' else 'fp32'} attention"] = LLM(None, dtype="bfloat16", threads=threads)
    del os.environ["EDGELLM_BF16_ATTENTION"]
    ids = models["exact"].tokenizer.encode(read_corpus())[:rows]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times = {name: [] for name in models}
    for llm in models.values():
        llm.generate(ids, params)
    for _ in range(rounds):
        for name, llm in models.items():
            times[name].append(llm.generate(ids, params).prefill_s)
    print(f"prefill of {rows} tokens, default model, medians of {rounds} interleaved:")
    for name, v in times.items():
        print(f"  {name:22s} {statistics.median(v) * 1e3:8.1f} ms  {rows / statistics.median(v):7.1f} tok/s")


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    print(f"CPU multiplies bf16 natively: {cpu_multiplies_bf16()}; {rows} rows, {torch.get_num_threads()} threads")
    for n, k, label in ((3072, 576, "gate|up"), (576, 1536, "down")):     # SmolLM2's MLP matrices
        time_matrix(n, k, rows, label)
    time_prefill(rows, torch.get_num_threads())


if __name__ == "__main__":
    main()
