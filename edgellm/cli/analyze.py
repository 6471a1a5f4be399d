"""`edgellm analyze`: the roofline of a model on a chip, layer by layer; memory plan; crossover; plots."""

from __future__ import annotations

import argparse
import sys

HELP = "Predict, layer by layer, whether a model is compute- or memory-bound on a chip (roofline analysis)."

EPILOG = """examples:
  edgellm analyze --model Llama-2-7B --hardware A6000 --phase prefill --seq-len 1024
  edgellm analyze --model Llama-2-7B --hardware local --phase decode --seq-len 1024 --weight-bits 4
  edgellm analyze --model path/to/model.gguf --hardware RTX-4090 --plan
  edgellm analyze --model Llama-3-8B --hardware H100-SXM --crossover
  edgellm analyze --model Mistral-7B --hardware my_chip.yaml --plot roofline.png --plot-layers layers.png
  edgellm analyze --measure --model smollm2-135m --seq-len 256      # time the real engine here, op by op
  edgellm analyze --model Llama-2-7B --hardware Jetson-AGX-Orin --plan --chips 1,2,4,8 --prompt-tokens 512 \
      --seq-len 1024                                                # split across chips, joules per token
  edgellm analyze --model Llama-2-7B --hardware Jetson-AGX-Orin --disaggregate --prefill-on RTX-4090 \
      --decode-on Jetson-AGX-Orin [--trace sessions.json]            # prefill and decode on different chips
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", metavar="MODEL",
                        help="a zoo name (e.g. Llama-2-7B, SmolLM2-135M), a config.json (or its folder), or a .gguf")
    parser.add_argument("--hardware", metavar="HW",
                        help="a table name (e.g. A6000, H100-SXM, RK3588), a YAML/JSON hardware file, or 'local' "
                             "(this machine, measured once and cached)")
    parser.add_argument("--phase", choices=("prefill", "decode"), default=None,
                        help="prefill (the prompt; its time is the time to first token) or decode (one new token "
                             "per sequence); default decode (with --measure: both)")
    parser.add_argument("--batch", type=int, default=1, help="sequences processed together (default 1)")
    parser.add_argument("--seq-len", type=int, default=512,
                        help="prefill: prompt tokens; decode: tokens already in the KV cache (default 512)")
    parser.add_argument("--weight-bits", type=float, default=None,
                        help="bits per weight: 1.58, 2, 3, 4, 4.5, 5, 6, 8, 8.5, 16, 32 (default 16)")
    parser.add_argument("--act-bits", type=float, default=None, help="bits per activation: 4, 8, 16, 32 (default 16)")
    parser.add_argument("--kv-bits", type=float, default=None,
                        help="bits per KV-cache element: 2, 4, 8, 16, 32 (default: the activation bits)")
    parser.add_argument("--attention", choices=("unfused", "fused"), default=None,
                        help="unfused: the score matrix goes through memory (default); fused: FlashAttention "
                             "(the default with --measure: the engine's attention is fused)")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format")
    parser.add_argument("--per-block", action="store_true",
                        help="table: show one block's figures instead of the whole model's")
    parser.add_argument("--plan", action="store_true",
                        help="memory planner: weights and KV bytes per token by precision, the batch x context "
                             "that fits the hardware's memory")
    plan = parser.add_argument_group("planner: splits across chips, energy, disaggregated serving "
                                     "(docs/planner.md)")
    plan.add_argument("--chips", metavar="N[,N...]",
                      help="with --plan: split the model across N chips of --hardware (e.g. 1,2,4,8): memory per "
                           "chip, time per phase, pipeline bubble, bytes per link, joules per token")
    plan.add_argument("--parallel", metavar="KIND[,KIND]", default=None,
                      help="with --chips: pipeline, tensor and/or hybrid (pipeline x tensor, the best per N); "
                           "default pipeline,tensor")
    plan.add_argument("--balance", choices=("time", "memory"), default=None,
                      help="with --chips: balance pipeline stages by decode time (default) or by memory")
    plan.add_argument("--micro-batches", type=int, default=None,
                      help="with --chips: pipeline micro-batches (prefill: token chunks; decode: groups of "
                           "sequences in flight); default the number of stages")
    plan.add_argument("--prompt-tokens", type=int, default=None,
                      help="with --chips: prompt length of the prefill (default --seq-len, which is then the "
                           "context each sequence holds in the KV cache)")
    plan.add_argument("--link-gbps", type=float, default=None,
                      help="chip-to-chip link, gigaBITS per second each way (10GbE = 10), instead of the "
                           "hardware entry's")
    plan.add_argument("--link-latency-us", type=float, default=None,
                      help="chip-to-chip link latency per hop in microseconds, instead of the entry's")
    plan.add_argument("--disaggregate", action="store_true",
                      help="what-if: --hardware doing prefill and decode, against prefill on --prefill-on and "
                           "decode on --decode-on with the KV cache moved between them, over a session trace")
    plan.add_argument("--prefill-on", metavar="HW", help="with --disaggregate: the (compute-rich) prefill chip")
    plan.add_argument("--decode-on", metavar="HW", help="with --disaggregate: the (bandwidth-rich) decode chip")
    plan.add_argument("--trace", metavar="FILE",
                      help="with --disaggregate: sessions as JSON or CSV (session,prompt_tokens,reply_tokens,"
                           "think_s); default a built-in mix of chat, summarising and coding")
    parser.add_argument("--json", action="store_true", help="same as --format json")
    parser.add_argument("--crossover", action="store_true",
                        help="the context length at which attention costs as much as the linear layers")
    parser.add_argument("--against", metavar="MODEL",
                        help="with --crossover and a recurrent --model (Mamba, RWKV): the attention model to compare "
                             "with -- the context at which its step costs as much as the recurrent model's")
    parser.add_argument("--plot", metavar="FILE",
                        help="write a log-log roofline of the hardware with every layer of prefill and decode "
                             "(with --measure: each engine op where the roofline puts it and where it ran)")
    parser.add_argument("--plot-layers", metavar="FILE",
                        help="write parameters and operations per layer across the model's depth")
    parser.add_argument("--remeasure", action="store_true",
                        help="with --hardware local: measure this machine again instead of using the cache")
    parser.add_argument("--measure", action="store_true",
                        help="run the real engine on this machine (--model: a .gguf, a model folder or a registry "
                             "name; default smollm2-135m), time each op type in prefill and decode, and print "
                             "measured time, achieved bytes/s and ops/s and the fraction of the roofline reached "
                             "next to the prediction for --hardware local")
    parser.add_argument("--threads", type=int, default=None,
                        help="with --hardware local or --measure: torch/OpenMP threads to measure with "
                             "(default: torch's current count)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="with --measure: forward passes timed per phase, medians reported (default 5)")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _int_bits(value: float | None) -> float | None:
    if value is None:
        return None
    return int(value) if float(value).is_integer() else value


def run(args: argparse.Namespace) -> int:
    from edgellm.errors import InvalidParameterError
    from edgellm.roofline import analyze as an
    from edgellm.roofline.hardware import resolve_hardware
    from edgellm.roofline.layers import validate_bits, validate_shape
    from edgellm.roofline.zoo import resolve_model

    if args.threads is not None:
        from edgellm.util import set_threads

        set_threads(args.threads)
    if args.json:
        if args.format not in ("table", "json"):
            raise InvalidParameterError(f"--json and --format {args.format} ask for two formats", "keep one")
        args.format = "json"
    _check_planner_flags(args)
    if args.against and not args.crossover:
        raise InvalidParameterError("--against only applies to --crossover", "add --crossover, or leave --against out")
    if args.measure:
        return _run_measure(args)
    if args.repeat is not None:
        raise InvalidParameterError("--repeat only applies to --measure", "add --measure, or leave --repeat out")
    phase = args.phase or "decode"
    attention = args.attention or "unfused"
    weight_bits = _int_bits(16 if args.weight_bits is None else args.weight_bits)
    act_bits = _int_bits(16 if args.act_bits is None else args.act_bits)
    kv_bits = _int_bits(args.kv_bits) if args.kv_bits is not None else act_bits
    validate_bits(weight_bits, act_bits, kv_bits)
    validate_shape(phase, args.batch, args.seq_len)
    cfg = resolve_model(args.model)
    hw = resolve_hardware(args.hardware, remeasure=args.remeasure, log=_log)

    if args.disaggregate:
        return _run_disaggregate(args, cfg, hw, weight_bits, act_bits, kv_bits, attention)
    if args.chips:
        return _run_splits(args, cfg, hw, weight_bits, act_bits, kv_bits, attention)
    if args.plan:
        plan = an.plan_memory(cfg, hw, weight_bits, kv_bits, args.batch, args.seq_len or None)
        if args.format == "json":
            print(an.format_json(plan))
        elif args.format == "csv":
            print("weight_bits,kv_bits,weight_bytes,kv_bytes_per_token,max_kv_tokens,max_context_at_batch,"
                  "max_batch_at_full_context")
            for g in plan["grid"]:
                print(f"{g['weight_bits']:g},{g['kv_bits']:g},{g['weight_bytes']:.0f},{g['kv_bytes_per_token']:.0f},"
                      f"{g['max_kv_tokens']},{g['max_context_at_batch']},{g['max_batch_at_full_context']}")
        else:
            print(an.format_plan(plan))
    elif args.crossover and args.against:
        other = resolve_model(args.against)
        rows = an.crossover_versus_table(cfg, other, hw, args.batch, weight_bits, act_bits, kv_bits)
        if args.format == "json":
            print(an.format_json({"model": cfg.name, "against": other.name, "hardware": hw.name,
                                  "batch": args.batch, "crossover": rows}))
        else:
            print(an.format_crossover_versus(cfg, other, hw, rows, args.batch))
    elif args.crossover:
        rows = an.crossover_table(cfg, hw, args.batch, weight_bits, act_bits, kv_bits)
        if args.format == "json":
            print(an.format_json({"model": cfg.name, "hardware": hw.name, "batch": args.batch,
                                  "weight_bits": weight_bits, "act_bits": act_bits, "kv_bits": kv_bits,
                                  "crossover": rows,
                                  "definition": "smallest context (prefill: prompt length; decode: cached tokens) "
                                                "at which qk_matmul + softmax + sv_matmul (or fused_attention) "
                                                "cost at least as much as q/k/v/o/gate/up/down"}))
        elif args.format == "csv":
            print("phase,attention,by_time,by_ops")
            for r in rows:
                print(f"{r['phase']},{r['attention']},{r['by_time'] or ''},{r['by_ops'] or ''}")
        else:
            print(an.format_crossover(cfg, hw, rows, args.batch))
    else:
        analysis = an.analyze(cfg, hw, phase, args.batch, args.seq_len, weight_bits, act_bits, kv_bits,
                              attention)
        if args.format == "json":
            print(an.format_json(analysis.to_dict()))
        elif args.format == "csv":
            print(an.format_csv(analysis), end="")
        else:
            print(an.format_table(analysis, per_block=args.per_block))

    if args.plot or args.plot_layers:
        from edgellm.roofline import plot

        both = [an.analyze(cfg, hw, "prefill", args.batch, max(args.seq_len, 1), weight_bits, act_bits, kv_bits,
                           attention),
                an.analyze(cfg, hw, "decode", args.batch, args.seq_len, weight_bits, act_bits, kv_bits,
                           attention)]
        if args.plot:
            _log(f"wrote {plot.plot_roofline(both, args.plot)}")
        if args.plot_layers:
            _log(f"wrote {plot.plot_layers(both, args.plot_layers)}")
    return 0


_SPLIT_FLAGS = ("parallel", "balance", "micro_batches", "prompt_tokens")
_DISAGG_FLAGS = ("prefill_on", "decode_on", "trace")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_planner_flags(args: argparse.Namespace) -> None:
    """Planner flags only mean something in the mode they belong to: say which, instead of ignoring them."""
    from edgellm.errors import InvalidParameterError

    if args.chips and not args.plan:
        raise InvalidParameterError("--chips plans a split, which is part of --plan", "add --plan")
    if args.chips and args.disaggregate:
        raise InvalidParameterError("--chips and --disaggregate are two different plans", "run them separately")
    if args.disaggregate and args.plan:
        raise InvalidParameterError("--disaggregate is its own plan; --plan is the memory / split planner",
                                    "leave --plan out")
    if args.measure and (args.chips or args.disaggregate):
        raise InvalidParameterError("--measure times this machine; --chips / --disaggregate plan other hardware",
                                    "run them separately")
    given = [_flag(f) for f in _SPLIT_FLAGS if getattr(args, f) is not None]
    if given and not args.chips:
        fix = ("--disaggregate takes its prompt lengths from the trace (--trace)" if args.disaggregate
               else "add --plan --chips N")
        raise InvalidParameterError(f"{', '.join(given)} only apply to a split plan (--plan --chips)", fix)
    given = [_flag(f) for f in _DISAGG_FLAGS if getattr(args, f) is not None]
    if given and not args.disaggregate:
        raise InvalidParameterError(f"{', '.join(given)} only apply to --disaggregate", "add --disaggregate")
    if args.disaggregate:
        missing = [_flag(f) for f in ("prefill_on", "decode_on") if not getattr(args, f)]
        if missing:
            raise InvalidParameterError(f"--disaggregate needs {' and '.join(missing)}",
                                        "e.g. --prefill-on RTX-4090 --decode-on Jetson-AGX-Orin")
    if (args.link_gbps is not None or args.link_latency_us is not None) and not (args.chips or args.disaggregate):
        raise InvalidParameterError("--link-gbps / --link-latency-us only apply to --plan --chips or --disaggregate",
                                    "add one of them, or leave the link flags out")


def _parse_list(text: str, flag: str, kind=str) -> list:
    from edgellm.errors import InvalidParameterError

    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        values = [kind(x) for x in items]
    except ValueError:
        raise InvalidParameterError(f"{flag} takes a comma-separated list, got {text!r}",
                                    f"e.g. {flag} 1,2,4,8" if kind is int else f"e.g. {flag} pipeline,tensor") from None
    if not values:
        raise InvalidParameterError(f"{flag} is empty", f"e.g. {flag} 1,2,4,8")
    return values


def _run_splits(args, cfg, hw, weight_bits, act_bits, kv_bits, attention) -> int:
    from edgellm.roofline.analyze import format_json
    from edgellm.roofline.planner import format_splits, plan_splits, resolve_link, splits_to_dict

    chips = _parse_list(args.chips, "--chips", int)
    modes = _parse_list(args.parallel or "pipeline,tensor", "--parallel")
    link = resolve_link(hw, args.link_gbps, args.link_latency_us, needed=max(chips) > 1)
    prompt = args.prompt_tokens if args.prompt_tokens is not None else args.seq_len
    result = plan_splits(cfg, hw, chips, modes, link=link, prompt_tokens=prompt, context=args.seq_len,
                         batch=args.batch, micro_batches=args.micro_batches, weight_bits=weight_bits,
                         act_bits=act_bits, kv_bits=kv_bits, attention=attention, balance=args.balance or "time")
    if args.format == "json":
        print(format_json(splits_to_dict(result)))
    elif args.format == "csv":
        print("mode,chips,pipeline_stages,tensor_parallel,micro_batches,fits,max_memory_bytes_per_chip,prefill_s,"
              "prefill_bubble,decode_time_per_token_s,decode_tokens_per_s,decode_bubble,joules_per_token_prefill,"
              "joules_per_token_decode")
        for r in result["rows"]:
            f = r.figures
            cells = [r.mode, r.chips, r.pp, r.tp, r.micro_batches, r.fits,
                     "" if not r.stages else f"{r.max_memory_bytes:.0f}"]
            if r.fits:
                cells += [f["prefill"]["time_s"], f["prefill"]["bubble_fraction"], f["decode"]["time_per_token_s"],
                          f["decode"]["tokens_per_s"], f["decode"]["bubble_fraction"],
                          _blank(f["prefill"]["joules_per_token"]), _blank(f["decode"]["joules_per_token"])]
            else:
                cells += [""] * 7
            print(",".join(str(c) for c in cells))
    else:
        print(format_splits(result))
    return 0


def _blank(x) -> str:
    return "" if x is None else str(x)


def _run_disaggregate(args, cfg, hw, weight_bits, act_bits, kv_bits, attention) -> int:
    from edgellm.errors import InvalidParameterError
    from edgellm.roofline.analyze import format_json
    from edgellm.roofline.hardware import resolve_hardware
    from edgellm.roofline.planner import (
        DEFAULT_TRACE,
        disaggregate,
        format_disaggregation,
        load_trace,
        resolve_link,
        slower_link,
    )

    if args.format == "csv":
        raise InvalidParameterError("--disaggregate prints a table or JSON", "pass --format table or --json")
    pre = resolve_hardware(args.prefill_on, log=_log)
    dec = resolve_hardware(args.decode_on, log=_log)
    # The KV cache crosses both chips' links: the slower end sets the pace (flags override both).
    link = slower_link(resolve_link(pre, args.link_gbps, args.link_latency_us),
                       resolve_link(dec, args.link_gbps, args.link_latency_us))
    trace = load_trace(args.trace) if args.trace else DEFAULT_TRACE
    result = disaggregate(cfg, hw, pre, dec, trace, link=link, batch=args.batch, weight_bits=weight_bits,
                          act_bits=act_bits, kv_bits=kv_bits, attention=attention)
    if args.format == "json":
        print(format_json(result))
    else:
        print(format_disaggregation(result))
    return 0


def _run_measure(args: argparse.Namespace) -> int:
    """``--measure``: the engine on this machine, op by op, next to the roofline of ``--hardware local``."""
    from edgellm.errors import InvalidParameterError
    from edgellm.roofline import profile
    from edgellm.roofline.analyze import format_json
    from edgellm.roofline.hardware import lookup_builtin, resolve_hardware

    refused = [flag for flag, value in (("--plan", args.plan), ("--crossover", args.crossover),
                                        ("--per-block", args.per_block), ("--plot-layers", args.plot_layers),
                                        ("--weight-bits", args.weight_bits is not None),
                                        ("--act-bits", args.act_bits is not None),
                                        ("--kv-bits", args.kv_bits is not None)) if value]
    if refused:
        raise InvalidParameterError(f"--measure cannot be combined with {', '.join(refused)}",
                                    "--measure runs the model in its own formats (the bit widths come from its "
                                    "weights); run the predictive analysis separately for the rest")
    if args.batch != 1:
        raise InvalidParameterError(f"--measure times one sequence, got --batch {args.batch}", "leave --batch out")
    if args.hardware and lookup_builtin(args.hardware) is not None:
        raise InvalidParameterError(
            f"--measure times this machine, so its prediction cannot be for '{args.hardware}'",
            "leave --hardware out (or pass 'local'), or give a YAML/JSON file describing this machine")
    repeats = profile.DEFAULT_REPEATS if args.repeat is None else args.repeat
    if repeats < 1:
        raise InvalidParameterError(f"--repeat must be at least 1, got {repeats}", "pass --repeat 1 or more")
    if args.seq_len < 0:
        raise InvalidParameterError(f"sequence length must be a non-negative integer, got {args.seq_len}",
                                    "pass --seq-len 0 or more")
    if args.plot:
        from edgellm.roofline.plot import check_path

        check_path(args.plot)
    phases = (args.phase,) if args.phase else ("prefill", "decode")
    hw = resolve_hardware(args.hardware or "local", remeasure=args.remeasure, log=_log)

    from edgellm.loading.load import load_model

    loaded = load_model(args.model)
    report = profile.measure_model(loaded, hw, phases, args.seq_len, repeats, args.attention or "fused", log=_log)
    if args.format == "json":
        print(format_json(report))
    elif args.format == "csv":
        print(profile.format_csv(report), end="")
    else:
        print(profile.format_table(report))
    if args.plot:
        from edgellm.roofline import plot

        _log(f"wrote {plot.plot_measured(report, hw, args.plot)}")
    return 0
