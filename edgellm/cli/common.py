"""Arguments shared by the commands that load a model and sample from it."""

from __future__ import annotations

import argparse


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a .gguf file, a Hugging Face model folder, or a registry name "
                        "(default: smollm2-135m; see `edgellm generate --list-models`)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute precision: auto keeps GGUF Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K weights quantised and computes "
                        "in float32 (exact); bfloat16 (opt-in, approximate) multiplies prefill in bf16 and decode with "
                        "bf16 dot products where the CPU has AVX512_BF16 (else exact), and holds other matrices "
                        "(HF folders) as bf16; fast only "
                        "where the CPU has AVX512_BF16 or AMX, elsewhere emulated at float32 speed (README, "
                        "'Fast modes') (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    add_activations_argument(p)


def add_activations_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--activations", default="fp32", choices=["fp32", "int8"],
                   help="fp32: exact (default); int8: activations rounded to int8 blocks of 32 and integer dot "
                        "products against GGUF block weights (approximate; its speed and quality cost: README, "
                        "'Fast modes')")


def add_sampling_arguments(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate at most (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def sampling_params(args: argparse.Namespace, **extra):
    from edgellm.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=list(args.stop), **extra)


def add_precision_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, metavar="FORMAT",
                   help="convert the weights at load time: float32, bfloat16, float16, int8, int4[-gN][-sym], "
                        "q8_0, q4_0, q4_1, q4_k, q6_k, fp8[-e5m2], ternary (default: as stored)")
    p.add_argument("--keep", action="append", default=[], metavar="LAYERS",
                   help="with --weights: matrices left at 16 bits (token_embd, lm_head, blk.0, blk.-1, "
                        "'blk.*.ffn_down'; comma-separated, repeatable)")
    p.add_argument("--kv-dtype", default="fp32", metavar="DTYPE",
                   help="KV cache precision: fp32, fp16, bf16, fp8, int8 (default fp32)")


def check_precision(args: argparse.Namespace):
    """Refuse a bad --weights/--keep/--kv-dtype before the model is loaded (reads only headers).
    Returns the model's config when it had to read it (with --weights), else None."""
    from edgellm.dtypes import kv_dtype_name, kv_storage_dtype
    from edgellm.errors import InvalidParameterError

    kv_storage_dtype(kv_dtype_name(args.kv_dtype))   # unknown name, or fp8 on a torch without float8
    check_fast_mode(args)
    if args.keep and not args.weights:
        raise InvalidParameterError("--keep needs --weights", "add --weights FORMAT (e.g. --weights int4)")
    if args.weights:
        from edgellm.loading.convert import peek_config, prepare

        cfg = peek_config(args.model)[1]
        prepare(cfg, args.weights, args.keep)
        return cfg
    return None


def check_fast_mode(args: argparse.Namespace) -> None:
    """Refuse --dtype bfloat16 beside a setting that would decide the arithmetic instead (before loading)."""
    from edgellm.errors import InvalidParameterError

    if getattr(args, "dtype", "auto") != "bfloat16":
        return
    if getattr(args, "activations", "fp32") == "int8":
        from edgellm.quant.activations import fast_modes_conflict

        raise fast_modes_conflict()
    if getattr(args, "weights", None):
        raise InvalidParameterError(
            f"--dtype bfloat16 cannot be combined with --weights {args.weights}: --weights converts the matrices "
            "to a storage format, whose own kernels then decide the arithmetic",
            "for matrices stored as bf16 use --weights bfloat16 without --dtype; else drop one of the two")


def add_speculative_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", default=None, metavar="METHOD",
                   help="speculative decoding, same tokens faster: ngram (prompt lookup), early-exit:L (the first L "
                        "blocks draft), draft:MODEL (a smaller model with the same vocabulary) (default: off)")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="with --speculative: most tokens proposed per step; fewer are proposed while they are "
                        "rarely accepted (default 7)")


def speculative_config(args: argparse.Namespace):
    """The parsed --speculative/--draft-tokens (refused before anything is loaded), or None."""
    from edgellm.errors import InvalidParameterError
    from edgellm.runtime.speculative import parse_speculative

    if args.draft_tokens is not None and not args.speculative:
        raise InvalidParameterError("--draft-tokens needs --speculative", "add e.g. --speculative ngram")
    return parse_speculative(args.speculative, args.draft_tokens)


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline-parallel", type=int, default=1, metavar="N",
                   help="split the blocks into N contiguous stages, one per rank (local processes on loopback, "
                        "or the processes of torchrun; see README, 'Across ranks') (default 1)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split every block's heads and MLP columns over N ranks (default 1)")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="with a split model: a rank that does not answer within this long stops them all "
                        "(default 20)")


def start_split(args: argparse.Namespace):
    """The model split across ranks that --pipeline-parallel/--tensor-parallel ask for (a
    ``SplitModel``, rank 0's handle), or None. A computing rank started by torchrun (RANK > 0)
    does not return: it serves its rank and exits."""
    if args.pipeline_parallel == 1 and args.tensor_parallel == 1:
        if args.dist_timeout is not None:
            from edgellm.errors import InvalidParameterError

            raise InvalidParameterError("--dist-timeout needs --pipeline-parallel or --tensor-parallel",
                                        "add e.g. --pipeline-parallel 2")
        return None
    from edgellm.runtime.distributed import DEFAULT_TIMEOUT_S, ParallelConfig, launched_by_torchrun, torchrun_rank

    config = ParallelConfig(args.pipeline_parallel, args.tensor_parallel,
                            DEFAULT_TIMEOUT_S if args.dist_timeout is None else args.dist_timeout, args.threads)
    if launched_by_torchrun() and torchrun_rank() != 0:
        import sys

        from edgellm.runtime.parallel_runner import serve_rank

        sys.exit(serve_rank(config.timeout_s))
    from edgellm.runtime.parallel_runner import SplitModel

    return SplitModel(config, args.model, args.dtype)
