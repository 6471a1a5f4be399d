"""`edgellm bench --speculative METHOD --workload NAME`: speculative decoding against plain decoding.

One run measures, with interleaved repeats (round ``i`` asks every engine once before round
``i + 1`` asks any, the order rotating), on one shipped workload prompt
(:mod:`edgellm.bench.workloads`, rendered with the model's chat template):

* ``ours``: our engine with ``--speculative METHOD`` (``decode_tok_s``) and the same engine
  without it (``baseline_decode_tok_s``) -- one worker process, one loaded model, two ``LLM``
  objects over it, the same prompt ids; ``speedup`` is the ratio of the two medians. Greedy, EOS
  respected, at most ``--gen-tokens`` tokens: the reply ends where the model ends it, so the text
  measured is the one a user would get (a model made to continue past EOS wanders into text that
  copies nothing, which would understate prompt lookup on the copying workloads). Both variants
  generate the same tokens by construction -- ``identical_tokens`` checks it on every repeat; a
  mismatch is a bug, reported loudly (and the command exits with status 1).
* ``llama.cpp`` (``--peers llama.cpp``, llama-cpp-python): plain decoding and its own prompt-lookup
  drafting (``LlamaPromptLookupDecoding(num_pred_tokens=K)``, K = ``--draft-tokens``) on the same
  GGUF file, the same prompt ids, greedy, the same threads, and exactly as many generated tokens
  as our greedy reply has (EOS not checked there, so that every engine times the same count).

Timing conventions are the single-sequence benchmark's (:mod:`edgellm.bench.worker`):
``decode_tok_s = (tokens - 1) / (time of the last token - time of the first)``.

This module imports no torch: the workers do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, TextIO

from edgellm.bench import harness
from edgellm.bench.harness import (
    PEERS,
    Worker,
    WorkerFailed,
    as_user_error,
    close_all,
    loadavg,
    median,
    peer_failure,
    rotated,
    write_prompt_file,
)
from edgellm.errors import InvalidParameterError
from edgellm.runtime.scheduler import common_prefix

SPEC = "ours"                 # ours with speculation
PLAIN = "ours-plain"          # ours without
LLAMA = "llama.cpp"           # llama.cpp, plain decoding
LOOKUP = "llama.cpp-lookup"   # llama.cpp with its prompt-lookup drafting
DEFAULT_GEN_TOKENS = 256


@dataclass
class SpecBenchOptions:
    speculative: str
    workload: str = "code-edit"
    draft_tokens: int | None = None
    model: str | None = None
    gen_tokens: int = DEFAULT_GEN_TOKENS
    threads: int = 2
    repeat: int = 3
    dtype: str = "auto"
    peers: list[str] = field(default_factory=list)
    weights: str | None = None
    keep: str = ""
    kv_dtype: str = "fp32"


def validate(opts: SpecBenchOptions) -> None:
    """Refuse bad input before any process starts."""
    from edgellm.bench.workloads import get_workload
    from edgellm.runtime.speculative import parse_speculative

    get_workload(opts.workload)
    parse_speculative(opts.speculative, opts.draft_tokens)
    for flag, value, fix in (("--gen-tokens", opts.gen_tokens, "e.g. --gen-tokens 256"),
                             ("--repeat", opts.repeat, "e.g. --repeat 3"),
                             ("--threads", opts.threads, "e.g. --threads 2")):
        if value < 1:
            raise InvalidParameterError(f"{flag} must be at least 1, got {value}", fix)
    for p in opts.peers:
        if p != LLAMA:
            raise InvalidParameterError(f"the speculative benchmark has no peer {p!r}",
                                        "use --peers llama.cpp (its plain decoding and its prompt lookup)")


def draft_tokens_of(opts: SpecBenchOptions) -> int:
    from edgellm.runtime.speculative import parse_speculative
    return parse_speculative(opts.speculative, opts.draft_tokens).draft_tokens


def run_spec_bench(opts: SpecBenchOptions, log: Callable[[str], None] | None = None) -> dict:
    """Run the whole speculative benchmark; returns the summary (the ``--json`` object)."""
    log = log or (lambda s: None)
    validate(opts)
    k = draft_tokens_of(opts)
    peer_status: dict[str, dict] = {}
    if LLAMA in opts.peers:
        module, install = PEERS[LLAMA]
        if harness.find_spec(module) is None:     # harness's: tests pretend a peer is missing there
            peer_status[LLAMA] = {"status": "skipped", "reason": f"Python package {module} is not installed",
                                  "install": install}
    load_start = loadavg()
    common = ["--threads", str(opts.threads)]
    workers: dict[str, Worker] = {}
    prompt_file = None
    samples: dict[str, list[dict]] = {SPEC: [], PLAIN: [], LLAMA: [], LOOKUP: []}
    try:
        log(f"loading ours ({opts.model or 'default model'}, {opts.speculative}, workload {opts.workload}); "
            "warm-up: one full generation with and without speculation ...")
        ours_args = common + ["--gen-tokens", str(opts.gen_tokens), "--dtype", opts.dtype, "--kv-dtype", opts.kv_dtype,
                              "--speculative", opts.speculative, "--draft-tokens", str(k), "--workload", opts.workload] + \
            (["--model", opts.model] if opts.model else []) + (["--weights", opts.weights] if opts.weights else []) + \
            (["--keep", opts.keep] if opts.keep else [])
        workers[SPEC] = Worker("ours-spec", ours_args, opts.threads)
        try:
            info = workers[SPEC].wait_ready()["info"]
        except WorkerFailed as err:
            raise as_user_error(err) from None
        prompt = info.pop("prompt_ids")
        n_out = info["completion_tokens"]
        log(f"prompt {len(prompt)} tokens; the greedy reply has {n_out} tokens ({info['finish_reason']})")
        if LLAMA in opts.peers and LLAMA not in peer_status:
            prompt_file = write_prompt_file(prompt, "edgellm-specbench-")
            peer_args = common + ["--model-path", info["model_path"], "--prompt-file", prompt_file,
                                  "--gen-tokens", str(n_out)]
            log("loading llama.cpp (plain, and with prompt lookup) ...")
            workers[LLAMA] = Worker(LLAMA, peer_args + ["--lookup", "0"], opts.threads)
            workers[LOOKUP] = Worker(LLAMA, peer_args + ["--lookup", str(k)], opts.threads)
            for key in (LLAMA, LOOKUP):
                try:
                    peer_info = workers[key].wait_ready()["info"]
                    peer_status.setdefault(LLAMA, {"status": "ok", "info": {}})["info"][key] = peer_info
                except WorkerFailed as err:
                    peer_status[LLAMA] = peer_failure(err)
                    log(f"llama.cpp: failed to start: {peer_status[LLAMA]['reason']}")
                    break
            if peer_status[LLAMA]["status"] != "ok":
                _drop_llama(workers)

        rounds = [SPEC, PLAIN] + [e for e in (LLAMA, LOOKUP) if e in workers]
        for i in range(opts.repeat):
            for e in rotated(rounds, i):
                if e == PLAIN:
                    w, cmd = workers[SPEC], {"cmd": "run", "variant": "plain"}
                elif e == SPEC:
                    w, cmd = workers[SPEC], {"cmd": "run", "variant": "spec"}
                elif e in workers:
                    w, cmd = workers[e], {"cmd": "run"}
                else:
                    continue
                try:
                    r = w.ask(cmd)
                except WorkerFailed as err:
                    if e in (SPEC, PLAIN):
                        raise as_user_error(err) from None
                    peer_status[LLAMA] = peer_failure(err)
                    _drop_llama(workers)
                    log(f"llama.cpp: failed: {peer_status[LLAMA]['reason']}")
                    continue
                samples[e].append(r)
                log(_progress(i, opts.repeat, e, r))
    finally:
        close_all(workers, prompt_file)
    summary = summarize(opts, k, info, len(prompt), samples, peer_status)
    summary["machine"] = {"cpu_count": os.cpu_count(), "loadavg_1min_start": load_start,
                          "loadavg_1min_end": loadavg()}
    return summary


def _progress(i: int, n: int, engine: str, r: dict) -> str:
    line = f"[{i + 1}/{n}] {engine:<17} decode {r['decode_tok_s']:7.1f} tok/s  {r['completion_tokens']} tokens"
    if "acceptance_rate" in r:
        line += (f"  accepted {r['accepted']}/{r['proposed']} proposed over {r['verify_steps']} verify steps"
                 f" ({r['tokens_per_verify_step']:.2f} tokens per step)")
    return line + f"  other jobs {r.get('others_cores', 0):.1f} cores"


def _drop_llama(workers: dict[str, Worker]) -> None:
    """End both llama.cpp workers (plain and prompt lookup): one failed, the pair is reported as one."""
    for key in (LLAMA, LOOKUP):
        if key in workers:
            workers.pop(key).close()


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def summarize(opts: SpecBenchOptions, k: int, info: dict, prompt_tokens: int, samples: dict[str, list[dict]],
              peer_status: dict[str, dict]) -> dict:
    spec, plain = samples[SPEC], samples[PLAIN]
    dec = median([r["decode_tok_s"] for r in spec])
    base = median([r["decode_tok_s"] for r in plain])
    reference = plain[0]["token_ids"] if plain else []
    mismatches = []
    for i, r in enumerate(spec + plain):
        where = _first_difference(reference, r["token_ids"])
        if where is not None:
            mismatches.append({"run": i, "variant": r.get("variant"), "first_differing_token": where})
    proposed = sum(r["proposed"] for r in spec)
    accepted = sum(r["accepted"] for r in spec)
    steps = sum(r["verify_steps"] for r in spec)
    committed = sum(r["verify_tokens"] for r in spec)
    out = {
        "workload": opts.workload,
        "speculative": info.get("speculative", opts.speculative),
        "draft_tokens": k,
        "model": {key: info[key] for key in ("model_name", "model_path", "model_kind", "architecture", "file_bytes",
                                             "weight_bytes", "weight_formats", "dtype", "kv_dtype", "n_layers")},
        "settings": {"threads": opts.threads, "repeat": opts.repeat, "max_gen_tokens": opts.gen_tokens,
                     "prompt_tokens": prompt_tokens, "completion_tokens": info["completion_tokens"],
                     "finish_reason": info["finish_reason"],
                     "eos": "respected by ours (greedy reply up to --gen-tokens); llama.cpp generates as many "
                            "tokens as ours' reply, EOS not checked",
                     "warmup": "one full generation per variant, not counted"},
        "decode_tok_s": dec,
        "baseline_decode_tok_s": base,
        "speedup": _ratio(dec, base),
        "paired_speedup": median([_ratio(a["decode_tok_s"], b["decode_tok_s"]) for a, b in zip(spec, plain)]),
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "tokens_per_verify_step": committed / steps if steps else 0.0,
        "proposed": proposed, "accepted": accepted, "verify_steps": steps, "verify_tokens": committed,
        "ttft_s": median([r["ttft_s"] for r in spec]),
        "baseline_ttft_s": median([r["ttft_s"] for r in plain]),
        "identical_tokens": not mismatches and bool(spec) and bool(plain),
        "mismatches": mismatches,
        "repeats": {e: [{key: v for key, v in r.items() if key not in ("event", "token_ids")} for r in rs]
                    for e, rs in samples.items() if rs},
        "peers": {},
    }
    if LLAMA in opts.peers:
        st = peer_status.get(LLAMA, {"status": "failed", "reason": "not run"})
        if st["status"] != "ok" or not samples[LLAMA] or not samples[LOOKUP]:
            out["peers"][LLAMA] = st if st["status"] != "ok" else {"status": "failed", "reason": "no runs"}
        else:
            lp, lk = samples[LLAMA], samples[LOOKUP]
            plain_tok_s = median([r["decode_tok_s"] for r in lp])
            lookup_tok_s = median([r["decode_tok_s"] for r in lk])
            ours_ids = reference[:info["completion_tokens"]]
            out["peers"][LLAMA] = {
                "status": "ok",
                "decode_tok_s": plain_tok_s,
                "prompt_lookup_decode_tok_s": lookup_tok_s,
                "prompt_lookup_speedup": _ratio(lookup_tok_s, plain_tok_s),
                "prompt_lookup_tokens": k,
                "ttft_s": median([r["ttft_s"] for r in lp]),
                "completion_tokens": lp[0]["completion_tokens"],
                # ours with speculation over each llama.cpp figure (above 1: ours faster)
                "ours_over_plain": _ratio(dec, plain_tok_s),
                "ours_over_prompt_lookup": _ratio(dec, lookup_tok_s),
                "prompt_lookup_same_tokens_as_plain": all(r["token_ids"] == lp[0]["token_ids"] for r in lk + lp),
                "same_tokens_as_ours": common_prefix(ours_ids, lp[0]["token_ids"]),
                "info": st.get("info", {}),
            }
    return out


def format_report(s: dict, out: TextIO) -> None:
    m, st = s["model"], s["settings"]
    w = out.write
    w(f"edgellm bench --speculative {s['speculative']} (at most {s['draft_tokens']} proposed tokens per step), "
      f"workload {s['workload']}\n")
    w(f"  model {m['model_name']}, {m['architecture']}, {m['n_layers']} layers, weights "
      f"{', '.join(m['weight_formats'])}, compute dtype {m['dtype']}\n")
    w(f"  prompt {st['prompt_tokens']} tokens (chat template), greedy reply {st['completion_tokens']} tokens "
      f"({st['finish_reason']}; at most {st['max_gen_tokens']}), {st['threads']} threads, "
      f"median of {st['repeat']} interleaved repeats after one warm-up\n\n")
    w(f"  {'engine':<34}{'decode tok/s':>13}{'vs ours plain':>15}\n")
    base = s["baseline_decode_tok_s"]
    rows = [(f"ours, {s['speculative']}", s["decode_tok_s"]), ("ours, no speculation", base)]
    peer = s["peers"].get(LLAMA)
    if peer and peer.get("status") == "ok":
        rows += [("llama.cpp, plain", peer["decode_tok_s"]),
                 (f"llama.cpp, prompt lookup (K={peer['prompt_lookup_tokens']})", peer["prompt_lookup_decode_tok_s"])]
    for name, v in rows:
        w(f"  {name:<34}{v:>13.1f}{_ratio(v, base):>14.2f}x\n")
    w(f"\n  speedup {s['speedup']:.2f}x (median of paired rounds {s['paired_speedup']:.2f}x); acceptance rate "
      f"{100 * s['acceptance_rate']:.1f}% ({s['accepted']} of {s['proposed']} proposed tokens); "
      f"{s['tokens_per_verify_step']:.2f} tokens per verify step over {s['verify_steps']} verify steps\n")
    if s["identical_tokens"]:
        w("  speculative output identical to plain output, token for token, on every repeat\n")
    else:
        w("  !!! MISMATCH: the speculative output differs from the plain output -- a bug in speculative decoding: "
          + "; ".join(f"run {x['run']} ({x['variant']}) from token {x['first_differing_token']}"
                      for x in s["mismatches"]) + "\n")
    if peer:
        if peer.get("status") == "ok":
            w(f"  ours with speculation over llama.cpp: {peer['ours_over_plain']:.2f}x its plain decoding, "
              f"{peer['ours_over_prompt_lookup']:.2f}x its prompt lookup; llama.cpp's greedy tokens equal ours "
              f"for the first {peer['same_tokens_as_ours']} of {peer['completion_tokens']}; its prompt lookup "
              f"{'gives' if peer['prompt_lookup_same_tokens_as_plain'] else 'does NOT give'} its plain tokens\n")
        elif peer.get("status") == "skipped":
            w(f"  llama.cpp skipped: {peer['reason']}; install with: {peer['install']}\n")
        else:
            w(f"  llama.cpp failed: {peer.get('reason')}\n")
    mach = s.get("machine") or {}
    if mach.get("loadavg_1min_start") is not None:
        w(f"  machine: {mach['cpu_count']} cores, 1-minute load average {mach['loadavg_1min_start']:.2f} at the "
          f"start, {mach['loadavg_1min_end']:.2f} at the end\n")
