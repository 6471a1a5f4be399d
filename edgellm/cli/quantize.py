"""`edgellm quantize`: write a model's weights in another precision format.

    edgellm quantize --model M --format F [--keep LAYERS] --out FILE

``FILE.gguf`` for the formats GGUF knows (float32, float16, bfloat16, q8_0, q4_0, q4_1, q5_0,
q4_k, q6_k; the source must be a GGUF, whose metadata and tokenizer are copied), or
``FILE.safetensors`` (edgellm's own layout, any format; see
``edgellm.loading.edgellm_format``). Either loads back with ``--model FILE``. Everything is
checked before any tensor is touched, and the output appears atomically.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "convert a model's weights to another precision format and write them to a file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="the source: a .gguf file, an HF folder, an edgellm .safetensors "
                                                 "file or a registry name (default: smollm2-135m)")
    p.add_argument("--format", required=True,
                   help="float32, bfloat16, float16, int8, int4 (group 32; int4-g64, int4-g128, int4-sym, ...), "
                        "q8_0, q4_0, q4_1, q5_0, q4_k, q6_k, fp8 (E4M3; fp8-e5m2), ternary (ternary-channel)")
    p.add_argument("--keep", action="append", default=[], metavar="LAYERS",
                   help="matrices left at 16 bits: token_embd, lm_head, blk.N (a whole block; blk.-1 is the "
                        "last), blk.N.ffn_down, globs like 'blk.*.attn_qkv'; comma-separated, repeatable")
    p.add_argument("--out", required=True, help="output file: .gguf (GGUF formats) or .safetensors (any format)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args: argparse.Namespace) -> int:
    from edgellm.loading.convert import quantize_model

    summary = quantize_model(args.model, args.format, args.out, args.keep, progress=not args.json)
    if args.json:
        print(json.dumps(summary))
        return 0
    kinds = summary.get("tensor_types") or summary.get("matrix_formats") or {}
    kept = f", {len(summary['kept'])} matrices kept at 16 bits" if summary["kept"] else ""
    print(f"wrote {summary['out']}: {summary['bytes'] / 1e6:.1f} MB, {summary['format']}{kept} "
          f"({', '.join(f'{k} x{v}' for k, v in sorted(kinds.items()))}) in {summary['seconds']:.1f} s",
          file=sys.stderr)
    return 0
