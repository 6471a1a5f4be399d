"""`edgellm eval`: what a precision format costs in quality (and, with `report`, in speed).

    edgellm eval perplexity --model M [--weights F] [--keep L] [--kv-dtype D] [--activations int8 | --dtype bfloat16]
                            [--corpus FILE] [--context 512] [--stride N] [--max-tokens N] [--json]
    edgellm eval agreement  --model M --weights F [--kv-dtype D] [--prompts FILE] [--tokens 32] [--json]
    edgellm eval agreement  --model M --activations int8 ...   (against the same weights, exact activations)
    edgellm eval agreement  --model M --dtype bfloat16 ...     (against the same weights, computed exactly)
    edgellm eval report     [--weights F1,F2,...] [--kv-dtypes D1,...] [--out-md FILE] ...

``report`` runs each configuration in a fresh process (so resident memory is its own) and prints
one markdown table: file size, memory, perplexity and its change against float32, greedy
agreement with float32, prefill and decode tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys

from edgellm.cli.common import add_activations_argument

HELP = "measure a model's quality: perplexity on a text, greedy agreement with float32, or a full report"

DEFAULT_REPORT_WEIGHTS = ("float32", "bfloat16", "float16", "int8", "int4", "int4-g64-sym", "q8_0", "q4_0", "q4_1",
                          "q4_k", "q6_k", "fp8", "fp8-e5m2", "ternary", "int4+keep")
DEFAULT_REPORT_KV = ("fp16", "bf16", "fp8", "int8")
# the mixed-precision example of the report: int4 with the embedding/lm_head and first/last block at 16 bits
MIXED_KEEP = ("token_embd", "blk.0", "blk.-1")


def _common(p: argparse.ArgumentParser, weights_required: bool = False) -> None:
    p.add_argument("--model", default=None, help="a .gguf file, an HF folder, an edgellm .safetensors file or a "
                                                 "registry name (default: smollm2-135m)")
    p.add_argument("--weights", default=None, required=weights_required, metavar="FORMAT",
                   help="convert the weights at load time: float32, bfloat16, float16, int8, int4[-gN][-sym], "
                        "q8_0, q4_0, q4_1, q4_k, q6_k, fp8[-e5m2], ternary (default: as loaded)")
    p.add_argument("--keep", action="append", default=[], metavar="LAYERS",
                   help="with --weights: matrices left at 16 bits (token_embd, lm_head, blk.0, 'blk.*.ffn_down', "
                        "comma-separated, repeatable)")
    p.add_argument("--kv-dtype", default="fp32", help="KV cache precision: fp32, fp16, bf16, fp8, int8 (default fp32)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute precision, as for generate: bfloat16 is the opt-in bf16 arithmetic of GGUF block weights "
                        "(agreement then compares with the same weights computed exactly; default auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_activations_argument(p)   # agreement with int8: against the same weights with exact activations


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", metavar="WHAT")
    sub.required = True
    pp = sub.add_parser("perplexity", help="sliding-window perplexity on a text file")
    _common(pp)
    pp.add_argument("--corpus", default=None, help="UTF-8 text (default: /usr/share/common-licenses/GPL-3)")
    pp.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    pp.add_argument("--stride", type=int, default=None, help="tokens between windows (default: context / 2)")
    pp.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the corpus")
    pa = sub.add_parser("agreement", help="greedy continuations compared with the float32 model's")
    _common(pa, weights_required=False)
    pa.add_argument("--prompts", default=None, help="a file with one prompt a line (default: 16 built-in prompts)")
    pa.add_argument("--tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    ps = sub.add_parser("speed", help="prefill/decode tokens/s of several formats, measured in turns in one process")
    ps.add_argument("--model", default=None)
    ps.add_argument("--weights", default="float32,bfloat16,int8,int4,auto",
                    help="comma-separated formats ('auto': as loaded; 'F+keep' as in report)")
    ps.add_argument("--kv-dtypes", default="", help="comma-separated KV dtypes, each with float32 weights")
    ps.add_argument("--prompt-tokens", type=int, default=128)
    ps.add_argument("--gen-tokens", type=int, default=64)
    ps.add_argument("--rounds", type=int, default=5)
    ps.add_argument("--threads", type=int, default=1)
    ps.add_argument("--json", action="store_true")
    pr = sub.add_parser("report", help="the precision table: size, memory, quality and speed per format")
    pr.add_argument("--model", default=None)
    pr.add_argument("--weights", default=",".join(DEFAULT_REPORT_WEIGHTS),
                    help="comma-separated formats; 'auto' is the model as loaded, 'F+keep' keeps "
                         + ",".join(MIXED_KEEP) + " at 16 bits")
    pr.add_argument("--kv-dtypes", default=",".join(DEFAULT_REPORT_KV),
                    help="comma-separated KV dtypes, each run with float32 weights")
    pr.add_argument("--corpus", default=None)
    pr.add_argument("--context", type=int, default=512)
    pr.add_argument("--stride", type=int, default=None)
    pr.add_argument("--max-tokens", type=int, default=4096)
    pr.add_argument("--tokens", type=int, default=32, help="agreement tokens per prompt")
    pr.add_argument("--prompt-tokens", type=int, default=128)
    pr.add_argument("--gen-tokens", type=int, default=64)
    pr.add_argument("--repeats", type=int, default=3)
    pr.add_argument("--threads", type=int, default=1)
    pr.add_argument("--no-file-size", action="store_true", help="skip writing each format's file to measure it")
    pr.add_argument("--out-md", default=None, help="also write the table here")
    pr.add_argument("--out-json", default=None, help="write every measurement here")


def _load(args):
    """Validate everything cheap first (nothing is loaded yet); the config and the KV dtype name."""
    from edgellm.cli.common import check_precision
    from edgellm.dtypes import kv_dtype_name
    from edgellm.loading.convert import peek_config

    cfg = check_precision(args) or peek_config(args.model)[1]
    return cfg, kv_dtype_name(args.kv_dtype)


def _finish_load(args):
    from edgellm.loading.load import load_model
    from edgellm.util import set_threads

    set_threads(args.threads)
    loaded = load_model(args.model, args.dtype)
    if args.weights:
        from edgellm.loading.convert import convert_weights
        loaded = convert_weights(loaded, args.weights, args.keep, progress=not args.json)
    if args.activations != "fp32":
        from edgellm.quant.activations import set_activations
        set_activations(loaded.model, args.activations)
    return loaded


def _run_perplexity(args) -> int:
    from edgellm.quality import check_window, perplexity, read_corpus

    cfg, kv = _load(args)
    stride = check_window(args.context, args.stride, cfg)
    if args.max_tokens is not None and args.max_tokens < 2:
        from edgellm.errors import InvalidParameterError
        raise InvalidParameterError(f"--max-tokens must be at least 2, got {args.max_tokens}", "use e.g. 4096")
    text = read_corpus(args.corpus)
    loaded = _finish_load(args)
    ids = loaded.tokenizer.encode(text)
    corpus_tokens = len(ids)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]

    def progress(done, total):
        if not args.json:
            print(f"\r{done}/{total} tokens scored", end="", file=sys.stderr, flush=True)

    r = perplexity(loaded.model, loaded.config, ids, args.context, stride, kv, progress)
    if not args.json:
        print(file=sys.stderr)
    out = {"perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens, "windows": r.windows,
           "context": r.context, "stride": r.stride, "seconds": r.seconds, "tokens_per_s": r.tokens_per_s,
           "weights": args.weights or loaded.dtype, "keep": args.keep, "kv_dtype": kv, "activations": args.activations,
           "dtype": args.dtype, "model": loaded.source.name, "corpus": str(args.corpus or "/usr/share/common-licenses/GPL-3"),
           "corpus_tokens": corpus_tokens, "weight_bytes": loaded.weight_bytes}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"perplexity {r.perplexity:.4f} over {r.tokens} tokens ({r.windows} windows of {r.context}, "
              f"stride {r.stride}); weights {out['weights']}, KV {kv}; {r.seconds:.1f} s")
    return 0


def _prompts(path) -> list[str]:
    from edgellm.quality import PROMPTS

    if path is None:
        return list(PROMPTS)
    from pathlib import Path

    from edgellm.errors import InvalidParameterError, ModelNotFoundError
    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(f"prompts file {p} does not exist", "give a text file with one prompt a line")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise InvalidParameterError(f"prompts file {p} has no prompt", "write one prompt a line")
    return lines


def _run_agreement(args) -> int:
    from edgellm.errors import InvalidParameterError
    from edgellm.quality import agreement, greedy_continuations

    cfg, kv = _load(args)
    if args.tokens < 1:
        raise InvalidParameterError(f"--tokens must be at least 1, got {args.tokens}", "use e.g. --tokens 32")
    prompts = _prompts(args.prompts)
    loaded = _finish_load(args)
    ids = [loaded.tokenizer.encode(p) for p in prompts]
    from edgellm.loading.convert import convert_weights
    from edgellm.loading.load import load_model
    # the reference: float32 weights; for a fast mode (--activations int8, --dtype bfloat16), its own
    # weights run exactly
    fast_mode = (args.activations != "fp32" or args.dtype == "bfloat16") and not args.weights
    reference_model = load_model(args.model) if fast_mode else convert_weights(load_model(args.model), "float32")
    refs = greedy_continuations(reference_model, ids, args.tokens)
    del reference_model
    r = agreement(loaded, ids, refs, kv)
    # where each continuation first leaves the reference's (its length: never)
    r["first_divergence"] = [next((i for i, (a, b) in enumerate(zip(c, ref)) if a != b), len(ref))
                             for c, ref in zip(r.pop("continuations"), refs)]
    out = {**r, "weights": args.weights or loaded.dtype, "keep": args.keep, "kv_dtype": kv,
           "activations": args.activations, "dtype": args.dtype,
           "reference": "the same weights, exact" if fast_mode else "float32 weights", "model": loaded.source.name}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"greedy agreement with {out['reference']}: {r['agreement']:.3f} of tokens identical, "
              f"top-1 (teacher-forced) {r['top1_agreement']:.3f}; first divergence at token "
              f"{sorted(r['first_divergence'])[len(ids) // 2]} (median; {r['tokens_per_prompt']}: none); "
              f"{r['prompts']} prompts x {r['tokens_per_prompt']} "
              f"tokens; weights {out['weights']}, KV {kv}")
    return 0


# --------------------------------------------------------------------------------------------
# report

def _split_weights(name: str) -> tuple[str, list[str]]:
    if name.endswith("+keep"):
        return name[: -len("+keep")], list(MIXED_KEEP)
    return name, []


def _worker() -> None:
    """One report configuration, in its own process: JSON job on stdin, JSON result on stdout."""
    import os
    import tempfile

    import torch

    from edgellm.loading.convert import convert_weights, quantize_model
    from edgellm.loading.load import load_model
    from edgellm.quality import agreement, greedy_continuations, measure_speed, perplexity, read_corpus
    from edgellm.util import peak_rss_mb, rss_now_mb

    job = json.loads(sys.stdin.read())
    torch.set_num_threads(job["threads"])
    fmt, keep = _split_weights(job["weights"])
    rss0 = int(rss_now_mb() * 2**20)
    loaded = load_model(job["model"])
    if fmt != "auto":
        loaded = convert_weights(loaded, fmt, keep)
    res = {"weights": job["weights"], "kv_dtype": job["kv_dtype"], "weight_bytes": loaded.weight_bytes,
           "rss_bytes": int(rss_now_mb() * 2**20), "rss_before_load": rss0}
    if fmt == "auto":
        res["file_bytes"] = loaded.file_bytes
    elif job["file_size"]:
        from edgellm.quant.registry import parse_format
        ext = ".gguf" if parse_format(fmt).gguf_type else ".safetensors"
        with tempfile.TemporaryDirectory(prefix="edgellm-report-") as tmp:
            out = os.path.join(tmp, "model" + ext)
            res["file_bytes"] = quantize_model(job["model"], fmt, out, keep, progress=False)["bytes"]
    ids = loaded.tokenizer.encode(read_corpus(job["corpus"]))
    p = perplexity(loaded.model, loaded.config, ids[: job["max_tokens"]], job["context"], job["stride"],
                   job["kv_dtype"])
    res.update(perplexity=p.perplexity, ppl_tokens=p.tokens, ppl_seconds=p.seconds)
    prompts = [loaded.tokenizer.encode(s) for s in job["prompts"]]
    if job["references"] is None:
        res["references"] = greedy_continuations(loaded, prompts, job["tokens"], job["kv_dtype"])
        res.update(agreement=1.0, top1_agreement=1.0)
    else:
        a = agreement(loaded, prompts, job["references"], job["kv_dtype"])
        res.update(agreement=a["agreement"], top1_agreement=a["top1_agreement"])
    res.update(measure_speed(loaded, job["kv_dtype"], ids, job["prompt_tokens"], job["gen_tokens"], job["repeats"]))
    res["rss_peak_bytes"] = int(peak_rss_mb() * 2**20)
    print("\n" + json.dumps(res))


def _run_job(job: dict) -> dict:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "edgellm.cli.eval"],
                          input=json.dumps(job), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"weights": job["weights"], "kv_dtype": job["kv_dtype"], "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict], base_ppl: float | None) -> str:
    mb = lambda b: f"{b / 1e6:.1f}" if b else "-"   # noqa: E731
    lines = ["| weights | KV | file MB | weights MB | RSS MB | perplexity | vs fp32 | agreement | top-1 | "
             "prefill tok/s | decode tok/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['weights']} | {r['kv_dtype']} | error: {r['error']} |" + " |" * 8)
            continue
        delta = f"{(r['perplexity'] / base_ppl - 1) * 100:+.1f}%" if base_ppl else "-"
        lines.append(f"| {r['weights']} | {r['kv_dtype']} | {mb(r.get('file_bytes'))} | {mb(r['weight_bytes'])} | "
                     f"{mb(r['rss_bytes'])} | {r['perplexity']:.3f} | {delta} | {r['agreement']:.3f} | "
                     f"{r['top1_agreement']:.3f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")
    return "\n".join(lines)


def _run_report(args) -> int:
    from edgellm.dtypes import kv_dtype_name
    from edgellm.loading.convert import peek_config, prepare
    from edgellm.quality import PROMPTS, check_window, read_corpus

    _, cfg = peek_config(args.model)
    weights = [w.strip() for w in args.weights.split(",") if w.strip()]
    kvs = [kv_dtype_name(k.strip()) for k in args.kv_dtypes.split(",") if k.strip()]
    for w in weights:                       # refuse a bad format before the first run
        fmt, keep = _split_weights(w)
        if fmt != "auto":
            prepare(cfg, fmt, keep)
    stride = check_window(args.context, args.stride, cfg)
    read_corpus(args.corpus)
    base = {"model": args.model, "corpus": args.corpus, "max_tokens": args.max_tokens, "context": args.context,
            "stride": stride, "tokens": args.tokens, "prompts": list(PROMPTS), "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens, "repeats": args.repeats, "threads": args.threads,
            "file_size": not args.no_file_size}
    print("reference: float32 weights, fp32 KV ...", file=sys.stderr, flush=True)
    ref = _run_job({**base, "weights": "float32", "kv_dtype": "fp32", "references": None})
    if "error" in ref:
        from edgellm.errors import EdgeLLMError
        raise EdgeLLMError(f"the float32 reference run failed: {ref['error']}")
    refs = ref.pop("references")
    rows = [ref]
    plan = [(w, "fp32") for w in weights if w != "float32"] + [("float32", k) for k in kvs if k != "fp32"]
    for w, k in plan:
        print(f"{w} weights, {k} KV ...", file=sys.stderr, flush=True)
        r = _run_job({**base, "weights": w, "kv_dtype": k, "references": refs})
        if k != "fp32" and "error" not in r:
            r["file_bytes"] = ref.get("file_bytes")
        rows.append(r)
        print(format_table([r], ref["perplexity"]).splitlines()[-1], file=sys.stderr, flush=True)
    table = format_table(rows, ref["perplexity"])
    print(table)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(table + "\n")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"settings": {k: v for k, v in base.items() if k != "prompts"}, "rows": rows}, f, indent=1)
    return 0


def _run_speed(args) -> int:
    from edgellm.dtypes import kv_dtype_name, kv_storage_dtype
    from edgellm.loading.convert import convert_weights, peek_config, prepare
    from edgellm.loading.load import load_model
    from edgellm.quality import interleaved_speed, read_corpus
    from edgellm.util import set_threads

    _, cfg = peek_config(args.model)
    weights = [w.strip() for w in args.weights.split(",") if w.strip()]
    kvs = [kv_dtype_name(k.strip()) for k in args.kv_dtypes.split(",") if k.strip()]
    for k in kvs:
        kv_storage_dtype(k)
    for w in weights:
        fmt, keep = _split_weights(w)
        if fmt != "auto":
            prepare(cfg, fmt, keep)
    set_threads(args.threads)
    base = load_model(args.model)
    models, kv_of = {}, {}
    for w in weights:
        fmt, keep = _split_weights(w)
        models[w] = base if fmt == "auto" else convert_weights(base, fmt, keep)
    for k in kvs:
        label = f"float32 / KV {k}"
        models[label] = models.get("float32") or convert_weights(base, "float32")
        kv_of[label] = k
    ids = base.tokenizer.encode(read_corpus())
    log = None if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    res = interleaved_speed(models, kv_of, ids, args.prompt_tokens, args.gen_tokens, args.rounds, log)
    ref = res.get("float32")
    if args.json:
        print(json.dumps({"settings": {"prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
                                       "rounds": args.rounds, "threads": args.threads}, "results": res}))
        return 0
    print("| weights | weights MB | prefill tok/s | decode tok/s | decode vs float32 |\n|---|---:|---:|---:|---:|")
    for label, r in res.items():
        ratio = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "-"
        print(f"| {label} | {models[label].weight_bytes / 1e6:.1f} | {r['prefill_tok_s']:.0f} | "
              f"{r['decode_tok_s']:.1f} | {ratio} |")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.eval_command == "speed":
        return _run_speed(args)
    if args.eval_command == "perplexity":
        return _run_perplexity(args)
    if args.eval_command == "agreement":
        return _run_agreement(args)
    return _run_report(args)


if __name__ == "__main__":   # one configuration of `edgellm eval report`, in its own process (_run_job)
    _worker()
