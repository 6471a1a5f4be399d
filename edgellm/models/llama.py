"""The Llama-family decoder: Llama 2/3, SmolLM2, Mistral and Qwen2 (q/k/v biases).

One forward pass serves prefill and decode alike: tokens of every sequence in the step are laid
end to end ([T]), each with its position, and attention reads and writes the KV cache through
the step's ``AttentionBatch``. Only the rows whose next token is wanted go through the final
norm and the vocabulary projection (a 49k x 576 matrix is the largest single read per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import time

import torch
import torch.nn.functional as F

from edgellm.config import ModelConfig
from edgellm.kv.cache import KVCache
from edgellm.kernels import native
from edgellm.kernels.threads import ThreadChooser
from edgellm.layers.attention import AttentionBatch, self_attention
from edgellm.layers.rope import RotaryEmbedding
from edgellm.quant.base import Weight

#: decode batches up to this many sequences take the fused native step
FUSED_DECODE_MAX_ROWS = 16


@dataclass
class BlockWeights:
    attn_norm: torch.Tensor
    qkv: Weight                     # q, k and v stacked: [q_size + 2 * kv_size, hidden]
    qkv_bias: torch.Tensor | None
    o: Weight
    ffn_norm: torch.Tensor
    gate_up: Weight                 # gate and up stacked: [2 * ffn, hidden]
    down: Weight


@dataclass
class ModelWeights:
    embed: Weight                   # [vocab, hidden]
    blocks: list[BlockWeights]
    final_norm: torch.Tensor
    lm_head: Weight                 # the embedding itself when tied

    @property
    def nbytes(self) -> int:
        total = self.embed.nbytes + self.final_norm.numel() * 4
        if self.lm_head is not self.embed:
            total += self.lm_head.nbytes
        for b in self.blocks:
            total += b.qkv.nbytes + b.o.nbytes + b.gate_up.nbytes + b.down.nbytes
            total += (b.attn_norm.numel() + b.ffn_norm.numel()) * 4
        return total


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights):
        self.cfg = cfg
        self.weights = weights
        self.rope = RotaryEmbedding(cfg)
        self._native_blocks = _native_block_args(weights)
        self._threads = ThreadChooser(torch.get_num_threads())

    @property
    def thread_chooser(self) -> ThreadChooser:
        """The decode step's thread policy (its ``steps_by_threads`` says what ran)."""
        return self._threads

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                cache: KVCache, logit_rows: torch.Tensor) -> torch.Tensor:
        """tokens, positions: [T]. Returns float32 logits [len(logit_rows), vocab]."""
        h = self.weights.embed.rows(tokens)
        rope = self.rope.tables(positions)
        # The fused native step streams the quantised weights once for all rows, which wins while
        # the batch is small (memory-bound); with many rows the per-layer path's dequantise-then-
        # BLAS matmuls do the arithmetic faster (measured 2.4x at 64 rows).
        if (self._native_blocks is not None and not batch.prefills and tokens.shape[0] <= FUSED_DECODE_MAX_ROWS
                and cache.dtype in (torch.float32, torch.float16)):
            self._decode_blocks_native(h, rope, batch, cache)
        else:
            for i, block in enumerate(self.weights.blocks):
                h = self._block(h, rope, block, batch, cache, i)
        h = h.index_select(0, logit_rows)
        h = F.rms_norm(h, (self.cfg.hidden_size,), self.weights.final_norm, self.cfg.rms_norm_eps)
        return self.weights.lm_head.matmul(h)

    __call__ = forward

    def _decode_blocks_native(self, h: torch.Tensor, rope, batch: AttentionBatch, cache: KVCache) -> None:
        """Every block of a decode-only step in one native call (one parallel region); updates h."""
        cfg = self.cfg
        tensors, formats, biases = self._native_blocks
        T = h.shape[0]
        if self._threads.max_threads != torch.get_num_threads():   # the caller changed the setting
            self._threads = ThreadChooser(torch.get_num_threads())
        threads = self._threads.threads(T)
        start = time.perf_counter()
        native().decode_blocks(h, tensors, formats, biases, rope[0].view(T, -1), rope[1].view(T, -1), cache.data,
                               batch.write_index, batch.decode_index, batch.decode_lens,
                               cfg.n_heads, cfg.n_kv_heads, cfg.ffn_size, cfg.rms_norm_eps, threads)
        self._threads.record(T, threads, time.perf_counter() - start)

    def _block(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], w: BlockWeights,
               batch: AttentionBatch, cache: KVCache, layer: int) -> torch.Tensor:
        cfg = self.cfg
        x = F.rms_norm(h, (cfg.hidden_size,), w.attn_norm, cfg.rms_norm_eps)
        qkv = w.qkv.matmul(x)
        if w.qkv_bias is not None:
            qkv = qkv + w.qkv_bias
        attn = self_attention(qkv, rope, cache, layer, batch, cfg.n_heads, cfg.n_kv_heads)
        h = w.o.matmul_add(attn, h)
        x = F.rms_norm(h, (cfg.hidden_size,), w.ffn_norm, cfg.rms_norm_eps)
        return w.down.matmul_add(_silu_mul(w.gate_up.matmul(x)), h)


def _native_block_args(weights: ModelWeights):
    """Arguments of the native decode path, or None when some block matrix has another format."""
    from edgellm.quant.gguf_weights import GGUFBlockWeight

    if native() is None:
        return None
    tensors, formats, biases = [], [], []
    for b in weights.blocks:
        mats = (b.qkv, b.o, b.gate_up, b.down)
        if not all(isinstance(m, GGUFBlockWeight) for m in mats):
            return None
        tensors += [b.attn_norm.contiguous(), b.qkv.raw, b.o.raw, b.ffn_norm.contiguous(), b.gate_up.raw, b.down.raw]
        formats += [m.code for m in mats]
        if b.qkv_bias is not None:
            biases.append(b.qkv_bias.contiguous())
    if biases and len(biases) != len(weights.blocks):
        return None
    return tensors, formats, biases


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    ext = native()
    if ext is not None and gate_up.dtype == torch.float32:
        return ext.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
