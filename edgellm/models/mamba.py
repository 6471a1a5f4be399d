"""Mamba (1): the selective state-space model, as transformers' ``MambaForCausalLM`` computes it.

Each block: ``h + out_proj(mixer(rms_norm(h)))``. The mixer projects to ``x`` and a gate ``z``
(``in_proj``), runs ``x`` through a causal depthwise convolution of ``d_conv`` taps and SiLU
(``u``), derives per-token step sizes and input/output maps from ``u`` (``x_proj``:
``dt_rank + 2 * d_state`` columns; ``dt = softplus(dt_proj(.))``) and runs, per channel ``d`` and
state entry ``n``::

    state[d, n] <- exp(dt[d] * A[d, n]) * state[d, n] + dt[d] * B[n] * u[d]
    y[d] = sum_n C[n] * state[d, n] + D[d] * u[d]

then ``out_proj(y * silu(z))``. The state of one layer of one sequence is the last ``d_conv - 1``
convolution inputs (``conv``: [d_inner, d_conv - 1]) and ``state`` (``ssm``: [d_inner, d_state]),
kept in a :class:`~edgellm.kv.state.StatePool`.

Prefill scans up to 32 positions at once as a parallel prefix scan of the recurrence (log2 L
rounds of whole-tensor operations, every factor a product of decays <= 1), keeping the state of
each position: the outputs read them all, and the snapshots owed at block edges are picked from
them. Decode applies the recurrence once, batched over sequences.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from edgellm.config import ModelConfig
from edgellm.errors import ModelFormatError, UnsupportedModelError
from edgellm.kv.state import StatePool
from edgellm.models.recurrent import RecurrentModel, RecurrentStep, Segment
from edgellm.quant.base import Weight
from edgellm.quant.dense import DenseWeight

#: a recurrent model has no position limit; the context admitted is bounded by memory only
RECURRENT_CONTEXT = 1 << 20
#: positions scanned at once: the scan holds a state per position ([L, d_inner, d_state] floats;
#: 32 keeps that near 2 MB for d_inner 1024 -- cache-sized temporaries, few Python rounds)
SCAN_POSITIONS = 32


@dataclass(frozen=True)
class MambaShape:
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int


@dataclass
class MambaLayer:
    norm: torch.Tensor              # [hidden]
    in_proj: Weight                 # [2 * d_inner, hidden]: x and the gate z
    in_bias: torch.Tensor | None
    conv_w: torch.Tensor            # [d_inner, d_conv]
    conv_b: torch.Tensor | None     # [d_inner]
    x_proj: Weight                  # [dt_rank + 2 * d_state, d_inner]
    dt_proj: Weight                 # [d_inner, dt_rank]
    dt_b: torch.Tensor              # [d_inner]
    A: torch.Tensor                 # [d_inner, d_state] = -exp(A_log)
    D: torch.Tensor                 # [d_inner]
    out_proj: Weight                # [hidden, d_inner]
    out_bias: torch.Tensor | None


@dataclass
class MambaWeights:
    embed: Weight
    layers: list[MambaLayer]
    final_norm: torch.Tensor
    lm_head: Weight

    def matrices(self) -> list[Weight]:
        """The blocks' matrices (for reports of formats)."""
        return [m for w in self.layers for m in (w.in_proj, w.x_proj, w.dt_proj, w.out_proj)]

    @property
    def nbytes(self) -> int:
        total = self.embed.nbytes + (0 if self.lm_head is self.embed else self.lm_head.nbytes)
        total += sum(m.nbytes for m in self.matrices())
        for w in self.layers:
            total += 4 * sum(t.numel() for t in (w.norm, w.conv_w, w.dt_b, w.A, w.D) if t is not None)
        return total + 4 * self.final_norm.numel()


class MambaModel(RecurrentModel):
    def __init__(self, cfg: ModelConfig, shape: MambaShape, weights: MambaWeights):
        self.cfg = cfg
        self.shape = shape
        self.weights = weights

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        s = self.shape
        return {"conv": (s.d_inner, s.d_conv - 1), "ssm": (s.d_inner, s.d_state)}

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weights.embed.rows(tokens)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(h, (self.cfg.hidden_size,), self.weights.final_norm, self.cfg.rms_norm_eps)

    def block(self, h: torch.Tensor, layer: int, step: RecurrentStep, pool: StatePool) -> torch.Tensor:
        w = self.weights.layers[layer]
        xz = w.in_proj.matmul(F.rms_norm(h, (self.cfg.hidden_size,), w.norm, self.cfg.rms_norm_eps))
        if w.in_bias is not None:
            xz = xz + w.in_bias
        x, z = xz.chunk(2, dim=-1)
        y = torch.empty_like(x)
        for seg in step.segments:
            y[seg.rows] = self._prefill(x[seg.rows], w, layer, seg, pool)
        if step.decode_rows is not None:
            y.index_copy_(0, step.decode_rows, self._decode(x.index_select(0, step.decode_rows), w, layer, step, pool))
        out = w.out_proj.matmul(y * F.silu(z))
        if w.out_bias is not None:
            out = out + w.out_bias
        return h + out

    def _ssm_inputs(self, u: torch.Tensor, w: MambaLayer):
        """Step sizes dt [.., d_inner] and the input and output maps B, C [.., d_state] of ``u``."""
        s = self.shape
        dt, B, C = w.x_proj.matmul(u).split([s.dt_rank, s.d_state, s.d_state], dim=-1)
        return F.softplus(w.dt_proj.matmul(dt) + w.dt_b), B, C

    def _prefill(self, x: torch.Tensor, w: MambaLayer, layer: int, seg: Segment, pool: StatePool) -> torch.Tensor:
        """One sequence's chunk x [n, d_inner] from its stored state; writes the snapshots it owes."""
        s = self.shape
        k = s.d_conv
        if seg.source is None:
            conv0 = x.new_zeros(s.d_inner, k - 1)
            state = x.new_zeros(s.d_inner, s.d_state)
        else:
            src = torch.tensor([seg.source])
            conv0, state = pool.read(layer, "conv", src)[0], pool.read(layer, "ssm", src)[0]
        xpad = torch.cat([conv0.t(), x])                                    # [k - 1 + n, d_inner]
        u = F.silu(F.conv1d(xpad.t().unsqueeze(0), w.conv_w.unsqueeze(1), w.conv_b, groups=s.d_inner)[0].t())
        dt, B, C = self._ssm_inputs(u, w)
        y = torch.empty_like(u)
        writes = dict(seg.writes)
        for lo in range(0, seg.length, SCAN_POSITIONS):
            hi = min(lo + SCAN_POSITIONS, seg.length)
            states = _scan_states(state, w.A, dt[lo:hi], B[lo:hi], u[lo:hi])          # [L, d_inner, d_state]
            y[lo:hi] = torch.einsum("tdn,tn->td", states, C[lo:hi])
            for t in (t for t in range(lo, hi) if t in writes):
                b = torch.tensor([writes[t]])
                pool.write(layer, "conv", b, xpad[t + 1:t + k].t().unsqueeze(0))
                pool.write(layer, "ssm", b, states[t - lo].unsqueeze(0))
            state = states[-1]
        return y + u * w.D

    def _decode(self, x: torch.Tensor, w: MambaLayer, layer: int, step: RecurrentStep,
                pool: StatePool) -> torch.Tensor:
        """One token of each of B sequences, x [B, d_inner]: the recurrence applied once."""
        conv = pool.read(layer, "conv", step.decode_source)                 # [B, d_inner, k - 1]
        state = pool.read(layer, "ssm", step.decode_source)                 # [B, d_inner, d_state]
        window = torch.cat([conv, x.unsqueeze(-1)], dim=-1)                 # [B, d_inner, k]
        u = (window * w.conv_w).sum(-1)
        if w.conv_b is not None:
            u = u + w.conv_b
        u = F.silu(u)
        dt, B, C = self._ssm_inputs(u, w)
        state = torch.exp(dt.unsqueeze(-1) * w.A) * state + (dt * u).unsqueeze(-1) * B.unsqueeze(1)
        pool.write(layer, "conv", step.decode_target, window[:, :, 1:])
        pool.write(layer, "ssm", step.decode_target, state)
        return (state @ C.unsqueeze(-1)).squeeze(-1) + u * w.D


def _scan_states(state, A, dt, B, u):
    """The state after each of L positions: state [d, n] before them, A [d, n], dt and u [L, d],
    B [L, n]. ``h[t] = a[t] h[t-1] + b[t]`` solved as a parallel prefix scan (Hillis-Steele):
    log2(L) rounds, each combining every position with the one ``step`` before it, so the work is
    a few whole-tensor operations per round rather than a Python step per position. Every factor
    is a product of decays (<= 1): nothing overflows."""
    a = torch.exp(dt.unsqueeze(-1) * A)                                   # [L, d, n]
    h = (dt * u).unsqueeze(-1) * B.unsqueeze(1)
    h[0] += a[0] * state
    step = 1
    while step < a.shape[0]:
        # (a, h) at t absorbs (a, h) at t - step: h[t] += a[t] h[t - step]; a[t] *= a[t - step]
        # (each right-hand side is computed whole before the assignment: the old values are read)
        h[step:] = torch.addcmul(h[step:], a[step:], h[:-step])
        a[step:] = a[step:] * a[:-step]
        step *= 2
    return h


@functools.cache
def causal_mask(L: int) -> torch.Tensor:
    """[L, L, 1, 1]: 0 where j <= t, -inf above the diagonal (added to an exponent, it zeroes)."""
    return torch.full((L, L), -math.inf).triu(1)[:, :, None, None]


# ---- loading an HF folder ----------------------------------------------------------------------------
def mamba_config(data: dict, name: str) -> tuple[ModelConfig, MambaShape]:
    """The engine's ModelConfig and the SSM's sizes from a ``MambaForCausalLM`` config.json."""
    where = "config.json"
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if not isinstance(data.get(key), int) or data[key] <= 0:
            raise ModelFormatError(f"{where} '{key}' is {data.get(key)!r}, expected a positive integer",
                                   "use the config.json that came with the model's weights")
    hidden = data["hidden_size"]
    if data.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"this Mamba config uses the activation {data.get('hidden_act')!r}",
                                    "edgellm implements Mamba with silu (every released Mamba model)")
    d_inner = int(data.get("intermediate_size") or data.get("expand", 2) * hidden)
    rank = data.get("time_step_rank", "auto")
    shape = MambaShape(d_inner=d_inner, d_state=int(data.get("state_size", 16)), d_conv=int(data.get("conv_kernel", 4)),
                       dt_rank=math.ceil(hidden / 16) if rank == "auto" else int(rank))
    cfg = recurrent_config("mamba", data, name, ffn_size=d_inner, eps=float(data.get("layer_norm_epsilon", 1e-5)),
                           sizes=asdict(shape))
    return cfg, shape


def recurrent_config(arch: str, data: dict, name: str, ffn_size: int, eps: float, sizes: dict) -> ModelConfig:
    """A ModelConfig for an attention-free model: the attention fields are placeholders (one head
    of width 2, which ModelConfig's checks accept) that nothing reads -- the runtime keeps a
    StatePool for these models, never a KV cache. ``extra["recurrent"]`` holds the mixer's sizes
    (``sizes``), which the roofline analyzer reads."""
    return ModelConfig(
        architecture=arch, n_layers=data["num_hidden_layers"], hidden_size=data["hidden_size"], n_heads=1,
        n_kv_heads=1, head_dim=2, ffn_size=ffn_size, vocab_size=data["vocab_size"],
        context_length=RECURRENT_CONTEXT, rms_norm_eps=eps,
        tie_embeddings=bool(data.get("tie_word_embeddings", True)), name=name or str(data.get("_name_or_path", "")),
        extra={"recurrent": dict(sizes)})


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's ``*.safetensors`` files, by name."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{folder}: no *.safetensors files", "put the model's safetensors weights there")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


class TensorSource:
    """Named tensors of a checkpoint, with shape checks and a clear error for a missing one."""

    def __init__(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, folder: Path):
        self.tensors, self.dtype, self.folder = tensors, dtype, folder

    def get(self, name: str, shape: tuple[int, ...] | None = None, optional: bool = False) -> torch.Tensor | None:
        t = self.tensors.get(name)
        if t is None:
            if optional:
                return None
            raise ModelFormatError(f"{self.folder}: tensor '{name}' is missing from the safetensors files",
                                   "the folder's weights are incomplete or belong to another architecture")
        if shape is not None and tuple(t.shape) != shape:
            raise ModelFormatError(f"{self.folder}: tensor '{name}' has shape {tuple(t.shape)}, expected {shape}",
                                   "config.json does not describe these weights")
        return t.float()

    def matrix(self, name: str, shape: tuple[int, int]) -> Weight:
        return DenseWeight(self.get(name, shape).to(self.dtype))


def load_mamba(folder: Path, data: dict, dtype: torch.dtype) -> MambaModel:
    cfg, s = mamba_config(data, folder.name)
    src = TensorSource(read_safetensors(folder), dtype, folder)
    H, Di, N = cfg.hidden_size, s.d_inner, s.d_state
    layers = []
    for i in range(cfg.n_layers):
        p = f"backbone.layers.{i}."
        m = p + "mixer."
        layers.append(MambaLayer(
            norm=src.get(p + "norm.weight", (H,)),
            in_proj=src.matrix(m + "in_proj.weight", (2 * Di, H)), in_bias=src.get(m + "in_proj.bias", optional=True),
            conv_w=src.get(m + "conv1d.weight", (Di, 1, s.d_conv))[:, 0].contiguous(),
            conv_b=src.get(m + "conv1d.bias", (Di,), optional=True),
            x_proj=src.matrix(m + "x_proj.weight", (s.dt_rank + 2 * N, Di)),
            # float32 whatever --dtype says: a small matrix whose output goes through softplus and exp
            dt_proj=DenseWeight(src.get(m + "dt_proj.weight", (Di, s.dt_rank))), dt_b=src.get(m + "dt_proj.bias", (Di,)),
            A=-torch.exp(src.get(m + "A_log", (Di, N))), D=src.get(m + "D", (Di,)),
            out_proj=src.matrix(m + "out_proj.weight", (H, Di)), out_bias=src.get(m + "out_proj.bias", optional=True)))
    embed_name = "backbone.embeddings.weight" if "backbone.embeddings.weight" in src.tensors else "backbone.embedding.weight"
    embed = src.matrix(embed_name, (cfg.vocab_size, H))
    lm_head = embed if cfg.tie_embeddings or "lm_head.weight" not in src.tensors else \
        src.matrix("lm_head.weight", (cfg.vocab_size, H))
    weights = MambaWeights(embed, layers, src.get("backbone.norm_f.weight", (H,)), lm_head)
    return MambaModel(cfg, s, weights)
