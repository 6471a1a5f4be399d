"""RWKV-4, as transformers' ``RwkvForCausalLM`` computes it.

Each block: ``h += time_mix(ln1(h))``, then ``h += channel_mix(ln2(h))`` (LayerNorms with bias;
block 0 first applies ``pre_ln`` to the embeddings). Both mixes blend each token's input with the
previous token's ("token shift", weights ``time_mix_*``). The time mix computes receptance r, key k
and value v and, per channel, the WKV average over the history with decay ``w = -exp(time_decay)``
per step and a bonus ``u = time_first`` for the current token::

    wkv[t] = (sum_{j<t} e^{(t-1-j) w + k_j} v_j + e^{u + k_t} v_t) / (same without the v's)
    out = output(sigmoid(r) * wkv)

The channel mix is ``sigmoid(receptance(x)) * value(relu(key(x))^2)``. The state per layer and
sequence: the previous token's inputs of both mixes (``att_x``, ``ffn_x``) and the WKV sums kept
as ``num``, ``den`` scaled by ``exp(-max)`` (``max``) so that no exponent overflows -- the form
transformers' CPU path keeps. A prefill piece of L positions takes the exponents of every (t, j)
pair at once ([L, L, channels]) and normalises by their maximum; decode updates the state once.

Like transformers at inference, block i's ``output`` and channel-mix ``value`` weights are divided
by 2^(i // rescale_every) and the residual stream halved after every ``rescale_every`` blocks
(keeps float16 checkpoints in range; the result is the same up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from edgellm.config import ModelConfig
from edgellm.errors import ModelFormatError
from edgellm.kv.state import StatePool
from edgellm.models.mamba import TensorSource, causal_mask, read_safetensors, recurrent_config
from edgellm.models.recurrent import RecurrentModel, RecurrentStep, Segment, scan_pieces
from edgellm.quant.base import Weight
from edgellm.quant.dense import DenseWeight

#: the WKV sums' scale of an empty history (transformers starts ``max`` at -1e38: exp() of it is 0)
EMPTY_MAX = -1e38


@dataclass
class RwkvLayer:
    ln1: tuple[torch.Tensor, torch.Tensor]     # weight, bias
    ln2: tuple[torch.Tensor, torch.Tensor]
    att_mix: torch.Tensor           # [3, hidden]: time_mix of key, value, receptance
    decay: torch.Tensor             # [att] w = -exp(time_decay)
    first: torch.Tensor             # [att] u = time_first
    key: Weight                     # [att, hidden]
    value: Weight                   # [att, hidden]
    receptance: Weight              # [att, hidden]
    output: Weight                  # [hidden, att]
    ffn_mix: torch.Tensor           # [2, hidden]: time_mix of key, receptance
    ffn_key: Weight                 # [ffn, hidden]
    ffn_receptance: Weight          # [hidden, hidden]
    ffn_value: Weight               # [hidden, ffn]


@dataclass
class RwkvWeights:
    embed: Weight
    pre_ln: tuple[torch.Tensor, torch.Tensor]
    layers: list[RwkvLayer]
    ln_out: tuple[torch.Tensor, torch.Tensor]
    lm_head: Weight

    def matrices(self) -> list[Weight]:
        return [m for w in self.layers
                for m in (w.key, w.value, w.receptance, w.output, w.ffn_key, w.ffn_receptance, w.ffn_value)]

    @property
    def nbytes(self) -> int:
        total = self.embed.nbytes + (0 if self.lm_head is self.embed else self.lm_head.nbytes)
        total += sum(m.nbytes for m in self.matrices())
        vectors = [*self.pre_ln, *self.ln_out]
        for w in self.layers:
            vectors += [*w.ln1, *w.ln2, w.att_mix, w.decay, w.first, w.ffn_mix]
        return total + 4 * sum(v.numel() for v in vectors)


class RwkvModel(RecurrentModel):
    def __init__(self, cfg: ModelConfig, att_size: int, rescale_every: int, weights: RwkvWeights):
        self.cfg = cfg
        self.att_size = att_size
        self.rescale_every = rescale_every
        self.weights = weights

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        H, A = self.cfg.hidden_size, self.att_size
        return {"att_x": (H,), "ffn_x": (H,), "num": (A,), "den": (A,), "max": (A,)}

    def _ln(self, x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor], eps: float | None = None) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), wb[0], wb[1], self.cfg.rms_norm_eps if eps is None else eps)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._ln(self.weights.embed.rows(tokens), self.weights.pre_ln)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self._ln(h, self.weights.ln_out, eps=1e-5)     # transformers' ln_out keeps LayerNorm's default

    def block(self, h: torch.Tensor, layer: int, step: RecurrentStep, pool: StatePool) -> torch.Tensor:
        w = self.weights.layers[layer]
        x = self._ln(h, w.ln1)
        prev = self._shifted(x, "att_x", layer, step, pool)
        k, v, r = (m.matmul(x * mix + prev * (1 - mix)) for m, mix in zip((w.key, w.value, w.receptance), w.att_mix))
        wkv = torch.empty_like(k)
        for seg in step.segments:
            wkv[seg.rows] = self._wkv_prefill(k[seg.rows], v[seg.rows], w, layer, seg, pool)
        if step.decode_rows is not None:
            rows = step.decode_rows
            wkv.index_copy_(0, rows, self._wkv_decode(k.index_select(0, rows), v.index_select(0, rows), w, layer,
                                                      step, pool))
        self._store_last_inputs(x, "att_x", layer, step, pool)
        h = h + w.output.matmul(torch.sigmoid(r) * wkv)

        x = self._ln(h, w.ln2)
        prev = self._shifted(x, "ffn_x", layer, step, pool)
        key = x * w.ffn_mix[0] + prev * (1 - w.ffn_mix[0])
        rec = x * w.ffn_mix[1] + prev * (1 - w.ffn_mix[1])
        self._store_last_inputs(x, "ffn_x", layer, step, pool)
        h = h + torch.sigmoid(w.ffn_receptance.matmul(rec)) * w.ffn_value.matmul(torch.relu(w.ffn_key.matmul(key)) ** 2)
        if self.rescale_every > 0 and (layer + 1) % self.rescale_every == 0:
            h = h / 2
        return h

    # ---- token shift ------------------------------------------------------------------------------
    def _shifted(self, x: torch.Tensor, name: str, layer: int, step: RecurrentStep, pool: StatePool) -> torch.Tensor:
        """Each row's previous token's input: the row before in its chunk, or the stored one."""
        prev = torch.cat([x.new_zeros(1, x.shape[1]), x[:-1]])
        for seg in step.segments:
            first = seg.rows.start
            prev[first] = 0 if seg.source is None else pool.read(layer, name, torch.tensor([seg.source]))[0]
        if step.decode_rows is not None:
            prev.index_copy_(0, step.decode_rows, pool.read(layer, name, step.decode_source))
        return prev

    def _store_last_inputs(self, x: torch.Tensor, name: str, layer: int, step: RecurrentStep,
                           pool: StatePool) -> None:
        for seg in step.segments:
            for t, block in seg.writes:
                pool.write(layer, name, torch.tensor([block]), x[seg.rows.start + t].unsqueeze(0))
        if step.decode_rows is not None:
            pool.write(layer, name, step.decode_target, x.index_select(0, step.decode_rows))

    # ---- WKV -----------------------------------------------------------------------------------------
    def _wkv_prefill(self, k: torch.Tensor, v: torch.Tensor, w: RwkvLayer, layer: int, seg: Segment,
                     pool: StatePool) -> torch.Tensor:
        if seg.source is None:
            num, den = k.new_zeros(self.att_size), k.new_zeros(self.att_size)
            mx = k.new_full((self.att_size,), EMPTY_MAX)
        else:
            src = torch.tensor([seg.source])
            num, den, mx = (pool.read(layer, n, src)[0] for n in ("num", "den", "max"))
        out = torch.empty_like(k)
        for lo, hi, block in scan_pieces(seg):
            out[lo:hi], (num, den, mx) = _wkv_piece(num, den, mx, w.decay, w.first, k[lo:hi], v[lo:hi])
            if block is not None:
                b = torch.tensor([block])
                for name, t in (("num", num), ("den", den), ("max", mx)):
                    pool.write(layer, name, b, t.unsqueeze(0))
        return out

    def _wkv_decode(self, k: torch.Tensor, v: torch.Tensor, w: RwkvLayer, layer: int, step: RecurrentStep,
                    pool: StatePool) -> torch.Tensor:
        num, den, mx = (pool.read(layer, n, step.decode_source) for n in ("num", "den", "max"))
        top = torch.maximum(mx, k + w.first)
        e_old, e_new = torch.exp(mx - top), torch.exp(k + w.first - top)
        out = (e_old * num + e_new * v) / (e_old * den + e_new)
        top = torch.maximum(mx + w.decay, k)
        e_old, e_new = torch.exp(mx + w.decay - top), torch.exp(k - top)
        for name, t in (("num", e_old * num + e_new * v), ("den", e_old * den + e_new), ("max", top)):
            pool.write(layer, name, step.decode_target, t)
        return out


def _wkv_piece(num, den, mx, decay, first, k, v):
    """WKV over L positions at once from the state (num, den, max) [att] before them; k, v [L, att].
    Returns (out [L, att], the state after the piece)."""
    L = k.shape[0]
    pos = torch.arange(L, dtype=k.dtype)
    # exponent of history token j in the output at t > j: (t - 1 - j) w + k_j; the current token
    # t gets u + k_t; the stored state (t) w + max. -inf where j > t.
    lag = (pos[:, None] - 1 - pos[None, :]).clamp(min=0)                      # [t, j]
    e = lag[:, :, None] * decay + k.unsqueeze(0) + causal_mask(L)[..., 0]    # [t, j, att]
    e = torch.where(torch.eye(L, dtype=torch.bool)[:, :, None], first + k.unsqueeze(0), e)
    e_state = pos[:, None] * decay + mx                                      # [t, att]
    top = torch.maximum(e.amax(dim=1), e_state)
    p = torch.exp(e - top.unsqueeze(1))
    p_state = torch.exp(e_state - top)
    out = (torch.einsum("tja,ja->ta", p, v) + p_state * num) / (p.sum(dim=1) + p_state * den)
    # the state after the piece: token j decayed (L - 1 - j) times, the old state L times
    e_end = (L - 1 - pos)[:, None] * decay + k                                # [j, att]
    e_old = L * decay + mx
    new_max = torch.maximum(e_end.amax(dim=0), e_old)
    q, q_old = torch.exp(e_end - new_max), torch.exp(e_old - new_max)
    return out, ((q * v).sum(0) + q_old * num, q.sum(0) + q_old * den, new_max)


def rwkv_config(data: dict, name: str) -> tuple[ModelConfig, int, int]:
    """(ModelConfig, attention width, rescale_every) of an ``RwkvForCausalLM`` config.json."""
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if not isinstance(data.get(key), int) or data[key] <= 0:
            raise ModelFormatError(f"config.json '{key}' is {data.get(key)!r}, expected a positive integer",
                                   "use the config.json that came with the model's weights")
    H = data["hidden_size"]
    A = int(data.get("attention_hidden_size") or H)
    F_ = int(data.get("intermediate_size") or 4 * H)
    rescale = int(data.get("rescale_every", 6) or 0)
    data = {"tie_word_embeddings": False, **data}       # transformers' default for RWKV
    cfg = recurrent_config("rwkv", data, name, ffn_size=F_, eps=float(data.get("layer_norm_epsilon", 1e-5)),
                           sizes={"att_size": A, "ffn_size": F_})
    return cfg, A, rescale


def load_rwkv(folder: Path, data: dict, dtype: torch.dtype) -> RwkvModel:
    cfg, A, rescale = rwkv_config(data, folder.name)
    H, F_ = cfg.hidden_size, cfg.ffn_size
    src = TensorSource(read_safetensors(folder), dtype, folder)

    def ln(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return src.get(name + ".weight", (H,)), src.get(name + ".bias", (H,))

    def scaled(name: str, shape: tuple[int, int], layer: int) -> Weight:
        factor = 2 ** (layer // rescale) if rescale > 0 else 1
        return DenseWeight((src.get(name, shape) / factor).to(dtype))

    layers = []
    for i in range(cfg.n_layers):
        p = f"rwkv.blocks.{i}."
        a, f = p + "attention.", p + "feed_forward."
        layers.append(RwkvLayer(
            ln1=ln(p + "ln1"), ln2=ln(p + "ln2"),
            att_mix=torch.stack([src.get(a + "time_mix_" + n, (1, 1, H)).view(H) for n in ("key", "value", "receptance")]),
            decay=-torch.exp(src.get(a + "time_decay", (A,))), first=src.get(a + "time_first", (A,)),
            key=src.matrix(a + "key.weight", (A, H)), value=src.matrix(a + "value.weight", (A, H)),
            receptance=src.matrix(a + "receptance.weight", (A, H)), output=scaled(a + "output.weight", (H, A), i),
            ffn_mix=torch.stack([src.get(f + "time_mix_" + n, (1, 1, H)).view(H) for n in ("key", "receptance")]),
            ffn_key=src.matrix(f + "key.weight", (F_, H)), ffn_receptance=src.matrix(f + "receptance.weight", (H, H)),
            ffn_value=scaled(f + "value.weight", (H, F_), i)))
    embed = src.matrix("rwkv.embeddings.weight", (cfg.vocab_size, H))
    lm_head = embed if cfg.tie_embeddings or "head.weight" not in src.tensors else \
        src.matrix("head.weight", (cfg.vocab_size, H))
    weights = RwkvWeights(embed, ln("rwkv.blocks.0.pre_ln"), layers, ln("rwkv.ln_out"), lm_head)
    return RwkvModel(cfg, A, rescale, weights)
