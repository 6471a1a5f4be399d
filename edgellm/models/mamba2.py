"""Mamba-2, as transformers' ``Mamba2ForCausalLM`` computes it.

What differs from Mamba (1) (:mod:`edgellm.models.mamba`):

* one ``in_proj`` gives the gate ``z`` [d_inner], ``xBC`` [d_inner + 2 * groups * d_state] and a
  step size per head ``dt`` [heads]; the causal convolution (and SiLU) runs over all of ``xBC``,
  so B and C are convolved too;
* the decay is one scalar per head (``A`` [heads]), B and C are shared by the heads of a group,
  and ``x`` is split into heads of ``head_dim``: per head, ``state [head_dim, d_state] <-
  exp(dt A) state + dt x B^T`` and ``y = state C + D x``;
* the output is ``rms_norm(y * silu(z))`` per group of channels (a gated norm), then ``out_proj``.

Since the decay is a scalar per head, a piece of L positions needs only [L, L, heads] decay factors
(the "state space duality" form): ``y[t] = sum_{j<=t} exp(S[t] - S[j]) (C[t].B[j]) dt[j] x[j] +
exp(S[t]) C[t].state0`` with ``S`` the cumulative ``dt * A``. The state per layer and sequence is
the convolution's last ``d_conv - 1`` inputs (``conv`` [conv_dim, d_conv - 1]) and ``ssm``
[heads, head_dim, d_state].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from edgellm.config import ModelConfig
from edgellm.errors import ModelFormatError, UnsupportedModelError
from edgellm.kv.state import StatePool
from edgellm.models.mamba import TensorSource, causal_mask, read_safetensors, recurrent_config
from edgellm.models.recurrent import RecurrentModel, RecurrentStep, Segment, scan_pieces
from edgellm.quant.base import Weight


@dataclass(frozen=True)
class Mamba2Shape:
    d_inner: int
    d_state: int
    d_conv: int
    heads: int
    head_dim: int
    groups: int
    dt_min: float
    dt_max: float

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.groups * self.d_state


@dataclass
class Mamba2Layer:
    norm: torch.Tensor              # [hidden], before the mixer
    in_proj: Weight                 # [d_inner + conv_dim + heads, hidden]: z, xBC, dt
    in_bias: torch.Tensor | None
    conv_w: torch.Tensor            # [conv_dim, d_conv]
    conv_b: torch.Tensor | None
    dt_bias: torch.Tensor           # [heads]
    A: torch.Tensor                 # [heads] = -exp(A_log)
    D: torch.Tensor                 # [heads]
    gate_norm: torch.Tensor         # [d_inner], the gated norm's weight
    out_proj: Weight                # [hidden, d_inner]
    out_bias: torch.Tensor | None


@dataclass
class Mamba2Weights:
    embed: Weight
    layers: list[Mamba2Layer]
    final_norm: torch.Tensor
    lm_head: Weight

    def matrices(self) -> list[Weight]:
        return [m for w in self.layers for m in (w.in_proj, w.out_proj)]

    @property
    def nbytes(self) -> int:
        total = self.embed.nbytes + (0 if self.lm_head is self.embed else self.lm_head.nbytes)
        total += sum(m.nbytes for m in self.matrices())
        for w in self.layers:
            total += 4 * sum(t.numel() for t in (w.norm, w.conv_w, w.dt_bias, w.A, w.D, w.gate_norm))
        return total + 4 * self.final_norm.numel()


class Mamba2Model(RecurrentModel):
    def __init__(self, cfg: ModelConfig, shape: Mamba2Shape, weights: Mamba2Weights):
        self.cfg = cfg
        self.shape = shape
        self.weights = weights

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        s = self.shape
        return {"conv": (s.conv_dim, s.d_conv - 1), "ssm": (s.heads, s.head_dim, s.d_state)}

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weights.embed.rows(tokens)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(h, (self.cfg.hidden_size,), self.weights.final_norm, self.cfg.rms_norm_eps)

    def block(self, h: torch.Tensor, layer: int, step: RecurrentStep, pool: StatePool) -> torch.Tensor:
        s, w = self.shape, self.weights.layers[layer]
        proj = w.in_proj.matmul(F.rms_norm(h, (self.cfg.hidden_size,), w.norm, self.cfg.rms_norm_eps))
        if w.in_bias is not None:
            proj = proj + w.in_bias
        z, xbc, dt = proj.split([s.d_inner, s.conv_dim, s.heads], dim=-1)
        dt = F.softplus(dt + w.dt_bias).clamp(s.dt_min, s.dt_max)
        y = torch.empty(h.shape[0], s.d_inner, dtype=h.dtype)
        for seg in step.segments:
            y[seg.rows] = self._prefill(xbc[seg.rows], dt[seg.rows], w, layer, seg, pool)
        if step.decode_rows is not None:
            rows = step.decode_rows
            y.index_copy_(0, rows, self._decode(xbc.index_select(0, rows), dt.index_select(0, rows), w, layer,
                                                step, pool))
        # the gated norm: rms_norm(y * silu(z)) over each group of d_inner / groups channels
        g = (y * F.silu(z)).view(-1, s.groups, s.d_inner // s.groups)
        y = F.rms_norm(g, (g.shape[-1],), eps=self.cfg.rms_norm_eps).view(-1, s.d_inner) * w.gate_norm
        out = w.out_proj.matmul(y)
        if w.out_bias is not None:
            out = out + w.out_bias
        return h + out

    def _split(self, u: torch.Tensor):
        """x [.., heads, head_dim] and B, C [.., heads, d_state] (each group's shared by its heads)."""
        s = self.shape
        x, B, C = u.split([s.d_inner, s.groups * s.d_state, s.groups * s.d_state], dim=-1)
        per_group = s.heads // s.groups
        B = B.unflatten(-1, (s.groups, s.d_state)).repeat_interleave(per_group, dim=-2)
        C = C.unflatten(-1, (s.groups, s.d_state)).repeat_interleave(per_group, dim=-2)
        return x.unflatten(-1, (s.heads, s.head_dim)), B, C

    def _prefill(self, xbc: torch.Tensor, dt: torch.Tensor, w: Mamba2Layer, layer: int, seg: Segment,
                 pool: StatePool) -> torch.Tensor:
        s = self.shape
        k = s.d_conv
        if seg.source is None:
            conv0 = xbc.new_zeros(s.conv_dim, k - 1)
            state = xbc.new_zeros(s.heads, s.head_dim, s.d_state)
        else:
            src = torch.tensor([seg.source])
            conv0, state = pool.read(layer, "conv", src)[0], pool.read(layer, "ssm", src)[0]
        xpad = torch.cat([conv0.t(), xbc])
        u = F.silu(F.conv1d(xpad.t().unsqueeze(0), w.conv_w.unsqueeze(1), w.conv_b, groups=s.conv_dim)[0].t())
        x, B, C = self._split(u)
        y = torch.empty_like(x)
        for lo, hi, block in scan_pieces(seg):
            y[lo:hi], state = _scan_piece(state, w.A, dt[lo:hi], x[lo:hi], B[lo:hi], C[lo:hi])
            if block is not None:
                b = torch.tensor([block])
                pool.write(layer, "conv", b, xpad[hi:hi + k - 1].t().unsqueeze(0))
                pool.write(layer, "ssm", b, state.unsqueeze(0))
        return (y + x * w.D[:, None]).flatten(-2)

    def _decode(self, xbc: torch.Tensor, dt: torch.Tensor, w: Mamba2Layer, layer: int, step: RecurrentStep,
                pool: StatePool) -> torch.Tensor:
        conv = pool.read(layer, "conv", step.decode_source)                 # [B, conv_dim, k - 1]
        state = pool.read(layer, "ssm", step.decode_source)                 # [B, heads, head_dim, d_state]
        window = torch.cat([conv, xbc.unsqueeze(-1)], dim=-1)
        u = (window * w.conv_w).sum(-1)
        if w.conv_b is not None:
            u = u + w.conv_b
        x, B, C = self._split(F.silu(u))                                    # [B, heads, head_dim | d_state]
        decay = torch.exp(dt * w.A)[:, :, None, None]
        state = decay * state + (dt[:, :, None] * x).unsqueeze(-1) * B.unsqueeze(-2)
        pool.write(layer, "conv", step.decode_target, window[:, :, 1:])
        pool.write(layer, "ssm", step.decode_target, state)
        y = (state @ C.unsqueeze(-1)).squeeze(-1) + x * w.D[:, None]
        return y.flatten(-2)


def _scan_piece(state, A, dt, x, B, C):
    """L positions at once. state [heads, head_dim, n], A [heads], dt [L, heads], x [L, heads,
    head_dim], B and C [L, heads, n]. Returns (y [L, heads, head_dim] without D, the state after)."""
    S = torch.cumsum(dt * A, dim=0)                                        # [L, heads], <= 0
    decay = (S.unsqueeze(1) - S.unsqueeze(0) + causal_mask(dt.shape[0])[..., 0]).exp()   # [t, j, heads]
    scores = torch.einsum("thn,jhn->tjh", C, B) * decay
    xdt = x * dt.unsqueeze(-1)                                             # [L, heads, head_dim]
    y = torch.einsum("tjh,jhp->thp", scores, xdt)
    y = y + torch.einsum("thn,hpn->thp", C, state) * torch.exp(S).unsqueeze(-1)
    to_end = torch.exp(S[-1] - S)                                          # [L, heads]
    state = state * torch.exp(S[-1])[:, None, None] + torch.einsum("jh,jhp,jhn->hpn", to_end, xdt, B)
    return y, state


def mamba2_config(data: dict, name: str) -> tuple[ModelConfig, Mamba2Shape]:
    where = "config.json"
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "num_heads", "head_dim"):
        if not isinstance(data.get(key), int) or data[key] <= 0:
            raise ModelFormatError(f"{where} '{key}' is {data.get(key)!r}, expected a positive integer",
                                   "use the config.json that came with the model's weights")
    if data.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"this Mamba-2 config uses the activation {data.get('hidden_act')!r}",
                                    "edgellm implements Mamba-2 with silu (every released Mamba-2 model)")
    d_inner = int(data.get("expand", 2) * data["hidden_size"])
    heads, head_dim, groups = data["num_heads"], data["head_dim"], int(data.get("n_groups", 1))
    if heads * head_dim != d_inner or heads % groups:
        raise ModelFormatError(
            f"{where}: num_heads {heads} x head_dim {head_dim} must equal expand x hidden_size = {d_inner}, "
            f"and num_heads be a multiple of n_groups {groups}", "use the config.json that came with the weights")
    limit = [_json_float(v) for v in (data.get("time_step_limit") or (0.0, float("inf")))]
    shape = Mamba2Shape(d_inner=d_inner, d_state=int(data.get("state_size", 128)),
                        d_conv=int(data.get("conv_kernel", 4)), heads=heads, head_dim=head_dim, groups=groups,
                        dt_min=float(limit[0]), dt_max=float(limit[1]))
    data = {"tie_word_embeddings": False, **data}      # transformers' default for Mamba-2
    cfg = recurrent_config("mamba2", data, name, ffn_size=d_inner, eps=float(data.get("layer_norm_epsilon", 1e-5)),
                           sizes=asdict(shape))
    return cfg, shape


def _json_float(value) -> float:
    """A number of config.json; transformers writes infinity as {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ModelFormatError(f"config.json 'time_step_limit' holds {value!r}, expected numbers",
                               "use the config.json that came with the model's weights") from None


def load_mamba2(folder: Path, data: dict, dtype: torch.dtype) -> Mamba2Model:
    cfg, s = mamba2_config(data, folder.name)
    src = TensorSource(read_safetensors(folder), dtype, folder)
    H, Di = cfg.hidden_size, s.d_inner
    layers = []
    for i in range(cfg.n_layers):
        p = f"backbone.layers.{i}."
        m = p + "mixer."
        layers.append(Mamba2Layer(
            norm=src.get(p + "norm.weight", (H,)),
            in_proj=src.matrix(m + "in_proj.weight", (Di + s.conv_dim + s.heads, H)),
            in_bias=src.get(m + "in_proj.bias", optional=True),
            conv_w=src.get(m + "conv1d.weight", (s.conv_dim, 1, s.d_conv))[:, 0].contiguous(),
            conv_b=src.get(m + "conv1d.bias", (s.conv_dim,), optional=True),
            dt_bias=src.get(m + "dt_bias", (s.heads,)), A=-torch.exp(src.get(m + "A_log", (s.heads,))),
            D=src.get(m + "D", (s.heads,)), gate_norm=src.get(m + "norm.weight", (Di,)),
            out_proj=src.matrix(m + "out_proj.weight", (H, Di)), out_bias=src.get(m + "out_proj.bias", optional=True)))
    embed_name = "backbone.embeddings.weight" if "backbone.embeddings.weight" in src.tensors else "backbone.embedding.weight"
    embed = src.matrix(embed_name, (cfg.vocab_size, H))
    lm_head = embed if cfg.tie_embeddings or "lm_head.weight" not in src.tensors else \
        src.matrix("lm_head.weight", (cfg.vocab_size, H))
    return Mamba2Model(cfg, s, Mamba2Weights(embed, layers, src.get("backbone.norm_f.weight", (H,)), lm_head))
