"""The fused decode step of a model (default SmolLM2), exact against int8 activations, interleaved
rounds, medians (docs/fast-modes.md). Usage: python scripts/int8_decode_step_timing.py [model]"""

import statistics
import sys
import time

import torch

from edgellm.kv.cache import KVCache
from edgellm.layers.attention import AttentionBatch
from edgellm.loading.load import load_model
from edgellm.quant.activations import set_activations


def main() -> None:
    model = load_model(sys.argv[1] if len(sys.argv) > 1 else None).model
    ctx = 256
    for rows in (1, 4):
        for threads in (1, 2):
            cache = KVCache(model.cfg, rows * ctx // 16, 16, torch.float32)
            cache.data.normal_(0, 0.5)
            slots = [torch.arange(i * ctx, (i + 1) * ctx) for i in range(rows)]
            times = {"fp32": [], "int8": []}
            with torch.inference_mode():
                tokens = torch.arange(100, 100 + rows)
                rope = model.rope_tables(torch.full((rows,), ctx - 1))
                batch = AttentionBatch.build([(1, ctx, s) for s in slots])
                for _ in range(25):
                    for mode in times:
                        set_activations(model, mode)
                        h = model.embed(tokens)
                        t = time.perf_counter()
                        model.decode_blocks_fused(h, rope, batch, cache, threads)
                        times[mode].append(time.perf_counter() - t)
            f, i = (statistics.median(times[m][3:]) * 1e3 for m in ("fp32", "int8"))
            print(f"rows {rows} threads {threads}: fused step exact {f:.2f} ms, int8 {i:.2f} ms, int8/exact {i / f:.2f}")


if __name__ == "__main__":
    main()
