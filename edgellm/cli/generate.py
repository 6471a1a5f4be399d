"""`edgellm generate`: one prompt in, streamed text out, with speed figures."""

from __future__ import annotations

import argparse
import json
import sys

from edgellm.cli.common import (
    add_model_arguments,
    add_parallel_arguments,
    add_precision_arguments,
    add_sampling_arguments,
    add_speculative_arguments,
    check_precision,
    sampling_params,
    speculative_config,
    start_split,
)
from edgellm.util import pause_gc_for_startup, resume_gc_after_startup, startup_mark

HELP = "generate a completion for one prompt, streamed as it is produced"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_precision_arguments(p)
    p.add_argument("--prompt", help="the prompt text ('-' reads standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
    p.add_argument("--system", default=None, help="system message for --chat")
    add_sampling_arguments(p)
    add_speculative_arguments(p)
    add_parallel_arguments(p)
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="with --json: log-probability of each chosen token and the top N alternatives")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="constrain the output to JSON valid against the JSON schema in FILE ('-': standard input)")
    p.add_argument("--regex", default=None, metavar="PATTERN", help="constrain the output to match the regex")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--stats", action="store_true", help="after the text, print speed figures to stderr")
    p.add_argument("--list-models", action="store_true", help="list the registry's model names and exit")
    p.set_defaults(exit_when_done=True)   # no interpreter teardown after the text (edgellm.util.exit_now)


def run(args: argparse.Namespace) -> int:
    from edgellm.errors import InvalidParameterError

    startup_mark("python and command line")
    if args.list_models:
        from edgellm.loading.resolve import list_models

        for name, description, install, installed in list_models():
            print(f"{name:22s} {'installed' if installed else 'not installed':14s} {description}\n"
                  f"{'':22s} install: {install}")
        return 0
    if args.prompt is None:
        raise InvalidParameterError("no prompt given", "pass --prompt TEXT (or --prompt - to read standard input)")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    extra = {}
    if args.logprobs is not None:
        extra = {"logprobs": True, "top_logprobs": args.logprobs}
    if args.json_schema is not None and args.regex is not None:
        raise InvalidParameterError("--json-schema and --regex both given", "constrain the output with one of them")
    if args.json_schema is not None or args.regex is not None:
        from edgellm.grammar import Grammar

        extra["grammar"] = read_schema(args.json_schema) if args.json_schema is not None else Grammar.regex(args.regex)
    params = sampling_params(args, **extra)
    check_precision(args)
    speculative = speculative_config(args)

    split = start_split(args)       # None in one process
    try:
        return _generate(args, prompt, params, speculative, split)
    finally:
        if split is not None:
            split.close()


def _generate(args: argparse.Namespace, prompt: str, params, speculative, split) -> int:
    pause_gc_for_startup()   # until the model is loaded (edgellm.util says why)
    from edgellm.llm import LLM

    startup_mark("imports (torch)")
    llm = LLM(args.model, dtype=args.dtype, threads=args.threads, weights=args.weights, keep=args.keep,
              kv_dtype=args.kv_dtype, speculative=speculative, parallel=split, activations=args.activations)
    resume_gc_after_startup()   # a split model is not loaded by load_model
    ids = llm.encode_prompt(prompt, chat=args.chat, system=args.system)
    if args.json:
        c = llm.generate(ids, params)
        out = c.to_dict()
        out["model"] = llm.loaded.source.name
        out.update(weights=llm.loaded.dtype, kv_dtype=llm.kv_dtype, weight_bytes=llm.loaded.weight_bytes)
        if params.logprobs:
            out["logprobs"] = [{"token_id": t, "logprob": lp, "top": [[i, v] for i, v in top]}
                               for t, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs)]
        print(json.dumps(out, ensure_ascii=False))
        return 0
    startup_mark("engine and prompt")
    c = llm.generate(ids, params, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    print()
    startup_mark("generate")
    if args.stats:
        print(f"[{llm.loaded.source.name}, {llm.loaded.dtype}, KV {llm.kv_dtype}] prompt {c.prompt_tokens} tokens, "
              f"completion {c.completion_tokens} tokens ({c.finish_reason}); "
              f"time to first token {c.ttft_s * 1000:.0f} ms, prefill {c.prefill_tok_s:.1f} tok/s, "
              f"decode {c.decode_tok_s:.1f} tok/s", file=sys.stderr)
        if c.speculative is not None:
            sp = c.speculative
            rate = sp["accepted"] / sp["proposed"] if sp["proposed"] else 0.0
            print(f"[speculative {sp['method']}: {sp['accepted']} of {sp['proposed']} proposed tokens accepted "
                  f"({rate:.0%}) over {sp['steps']} verify steps]", file=sys.stderr)
    return 0


def read_schema(path: str):
    """The JSON schema in the file ``path`` (``-``: standard input) as a grammar."""
    from pathlib import Path

    from edgellm.errors import InvalidParameterError
    from edgellm.grammar import Grammar

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise InvalidParameterError(f"cannot read the JSON schema file {path!r}: {err.strerror}",
                                    "pass the path of a file holding a JSON schema") from None
    try:
        schema = json.loads(text)
    except ValueError as err:
        raise InvalidParameterError(f"{path!r} is not JSON: {err}", "write the schema as a JSON object") from None
    return Grammar.json_schema(schema)
