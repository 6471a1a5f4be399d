"""The `edgellm` command: one subcommand per job, each in the module that owns the concept.

Each command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules keep heavy imports (torch) inside ``run`` so that ``edgellm --help`` answers at once.
User errors (``EdgeLLMError``) print as one message with the fix and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from edgellm.errors import EdgeLLMError

# command name -> module that implements it
COMMANDS = {
    "generate": "edgellm.commands.generate",
    "chat": "edgellm.commands.chat",
    "bench": "edgellm.bench.cli",
    "analyze": "edgellm.roofline.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgellm",
        description="Run Llama-family models fast on the CPU you have, and explain their performance.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except EdgeLLMError as err:
        print(f"edgellm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
