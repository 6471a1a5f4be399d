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
GGUF experts stay quantised and take the same kernels as dense layers' matrices.

A decode-only step of a model whose matrices are all in native block formats (every layer
sparse) runs every block in one native call, ``moe_decode_blocks`` (the same math; the router may
be float32, as llama.cpp keeps it): run op by op, a layer made ~40 native calls. Prefill, other
formats and ``EDGELLM_NATIVE=0`` take the per-layer path. In a trace the whole expert MLP
(router, experts, shared expert) is one op, "down_proj+ffn_add".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgellm.config import ExpertConfig, ModelConfig
from edgellm.kernels import native
from edgellm.kv.cache import KVCache
from edgellm.layers.attention import AttentionBatch
from edgellm.models.llama import BlockWeights, LlamaModel, ModelWeights, silu_mul
from edgellm.models.trace import Trace
from edgellm.quant.base import Weight
from edgellm.quant.dense import DenseWeight
from edgellm.quant.gguf_weights import GGUFBlockWeight


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
    block; its fused decode step is ``moe_decode_blocks`` (see :func:`native_moe_layers`)."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights):
        super().__init__(cfg, weights)
        self._native_layers = native_moe_layers(weights, cfg)
        self._native_blocks = None if self._native_layers is None else _flatten(self._native_layers)

    def fused_decode_supported(self, batch: AttentionBatch, cache: KVCache) -> bool:
        """As Llama's, except with int8 activations or bf16 dot products: moe_decode_blocks
        multiplies exactly only, so such a model (a GGUF whose routers are quantised too) decodes
        on the per-layer path, whose matrices take the int8 or bf16 kernels."""
        return self.decode_arithmetic() == 0 and super().fused_decode_supported(batch, cache)

    def decode_blocks_fused(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch,
                            cache: KVCache, threads: int, trace: Trace | None = None,
                            layers: list[int] | None = None) -> None:
        """Every block of a decode-only step in one native call (``layers``: only these blocks,
        each on its own KV layer, for a speculative draft); updates h in place."""
        cfg, ex = self.cfg, self.cfg.experts
        args = self._native_blocks if layers is None else _flatten([self._native_layers[i] for i in layers])
        batch = batch.windowed(self._windows[0])
        T = h.shape[0]
        if trace is not None:
            trace.begin()
        native().moe_decode_blocks(
            h, *args, rope[0].view(T, -1), rope[1].view(T, -1), cache.data, batch.write_index, batch.decode_index,
            batch.decode_lens, cfg.n_heads, cfg.n_kv_heads, ex.n_experts, ex.n_used, ex.ffn_size, ex.shared_ffn_size,
            ex.norm_top_k, cfg.rms_norm_eps, threads, [] if layers is None else list(layers))
        if trace is not None:
            trace.end("decode_blocks", None)

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


_NONE = torch.empty(0)   # an absent bias or norm, for the native step


def native_moe_layers(weights: ModelWeights, cfg: ModelConfig) -> list[tuple] | None:
    """Per block, the arguments of the native decode step (see ``moe_decode_blocks`` in
    gguf_cpu.cpp for their order), or None when it cannot run this model: no native kernels, a
    dense layer (Qwen's mlp_only_layers), or a matrix in another format (the router may also be
    float32)."""
    if native() is None:
        return None
    layers = []
    for b in weights.blocks:
        ex = b.experts
        if ex is None:
            return None
        mats = [b.qkv, b.o, *ex.gate_up, *ex.down]
        if ex.shared_gate_up is not None:
            mats += [ex.shared_gate_up, ex.shared_down]
        if not all(isinstance(m, GGUFBlockWeight) for m in mats):
            return None
        if isinstance(ex.router, GGUFBlockWeight):
            router, router_fmt = ex.router.raw, ex.router.code
        elif isinstance(ex.router, DenseWeight) and ex.router.tensor.dtype == torch.float32:
            router, router_fmt = ex.router.tensor, -1
        else:
            return None
        vec = [v.contiguous() if v is not None else _NONE for v in (b.qkv_bias, b.q_norm, b.k_norm)]
        attn = [b.attn_norm.contiguous(), b.qkv.raw, *vec, b.o.raw, b.ffn_norm.contiguous(), router]
        if ex.shared_gate_up is not None:
            shared = [ex.shared_gate_up.raw, ex.shared_down.raw, ex.shared_gate.contiguous()]
            shared_fmts = [ex.shared_gate_up.code, ex.shared_down.code]
        else:
            shared, shared_fmts = [_NONE] * 3, [0, 0]
        layers.append((attn, [b.qkv.code, b.o.code, router_fmt], [m.raw for m in ex.gate_up + ex.down],
                       [m.code for m in ex.gate_up + ex.down], shared, shared_fmts))
    return layers


def _flatten(layers: list[tuple]) -> list[list]:
    """The per-layer argument lists joined into the six lists the native step takes."""
    return [[x for layer in layers for x in layer[i]] for i in range(6)]
