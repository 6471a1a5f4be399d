"""`edgellm chat`: an interactive multi-turn chat in the terminal."""

from __future__ import annotations

import argparse
import sys

from edgellm.commands.common import add_model_arguments, add_sampling_arguments, sampling_params

HELP = "chat with a model in the terminal (history kept; /exit to leave, /reset to start over)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system message (default: the model template's own)")
    add_sampling_arguments(p, max_tokens=512)
    p.add_argument("--stats", action="store_true", help="print speed figures after each reply")


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)   # validate before loading anything
    from edgellm.llm import LLM

    llm = LLM(args.model, dtype=args.dtype, threads=args.threads)
    interactive = sys.stdin.isatty()
    print(f"edgellm chat — {llm.loaded.source.name}. Type /exit to leave, /reset to clear the history.",
          file=sys.stderr)
    messages = [{"role": "system", "content": args.system}] if args.system else []
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
            messages = messages[:1] if args.system else []
            print("(history cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        ids = llm.tokenizer.encode_chat(messages, add_generation_prompt=True)
        if interactive:
            print("assistant> ", end="", flush=True)
        c = llm.generate(ids, params, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        print(flush=True)
        messages.append({"role": "assistant", "content": c.text})
        if args.stats:
            print(f"[{c.prompt_tokens} prompt + {c.completion_tokens} reply tokens; first token "
                  f"{c.ttft_s * 1000:.0f} ms; decode {c.decode_tok_s:.1f} tok/s]", file=sys.stderr)
    return 0
