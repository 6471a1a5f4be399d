"""Write a random Mamba GGUF (llama.cpp's "mamba" layout, as its converter writes it) for
benchmarks: Mamba-130M's shape by default, the projections and the embedding in a block format,
SmolLM2's tokenizer (installed with `make setup`).

    python scripts/mamba_gguf.py /tmp/mamba.gguf --type Q8_0
    edgellm bench --model /tmp/mamba.gguf --peers llama.cpp,transformers

The weights are random (no hub can be reached here), so the text is noise; the shapes, the scan
work and the bytes read per step are those of a real model of this size. The small tensors stay
F32 as llama.cpp's quantiser leaves them, and so does ``ssm_dt`` when dt_rank (hidden / 16) is no
multiple of the block size.
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
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--conv", type=int, default=4)
    ap.add_argument("--type", default="Q8_0", help="block type of the projections and the embedding (Q8_0, Q4_0, F32)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    H, N, K = args.hidden, args.state, args.conv
    Di, R = 2 * H, -(-H // 16)
    rng = np.random.default_rng(args.seed)
    qtype = gguf.GGMLQuantizationType[args.type.upper()]
    meta = read_gguf(resolve_model("smollm2-135m").path).metadata   # its tokenizer
    vocab = len(meta["tokenizer.ggml.tokens"])

    w = gguf.GGUFWriter(str(args.out), "mamba")
    w.add_name(f"random-mamba-{H}x{args.layers}")
    w.add_block_count(args.layers)
    w.add_context_length(1 << 20)
    w.add_embedding_length(H)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_ssm_conv_kernel(K)
    w.add_ssm_inner_size(Di)
    w.add_ssm_state_size(N)
    w.add_ssm_time_step_rank(R)
    w.add_ssm_dt_b_c_rms(False)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])

    def matrix(name: str, rows: int, cols: int, std: float) -> None:
        a = (rng.standard_normal((rows, cols)) * std).astype(np.float32)
        if qtype != gguf.GGMLQuantizationType.F32 and cols % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            data = quantize(a, qtype)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, a)

    def floats(name: str, a: np.ndarray) -> None:
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))

    matrix("token_embd.weight", vocab, H, 0.02)
    floats("output_norm.weight", np.ones(H))
    for i in range(args.layers):
        p = f"blk.{i}."
        floats(p + "attn_norm.weight", np.ones(H))
        matrix(p + "ssm_in.weight", 2 * Di, H, H ** -0.5)
        floats(p + "ssm_conv1d.weight", rng.uniform(-0.5, 0.5, (Di, K)))
        floats(p + "ssm_conv1d.bias", rng.uniform(-0.1, 0.1, Di))
        matrix(p + "ssm_x.weight", R + 2 * N, Di, Di ** -0.5)
        matrix(p + "ssm_dt.weight", Di, R, R ** -0.5)
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), Di))      # Mamba's step-size init
        floats(p + "ssm_dt.bias", dt + np.log(-np.expm1(-dt)))           # softplus^-1(dt)
        floats(p + "ssm_a", -np.tile(np.arange(1, N + 1, dtype=np.float32), (Di, 1)))   # -exp(A_log), S4D-real
        floats(p + "ssm_d", np.ones(Di))
        matrix(p + "ssm_out.weight", H, Di, Di ** -0.5 / args.layers ** 0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.0f} MB): hidden {H}, {args.layers} blocks, "
          f"d_inner {Di}, state {N}, dt_rank {R}, {args.type} projections")


if __name__ == "__main__":
    main()
