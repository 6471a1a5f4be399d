"""The `edgellm` command: one subcommand per job, each in its own module of :mod:`edgellm.cli`.

Each command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Only the module of the command being run is imported, and modules keep heavy imports (torch)
inside ``run``, so ``edgellm --help`` answers at once.
User errors (``EdgeLLMError``) print as one message with the fix and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from edgellm.errors import EdgeLLMError

# command name -> (module that implements it, one-line summary for `edgellm --help`)
COMMANDS = {
    "generate": ("edgellm.cli.generate", "generate a completion for one prompt, streamed"),
    "chat": ("edgellm.cli.chat", "chat with a model in the terminal"),
    "bench": ("edgellm.cli.bench", "measure prefill/decode speed and memory, against peers"),
    "analyze": ("edgellm.cli.analyze", "roofline analysis: per-layer compute vs memory bounds"),
    "quantize": ("edgellm.cli.quantize", "convert a model's weights to another precision format"),
    "eval": ("edgellm.cli.eval", "measure a model's quality (perplexity, greedy agreement)"),
    "serve": ("edgellm.cli.serve", "OpenAI-compatible HTTP server: chat, completions, structured output, tools, "
                                     "embeddings, sessions, metrics"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgellm",
        description="Run Llama-family models fast on the CPU you have, and explain their performance.")
    from edgellm import __version__

    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, summary) in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=summary, add_help=False)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=summary, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    whole_process = argv is None   # the `edgellm` command itself, not a caller inside Python
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        code = int(args._run(args) or 0)
        if whole_process and getattr(args, "exit_when_done", False):   # a one-shot command (generate)
            from edgellm.util import exit_now

            exit_now(code)
        return code
    except EdgeLLMError as err:
        print(f"edgellm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
