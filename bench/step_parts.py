"""Where a decode step of M sequences goes: matmul arithmetic, the rest of the fused blocks, the
vocabulary projection, and the engine around the forward pass.

    PYTHONPATH=. python bench/step_parts.py [--rows 1,8,16] [--threads 1] [--context 64] [--fma-peak]

1. The kernel parts, on the default model, in alternating rounds (medians of the rounds, each the
   fastest of 3 calls): the fused ``decode_blocks`` call; the same 4 x 30 block matmuls called
   alone (``block_matmul``, same shapes, formats and rows): the matmul arithmetic; the
   difference: attention, norms, RoPE, SiLU, barriers; and the head (final norm + 49152 x 576
   projection). Per pair-block (one 32-weight block of a weight row against one activation row)
   the matmuls' time is printed in ns: the figure the arithmetic bound is made of.
2. The engine: ``Engine.step`` of M greedy sequences decoding (the sessions bench's loop), split
   by the engine's own step stats into planning, forward pass and sampling + streaming; the
   forward pass minus the kernel parts above is the Python glue (embedding, RoPE tables, the
   attention batch, tensors built per step).
3. ``--fma-peak``: the peak 8-lane FMA rate of one core (bench/fma_peak.c, compiled with gcc).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def kernel_parts(model, rows: list[int], threads: int, context: int, rounds: int) -> dict:
    from edgellm.kernels import native
    from edgellm.kv.cache import KVCache
    from edgellm.layers.attention import AttentionBatch

    ext, cfg = native(), model.cfg
    tensors, formats, biases = model._native_blocks
    C, F = cfg.hidden_size, cfg.ffn_size
    Q, QKV = cfg.n_heads * cfg.head_dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    # (index of the matrix among a block's 6 tensors, N, K), in the order of the block's 4 formats
    shapes = [(1, QKV, C), (2, C, Q), (4, 2 * F, C), (5, C, F)]
    span = -(-(context + 1) // 16) * 16
    cache = KVCache(cfg, max(rows) * span // 16, 16, torch.float32)
    cache.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    inputs = {}
    for m in rows:
        batch = AttentionBatch.build([(1, context + 1, torch.arange(i * span, (i + 1) * span)) for i in range(m)])
        rope = model.rope_tables(torch.full((m,), context, dtype=torch.int64))
        xs = {k: torch.randn(m, k, generator=gen) for k in (C, Q, F)}
        inputs[m] = (torch.randn(m, C, generator=gen), rope, batch, xs)

    def blocks(m):
        h0, rope, batch, _ = inputs[m]
        ext.decode_blocks(h0.clone(), tensors, formats, biases, rope[0].view(m, -1), rope[1].view(m, -1), cache.data,
                          batch.write_index, batch.decode_index, batch.decode_lens, cfg.n_heads, cfg.n_kv_heads, F,
                          cfg.rms_norm_eps, threads)

    def matmuls(m):
        xs = inputs[m][3]
        for layer in range(cfg.n_layers):
            for j, (slot, n, k) in enumerate(shapes):
                ext.block_matmul(xs[k], tensors[6 * layer + slot], formats[4 * layer + j], n)

    def head(m):
        model.logits(inputs[m][0], torch.arange(m))

    parts = {"blocks": blocks, "matmuls": matmuls, "head": head}
    times = {(p, m): [] for p in parts for m in rows}
    torch.set_num_threads(threads)
    with torch.inference_mode():
        for r in range(rounds):
            for m in rows:
                for p, call in (parts.items() if r % 2 == 0 else reversed(parts.items())):
                    best = float("inf")
                    for _ in range(3):
                        t0 = time.perf_counter()
                        call(m)
                        best = min(best, time.perf_counter() - t0)
                    times[(p, m)].append(best)
    block_pairs = cfg.n_layers * sum(n * k // 32 for _, n, k in shapes)
    head_pairs = cfg.vocab_size * C // 32
    out = {"block_pair_blocks_per_row": block_pairs, "head_pair_blocks_per_row": head_pairs, "rows": {}}
    for m in rows:
        med = {p: 1e3 * statistics.median(times[(p, m)]) for p in parts}
        out["rows"][m] = {**{f"{p}_ms": v for p, v in med.items()},
                          "rest_ms": med["blocks"] - med["matmuls"],
                          "matmul_ns_per_pair_block": 1e6 * med["matmuls"] / (block_pairs * m),
                          "head_ns_per_pair_block": 1e6 * med["head"] / (head_pairs * m)}
    return out


def engine_parts(llm, rows: list[int], tokens: int, rounds: int) -> dict:
    from edgellm.runtime.engine import Engine, Request
    from edgellm.sampling import SamplingParams

    params = SamplingParams.greedy(max_tokens=tokens + 1, ignore_eos=True)
    got = {m: [] for m in rows}
    threads = {m: {} for m in rows}
    for _ in range(rounds):
        for m in rows:
            eng = Engine(llm, kv_memory="512MB")
            handles = [eng.submit(Request(f"Story number {i}: once upon a time, in a town called", params))
                       for i in range(m)]
            st = eng.step_stats
            while not all(h.done for h in handles):
                before = (st.by_kind["decode"]["steps"], st.schedule_s, st.forward_s, st.sample_s)
                t0 = time.perf_counter()
                eng.step()
                total = time.perf_counter() - t0
                if st.by_kind["decode"]["steps"] > before[0]:
                    got[m].append((total, st.schedule_s - before[1], st.forward_s - before[2], st.sample_s - before[3]))
            for n, steps in eng.runner.thread_chooser.steps_by_threads.items():
                threads[m][n] = threads[m].get(n, 0) + steps
            eng.close()
    out = {}
    for m in rows:
        med = [1e3 * statistics.median(x[i] for x in got[m]) for i in range(4)]
        out[m] = {"step_ms": med[0], "schedule_ms": med[1], "forward_ms": med[2], "sample_ms": med[3],
                  "steps": len(got[m]), "steps_by_threads": threads[m]}
    return out


def fma_peak() -> str:
    src = Path(__file__).with_name("fma_peak.c")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "fma_peak"
        subprocess.run(["gcc", "-O2", "-mavx2", "-mfma", str(src), "-o", str(exe)], check=True)
        return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,8,16")
    p.add_argument("--threads", type=int, default=1, help="threads of the kernel parts (the engine's: 2, chosen)")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=32, help="decode steps per engine run")
    p.add_argument("--fma-peak", action="store_true")
    a = p.parse_args()
    from edgellm.llm import LLM

    rows = [int(r) for r in a.rows.split(",")]
    print(f"load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    if a.fma_peak:
        print("fma peak:", fma_peak(), flush=True)
    llm = LLM(None, threads=2)
    k = kernel_parts(llm.loaded.model, rows, a.threads, a.context, a.rounds)
    print(f"kernel parts, {a.threads} thread(s), context {a.context}, medians of {a.rounds} rounds (ms); pair-blocks "
          f"per row: blocks {k['block_pair_blocks_per_row']}, head {k['head_pair_blocks_per_row']}")
    print(f"{'rows':>5} {'blocks':>8} {'matmuls':>8} {'rest':>7} {'head':>7} {'ns/pb mm':>9} {'ns/pb head':>10}")
    for m, r in k["rows"].items():
        print(f"{m:>5} {r['blocks_ms']:8.2f} {r['matmuls_ms']:8.2f} {r['rest_ms']:7.2f} {r['head_ms']:7.2f} "
              f"{r['matmul_ns_per_pair_block']:9.2f} {r['head_ns_per_pair_block']:10.2f}", flush=True)
    torch.set_num_threads(2)
    e = engine_parts(llm, rows, a.tokens, max(1, a.rounds // 2))
    print("engine decode steps, 2 threads (chooser), medians (ms)")
    print(f"{'rows':>5} {'step':>8} {'schedule':>9} {'forward':>8} {'sample+emit':>12} {'steps':>6}  fused steps by threads")
    for m, r in e.items():
        print(f"{m:>5} {r['step_ms']:8.2f} {r['schedule_ms']:9.2f} {r['forward_ms']:8.2f} {r['sample_ms']:12.2f} "
              f"{r['steps']:6d}  {r['steps_by_threads']}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    sys.exit(main())
