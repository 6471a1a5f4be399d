"""The fused decode step's time against the number of rows (sequences) in it, A/B between builds.

    PYTHONPATH=. python bench/kernel_rows.py [--other NAME=PATH.so ...] [--rows 1,2,4,5,8,16]

Times the native ``decode_blocks`` call alone (every transformer block of one decode step of the
default model; no embedding, no logits) for batches of M sequences with a short context, for this
tree's kernels ("new") and any other built modules given (say main's, from its kernel cache).
All are called in alternating rounds on the same inputs, so that the load of a shared machine
hits them alike; medians are printed, with each build's time relative to one row and to "new".
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[path.stem] = module
    return module


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--other", action="append", default=[], metavar="NAME=PATH",
                   help="another built kernel module (.so) to compare with")
    p.add_argument("--rows", default="1,2,4,5,8,16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="calls per round (the round's time is their median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=64)
    args = p.parse_args()

    from edgellm.kernels import native
    from edgellm.kv.cache import KVCache
    from edgellm.layers.attention import AttentionBatch
    from edgellm.loading.load import load_model

    torch.set_num_threads(args.threads)
    model = load_model(None).model
    cfg = model.cfg
    tensors, formats, biases = model._native_blocks
    rows = [int(r) for r in args.rows.split(",")]
    span = ((args.context + 1 + 15) // 16) * 16
    cache = KVCache(cfg, max(rows) * span // 16, 16, torch.float32)
    cache.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    mods = {"new": native()}
    for spec in args.other:
        name, path = spec.split("=", 1)
        mods[name] = load_module(Path(path))

    def call(mod, h, rope, batch):
        T = h.shape[0]
        mod.decode_blocks(h, tensors, formats, biases, rope[0].view(T, -1), rope[1].view(T, -1), cache.data,
                          batch.write_index, batch.decode_index, batch.decode_lens,
                          cfg.n_heads, cfg.n_kv_heads, cfg.ffn_size, cfg.rms_norm_eps, args.threads)

    def run(mod, m):
        h = inputs[m][0].clone()
        call(mod, h, inputs[m][1], inputs[m][2])
        return h

    inputs = {}
    gen = torch.Generator().manual_seed(0)
    for m in rows:
        batch = AttentionBatch.build([(1, args.context + 1, torch.arange(i * span, (i + 1) * span)) for i in range(m)])
        rope = model.rope_tables(torch.full((m,), args.context, dtype=torch.int64))
        inputs[m] = (torch.randn(m, cfg.hidden_size, generator=gen), rope, batch)
    for _ in range(2):   # warm-up (caches, thread pool, page faults)
        for mod in mods.values():
            for m in rows:
                call(mod, inputs[m][0].clone(), inputs[m][1], inputs[m][2])
    same = {name: all(torch.equal(run(mod, m), run(mods["new"], m)) for m in rows) for name, mod in mods.items()}
    times = {(name, m): [] for name in mods for m in rows}
    fastest = {(name, m): float("inf") for name in mods for m in rows}
    order = list(mods.items())
    for r in range(args.rounds):
        for m in rows:
            for name, mod in (order if r % 2 == 0 else order[::-1]):
                h0, rope, batch = inputs[m]
                step = []
                for _ in range(args.steps):
                    h = h0.clone()
                    t0 = time.perf_counter()
                    call(mod, h, rope, batch)
                    step.append(time.perf_counter() - t0)
                    fastest[(name, m)] = min(fastest[(name, m)], step[-1])
                times[(name, m)].append(statistics.median(step))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"decode_blocks, {args.threads} threads, context {args.context}, medians of {args.rounds} rounds "
          f"x {args.steps} calls")
    print(f"{'rows':>5}" + "".join(f"{n + ' ms':>12}{n + ' x1':>9}" for n in mods)
          + "".join(f"{n + '/new':>10}" for n in mods if n != "new") + "".join(f"{n + ' min':>10}" for n in mods))
    for m in rows:
        line = f"{m:>5}" + "".join(f"{1e3 * med[(n, m)]:>12.2f}{med[(n, m)] / med[(n, rows[0])]:>9.2f}" for n in mods)
        line += "".join(f"{med[(n, m)] / med[('new', m)]:>10.2f}" for n in mods if n != "new")
        line += "".join(f"{1e3 * fastest[(n, m)]:>10.2f}" for n in mods)
        print(line)
    print("same bits as new: " + ", ".join(f"{n} {'yes' if ok else 'NO'}" for n, ok in same.items() if n != "new"))


if __name__ == "__main__":
    main()
