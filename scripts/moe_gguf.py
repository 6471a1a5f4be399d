"""Write a random mixture-of-experts GGUF (Qwen3-MoE layout, as llama.cpp's converter writes it) for
benchmarks: every matrix quantised, SmolLM2's tokenizer (installed with `make setup`).

    python scripts/moe_gguf.py /tmp/moe.gguf --experts 16 --used 2 --type Q4_0
    edgellm bench --model /tmp/moe.gguf --peers llama.cpp

The weights are random (no hub can be reached here), so the text is noise; the shapes, the routing
work and the bytes read per step are those of a real model of this size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

from edgellm.loading.gguf import read_gguf
from edgellm.loading.resolve import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--used", type=int, default=2)
    ap.add_argument("--expert-ffn", type=int, default=512)
    ap.add_argument("--type", default="Q4_0", help="GGUF type of every matrix (Q4_0, Q8_0, F16, ...)")
    args = ap.parse_args()

    meta = read_gguf(resolve_model("smollm2-135m").path).metadata   # its tokenizer
    vocab = len(meta["tokenizer.ggml.tokens"])
    h, d = args.hidden, args.hidden // args.heads
    qtype = gguf.GGMLQuantizationType[args.type]
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(args.out), "qwen3moe")
    w.add_block_count(args.layers)
    w.add_context_length(4096)
    w.add_embedding_length(h)
    w.add_feed_forward_length(2 * args.expert_ffn)
    w.add_head_count(args.heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_key_length(d)
    w.add_value_length(d)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(args.experts)
    w.add_expert_used_count(args.used)
    w.add_expert_feed_forward_length(args.expert_ffn)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])

    def matrix(name: str, *shape: int, scale: float = 0.05) -> None:
        data = quantize((rng.standard_normal(shape) * scale).astype(np.float32), qtype)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    def vector(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, np.float32))

    matrix("token_embd.weight", vocab, h)
    vector("output_norm.weight", h)
    matrix("output.weight", vocab, h)
    E, F = args.experts, args.expert_ffn
    for i in range(args.layers):
        p = f"blk.{i}."
        matrix(p + "attn_q.weight", args.heads * d, h)
        matrix(p + "attn_k.weight", args.kv_heads * d, h)
        matrix(p + "attn_v.weight", args.kv_heads * d, h)
        matrix(p + "attn_output.weight", h, args.heads * d)
        for name, n in (("attn_norm", h), ("ffn_norm", h), ("attn_q_norm", d), ("attn_k_norm", d)):
            vector(p + name + ".weight", n)
        w.add_tensor(p + "ffn_gate_inp.weight", rng.standard_normal((E, h)).astype(np.float32))  # F32, as llama.cpp keeps it
        matrix(p + "ffn_gate_exps.weight", E, F, h)
        matrix(p + "ffn_up_exps.weight", E, F, h)
        matrix(p + "ffn_down_exps.weight", E, h, F)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
