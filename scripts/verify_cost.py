"""The cost of a speculative verify pass of k + 1 rows against one decode step, per k.

    PYTHONPATH=. python scripts/verify_cost.py [--model M] [--context 512] [--threads 2] [--rounds 15] [--k 7]

After a prefill of ``--context`` tokens, times ``ModelRunner.run`` on one decode chunk of k + 1
rows (``SeqChunk(..., verify=True)``; k = 0 is a plain one-row decode step, ``verify=False``) for
k = 0..K, the k interleaved inside every round (the order rotating), medians over the rounds.
Prints, per k, the median time, its ratio to one decode step, and the speedup bound it implies:
a verify pass commits at most k + 1 tokens, so speculation gains at most (k + 1) / ratio, and at an
acceptance rate a (each proposed token accepted with probability a until the first rejection)
(1 + a + ... + a^k) / ratio -- the figure printed for a = 0.5, 0.8, 0.9.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from edgellm.kv.cache import KVCache
    from edgellm.loading.load import load_model
    from edgellm.runtime.model_runner import ModelRunner, SeqChunk
    from edgellm.runtime.speculative import expected_tokens

    loaded = load_model(args.model)
    cfg = loaded.config
    bs = 16
    n = args.context + args.k + 1
    cache = KVCache(cfg, -(-n // bs) + 1, bs)
    runner = ModelRunner(loaded.model, cache)
    slots = slice(0, (-(-n // bs)) * bs)
    ids = [(17 * i + 3) % min(cfg.vocab_size, 30000) + 100 for i in range(n)]
    runner.run([SeqChunk(ids[:args.context], 0, slots)])          # the prefill

    def step(k: int) -> float:
        chunk = SeqChunk(ids[args.context:args.context + k + 1], args.context, slots, verify=k > 0)
        t = time.perf_counter()
        runner.run([chunk])
        return time.perf_counter() - t

    ks = list(range(args.k + 1))
    for k in ks:                                                   # warm-up
        step(k)
        step(k)
    times: dict[int, list[float]] = {k: [] for k in ks}
    for r in range(args.rounds):
        for k in ks[r % len(ks):] + ks[:r % len(ks)]:
            times[k].append(step(k))
    one = statistics.median(times[0])
    rows = []
    for k in ks:
        med = statistics.median(times[k])
        ratio = med / one
        rows.append({"k": k, "rows": k + 1, "ms": 1e3 * med, "ratio": ratio,
                     "bound_all_accepted": (k + 1) / ratio,
                     **{f"bound_a{int(100 * a)}": expected_tokens(a, k) / ratio for a in (0.5, 0.8, 0.9)}})
    if args.json:
        print(json.dumps({"model": loaded.source.name, "context": args.context, "threads": args.threads,
                          "rounds": args.rounds, "rows": rows}, indent=2))
        return
    print(f"{loaded.source.name}: verify pass of k+1 rows vs one decode step, context {args.context}, "
          f"{args.threads} threads, median of {args.rounds} interleaved rounds")
    print(f"{'k':>3}{'rows':>6}{'ms':>9}{'x one step':>12}{'bound (all accepted)':>22}{'a=0.5':>8}{'a=0.8':>8}{'a=0.9':>8}")
    for r in rows:
        print(f"{r['k']:>3}{r['rows']:>6}{r['ms']:>9.2f}{r['ratio']:>12.2f}{r['bound_all_accepted']:>22.2f}"
              f"{r['bound_a50']:>8.2f}{r['bound_a80']:>8.2f}{r['bound_a90']:>8.2f}")


if __name__ == "__main__":
    main()
