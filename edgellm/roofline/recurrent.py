"""Operations and bytes of the blocks of attention-free models (Mamba, Mamba-2, RWKV-4), for one step.

The conventions are those of :mod:`edgellm.roofline.layers` (ops: one multiply or add; bytes: main
memory traffic, weights at weight bits, activations at act bits), with one addition: the recurrent
**state** takes the place of the KV cache and is counted at ``kv_bits``. Each sequence's state is
loaded once and stored once per step, whatever the step's length: so for decode (one token) every
figure is flat in the context length, and for a prefill of P tokens it grows linearly in P (never
with P squared) -- against attention, whose decode step reads the whole KV history.

Per-element costs of the scans (on top of the matmuls), per token and state element:

* Mamba: exp(dt A), dt B u, the update a s + b, the output's multiply-add with C: 8 ops per
  (channel, state) pair; the D skip and the gate: 3 per channel; SiLU: 4 per element;
* Mamba-2: the same per (head, head_dim, state) element, the decay once per head; the gated norm
  of the output: 8 per channel (silu, multiply, square, sum, scale, weight);
* RWKV-4: the WKV update with its running maximum: 20 ops per channel (two maxima, four exps, the
  sums and a division); the token-shift blends: 3 per element; LayerNorm: 5 per element.
"""

from __future__ import annotations

from dataclasses import replace

from edgellm.config import ModelConfig
from edgellm.roofline.layers import Bits, LayerCost, compute_bits, head_layers, validate_shape

#: the linear layers of each recurrent block (the analogue of ``layers.BLOCK_LINEARS``)
RECURRENT_LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj", "key", "value", "receptance", "output",
                     "ffn_key", "ffn_receptance", "ffn_value")
#: the layers that read and write the state (the analogue of ``layers.ATTENTION_CORE``)
RECURRENT_CORE = ("conv1d", "selective_scan", "ssd_scan", "time_shift", "wkv", "channel_shift")


def is_recurrent(cfg: ModelConfig) -> bool:
    return bool(cfg.extra) and "recurrent" in cfg.extra


def state_bytes(cfg: ModelConfig, kv_bits: float) -> float:
    """Bytes of one sequence's state, every layer, at ``kv_bits``."""
    s = cfg.extra["recurrent"]
    if cfg.architecture == "rwkv":
        per_layer = 2 * cfg.hidden_size + 3 * s["att_size"]
    elif cfg.architecture == "mamba2":
        conv_dim = s["d_inner"] + 2 * s["groups"] * s["d_state"]
        per_layer = conv_dim * (s["d_conv"] - 1) + s["heads"] * s["head_dim"] * s["d_state"]
    else:
        per_layer = s["d_inner"] * (s["d_conv"] - 1 + s["d_state"])
    return cfg.n_layers * per_layer * kv_bits / 8


def recurrent_model_layers(cfg: ModelConfig, phase: str, batch: int, seq_len: int, bits: Bits,
                           weight_bytes=None) -> list[LayerCost]:
    """Embedding, the block's layers (count = n_layers), final norm and lm_head, in execution order
    (``layers.model_layers`` for a recurrent model)."""
    validate_shape(phase, batch, seq_len)
    emb, tail = head_layers(cfg, phase, batch, seq_len, bits, weight_bytes)
    return [emb] + recurrent_block_layers(cfg, phase, batch, seq_len, bits, weight_bytes) + tail


def recurrent_block_layers(cfg: ModelConfig, phase: str, batch: int, seq_len: int, bits: Bits,
                           weight_bytes=None) -> list[LayerCost]:
    """The layers of one block of a recurrent model (each with count = n_layers)."""
    T = batch * (seq_len if phase == "prefill" else 1)        # tokens in this step
    c = _Costs(cfg, T, batch, bits, dict(weight_bytes or {}))
    build = {"mamba": c.mamba, "mamba2": c.mamba2, "rwkv": c.rwkv}[cfg.architecture]
    return [replace(layer, count=cfg.n_layers) for layer in build(cfg.extra["recurrent"])]


class _Costs:
    def __init__(self, cfg: ModelConfig, T: int, B: int, bits: Bits, per_weight: dict):
        self.h, self.T, self.B = cfg.hidden_size, T, B
        self.wb, self.ab, self.kb = bits.weight / 8, bits.act / 8, bits.kv / 8
        self.per_weight = per_weight
        self.lin_bits = compute_bits(bits.weight, bits.act)
        self.act_bits = compute_bits(bits.act)
        self.state_bits = compute_bits(bits.act, bits.kv)

    def linear(self, name: str, n_in: int, n_out: int, bias: bool = False) -> LayerCost:
        T, ab = self.T, self.ab
        return LayerCost(name, "linear", 2.0 * T * n_in * n_out + (T * n_out if bias else 0),
                         load_weight=n_in * n_out * self.per_weight.get(name, self.wb) + (n_out * ab if bias else 0),
                         load_act=T * n_in * ab, store_act=T * n_out * ab, compute_bits=self.lin_bits,
                         params=n_in * n_out + (n_out if bias else 0))

    def elementwise(self, name: str, ops_per: float, n: int, inputs: int = 1, weights: int = 0) -> LayerCost:
        T, ab = self.T, self.ab
        return LayerCost(name, "elementwise", ops_per * T * n, load_weight=weights * ab, load_act=inputs * T * n * ab,
                         store_act=T * n * ab, compute_bits=self.act_bits, params=weights)

    def core(self, name: str, ops: float, state_elems: int, act_in: int, act_out: int, params: int = 0) -> LayerCost:
        """A layer that loads and stores each sequence's ``state_elems`` of state once per step."""
        ab, kb = self.ab, self.kb
        return LayerCost(name, "recurrent", ops, load_weight=params * ab, load_act=act_in * ab, store_act=act_out * ab,
                         load_kv=self.B * state_elems * kb, store_kv=self.B * state_elems * kb,
                         compute_bits=self.state_bits, params=params)

    def mamba(self, s: dict) -> list[LayerCost]:
        h, T, Di, N, K, R = self.h, self.T, s["d_inner"], s["d_state"], s["d_conv"], s["dt_rank"]
        return [
            self.elementwise("norm", 4, h, weights=h),
            self.linear("in_proj", h, 2 * Di),
            self.core("conv1d", (2 * K + 1 + 4) * T * Di, Di * (K - 1), T * Di, T * Di, params=Di * (K + 1)),
            self.linear("x_proj", Di, R + 2 * N),
            self.linear("dt_proj", R, Di, bias=True),
            self.core("selective_scan", 8.0 * T * Di * N + (3 + 4) * T * Di, Di * N,
                      T * (3 * Di + 2 * N), T * Di, params=Di * (N + 1)),
            self.linear("out_proj", Di, h),
            self.elementwise("residual", 1, h, inputs=2),
        ]

    def mamba2(self, s: dict) -> list[LayerCost]:
        h, T, Di, N, K = self.h, self.T, s["d_inner"], s["d_state"], s["d_conv"]
        H, P, G = s["heads"], s["head_dim"], s["groups"]
        conv_dim = Di + 2 * G * N
        return [
            self.elementwise("norm", 4, h, weights=h),
            self.linear("in_proj", h, Di + conv_dim + H),
            self.core("conv1d", (2 * K + 1 + 4) * T * conv_dim, conv_dim * (K - 1), T * conv_dim, T * conv_dim,
                      params=conv_dim * (K + 1)),
            self.core("ssd_scan", 8.0 * T * H * P * N + 4 * T * H + 2 * T * Di, H * P * N, T * (conv_dim + H),
                      T * Di, params=3 * H),
            self.elementwise("gated_norm", 8, Di, inputs=2, weights=Di),
            self.linear("out_proj", Di, h),
            self.elementwise("residual", 1, h, inputs=2),
        ]

    def rwkv(self, s: dict) -> list[LayerCost]:
        h, T, A, F = self.h, self.T, s["att_size"], s["ffn_size"]
        return [
            self.elementwise("ln1", 5, h, weights=2 * h),
            self.core("time_shift", 3.0 * 3 * T * h, h, T * h, 3 * T * h, params=3 * h),
            self.linear("key", h, A),
            self.linear("value", h, A),
            self.linear("receptance", h, A),
            self.core("wkv", 20.0 * T * A + 5 * T * A, 3 * A, 3 * T * A, T * A, params=2 * A),
            self.linear("output", A, h),
            self.elementwise("residual", 1, h, inputs=2),
            self.elementwise("ln2", 5, h, weights=2 * h),
            self.core("channel_shift", 3.0 * 2 * T * h, h, T * h, 2 * T * h, params=2 * h),
            self.linear("ffn_key", h, F),
            self.elementwise("relu_square", 2, F),
            self.linear("ffn_value", F, h),
            self.linear("ffn_receptance", h, h),
            self.elementwise("sigmoid_mul", 5, h, inputs=2),
            self.elementwise("residual_ffn", 1, h, inputs=2),
        ]
