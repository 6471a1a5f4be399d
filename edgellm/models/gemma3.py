"""Gemma 3 (text): the Llama-shaped decoder with Gemma's changes.

What differs from :mod:`edgellm.models.llama`:

* embeddings scaled by sqrt(hidden);
* RMSNorm on each query and key head before RoPE (``q_norm``, ``k_norm``);
* a norm after attention and after the MLP as well as before each (``post_attn_norm``,
  ``post_ffn_norm``), the residual added after the post-norm;
* a GeGLU MLP: gelu(gate, tanh approximation) * up;
* sliding-window attention on five of every six layers (``cfg.layer_window``), those layers with
  their own RoPE base (``cfg.rope_local_theta``, 10,000; the global ones 1,000,000): so
  :meth:`Gemma3Model.rope_tables` returns two tables;
* attention scaled by ``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5``;
* optional final logit soft-capping.

Gemma's RMSNorm multiplies by (1 + w). llama.cpp's converter stores 1 + w in the GGUF (transformers'
GGUF loader subtracts the 1 again), so GGUF norm weights are used as they are and an HF folder's get
the 1 added at load (``edgellm.loading.weights``). Attention, the KV cache and the Weight matrices
are the Llama model's (``write_kv``/``attend``; quantised matrices stay quantised); the native
fused decode step implements Llama's block only, so every step takes the per-layer path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from edgellm.config import ModelConfig
from edgellm.kv.cache import KVCache
from edgellm.layers.attention import AttentionBatch, attend, write_kv
from edgellm.layers.rope import RotaryEmbedding
from edgellm.models.llama import BlockWeights, ModelWeights
from edgellm.models.trace import Trace

Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Gemma3BlockWeights(BlockWeights):
    """A Llama block's weights (so weight conversion treats both alike) plus Gemma's norms; every
    norm weight is the multiplier itself (1 + w of the checkpoint)."""

    q_norm: torch.Tensor            # [head_dim], shared by the query heads
    k_norm: torch.Tensor            # [head_dim]
    post_attn_norm: torch.Tensor    # [hidden]
    post_ffn_norm: torch.Tensor     # [hidden]


class Gemma3Model:
    """The forward pass as the same public parts as :class:`~edgellm.models.llama.LlamaModel`
    (embed, rope_tables, forward_layers, logits; no fused decode), so the runner composes it alike."""

    prefill_attention_dtype = torch.float32   # as LlamaModel's

    def __init__(self, cfg: ModelConfig, weights: ModelWeights):
        self.cfg = cfg
        self.weights = weights
        self.rope = RotaryEmbedding(cfg)
        local_theta = cfg.rope_local_theta or cfg.rope_theta
        self.rope_local = RotaryEmbedding(replace(cfg, rope_theta=local_theta, rope_scaling=None))
        self._windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
        # transformers multiplies by a float32 tensor of sqrt(hidden): the same rounding here
        self._embed_scale = torch.tensor(math.sqrt(cfg.hidden_size), dtype=torch.float32)
        # attend() scales scores by head_dim ** -0.5; Gemma wants query_pre_attn_scalar ** -0.5.
        # Scaling q by their ratio does it, and folding that into q_norm's weight costs nothing
        # per step (the 270M model's ratio is exactly 1).
        ratio = math.sqrt(cfg.head_dim / (cfg.query_pre_attn_scalar or cfg.head_dim))
        self._q_norms = [b.q_norm * ratio if ratio != 1.0 else b.q_norm for b in weights.blocks]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                cache: KVCache, logit_rows: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """tokens, positions: [T]. Returns float32 logits [len(logit_rows), vocab]."""
        h = self.embed(tokens, trace)
        h = self.forward_layers(h, self.rope_tables(positions, trace), batch, cache, trace)
        return self.logits(h, logit_rows, trace)

    __call__ = forward

    def embed(self, tokens: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """The tokens' embedding rows times sqrt(hidden), [T, hidden] float32."""
        if trace is not None:
            trace.begin()
        h = self.weights.embed.rows(tokens) * self._embed_scale
        if trace is not None:
            trace.end("embedding", None)
        return h

    def rope_tables(self, positions: torch.Tensor, trace: Trace | None = None) -> tuple[Rope, Rope]:
        """cos/sin of the positions for the global layers and for the sliding ones (two bases)."""
        if trace is not None:
            trace.begin()
        tables = (self.rope.tables(positions), self.rope_local.tables(positions))
        if trace is not None:
            trace.end("rope", None)
        return tables

    def logits(self, h: torch.Tensor, logit_rows: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """The final norm and vocabulary projection (the tied embedding) of the rows ``logit_rows``."""
        if trace is not None:
            trace.begin()
        h = F.rms_norm(h.index_select(0, logit_rows), (self.cfg.hidden_size,), self.weights.final_norm,
                       self.cfg.rms_norm_eps)
        if trace is not None:
            trace.end("final_norm", None)
        out = self.weights.lm_head.matmul(h)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        if trace is not None:
            trace.end("lm_head", None)
        return out

    def forward_layers(self, h: torch.Tensor, rope: tuple[Rope, Rope], batch: AttentionBatch,
                       cache: KVCache, trace: Trace | None = None, layers: list[int] | None = None) -> torch.Tensor:
        """The blocks, one after the other; ``layers``: only these (a speculative draft), default all."""
        if trace is not None:
            trace.begin()
        blocks = self.weights.blocks
        for i in range(len(blocks)) if layers is None else layers:
            h = self.block(h, rope, blocks[i], batch, cache, i, trace)
        return h

    @property
    def has_fused_decode(self) -> bool:
        """Never: the native all-blocks decode step implements Llama's block, not Gemma's."""
        return False

    def fused_decode_supported(self, batch: AttentionBatch, cache: KVCache) -> bool:
        return False

    def block(self, h: torch.Tensor, rope: tuple[Rope, Rope], w: Gemma3BlockWeights,
              batch: AttentionBatch, cache: KVCache, layer: int, trace: Trace | None = None) -> torch.Tensor:
        """One Gemma 3 block. Its extra ops are traced within the profiler's op names
        (:data:`~edgellm.models.trace.OPS`): the q/k norms in "rope", the post-attention norm in
        "o_proj+attn_add", the post-MLP norm in "down_proj+ffn_add"."""
        cfg = self.cfg
        T, H, KVH, D = h.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        window = self._windows[layer]
        x = F.rms_norm(h, (cfg.hidden_size,), w.attn_norm, eps)
        if trace is not None:
            trace.end("attn_norm", layer)
        qkv = w.qkv.matmul(x)
        if trace is not None:
            trace.end("qkv_proj", layer)
        q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
        q = F.rms_norm(q.reshape(T, H, D), (D,), self._q_norms[layer], eps)
        k = F.rms_norm(k.reshape(T, KVH, D), (D,), w.k_norm, eps)
        # back into one row per token: write_kv's native path does RoPE and the cache write in one call
        qkv = torch.cat([q.view(T, H * D), k.view(T, KVH * D), v], dim=-1)
        q = write_kv(qkv, rope[1] if window is not None else rope[0], cache, layer, batch, H, KVH)
        if trace is not None:
            trace.end("rope", layer)
        attn = attend(q, cache, layer, batch, window, self.prefill_attention_dtype)
        if trace is not None:
            trace.end("attention", layer)
        h = h + F.rms_norm(w.o.matmul(attn), (cfg.hidden_size,), w.post_attn_norm, eps)
        if trace is not None:
            trace.end("o_proj+attn_add", layer)
        x = F.rms_norm(h, (cfg.hidden_size,), w.ffn_norm, eps)
        if trace is not None:
            trace.end("ffn_norm", layer)
        gate_up = w.gate_up.matmul(x)
        if trace is not None:
            trace.end("gate_up_proj", layer)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") * up
        if trace is not None:
            trace.end("mlp_act", layer)
        h = h + F.rms_norm(w.down.matmul(act), (cfg.hidden_size,), w.post_ffn_norm, eps)
        if trace is not None:
            trace.end("down_proj+ffn_add", layer)
        return h
