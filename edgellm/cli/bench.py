"""`edgellm bench`: prefill/decode speed, time to first token, peak memory, the decode ceiling of
this machine, and (``--peers``) the same measurements of HF transformers and llama.cpp.

``--scenario sessions`` measures the multi-session runtime instead
(:mod:`edgellm.bench.sessions`): aggregate decode throughput at several concurrencies,
follow-up time to first token against history length, KV memory per session, and N users with
think time between turns, broken down by phase.

See :mod:`edgellm.bench.harness` for how the runs are organised and :mod:`edgellm.bench.worker`
for how each engine is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

HELP = "benchmark prefill/decode speed and memory against this machine's ceiling and peer engines"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", default="single", choices=("single", "sessions"),
                   help="single: one sequence against peers (default); sessions: the multi-session runtime")
    p.add_argument("--model", default=None,
                   help="a .gguf file, a Hugging Face model folder or a built-in name (default: smollm2-135m)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length in tokens (default 512)")
    p.add_argument("--gen-tokens", type=int, default=None,
                   help="tokens to generate, EOS ignored (default 128); with --speculative: the most tokens of "
                        "the greedy reply, EOS respected (default 256)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    p.add_argument("--repeat", type=int, default=5, help="timed repeats per engine; medians are reported (default 5)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="our engine's compute dtype (default auto)")
    from edgellm.cli.common import add_precision_arguments
    add_precision_arguments(p)   # --weights, --keep, --kv-dtype: our engine only
    from edgellm.cli.common import add_activations_argument
    add_activations_argument(p)
    p.add_argument("--peers", default="",
                   help="comma-separated peer engines measured in the same run: transformers, llama.cpp, "
                        "ours-int8 (ours with --activations int8), ours-bf16 (ours with --dtype bfloat16)")
    p.add_argument("--profile-decode", nargs="?", type=int, const=-1, default=None, metavar="STEPS",
                   help="also time STEPS decode steps of our engine (default: --gen-tokens) and report the share "
                        "of matrix-multiply kernels, attention and the rest")
    p.add_argument("--users", type=int, default=8, help="sessions scenario: simulated users (default 8)")
    p.add_argument("--think-time", type=float, default=3.0,
                   help="sessions scenario: mean seconds a user thinks between turns (default 3)")
    p.add_argument("--duration", type=float, default=60.0,
                   help="sessions scenario: seconds the multi-user run lasts (default 60)")
    p.add_argument("--speculative", default=None, metavar="METHOD",
                   help="measure speculative decoding (ngram, early-exit:L or draft:MODEL) against the same engine "
                        "without it on a shipped --workload; --peers llama.cpp adds its plain decoding and its "
                        "prompt lookup")
    p.add_argument("--workload", default=None, metavar="NAME",
                   help="with --speculative: code-edit (default), summarize or chat")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="with --speculative: the most tokens proposed per step (default 7; llama.cpp's prompt "
                        "lookup proposes K)")
    p.add_argument("--pipeline-parallel", type=int, default=1, metavar="N",
                   help="single scenario: ours split into N pipeline stages on local ranks, --threads shared "
                        "out among them (default 1)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="single scenario: ours split over N tensor-parallel local ranks (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _clean(obj):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def run(args: argparse.Namespace) -> int:
    from edgellm.errors import InvalidParameterError

    split = args.pipeline_parallel * args.tensor_parallel > 1
    if split and (args.speculative is not None or args.scenario != "single"):
        raise InvalidParameterError("--pipeline-parallel/--tensor-parallel go with the single scenario only",
                                    "drop --speculative and --scenario sessions")
    if args.speculative is not None:
        if args.scenario != "single":
            raise InvalidParameterError("--speculative measures one sequence; it does not go with --scenario sessions",
                                        "drop --scenario sessions")
        return _run_speculative(args)
    if args.workload is not None or args.draft_tokens is not None:
        raise InvalidParameterError("--workload and --draft-tokens go with --speculative",
                                    "e.g. edgellm bench --speculative ngram --workload code-edit")
    if args.gen_tokens is None:
        args.gen_tokens = 128
    if args.scenario == "sessions":
        return _run_sessions(args)
    from edgellm.bench.harness import BenchOptions, format_report, parse_peers, run_bench
    from edgellm.cli.common import check_precision

    check_precision(args)
    steps = args.profile_decode
    if steps == -1:
        steps = args.gen_tokens
    opts = BenchOptions(model=args.model, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                        threads=args.threads, repeat=args.repeat, dtype=args.dtype,
                        peers=parse_peers(args.peers), profile_steps=steps, weights=args.weights,
                        keep=",".join(args.keep), kv_dtype=args.kv_dtype, pipeline=args.pipeline_parallel,
                        tensor=args.tensor_parallel, activations=args.activations)

    def log(line: str) -> None:
        if not args.quiet:
            print(f"bench: {line}", file=sys.stderr, flush=True)

    summary = run_bench(opts, log)
    if args.json:
        print(json.dumps(_clean(summary), indent=2))
    else:
        format_report(summary, sys.stdout)
    return 0


def _run_sessions(args: argparse.Namespace) -> int:
    from edgellm.bench.sessions import format_report, run_sessions_bench
    from edgellm.errors import InvalidParameterError

    for name, value, low in (("--repeat", args.repeat, 1), ("--users", args.users, 0), ("--threads", args.threads, 1)):
        if value < low:
            raise InvalidParameterError(f"{name} must be at least {low}, got {value}", f"pass {name} {max(low, 1)}")
    if args.think_time < 0 or args.duration < 0:
        raise InvalidParameterError("--think-time and --duration must not be negative",
                                    "pass a number of seconds, e.g. --think-time 3 --duration 60")
    res = run_sessions_bench(model=args.model, users=args.users, duration_s=args.duration, think_s=args.think_time,
                             threads=args.threads, repeat=args.repeat, dtype=args.dtype, activations=args.activations,
                             log=None if args.quiet else lambda line: print(f"bench: {line}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(_clean(res), indent=2, default=str))
    else:
        format_report(res, sys.stdout)
    return 0


def _run_speculative(args: argparse.Namespace) -> int:
    from edgellm.bench.harness import parse_peers
    from edgellm.bench.speculative import DEFAULT_GEN_TOKENS, SpecBenchOptions, format_report, run_spec_bench
    from edgellm.cli.common import check_precision

    check_precision(args)
    opts = SpecBenchOptions(speculative=args.speculative, workload=args.workload or "code-edit",
                            draft_tokens=args.draft_tokens, model=args.model,
                            gen_tokens=DEFAULT_GEN_TOKENS if args.gen_tokens is None else args.gen_tokens,
                            threads=args.threads, repeat=args.repeat, dtype=args.dtype, peers=parse_peers(args.peers),
                            weights=args.weights, keep=",".join(args.keep), kv_dtype=args.kv_dtype)
    summary = run_spec_bench(opts, None if args.quiet else lambda line: print(f"bench: {line}", file=sys.stderr,
                                                                              flush=True))
    if args.json:
        print(json.dumps(_clean(summary), indent=2))
    else:
        format_report(summary, sys.stdout)
    if not summary["identical_tokens"]:
        print("bench: ERROR: speculative decoding changed the greedy output (see 'mismatches'): this is a bug",
              file=sys.stderr, flush=True)
        return 1
    return 0
