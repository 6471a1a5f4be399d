"""Operations and bytes moved by each layer of a Llama-family decoder, for one forward step.

Conventions (after Yuan et al. 2024, "LLM Inference Unveiled: Survey and Roofline Model Insights",
and their tool LLM-Viewer), stated also in :data:`CONVENTIONS`:

* One operation is one multiply or one add: a multiply-add is 2 ops. Matmul ops = 2·M·K·N.
* Bytes moved are main-memory traffic: each layer loads its weights (``weight_bits``), loads its
  input activations and stores its outputs (``act_bits``), loads / stores KV-cache entries
  (``kv_bits``). Nothing is assumed to stay in cache between layers (no fusion, except
  ``attention="fused"``).
* A step processes ``q`` new tokens per sequence against a context of ``k`` keys:
  prefill: q = k = seq_len (the whole prompt; attention counted over the full q×k score matrix,
  the causal mask saves nothing); decode: q = 1, k = seq_len + 1 (the cached tokens and the new one).
* K and V reach the KV cache as follows: v_proj writes V straight into the cache; k_proj writes K,
  RoPE rotates Q and K and writes K into the cache; qk_matmul / sv_matmul read K / V from the cache.
  With GQA each K/V head is read once for the group of query heads that shares it.
* Unfused attention writes the score matrix (qk_matmul), reads and writes it (softmax), and reads it
  (sv_matmul); fused attention (FlashAttention) keeps it on chip: it reads Q, K, V and writes O.
* Elementwise costs per element: RMSNorm 4 ops (square, sum, scale, weight), softmax 5 (max, sub,
  exp, sum, div), SiLU·up 5 (neg, exp, add, div, mul by up), RoPE 3 (two mul, one add), residual 1.
* The output head runs on the last position of each sequence only (B rows), in prefill too: the
  logits of the prompt's other positions are not needed for the first token.
* The compute precision of a matmul is the wider of its operands: weight-only quantization (W4A16)
  dequantizes to the activation precision and computes there; W8A8 computes in int8.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from edgellm.config import ModelConfig
from edgellm.errors import InvalidParameterError
from edgellm.roofline.experts import (
    EXPERT_LINEARS,
    expected_distinct_experts,
    expert_activation_elements,
    expert_layer_specs,
    per_weight_bytes,
)

# The bit widths the analyzer accepts. Fractional weight widths model quantization formats whose
# scales add to the bits (GGUF Q4_0 = 4.5, Q4_1 = 5, Q8_0 = 8.5 bits per weight; BitNet 1.58).
WEIGHT_BITS = (1.58, 2, 3, 4, 4.5, 5, 6, 8, 8.5, 16, 32)
ACT_BITS = (4, 8, 16, 32)
KV_BITS = (2, 4, 8, 16, 32)
PHASES = ("prefill", "decode")
ATTENTIONS = ("unfused", "fused")

# layer names in execution order; which are "linear" and which are "attention" for the crossover
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# every linear layer a block may have (a mixture of experts' too): the "linear" side of the crossover
LINEAR_LAYERS = BLOCK_LINEARS + EXPERT_LINEARS
ATTENTION_CORE = ("qk_matmul", "softmax", "sv_matmul", "fused_attention")

CONVENTIONS = [
    "ops: one multiply or one add; a multiply-add = 2 ops (matmul = 2*M*K*N)",
    "bytes: main-memory traffic per layer: weights loaded at weight bits, activations loaded and stored at "
    "act bits, KV cache loaded/stored at kv bits; no reuse between layers (LLM-Viewer convention)",
    "prefill: q = k = seq_len tokens per sequence, attention over the full q x k score matrix (causal mask "
    "not exploited); decode: q = 1 new token, k = seq_len + 1 keys (cache plus the new token)",
    "KV: v_proj writes V into the cache; RoPE writes the rotated K into the cache; qk/sv matmuls read K/V "
    "from it; with GQA each KV head is read once per group of query heads",
    "unfused attention writes, re-reads and re-writes the score matrix (qk_matmul, softmax, sv_matmul); "
    "fused attention (FlashAttention) keeps it on chip: loads Q, K, V, stores O",
    "elementwise ops per element: RMSNorm 4, softmax 5, SiLU*up 5, RoPE 3, residual add 1",
    "lm_head (and the final norm) run on the last position of each sequence only, in prefill too",
    "compute precision of a matmul = the wider operand (W4A16 computes in 16-bit; W8A8 in int8); "
    "a precision the chip lacks runs at the next wider one it has",
    "time = max(ops / peak, bytes / bandwidth); attainable = min(peak, intensity * bandwidth)",
    "layer figures are for the whole model: per-block figures x n_layers (column 'x'); per-block with --per-block",
    "mixture of experts: a sparse layer's expert ops follow the tokens (k experts each); its expert weight bytes "
    "follow the distinct experts the step's T tokens chose, E * (1 - (1 - k/E)^T) assuming uniform, independent "
    "routing (decode at batch B: T = B; a long prefill touches all E); x counts sparse and dense layers apart",
]


@dataclass(frozen=True)
class Bits:
    weight: float = 16
    act: int = 16
    kv: int = 16

    def __post_init__(self) -> None:
        validate_bits(self.weight, self.act, self.kv)


def _in_set(value: float, allowed) -> bool:
    return any(abs(float(value) - a) < 1e-9 for a in allowed)


def _fmt_set(allowed) -> str:
    return ", ".join(f"{a:g}" for a in allowed)


def validate_bits(weight: float, act: float, kv: float) -> None:
    for what, value, allowed in (("weight", weight, WEIGHT_BITS), ("activation", act, ACT_BITS),
                                 ("KV-cache", kv, KV_BITS)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _in_set(value, allowed):
            flag = {"weight": "--weight-bits", "activation": "--act-bits", "KV-cache": "--kv-bits"}[what]
            raise InvalidParameterError(f"{what} bits must be one of {{{_fmt_set(allowed)}}}, got {value!r}",
                                        f"pass {flag} with a supported width")


def compute_bits(*operand_bits: float) -> int:
    """The precision a matmul computes in: the widest operand, rounded up to 4/8/16/32 bits."""
    widest = max(operand_bits)
    for b in (4, 8, 16, 32):
        if widest <= b + 1e-9:
            return b
    return 32


@dataclass(frozen=True)
class LayerCost:
    """One layer's work for one forward step, for ONE instance (one block); ``count`` instances."""

    name: str
    kind: str                 # linear | attention | elementwise | embedding
    ops: float
    load_weight: float = 0.0
    load_act: float = 0.0
    store_act: float = 0.0
    load_kv: float = 0.0
    store_kv: float = 0.0
    compute_bits: int = 16
    count: int = 1            # instances in the model (n_layers for block layers)
    params: int = 0           # weight elements of one instance

    @property
    def memory_bytes(self) -> float:
        return self.load_weight + self.load_act + self.store_act + self.load_kv + self.store_kv

    @property
    def arithmetic_intensity(self) -> float:
        return self.ops / self.memory_bytes if self.memory_bytes else 0.0


def _shape(phase: str, batch: int, seq_len: int) -> tuple[int, int]:
    """(q, k): new tokens per sequence and keys each attends to."""
    if phase == "prefill":
        return seq_len, seq_len
    return 1, seq_len + 1


def keys_read(cfg: ModelConfig, phase: str, k: int) -> float:
    """Keys one query reads, averaged over the blocks (attention costs are linear in it, so the
    average gives the exact sum): in decode a sliding-window layer (Gemma 3, Mistral) reads at most
    its window (edgellm.kv.cache.KVLayout keeps no more); prefill's masked square still computes
    every (query, key) pair of the chunk, so it stays ``k``."""
    return k if phase == "prefill" else cfg.kv_positions(k) / cfg.n_layers


def validate_shape(phase: str, batch: int, seq_len: int) -> None:
    if phase not in PHASES:
        raise InvalidParameterError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InvalidParameterError(f"batch must be a positive integer, got {batch!r}", "pass --batch 1 or more")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise InvalidParameterError(f"sequence length must be a non-negative integer, got {seq_len!r}",
                                    "pass --seq-len 0 or more (tokens in the prompt, or already in the KV cache)")
    if phase == "prefill" and seq_len < 1:
        raise InvalidParameterError("a prefill needs a prompt of at least 1 token, got --seq-len 0",
                                    "pass --seq-len 1 or more")


def block_layers(cfg: ModelConfig, phase: str, batch: int, seq_len: int, bits: Bits,
                 attention: str = "unfused", weight_bytes: Mapping[str, float] | None = None) -> list[LayerCost]:
    """The layers of one transformer block, in execution order (each with count = n_layers).

    ``weight_bytes`` maps a layer name to the bytes one of its weight elements takes, overriding
    ``bits.weight`` for that layer (a real model's storage formats: Q4_1 = 0.625 bytes, Q8_0 = 1.0625).
    """
    validate_shape(phase, batch, seq_len)
    per_weight = dict(weight_bytes or {})
    if attention not in ATTENTIONS:
        raise InvalidParameterError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    q, k = _shape(phase, batch, seq_len)
    B, h, f = batch, cfg.hidden_size, cfg.ffn_size
    H, Hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    wb, ab, kb = bits.weight / 8, bits.act / 8, bits.kv / 8
    T = B * q                                        # tokens in this step
    lin_bits = compute_bits(bits.weight, bits.act)
    att_bits = compute_bits(bits.act, bits.kv)
    act_bits = compute_bits(bits.act)
    layers: list[LayerCost] = []

    def linear(name: str, n_in: int, n_out: int, bias: bool = False, to_kv: bool = False) -> LayerCost:
        ops = 2.0 * T * n_in * n_out + (T * n_out if bias else 0)
        out_bytes = T * n_out * (kb if to_kv else ab)
        return LayerCost(name, "linear", ops,
                         load_weight=n_in * n_out * per_weight.get(name, wb) + (n_out * ab if bias else 0),
                         load_act=T * n_in * ab,
                         store_act=0.0 if to_kv else out_bytes,
                         store_kv=out_bytes if to_kv else 0.0,
                         compute_bits=lin_bits, params=n_in * n_out + (n_out if bias else 0))

    def norm(name: str) -> LayerCost:
        return LayerCost(name, "elementwise", 4.0 * T * h, load_weight=h * ab, load_act=T * h * ab,
                         store_act=T * h * ab, compute_bits=act_bits, params=h)

    def residual(name: str) -> LayerCost:
        return LayerCost(name, "elementwise", 1.0 * T * h, load_act=2 * T * h * ab, store_act=T * h * ab,
                         compute_bits=act_bits)

    bias = cfg.qkv_bias
    layers.append(norm("attn_norm"))
    layers.append(linear("q_proj", h, H * d, bias))
    layers.append(linear("k_proj", h, Hkv * d, bias))
    layers.append(linear("v_proj", h, Hkv * d, bias, to_kv=True))
    rope_elems = T * (H + Hkv) * d
    layers.append(LayerCost("rope", "elementwise", 3.0 * rope_elems, load_act=rope_elems * ab,
                            store_act=T * H * d * ab, store_kv=T * Hkv * d * kb, compute_bits=act_bits))
    q_bytes = T * H * d * ab                         # Q read, or O written
    keys = keys_read(cfg, phase, k)                  # the context, or a sliding layer's window
    kv_read = B * keys * Hkv * d * kb                # K (or V) of those keys, each KV head once
    scores = B * H * q * keys                        # elements of the score matrix
    mm_ops = 2.0 * B * H * q * keys * d              # each of QK^T and SV
    if attention == "unfused":
        layers.append(LayerCost("qk_matmul", "attention", mm_ops, load_act=q_bytes, load_kv=kv_read,
                                store_act=scores * ab, compute_bits=att_bits))
        layers.append(LayerCost("softmax", "attention", 5.0 * scores, load_act=scores * ab,
                                store_act=scores * ab, compute_bits=act_bits))
        layers.append(LayerCost("sv_matmul", "attention", mm_ops, load_act=scores * ab, load_kv=kv_read,
                                store_act=q_bytes, compute_bits=att_bits))
    else:
        layers.append(LayerCost("fused_attention", "attention", 2 * mm_ops + 5.0 * scores, load_act=q_bytes,
                                load_kv=2 * kv_read, store_act=q_bytes, compute_bits=att_bits))
    layers.append(linear("o_proj", H * d, h))
    layers.append(residual("attn_add"))
    layers.append(norm("ffn_norm"))
    layers = [replace(layer, count=cfg.n_layers) for layer in layers]
    ex = cfg.experts
    n_sparse = sum(ex.sparse(i) for i in range(cfg.n_layers)) if ex is not None else 0
    if n_sparse < cfg.n_layers:      # the dense MLP (every layer of a dense model)
        dense = [linear("gate_proj", h, f), linear("up_proj", h, f),
                 LayerCost("mlp_act", "elementwise", 5.0 * T * f, load_act=2 * T * f * ab, store_act=T * f * ab,
                           compute_bits=act_bits),
                 linear("down_proj", f, h)]
        layers += [replace(layer, count=cfg.n_layers - n_sparse) for layer in dense]
    if n_sparse:
        layers += [replace(layer, count=n_sparse)
                   for layer in sparse_mlp_layers(ex, h, T, ab, wb, per_weight, lin_bits, act_bits)]
    return layers + [replace(residual("ffn_add"), count=cfg.n_layers)]


def sparse_mlp_layers(ex, h: int, T: int, ab: float, wb: float, per_weight: Mapping[str, float],
                      lin_bits: int, act_bits: int) -> list[LayerCost]:
    """One sparse MLP's layers for T tokens (see :mod:`edgellm.roofline.experts`): the router and
    its softmax/top-k, the chosen experts' projections (ops for T*k rows, weights of the expected
    distinct experts), SiLU*up, the shared expert where there is one, and the weighted sum."""
    out = []
    for name, n_in, n_out, rows, read in expert_layer_specs(ex, h, T):
        n_stored = ex.n_experts if name.startswith("expert_") else 1
        out.append(LayerCost(name, "linear", 2.0 * rows * n_in * n_out,
                             load_weight=read * n_in * n_out * per_weight_bytes(per_weight, name, wb),
                             load_act=rows * n_in * ab, store_act=rows * n_out * ab,
                             compute_bits=lin_bits, params=n_stored * n_in * n_out))
        if name == "router":
            out.append(LayerCost("router_softmax", "elementwise", 5.0 * T * ex.n_experts,
                                 load_act=T * ex.n_experts * ab, store_act=2 * T * ex.n_used * ab,
                                 compute_bits=act_bits))
        if name == "expert_up_proj":
            n = expert_activation_elements(ex, T)
            out.append(LayerCost("expert_act", "elementwise", 5.0 * n, load_act=2 * n * ab, store_act=n * ab,
                                 compute_bits=act_bits))
    pairs = T * (ex.n_used + (1 if ex.shared_ffn_size else 0))   # outputs summed per token, each scaled
    out.append(LayerCost("expert_mix", "elementwise", 2.0 * pairs * h, load_act=pairs * h * ab,
                         store_act=T * h * ab, compute_bits=act_bits))
    return out


def active_experts(cfg: ModelConfig, phase: str, batch: int, seq_len: int) -> float:
    """Expected distinct experts a sparse layer reads in this step (uniform routing); 0 if dense."""
    if cfg.experts is None:
        return 0.0
    q, _ = _shape(phase, batch, seq_len)
    return expected_distinct_experts(cfg.experts.n_experts, cfg.experts.n_used, batch * q)


def head_layers(cfg: ModelConfig, phase: str, batch: int, seq_len: int, bits: Bits,
                weight_bytes: Mapping[str, float] | None = None) -> tuple[LayerCost, list[LayerCost]]:
    """(embedding lookup, [final_norm, lm_head]) — the layers outside the blocks."""
    validate_shape(phase, batch, seq_len)
    q, _ = _shape(phase, batch, seq_len)
    B, h, V = batch, cfg.hidden_size, cfg.vocab_size
    wb, ab = bits.weight / 8, bits.act / 8
    per_weight = dict(weight_bytes or {})
    T = B * q
    emb = LayerCost("embedding", "embedding", 0.0, load_weight=T * h * per_weight.get("embedding", wb),
                    store_act=T * h * ab, compute_bits=compute_bits(bits.act), params=V * h)
    final_norm = LayerCost("final_norm", "elementwise", 4.0 * B * h, load_weight=h * ab, load_act=B * h * ab,
                           store_act=B * h * ab, compute_bits=compute_bits(bits.act), params=h)
    lm_head = LayerCost("lm_head", "linear", 2.0 * B * h * V, load_weight=h * V * per_weight.get("lm_head", wb),
                        load_act=B * h * ab, store_act=B * V * ab, compute_bits=compute_bits(bits.weight, bits.act),
                        params=0 if cfg.tie_embeddings else h * V)
    return emb, [final_norm, lm_head]


def model_layers(cfg: ModelConfig, phase: str, batch: int, seq_len: int, bits: Bits,
                 attention: str = "unfused", weight_bytes: Mapping[str, float] | None = None) -> list[LayerCost]:
    """Embedding, the block's layers (count = n_layers), final norm and lm_head, in execution order.
    ``weight_bytes``: per-layer bytes per weight element (see :func:`block_layers`)."""
    emb, tail = head_layers(cfg, phase, batch, seq_len, bits, weight_bytes)
    return [emb] + block_layers(cfg, phase, batch, seq_len, bits, attention, weight_bytes) + tail
