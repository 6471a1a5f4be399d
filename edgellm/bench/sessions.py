"""The sessions benchmark: what the phase-aware runtime buys on this machine.

Four measurements on one loaded model (default: the default model), medians of ``repeat`` runs:

1. **Aggregate decode throughput** at 1, 4, 16 and 64 concurrent sessions: every session
   decodes at once; tokens per second over the pure-decode steps (one forward pass each), and
   the step time (= each session's time per token).
2. **Time to first token of a follow-up turn** (20 new tokens) after ~1, 500 and 1,500 tokens
   of history, with the session's KV held -- against recomputing the whole conversation (what a
   runtime without sessions does).
3. **Memory per session**: KV bytes per token, per session at each history length, and in the
   multi-user run (shared system-prompt blocks counted once).
4. **A multi-user scenario**: N users, each a session with a shared system prompt, sending turns
   with random think time between them for a bounded time, on an engine thread with a small pool
   (so that idle sessions are offloaded to host memory and disk); per-phase wall time summed over
   sessions, tokens per phase, what the engine's steps were, first-token latencies.

``python -m edgellm.bench.sessions [--quick] [--json]``; ``edgellm bench --scenario
sessions`` calls :func:`run_sessions_bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from typing import Callable

SYSTEM = ("You are a helpful assistant in a busy office. Answer clearly and briefly, and ask a "
          "question back when something is unclear.")
QUESTIONS = [
    "What is a good way to plan my week?",
    "Can you explain what a database index is?",
    "Write two lines about the sea.",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Give me three names for a cat.",
    "What should I pack for a rainy trip?",
    "Summarise the idea of compound interest.",
    "How many legs does a spider have?",
    "Suggest a short title for a talk on batteries.",
]
FILLER = ("The committee met on a grey morning to review the harbour plans, the budget for new "
          "cranes, the schedule of ferries, and a letter from the fishermen about nets, tides, "
          "lights, weather and the old stone pier that needs repair before winter. ")


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _filler(tokenizer, n_tokens: int) -> str:
    """Plain text of about ``n_tokens`` tokens."""
    words = (FILLER * (n_tokens // 20 + 2)).split()
    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.encode(" ".join(words[:mid]))) < n_tokens:
            lo = mid + 1
        else:
            hi = mid
    return " ".join(words[:lo])


def _followup_text(tokenizer, n_new: int) -> str:
    """A user message whose turn computes about ``n_new`` tokens after a one-token reply: the end
    of the previous assistant message, the user message and the template around it."""
    first = [{"role": "system", "content": "x"}, {"role": "user", "content": "x"}]
    held = len(tokenizer.encode_chat(first)) + 1       # the prompt and the one generated token

    def cost(text: str) -> int:
        conv = first + [{"role": "assistant", "content": "y"}, {"role": "user", "content": text}]
        return len(tokenizer.encode_chat(conv)) - held

    words = ("Thanks. Now tell me, in one short sentence, what the most important point of all that was, "
             "and why it matters to the harbour and its people").split()
    while len(words) > 3 and cost(" ".join(words) + "?") > n_new:
        words = words[:-1]
    return " ".join(words) + "?"


# ---------------------------------------------------------------------------------------------
def bench_decode(llm, concurrency: list[int], tokens: int, repeat: int, kv_memory, log) -> list[dict]:
    """Aggregate decode throughput at each concurrency: every decode-only engine step is timed
    (wall time of ``Engine.step``: planning, the forward pass, sampling); tokens/s is the
    concurrency over the median step time, pooled over the repeats. Repeats are interleaved
    (1, 4, 16, 64, 1, 4, ...) so that a change in the machine's load spreads over every
    concurrency instead of landing on one; the fastest tenth of the steps is also reported, as
    the figure least disturbed by other processes."""
    from edgellm.runtime.engine import Engine, Request
    from edgellm.sampling import SamplingParams

    params = SamplingParams.greedy(max_tokens=tokens + 1, ignore_eos=True)
    steps: dict[int, list[float]] = {n: [] for n in concurrency}
    for rep in range(repeat):
        for n in concurrency:
            eng = Engine(llm, kv_memory=kv_memory, max_batch_seqs=max(256, n))
            handles = [eng.submit(Request(f"Story number {i}: once upon a time, in a town called", params))
                       for i in range(n)]
            mine = []
            by_kind = eng.step_stats.by_kind
            while not all(h.done for h in handles):
                before = by_kind["decode"]["steps"]
                t = time.perf_counter()
                eng.step()
                dt = time.perf_counter() - t
                if by_kind["decode"]["steps"] > before:
                    mine.append(dt)
            eng.close()
            steps[n] += mine
            log(f"decode: run {rep + 1}/{repeat}, {n:3d} sessions: median step {1000 * _median(mine):.1f} ms "
                f"({n / _median(mine):.1f} tok/s aggregate)")
    out = []
    for n in concurrency:
        xs = sorted(steps[n])
        fast = xs[: max(1, len(xs) // 10)][-1]
        out.append({"sessions": n, "step_ms": 1000 * _median(xs), "decode_tok_s": n / _median(xs),
                    "step_ms_p10": 1000 * fast, "decode_tok_s_p10": n / fast, "steps_timed": len(xs)})
    base, base10 = out[0]["decode_tok_s"], out[0]["decode_tok_s_p10"]
    for row in out:
        row["speedup_vs_1"] = row["decode_tok_s"] / base
        row["speedup_vs_1_p10"] = row["decode_tok_s_p10"] / base10
    return out


def bench_followup(llm, histories: list[int], new_tokens: int, repeat: int, kv_memory, log) -> list[dict]:
    from edgellm.runtime.engine import Engine, Request
    from edgellm.sampling import SamplingParams

    tok = llm.tokenizer
    one = SamplingParams.greedy(max_tokens=1)
    follow = _followup_text(tok, new_tokens)
    out = []
    for h in histories:
        # The first turn's rendered conversation is about h tokens (at least the template's own).
        empty = len(tok.encode_chat([{"role": "system", "content": "x"}, {"role": "user", "content": ""}])) + 1
        text = _filler(tok, h - empty) if h > empty + 2 else "Hi"
        ttft, ttft_recompute, computed, hist_len, kv_bytes = [], [], [], [], []
        for _ in range(repeat):
            eng = Engine(llm, kv_memory=kv_memory)
            s = eng.session(system="x")
            s.send(text, one).result()
            hist_len.append(s.kv_tokens)
            kv_bytes.append(s.kv_bytes)
            r = s.send(follow, one).result()
            ttft.append(r.ttft_s)
            computed.append(r.computed_prompt_tokens)
            conv = tok.encode_chat(s.messages[:-1])
            s.close()
            eng.close()
            # the same conversation without a session: every token computed again
            eng = Engine(llm, kv_memory=kv_memory)
            rr = eng.submit(Request(conv, one)).result()
            ttft_recompute.append(rr.ttft_s)
            eng.close()
        row = {"history_tokens": int(_median(hist_len)), "new_tokens": int(_median(computed)),
               "ttft_ms": 1000 * _median(ttft), "ttft_recompute_ms": 1000 * _median(ttft_recompute),
               "session_kv_bytes": int(_median(kv_bytes))}
        log(f"follow-up: history {row['history_tokens']:5d}: {row['new_tokens']} new tokens, TTFT "
            f"{row['ttft_ms']:.0f} ms (recomputing the history: {row['ttft_recompute_ms']:.0f} ms)")
        out.append(row)
    return out


def bench_users(llm, users: int, duration_s: float, think_s: float, max_tokens: int, kv_memory,
                host_memory, seed: int, log) -> dict:
    from edgellm.runtime.engine import Engine
    from edgellm.sampling import SamplingParams

    disk = tempfile.TemporaryDirectory(prefix="edgellm-bench-kv-")
    eng = Engine(llm, kv_memory=kv_memory, host_memory=host_memory, disk_dir=disk.name).start()
    params = SamplingParams.greedy(max_tokens=max_tokens)
    deadline = time.perf_counter() + duration_s
    lock = threading.Lock()
    first_ttft, next_ttft, turns, kv_bytes = [], [], [0], []
    errors: list[BaseException] = []

    def user(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        time.sleep(rng.uniform(0, think_s))       # users arrive spread out
        s = eng.session(system=SYSTEM)
        n = 0
        try:
            while time.perf_counter() < deadline:
                q = QUESTIONS[(i + n) % len(QUESTIONS)]
                r = s.send(q, params).result(timeout=600)
                with lock:
                    (first_ttft if n == 0 else next_ttft).append(r.ttft_s)
                    turns[0] += 1
                n += 1
                time.sleep(min(rng.expovariate(1.0 / think_s), max(0.0, deadline - time.perf_counter())))
            with lock:
                kv_bytes.append(s.kv_bytes)
        except BaseException as err:    # report, do not hang the benchmark
            errors.append(err)
        finally:
            s.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for t in threads:
        t.start()
    peak_used = 0
    while any(t.is_alive() for t in threads):
        peak_used = max(peak_used, eng.block_manager.num_used)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    st = eng.stats()
    eng.close()
    files_left = os.listdir(disk.name)
    disk.cleanup()
    phase_s = {k: v for k, v in st["phase_s"].items() if k != "retired"}
    total = sum(phase_s.values()) or 1.0
    res = {
        "users": users, "duration_s": duration_s, "think_s": think_s, "wall_s": wall, "turns": turns[0],
        "errors": [repr(e) for e in errors],
        "phase_s": phase_s, "phase_share": {k: v / total for k, v in phase_s.items()},
        "tokens": st["tokens"], "steps": st["steps"], "offload": st["offload"], "scheduler": st["scheduler"],
        "ttft_first_turn_ms": 1000 * _median(first_ttft), "ttft_followup_ms": 1000 * _median(next_ttft),
        "kv_bytes_per_session_end": int(_median(kv_bytes)) if kv_bytes else 0,
        "peak_blocks_used": peak_used, "pool_blocks": st["blocks"]["total"],
        "disk_files_left": len(files_left),
        "engine_busy_share": st["steps"]["total_s"] / wall if wall > 0 else 0.0,
    }
    log(f"users: {users} users, {turns[0]} turns in {wall:.0f} s; engine busy {100 * res['engine_busy_share']:.0f}%; "
        f"offloads {st['scheduler']['offloads']}, restores {st['scheduler']['restores']}, "
        f"preemptions {st['scheduler']['preemptions']}")
    return res


def profile_decode_batch(llm, batches: list[int], context: int = 64, repeat: int = 5, log=None) -> list[dict]:
    """Where a decode step of B sequences goes: the transformer blocks on the fused native path
    (what a decode-only step runs, up to the runner's FUSED_DECODE_MAX_ROWS: measured at every B
    here, which is how that limit was chosen), the same blocks on the per-layer path (what a step
    with a prefill chunk runs: the native kernel up to 8 rows, dequantise + sgemm above), and the
    vocabulary projection. Medians of ``repeat`` calls of the model's parts, timed by a trace of
    their op scopes, ``context`` cached tokens per sequence."""
    import torch

    from edgellm.kv.cache import BLOCK_SIZE, KVCache
    from edgellm.layers.attention import AttentionBatch

    model = llm.loaded.model
    cache = KVCache(llm.cfg, -(-max(batches) * context // BLOCK_SIZE), BLOCK_SIZE)
    threads = torch.get_num_threads()
    out = []
    with torch.inference_mode():
        for b in batches:
            batch = AttentionBatch.build([(1, context, torch.arange(i * context, (i + 1) * context)) for i in range(b)])
            h0 = model.embed(torch.randint(0, 1000, (b,)))
            rope = model.rope.tables(torch.full((b,), context - 1))
            rows = torch.arange(b)
            row = {"batch": b,
                   "lm_head_ms": _median_ms(lambda t, h0=h0, rows=rows: model.logits(h0, rows, t), repeat, ("lm_head",)),
                   "per_layer_ms": _median_ms(lambda t, h0=h0, rope=rope, batch=batch:
                                              model.forward_layers(h0.clone(), rope, batch, cache, t),
                                              repeat)}

            def fused(t, h0=h0, rope=rope, batch=batch):
                return model.decode_blocks_fused(h0.clone(), rope, batch, cache, threads, t)

            row["fused_ms"] = _median_ms(fused, repeat) if model.has_fused_decode else float("nan")
            if log:
                log(f"profile: batch {b:3d}: blocks fused {row['fused_ms']:.1f} ms, per-layer {row['per_layer_ms']:.1f} ms, "
                    f"lm_head {row['lm_head_ms']:.1f} ms")
            out.append(row)
    return out


def _median_ms(call, repeat: int, ops: tuple[str, ...] | None = None) -> float:
    """Median over ``repeat`` calls of ``call(trace)`` of the time in its op scopes (only ``ops``, if given)."""
    from edgellm.models.trace import Trace

    times = []
    for _ in range(repeat):
        trace = Trace()
        trace.begin_step(0)
        call(trace)
        times.append(sum(s for op, _, s in trace.steps[0].ops if ops is None or op in ops))
    return 1000 * _median(times)


# ---------------------------------------------------------------------------------------------
def run_sessions_bench(model: str | None = None, concurrency=(1, 4, 16, 64), decode_tokens: int = 32,
                       histories=(1, 500, 1500), followup_tokens: int = 20, users: int = 8,
                       duration_s: float = 60.0, think_s: float = 3.0, user_max_tokens: int = 48,
                       kv_memory="1GB", users_kv_memory="64MB", users_host_memory="32MB",
                       threads: int | None = 2, repeat: int = 3, seed: int = 0, profile: bool = True,
                       log: Callable[[str], None] | None = None, llm=None, dtype: str = "auto",
                       activations: str = "fp32") -> dict:
    """Run the four measurements; returns one dict (see the module docstring). ``dtype`` and
    ``activations``: the engine's arithmetic (the fast modes, docs/fast-modes.md)."""
    import torch

    from edgellm.kv.cache import BLOCK_SIZE, KVCache
    from edgellm.llm import LLM
    from edgellm.sampling import SamplingParams

    log = log or (lambda line: None)
    if llm is None:
        llm = LLM(model, threads=threads, dtype=dtype, activations=activations)
    elif threads:
        torch.set_num_threads(threads)
    llm.generate("warm up", SamplingParams.greedy(max_tokens=4))
    bpt = KVCache.bytes_per_block(llm.cfg, BLOCK_SIZE) / BLOCK_SIZE
    t0 = time.perf_counter()
    result = {
        "model": llm.cfg.name or str(model), "threads": torch.get_num_threads(), "repeat": repeat,
        "dtype": dtype, "activations": activations,
        "loadavg_start": os.getloadavg(), "cpus": os.cpu_count(),
        "kv_bytes_per_token": bpt,
        "decode": bench_decode(llm, list(concurrency), decode_tokens, repeat, kv_memory, log),
    }
    if profile:
        result["profile"] = profile_decode_batch(llm, list(concurrency), repeat=max(3, repeat), log=log)
    if histories:
        result["followup"] = bench_followup(llm, list(histories), followup_tokens, repeat, kv_memory, log)
    if users > 0 and duration_s > 0:
        result["users"] = bench_users(llm, users, duration_s, think_s, user_max_tokens, users_kv_memory,
                                      users_host_memory, seed, log)
    result["memory"] = {"kv_bytes_per_token": bpt,
                        "per_session_by_history": {r["history_tokens"]: r["session_kv_bytes"]
                                                   for r in result.get("followup", [])}}
    if "users" in result:
        result["memory"]["multi_user_session_end"] = result["users"]["kv_bytes_per_session_end"]
    result["bench_s"] = time.perf_counter() - t0
    result["loadavg_end"] = os.getloadavg()
    return result


def format_report(r: dict, out=sys.stdout) -> None:
    w = out.write
    w(f"sessions benchmark — {r['model']}, {r['threads']} threads, medians of {r['repeat']}; "
      f"load average {r['loadavg_start'][0]:.1f} at the start, {r['loadavg_end'][0]:.1f} at the end "
      f"({r['cpus']} CPUs)\n\n")
    w("aggregate decode throughput (median step; fastest tenth of the steps in brackets)\n"
      "  sessions    tok/s          ms/step          vs 1 session\n")
    for d in r["decode"]:
        w(f"  {d['sessions']:8d} {d['decode_tok_s']:7.1f} ({d['decode_tok_s_p10']:6.1f}) {d['step_ms']:8.1f} "
          f"({d['step_ms_p10']:7.1f}) {d['speedup_vs_1']:6.2f}x ({d['speedup_vs_1_p10']:.2f}x)\n")
    if r.get("profile"):
        w("\ndecode step parts (ms, medians): transformer blocks on the fused native path / on the per-layer\n"
          "path (dequantise + sgemm above 8 rows) / vocabulary projection\n  batch   fused  per-layer  lm_head\n")
        for p in r["profile"]:
            w(f"  {p['batch']:5d} {p['fused_ms']:7.1f} {p['per_layer_ms']:10.1f} {p['lm_head_ms']:8.1f}\n")
    if r.get("followup"):
        w("\nfollow-up turn: time to first token\n  history  new tokens  TTFT (session)  TTFT (recompute all)\n")
        for f in r["followup"]:
            w(f"  {f['history_tokens']:7d} {f['new_tokens']:11d} {f['ttft_ms']:12.0f} ms "
              f"{f['ttft_recompute_ms']:16.0f} ms\n")
    m = r["memory"]
    w(f"\nmemory: {m['kv_bytes_per_token'] / 1024:.1f} KiB of KV per token" +
      "".join(f"; {h} tokens -> {b / 2 ** 20:.1f} MiB" for h, b in m["per_session_by_history"].items()) + "\n")
    u = r.get("users")
    if u:
        w(f"\nmulti-user: {u['users']} users, think time ~{u['think_s']} s, {u['turns']} turns in {u['wall_s']:.0f} s "
          f"(engine busy {100 * u['engine_busy_share']:.0f}% of the time)\n")
        w("  phase               seconds (all sessions)   share\n")
        for k, v in u["phase_s"].items():
            w(f"  {k:18s} {v:12.1f} {100 * u['phase_share'][k]:14.1f}%\n")
        bk = u["steps"]["by_kind"]
        w("  engine steps: " + ", ".join(f"{k} {v['steps']} ({v['s']:.1f} s)" for k, v in bk.items()) + "\n")
        t = u["tokens"]
        w(f"  tokens: prefill {t.get('prefill', 0)}, follow-up prefill {t.get('followup_prefill', 0)}, "
          f"decode {t.get('decode', 0)}, reused from cache {t.get('reused', 0)}, recomputed {t.get('recomputed', 0)}\n")
        o = u["offload"]
        w(f"  offload: {o['stored_host']} to host, {o['stored_disk']} to disk, {o['restored_host'] + o['restored_disk']} "
          f"restored, {o['dropped']} dropped; preemptions {u['scheduler']['preemptions']}\n")
        w(f"  TTFT: first turn {u['ttft_first_turn_ms']:.0f} ms, follow-up {u['ttft_followup_ms']:.0f} ms (medians); "
          f"KV per session at the end {u['kv_bytes_per_session_end'] / 2 ** 20:.1f} MiB; "
          f"peak {u['peak_blocks_used']}/{u['pool_blocks']} blocks\n")
        if u["errors"]:
            w(f"  errors: {u['errors']}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgellm.bench.sessions", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--histories", default="1,500,1500")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0, help="seconds the multi-user scenario runs")
    p.add_argument("--think", type=float, default=3.0, help="mean think time between a user's turns (s)")
    p.add_argument("--kv-memory", default="1GB")
    p.add_argument("--users-kv-memory", default="64MB", help="pool of the multi-user scenario (small: offload)")
    p.add_argument("--users-host-memory", default="32MB")
    p.add_argument("--quick", action="store_true", help="a short run: fewer sessions, repeats and seconds")
    p.add_argument("--profile", action="store_true",
                   help="only profile a decode step's parts (fused blocks, per-layer blocks, lm_head) per batch size")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="the engine's compute dtype (bfloat16: the fast mode)")
    p.add_argument("--activations", default="fp32", choices=("fp32", "int8"), help="int8: the fast mode")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.profile:
        from edgellm.llm import LLM

        llm = LLM(a.model, threads=a.threads, dtype=a.dtype, activations=a.activations)
        rows = profile_decode_batch(llm, [int(x) for x in a.concurrency.split(",")], repeat=max(a.repeat, 3))
        if a.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"decode step parts, {a.threads} threads, medians (load average {os.getloadavg()[0]:.1f})")
            print("  batch  blocks fused  blocks per-layer  lm_head   (ms)")
            for r in rows:
                print(f"  {r['batch']:5d} {r['fused_ms']:13.1f} {r['per_layer_ms']:17.1f} {r['lm_head_ms']:8.1f}")
        return 0
    if a.quick:
        a.repeat, a.concurrency, a.decode_tokens, a.histories, a.users, a.duration = 1, "1,4", 8, "1,200", 3, 10
    res = run_sessions_bench(
        model=a.model, concurrency=[int(x) for x in a.concurrency.split(",")], decode_tokens=a.decode_tokens,
        histories=[int(x) for x in a.histories.split(",") if x], users=a.users, duration_s=a.duration, think_s=a.think,
        kv_memory=a.kv_memory, users_kv_memory=a.users_kv_memory, users_host_memory=a.users_host_memory,
        threads=a.threads, repeat=a.repeat, log=lambda line: print(f"bench: {line}", file=sys.stderr, flush=True),
        dtype=a.dtype, activations=a.activations)
    if a.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        format_report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
