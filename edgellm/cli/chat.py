"""`edgellm chat`: an interactive multi-turn chat in the terminal.

The conversation is a runtime session (``edgellm.runtime``): its KV cache stays in the pool
between turns, so each new turn computes only its own tokens, not the whole history again.
"""

from __future__ import annotations

import argparse
import sys

from edgellm.cli.common import (
    add_model_arguments,
    add_sampling_arguments,
    add_speculative_arguments,
    sampling_params,
    speculative_config,
)
from edgellm.util import pause_gc_for_startup, resume_gc_after_startup

HELP = "chat with a model in the terminal (history kept; /exit to leave, /reset to start over)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system message (default: the model template's own)")
    add_sampling_arguments(p, max_tokens=512)
    add_speculative_arguments(p)
    p.add_argument("--kv-memory", default="256MB",
                   help="size of the KV cache pool, e.g. 256MB or 1GB (default 256MB)")
    p.add_argument("--stats", action="store_true", help="print speed figures after each reply")


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)   # validate before loading anything
    speculative = speculative_config(args)
    pause_gc_for_startup()   # until the model is loaded (edgellm.util says why)
    from edgellm.llm import LLM
    from edgellm.runtime.engine import Engine
    from edgellm.util import parse_size

    kv_memory = parse_size(args.kv_memory, "--kv-memory")
    llm = LLM(args.model, dtype=args.dtype, threads=args.threads, speculative=speculative, activations=args.activations)
    resume_gc_after_startup()   # a split model is not loaded by load_model
    engine = Engine(llm, kv_memory=kv_memory)
    interactive = sys.stdin.isatty()
    print(f"edgellm chat — {llm.loaded.source.name}. Type /exit to leave, /reset to clear the history.",
          file=sys.stderr)
    session = engine.session(system=args.system, sampling=params)
    try:
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                session.close()
                session = engine.session(system=args.system, sampling=params)
                print("(history cleared)", file=sys.stderr)
                continue
            if interactive:
                print("assistant> ", end="", flush=True)
            handle = session.send(text, params)
            for piece in handle:
                sys.stdout.write(piece)
                sys.stdout.flush()
            print(flush=True)
            c = handle.result()
            if args.stats:
                print(f"[{c.prompt_tokens} prompt tokens ({c.cached_tokens} reused, {c.computed_prompt_tokens} "
                      f"computed) + {c.completion_tokens} reply tokens; first token {c.ttft_s * 1000:.0f} ms; "
                      f"decode {c.decode_tok_s:.1f} tok/s]", file=sys.stderr)
    finally:
        engine.close()
    return 0
