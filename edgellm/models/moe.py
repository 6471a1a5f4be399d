"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE and Qwen3-MoE.

The block is Llama's (:mod:`edgellm.models.llama`: fused q/k/v with optional biases, RoPE, the
shared KV cache) with two changes:

* the MLP of a sparse layer is a set of SwiGLU experts and a router (an [experts, hidden]
  matrix). Each token's router logits go through a softmax over all experts; the ``n_used``
  largest probabilities pick the experts, renormalised to sum to one when the config says so
  (``ExpertConfig.norm_top_k``), and weight the chosen experts' outputs -- the order in which
  transformers' ``MixtralTopKRouter`` / ``Qwen2MoeTopKRouter`` / ``Qwen3MoeTopKRouter`` and
  llama.cpp's ``build_moe_ffn`` (softmax gating) do it. Qwen2-MoE adds a shared expert every
  token runs, scaled by sigmoid(x . gate);
* Qwen3-MoE normalises each query and key head (RMSNorm, a weight of head width) before RoPE.

Only the experts some token chose run: the step's (token, expert) pairs are sorted by expert and
each chosen expert multiplies its tokens' rows in one call, so a decode step reads the union of
its rows' chosen experts and no other expert weight, and a prefill chunk runs each expert once
on all of its tokens. Every expert matrix is a :class:`~edgellm.quant.base.Weight`: quantised
GGUF experts stay quantised and take the same kernels as dense layers' matrices. The native fused
all-blocks decode step implements Llama's dense block only, so every step takes the per-layer
path. In a trace the whole expert MLP (router, experts, shared expert) is one op,
"down_proj+ffn_add".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgellm.config import ExpertConfig, ModelConfig
from edgellm.kv.cache import KVCache
from edgellm.layers.attention import AttentionBatch
from edgellm.models.llama import BlockWeights, LlamaModel, ModelWeights, silu_mul
from edgellm.models.trace import Trace
from edgellm.quant.base import Weight


@dataclass
class ExpertWeights:
    """One sparse MLP: the router and every expert (gate and up stacked as in a dense block)."""

    router: Weight                  # [n_experts, hidden]
    gate_up: list[Weight]           # per expert [2 * expert_ffn, hidden]
    down: list[Weight]              # per expert [hidden, expert_ffn]
    shared_gate_up: Weight | None = None    # Qwen2-MoE's shared expert
    shared_down: Weight | None = None
    shared_gate: torch.Tensor | None = None  # [hidden]: the shared expert's output times sigmoid(x . this)

    def matrices(self) -> list[Weight]:
        mats = [self.router, *self.gate_up, *self.down]
        return mats + [m for m in (self.shared_gate_up, self.shared_down) if m is not None]

    @property
    def nbytes(self) -> int:
        extra = self.shared_gate.numel() * 4 if self.shared_gate is not None else 0
        return sum(m.nbytes for m in self.matrices()) + extra


@dataclass
class MoEBlockWeights(BlockWeights):
    """A Llama block whose MLP is ``experts`` in a sparse layer (``gate_up`` and ``down`` are then
    None) or the dense one (``experts`` None); ``q_norm``/``k_norm``: Qwen3-MoE's per-head norms."""

    experts: ExpertWeights | None = None
    q_norm: torch.Tensor | None = None   # [head_dim]
    k_norm: torch.Tensor | None = None

    def matrices(self) -> list[Weight]:
        dense = [m for m in (self.gate_up, self.down) if m is not None]
        return [self.qkv, self.o, *dense, *(self.experts.matrices() if self.experts is not None else [])]

    @property
    def nbytes(self) -> int:
        vectors = sum(v.numel() for v in (self.attn_norm, self.ffn_norm, self.q_norm, self.k_norm, self.qkv_bias)
                      if v is not None) * 4
        dense = sum(m.nbytes for m in (self.qkv, self.o, self.gate_up, self.down) if m is not None)
        return dense + vectors + (self.experts.nbytes if self.experts is not None else 0)


def route(x: torch.Tensor, router: Weight, n_used: int, norm_top_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, n_used] float32, experts [T, n_used] int64) of each token: softmax over all
    experts, then the ``n_used`` largest, renormalised to sum to one when ``norm_top_k``."""
    probs = torch.softmax(router.matmul(x).float(), dim=-1)
    weights, experts = torch.topk(probs, n_used, dim=-1)
    if norm_top_k:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def mix_experts(x: torch.Tensor, w: ExpertWeights, cfg: ExpertConfig) -> torch.Tensor:
    """The sparse MLP's output [T, hidden] for inputs x [T, hidden] (float32). Each chosen
    expert runs once, on the rows of every token that chose it; no other expert is read."""
    weights, experts = route(x, w.router, cfg.n_used, cfg.norm_top_k)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)          # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat, minlength=cfg.n_experts).tolist()
    token_of = order // cfg.n_used
    pair_weight = weights.reshape(-1).index_select(0, order).unsqueeze(1)
    pair_out = torch.empty(flat.shape[0], x.shape[1], dtype=x.dtype)   # one row per pair, in expert order
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        rows = token_of[start:start + n]
        act = silu_mul(w.gate_up[expert].matmul(x.index_select(0, rows)))
        pair_out[start:start + n] = w.down[expert].matmul(act) * pair_weight[start:start + n]
        start += n
    # back to (token, slot) order and summed over the slots: a gather, not a scatter-add (index_add_
    # took ~9 ms a call on [1, 512] rows on a loaded 2-core machine, more than the expert matmuls)
    out = pair_out.index_select(0, torch.argsort(order)).view(-1, cfg.n_used, x.shape[1]).sum(dim=1)
    if w.shared_gate_up is not None:
        gate = torch.sigmoid(x @ w.shared_gate).unsqueeze(1)
        out += w.shared_down.matmul(silu_mul(w.shared_gate_up.matmul(x))) * gate
    return out


class MoEModel(LlamaModel):
    """The Llama model's public parts (embed, rope_tables, forward_layers, logits) with the MoE
    block; never the fused native decode step."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights):
        super().__init__(cfg, weights)
        self._native_blocks = None   # the native decode step runs dense Llama blocks only

    def fused_decode_supported(self, batch: AttentionBatch, cache: KVCache) -> bool:
        return False

    def mlp_half(self, h: torch.Tensor, w: MoEBlockWeights, layer: int, trace: Trace | None = None) -> torch.Tensor:
        """The experts (with the shared expert where the layout has one); a dense layer (Qwen's
        mlp_only_layers) is Llama's MLP."""
        if w.experts is None:
            return super().mlp_half(h, w, layer, trace)
        cfg = self.cfg
        x = F.rms_norm(h, (cfg.hidden_size,), w.ffn_norm, cfg.rms_norm_eps)
        if trace is not None:
            trace.end("ffn_norm", layer)
        h = h + mix_experts(x, w.experts, cfg.experts)
        if trace is not None:
            trace.end("down_proj+ffn_add", layer)
        return h

    def norm_qk(self, qkv: torch.Tensor, w: MoEBlockWeights) -> torch.Tensor:
        """RMSNorm of every query and key head (Qwen3-MoE), back into one row per token for write_kv."""
        if w.q_norm is None:
            return qkv
        cfg = self.cfg
        T, H, KVH, D = qkv.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
        q = F.rms_norm(q.reshape(T, H, D), (D,), w.q_norm, cfg.rms_norm_eps)
        k = F.rms_norm(k.reshape(T, KVH, D), (D,), w.k_norm, cfg.rms_norm_eps)
        return torch.cat([q.view(T, H * D), k.view(T, KVH * D), v], dim=-1)
