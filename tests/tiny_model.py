"""A tiny random Llama-family GGUF for tests: real tokenizer metadata, random small weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgellm.loading.gguf import read_gguf, write_gguf
from edgellm.quant import gguf_blocks

TINY = dict(n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, ffn=128, context=64)


def write_tiny_llama(path: Path, source_gguf: Path, *, arch: str = "llama", matrix_type: str = "Q4_1",
                     overrides: dict | None = None, drop: str | None = None,
                     bad_shape: str | None = None, seed: int = 0, **config) -> Path:
    """Write a small llama GGUF whose tokenizer is the source model's.

    ``overrides`` replaces metadata keys; ``drop`` leaves a tensor out; ``bad_shape`` writes that
    tensor with a shape contradicting the metadata.
    """
    c = {**TINY, **config}
    src = read_gguf(source_gguf)
    meta = {k: v for k, v in src.metadata.items() if k.startswith("tokenizer.") or k == "general.name"}
    types = {k: v for k, v in src.metadata_types.items() if k in meta}
    vocab = len(meta["tokenizer.ggml.tokens"])
    meta.update({
        "general.architecture": arch,
        f"{arch}.block_count": c["n_layers"], f"{arch}.embedding_length": c["hidden"],
        f"{arch}.attention.head_count": c["n_heads"], f"{arch}.attention.head_count_kv": c["n_kv_heads"],
        f"{arch}.feed_forward_length": c["ffn"], f"{arch}.context_length": c["context"],
        f"{arch}.rope.freq_base": 10000.0, f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
    })
    meta.update(overrides or {})
    rng = np.random.default_rng(seed)
    h, f, hd = c["hidden"], c["ffn"], c["hidden"] // c["n_heads"]
    shapes = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,)}
    for i in range(c["n_layers"]):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (h,), p + "ffn_norm.weight": (h,),
                       p + "attn_q.weight": (h, h), p + "attn_k.weight": (c["n_kv_heads"] * hd, h),
                       p + "attn_v.weight": (c["n_kv_heads"] * hd, h), p + "attn_output.weight": (h, h),
                       p + "ffn_gate.weight": (f, h), p + "ffn_up.weight": (f, h), p + "ffn_down.weight": (h, f)})
    tensors = []
    for name, shape in shapes.items():
        if name == drop:
            continue
        if name == bad_shape:
            shape = (shape[0] * 2, shape[1]) if len(shape) == 2 else (shape[0] * 2,)
        if len(shape) == 1:
            tensors.append((name, np.ones(shape, np.float32), "F32", shape))
        else:
            w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
            qtype = "Q8_0" if name == "token_embd.weight" else matrix_type
            tensors.append((name, gguf_blocks.quantize(w, qtype), qtype, shape))
    write_gguf(path, meta, tensors, metadata_types=types)
    return path


def save_hf_folder(model, out: Path, vocab_size: int) -> Path:
    """A transformers model saved as an HF folder with a word-level tokenizer of ``vocab_size``
    tokens (``<unk>``, ``w1`` ..): enough for a loader that needs ``tokenizer.json`` beside the
    weights, when the test feeds token ids."""
    from tokenizers import Tokenizer, models

    model.save_pretrained(str(out))
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(out / "tokenizer.json"))
    return out


def run_chunks(model, cfg, ids: list[int], prompt_len: int, chunk: int, fused: bool = True) -> list:
    """Prefill ``ids[:prompt_len]`` in chunks of ``chunk`` tokens through an engine ModelRunner
    over a KV pool of its own, then decode the rest one by one; the logits after the prompt and
    after each decode step (position prompt_len - 1, prompt_len, ...)."""
    import torch

    from edgellm.kv.cache import KVCache
    from edgellm.runtime.model_runner import ModelRunner, SeqChunk

    cache = KVCache(cfg, num_blocks=-(-len(ids) // 16))
    runner = ModelRunner(model, cache, fused_decode=fused)
    slots = slice(0, cache.num_blocks * 16)
    with torch.inference_mode():
        for start in range(0, prompt_len, chunk):
            part = ids[start:min(start + chunk, prompt_len)]
            out = runner.run([SeqChunk(part, start, slots, want_logits=start + len(part) == prompt_len)])
        got = [out[0]]
        for pos in range(prompt_len, len(ids) - 1):
            got.append(runner.run([SeqChunk([ids[pos]], pos, slots)])[0])
    return got


def decode_step_logits(model, fused: bool, n_seq: int = 4):
    """Logits of one decode step of ``n_seq`` sequences after a short prefill of each, through a
    ModelRunner with the all-blocks native step (``fused``) or the per-op path."""
    import torch

    from edgellm.kv.cache import KVCache
    from edgellm.runtime.model_runner import ModelRunner, SeqChunk

    span = 32
    cache = KVCache(model.cfg, n_seq * span // 16, 16, torch.float32)
    slots = [torch.arange(i * span, (i + 1) * span) for i in range(n_seq)]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (3 + 5 * i,), generator=gen).tolist() for i in range(n_seq)]
    runner = ModelRunner(model, cache, fused_decode=fused)
    runner.run([SeqChunk(p, 0, s) for p, s in zip(prompts, slots)])
    return runner.run([SeqChunk([1234 + i], len(p), s) for i, (p, s) in enumerate(zip(prompts, slots))])
