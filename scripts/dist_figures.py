"""Tokens/s of a model on 1 and 2 local ranks (pipeline and tensor parallel), next to the planner's
prediction for the same split (docs/distributed.md, "Figures").

    PYTHONPATH=. python scripts/dist_figures.py [--model M] [--tokens 48] [--batch 4] [--repeat 3]

Measures, in this order: the gloo loopback link (latency of a hidden-size message, bandwidth of
4 MiB ones); then for each setting -- one process at 2 threads, one at 1 thread, 2 pipeline ranks
and 2 tensor-parallel ranks at 1 thread each -- greedy decode of one sequence (the engine's decode
tok/s) and of ``--batch`` sequences together (generated tokens / wall time), medians of
``--repeat``; every split's tokens are checked against the one process's. The planner is given
this machine measured at 1 thread per chip and the measured link. Each "chip" here is one core
of the same 2-core machine, sharing its memory bus: the planner's chips do not share.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from edgellm.llm import LLM
from edgellm.runtime.distributed import ParallelConfig
from edgellm.runtime.engine import Engine
from edgellm.runtime.parallel_runner import SplitModel
from edgellm.sampling import SamplingParams

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn is",
           "In 1969, the first", "My favourite recipe", "Rain in the desert", "A list of prime numbers:"]


def _link_rank(rank: int, port: int, hidden: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    small, big = torch.zeros(hidden), torch.zeros(1 << 20)        # a hidden vector; 4 MiB
    for t, rounds in ((small, 400), (big, 40)):
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            else:
                dist.recv(t, 0)
                dist.send(t, 0)
            times.append(time.perf_counter() - t0)
        if rank == 0:
            out.put(statistics.median(times) / 2)       # one way
    dist.destroy_process_group()


def measure_link(hidden: int) -> tuple[float, float]:
    """(one-way latency s of a hidden-size message, bytes/s of 4 MiB ones) over gloo on loopback."""
    from edgellm.serve.process import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_link_rank, args=(r, port, hidden, out)) for r in range(2)]
    for p in procs:
        p.start()
    latency, big = out.get(), out.get()
    for p in procs:
        p.join()
    return latency, (4 << 20) / big


def timed(llm: LLM, tokens: int, batch: int, repeat: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    llm.generate(PROMPTS[0], SamplingParams.greedy(max_tokens=4))      # warm-up
    one, many, ids = [], [], None
    for _ in range(repeat):
        c = llm.generate(PROMPTS[0], params)
        one.append(c.decode_tok_s)
        with Engine(llm) as engine:
            t0 = time.perf_counter()
            results = engine.generate(PROMPTS[:batch], params)
            many.append(sum(len(r.token_ids) for r in results) / (time.perf_counter() - t0))
        ids = (c.token_ids, [r.token_ids for r in results])
    return {"one": statistics.median(one), "batch": statistics.median(many), "ids": ids}


def measure(model: str | None, tokens: int, batch: int, repeat: int) -> dict:
    rows = {}
    for name, threads in (("1 process, 2 threads", 2), ("1 process, 1 thread", 1)):
        torch.set_num_threads(threads)
        rows[name] = timed(LLM(model, threads=threads), tokens, batch, repeat)
    for name, config in (("2 pipeline ranks", ParallelConfig(pipeline=2)),
                         ("2 tensor ranks", ParallelConfig(tensor=2))):
        split = SplitModel(config, model)
        try:
            rows[name] = timed(LLM(model, parallel=split), tokens, batch, repeat)
        finally:
            split.close()
    return rows


def predict(model: str | None, tokens: int, batch: int, latency: float, bandwidth: float) -> dict:
    """The planner's decode tok/s for the same settings (this machine measured at 1 thread)."""
    from edgellm.loading.convert import peek_config
    from edgellm.roofline.hardware import local_hardware
    from edgellm.roofline.planner import Link, plan_split

    cfg = peek_config(model)[1]
    torch.set_num_threads(1)
    hw = local_hardware()
    link = Link(bandwidth, latency, "gloo on loopback, measured by this script")
    prompt = 8
    kw = dict(prompt_tokens=prompt, context=prompt + tokens // 2, weight_bits=5, act_bits=32, kv_bits=32,
              attention="fused", link=link)
    out = {}
    for name, pp, tp in (("1 process, 1 thread", 1, 1), ("2 pipeline ranks", 2, 1), ("2 tensor ranks", 1, 2)):
        m = min(pp, batch)
        splits = [plan_split(cfg, hw, pp, tp, batch=1, micro_batches=1, **kw),
                  plan_split(cfg, hw, pp, tp, batch=batch // m, micro_batches=m, **kw)]
        if splits[0].reason:        # a split the planner does not model (uneven heads)
            print(f"planner, {name}: {splits[0].reason}")
            continue
        out[name] = tuple(s.figures["decode"]["tokens_per_s"] for s in splits)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from edgellm.loading.convert import peek_config

    hidden = peek_config(args.model)[1].hidden_size
    latency, bandwidth = measure_link(hidden)
    print(f"gloo loopback: {latency * 1e6:.0f} us one way for {hidden * 4} bytes, "
          f"{bandwidth * 8 / 1e9:.1f} Gbit/s for 4 MiB; load {os.getloadavg()[0]:.1f}", flush=True)
    rows = measure(args.model, args.tokens, args.batch, args.repeat)
    plan = predict(args.model, args.tokens, args.batch, latency, bandwidth)
    ref = rows["1 process, 2 threads"]["ids"]
    print(f"\n{'setting':24s}{'1 seq tok/s':>12s}{'planner':>9s}{f'{args.batch} seqs tok/s':>14s}{'planner':>9s}"
          f"  same tokens")
    for name, r in rows.items():
        p1, pb = plan.get(name, (None, None))
        print(f"{name:24s}{r['one']:12.1f}{_cell(p1)}{r['batch']:14.1f}{_cell(pb)}  {r['ids'] == ref}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


def _cell(x: float | None) -> str:
    return f"{x:9.1f}" if x is not None else f"{'-':>9s}"


if __name__ == "__main__":
    sys.exit(main())
